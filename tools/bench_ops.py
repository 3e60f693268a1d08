"""Each compressed op's fastest CPU path against the dense fp32 op it replaces (one thread).

    python tools/bench_ops.py            # Mixtral-like mid-size shapes
    python tools/bench_ops.py --quick    # smaller shapes, fewer runs

Rows are medians of interleaved runs (all paths of a row take turns), so the ratios hold on a
shared, noisy machine. "reference" is the canonical op's own implementation (dequantize on every
call); "ATen packed" is `moepass::packed_linear` / `moepass::packed_experts` on weights converted
once by `moepass.kernels.pack_for_cpu`, computing in bf16.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moepass.ir.ops import EXPERTS
from moepass.ir.quant_ops import QUANTIZED_EXPERTS, QUANTIZED_LINEAR
from moepass.ir.quantized import QuantFormat, quantize
from moepass.ir.sparse import SPARSE24_LINEAR
from moepass.kernels import compress_24, pack_for_cpu
from moepass.kernels.ops import PACKED_EXPERTS, PACKED_LINEAR
from moepass.table import format_table
from timing import median_ms


def sparse_24(weight: torch.Tensor) -> torch.Tensor:
    runs = weight.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.abs().topk(2, dim=-1).indices, True)
    return (runs * keep).reshape(weight.shape)


def linear_rows(n: int, k: int, rows: int, repeats: int) -> list[list[str]]:
    weight = torch.randn(n, k) / k**0.5
    x = torch.randn(rows, k)
    int4 = quantize(weight, QuantFormat(4, 128, False))
    int8 = quantize(weight, QuantFormat(8, -1, True))
    p4, p8 = pack_for_cpu(*int4, 4, 128), pack_for_cpu(*int8, 8, -1)
    values, meta = compress_24(sparse_24(weight))
    steps = {
        "dense fp32": lambda: F.linear(x, weight),
        "dense bf16": lambda: F.linear(x.bfloat16(), weight.bfloat16()),
        "int4 g128 reference": lambda: QUANTIZED_LINEAR(x, *int4, None, None, 4, 128),
        "int4 g128 ATen packed": lambda: PACKED_LINEAR(x, p4.weight, p4.scales, None, None, 4, p4.group_size),
        "int8 per-channel ATen packed": lambda: PACKED_LINEAR(x, p8.weight, p8.scales, None, None, 8, -1),
        "2:4 sparse reference": lambda: SPARSE24_LINEAR(x, values, meta, None, None, None, None, 0, -1),
    }
    ms = median_ms(steps, repeats)
    base = ms["dense fp32"]
    return [[f"linear {n}x{k}", rows, name, f"{t:.3f}", f"{base / t:.2f}x"] for name, t in ms.items()]


def experts_rows(num_experts: int, hidden: int, inter: int, top_k: int, tokens: int, repeats: int):
    gate_up = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter) / inter**0.5
    x = torch.randn(tokens, hidden)
    weights, ids = torch.randn(tokens, num_experts).softmax(-1).topk(top_k, dim=-1)
    fmt = QuantFormat(4, 128, False)
    gq, dq = quantize(gate_up, fmt), quantize(down, fmt)
    pg, pd = pack_for_cpu(*gq, 4, 128), pack_for_cpu(*dq, 4, 128)
    tail = ("silu", 0.0, 0.0)
    steps = {
        "dense fp32": lambda: EXPERTS(x, ids, weights, gate_up, down, None, None, *tail),
        "int4 g128 reference": lambda: QUANTIZED_EXPERTS(
            x, ids, weights, *gq, *dq, None, None, None, None, *tail, 4, 128
        ),
        "int4 g128 ATen packed": lambda: PACKED_EXPERTS(
            x,
            ids,
            weights,
            pg.weight,
            pg.scales,
            pd.weight,
            pd.scales,
            None,
            None,
            None,
            None,
            *tail,
            4,
            pg.group_size,
            pd.group_size,
        ),
    }
    ms = median_ms(steps, repeats)
    base = ms["dense fp32"]
    label = f"experts E{num_experts} {hidden}/{inter} top{top_k}"
    return [[label, tokens, name, f"{t:.3f}", f"{base / t:.2f}x"] for name, t in ms.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 20
    scale = 2 if args.quick else 1
    rows = []
    for tokens in (1, 16, 128):
        rows += linear_rows(4096 // scale, 1024 // scale, tokens, repeats)
    for tokens in (1, 16, 128):
        rows += experts_rows(8, 1024 // scale, 2816 // scale, 2, tokens, repeats)
    print(
        format_table(
            ["op", "rows", "path", "ms", "vs dense fp32"],
            rows,
            title="CPU op paths, one thread (median of interleaved runs)",
        )
    )


if __name__ == "__main__":
    main()
