"""Canonical ops for compressed weights: quantized linear, quantized experts, quantized embedding.

Each has a reference implementation (dequantize, then the dense math) that runs on any device and
is the ground truth for the kernels in `moepass.kernels`, plus a fake implementation so it stays
one node under export and compile. Storage layout: `moepass.ir.quantized`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moepass.errors import OpArgumentError

from .ops import ACTIVATIONS, check_expert_shapes, check_operands, check_shapes, expert_at, run_experts
from .quantized import check_codes, dequantize, in_features


def dequantized_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    input_scale: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """`moepass::quantized_linear` as plain tensor code (the op's body; also what ONNX export traces)."""
    weight = dequantize(qweight, scales, zeros, bits, group_size, dtype=x.dtype)
    return F.linear(x if input_scale is None else x * input_scale, weight, bias)


@torch.library.custom_op("moepass::quantized_linear", mutates_args=())
def quantized_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    input_scale: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """F.linear(x * input_scale, dequantize(qweight, scales, zeros), bias); x [..., K] -> [..., N]."""
    check_quantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group_size)
    return dequantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group_size)


def check_quantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group_size) -> None:
    """The codes describe a weight reading x's features; bias and input scale share x's dtype, and
    every operand its device (scales may be any float dtype: they are dequantized to x's)."""
    name = "moepass::quantized_linear"
    check_codes(name, x.shape[-1], qweight, scales, zeros, bits, group_size)
    check_shapes(name, bias=(bias, qweight.shape[:-1]), input_scale=(input_scale, x.shape[-1:]))
    check_operands(name, x, qweight=qweight, zeros=zeros, bias=bias, input_scale=input_scale)


@quantized_linear.register_fake
def _(x, qweight, scales, zeros, bias, input_scale, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[-2]))


def dequantized_embedding(
    ids: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """`moepass::quantized_embedding` as plain tensor code (also what ONNX export traces): only the
    rows looked up are dequantized, in the scales' dtype (the table's)."""
    rows_zeros = None if zeros is None else zeros[ids]
    return dequantize(qweight[ids], scales[ids], rows_zeros, bits, group_size)


@torch.library.custom_op("moepass::quantized_embedding", mutates_args=())
def quantized_embedding(
    ids: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """An embedding table [V, K] stored like a quantized linear's weight (rows = tokens): ids [...]
    -> [..., K]. Lookup tables have no calibration statistics to use, so every method rounds them."""
    name = "moepass::quantized_embedding"
    check_codes(name, in_features(qweight, bits), qweight, scales, zeros, bits, group_size)
    if ids.dtype not in (torch.int32, torch.int64):
        raise OpArgumentError(f"{name}: token ids must be int32 or int64, got {ids.dtype}")
    check_operands(name, scales, ids=ids, qweight=qweight, zeros=zeros)  # one device
    return dequantized_embedding(ids, qweight, scales, zeros, bits, group_size)


@quantized_embedding.register_fake
def _(ids, qweight, scales, zeros, bits, group_size):
    return scales.new_empty((*ids.shape, in_features(qweight, bits)))


@torch.library.custom_op("moepass::quantized_experts", mutates_args=())
def quantized_experts(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up_qweight: Tensor,
    gate_up_scales: Tensor,
    gate_up_zeros: Tensor | None,
    down_qweight: Tensor,
    down_scales: Tensor,
    down_zeros: Tensor | None,
    gate_up_bias: Tensor | None,
    down_bias: Tensor | None,
    gate_up_input_scale: Tensor | None,
    down_input_scale: Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    bits: int,
    group_size: int,
) -> Tensor:
    """`moepass::experts` over quantized expert weights ([E, ...] in the stored layout).

    Only the experts that receive tokens are dequantized. `gate_up_input_scale` [H] and
    `down_input_scale` [E, I] multiply the projections' inputs (AWQ)."""
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

    def expert_weights(e: int):
        gate_up = dequantize(
            gate_up_qweight[e], gate_up_scales[e], expert_at(gate_up_zeros, e), bits, group_size, hidden.dtype
        )
        down = dequantize(
            down_qweight[e], down_scales[e], expert_at(down_zeros, e), bits, group_size, hidden.dtype
        )
        return gate_up, down, expert_at(gate_up_bias, e), expert_at(down_bias, e)

    return run_experts(
        hidden,
        topk_ids,
        topk_weights,
        gate_up_qweight.shape[0],
        expert_weights,
        ACTIVATIONS[activation],
        alpha,
        limit,
        gate_up_input_scale,
        down_input_scale,
    )


def check_quantized_experts(
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
) -> None:
    """`check_expert_shapes`, `check_codes` for both projections (gate/up read the hidden state, down
    the intermediate); biases and input scales share the hidden state's dtype."""
    name = "moepass::quantized_experts"
    check_expert_shapes(
        name,
        hidden,
        topk_ids,
        topk_weights,
        gate_up_qweight,
        down_qweight,
        gate_up_bias,
        down_bias,
        gate_up_input_scale,
        down_input_scale,
    )
    check_codes(
        f"{name} gate_up", hidden.shape[-1], gate_up_qweight, gate_up_scales, gate_up_zeros, bits, group_size
    )
    inter = gate_up_qweight.shape[-2] // 2
    check_codes(f"{name} down", inter, down_qweight, down_scales, down_zeros, bits, group_size)
    check_operands(
        name,
        hidden,
        gate_up_qweight=gate_up_qweight,
        down_qweight=down_qweight,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        gate_up_input_scale=gate_up_input_scale,
        down_input_scale=down_input_scale,
    )


@quantized_experts.register_fake
def _(
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
    return hidden.new_empty(hidden.shape)  # contiguous, as the real op returns


QUANTIZED_LINEAR = torch.ops.moepass.quantized_linear.default
QUANTIZED_EXPERTS = torch.ops.moepass.quantized_experts.default
QUANTIZED_EMBEDDING = torch.ops.moepass.quantized_embedding.default


# A quantized weight's stored tensors, in the quantized ops' argument order; the experts op holds one
# such triple per projection (`gate_up_qweight`, ...)
PACKED_TENSORS = ("qweight", "scales", "zeros")
EXPERT_PACKED_TENSORS = {
    proj: tuple(f"{proj}_{part}" for part in PACKED_TENSORS) for proj in ("gate_up", "down")
}
STORED_TENSORS: dict = {  # quantized op -> every stored tensor argument
    QUANTIZED_LINEAR: PACKED_TENSORS,
    QUANTIZED_EMBEDDING: PACKED_TENSORS,
    QUANTIZED_EXPERTS: (*EXPERT_PACKED_TENSORS["gate_up"], *EXPERT_PACKED_TENSORS["down"]),
}
# Ops reading packed codes -> the arguments holding them; each op has an int argument `bits`.
# Lowering registers its kernels' ops (other packed layouts) here.
CODE_ARGUMENTS: dict = {
    QUANTIZED_LINEAR: ("qweight",),
    QUANTIZED_EMBEDDING: ("qweight",),
    QUANTIZED_EXPERTS: ("gate_up_qweight", "down_qweight"),
}
# Ops storing only a share of their weights' entries (2:4 keeps half) -> that share.
KEPT_SHARE: dict = {}


def packed_code_bits(graph_module) -> dict[str, float]:
    """FQN of every packed weight tensor the graph reads -> bits stored per logical weight: the code
    width (`bits`; 0 means float values of the tensor's dtype), times the share of entries kept."""
    out = {}
    for node in graph_module.graph.nodes:
        if node.target in CODE_ARGUMENTS:
            names = [a.name for a in node.target._schema.arguments]
            args = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
            for name in CODE_ARGUMENTS[node.target]:
                value = args.get(name)
                if hasattr(value, "target"):
                    bits = args["bits"]
                    if not bits:
                        owner, _, attr = value.target.rpartition(".")
                        bits = 8 * getattr(graph_module.get_submodule(owner), attr).element_size()
                    out[value.target] = bits * KEPT_SHARE.get(node.target, 1)
    return out


def logical_count(tensor, bits_per_weight: float) -> int:
    """Weights a packed tensor holds (see `packed_code_bits`)."""
    return round(tensor.numel() * tensor.element_size() * 8 / bits_per_weight)


__all__ = [
    "CODE_ARGUMENTS",
    "EXPERT_PACKED_TENSORS",
    "KEPT_SHARE",
    "PACKED_TENSORS",
    "QUANTIZED_EMBEDDING",
    "QUANTIZED_EXPERTS",
    "QUANTIZED_LINEAR",
    "STORED_TENSORS",
    "in_features",
    "logical_count",
    "packed_code_bits",
    "quantized_embedding",
    "quantized_experts",
    "quantized_linear",
]
