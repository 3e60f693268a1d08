"""How whole-program work grows with depth: capture, RTN, GPTQ, AWQ, expert and layer drops, save,
load and ONNX export.

    python tools/bench_depth.py                  # Mixtral, 4 / 8 / 16 / 32 layers
    python tools/bench_depth.py --layers 4 8     # quicker

Edits that rewrite every layer must cost time linear in the depth: a real model has 24-61 layers,
and a per-edit cost proportional to the graph (regenerating its code, say) makes the whole pass
quadratic. The table gives seconds per layer and, in brackets, that per-layer cost relative to
the shallowest model of the same run (1.0x: linear). Tiny widths, so the graph work dominates.
One thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import moepass
from moepass.data import TokenSet
from moepass.table import format_table
from moepass.zoo import random_model

TARGETS = ["experts", "attention", "lm_head", "embeddings"]


def timings(layers: int) -> dict[str, float]:
    """Seconds of each step for a `layers`-deep tiny Mixtral; checks the loaded program too."""
    model = random_model("mixtral", seed=0, num_hidden_layers=layers)
    seconds = {}

    def timed(name: str, work):
        start = time.perf_counter()
        result = work()
        seconds[name] = time.perf_counter() - start
        return result

    program = timed("capture", lambda: moepass.capture(model))
    recipes = {
        "rtn int4": [("rtn", {"group_size": 16, "targets": TARGETS})],
        "gptq int4": [("gptq", {"group_size": 16})],
        "awq int4": [("awq", {"group_size": 16})],
        "expert_drop 8->6": [("expert_drop", {"keep": 6, "score": "random"})],
        "layer_drop half": [("layer_drop", {"count": layers // 2, "metric": "random"})],
    }
    ids = torch.randint(3, model.config.vocab_size, (8, 33), generator=torch.Generator().manual_seed(0))
    calibration = TokenSet(ids[:, :-1], ids[:, 1:], ["random"] * 8)  # a few tokens: the graph work counts
    compressed = {
        name: timed(name, lambda r=recipe: moepass.compress(program, r, calibration=calibration))
        for name, recipe in recipes.items()
    }
    quantized = compressed["rtn int4"]
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with tempfile.TemporaryDirectory() as directory:
        timed("save", lambda: moepass.save(quantized, f"{directory}/artifact"))
        loaded = timed("load", lambda: moepass.load(f"{directory}/artifact", lower=False))
        timed("export-onnx", lambda: moepass.export_onnx(quantized, f"{directory}/onnx"))
    with torch.no_grad():
        if not torch.allclose(loaded(ids), quantized(ids), atol=1e-5, rtol=0):
            raise SystemExit(f"{layers} layers: the loaded program computes other logits than the saved one")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for layers in args.layers:
        results[layers] = timings(layers)
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in results[layers].items())
        print(f"{layers} layers: {steps}", flush=True)
    base = min(results)

    def cell(seconds: dict[str, float], layers: int, step: str) -> str:
        per_layer = seconds[step] / layers
        return f"{per_layer:.3f} ({per_layer / (results[base][step] / base):.1f}x)"

    steps = list(results[base])
    rows = [[layers] + [cell(seconds, layers, s) for s in steps] for layers, seconds in results.items()]
    print(format_table(["layers", *(f"{s} s/layer" for s in steps)], rows, title="Per-layer cost vs depth"))


if __name__ == "__main__":
    main()
