"""Seconds the calibrated slimming passes take on a bundled model, against running whole blocks.

    python tools/bench_calibrated.py                                   # builtin:tiny-mixtral
    python tools/bench_calibrated.py --model builtin:tiny-deepseek --passes gptq --repeats 1

GPTQ, AWQ, Wanda and SparseGPT look at each block several times — GPTQ at the inputs of each group
of projections in turn, AWQ at the attention output once per candidate scale — and most looks need
values computed before the block's experts. `BlockwiseRunner` runs only the part of the block that
computes what a look observes (`moepass.ir.stages.observing_stage`); the baseline, measured in the
same run, runs the whole block on every look. Both must give the same weights, bit for bit. The
recipe's calibration set (tokenized once), one thread, median of the interleaved repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

import torch

import moepass
from moepass.calibration import BlockwiseRunner
from moepass.data import TokenSet, calibration_set, window_length
from moepass.ir.stages import Stage, split_stages
from moepass.recipes import load_recipe
from moepass.table import format_table
from moepass.zoo import load_model, load_tokenizer
from timing import interleaved_times

RECIPES = {
    "gptq": [("gptq", {"bits": 4, "group_size": 128})],
    "awq": [("awq", {"bits": 4, "group_size": 128})],
    "wanda": [("wanda", {"sparsity": 0.5})],
    "sparsegpt": [("sparsegpt", {"sparsity": 0.5})],
}


def whole_block(runner: BlockwiseRunner, block: int, observe: set[str]) -> Stage:
    """The baseline's look at a block: its whole stage, whatever the look observes."""
    (stage,) = split_stages(runner.program.graph_module, observe=observe, only=f"block {block}")
    return stage


def compare(program, recipe, calibration: TokenSet, repeats: int) -> tuple[float, float, bool]:
    """Median seconds with whole blocks and with observing stages, and whether the weights agree."""
    results = {}

    def run(variant: str) -> None:
        whole = variant == "whole"
        patch = (
            mock.patch.object(BlockwiseRunner, "stage", whole_block) if whole else contextlib.nullcontext()
        )
        with patch:
            results[variant] = moepass.compress(program, recipe, calibration=calibration).graph_module

    times = interleaved_times({v: lambda v=v: run(v) for v in ("whole", "observing")}, repeats)
    ours, theirs = (results[v].state_dict() for v in ("observing", "whole"))
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    return statistics.median(times["whole"]), statistics.median(times["observing"]), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-mixtral")
    parser.add_argument("--passes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    program = moepass.capture(load_model(args.model))
    spec = load_recipe(RECIPES["gptq"]).calibration
    seq_len = window_length(spec.seq_len, program.info.config.get("max_position_embeddings"))
    tokenizer = load_tokenizer(args.model)
    calibration = calibration_set(spec.data, tokenizer, samples=spec.samples, seq_len=seq_len, seed=spec.seed)
    rows = []
    for name in args.passes:
        whole, observing, same = compare(program, RECIPES[name], calibration, args.repeats)
        rows.append([name, f"{whole:.1f}", f"{observing:.1f}", f"{whole / observing:.2f}x", same])
        print(f"{name}: whole blocks {whole:.1f}s, observing stages {observing:.1f}s", flush=True)
    headers = ["pass", "whole blocks s", "observing stages s", "speedup", "same weights"]
    title = f"Calibrated passes on {args.model} ({len(calibration)} x {seq_len} tokens, one thread)"
    print(format_table(headers, rows, title=title))


if __name__ == "__main__":
    main()
