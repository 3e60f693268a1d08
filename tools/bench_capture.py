"""Capture cost per family, and decode speed of the captured program vs transformers eager.

    python tools/bench_capture.py            # all families + mid-size Mixtral decode
    python tools/bench_capture.py --quick    # fewer decode tokens

One thread; decode times are medians over tokens, and both paths run in the same process so the
ratio is meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from transformers import DynamicCache

import moepass
from moepass.ir.capture import cache_keyword
from moepass.ir.ops import EXPERTS, ROUTE
from moepass.table import format_table
from moepass.zoo import RANDOM_FAMILIES, random_model
from timing import interleaved_times


def capture_table() -> str:
    rows = []
    for family in RANDOM_FAMILIES:
        model = random_model(family, seed=0)
        start = time.perf_counter()
        program = moepass.capture(model)
        seconds = time.perf_counter() - start
        targets = Counter(n.target for n in program.graph_module.graph.nodes if n.op == "call_function")
        rows.append(
            [
                family,
                f"{seconds:.2f}",
                len(program.graph_module.graph.nodes),
                targets[ROUTE],
                targets[EXPERTS],
                len(program.structure.blocks),
            ]
        )
    return format_table(
        ["family", "capture s", "nodes", "route ops", "experts ops", "blocks"],
        rows,
        title="Capture (tiny random models, 3 layers, 8 experts)",
    )


def speed_table(tokens: int, prompt: int, prefill_tokens: int = 128, prefill_runs: int = 5) -> str:
    model = random_model(
        "mixtral",
        seed=0,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=8,
    )
    params = sum(p.numel() for p in model.parameters())
    program = moepass.capture(model)
    ids = torch.randint(0, 32000, (1, prompt))
    with torch.no_grad():
        # transformers eager: prefill, then one token at a time with its DynamicCache
        cache = {cache_keyword(model): DynamicCache()}
        hf = {"next": model(ids, use_cache=True, **cache).logits[:, -1:].argmax(-1)}

        def hf_step():
            hf["next"] = model(hf["next"], use_cache=True, **cache).logits[:, -1:].argmax(-1)

        mask = torch.ones(1, prompt, dtype=torch.long)
        logits, past = program.step(ids, mask, torch.arange(prompt)[None], program.empty_cache(1))
        ours = {"next": logits[:, -1:].argmax(-1), "past": past, "mask": mask, "pos": prompt}

        def moepass_step():
            ours["mask"] = torch.cat([ours["mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            positions = torch.tensor([[ours["pos"]]])
            logits, ours["past"] = program.step(ours["next"], ours["mask"], positions, ours["past"])
            ours["next"] = logits[:, -1:].argmax(-1)
            ours["pos"] += 1

        decode = interleaved_times({"hf": hf_step, "moepass": moepass_step}, repeats=tokens)
        long_ids = torch.randint(0, 32000, (1, prefill_tokens))
        prefill = interleaved_times(
            {"hf": lambda: model(long_ids), "moepass": lambda: program(long_ids)}, repeats=prefill_runs
        )
    dec = {name: statistics.median(t) * 1e3 for name, t in decode.items()}
    pre = {name: statistics.median(t) * 1e3 for name, t in prefill.items()}
    rows = [
        [
            label,
            f"{dec[name]:.2f}",
            f"{dec['hf'] / dec[name]:.2f}x",
            f"{pre[name]:.1f}",
            f"{pre['hf'] / pre[name]:.2f}x",
        ]
        for name, label in (
            ("hf", "transformers eager (grouped_mm)"),
            ("moepass", "moepass captured program"),
        )
    ]
    title = (
        f"Batch 1, 1 thread, fp32, Mixtral H512, 8 layers, 8 experts top-2, {params / 1e6:.0f}M params\n"
        f"Decode: prompt {prompt}, {tokens} tokens; prefill: {prefill_tokens} tokens, {prefill_runs} runs"
    )
    headers = ["path", "decode ms/token", "decode speed", "prefill ms", "prefill speed"]
    return format_table(headers, rows, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(capture_table(), end="\n\n")
    print(speed_table(tokens=16 if args.quick else 64, prompt=32))


if __name__ == "__main__":
    main()
