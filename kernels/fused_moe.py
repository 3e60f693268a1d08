"""Fused MoE in Triton: routed experts as two grouped GEMMs over expert-sorted token slots.

  1. align     (token, slot) pairs are sorted by expert and each expert's run is padded to a
               multiple of BLOCK_M, so every row block belongs to one expert (any expert count;
               experts that get no tokens cost nothing);
  2. gate/up   one grouped GEMM computes each row's gate and up tiles together and applies the
               activation (SwiGLU, GELU/ReLU-GLU, GPT-OSS's clamped SwiGLU) in the epilogue;
  3. down      a second grouped GEMM multiplies by each slot's routing weight in its epilogue
               (a launch may split its K loop across programs, each summing into its own plane);
  4. combine   the k slots (and K-loop planes) of every token are summed in fp32.
Weights are dense (fp32/fp16/bf16) or W4A16/W8A16 in the stored quantized layout, dequantized in
registers. Block sizes come from a shape heuristic, so expert counts produced by expert drop
(5, 6, 7, 48, 96...) need no tuning entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .quant_gemm import Tiles, _tile_product, dense_rows, dot_half, k_block, scales_after_dot, workspace

ACTIVATIONS = {
    "silu": 0,
    "swish": 0,
    "gelu": 1,
    "gelu_pytorch_tanh": 2,
    "gelu_new": 2,
    "relu": 3,
    "clamped_swiglu": 4,
}


@triton.jit
def _activate(gate, up, ACT: tl.constexpr, alpha, limit):
    if ACT == 0:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    elif ACT == 2:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0)) * up
    elif ACT == 3:
        out = tl.maximum(gate, 0.0) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    return out


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    in_scale_ptr,
    route_w_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_slots,
    num_experts,
    top_k,
    N,
    K,
    alpha,
    limit,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_ze,
    stride_zn,
    stride_be,
    stride_ie,
    stride_om,
    stride_os,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,
    MUL_ROUTE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IN_SCALE: tl.constexpr,
    IN_SCALE_PER_EXPERT: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_HALF: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    GEMV: tl.constexpr,
):
    """out[slot, n] for the BLOCK_M expert-sorted slots of this program; gated: the gate rows are
    [0, N) and the up rows [N, 2N) of the expert's weight, combined by the activation.

    DIRECT (one token): program m serves slot m alone and reads its expert from the routing itself,
    so a decode step needs no alignment kernels. SPLIT_K > 1 (not gated: the activation needs whole
    sums): program k of the third grid axis sums the k-th share of the K blocks into its own plane of
    `out` (stride_os apart), bias in plane 0; the caller adds the planes."""
    tl.static_assert(SPLIT_K == 1 or not GATED, "split-K would activate partial sums")
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    expert = tl.load(block_expert_ptr + pid_m)
    live = (expert >= 0) & (expert < num_experts)  # unused blocks of `align`, dropped experts
    k_end = tl.where(live, K, 0)
    expert = tl.where(live, expert, 0).to(tl.int64)  # expert x stride passes 2**31 for large MoEs
    w_ptr, s_ptr, z_ptr = w_ptr + expert * stride_we, s_ptr + expert * stride_se, z_ptr + expert * stride_ze
    if DIRECT:
        slots = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_slots)
    else:
        slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slots = tl.where(live, slots, num_slots).to(tl.int64)  # slot x stride may pass 2**31
    valid = slots < num_slots
    rows = slots // top_k if A_BY_TOKEN else slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP_AB:  # accumulate out^T = W a^T: the (dequantized) weight tile is the dot's first operand
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # whole K blocks: never inside a group
    k_start = pid_k * per_split
    for k0 in range(k_start, tl.minimum(k_start + per_split, k_end), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + offs_k[None, :],
            mask=valid[:, None] & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        if HAS_IN_SCALE:
            scale_ptr = in_scale_ptr + expert * stride_ie if IN_SCALE_PER_EXPERT else in_scale_ptr
            a = a * tl.load(scale_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
        n_mask = offs_n < N
        acc += _tile_product(
            a, w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn, stride_zn, QUANT, GROUP,
            HAS_ZEROS, BLOCK_N, BLOCK_K, DOT_HALF, SWAP_AB, SCALE_AFTER_DOT, GEMV
        )  # fmt: skip
        if GATED:
            acc_up += _tile_product(
                a, w_ptr, s_ptr, z_ptr, offs_n + N, n_mask, k0, K, stride_wn, stride_sn, stride_zn, QUANT,
                GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K, DOT_HALF, SWAP_AB, SCALE_AFTER_DOT, GEMV
            )  # fmt: skip
    if SWAP_AB:
        acc, acc_up = tl.trans(acc), tl.trans(acc_up)
    if HAS_BIAS:
        bias_mask = offs_n < tl.where(pid_k == 0, N, 0)  # the bias once: in plane 0
        acc += tl.load(bias_ptr + expert * stride_be + offs_n, mask=bias_mask, other=0.0).to(tl.float32)[
            None, :
        ]
        if GATED:
            acc_up += tl.load(bias_ptr + expert * stride_be + N + offs_n, mask=offs_n < N, other=0.0).to(
                tl.float32
            )[None, :]
    if GATED:
        acc = _activate(acc, acc_up, ACT, alpha, limit)
    if MUL_ROUTE:
        acc = acc * tl.load(route_w_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + pid_k.to(tl.int64) * stride_os + slots[:, None] * stride_om + offs_n[None, :],
        acc,
        mask=valid[:, None] & (offs_n[None, :] < N),
    )


def align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(slot indices sorted by expert, each expert's run padded to BLOCK_M with a sentinel; the
    expert of every BLOCK_M row block, -1 for unused blocks).

    Shapes depend only on the routing's shape and the expert count (an upper bound of blocks), so no
    device-to-host sync is needed and the launch is CUDA-graph friendly. Slots routed to ids >=
    num_experts (dropped experts under preserve_gate) or below 0 are left out."""
    flat = topk_ids.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # E: every unrouted slot
    num_slots = flat.numel()
    device = flat.device
    max_blocks = triton.cdiv(num_slots, block_m) + num_experts
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts:].zero_()  # not `= 0`: a host-to-device copy, which CUDA graph capture refuses
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    first = torch.cumsum(counts, 0) - counts
    position = (ends - padded)[experts] + torch.arange(num_slots, device=device) - first[experts]
    position = torch.where(experts < num_experts, position, max_blocks * block_m)  # dropped: out of range
    sorted_slots = torch.full((max_blocks * block_m + 1,), num_slots, dtype=torch.int64, device=device)
    sorted_slots.scatter_(0, position, order)
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(ends[:num_experts], block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_slots[:-1], block_expert


def tiles_for(slots: int, num_experts: int, n: int, group: int, quantized: bool) -> Tiles:
    """The launch for `slots` routed rows over `num_experts` experts of a weight with `n` outputs.

    Changed from 64-row/64-input tiles only where three H200 runs (BENCHMARKS.md, 2026-12-04) agreed:
    quantized decode streams weights 128 inputs at a time on 32-output tiles (Mixtral-8x7B 1.5x at 1
    and 16 tokens; 0.75x on 128 small experts), long prompts take 128-row tiles on 8 warps (2048
    tokens: bf16 1.6x, int4 1.2-1.6x). Dense decode kept its tiles: its sweeps and tables disagreed."""
    per_expert = slots / max(num_experts, 1)
    block_n = 64 if n >= 64 else 32
    if per_expert <= 16:
        return Tiles(16, 32, k_block(group, largest=128)) if quantized else Tiles(16, block_n, k_block(group))
    if per_expert <= 64:
        return Tiles(32, block_n, k_block(group))
    if quantized and per_expert >= 128:
        return Tiles(128, 64, k_block(group), num_warps=8)
    if not quantized and per_expert >= 256:
        return Tiles(128, 128, k_block(group), num_warps=8)
    return Tiles(64, block_n, k_block(group))


def fused_moe(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    activation: str = "silu",
    alpha: float = 0.0,
    limit: float = 0.0,
    *,
    quant: dict | None = None,
    gate_up_input_scale: Tensor | None = None,
    down_input_scale: Tensor | None = None,
) -> Tensor:
    """The `moepass::experts` / `moepass::quantized_experts` computation as two grouped GEMMs.

    Dense: `gate_up` [E, 2I, H] and `down` [E, H, I]. Quantized (`quant` = {"bits", "group_size",
    "gate_up_scales", "gate_up_zeros", "down_scales", "down_zeros"}): `gate_up`/`down` are the
    packed codes."""
    tokens, top_k = topk_ids.shape
    hidden, topk_ids = hidden.contiguous(), topk_ids.contiguous()  # the one-token path reads ids flat
    num_experts, two_inter = gate_up.shape[0], gate_up.shape[1]
    routed = (topk_ids >= 0) & (topk_ids < num_experts)
    inter, h = two_inter // 2, hidden.shape[-1]
    bits = 0 if quant is None else quant["bits"]
    group_h = h if quant is None or quant["group_size"] == -1 else quant["group_size"]
    group_i = inter if quant is None or quant["group_size"] == -1 else quant["group_size"]
    num_slots = tokens * top_k
    launch = tiles_for(num_slots, num_experts, inter, group_h, bits > 0)
    block_m, block_n = launch.block_m, launch.block_n
    direct = tokens == 1
    if direct:
        sorted_slots, block_expert = topk_ids, topk_ids.reshape(-1)
    else:
        sorted_slots, block_expert = align(topk_ids, num_experts, block_m)
    act = workspace((num_slots, inter), hidden.device)
    out = workspace((launch.split_k, num_slots, h), hidden.device)  # a plane per share of the K loop
    route = topk_weights.reshape(-1).float().contiguous()

    def run(a, w, scales, zeros, bias, in_scale, target, n, k, group, gated, by_token, mul_route, bk):
        w, scales, zeros, bias, in_scale = dense_rows(w, scales, zeros, bias, in_scale)
        split_k = 1 if gated else launch.split_k
        grid = (block_expert.numel(), triton.cdiv(n, block_n), split_k)
        _grouped_gemm_kernel[grid](
            a,
            w,
            scales if scales is not None else w,
            zeros if zeros is not None else w,
            bias if bias is not None else a,
            in_scale if in_scale is not None else a,
            route,
            target,
            sorted_slots,
            block_expert,
            num_slots,
            num_experts,
            top_k,
            n,
            k,
            float(alpha),
            float(limit),
            a.stride(0),
            w.stride(0),
            w.stride(1),
            scales.stride(0) if scales is not None else 0,
            scales.stride(1) if scales is not None else 0,
            zeros.stride(0) if zeros is not None else 0,
            zeros.stride(1) if zeros is not None else 0,
            bias.stride(0) if bias is not None else 0,
            in_scale.stride(0) if in_scale is not None and in_scale.dim() == 2 else 0,
            target.stride(-2),
            target.stride(0) if split_k > 1 else 0,
            GATED=gated,
            ACT=ACTIVATIONS[activation],
            A_BY_TOKEN=by_token,
            MUL_ROUTE=mul_route,
            HAS_BIAS=bias is not None,
            HAS_IN_SCALE=in_scale is not None,
            IN_SCALE_PER_EXPERT=in_scale is not None and in_scale.dim() == 2,
            QUANT=bits,
            GROUP=group,
            HAS_ZEROS=zeros is not None,
            DIRECT=direct,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=bk,
            DOT_HALF=dot_half(hidden.dtype),
            SWAP_AB=launch.swap_ab,
            SPLIT_K=split_k,
            SCALE_AFTER_DOT=scales_after_dot(launch, bits, group, bk),
            GEMV=launch.gemv,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )

    q = quant or {}
    run(
        hidden,
        gate_up,
        q.get("gate_up_scales"),
        q.get("gate_up_zeros"),
        gate_up_bias,
        gate_up_input_scale,
        act,
        inter,
        h,
        group_h,
        True,
        True,
        False,
        launch.block_k,
    )
    down_block_k = tiles_for(num_slots, num_experts, h, group_i, bits > 0).block_k
    run(
        act,
        down,
        q.get("down_scales"),
        q.get("down_zeros"),
        down_bias,
        down_input_scale,
        out,
        h,
        inter,
        group_i,
        False,
        False,
        True,
        down_block_k,
    )
    # slots outside [0, E) were never written; each token sums its k slots' K-loop shares
    slots = torch.where(routed.unsqueeze(-1), out.view(launch.split_k, tokens, top_k, h), 0.0)
    return slots.sum(dim=(0, 2)).to(hidden.dtype)
