"""`moepass.lower`: a program rewritten onto a device's fastest ops — the optimized PyTorch program.

Lowering is the last stage: it runs the `lower`-stage passes registered for the device, each verified
like any transform. On CPU: 2:4-compressed weights back to dense storage (`expand_sparse24`),
linears sharing an input into one matmul (`fuse_sibling_linears`),
quantized weights onto ATen's packed int4/int8 kernels (`cpu_packed_weights`), dense weights stored
input-major (`kn_weight_layout`). On CUDA the canonical ops already dispatch to the Triton kernels
(`moepass.kernels`); only 2:4 experts expand (the fused MoE kernel reads dense or quantized experts).
The input program is left as it is; the lowered one can run, evaluate and generate, but not be
compressed further or saved (save the program before lowering; `moepass.load` lowers on load).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from moepass.errors import MoepassError
from moepass.ir import MoEProgram
from moepass.pass_manager import PassManager, PassReport

logger = logging.getLogger("moepass")

# device type -> lowering passes (name, options), in order
PIPELINES: dict[str, list[tuple[str, dict | None]]] = {
    "cpu": [
        ("expand_sparse24", None),
        ("fuse_sibling_linears", None),
        ("cpu_packed_weights", None),
        ("kn_weight_layout", None),
    ],
    "cuda": [("expand_sparse24", {"keep_linears": True})],
}


def lower(
    program: MoEProgram,
    device: str | torch.device | None = None,
    *,
    copy: bool = True,
    compile: bool = False,
) -> MoEProgram:
    """A copy of `program` lowered for `device` (default: where the program is); `copy=False`
    lowers the program itself (no second set of weights while converting).

    `compile=True` also runs each step through `torch.compile` (Inductor, dynamic lengths; on CPU with
    its C++ wrapper): it fuses the small ops between the matmuls and drops Python's per-call cost
    (1.5-2.4x faster paper-recipe decode on CPU in `tools/bench_e2e.py`) at the cost of compiling for
    the first prompt and the first decoded token (30-90 s on one core; 8-10 s from Inductor's cache)."""
    if not isinstance(program, MoEProgram):
        raise MoepassError(f"lower takes a MoEProgram (see moepass.capture), got {type(program).__name__}")
    device_type = target_device(program.device if device is None else device).type
    if program.info.lowered is not None:
        raise MoepassError(f"this program is already lowered for {program.info.lowered}")
    lowered = program.fork() if copy else program
    if device is not None:
        lowered.to(device)
    manager = PassManager(PIPELINES[device_type])
    report: PassReport = manager.run(lowered)  # marks the program lowered for its device
    lowered.info.compiled = compile
    lowered.report = report
    logger.info("lowered for %s: %s", device_type, ", ".join(name for name, _ in PIPELINES[device_type]))
    _warn_reference_ops(report, device_type)
    if compile:
        logger.info("torch.compile: the first prompt and the first decoded token compile (30-90 s cold)")
    return lowered


def _warn_reference_ops(report: PassReport, device_type: str) -> None:
    """Say which quantized ops no kernel took: they dequantize their weights on every call, which
    decodes slower than the float model (int8 in groups of 128 did: 0.5x eager on CPU, BENCHMARKS.md)."""
    kept = Counter(reason for r in report.records for reason in r.summary.get("kept reference", {}).values())
    if kept:
        logger.warning(
            "lowered for %s: %d quantized ops keep the reference path (weights dequantized on every call, "
            "slower than unquantized): %s",
            device_type,
            kept.total(),
            "; ".join(f"{count} x {reason}" for reason, count in kept.items()),
        )


def target_device(device: str | torch.device, lowering: bool = True) -> torch.device:
    """`device` parsed and checked before any work (with `lowering`: one `lower` has passes for): a
    typo or a missing GPU is an error naming it, not torch's after minutes of loading."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise MoepassError(
            f"device {device!r} is not a torch device ({error}); e.g. 'cpu', 'cuda:0'"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise MoepassError(f"device {device!r}: this machine or torch build has no CUDA GPU")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise MoepassError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPUs")
    if lowering and parsed.type not in PIPELINES:
        raise MoepassError(f"no lowering for device {str(device)!r}; supported: {', '.join(PIPELINES)}")
    return parsed
