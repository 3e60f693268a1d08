"""2:4 semi-structured sparse GEMM in Triton: compressed values + 2-bit position metadata.

Reads the storage layout of `moepass.ir.sparse` (values, or their int4/int8 codes with groups of
group_size / 2 values, plus 2-bit positions): 2:4 + int4 reads 5/16 of a byte per weight — what a
memory-bound decode step pays for.

Two kernels: a GEMV for up to 8 rows that reads each compressed value once and gathers the matching
inputs, and a GEMM that expands each tile to dense in registers and calls `tl.dot`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from moepass.ir.sparse import SparsityPatternError, compress_24, decompress_24

from .quant_gemm import _dequantized_gather, _dot, dense_rows, dot_half, k_block, workspace


@triton.jit
def _values(
    v_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    offs_c,
    mask,
    stride_vn,
    stride_sn,
    stride_zn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
):
    """Compressed values [BN, len(offs_c)] in fp32: loaded, or dequantized from codes."""
    if BITS == 0:
        tile = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_c[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    else:
        tile = _dequantized_gather(
            v_ptr, s_ptr, z_ptr, offs_n, offs_c, mask, stride_vn, stride_sn, stride_zn, BITS, GROUP, HAS_ZEROS
        )
    return tile


@triton.jit
def _position(meta_ptr, offs_n, offs_c, mask, stride_mn):
    """Input column (within the full K) of every compressed value [BN, len(offs_c)]."""
    run = offs_c // 2
    byte = tl.load(meta_ptr + offs_n[:, None] * stride_mn + run[None, :] // 2, mask=mask, other=0).to(
        tl.int32
    )
    nibble = (byte >> ((run[None, :] % 2) * 4)) & 0xF
    within = tl.where((offs_c[None, :] % 2) == 0, nibble & 3, nibble >> 2)
    return run[None, :] * 4 + within


@triton.jit
def _sparse24_gemv_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_vn,
    stride_mn,
    stride_sn,
    stride_zn,
    stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Few rows: each compressed value is read once and multiplied by the input it came from."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half_k = K // 2
    for m in tl.static_range(ROWS):
        if m < M:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, half_k, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask = (offs_n[:, None] < N) & (offs_c[None, :] < half_k)
                w = _values(
                    v_ptr,
                    s_ptr,
                    z_ptr,
                    offs_n,
                    offs_c,
                    mask,
                    stride_vn,
                    stride_sn,
                    stride_zn,
                    BITS,
                    GROUP,
                    HAS_ZEROS,
                )
                cols = _position(meta_ptr, offs_n, offs_c, mask, stride_mn)
                x = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(w * x, axis=1)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            tl.store(out_ptr + m * stride_om + offs_n, acc, mask=offs_n < N)


@triton.jit
def _sparse24_gemm_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_vn,
    stride_mn,
    stride_sn,
    stride_zn,
    stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_HALF: tl.constexpr,
):
    """Many rows: expand each weight tile to dense in registers, then a tensor-core dot."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x stride may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        run = offs_k // 4
        first = _values(
            v_ptr,
            s_ptr,
            z_ptr,
            offs_n,
            run * 2,
            mask,
            stride_vn,
            stride_sn,
            stride_zn,
            BITS,
            GROUP,
            HAS_ZEROS,
        )
        second = _values(
            v_ptr,
            s_ptr,
            z_ptr,
            offs_n,
            run * 2 + 1,
            mask,
            stride_vn,
            stride_sn,
            stride_zn,
            BITS,
            GROUP,
            HAS_ZEROS,
        )
        byte = tl.load(meta_ptr + offs_n[:, None] * stride_mn + run[None, :] // 2, mask=mask, other=0).to(
            tl.int32
        )
        nibble = (byte >> ((run[None, :] % 2) * 4)) & 0xF
        within = (offs_k % 4)[None, :]
        w = tl.where((nibble & 3) == within, first, tl.where((nibble >> 2) == within, second, 0.0))
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        acc += _dot(x, w, DOT_HALF)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


GEMV_ROWS = 8


def sparse24_gemm(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    bits: int = 0,
    group_size: int = -1,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ W^T + bias for a 2:4-compressed W; `bits` 4/8 when `values` holds quantized codes
    (groups of `group_size` inputs, i.e. group_size / 2 stored values)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    values, meta, scales, zeros, bias = dense_rows(values, meta, scales, zeros, bias)
    m, k = x2.shape
    n = values.shape[0]
    group = (k if group_size == -1 else group_size) // 2
    out = workspace((m, n), x.device)
    args = (
        x2,
        values,
        meta,
        scales if scales is not None else values,
        zeros if zeros is not None else values,
        bias if bias is not None else x2,
        out,
        m,
        n,
        k,
        x2.stride(0),
        values.stride(0),
        meta.stride(0),
        scales.stride(0) if scales is not None else 0,
        zeros.stride(0) if zeros is not None else 0,
        out.stride(0),
    )
    flags = dict(BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    if m <= GEMV_ROWS:
        _sparse24_gemv_kernel[(triton.cdiv(n, 64),)](
            *args, **flags, ROWS=GEMV_ROWS, BLOCK_N=64, BLOCK_C=k_block(group)
        )
    else:
        block_m = 32 if m <= 64 else 64
        _sparse24_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, 64))](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, DOT_HALF=dot_half(x.dtype)
        )
    return out.to(x.dtype).reshape(*shape[:-1], n)


__all__ = ["SparsityPatternError", "compress_24", "decompress_24", "sparse24_gemm"]
