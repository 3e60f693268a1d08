"""Compile every Triton kernel for the H200 (sm_90) on a machine without a GPU, before device time.

    python tools/device/compile_sm90.py     # in the venv with the GPU machine's triton (3.6)

A stub driver names the target (cuda, capability 90) and every launch becomes a warm-up compile
through Triton's own pipeline down to the cubin (its bundled ptxas); nothing runs, so the outputs
are garbage and only compile errors and resource use are reported. The launches cover the kernel
wrappers' regimes (decode, 16 rows, prompts; bf16 and fp16 activations; int4/int8 in groups and
per channel; 2:4) and the launches `bench_kernels.py --sweep` tries. Exits 1 on any
compile error; a table gives each kernel's compile count and largest shared memory (228 KB per
block on the H200).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernel modules are imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_kernels import SWEEP, launched_as
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from moepass.ir.quantized import QuantFormat, quantize
from moepass.kernels import compress_24
from moepass.kernels.fused_moe import fused_moe
from moepass.kernels.quant_gemm import quant_gemm
from moepass.kernels.sparse24 import sparse24_gemm
from moepass.table import format_table

FORMATS = [(4, 128, False), (8, 128, True), (4, -1, False), (8, -1, True)]


class Sm90Driver:
    """What `JITFunction.run` asks of a driver before it compiles."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


compiled: Counter[str] = Counter()
shared: dict[str, int] = {}
errors: dict[str, str] = {}
failed_compiles: Counter[str] = Counter()
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    name = self.fn.__name__
    try:
        kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as error:  # reported per kernel, the wrapper's remaining launches go on
        errors.setdefault(name, f"{type(error).__name__}: {str(error)[:400]}")
        failed_compiles[name] += 1
        raise
    compiled[name] += 1
    shared[name] = max(shared.get(name, 0), kernel.metadata.shared)
    return kernel


def launch(fn, *args, **kwargs) -> None:
    before = failed_compiles.total()
    try:
        fn(*args, **kwargs)
    except Exception as error:
        if failed_compiles.total() == before:  # the wrapper's own error, not a kernel's compile
            errors.setdefault(fn.__name__, f"{type(error).__name__}: {str(error)[:400]}")


def moe_launches(dtype: torch.dtype) -> None:
    for experts, top_k, tokens, hidden, inter in ((8, 2, 1, 256, 512), (8, 2, 16, 256, 512),
                                                  (8, 2, 256, 256, 512), (8, 2, 2048, 256, 512),
                                                  (128, 8, 2048, 256, 128)):  # fmt: skip
        gate_up, down = (
            torch.randn(experts, 2 * inter, hidden, dtype=dtype),
            torch.randn(experts, hidden, inter),
        )
        down = down.to(dtype)
        x = torch.randn(tokens, hidden, dtype=dtype)
        weights, ids = torch.randn(tokens, experts).softmax(-1).topk(top_k, -1)
        weights = weights.to(dtype)
        quantized = []
        for bits, group, symmetric in FORMATS:
            fmt = QuantFormat(bits, group, symmetric)
            (gq, gs, gz), (dq, ds, dz) = quantize(gate_up, fmt), quantize(down, fmt)
            quant = {"bits": bits, "group_size": group, "gate_up_scales": gs, "gate_up_zeros": gz,
                     "down_scales": ds, "down_zeros": dz}  # fmt: skip
            quantized.append((gq, dq, quant))
        for tiles in [None, *SWEEP["decode" if tokens <= 16 else "prefill"]]:  # None: the heuristic's
            with contextlib.nullcontext() if tiles is None else launched_as(tiles):
                launch(fused_moe, x, ids, weights, gate_up, down)
                for gq, dq, quant in quantized:
                    launch(fused_moe, x, ids, weights, gq, dq, quant=quant)


def matrix_launches(dtype: torch.dtype) -> None:
    weight = torch.randn(1024, 4096, dtype=dtype)
    runs = weight.float().reshape(1024, 1024, 4)
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.abs().topk(2, dim=-1).indices, True)
    values, meta = compress_24((runs * keep).reshape(1024, 4096).to(dtype))
    sq = quantize(values, QuantFormat(4, 64, False))
    for rows in (1, 16, 256, 2048):
        x = torch.randn(rows, 4096, dtype=dtype)
        for bits, group, symmetric in FORMATS:
            packed = quantize(weight, QuantFormat(bits, group, symmetric))
            for tiles in [None, *(SWEEP["matrix"] if rows <= 16 else [])]:  # None: the heuristic's
                with contextlib.nullcontext() if tiles is None else launched_as(tiles):
                    launch(quant_gemm, x, *packed, bits, group)
        launch(sparse24_gemm, x, values, meta)
        launch(sparse24_gemm, x, sq[0], meta, sq[1], sq[2], 4, 64)


def main() -> None:
    driver.set_active(Sm90Driver())
    JITFunction.run = _compile_only
    for dtype in (torch.bfloat16, torch.float16):
        moe_launches(dtype)
        matrix_launches(dtype)
    rows = [
        [name, count, f"{shared[name] / 1024:.0f} KB", errors.get(name, "")]
        for name, count in compiled.items()
    ]
    rows += [[name, 0, "-", message] for name, message in errors.items() if name not in compiled]
    print(format_table(["kernel", "launches compiled for sm_90", "largest shared memory", "error"], rows))
    if errors:
        sys.exit(f"{len(errors)} kernel(s) failed to compile for sm_90")


if __name__ == "__main__":
    main()
