"""GPU kernel check and benchmark: correctness first, then a table of timings (one prepared run).

    python tools/device/bench_kernels.py            # on the GPU machine (H200)
    python tools/device/bench_kernels.py --smoke    # logic check on CPU: tiny shapes, Triton interpreter
    python tools/device/bench_kernels.py --sweep 120  # then time other launches for 120 s

For each MoE shape — Mixtral-8x7B (H 4096, I 14336, E 8, top-2) and a fine-grained one (H 2048, I 768,
E 128, top-8) — at M = 1, 16, 256, 2048 tokens: bf16 and W4A16 (int4, g128) fused MoE against
transformers' `grouped_mm` experts, measured in the same run. Plus the single-matrix kernels at decode
size: W4A16/W8A16 GEMM vs torch's bf16 GEMV and int4 tinygemm, and 2:4 sparse (bf16, int4) vs dense.
Floors: max(bytes read / 4.14 TB/s, FLOPs / 748 TFLOP/s), the H200 ceilings in TARGETS.md. Times are
medians from `triton.testing.do_bench` (L2 flushed); "graph" rows replay a CUDA graph (no launch gaps).
Runs under torch 2.11 / triton 3.6 / transformers 5.17.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import triton

from moepass.ir.ops import ACTIVATIONS, run_experts
from moepass.ir.quantized import QuantFormat, dequantize, quantize
from moepass.kernels import compress_24
from moepass.kernels import fused_moe as fused_moe_module
from moepass.kernels import quant_gemm as quant_gemm_module
from moepass.kernels.fused_moe import fused_moe, tiles_for
from moepass.kernels.quant_gemm import Tiles, blocks_for, quant_gemm
from moepass.kernels.sparse24 import sparse24_gemm
from moepass.table import format_table

BANDWIDTH = 4.14e12  # bytes/s, H200 device copy
BF16_PEAK = 748e12  # FLOP/s, H200 dense bf16 matmul
GROUP = 128


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn, device: torch.device) -> float | None:
    """Milliseconds per replay of `fn` captured in a CUDA graph; None off-GPU or if capture fails."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")
    except Exception as error:  # a failed capture is reported, not fatal
        print(f"  (CUDA graph capture failed: {type(error).__name__}: {error})")
        return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def hf_grouped_mm_experts(gate_up: torch.Tensor, down: torch.Tensor, top_k: int):
    """transformers' Mixtral experts module on the same weights, `grouped_mm` implementation."""
    from transformers import MixtralConfig
    from transformers.integrations import moe as hf_moe
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    num_experts, two_inter, hidden = gate_up.shape
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=two_inter // 2,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )
    module = MixtralExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return lambda x, ids, w: hf_moe.grouped_mm_experts_forward(module, x, ids, w)


def reference_moe(x, ids, weights, expert_weights, num_experts):
    """fp32 math, expert by expert (the canonical op's reference loop)."""
    return run_experts(
        x.float(), ids, weights.float(), num_experts, expert_weights, ACTIVATIONS["silu"], 0.0, 0.0
    )


def moe_weights(hidden: int, inter: int, num_experts: int, gen: torch.Generator):
    """Random bf16 experts, their int4 g128 codes, and the `quant` dict `fused_moe` takes."""
    gate_up = (
        torch.randn(num_experts, 2 * inter, hidden, device=gen.device, generator=gen) / hidden**0.5
    ).bfloat16()
    down = (torch.randn(num_experts, hidden, inter, device=gen.device, generator=gen) / inter**0.5).bfloat16()
    fmt = QuantFormat(bits=4, group_size=GROUP, symmetric=False)
    gq, dq = quantize(gate_up, fmt), quantize(down, fmt)
    quant = {"bits": 4, "group_size": GROUP, "gate_up_scales": gq[1], "gate_up_zeros": gq[2],
             "down_scales": dq[1], "down_zeros": dq[2]}  # fmt: skip
    return gate_up, down, gq, dq, quant


def moe_rows(name: str, hidden: int, inter: int, num_experts: int, top_k: int, tokens_list, device, checks):
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up, down, gq, dq, quant = moe_weights(hidden, inter, num_experts, gen)
    baseline = hf_grouped_mm_experts(gate_up, down, top_k)
    expert_bytes = {
        "bf16": 3 * hidden * inter * 2,
        "w4a16": sum(t[e].numel() * t.element_size() for t in (*gq[:2], *dq[:2]) for e in [0])
        + gq[2][0].numel()
        + dq[2][0].numel(),
    }
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16()
        logits = torch.randn(tokens, num_experts, device=device, generator=gen)
        weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
        weights = weights.bfloat16()
        hit = int(ids.unique().numel())
        flops = 2 * tokens * top_k * 3 * hidden * inter
        base_ms = time_ms(lambda x=x, ids=ids, w=weights: baseline(x, ids, w), device)
        for variant in ("bf16", "w4a16"):
            if variant == "bf16":
                run = lambda x=x, ids=ids, w=weights: fused_moe(x, ids, w, gate_up, down)  # noqa: E731
                ref_weights = lambda e: (gate_up[e].float(), down[e].float(), None, None)  # noqa: E731
            else:
                run = lambda x=x, ids=ids, w=weights: fused_moe(x, ids, w, gq[0], dq[0], quant=quant)  # noqa: E731

                def ref_weights(e):
                    return (
                        dequantize(gq[0][e], gq[1][e], gq[2][e], 4, GROUP, torch.float32),
                        dequantize(dq[0][e], dq[1][e], dq[2][e], 4, GROUP, torch.float32),
                        None,
                        None,
                    )

            if tokens <= 256:
                err = rel_err(run(), reference_moe(x, ids, weights, ref_weights, num_experts))
                checks.append((f"{name} {variant} fused MoE, M={tokens}", err, 2e-2))
            ms = time_ms(run, device)
            floor = max(hit * expert_bytes[variant] / BANDWIDTH, flops / BF16_PEAK) * 1e3
            memory_bound = hit * expert_bytes[variant] / BANDWIDTH > flops / BF16_PEAK
            achieved = (
                f"{hit * expert_bytes[variant] / ms / 1e9:.2f} TB/s"
                if memory_bound
                else f"{flops / ms / 1e9:.0f} TFLOP/s"
            )
            graph = graph_ms(run, device) if tokens <= 16 else None
            rows.append(
                [
                    name,
                    variant,
                    tokens,
                    f"{ms:.4f}",
                    "-" if graph is None else f"{graph:.4f}",
                    achieved,
                    f"{100 * floor / ms:.0f}%",
                    f"{base_ms / ms:.2f}x",
                ]
            )
    return rows


def matrix_rows(n: int, k: int, device, checks, rows_list=(1, 16)):
    gen = torch.Generator(device=device).manual_seed(1)
    weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).bfloat16()
    int4 = quantize(weight, QuantFormat(4, GROUP, False))
    int8 = quantize(weight, QuantFormat(8, GROUP, True))
    runs = weight.float().reshape(n, k // 4, 4)
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.abs().topk(2, dim=-1).indices, True)
    sparse = (runs * keep).reshape(n, k).bfloat16()
    values, meta = compress_24(sparse)
    sq = quantize(values, QuantFormat(4, GROUP // 2, False))
    tinygemm = None
    if device.type == "cuda":
        try:  # torch's own int4 GEMM (tinygemm); its speed depends on shapes only, so random codes
            packed = torch.ops.aten._convert_weight_to_int4pack(
                torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device), 8
            )
            sz = torch.rand(k // GROUP, n, 2, device=device).bfloat16()
            tinygemm = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)  # noqa: E731
            tinygemm(torch.randn(1, k, device=device).bfloat16())
        except Exception as error:
            print(f"  (torch int4 tinygemm unavailable: {type(error).__name__}: {error})")
            tinygemm = None
    out = []
    for m in rows_list:
        x = torch.randn(m, k, device=device, generator=gen).bfloat16()
        paths = {
            "bf16 torch linear": (lambda x=x: torch.nn.functional.linear(x, weight), 2 * n * k, None),
            "W4A16 moepass": (
                lambda x=x: quant_gemm(x, *int4, 4, GROUP),
                int4[0].numel() + int4[1].numel() * 2 + int4[2].numel(),
                x.float() @ dequantize(*int4, 4, GROUP, torch.float32).T,
            ),
            "W8A16 moepass": (
                lambda x=x: quant_gemm(x, *int8, 8, GROUP),
                int8[0].numel() + int8[1].numel() * 2,
                x.float() @ dequantize(*int8, 8, GROUP, torch.float32).T,
            ),
            "2:4 bf16 moepass": (
                lambda x=x: sparse24_gemm(x, values, meta),
                values.numel() * 2 + meta.numel(),
                x.float() @ sparse.float().T,
            ),
            "2:4 + int4 moepass": (
                lambda x=x: sparse24_gemm(x, sq[0], meta, sq[1], sq[2], 4, GROUP),
                sq[0].numel() + sq[1].numel() * 2 + sq[2].numel() + meta.numel(),
                None,
            ),
        }
        if tinygemm is not None:
            paths["int4 torch tinygemm"] = (
                lambda x=x: tinygemm(x),
                n * k // 2 + 2 * n * k // GROUP * 2,
                None,
            )
        base = time_ms(paths["bf16 torch linear"][0], device)
        for label, (fn, nbytes, ref) in paths.items():
            if ref is not None:
                checks.append((f"{label} {n}x{k}, M={m}", rel_err(fn(), ref), 2e-2))
            ms = time_ms(fn, device)
            floor = nbytes / BANDWIDTH * 1e3
            out.append(
                [
                    f"{n}x{k}",
                    label,
                    m,
                    f"{ms:.4f}",
                    f"{nbytes / ms / 1e9:.2f} TB/s",
                    f"{100 * floor / ms:.0f}%",
                    f"{base / ms:.2f}x",
                ]
            )
    return out


# launches the sweep tries beside the heuristic's, by regime, those not yet measured first: GEMV
# products (1-row tiles off the tensor cores), scaling after the dot, split-K; a block_k of 256
# exceeds int4's groups of 128, so those tiles read scales element by element
# (`_dequantized_gather`). "matrix": `quant_gemm` at decode sizes.
SWEEP = {
    "decode": [Tiles(1, 64, 128, scale_after_dot=True, gemv=True),
               Tiles(1, 128, 128, 8, 3, False, 1, True, True), Tiles(1, 64, 128, 4, 3, False, 4, True, True),
               Tiles(16, 32, 128, scale_after_dot=True), Tiles(16, 32, 128, split_k=4, scale_after_dot=True),
               Tiles(16, 32, 128, 4, 3, True, 4, True), Tiles(16, 64, 128, 4, 4, True, 1, True),
               Tiles(1, 64, 128, gemv=True), Tiles(16, 32, 128, split_k=4), Tiles(16, 32, 128, 4, 3, True, 4),
               Tiles(16, 64, 128, 4, 4, True, 8), Tiles(16, 32, 128), Tiles(16, 64, 128, 4, 4),
               Tiles(16, 32, 128, 4, 3, True), Tiles(16, 64, 128, 4, 4, True), Tiles(16, 64, 64, 4, 3, True),
               Tiles(16, 32, 256, 4, 3, True), Tiles(16, 64, 128, 8, 4, True)],
    "prefill": [Tiles(64, 128, 64), Tiles(128, 64, 64, 8), Tiles(128, 128, 64, 8), Tiles(128, 64, 64, 8, 4),
                Tiles(128, 64, 128, 8, 3), Tiles(128, 64, 64, 8, 3, True),
                Tiles(128, 64, 64, 8, scale_after_dot=True)],
    "matrix": [Tiles(1, 64, 128, split_k=4, scale_after_dot=True, gemv=True),
               Tiles(1, 128, 128, 8, 3, False, 8, True, True), Tiles(1, 32, 128, 4, 3, False, 8, True, True),
               Tiles(16, 64, 64, split_k=8, scale_after_dot=True),
               Tiles(16, 32, 128, split_k=8, scale_after_dot=True), Tiles(16, 64, 128, 4, 4, True, 4, True),
               Tiles(16, 32, 128, 4, 3, True, 8, True), Tiles(16, 128, 128, 8, 3, False, 4, True),
               Tiles(16, 32, 128, split_k=8), Tiles(16, 64, 64, 4, 3, True, 8)],
}  # fmt: skip


def _launch(tiles: Tiles) -> str:
    split = f" split-K {tiles.split_k}" if tiles.split_k > 1 else ""
    scaled = " scale after dot" if tiles.scale_after_dot else ""
    gemv = " gemv" if tiles.gemv else ""
    return "/".join(map(str, tiles[:5])) + (" swap" if tiles.swap_ab else "") + split + scaled + gemv


@contextlib.contextmanager
def launched_as(tiles: Tiles):
    """Every fused-MoE and `quant_gemm` launch inside uses `tiles` instead of the heuristic's."""
    fused_moe_module.tiles_for = quant_gemm_module.blocks_for = lambda *_: tiles
    try:
        yield
    finally:
        fused_moe_module.tiles_for, quant_gemm_module.blocks_for = tiles_for, blocks_for


def _against_heuristic(run, reference: torch.Tensor, launch: Tiles, device) -> tuple[float, float, float]:
    """(error vs the heuristic's output, heuristic ms, `launch` ms): the two launches alternate twice
    and each keeps its median, since separate measurements of one launch drifted up to 2x on the
    H200 (BENCHMARKS.md, 2026-12-04)."""
    base, alt = [], []
    for _ in range(2):
        base.append(time_ms(run, device))
        with launched_as(launch):
            err = rel_err(run(), reference)
            alt.append(time_ms(run, device))
    return err, statistics.median(base), statistics.median(alt)


def sweep_rows(shapes, matrix: tuple[int, int], device, seconds: float) -> list[list]:
    """`quant_gemm` at decode sizes (a quarter of the time), then each fused-MoE case, under the
    heuristic's launch and the SWEEP alternatives (outputs checked against the heuristic's), until
    `seconds` pass: data for `blocks_for` and `tiles_for`, not a tuning file."""
    start, rows = time.perf_counter(), []
    for deadline, cases in ((start + seconds / 4, matrix_cases(*matrix, device)),
                            (start + seconds, moe_cases(shapes, device))):  # fmt: skip
        for case, variant, tokens, heuristic, run, regime in cases:
            reference = run()
            for launch in SWEEP[regime]:
                if time.perf_counter() > deadline:
                    break
                if variant == "bf16" and launch.scale_after_dot:  # no scales: the same launch
                    continue
                try:
                    err, base_ms, ms = _against_heuristic(run, reference, launch, device)
                    result = [f"{base_ms:.4f}", f"{err:.1e}", f"{ms:.4f}", f"{base_ms / ms:.2f}x"]
                except Exception as error:  # a launch the chip refuses (registers, shared memory)
                    result = ["-", type(error).__name__, "-", "-"]
                rows.append([case, variant, tokens, _launch(heuristic), _launch(launch), *result])
                print("  sweep:", " | ".join(map(str, rows[-1])), flush=True)
    return rows


def best_launches(swept: list[list]) -> list[list]:
    """Per (shape, weights, M): the sweep's fastest launch, the evidence a heuristic change needs."""
    best: dict[tuple, tuple[float, str]] = {}
    for shape, variant, tokens, _, launch, *_, speedup in swept:
        ratio = 0.0 if speedup == "-" else float(speedup.rstrip("x"))
        if ratio > best.get((shape, variant, tokens), (0.0, ""))[0]:
            best[(shape, variant, tokens)] = (ratio, launch)
    return [[*case, launch, f"{ratio:.2f}x"] for case, (ratio, launch) in best.items()]


def matrix_cases(n: int, k: int, device):
    """(case, weights, rows, heuristic launch, run, sweep regime) for `quant_gemm` at decode sizes."""
    gen = torch.Generator(device=device).manual_seed(3)
    weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).bfloat16()
    for bits, symmetric in ((4, False), (8, True)):
        packed = quantize(weight, QuantFormat(bits, GROUP, symmetric))
        for m in (1, 16):
            x = torch.randn(m, k, device=device, generator=gen).bfloat16()
            run = functools.partial(quant_gemm, x, *packed, bits, GROUP)
            yield f"{n}x{k}", f"w{bits}a16", m, blocks_for(m, n, k, GROUP), run, "matrix"


def moe_cases(shapes, device):
    """(case, weights, tokens, heuristic launch, run, sweep regime) for each fused-MoE case, W4A16
    first (the decode target)."""
    for name, hidden, inter, num_experts, top_k in shapes:
        gen = torch.Generator(device=device).manual_seed(2)
        gate_up, down, gq, dq, quant = moe_weights(hidden, inter, num_experts, gen)
        for tokens in (1, 16, 2048) if num_experts <= 8 else (1, 2048):  # fine-grained decode: 0.75x, open
            x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16()
            weights, ids = (
                torch.randn(tokens, num_experts, device=device, generator=gen).softmax(-1).topk(top_k, -1)
            )
            weights = weights.bfloat16()
            runs = {
                "w4a16": functools.partial(fused_moe, x, ids, weights, gq[0], dq[0], quant=quant),
                "bf16": functools.partial(fused_moe, x, ids, weights, gate_up, down),
            }
            for variant, run in runs.items():
                group = hidden if variant == "bf16" else GROUP  # a dense weight is one group per row
                heuristic = tiles_for(tokens * top_k, num_experts, inter, group, variant != "bf16")
                yield name, variant, tokens, heuristic, run, "decode" if tokens <= 16 else "prefill"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter"
    )
    parser.add_argument(
        "--sweep", type=float, default=0.0, metavar="SECONDS", help="time other launches last"
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.smoke:
        shapes = [("mixtral-like", 256, 256, 8, 2), ("fine-grained", 128, 128, 16, 8)]
        tokens_list, matrix = (1, 16), (256, 256)
    else:
        shapes = [("mixtral 8x7B", 4096, 14336, 8, 2), ("fine-grained", 2048, 768, 128, 8)]
        tokens_list, matrix = (1, 16, 256, 2048), (14336, 4096)
    checks: list[tuple[str, float, float]] = []
    moe = []
    for shape in shapes:
        moe += moe_rows(*shape, tokens_list, device, checks)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    matrices = matrix_rows(*matrix, device, checks)
    failed = [c for c in checks if not c[1] < c[2]]
    print(
        format_table(
            ["check", "rel. error", "bound", "ok"],
            [
                [name, f"{err:.2e}", f"{bound:.0e}", "yes" if err < bound else "NO"]
                for name, err, bound in checks
            ],
            title="Correctness (vs fp32 reference)",
        )
    )
    print()
    print(
        format_table(
            ["shape", "weights", "M", "ms", "graph ms", "achieved", "% of floor", "vs HF grouped_mm"],
            moe,
            title="Fused MoE layer (one MoE layer's experts)",
        )
    )
    print()
    print(
        format_table(
            ["matrix", "path", "M", "ms", "bytes/s", "% of floor", "vs bf16 linear"],
            matrices,
            title="Single matrix, decode sizes",
        )
    )
    if args.sweep:
        swept = sweep_rows(shapes, matrix, device, args.sweep)
        print()
        print(
            format_table(
                [
                    "shape",
                    "weights",
                    "M",
                    "heuristic",
                    "launch",
                    "heuristic ms",
                    "vs its out",
                    "ms",
                    "speedup",
                ],
                swept,
                title="quant_gemm and fused MoE launches (block_m/n/k, num_warps, num_stages; swap: out^T = "
                "W a^T; split-K: programs sharing the (down projection's) K loop; scale after dot: "
                "quantized tiles scale the dot's result; gemv: a product summed off the tensor cores)",
            )
        )
        print()
        print(format_table(["shape", "weights", "M", "fastest launch", "speedup"], best_launches(swept),
                           title="Fastest launch per case (same-run ratio to the heuristic's)"))  # fmt: skip
    if failed:
        sys.exit(f"{len(failed)} correctness check(s) failed")


if __name__ == "__main__":
    main()
