"""Triton kernels (run by the interpreter) and the CPU paths, against float64 references of their ops.

Every kernel runs with NaN-poisoned workspaces (MOEPASS_POISON_BUFFERS), so an output element a
kernel does not write fails the comparison. Inputs are fresh random values each run; shapes are
ragged (not multiples of the block sizes), expert counts include those expert drop produces, and
routings leave some experts without tokens.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moepass.ir.ops import ACTIVATIONS, TRACEABLE_BODIES, experts, experts_body
from moepass.ir.quant_ops import quantized_experts, quantized_linear
from moepass.ir.quantized import QuantFormat, quantize
from moepass.ir.sparse import SPARSE24_LINEAR
from moepass.kernels import (
    SparsityPatternError,
    compress_24,
    decompress_24,
    ops,
    pack_for_cpu,
    why_not_packable,
)
from moepass.kernels import fused_moe as fused_moe_module
from moepass.kernels import quant_gemm as quant_gemm_module
from moepass.kernels.fused_moe import align, tiles_for
from moepass.kernels.quant_gemm import POISON_ENV, Tiles

FP32_BOUND = 1e-5  # fp32 accumulation over K <= 256 against float64
BF16_BOUND = 1.5e-2  # bf16 activations (the CPU ATen paths, bf16 inputs)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    return float((out.double() - ref).norm() / ref.norm())


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or not t.is_floating_point() else t.double()


def routing(
    tokens: int, num_experts: int, top_k: int, dropped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skewed top-k routing (later experts often get no token); `dropped` sends a few slots to ids >=
    num_experts, as a router that preserved the rows of dropped experts does, and one to id -1 (the
    first token keeps at least one live slot)."""
    logits = torch.randn(tokens, num_experts) - torch.linspace(0, 3, num_experts)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    if dropped and tokens > 1:
        ids[0, -1] = num_experts + 2
        ids[-1, 0] = num_experts
    if dropped and tokens > 2:
        ids[tokens // 2, -1] = -1
    return weights, ids


def quantized(weight: torch.Tensor, bits: int, group: int, symmetric: bool):
    return quantize(weight, QuantFormat(bits=bits, group_size=group, symmetric=symmetric))


# ------------------------------------------------------------------------------------------------
# Weight-only quantized GEMM
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, False), (4, 64, True), (8, 32, False), (8, -1, True)]
)
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 70])
def test_quant_gemm_matches_float64_reference(seed, bits, group, symmetric, rows):
    n, k = 100, 192
    weight = torch.randn(n, k) / k**0.5
    qweight, scales, zeros = quantized(weight, bits, group, symmetric)
    x = torch.randn(rows, k)
    bias, input_scale = torch.randn(n), torch.rand(k) + 0.5
    ref = quantized_linear(x.double(), qweight, f64(scales), zeros, f64(bias), f64(input_scale), bits, group)
    out = ops.triton_quantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < FP32_BOUND
    plain = ops.triton_quantized_linear(x, qweight, scales, zeros, None, None, bits, group)
    assert rel_err(
        plain, quantized_linear(x.double(), qweight, f64(scales), zeros, None, None, bits, group)
    ) < (FP32_BOUND)


@pytest.mark.parametrize(
    "launch",
    [
        Tiles(16, 32, 32, split_k=3, scale_after_dot=True),  # six K blocks in shares of two
        Tiles(16, 64, 64, 4, 4, True, 2, True),
        Tiles(32, 32, 64, 2, 3, True),
        Tiles(16, 32, 64, scale_after_dot=True),  # int4's 64-input tiles straddle groups of 32: ignored
        Tiles(1, 64, 32, split_k=2, scale_after_dot=True, gemv=True),
        Tiles(4, 32, 64, 2, 3, True, gemv=True),  # a GEMV of 4 rows: a [4, 32, 64] product summed
    ],
    ids=str,
)
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (8, -1, True)])
@pytest.mark.parametrize("rows", [1, 19])
def test_every_quant_gemm_launch_computes_the_same_product(
    seed, monkeypatch, launch, bits, group, symmetric, rows
):
    """The swapped orientation, scaling after the dot and the GEMV product, like tile sizes, change
    only how the kernel walks the weight: the GPU sweep (tools/device/bench_kernels.py) tries them."""
    weight = torch.randn(100, 192) / 192**0.5
    qweight, scales, zeros = quantized(weight, bits, group, symmetric)
    x, input_scale = torch.randn(rows, 192), torch.rand(192) + 0.5
    monkeypatch.setattr(quant_gemm_module, "blocks_for", lambda *_: launch)
    ref = quantized_linear(x.double(), qweight, f64(scales), zeros, None, f64(input_scale), bits, group)
    out = ops.triton_quantized_linear(x, qweight, scales, zeros, None, input_scale, bits, group)
    assert rel_err(out, ref) < FP32_BOUND


def test_quant_gemm_half_precision_inputs(seed):
    weight = torch.randn(64, 128) / 12
    qweight, scales, zeros = quantized(weight, 4, 32, False)
    x = torch.randn(2, 5, 128)
    for dtype in (torch.bfloat16, torch.float16):
        ref = quantized_linear(x.double(), qweight, f64(scales), zeros, None, None, 4, 32)
        out = ops.triton_quantized_linear(x.to(dtype), qweight, scales.to(dtype), zeros, None, None, 4, 32)
        assert out.dtype == dtype and out.shape == (2, 5, 64)
        assert rel_err(out, ref) < BF16_BOUND


# ------------------------------------------------------------------------------------------------
# Fused MoE
# ------------------------------------------------------------------------------------------------
def test_align_groups_every_slot_under_its_expert(seed):
    for num_experts, top_k, tokens in [(1, 1, 1), (5, 2, 9), (7, 3, 40), (16, 4, 3)]:
        _, ids = routing(tokens, num_experts, top_k, dropped=num_experts > 1)
        block_m = 16
        sorted_slots, block_expert = align(ids, num_experts, block_m)
        flat = ids.reshape(-1)
        kept = [s for s in range(flat.numel()) if 0 <= flat[s] < num_experts]
        seen = sorted(int(s) for s in sorted_slots if s < flat.numel())
        assert seen == kept, "every routed slot exactly once, dropped slots never"
        for block, expert in enumerate(block_expert.tolist()):
            slots = sorted_slots[block * block_m : (block + 1) * block_m]
            slots = slots[slots < flat.numel()]
            if expert < 0:
                assert slots.numel() == 0
            else:
                assert (flat[slots] == expert).all()


# (experts, top-k, tokens); odd expert counts carry biases. Every activation runs without and with
# biases; the other routing shapes with one activation (the epilogue does not depend on them)
_EPILOGUE_SHAPES = [(2, 2, 1), (7, 3, 19)]
_CASES = [(a, *shape) for a in sorted(ACTIVATIONS) for shape in _EPILOGUE_SHAPES]
_CASES += [("silu", *shape) for shape in [(1, 1, 5), (5, 2, 37), (16, 4, 33), (6, 1, 70)]]


@pytest.mark.parametrize("activation,num_experts,top_k,tokens", _CASES)
def test_fused_moe_matches_float64_reference(seed, activation, num_experts, top_k, tokens):
    hidden, inter = 96, 80
    x = torch.randn(tokens, hidden)
    weights, ids = routing(tokens, num_experts, top_k, dropped=num_experts > 2)
    gate_up = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter) / inter**0.5
    biased = num_experts % 2 == 1
    gate_up_bias = torch.randn(num_experts, 2 * inter) if biased else None
    down_bias = torch.randn(num_experts, hidden) if biased else None
    args = (activation, 1.702, 7.0)
    ref = experts(
        x.double(),
        ids,
        weights.double(),
        gate_up.double(),
        down.double(),
        f64(gate_up_bias),
        f64(down_bias),
        *args,
    )
    out = ops.triton_experts(x, ids.int(), weights, gate_up, down, gate_up_bias, down_bias, *args)
    assert out.shape == x.shape  # int32 ids route as int64 ids do
    assert rel_err(out, ref) < FP32_BOUND


def reference_quantized_experts(
    x, ids, weights, gate_up, down, bits, group, down_bias=None, scales=(None, None), gate_up_bias=None
):
    """The quantized experts op in float64 (SiLU experts; `scales`: AWQ input scales of gate/up, down)."""
    return quantized_experts(
        x.double(),
        ids,
        weights.double(),
        gate_up[0],
        f64(gate_up[1]),
        gate_up[2],
        down[0],
        f64(down[1]),
        down[2],
        *(None if b is None else f64(b) for b in (gate_up_bias, down_bias)),
        *(None if s is None else f64(s) for s in scales),
        "silu",
        0.0,
        0.0,
        bits,
        group,
    )


@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, False), (4, -1, True), (8, 32, True), (8, -1, False)]
)
@pytest.mark.parametrize("num_experts,top_k,tokens", [(3, 1, 1), (5, 2, 21), (16, 4, 9)])
def test_fused_moe_quantized_matches_float64_reference(
    seed, bits, group, symmetric, num_experts, top_k, tokens
):
    hidden, inter = 128, 64
    x = torch.randn(tokens, hidden)
    weights, ids = routing(tokens, num_experts, top_k, dropped=True)
    gate_up = quantized(torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5, bits, group, symmetric)
    down = quantized(torch.randn(num_experts, hidden, inter) / inter**0.5, bits, group, symmetric)
    gate_up_scale, down_scale = torch.rand(hidden) + 0.5, torch.rand(num_experts, inter) + 0.5  # AWQ
    down_bias = torch.randn(num_experts, hidden)
    tail = ("silu", 0.0, 0.0, bits, group)
    ref = reference_quantized_experts(
        x, ids, weights, gate_up, down, bits, group, down_bias, (gate_up_scale, down_scale)
    )
    out = ops.triton_quantized_experts(
        x, ids, weights, *gate_up, *down, None, down_bias, gate_up_scale, down_scale, *tail
    )
    assert rel_err(out, ref) < FP32_BOUND


@pytest.mark.parametrize(
    "launch",
    [
        Tiles(16, 32, 128),
        Tiles(16, 64, 64, 4, 4, True),
        Tiles(32, 32, 32, 2, 3, True),
        Tiles(128, 64, 64, 8),
        Tiles(16, 32, 16, split_k=3),  # K = 64: four K blocks in shares of two, the last share empty
        Tiles(16, 32, 32, 4, 3, True, 4),
        Tiles(16, 32, 32, scale_after_dot=True),
        Tiles(16, 32, 16, 4, 3, True, 4, True),
        Tiles(16, 32, 64, scale_after_dot=True),  # int4's 64-input tiles straddle groups of 32: ignored
        Tiles(1, 32, 32, gemv=True),  # a program per routed slot, off the tensor cores
        Tiles(1, 64, 16, 2, 3, True, 4, True, True),
    ],
    ids=str,
)
@pytest.mark.parametrize("bits,group", [(0, -1), (4, 32), (8, -1)])
@pytest.mark.parametrize("tokens", [37, 1])  # 1: the decode path, each program one routed slot
def test_every_fused_moe_launch_computes_the_same_experts(seed, monkeypatch, launch, bits, group, tokens):
    """Tile shapes, warps, the swapped orientation (out^T = W a^T), split-K (the down projection's
    bias added once), scaling after the dot and the GEMV product change only how the kernel walks the
    experts; a sweep on the GPU (tools/device/bench_kernels.py) tries any of them."""
    num_experts, top_k, hidden, inter = 3, 2, 128, 64
    if launch.block_m == 1:  # a program per routed slot: 7 tokens already give each expert several
        tokens = min(tokens, 7)
    x = torch.randn(tokens, hidden)
    weights, ids = routing(tokens, num_experts, top_k, dropped=True)
    gate_up = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter) / inter**0.5
    monkeypatch.setattr(fused_moe_module, "tiles_for", lambda *_: launch)
    if bits == 0:
        bias = torch.randn(num_experts, hidden)
        ref = experts(
            x.double(),
            ids,
            weights.double(),
            gate_up.double(),
            down.double(),
            None,
            bias.double(),
            "silu",
            0,
            0,
        )
        out = ops.triton_experts(x, ids, weights, gate_up, down, None, bias, "silu", 0.0, 0.0)
    else:
        gate_up, down = quantized(gate_up, bits, group, False), quantized(down, bits, group, False)
        ref = reference_quantized_experts(x, ids, weights, gate_up, down, bits, group)
        tail = ("silu", 0.0, 0.0, bits, group)
        out = ops.triton_quantized_experts(x, ids, weights, *gate_up, *down, None, None, None, None, *tail)
    assert rel_err(out, ref) < FP32_BOUND


def test_launch_options_reach_the_kernels_where_they_apply(seed, monkeypatch):
    """Scaling after the dot needs quantized tiles inside one group; GEMV always applies. (The launch
    tests above would pass if an option were silently dropped.)"""
    seen = []

    def recording(kernel):
        class Launches:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append((kwargs["SCALE_AFTER_DOT"], kwargs["GEMV"]))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Launches()

    monkeypatch.setattr(
        fused_moe_module, "_grouped_gemm_kernel", recording(fused_moe_module._grouped_gemm_kernel)
    )
    monkeypatch.setattr(
        quant_gemm_module, "_quant_gemm_kernel", recording(quant_gemm_module._quant_gemm_kernel)
    )
    x, (weights, ids) = torch.randn(3, 128), routing(3, 2, 2)
    gate_up, down = torch.randn(2, 128, 128), torch.randn(2, 128, 64)
    quant = quantized(gate_up, 4, 32, False), quantized(down, 4, 32, False)
    tail = ("silu", 0.0, 0.0, 4, 32)
    for block_k, applies in ((32, True), (64, False)):  # 64-input tiles straddle groups of 32
        launch = Tiles(16, 32, block_k, scale_after_dot=True, gemv=True)
        monkeypatch.setattr(fused_moe_module, "tiles_for", lambda *_, launch=launch: launch)
        monkeypatch.setattr(quant_gemm_module, "blocks_for", lambda *_, launch=launch: launch)
        seen.clear()
        ops.triton_quantized_experts(x, ids, weights, *quant[0], *quant[1], None, None, None, None, *tail)
        ops.triton_quantized_linear(x, *(t[0] for t in quant[0]), None, None, 4, 32)  # expert 0's
        assert seen == [(applies, True)] * 3, block_k
    seen.clear()
    ops.triton_experts(x, ids, weights, gate_up, down, None, None, "silu", 0.0, 0.0)  # dense: no scales
    assert seen == [(False, True)] * 2


@pytest.mark.parametrize("quantized_weights", [False, True])
def test_tiles_for_takes_long_prompts_in_128_row_tiles_and_quantized_decode_in_128_input_tiles(
    quantized_weights,
):
    prompt, decode = (
        tiles_for(2048 * 2, 8, 14336, 128, quantized_weights),
        tiles_for(2, 8, 14336, 128, quantized_weights),
    )
    assert (prompt.block_m, prompt.num_warps, decode.block_m) == (128, 8, 16)
    assert decode.block_k == (128 if quantized_weights else 64)
    assert tiles_for(2, 8, 14336, 48, quantized_weights).block_k == 16  # a tile inside one group


def test_fused_moe_bf16(seed):
    x = torch.randn(11, 64).bfloat16()
    weights, ids = routing(11, 6, 2)
    gate_up, down = torch.randn(6, 96, 64) / 8, torch.randn(6, 64, 48) / 7
    ref = experts(
        x.double(), ids, weights.double(), gate_up.double(), down.double(), None, None, "silu", 0.0, 0.0
    )
    out = ops.triton_experts(
        x, ids, weights.bfloat16(), gate_up.bfloat16(), down.bfloat16(), None, None, "silu", 0.0, 0.0
    )
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < BF16_BOUND


# ------------------------------------------------------------------------------------------------
# 2:4 sparse
# ------------------------------------------------------------------------------------------------
def sparse_24(n: int, k: int) -> torch.Tensor:
    """A random 2:4 weight, with some runs holding fewer than 2 non-zeros."""
    runs = torch.randn(n, k // 4, 4)
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.abs().topk(2, dim=-1).indices, True)
    keep &= torch.rand_like(runs) > 0.1
    return (runs * keep).reshape(n, k)


def test_compress_24_round_trip_and_bad_patterns(seed):
    weight = sparse_24(48, 64)
    values, meta = compress_24(weight)
    assert values.shape == (48, 32) and meta.shape == (48, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), weight)
    dense = weight.clone()
    dense[7, 12:16] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(SparsityPatternError, match=r"layers.0.w1: row 7, inputs 12..15"):
        compress_24(dense, "layers.0.w1")
    with pytest.raises(SparsityPatternError, match="divisible by 8"):
        compress_24(torch.zeros(4, 12))


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize(
    "bits,group,symmetric", [(0, -1, False), (4, 64, False), (4, 32, True), (8, -1, True)]
)
def test_sparse24_gemm_matches_float64_reference(seed, rows, bits, group, symmetric):
    n, k = 80, 192
    weight = sparse_24(n, k) / k**0.5
    values, meta = compress_24(weight)
    scales = zeros = None
    if bits:
        values, scales, zeros = quantized(values, bits, group if group == -1 else group // 2, symmetric)
    x, bias = torch.randn(rows, k), torch.randn(n)
    ref = ops.sparse24_linear(
        x.double(),
        values if bits else values.double(),
        meta,
        f64(scales),
        zeros,
        bias.double(),
        None,
        bits,
        group,
    )
    if not bits:
        assert torch.allclose(ref, x.double() @ weight.double().T + bias.double())
    out = ops.triton_sparse24_linear(x, values, meta, scales, zeros, bias, None, bits, group)
    assert rel_err(out, ref) < FP32_BOUND


# ------------------------------------------------------------------------------------------------
# CPU paths and op registration
# ------------------------------------------------------------------------------------------------
def run_packed_experts(x, ids, weights, packed, scales=(None, None), biases=(None, None)):
    """The CPU packed experts op (SiLU) on `packed` = [gate_up, down] from `pack_for_cpu`."""
    gate_up, down = packed
    return ops.packed_experts(
        x,
        ids,
        weights,
        gate_up.weight,
        gate_up.scales,
        down.weight,
        down.scales,
        *biases,
        *scales,
        "silu",
        0.0,
        0.0,
        gate_up.bits,
        gate_up.group_size,
        down.group_size,
    )


@pytest.mark.parametrize(  # int8 in groups or with zero points: ATen's kernel once per group
    "bits,group,symmetric",
    [
        (4, 32, False),
        (4, 128, True),
        (4, -1, False),
        (8, -1, True),
        (8, 32, False),
        (8, 64, True),
        (8, -1, False),
    ],
)
def test_cpu_packed_ops_match_reference(seed, bits, group, symmetric):
    n, k, experts_n, inter = 64, 256, 5, 64
    assert why_not_packable(n, k, bits, group, symmetric) is None
    weight = quantized(torch.randn(n, k) / 16, bits, group, symmetric)
    packed = pack_for_cpu(*weight, bits, group)
    x, bias, scale = torch.randn(2, 3, k), torch.randn(n), torch.rand(k) + 0.5
    ref = quantized_linear(
        x.double(), weight[0], f64(weight[1]), weight[2], f64(bias), f64(scale), bits, group
    )
    out = ops.packed_linear(x, packed.weight, packed.scales, bias, scale, packed.bits, packed.group_size)
    assert out.dtype == x.dtype and rel_err(out, ref) < BF16_BOUND

    down_group = group if group == -1 else min(group, inter)
    gate_up = quantized(torch.randn(experts_n, 2 * inter, k) / 16, bits, down_group, symmetric)
    down = quantized(torch.randn(experts_n, k, inter) / 8, bits, down_group, symmetric)
    tokens = torch.randn(9, k)
    weights, ids = routing(9, experts_n, 2, dropped=True)
    ref = reference_quantized_experts(tokens, ids, weights, gate_up, down, bits, down_group)
    packed = [pack_for_cpu(*w, bits, down_group) for w in (gate_up, down)]
    out = run_packed_experts(tokens, ids, weights, packed)
    assert rel_err(out, ref) < BF16_BOUND


# one token's packed formats: int4 in groups; int8 in groups, per channel, with zero points
DECODE_FORMATS = [(4, 64, False), (8, 64, True), (8, -1, True), (8, -1, False)]


@pytest.mark.parametrize("bits,group,symmetric", DECODE_FORMATS)
@pytest.mark.parametrize("biased", [False, True])  # GPT-OSS's experts have biases
def test_cpu_packed_experts_decode_path_matches_reference(seed, biased, bits, group, symmetric):
    """One token (the decode step) takes a shorter path through the packed experts: same math."""
    k, experts_n, inter = 256, 6, 128
    gate_up = quantized(torch.randn(experts_n, 2 * inter, k) / 16, bits, group, symmetric)
    down = quantized(torch.randn(experts_n, k, inter) / 8, bits, group, symmetric)
    packed = [pack_for_cpu(*w, bits, group) for w in (gate_up, down)]
    scale, down_scale = torch.rand(k) + 0.5, torch.rand(experts_n, inter) + 0.5
    weights, ids = routing(4, experts_n, 2, dropped=True)  # token 0 has a slot on a dropped expert
    biases = (torch.randn(experts_n, 2 * inter), torch.randn(experts_n, k)) if biased else (None, None)
    for t in range(4):
        x, rows = torch.randn(1, k), slice(t, t + 1)
        ref = reference_quantized_experts(
            x, ids[rows], weights[rows], gate_up, down, bits, group, biases[1], (scale, down_scale), biases[0]
        )
        out = run_packed_experts(x, ids[rows], weights[rows], packed, (scale, down_scale), biases)
        assert out.dtype == x.dtype and rel_err(out, ref) < BF16_BOUND
    assert not run_packed_experts(x, ids[:1, :0], weights[:1, :0], packed).any()  # no slot: zeros


@pytest.mark.parametrize("bits,group,symmetric", DECODE_FORMATS)
@pytest.mark.parametrize("biased", [False, True])
def test_packed_experts_decode_body_compiles_without_graph_breaks_and_matches_the_op(
    seed, biased, bits, group, symmetric
):
    """A compiled program inlines the one-token path (`TRACEABLE_BODIES`): expert indices become
    symbolic integers, so one graph serves every routing, dropped-expert slots included, and the
    compiled code calls ATen's kernels itself, not the op."""
    k, experts_n, inter = 128, 5, 64
    gate_up = quantized(torch.randn(experts_n, 2 * inter, k) / 16, bits, group, symmetric)
    down = quantized(torch.randn(experts_n, k, inter) / 8, bits, group, symmetric)
    packed = [pack_for_cpu(*w, bits, group) for w in (gate_up, down)]
    (gu, dn), scales = packed, (torch.rand(k) + 0.5, torch.rand(experts_n, inter) + 0.5)  # AWQ's
    weights, ids = routing(4, experts_n, 2, dropped=True)
    # a dropped slot's weight never reaches the sum, not even as 0 * weight
    weights = weights.masked_fill((ids < 0) | (ids >= experts_n), float("nan"))
    biases = (torch.randn(experts_n, 2 * inter), torch.randn(experts_n, k)) if biased else (None, None)
    args = (gu.weight, gu.scales, dn.weight, dn.scales, *biases, *scales, "silu", 0.0, 0.0, bits)
    args += (gu.group_size, dn.group_size)
    assert TRACEABLE_BODIES[ops.PACKED_EXPERTS] is ops.packed_experts_body
    compiled = torch.compile(ops.packed_experts_body, fullgraph=True)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for t in range(4):
            x, rows = torch.randn(1, k), slice(t, t + 1)
            want = ops.packed_experts(x, ids[rows], weights[rows], *args)
            assert want.isfinite().all()
            # the same kernels; Inductor may keep the bf16 activation in fp32 (as in a compiled program)
            assert rel_err(compiled(x, ids[rows], weights[rows], *args), want) < 2**-9
        with torch.profiler.profile() as profile:
            compiled(x, ids[rows], weights[rows], *args)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert not [e for e in profile.events() if e.name == "moepass::packed_experts"]


@pytest.mark.parametrize("activation,biased", [("silu", False), ("clamped_swiglu", True)])
def test_float_experts_decode_body_compiles_without_graph_breaks_and_matches_the_op(seed, activation, biased):
    """Uncompressed programs inline their one-token experts the same way: one graph for every
    routing, dropped-expert slots masked out (their NaN weights never reach the sum), no op call."""
    h, experts_n, inter = 64, 5, 48
    gate_up, down = torch.randn(experts_n, 2 * inter, h) / 8, torch.randn(experts_n, h, inter) / 7
    weights, ids = routing(4, experts_n, 2, dropped=True)
    weights = weights.masked_fill((ids < 0) | (ids >= experts_n), float("nan"))
    biases = (torch.randn(experts_n, 2 * inter), torch.randn(experts_n, h)) if biased else (None, None)
    args = (gate_up, down, *biases, activation, 1.702, 7.0)
    assert TRACEABLE_BODIES[torch.ops.moepass.experts.default] is experts_body
    compiled = torch.compile(experts_body, fullgraph=True)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for t in range(4):
            x, rows = torch.randn(1, h), slice(t, t + 1)
            want = experts(x, ids[rows], weights[rows], *args)
            assert want.isfinite().all()
            assert rel_err(compiled(x, ids[rows], weights[rows], *args), want) < FP32_BOUND
        with torch.profiler.profile() as profile:
            compiled(x, ids[rows], weights[rows], *args)
        several = torch.randn(3, h)  # more tokens: the op itself
        assert torch.equal(
            experts_body(several, ids[:3], weights[:3].nan_to_num(), *args),
            experts(several, ids[:3], weights[:3].nan_to_num(), *args),
        )
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert not [e for e in profile.events() if e.name == "moepass::experts"]


def test_cpu_packing_says_why_a_format_cannot_use_aten():
    assert "divisible by 16" in why_not_packable(100, 128, 4, 32, False)
    assert "32/64/128/256" in why_not_packable(64, 128, 4, 16, False)
    assert why_not_packable(64, 128, 8, 32, False) is None  # int8 in any format: one call per group


def test_kernels_are_the_cuda_implementations_and_trace_as_single_nodes(seed):
    for name in ("quantized_linear", "experts", "quantized_experts", "sparse24_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moepass::{name}", "CUDA"), name

    weight = quantized(torch.randn(32, 64), 4, 32, True)
    values, meta = compress_24(sparse_24(16, 32))

    class Tiny(torch.nn.Module):
        def forward(self, x):
            y = torch.ops.moepass.quantized_linear(x, weight[0], weight[1], None, None, None, 4, 32)
            return torch.ops.moepass.sparse24_linear(y, values, meta, None, None, None, None, 0, -1)

    x = torch.randn(3, 64)
    exported = torch.export.export(Tiny(), (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.moepass.quantized_linear.default, SPARSE24_LINEAR]
    assert torch.allclose(exported.module()(x), Tiny()(x))


def test_unrouted_slots_contribute_nothing_on_every_path(seed):
    """Ids outside [0, E) (dropped experts, -1) add nothing, whatever the path: the float64 sum over
    the routed slots is the reference for the grouped (many slots) and the per-slot (few) paths."""
    hidden, inter, num_experts = 64, 32, 4
    gate_up = torch.randn(num_experts, 2 * inter, hidden).double() / 8
    down = torch.randn(num_experts, hidden, inter).double() / 6
    for tokens in (1, 3, 12):
        x, weights = torch.randn(tokens, hidden).double(), torch.rand(tokens, 2).double()
        ids = torch.randint(0, num_experts, (tokens, 2))
        ids[0] = torch.tensor([-1, 2])
        ids[-1, 0] = num_experts
        expected = torch.zeros_like(x)
        for t, slot in [(t, s) for t in range(tokens) for s in range(2)]:
            e = int(ids[t, slot])
            if 0 <= e < num_experts:
                g, u = (gate_up[e] @ x[t]).chunk(2)
                expected[t] += weights[t, slot] * (down[e] @ (torch.nn.functional.silu(g) * u))
        ref = experts(x, ids, weights, gate_up, down, None, None, "silu", 0.0, 0.0)
        assert rel_err(ref, expected) < FP32_BOUND, tokens  # the op sums the k slots in fp32
        out = ops.triton_experts(
            x.float(), ids, weights.float(), gate_up.float(), down.float(), None, None, "silu", 0.0, 0.0
        )
        assert rel_err(out, expected) < FP32_BOUND, tokens


def strided(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same values in a layout whose rows are not contiguous (a transposed copy seen transposed;
    a vector every other element of a wider one)."""
    if t is None:
        return None
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], -1)[:, 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_kernels_read_strided_tensors_as_their_values(seed):
    """Views (transposed weights, strided vectors) are read by value, not as contiguous memory."""
    qweight, scales, zeros = quantized(torch.randn(48, 128) / 11, 4, 32, False)
    x, bias, input_scale = torch.randn(3, 128), torch.randn(48), torch.rand(128) + 0.5
    args = (qweight, scales, zeros, bias, input_scale)
    plain = ops.triton_quantized_linear(x, *args, 4, 32)
    assert torch.equal(ops.triton_quantized_linear(x, *map(strided, args), 4, 32), plain)

    weights, ids = routing(9, 4, 2)
    dense = (
        torch.randn(4, 64, 128) / 11,
        torch.randn(4, 128, 32) / 6,
        torch.randn(4, 64),
        torch.randn(4, 128),
    )
    tail = ("silu", 0.0, 0.0)
    x = torch.randn(9, 128)
    plain = ops.triton_experts(x, ids, weights, *dense, *tail)
    assert torch.equal(ops.triton_experts(x, ids, weights, *map(strided, dense), *tail), plain)

    gate_up = quantized(torch.randn(4, 64, 128) / 11, 4, 32, True)
    down = quantized(torch.randn(4, 128, 32) / 6, 4, 32, True)
    extra = (None, torch.randn(4, 128), torch.rand(128) + 0.5, torch.rand(4, 32) + 0.5)
    quantized_args = (*gate_up, *down, *extra)
    plain = ops.triton_quantized_experts(x, ids, weights, *quantized_args, *tail, 4, 32)
    again = ops.triton_quantized_experts(x, ids, weights, *map(strided, quantized_args), *tail, 4, 32)
    assert torch.equal(again, plain)

    for tokens in (1, 9):  # one token: the kernel reads the ids directly
        weights, ids = routing(tokens, 4, 2)
        x = torch.randn(tokens, 128)
        plain = ops.triton_experts(x, ids, weights, *dense, *tail)
        every_other = [torch.stack([t, t.flip(-1)], -1)[..., 0] for t in (ids, weights)]
        assert torch.equal(ops.triton_experts(x, *every_other, *dense, *tail), plain)

    values, meta = compress_24(sparse_24(48, 128))
    sparse_args = (values, meta, None, None, torch.randn(48), None)
    for rows in (1, 12):  # the GEMV and the GEMM kernels
        x = torch.randn(rows, 128)
        plain = ops.triton_sparse24_linear(x, *sparse_args, 0, -1)
        assert torch.equal(ops.triton_sparse24_linear(x, *map(strided, sparse_args), 0, -1), plain)


@pytest.mark.parametrize("bits,group", [(0, -1), (4, 48), (8, -1)])
def test_sparse24_gemv_takes_groups_that_are_not_powers_of_two(seed, bits, group):
    n, k = 40, 96  # 48 stored values per row: the GEMV tile must still be a power of two
    values, meta = compress_24(sparse_24(n, k) / k**0.5)
    scales = zeros = None
    if bits:
        values, scales, zeros = quantized(values, bits, group if group == -1 else group // 2, False)
    x = torch.randn(1, k)
    ref = ops.sparse24_linear(
        x.double(), values if bits else values.double(), meta, f64(scales), zeros, None, None, bits, group
    )
    out = ops.triton_sparse24_linear(x, values, meta, scales, zeros, None, None, bits, group)
    assert rel_err(out, ref) < FP32_BOUND


def test_quantized_ops_refuse_arguments_that_do_not_describe_the_weight(seed):
    """A wrong K, group size, bit width or zero-point shape is named, never dequantized to another weight."""
    from moepass.ir.quantized import FormatError

    qweight, scales, zeros = quantized(torch.randn(48, 128) / 11, 4, 32, False)
    x = torch.randn(3, 128)
    cases = [
        (
            (torch.randn(3, 100), qweight, scales, zeros, None, None, 4, 32),
            r"the input has 100 features .* hold 128",
        ),
        ((x, qweight, scales, zeros, None, None, 4, 64), r"scales \[48, 4\] do not fit group_size 64"),
        ((x, qweight, scales, zeros, None, None, 4, 48), r"group_size 48 does not divide the 128 inputs"),
        ((x, qweight, scales, zeros, None, None, 3, 32), r"bits=3 is not a stored format"),
        ((x, qweight, scales, zeros[:, :1], None, None, 4, 32), r"zeros \[48, 1\] do not fit"),
    ]
    for op in (quantized_linear, ops.triton_quantized_linear):
        for args, message in cases:
            with pytest.raises(FormatError, match="moepass::quantized_linear: " + message):
                op(*args)
    gate_up = quantized(torch.randn(4, 64, 128) / 11, 4, 32, True)
    down = quantized(torch.randn(4, 128, 64) / 6, 4, 32, True)  # reads 64 inputs, not I = 32
    weights, ids = routing(5, 4, 2)
    tail = (None, None, None, None, "silu", 0.0, 0.0, 4, 32)
    for op in (quantized_experts, ops.triton_quantized_experts):
        with pytest.raises(
            FormatError, match=r"quantized_experts down: the input has 32 features .* hold 64"
        ):
            op(torch.randn(5, 128), ids, weights, *gate_up, *down, *tail)


def test_mismatched_shapes_are_refused_alike_on_every_path(seed):
    """Operands that do not fit together fail the same clear way in the reference and the kernels
    (which would otherwise read past a short tensor)."""
    from moepass.errors import MoepassError

    weights, ids = routing(5, 4, 2)
    x = torch.randn(5, 64)
    gate_up, down = torch.randn(4, 64, 64) / 8, torch.randn(4, 64, 32) / 6
    tail = ("silu", 0.0, 0.0)
    dense = (experts, ops.triton_experts)
    cases = [
        (*dense, (x, ids, weights, gate_up, down[:, :48], None, None, *tail), "down"),
        (*dense, (x, ids, weights, gate_up, down[:2], None, None, *tail), "down"),
        (*dense, (x[:, :48], ids, weights, gate_up, down, None, None, *tail), "gate_up"),
        (*dense, (x, ids, weights[:4], gate_up, down, None, None, *tail), "topk_weights"),
    ]
    quant = (quantized_experts, ops.triton_quantized_experts)
    q_gate_up, q_down = quantized(gate_up, 4, 32, True), quantized(down, 4, 32, True)
    scales = (torch.rand(64) + 0.5, torch.rand(32) + 0.5)  # down's input scale must be per expert [E, I]
    q_args = (x, ids, weights, *q_gate_up, *q_down, None, None, *scales, *tail, 4, 32)
    cases.append((*quant, q_args, "down_input_scale"))
    short = tuple(t[:2] for t in q_down[:2])
    q_args = (x, ids, weights, *q_gate_up, *short, None, None, None, None, None, *tail, 4, 32)
    cases.append((*quant, q_args, "down"))
    sparse = (ops.sparse24_linear, ops.triton_sparse24_linear)
    values, meta = compress_24(sparse_24(48, 64))
    cases.append((*sparse, (x[:, :32], values, meta, *[None] * 4, 0, -1), "the input has 32 features"))
    values, meta = compress_24(sparse_24(48, 48))
    q_values, q_scales, q_zeros = quantized(values, 8, 3, False)  # groups of 6 inputs split runs of 4
    sparse_args = (x[:, :48], q_values, meta, q_scales, q_zeros, None, None, 8, 6)
    cases.append((*sparse, sparse_args, "group_size a multiple of 4"))
    for reference, kernel, args, name in cases:
        for op in (reference, kernel):
            with pytest.raises(MoepassError, match=name):
                op(*args)


def test_mixed_dtypes_and_devices_are_refused_alike_on_every_path(seed):
    """A bf16 activation with fp32 weights or bias fails the same clear way on CPU and in the kernels;
    so does a weight on another device."""
    from moepass.errors import OpArgumentError

    weights, ids = routing(5, 4, 2)
    x = torch.randn(5, 64).bfloat16()
    gate_up, down = torch.randn(4, 64, 64) / 8, torch.randn(4, 64, 32) / 6
    for op in (experts, ops.triton_experts):
        with pytest.raises(
            OpArgumentError, match=r"moepass::experts: gate_up is torch.float32 but the input"
        ):
            op(x, ids, weights, gate_up, down.bfloat16(), None, None, "silu", 0.0, 0.0)
    # (the registered op sends meta operands to its fake implementation; capture refuses meta weights)
    with pytest.raises(OpArgumentError, match=r"moepass::experts: down is on meta but the input is on cpu"):
        ops.triton_experts(x.float(), ids, weights, gate_up, down.to("meta"), None, None, "silu", 0.0, 0.0)
    qweight, scales, zeros = quantized(torch.randn(48, 64) / 11, 4, 32, False)
    for op in (quantized_linear, ops.triton_quantized_linear):
        with pytest.raises(OpArgumentError, match=r"moepass::quantized_linear: bias is torch.float32"):
            op(x, qweight, scales.bfloat16(), zeros, torch.randn(48), None, 4, 32)
