"""Weight-only integer formats: quantization codes, packing, and the float64-exact dequantizer.

One layout per format, chosen to be onnxruntime's `MatMulNBits` / `QMoE` input layout (so ONNX
export only reshapes) and easy for the Triton kernels to read. For a weight W [N, K] (F.linear
layout: N outputs, K inputs) quantized with `bits` in groups of `group_size` along K (G = K / group):

  qweight  uint8  4-bit: [N, K/2], two codes per byte along K, the even k in the low nibble
                  8-bit: [N, K]
  scales   [N, G] in the model's float dtype
  zeros    uint8  4-bit: [N, ceil(G/2)], packed like qweight (low nibble = even group)
                  8-bit: [N, G]
                  None for symmetric formats: the zero point is 2^(bits-1) (8 or 128)
  W[n, k] = (code[n, k] - zero[n, k // group]) * scale[n, k // group]

Expert tensors add a leading expert dimension to all three. Symmetric scales follow GPTQ's
convention (scale = 2 * absmax / (2^bits - 1), zero point 2^(bits-1)); asymmetric ones map
[min, max] of each group onto [0, 2^bits - 1]. A group size that does not divide K is an error
(no padding; the message names a size that fits): K is a multiple of 128 in the supported models
but GPT-OSS (2880 = 45 x 64: groups of 64 or 32). A weight whose rows are shorter than
the group (a small model's MLA kv_b_proj under a g128 recipe) is fitted by the passes to one
group per row (`QuantFormat.fitted`), stored with group_size K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moepass.errors import MoepassError

BITS = (4, 8)


class FormatError(MoepassError):
    """A quantization format that does not fit a tensor."""


@dataclass(frozen=True)
class QuantFormat:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    symmetric: bool = False

    def groups(self, in_features: int, name: str = "weight", op_inputs: int | None = None) -> int:
        """G for a K-input weight; raises naming the tensor when the format does not fit. `op_inputs`:
        the gcd of the input counts of every weight sharing this format (an experts op's gate/up and
        down), so the size suggested fits them all."""
        if self.bits not in BITS:
            raise FormatError(f"{name}: {self.bits}-bit quantization is not supported; choose one of {BITS}")
        group = in_features if self.group_size == -1 else self.group_size
        if group <= 0 or in_features % group:
            fits = op_inputs or in_features
            usual = [g for g in (128, 64, 32, 16) if fits % g == 0]
            such = f" such as {usual[0]}" if usual else ""
            also = "" if fits == in_features else " (to fit its op's other weights too)"
            raise FormatError(
                f"{name}: group size {self.group_size} does not divide its {in_features} inputs; "
                f"use a divisor of {fits}{also}{such} or -1 (per-channel)"
            )
        if self.bits == 4 and group % 2:
            raise FormatError(f"{name}: 4-bit groups must hold an even number of inputs, got {group}")
        return in_features // group

    def fitted(self, *in_features: int) -> QuantFormat:
        """This format for the weights of one op, with these input counts: a group longer than a row
        becomes the largest group dividing them all (one group per row for a single weight), so a
        recipe's group size fits every tensor of a model with short rows."""
        if self.group_size > min(in_features):
            return replace(self, group_size=math.gcd(*in_features))
        return self

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


def scales_and_zeros(
    weight: Tensor, fmt: QuantFormat, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Per-group scale and integer zero point ([..., N, G], both float) minimising nothing: min/max.

    The scale is rounded up to `dtype` (the stored one; default the weight's) before the zero point
    and the codes are derived from it, so a bf16 model's codes fit the scale it will be dequantized
    with and the group's range still fits the codes."""
    *lead, n, k = weight.shape
    dtype = dtype or weight.dtype
    groups = weight.reshape(*lead, n, -1, fmt.group(k)).float()
    if fmt.symmetric:
        scale = 2 * groups.abs().amax(-1) / fmt.max_code
    else:
        low, high = groups.amin(-1).clamp_max(0), groups.amax(-1).clamp_min(0)
        scale = (high - low) / fmt.max_code
    stored = scale.to(dtype)
    up = torch.nextafter(stored, stored.new_tensor(torch.inf))
    stored = torch.where(stored.float() < scale, up, stored)
    # a zero range still needs a positive scale: the smallest `dtype` holds (fp16's subnormals: a
    # floor at its smallest normal, 6e-5, would coarsen every small-range group) that fp32 holds
    # as a normal number (float32 and bf16 subnormals may be flushed to zero)
    smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    scale = stored.float().clamp_min(max(smallest, torch.finfo(torch.float32).tiny))
    if fmt.symmetric:
        zero = torch.full_like(scale, 2 ** (fmt.bits - 1))
    else:
        zero = torch.round(-low / scale).clamp(0, fmt.max_code)
    return scale, zero


def codes_for(weight: Tensor, scale: Tensor, zero: Tensor, fmt: QuantFormat) -> Tensor:
    """Integer codes (int16) of `weight` [..., N, K] for per-group scale/zero [..., N, G]."""
    grouped = weight.float().unflatten(-1, (scale.shape[-1], fmt.group(weight.shape[-1])))
    codes = torch.round(grouped / scale[..., None]) + zero[..., None]
    return torch.clamp(codes, 0, fmt.max_code).to(torch.int16).flatten(-2)


def pack(codes: Tensor, bits: int) -> Tensor:
    """int codes [..., K] -> uint8 [..., K/2] (4-bit, low nibble = even index) or [..., K] (8-bit)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack`: uint8 -> int16 codes [..., K]."""
    if bits == 8:
        return packed.to(torch.int16)
    # arithmetic, not `& 0x0F` and `>> 4`: torch 2.11's ONNX exporter lowers a uint8 shift to a Where
    # that onnxruntime cannot run (the quantized embedding's lookup exports this as standard ops)
    # (in int16 and `wide - 16 * high` rather than `%`: 2.4x faster on CPU)
    wide = packed.to(torch.int16)
    high = wide // 16
    return torch.stack([wide - 16 * high, high], dim=-1).flatten(-2)


def packed_width(count: int, bits: int) -> int:
    """Bytes per row that `count` codes take (4-bit: two per byte; an odd count pads a high nibble)."""
    return -(-count // 2) if bits == 4 else count


def empty_packed(
    weight: Tensor, fmt: QuantFormat, name: str = "weight"
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Uninitialised (qweight, scales, zeros) in `fmt`'s stored shapes for `weight` [..., N, K]:
    placeholders an artifact's tensors replace, at none of quantization's cost."""
    *lead, n, k = weight.shape
    groups = fmt.groups(k, name)

    def empty(width: int, dtype: torch.dtype) -> Tensor:
        return torch.empty((*lead, n, width), dtype=dtype, device=weight.device)

    zeros = None if fmt.symmetric else empty(packed_width(groups, fmt.bits), torch.uint8)
    return empty(packed_width(k, fmt.bits), torch.uint8), empty(groups, weight.dtype), zeros


def quantize(weight: Tensor, fmt: QuantFormat, name: str = "weight") -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest: (qweight, scales, zeros-or-None) of `weight` [..., N, K] in `fmt`'s layout."""
    fmt.groups(weight.shape[-1], name)
    scale, zero = scales_and_zeros(weight, fmt)
    return packed_triple(codes_for(weight, scale, zero, fmt), scale, zero, fmt, weight.dtype)


def packed_triple(
    codes: Tensor, scale: Tensor, zero: Tensor, fmt: QuantFormat, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Codes and per-group scale/zero in the stored layout (GPTQ and AWQ produce these too)."""
    zeros = None
    if not fmt.symmetric:
        zero = zero.to(torch.int16)
        if fmt.bits == 4 and zero.shape[-1] % 2:  # an odd group count: pad the last byte's high nibble
            zero = torch.nn.functional.pad(zero, (0, 1))
        zeros = pack(zero, fmt.bits)
    return pack(codes, fmt.bits), scale.to(dtype).contiguous(), zeros


def dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """W [..., N, K] from the stored layout (`group_size` -1: per-channel)."""
    codes = unpack(qweight, bits)
    group = codes.shape[-1] if group_size == -1 else group_size
    zero = 2 ** (bits - 1) if zeros is None else unpack(zeros, bits)[..., : codes.shape[-1] // group]
    return dequantize_codes(codes, zero, scales, group, dtype)


def dequantize_codes(
    codes: Tensor, zero: int | Tensor, scales: Tensor, group: int, dtype: torch.dtype | None = None
) -> Tensor:
    """W [..., N, K] from integer codes, the per-group zero points (one int, or [..., N, G] integers)
    and scales [..., N, G]: on per-group views, not scales repeated to [N, K] (repeat_interleave costs
    4x the rest on CPU)."""
    zero = zero if isinstance(zero, int) else zero[..., None]
    weight = (codes.unflatten(-1, (-1, group)) - zero).to(scales.dtype if dtype is None else dtype)
    return (weight * scales.to(weight.dtype)[..., None]).flatten(-2)


def in_features(qweight: Tensor, bits: int) -> int:
    return qweight.shape[-1] * (2 if bits == 4 else 1)


def check_codes(
    name: str, k: int, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> None:
    """Raise naming `name` unless (qweight, scales, zeros) store a `k`-input weight in this format: a
    mismatch would otherwise dequantize to another weight, or fail deep inside torch."""
    if bits not in BITS:
        raise FormatError(f"{name}: bits={bits} is not a stored format; one of {BITS}")
    if in_features(qweight, bits) != k:
        raise FormatError(
            f"{name}: the input has {k} features but the {bits}-bit codes "
            f"{list(qweight.shape)} hold {in_features(qweight, bits)}"
        )
    group = k if group_size == -1 else group_size
    if group <= 0 or k % group:
        raise FormatError(f"{name}: group_size {group_size} does not divide the {k} inputs")
    groups, rows = k // group, tuple(qweight.shape[:-1])
    if tuple(scales.shape) != (*rows, groups):
        raise FormatError(
            f"{name}: scales {list(scales.shape)} do not fit group_size {group_size} "
            f"(expected {[*rows, groups]})"
        )
    packed_groups = packed_width(groups, bits)
    if zeros is not None and tuple(zeros.shape) != (*rows, packed_groups):
        raise FormatError(f"{name}: zeros {list(zeros.shape)} do not fit (expected {[*rows, packed_groups]})")
