"""Kernels as torch ops: CUDA implementations of the canonical ops, plus ops for kernel-only layouts.

Importing this module registers the Triton kernels as the CUDA implementations of
`moepass::quantized_linear`, `moepass::experts`, `moepass::quantized_experts` and
`moepass::sparse24_linear` (2:4-compressed weights, `moepass.ir.sparse`): a captured or
compiled program on a GPU runs them with no graph change, and the ops stay single nodes with fake
implementations under export and compile (ops launched through `torch.library.triton_op` did not
survive compile/export here; `custom_op` does).

Layouts only kernels read get their own ops, each with a reference implementation:
  moepass::packed_linear    ATen's prepacked int4/int8 CPU layout (`moepass.kernels.cpu`);
  moepass::packed_experts   the experts op over weights in that layout.
The `triton_*` functions take the ops' arguments and launch the kernels on any Triton device — on CPU
under `TRITON_INTERPRET=1`, which is how the tests check exactly what a GPU runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moepass.ir.ops import (
    ACTIVATIONS,
    TRACEABLE_BODIES,
    check_experts,
    expert_at,
    experts,
    run_experts,
    traced_expert_slots,
)
from moepass.ir.quant_ops import (
    CODE_ARGUMENTS,
    check_quantized_experts,
    check_quantized_linear,
    quantized_experts,
    quantized_linear,
)
from moepass.ir.sparse import check_sparse24_linear, sparse24_linear
from moepass.ir.structure import ExpertsOp, register_experts_op

from .cpu import packed_linear as _aten_packed_linear
from .fused_moe import fused_moe
from .quant_gemm import quant_gemm
from .sparse24 import sparse24_gemm


def triton_quantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group_size):
    check_quantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group_size)
    return quant_gemm(x, qweight, scales, zeros, bits, group_size, input_scale, bias)


def triton_experts(
    hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit
):
    check_experts(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias)
    return fused_moe(
        hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit
    )


def triton_quantized_experts(
    hidden,
    topk_ids,
    topk_weights,
    gate_up_qweight,
    gate_up_scales,
    gate_up_zeros,
    down_qweight,
    down_scales,
    down_zeros,
    gate_up_bias,
    down_bias,
    gate_up_input_scale,
    down_input_scale,
    activation,
    alpha,
    limit,
    bits,
    group_size,
):
    check_quantized_experts(
        hidden,
        topk_ids,
        topk_weights,
        gate_up_qweight,
        gate_up_scales,
        gate_up_zeros,
        down_qweight,
        down_scales,
        down_zeros,
        gate_up_bias,
        down_bias,
        gate_up_input_scale,
        down_input_scale,
        bits,
        group_size,
    )
    quant = {
        "bits": bits,
        "group_size": group_size,
        "gate_up_scales": gate_up_scales,
        "gate_up_zeros": gate_up_zeros,
        "down_scales": down_scales,
        "down_zeros": down_zeros,
    }
    return fused_moe(
        hidden,
        topk_ids,
        topk_weights,
        gate_up_qweight,
        down_qweight,
        gate_up_bias,
        down_bias,
        activation,
        alpha,
        limit,
        quant=quant,
        gate_up_input_scale=gate_up_input_scale,
        down_input_scale=down_input_scale,
    )


def triton_sparse24_linear(x, values, meta, scales, zeros, bias, input_scale, bits, group_size):
    check_sparse24_linear(x, values, meta, scales, zeros, bias, input_scale, bits, group_size)
    x = x if input_scale is None else x * input_scale
    return sparse24_gemm(x, values, meta, scales, zeros, bits, group_size, bias)


quantized_linear.register_kernel("cuda")(triton_quantized_linear)
experts.register_kernel("cuda")(triton_experts)
quantized_experts.register_kernel("cuda")(triton_quantized_experts)


sparse24_linear.register_kernel("cuda")(triton_sparse24_linear)


@torch.library.custom_op("moepass::packed_linear", mutates_args=())
def packed_linear(
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """`moepass::quantized_linear` on weights prepacked for ATen's CPU kernels (`pack_for_cpu`)."""
    return packed_linear_body(x, weight, scales, bias, input_scale, bits, group_size)


def packed_linear_body(x, weight, scales, bias, input_scale, bits: int, group_size: int) -> Tensor:
    """`moepass::packed_linear` as traceable tensor code (`TRACEABLE_BODIES`)."""
    return _aten_packed_linear(
        x if input_scale is None else x * input_scale, weight, scales, bias, bits, group_size
    )


@packed_linear.register_fake
def _(x, weight, scales, bias, input_scale, bits, group_size):
    return x.new_empty((*x.shape[:-1], weight.shape[-2]))


@torch.library.custom_op("moepass::packed_experts", mutates_args=())
def packed_experts(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up_weight: Tensor,
    gate_up_scales: Tensor,
    down_weight: Tensor,
    down_scales: Tensor,
    gate_up_bias: Tensor | None,
    down_bias: Tensor | None,
    gate_up_input_scale: Tensor | None,
    down_input_scale: Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    bits: int,
    gate_up_group: int,
    down_group: int,
) -> Tensor:
    """`moepass::quantized_experts` on expert weights prepacked for ATen's CPU kernels."""
    decoded = _packed_decode(
        hidden,
        topk_ids,
        topk_weights,
        gate_up_weight,
        gate_up_scales,
        down_weight,
        down_scales,
        gate_up_bias,
        down_bias,
        gate_up_input_scale,
        down_input_scale,
        activation,
        alpha,
        limit,
        bits,
        gate_up_group,
        down_group,
    )
    if decoded is not None:
        return decoded

    def expert_weights(e: int):
        return (
            (gate_up_weight[e], gate_up_scales[e], gate_up_group),
            (down_weight[e], down_scales[e], down_group),
            expert_at(gate_up_bias, e),
            expert_at(down_bias, e),
        )

    def linear(x: Tensor, packed: tuple[Tensor, Tensor, int], bias: Tensor | None) -> Tensor:
        weight, scales, group = packed
        return _aten_packed_linear(x, weight, scales, bias, bits, group)

    return run_experts(
        hidden,
        topk_ids,
        topk_weights,
        gate_up_weight.shape[0],
        expert_weights,
        ACTIVATIONS[activation],
        alpha,
        limit,
        gate_up_input_scale,
        down_input_scale,
        linear,
    )


def _packed_decode(
    hidden,
    topk_ids,
    topk_weights,
    gate_up_weight,
    gate_up_scales,
    down_weight,
    down_scales,
    gate_up_bias,
    down_bias,
    gate_up_input_scale,
    down_input_scale,
    activation: str,
    alpha: float,
    limit: float,
    bits: int,
    gate_up_group: int,
    down_group: int,
    *,
    traced: bool = False,
) -> Tensor | None:
    """One token through its k experts with the fewest calls (None for more tokens): `run_experts`'
    arithmetic on the packed weights (bf16 matmuls, slot-ordered fp32 sum), except that each
    projection's result, bias and activation stay in fp32 (bf16/fp16 models: within one rounding of
    it), at 2/3 of its cost, which at decode is mostly per-call overhead (`tools/bench_ops.py`).

    `traced` (`packed_experts_body`): each expert index becomes a symbolic integer and its weights
    views at it, so a compiled decode step calls the kernels from its own code. (Asked, not detected:
    torch 2.11's `torch.compiler.is_compiling()` is False while aot_autograd traces a backend's graph.)"""
    if hidden.shape[0] != 1:
        return None
    act, experts = ACTIVATIONS[activation], gate_up_weight.shape[0]

    def project(e, x: Tensor, weight: Tensor, scales: Tensor, group: int, bias: Tensor | None) -> Tensor:
        """Expert e's projection: ATen's packed matmul in bf16; its result and the bias in fp32."""
        bias = None if bias is None else bias.select(0, e)
        return _aten_packed_linear(x.float(), weight.select(0, e), scales.select(0, e), bias, bits, group)

    # an id outside the experts is one dropped behind a router that kept its row: it adds nothing
    # (eager code skips its slot, traced code masks it out)
    slots = (
        traced_expert_slots(topk_ids, experts)
        if traced
        else ((slot, e, None) for slot, e in enumerate(topk_ids[0].tolist()) if 0 <= e < experts)
    )
    x = hidden if gate_up_input_scale is None else hidden * gate_up_input_scale
    out = None
    for slot, e, valid in slots:
        h = act(project(e, x, gate_up_weight, gate_up_scales, gate_up_group, gate_up_bias), alpha, limit)
        if down_input_scale is not None:
            h = h * down_input_scale.select(0, e)
        y = project(e, h, down_weight, down_scales, down_group, down_bias) * topk_weights[:, slot : slot + 1]
        if valid is not None:
            y = torch.where(valid, y, 0.0)
        out = y if out is None else out + y
    return hidden.new_zeros(hidden.shape) if out is None else out.to(hidden.dtype)


def packed_experts_body(*args) -> Tensor:
    """`moepass::packed_experts` as traceable code (`TRACEABLE_BODIES`) where it pays: a single token's
    experts (int4 or int8) inline, so a compiled decode step skips the op's Python dispatch (~50 us a
    layer on a tiny model, a third of its decode step); other shapes keep the op. Dynamo must be
    allowed to read the expert indices as integers (`torch._dynamo.config.capture_scalar_outputs`,
    or `fullgraph=True`)."""
    decoded = _packed_decode(*args, traced=True)
    return packed_experts(*args) if decoded is None else decoded


@packed_experts.register_fake
def _(
    hidden,
    topk_ids,
    topk_weights,
    gate_up_weight,
    gate_up_scales,
    down_weight,
    down_scales,
    gate_up_bias,
    down_bias,
    gate_up_input_scale,
    down_input_scale,
    activation,
    alpha,
    limit,
    bits,
    gate_up_group,
    down_group,
):
    return hidden.new_empty(hidden.shape)  # contiguous, as the real op returns


PACKED_LINEAR = torch.ops.moepass.packed_linear.default
TRACEABLE_BODIES[PACKED_LINEAR] = packed_linear_body
PACKED_EXPERTS = torch.ops.moepass.packed_experts.default
TRACEABLE_BODIES[PACKED_EXPERTS] = packed_experts_body

# The IR learns these ops' layouts: structure maps, verifier and size counts read them like its own.
register_experts_op(PACKED_EXPERTS, ExpertsOp("gate_up_weight", "down_weight", "cpu-packed"))
CODE_ARGUMENTS[PACKED_LINEAR] = ("weight",)
CODE_ARGUMENTS[PACKED_EXPERTS] = ("gate_up_weight", "down_weight")
