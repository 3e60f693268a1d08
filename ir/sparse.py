"""2:4 semi-structured storage of pruned weights, and the ops that read it.

For a weight W [N, K] (F.linear layout) in which every run of 4 consecutive inputs holds at most 2
non-zeros (what `PruneConfig(pattern="2:4")` produces):
  values [N, K/2]  the two kept entries of each run, in input order (the model's dtype); for a
                   quantized weight their codes, packed as in `moepass.ir.quantized` (4-bit: [N, K/4])
  meta   [N, K/8]  uint8, one nibble per run (low nibble: even run): position of the first kept
                   entry in bits 0-1, of the second in bits 2-3
Quantized weights keep their scales and zero points unchanged: a group of g inputs (g a multiple of
4: whole runs) is a group of g/2 kept codes, and a pruned entry is the zero-point code, which
dequantizes to exactly 0. Expert tensors add a leading expert dimension. A bf16 matrix shrinks
1.78x; 2:4 + int4 stores 5/16 of a byte per weight. The Triton kernels (`moepass.kernels.sparse24`)
read this layout directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moepass.errors import MoepassError

from .ops import ACTIVATIONS, check_expert_shapes, check_operands, check_shapes, expert_at, run_experts
from .quant_ops import CODE_ARGUMENTS, KEPT_SHARE
from .quantized import FormatError, check_codes, dequantize, in_features, pack, unpack
from .structure import ExpertsOp, register_experts_op


class SparsityPatternError(MoepassError):
    """A weight does not follow the 2:4 pattern (more than 2 non-zeros in a run of 4 inputs)."""


def _positions(nonzero: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """(kept positions [..., K/4, 2] in input order, meta [..., K/8]) of a [..., K] non-zero mask."""
    *lead, k = nonzero.shape
    if k % 8:
        raise SparsityPatternError(f"{name}: 2:4 storage needs in_features divisible by 8, got {k}")
    runs = nonzero.reshape(*lead, k // 4, 4)
    bad = runs.sum(-1) > 2
    if bad.any():
        *where, run = (int(i) for i in bad.nonzero()[0])
        raise SparsityPatternError(
            f"{name}: row {tuple(where) if len(where) > 1 else where[0]}, inputs {4 * run}..{4 * run + 3} "
            "hold more than 2 non-zeros; prune with pattern '2:4' before compressing"
        )
    # the two kept positions: non-zeros first (stable, so in input order), padded with zeros' positions
    order = torch.argsort((~runs).to(torch.int8), dim=-1, stable=True)[..., :2]
    positions = order.sort(dim=-1).values
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    meta = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return positions, meta.contiguous()


def _gather(dense: Tensor, positions: Tensor) -> Tensor:
    *lead, k = dense.shape
    return dense.reshape(*lead, k // 4, 4).gather(-1, positions).reshape(*lead, k // 2).contiguous()


def _scatter(kept: Tensor, meta: Tensor, fill: Tensor | float) -> Tensor:
    """The [..., K] tensor with `kept` [..., K/2] at the positions `meta` names, `fill` elsewhere."""
    *lead, half = kept.shape
    nibbles = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(*lead, half // 2).long()
    positions = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    if isinstance(fill, Tensor):
        dense = fill.reshape(*lead, half // 2, 4).clone()
    else:
        dense = kept.new_full((*lead, half // 2, 4), fill)
    dense.scatter_(-1, positions, kept.reshape(*lead, half // 2, 2))
    return dense.reshape(*lead, 2 * half)


def compress_24(weight: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """(values [..., N, K/2], meta [..., N, K/8]) of a 2:4-sparse `weight` [..., N, K]."""
    positions, meta = _positions(weight != 0, name)
    return _gather(weight, positions), meta


def decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    """The dense [..., N, K] matrix of compressed `values` (model dtype) and `meta`."""
    return _scatter(values, meta, 0.0)


def _zero_codes(qweight: Tensor, zeros: Tensor | None, bits: int, group_size: int) -> Tensor:
    """The code of 0.0 for every input of a stored quantized weight ([..., N, K] int16)."""
    codes_shape = (*qweight.shape[:-1], qweight.shape[-1] * (2 if bits == 4 else 1))
    if zeros is None:
        return torch.full(codes_shape, 2 ** (bits - 1), dtype=torch.int16, device=qweight.device)
    k = codes_shape[-1]
    group = k if group_size == -1 else group_size
    return unpack(zeros, bits)[..., : k // group].repeat_interleave(group, dim=-1)


def compress_codes_24(
    qweight: Tensor, zeros: Tensor | None, bits: int, group_size: int, name: str = "weight"
) -> tuple[Tensor, Tensor]:
    """(packed kept codes, meta) of a quantized weight whose pruned entries hold the zero-point code."""
    _check_groups_hold_whole_runs(name, group_size)
    codes = unpack(qweight, bits)
    positions, meta = _positions(codes != _zero_codes(qweight, zeros, bits, group_size), name)
    return pack(_gather(codes, positions), bits), meta


def decompress_codes_24(
    values: Tensor, meta: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """The stored dense qweight of compressed codes: pruned entries get their group's zero point."""
    shape = (*values.shape[:-1], values.shape[-1] * 2)  # packed bytes: twice as many for the dense row
    fill = _zero_codes(values.new_empty(shape), zeros, bits, group_size)
    return pack(_scatter(unpack(values, bits), meta, fill), bits)


def sparse_weight(values, meta, scales, zeros, bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """The dense float weight of stored 2:4 tensors (bits 0: `values` are floats)."""
    if not bits:
        return decompress_24(values.to(dtype), meta)
    return dequantize(
        decompress_codes_24(values, meta, zeros, bits, group_size), scales, zeros, bits, group_size, dtype
    )


def _check_groups_hold_whole_runs(name: str, group_size: int) -> None:
    """A quantization group of g inputs is g/2 kept codes only when it holds whole runs of 4."""
    if group_size != -1 and group_size % 4:
        raise FormatError(
            f"{name}: 2:4 codes need group_size a multiple of 4 (whole runs of 4 inputs); "
            f"group_size {group_size} is not a multiple of 4"
        )


def check_sparse24_weight(
    name: str, k: int, values: Tensor, meta: Tensor, scales, zeros, bits: int, group_size: int
) -> None:
    """The stored tensors describe a 2:4 weight reading `k` inputs: k/2 kept values or codes (their
    scales and zero points in groups of half the size), one meta nibble per run of 4."""
    held = 2 * (in_features(values, bits) if bits else values.shape[-1])
    if held != k:
        what = f"{bits}-bit codes" if bits else "values"
        raise FormatError(
            f"{name}: the input has {k} features but the 2:4 {what} {list(values.shape)} hold {held}"
        )
    if k % 8:
        raise FormatError(f"{name}: 2:4 storage needs a multiple of 8 inputs, got {k}")
    check_shapes(name, meta=(meta, (*values.shape[:-1], k // 8)))
    if bits:
        _check_groups_hold_whole_runs(name, group_size)
        kept_group = group_size if group_size == -1 else group_size // 2
        check_codes(f"{name} (kept codes)", k // 2, values, scales, zeros, bits, kept_group)


def check_sparse24_linear(x, values, meta, scales, zeros, bias, input_scale, bits, group_size) -> None:
    """`moepass::sparse24_linear`'s operands, refused alike by the reference and the kernel."""
    name = "moepass::sparse24_linear"
    check_sparse24_weight(name, x.shape[-1], values, meta, scales, zeros, bits, group_size)
    check_shapes(name, bias=(bias, values.shape[:-1]), input_scale=(input_scale, x.shape[-1:]))
    check_operands(name, x, values=values if not bits else None, bias=bias, input_scale=input_scale)


def sparse24_linear_body(
    x, values, meta, scales, zeros, bias, input_scale, bits: int, group_size: int
) -> Tensor:
    """`moepass::sparse24_linear` as plain tensor code (the op's body)."""
    weight = sparse_weight(values, meta, scales, zeros, bits, group_size, x.dtype)
    return F.linear(x if input_scale is None else x * input_scale, weight, bias)


@torch.library.custom_op("moepass::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    scales: Tensor | None,
    zeros: Tensor | None,
    bias: Tensor | None,
    input_scale: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """F.linear(x * input_scale, W, bias) for a 2:4-compressed W; bits 0: float values, 4/8: codes."""
    check_sparse24_linear(x, values, meta, scales, zeros, bias, input_scale, bits, group_size)
    return sparse24_linear_body(x, values, meta, scales, zeros, bias, input_scale, bits, group_size)


@sparse24_linear.register_fake
def _(x, values, meta, scales, zeros, bias, input_scale, bits, group_size):
    return x.new_empty((*x.shape[:-1], values.shape[-2]))


@torch.library.custom_op("moepass::sparse24_experts", mutates_args=())
def sparse24_experts(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up_values: Tensor,
    gate_up_meta: Tensor,
    gate_up_scales: Tensor | None,
    gate_up_zeros: Tensor | None,
    down_values: Tensor,
    down_meta: Tensor,
    down_scales: Tensor | None,
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
    """`moepass::experts` over 2:4-compressed expert weights ([E, ...]); only routed experts expand."""
    name = "moepass::sparse24_experts"
    check_expert_shapes(
        name,
        hidden,
        topk_ids,
        topk_weights,
        gate_up_values,
        down_values,
        gate_up_bias,
        down_bias,
        gate_up_input_scale,
        down_input_scale,
    )
    inter = gate_up_values.shape[1] // 2
    for proj, k, values, meta, scales, zeros in (
        ("gate_up", hidden.shape[1], gate_up_values, gate_up_meta, gate_up_scales, gate_up_zeros),
        ("down", inter, down_values, down_meta, down_scales, down_zeros),
    ):
        check_sparse24_weight(f"{name} {proj}", k, values, meta, scales, zeros, bits, group_size)
    check_operands(
        name,
        hidden,
        gate_up_values=gate_up_values if not bits else None,
        down_values=down_values if not bits else None,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        gate_up_input_scale=gate_up_input_scale,
        down_input_scale=down_input_scale,
    )

    def expert_weights(e: int):
        gate_up = sparse_weight(
            gate_up_values[e],
            gate_up_meta[e],
            expert_at(gate_up_scales, e),
            expert_at(gate_up_zeros, e),
            bits,
            group_size,
            hidden.dtype,
        )
        down = sparse_weight(
            down_values[e],
            down_meta[e],
            expert_at(down_scales, e),
            expert_at(down_zeros, e),
            bits,
            group_size,
            hidden.dtype,
        )
        return gate_up, down, expert_at(gate_up_bias, e), expert_at(down_bias, e)

    return run_experts(
        hidden,
        topk_ids,
        topk_weights,
        gate_up_values.shape[0],
        expert_weights,
        ACTIVATIONS[activation],
        alpha,
        limit,
        gate_up_input_scale,
        down_input_scale,
    )


@sparse24_experts.register_fake
def _(hidden, topk_ids, topk_weights, *rest):
    return hidden.new_empty(hidden.shape)  # contiguous, as the real op returns


SPARSE24_LINEAR = torch.ops.moepass.sparse24_linear.default
SPARSE24_EXPERTS = torch.ops.moepass.sparse24_experts.default
SPARSE24_OPS = (SPARSE24_LINEAR, SPARSE24_EXPERTS)
register_experts_op(SPARSE24_EXPERTS, ExpertsOp("gate_up_values", "down_values", "sparse24"))
CODE_ARGUMENTS[SPARSE24_LINEAR] = ("values",)
CODE_ARGUMENTS[SPARSE24_EXPERTS] = ("gate_up_values", "down_values")
KEPT_SHARE.update({SPARSE24_LINEAR: 0.5, SPARSE24_EXPERTS: 0.5})
