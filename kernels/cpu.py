"""Fastest CPU paths for quantized weights: ATen's prepacked int4 and int8 matmuls.

Measured on one core (`tools/bench_ops.py`): with bf16 activations, `_weight_int4pack_mm_for_cpu`
and `_weight_int8pack_mm` beat the dense fp32 matmul they replace by 1.5-3.5x, while their fp32
activation paths are 10-50x slower than it and dequantizing on every call is 1.5-20x slower. So these
paths run in bf16 and return the caller's dtype. Their relative error against the exact dequantized
product is ~3e-3 (1024 x 1024 random weights): 1/36 of what int4 g128 rounding itself costs (1e-1),
but over a third of int8 per-channel rounding (8e-3): lowering adds a third to an int8 program's own
error; `moepass.load(..., lower=False)` keeps float math.

They need weights converted once, ahead of time (`pack_for_cpu`): int4 codes into ATen's tile
layout with (scale, offset) pairs per group, int8 per-channel symmetric codes as int8. Formats ATen
cannot express (int4 with groups of 16 or output counts not divisible by 16; int8 with groups or zero
points) keep the reference path — `pack_for_cpu` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moepass.ir.quantized import in_features, unpack

_INT4_GROUPS = (256, 128, 64, 32)  # ATen's supported int4 group sizes, largest first


@dataclass(frozen=True)
class CpuPacked:
    """One weight (or a stack of expert weights) in an ATen prepacked layout."""

    weight: Tensor  # int4: [..., N, K/2] uint8 tiles; int8: [..., N, K] int8
    scales: Tensor  # int4: [..., K/group, N, 2] bf16 (scale, offset); int8: [..., N] bf16
    bits: int
    group_size: int  # the group ATen sees (int4), -1 for int8


def why_not_packable(n: int, k: int, bits: int, group_size: int, symmetric: bool) -> str | None:
    """None when ATen's CPU kernels can run this format, else the reason."""
    group = k if group_size == -1 else group_size
    if bits == 4:
        if n % 16:
            return f"int4 CPU kernel needs output features divisible by 16, got {n}"
        if not any(group % g == 0 and k % g == 0 for g in _INT4_GROUPS):
            return f"int4 CPU kernel needs groups of 32/64/128/256 inputs, got {group_size}"
        return None
    if bits == 8:
        if group_size != -1 or not symmetric:
            return "int8 CPU kernel needs per-channel symmetric quantization (group_size -1, symmetric)"
        return None
    return f"no CPU kernel for {bits}-bit weights"


def pack_for_cpu(
    qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> CpuPacked:
    """Convert stored codes ([..., N, K*bits/8], layout of `moepass.ir.quantized`) once, ahead of time.

    Leading dimensions (experts) are kept. Call `why_not_packable` first."""
    k = in_features(qweight, bits)
    lead, n = qweight.shape[:-2], qweight.shape[-2]
    flat_q = qweight.reshape(-1, *qweight.shape[-2:])
    flat_s = scales.reshape(-1, *scales.shape[-2:]).float()
    flat_z = None if zeros is None else zeros.reshape(-1, *zeros.shape[-2:])
    groups = flat_s.shape[-1]
    group = k // groups
    if bits == 8:
        codes = unpack(flat_q, 8)[..., :k].to(torch.int16) - 128
        return CpuPacked(
            codes.to(torch.int8).reshape(*lead, n, k).contiguous(),
            flat_s[..., 0].to(torch.bfloat16).reshape(*lead, n).contiguous(),
            8,
            -1,
        )
    aten_group = next(g for g in _INT4_GROUPS if group % g == 0 and k % g == 0)
    repeat = group // aten_group
    weights, pairs = [], []
    for i in range(flat_q.shape[0]):
        codes = unpack(flat_q[i], 4)[..., :k].to(torch.int32)
        weights.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        zero = (
            torch.full_like(flat_s[i], 8.0) if flat_z is None else unpack(flat_z[i], 4)[..., :groups].float()
        )
        # ATen computes (code - 8) * scale + offset; ours is (code - zero) * scale
        pair = torch.stack([flat_s[i], (8.0 - zero) * flat_s[i]], dim=-1)  # [N, G, 2]
        pairs.append(pair.repeat_interleave(repeat, dim=1).transpose(0, 1))
    weight = torch.stack(weights).reshape(*lead, *weights[0].shape)
    pair = torch.stack(pairs).to(torch.bfloat16).reshape(*lead, *pairs[0].shape)
    return CpuPacked(weight.contiguous(), pair.contiguous(), 4, aten_group)


def packed_linear(
    x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """x [..., K] -> [..., N] through ATen's packed kernel, computed in bf16, returned in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if bits == 4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales)
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias
