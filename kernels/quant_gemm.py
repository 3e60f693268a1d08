"""Weight-only quantized GEMM (W4A16 / W8A16) in Triton, on the layout of `moepass.ir.quantized`.

One kernel serves prefill and decode: output tiles of BLOCK_M x BLOCK_N, the K loop in steps of
BLOCK_K that never straddle a quantization group (BLOCK_K divides the group), codes unpacked and
dequantized in registers (`(code - zero) * scale`), fp32 accumulation. For few rows (decode, M <= 16)
the K dimension is additionally split across programs (split-K) so that enough programs stream the
weight: partial sums land in an fp32 workspace [SPLIT_K, M, N] that is reduced afterwards.
Block sizes come from a heuristic over the shapes — no tuning file whose absence makes a shape slow.
"""

from __future__ import annotations

import os

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
def _dequantized(codes, s_rows, z_rows, group, mask, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """(codes - zero point) * scale in fp32, the scales and zero points of `group` read from the rows'
    pointers (broadcast against `group`; 4-bit zero points two groups a byte, low nibble first)."""
    scale = tl.load(s_rows + group, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        if BITS == 4:
            zbyte = tl.load(z_rows + group // 2, mask=mask, other=0).to(tl.int32)
            zero = (zbyte >> ((group % 2) * 4)) & 0xF
        else:
            zero = tl.load(z_rows + group, mask=mask, other=0).to(tl.int32)
    else:
        zero = 1 << (BITS - 1)
    return (codes - zero).to(tl.float32) * scale


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
    """W[offs_n, k0:k0 + BLOCK_K] in fp32 from packed codes, per-group scales and (packed) zero points.

    Inside one group, loads are contiguous runs (int4: each byte once, split into its two nibbles)
    plus one scale and zero point per row: element-by-element gathers of bytes, scales and zero
    points ran at 2% of the H200's bandwidth (BENCHMARKS.md)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if GROUP % BLOCK_K != 0:  # no power of two >= 16 divides the group: the tile straddles groups
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
        codes = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
            mask=n_mask[:, None] & (offs_k[None, :] < K),
            other=0,
        ).to(tl.int32)
    rows = offs_n[:, None]  # one scale and zero point per row: the tile's group is k0 // GROUP
    return _dequantized(
        codes,
        s_ptr + rows * stride_sn,
        z_ptr + rows * stride_zn,
        k0 // GROUP,
        n_mask[:, None],
        BITS,
        HAS_ZEROS,
    )


@triton.jit
def _dot(a, w, DOT_HALF: tl.constexpr):
    """a @ w^T on tensor cores: operands in bf16 (1) or fp16 (2) when the activations are; fp32
    otherwise — and always under the interpreter, whose 16-bit float math is wrong — in full precision
    (0), or TF32 (3) where torch allows it for its own fp32 matmuls."""
    if DOT_HALF == 1:
        out = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    elif DOT_HALF == 2:
        out = tl.dot(a.to(tl.float16), tl.trans(w.to(tl.float16)))
    elif DOT_HALF == 3:
        out = tl.dot(a, tl.trans(w), input_precision="tf32")
    else:
        out = tl.dot(a, tl.trans(w), input_precision="ieee")
    return out


def dot_half(dtype: torch.dtype) -> int:
    """The `DOT_HALF` flag for activations of `dtype`: fp32 activations get what `F.linear` gives
    them (TF32 only under `torch.backends.cuda.matmul.allow_tf32`, off by default)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    fp32 = 3 if torch.backends.cuda.matmul.allow_tf32 else 0
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, fp32)


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
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x stride may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0).to(
            tl.float32
        )
        if HAS_IN_SCALE:
            x = x * tl.load(in_scale_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
        w = _dequantized_tile(
            q_ptr,
            s_ptr,
            z_ptr,
            offs_n,
            offs_n < N,
            k0,
            K,
            stride_qn,
            stride_sn,
            stride_zn,
            BITS,
            GROUP,
            HAS_ZEROS,
            BLOCK_N,
            BLOCK_K,
        )
        acc += _dot(x, w, DOT_HALF)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=out_mask
    )


def k_block(group: int, largest: int = 64) -> int:
    """The largest power of two <= `largest` that divides the quantization group, so a tile reads one
    scale per row; 32 when none >= 16 does (the dequantizer then reads groups per element: a tile
    may straddle groups — correct, only less efficient)."""
    return next((b for b in (128, 64, 32, 16) if b <= largest and group % b == 0), 32)


def blocks_for(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [n, k]^T product.

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
    return block_m, block_n, block_k, split


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
    block_m, block_n, block_k, split = blocks_for(m, n, k, group)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    out = workspace((split, m, n), x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        K_PER_SPLIT=k_per_split,
        DOT_HALF=dot_half(x.dtype),
    )
    y = out.sum(0) if split > 1 else out[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)
