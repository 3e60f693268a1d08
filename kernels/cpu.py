"""Fastest CPU paths for quantized weights: ATen's prepacked int4 and int8 matmuls.

Measured on one core (`tools/bench_ops.py`): with bf16 activations, `_weight_int4pack_mm_for_cpu`
and `_weight_int8pack_mm` beat the dense fp32 matmul they replace by 1.5-3.5x, while their fp32
activation paths are 10-50x slower than it and dequantizing on every call is 1.5-20x slower. So these
paths run in bf16 and return the caller's dtype. Their relative error against the exact dequantized
product is ~3e-3 (1024 x 1024 random weights): 1/36 of what int4 g128 rounding itself costs (1e-1),
but over a third of int8 per-channel rounding (8e-3): lowering adds a third to an int8 program's own
error; `moepass.load(..., lower=False)` keeps float math.

They need weights converted once, ahead of time (`pack_for_cpu`): int4 codes into ATen's tile
layout with (scale, offset) pairs per group, int8 codes as int8 (code - 128). ATen's int8 kernel
takes one scale per output row, so int8 in groups (or with zero points) runs it once per group of
inputs, on that group's codes and scales, and adds the zero points' share, sum_g s_g (128 - z_g)
sum(x_g), as one small fp32 matmul: 2.3-3x faster than fp32 on Mixtral-size linears, 0.4-1.2x on
small ones, where dequantizing every call was 3-70x slower than fp32 (throwaway A/B, BENCHMARKS.md).
Formats ATen cannot express (int4 with groups of 16 or output counts not divisible by 16) keep the
reference path — `pack_for_cpu` says why.
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

    # int4: [..., N, K/2] uint8 tiles; int8: [..., N, K] int8, in groups holding [..., G, N, K/G] (the
    # codes group by group, so each group's block is contiguous) in that shape
    weight: Tensor
    # int4: [..., K/group, N, 2] bf16 (scale, offset); int8: [..., N] bf16, in groups [..., 2, G, N]
    # fp32 (per group: scale, scale * (128 - zero point))
    scales: Tensor
    bits: int
    group_size: int  # the group ATen sees (int4), int8's group, -1 for per-channel symmetric int8


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
        return None  # groups and zero points: one kernel call per group (`packed_linear`)
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
        codes = (unpack(flat_q, 8)[..., :k].to(torch.int16) - 128).to(torch.int8)
        if group_size == -1 and flat_z is None:  # one scale per row: one kernel call
            return CpuPacked(
                codes.reshape(*lead, n, k).contiguous(),
                flat_s[..., 0].to(torch.bfloat16).reshape(*lead, n).contiguous(),
                8,
                -1,
            )
        zero = torch.full_like(flat_s, 128.0) if flat_z is None else flat_z.float()
        by_group = codes.view(-1, n, groups, group).transpose(1, 2).contiguous()  # [.., G, N, group]
        pairs = torch.stack([flat_s, flat_s * (128.0 - zero)], dim=1).transpose(-1, -2)  # [.., 2, G, N]
        return CpuPacked(
            by_group.reshape(*lead, n, k),  # the IR's [N, K] shape, over group-major codes
            pairs.reshape(*lead, 2, groups, n).contiguous(),
            8,
            group,
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
    elif group_size == -1:
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales)
    else:
        y = _int8_by_group(x.reshape(-1, x.shape[-1]), x2, weight, scales)
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def _int8_by_group(x: Tensor, x2: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] (x2: in bf16) times int8 weights in groups (`pack_for_cpu`): ATen's per-row-scale
    kernel on each group's codes, plus the zero points' share in fp32."""
    groups, (n, k) = scales.shape[-2], weight.shape
    blocks = weight.view(groups, n, k // groups)
    y = x.float().reshape(-1, groups, k // groups).sum(-1) @ scales[1]
    row_scales = scales[0].to(torch.bfloat16)
    for g, x_g in enumerate(x2.reshape(-1, groups, k // groups).transpose(0, 1).contiguous()):
        y += torch.ops.aten._weight_int8pack_mm(x_g, blocks[g], row_scales[g])
    return y
