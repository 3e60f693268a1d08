"""Weight-only quantized GEMM (W4A16 / W8A16) in Triton, on the layout of `moepass.ir.quantized`.

One kernel serves prefill and decode: output tiles of BLOCK_M x BLOCK_N, the K loop in steps of
BLOCK_K that never straddle a quantization group (BLOCK_K divides the group), codes unpacked and
dequantized in registers (`(code - zero) * scale`), fp32 accumulation. For few rows (decode, M <= 16)
the K dimension is additionally split across programs (split-K) so that enough programs stream the
weight: partial sums land in an fp32 workspace [SPLIT_K, M, N] that is reduced afterwards.
The launch (`Tiles`) comes from a heuristic over the shapes — no tuning file whose absence makes a
shape slow; `tools/device/bench_kernels.py --sweep` times others on the GPU (the swapped orientation,
scales applied after the dot, GEMV products). The tile helpers here serve the fused MoE too.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_ENV = "MOEPASS_POISON_BUFFERS"


def workspace(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """An fp32 buffer a kernel fills; NaN-filled when MOEPASS_POISON_BUFFERS=1, so that an element a
    kernel forgot to write shows up in the result instead of passing by luck."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


def dense_rows(*tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors with contiguous rows (views copied): the kernels index a row's elements at unit
    stride and take only the outer strides, so a transposed view would be read as other weights."""
    return [None if t is None else t.contiguous() for t in tensors]


@triton.jit
def _zero_points(z_rows, group, mask, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """The zero points of `group` read from the rows' pointers (broadcast against `group`; 4-bit zero
    points two groups a byte, low nibble first); the code midpoint when symmetric."""
    if HAS_ZEROS:
        if BITS == 4:
            zbyte = tl.load(z_rows + group // 2, mask=mask, other=0).to(tl.int32)
            zero = (zbyte >> ((group % 2) * 4)) & 0xF
        else:
            zero = tl.load(z_rows + group, mask=mask, other=0).to(tl.int32)
    else:
        zero = 1 << (BITS - 1)
    return zero


@triton.jit
def _dequantized(codes, s_rows, z_rows, group, mask, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """(codes - zero point) * scale in fp32, scales and zero points of `group` read from the rows'
    pointers."""
    scale = tl.load(s_rows + group, mask=mask, other=0.0).to(tl.float32)
    return (codes - _zero_points(z_rows, group, mask, BITS, HAS_ZEROS)).to(tl.float32) * scale


@triton.jit
def _dequantized_gather(
    q_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    offs_k,
    mask,
    stride_qn,
    stride_sn,
    stride_zn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
):
    """W[offs_n, offs_k] in fp32 for any columns (2:4 values, tiles straddling groups): codes, scales
    and zero points read element by element."""
    if BITS == 4:
        packed = tl.load(q_ptr + offs_n[:, None] * stride_qn + (offs_k[None, :] // 2), mask=mask, other=0)
        codes = (packed.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF
    else:
        codes = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0).to(
            tl.int32
        )
    return _dequantized(
        codes,
        s_ptr + offs_n[:, None] * stride_sn,
        z_ptr + offs_n[:, None] * stride_zn,
        (offs_k // GROUP)[None, :],
        mask,
        BITS,
        HAS_ZEROS,
    )


@triton.jit
def _dequantized_tile(
    q_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    n_mask,
    k0,
    K,
    stride_qn,
    stride_sn,
    stride_zn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W[offs_n, k0:k0 + BLOCK_K] in fp32 from packed codes, per-group scales and (packed) zero points."""
    if GROUP % BLOCK_K != 0:  # no power of two >= 16 divides the group: the tile straddles groups
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return _dequantized_gather(
            q_ptr,
            s_ptr,
            z_ptr,
            offs_n,
            offs_k,
            n_mask[:, None] & (offs_k[None, :] < K),
            stride_qn,
            stride_sn,
            stride_zn,
            BITS,
            GROUP,
            HAS_ZEROS,
        )
    codes = _centered_codes(
        q_ptr, z_ptr, offs_n, n_mask, k0, K, stride_qn, stride_zn, BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K
    )
    return codes.to(tl.float32) * _group_scales(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP)[:, None]


@triton.jit
def _centered_codes(
    q_ptr,
    z_ptr,
    offs_n,
    n_mask,
    k0,
    K,
    stride_qn,
    stride_zn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """code - zero point of W[offs_n, k0:k0 + BLOCK_K] (int32, |value| <= 255: exact in bf16), for a
    tile inside one group (BLOCK_K divides GROUP).

    Loads are contiguous runs (int4: each byte once, split into its two nibbles) plus one zero point
    per row: element-by-element gathers of bytes, scales and zero points ran at 2% of the H200's
    bandwidth (BENCHMARKS.md)."""
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :],
            mask=n_mask[:, None] & (offs_b[None, :] * 2 < K),
            other=0,
        ).to(tl.int32)
        # code 2j is byte j's low nibble, code 2j + 1 its high nibble
        codes = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
            mask=n_mask[:, None] & (offs_k[None, :] < K),
            other=0,
        ).to(tl.int32)
    # one zero point per row: the tile's group is k0 // GROUP
    return codes - _zero_points(
        z_ptr + offs_n[:, None] * stride_zn, k0 // GROUP, n_mask[:, None], BITS, HAS_ZEROS
    )


@triton.jit
def _group_scales(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP: tl.constexpr):
    """[BLOCK_N] fp32: the rows' scales of the group holding column k0."""
    return tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def _dot(a, w, DOT_HALF: tl.constexpr):
    """a @ w^T on tensor cores: operands in bf16 (1) or fp16 (2) when the activations are; fp32
    otherwise — and always under the interpreter, whose 16-bit float math is wrong — in full precision
    (0), or TF32 (3) where torch allows it for its own fp32 matmuls. Either operand may be integer
    codes (converted exactly: |code| <= 255 fits bf16's and fp16's mantissas)."""
    if DOT_HALF == 1:
        out = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    elif DOT_HALF == 2:
        out = tl.dot(a.to(tl.float16), tl.trans(w.to(tl.float16)))
    elif DOT_HALF == 3:
        out = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="tf32")
    else:
        out = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    return out


def dot_half(dtype: torch.dtype) -> int:
    """The `DOT_HALF` flag for activations of `dtype`: fp32 activations get what `F.linear` gives
    them (TF32 only under `torch.backends.cuda.matmul.allow_tf32`, off by default)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    fp32 = 3 if torch.backends.cuda.matmul.allow_tf32 else 0
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, fp32)


@triton.jit
def _product(a, w, DOT_HALF: tl.constexpr, SWAP_AB: tl.constexpr, GEMV: tl.constexpr):
    """a @ w^T, or its transpose w @ a^T with the weight tile as the dot's first operand. GEMV: as a
    broadcast multiply summed over K in fp32, off the tensor cores, for 1-row tiles (a decode step's
    token): the weight tile then never goes through shared memory into the dot's operand layout."""
    if GEMV:
        out = tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        out = tl.trans(out) if SWAP_AB else out
    else:
        out = _dot(w, a, DOT_HALF) if SWAP_AB else _dot(a, w, DOT_HALF)
    return out


@triton.jit
def _tile_product(
    a,
    w_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    n_mask,
    k0,
    K,
    stride_wn,
    stride_sn,
    stride_zn,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_HALF: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    GEMV: tl.constexpr,
):
    """This K block's share of a @ W[offs_n]^T (or its transpose), W dense (QUANT 0) or quantized.
    SCALE_AFTER_DOT (quantized, the tile inside one group): the dot takes the codes less their zero
    points, exact small integers, and its [M, N] result is scaled per output column, instead of
    every weight element scaled."""
    tl.static_assert(QUANT > 0 or not SCALE_AFTER_DOT, "dense weights have no scales to apply after the dot")
    if SCALE_AFTER_DOT:
        codes = _centered_codes(
            w_ptr,
            z_ptr,
            offs_n,
            n_mask,
            k0,
            K,
            stride_wn,
            stride_zn,
            QUANT,
            GROUP,
            HAS_ZEROS,
            BLOCK_N,
            BLOCK_K,
        )
        out = _product(a, codes, DOT_HALF, SWAP_AB, GEMV)
        scales = _group_scales(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP)
        out = out * scales[:, None] if SWAP_AB else out * scales[None, :]
    else:
        if QUANT == 0:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                mask=n_mask[:, None] & (offs_k[None, :] < K),
                other=0.0,
            ).to(tl.float32)
        else:
            w = _dequantized_tile(
                w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn, stride_zn, QUANT, GROUP,
                HAS_ZEROS, BLOCK_N, BLOCK_K
            )  # fmt: skip
        out = _product(a, w, DOT_HALF, SWAP_AB, GEMV)
    return out


@triton.jit
def _quant_gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    in_scale_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_split,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_IN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    DOT_HALF: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    GEMV: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x stride may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP_AB:  # accumulate out^T = W x^T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):  # a share may be empty
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0).to(
            tl.float32
        )
        if HAS_IN_SCALE:
            x = x * tl.load(in_scale_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
        acc += _tile_product(
            x, q_ptr, s_ptr, z_ptr, offs_n, offs_n < N, k0, K, stride_qn, stride_sn, stride_zn, BITS, GROUP,
            HAS_ZEROS, BLOCK_N, BLOCK_K, DOT_HALF, SWAP_AB, SCALE_AFTER_DOT, GEMV
        )  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=out_mask
    )


class Tiles(NamedTuple):
    """A GEMM launch (`quant_gemm`, or the fused MoE's grouped GEMMs): tile sizes, warps, software
    pipeline stages (Triton's defaults), whether the weight tile is the dot's first operand (out^T =
    W a^T), how many programs share the K loop (split-K: more programs stream a decode step's few
    rows' weights; the fused MoE splits its down projection only), whether quantized tiles inside
    one group scale the dot's result rather than each weight (fewer operations per weight element,
    which decode does little else with), and whether the product is a GEMV (`_product`; meant for
    block_m 1)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    split_k: int = 1
    scale_after_dot: bool = False
    gemv: bool = False


def scales_after_dot(launch: Tiles, bits: int, group: int, block_k: int) -> bool:
    """Whether `launch`'s scale-after-dot applies: quantized weights, tiles inside one group."""
    return launch.scale_after_dot and bits > 0 and group % block_k == 0


def k_block(group: int, largest: int = 64) -> int:
    """The largest power of two <= `largest` that divides the quantization group, so a tile reads one
    scale per row; 32 when none >= 16 does (the dequantizer then reads groups per element: a tile
    may straddle groups — correct, only less efficient)."""
    return next((b for b in (128, 64, 32, 16) if b <= largest and group % b == 0), 32)


def blocks_for(m: int, n: int, k: int, group: int) -> Tiles:
    """The launch for an [m, k] x [n, k]^T product.

    Decode-sized m gets the smallest row tile and splits K
    so that roughly 4 programs per 128 output columns stream the weight."""
    block_k = k_block(group)
    block_m = 16 if m <= 16 else (32 if m <= 64 else 64)
    block_n = 64 if n >= 64 else 32
    split = 1
    if m <= 16:
        k_tiles = triton.cdiv(k, block_k)
        split = max(1, min(8, k_tiles // 4))
        while k_tiles % split:
            split -= 1
    return Tiles(block_m, block_n, block_k, split_k=split)


def quant_gemm(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = (x * input_scale) @ dequantize(W)^T + bias, for x [..., K] on any Triton device."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    qweight, scales, zeros, input_scale = dense_rows(qweight, scales, zeros, input_scale)
    m, k = x2.shape
    n = qweight.shape[0]
    group = k if group_size == -1 else group_size
    launch = blocks_for(m, n, k, group)
    block_k, split = launch.block_k, launch.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    out = workspace((split, m, n), x.device)
    grid = (triton.cdiv(m, launch.block_m), triton.cdiv(n, launch.block_n), split)
    _quant_gemm_kernel[grid](
        x2,
        qweight,
        scales,
        zeros if zeros is not None else scales,
        input_scale if input_scale is not None else x2,
        out,
        m,
        n,
        k,
        x2.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        out.stride(1),
        out.stride(0),
        BITS=bits,
        GROUP=group,
        HAS_ZEROS=zeros is not None,
        HAS_IN_SCALE=input_scale is not None,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        BLOCK_K=block_k,
        K_PER_SPLIT=k_per_split,
        DOT_HALF=dot_half(x.dtype),
        SWAP_AB=launch.swap_ab,
        SCALE_AFTER_DOT=scales_after_dot(launch, bits, group, block_k),
        GEMV=launch.gemv,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    y = out.sum(0) if split > 1 else out[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)
