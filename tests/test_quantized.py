"""Quantized formats: packing round trips, a numpy dequantizer as reference, and the quantized ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moepass.errors import OpArgumentError
from moepass.ir.quant_ops import QUANTIZED_EMBEDDING, QUANTIZED_EXPERTS, QUANTIZED_LINEAR
from moepass.ir.quantized import FormatError, QuantFormat, dequantize, empty_packed, pack, quantize, unpack


def numpy_dequantize(qweight, scales, zeros, bits, group_size):
    """Independent reference: reads the documented layout byte by byte."""
    q = qweight.numpy()
    if bits == 4:
        codes = np.empty((*q.shape[:-1], q.shape[-1] * 2), dtype=np.int64)
        codes[..., 0::2], codes[..., 1::2] = q & 0xF, q >> 4
    else:
        codes = q.astype(np.int64)
    k = codes.shape[-1]
    group = k if group_size == -1 else group_size
    g = k // group
    if zeros is None:
        zero = np.full(scales.shape, 2 ** (bits - 1))
    elif bits == 4:
        z = zeros.numpy()
        zero = np.empty((*z.shape[:-1], z.shape[-1] * 2), dtype=np.int64)
        zero[..., 0::2], zero[..., 1::2] = z & 0xF, z >> 4
        zero = zero[..., :g]
    else:
        zero = zeros.numpy().astype(np.int64)
    idx = np.arange(k) // group
    return (codes - zero[..., idx]) * scales.double().numpy()[..., idx]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    n=st.integers(1, 9),
    groups=st.integers(1, 5),
    group=st.sampled_from([2, 8, 32]),
    symmetric=st.booleans(),
    experts=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    data=st.data(),
)
def test_pack_unpack_and_dequantize_match_the_numpy_reference(
    bits, n, groups, group, symmetric, experts, dtype, data
):
    k = groups * group
    codes = torch.randint(0, 2**bits, ((experts,) if experts else ()) + (n, k))
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    seed = data.draw(st.integers(0, 2**31 - 1))
    weight = torch.randn(codes.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    fmt = QuantFormat(bits, group, symmetric)
    qweight, scales, zeros = quantize(weight, fmt)
    assert qweight.dtype == torch.uint8 and qweight.shape[-1] == (k // 2 if bits == 4 else k)
    assert scales.shape[-1] == groups and (zeros is None) == symmetric and scales.dtype == dtype
    ours = dequantize(qweight, scales, zeros, bits, group, dtype=torch.float64)
    np.testing.assert_allclose(ours.numpy(), numpy_dequantize(qweight, scales, zeros, bits, group), rtol=1e-6)
    # round-to-nearest: every weight within half a step of its group's stored scale (plus clipping at
    # the ends), also where the scale is stored in bf16/fp16
    step = scales.double().repeat_interleave(group, dim=-1)
    error = (ours - weight.double()).abs()
    assert (error <= 0.5 * step + 1e-6).float().mean() > 0.97
    assert (error <= 1.0 * step * (2 if symmetric else 1) + 1e-6).all()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, -1), (8, 64)])
def test_rtn_error_shrinks_with_bits(bits, group):
    weight = torch.randn(64, 128)
    qweight, scales, zeros = quantize(weight, QuantFormat(bits, group))
    error = (dequantize(qweight, scales, zeros, bits, group) - weight).norm() / weight.norm()
    assert error < {4: 0.15, 8: 0.01}[bits]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_small_range_groups_get_their_own_scale_in_every_dtype(dtype):
    """Weights of a few 1e-4 (int8 scales ~1e-6): the stored scale is the group's range over the codes,
    rounded up to `dtype` (one unit; fp16 stores it as a subnormal), not a floor above it."""
    weight = (torch.randn(32, 128) * 3e-4).to(dtype)
    fmt = QuantFormat(8, 64, symmetric=False)
    _, scales, _ = quantize(weight, fmt)
    groups = weight.double().view(32, 2, 64)
    ideal = (groups.amax(-1).clamp_min(0) - groups.amin(-1).clamp_max(0)) / 255
    assert (scales.double() >= ideal * (1 - 2**-20)).all()  # the range's fp32 rounding
    assert (scales.double() <= ideal * (1 + 2**-7) + 2**-24).all()  # bf16 keeps 8 bits; fp16 subnormals


@pytest.mark.parametrize(
    "fmt,message",
    [
        (QuantFormat(3, 32), "3-bit quantization is not supported"),
        (
            QuantFormat(4, 48),
            "group size 48 does not divide its 128 inputs; use a divisor of 128 such as 128",
        ),
        # GPT-OSS's width under a g128 recipe
        (
            QuantFormat(4, 128),
            "group size 128 does not divide its 2880 inputs; use a divisor of 2880 such as 64",
        ),
    ],
)
def test_format_errors_name_the_tensor(fmt, message):
    width = 2880 if "2880" in message else 128
    with pytest.raises(FormatError, match=f"layers.0.q_proj.weight: {message}"):
        quantize(torch.randn(8, width), fmt, name="layers.0.q_proj.weight")


@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, False), (4, 64, True), (8, 32, False), (8, -1, True)]
)
def test_quantized_linear_matches_float64(bits, group, symmetric, seed):
    x, weight, bias = torch.randn(5, 7, 128), torch.randn(48, 128), torch.randn(48)
    input_scale = torch.rand(128) + 0.5
    qweight, scales, zeros = quantize(weight, QuantFormat(bits, group, symmetric))
    got = QUANTIZED_LINEAR(x, qweight, scales, zeros, bias, input_scale, bits, group)
    w64 = torch.tensor(numpy_dequantize(qweight, scales, zeros, bits, group))
    expected = F.linear(x.double() * input_scale.double(), w64, bias.double())
    assert ((got.double() - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_quantized_experts_match_float64(bits, group, seed):
    experts, hidden, inter, tokens, top_k = 5, 64, 64, 11, 2
    x = torch.randn(tokens, hidden)
    ids = torch.randint(0, experts + 1, (tokens, top_k))  # id 5: a dropped expert, contributes nothing
    weights = torch.rand(tokens, top_k)
    gate_up, down = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    fmt = QuantFormat(bits, group)
    gu, dn = quantize(gate_up, fmt), quantize(down, fmt)
    gu_in, dn_in = torch.rand(hidden) + 0.5, torch.rand(experts, inter) + 0.5
    got = QUANTIZED_EXPERTS(
        x, ids, weights, *gu, *dn, None, None, gu_in, dn_in, "silu", 0.0, 0.0, bits, group
    )
    gu64 = torch.tensor(numpy_dequantize(*gu, bits, group))
    dn64 = torch.tensor(numpy_dequantize(*dn, bits, group))
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for slot in range(top_k):
            e = int(ids[t, slot])
            if e == experts:
                continue
            gate, up = F.linear(x[t].double() * gu_in.double(), gu64[e]).chunk(2)
            expected[t] += weights[t, slot] * F.linear(F.silu(gate) * up * dn_in[e].double(), dn64[e])
    assert ((got.double() - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, False), (4, -1, True), (8, 32, False)])
def test_quantized_embedding_matches_float64(bits, group, symmetric, seed):
    table = torch.randn(50, 64, dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (3, 7))
    codes = quantize(table, QuantFormat(bits, group, symmetric))
    got = QUANTIZED_EMBEDDING(ids, *codes, bits, group)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 7, 64)
    expected = torch.tensor(numpy_dequantize(*codes, bits, group))[ids]
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=0)  # one bf16 rounding
    with pytest.raises(OpArgumentError, match="quantized_embedding: token ids must be int32 or int64"):
        QUANTIZED_EMBEDDING(ids.float(), *codes, bits, group)


@pytest.mark.parametrize("fmt", [QuantFormat(4, 16), QuantFormat(4, 48, True), QuantFormat(8, -1)])
def test_load_placeholders_have_the_stored_shapes(fmt):
    """What loading installs before an artifact's tensors replace it: quantize's shapes, uncomputed."""
    weight = torch.randn(3, 10, 96, dtype=torch.bfloat16)
    got, want = empty_packed(weight, fmt), quantize(weight, fmt)
    assert [None if t is None else (t.shape, t.dtype) for t in got] == [
        None if t is None else (t.shape, t.dtype) for t in want
    ]


def test_a_group_error_suggests_a_size_every_weight_of_the_op_takes():
    with pytest.raises(
        FormatError, match=r"use a divisor of 32 \(to fit its op's other weights too\) such as 32"
    ):
        QuantFormat(4, 48).groups(64, "experts.gate_up", op_inputs=32)


def test_quantized_ops_pass_opcheck():
    """Schema and fake implementations agree with the real ones: safe under export and compile."""
    checks = ("test_schema", "test_faketensor")
    qw, s, z = quantize(torch.randn(16, 64), QuantFormat(4, 32))
    torch.library.opcheck(
        QUANTIZED_LINEAR, (torch.randn(3, 64), qw, s, z, None, None, 4, 32), test_utils=checks
    )
    fmt = QuantFormat(4, 16)
    gu, dn = quantize(torch.randn(4, 32, 64), fmt), quantize(torch.randn(4, 64, 16), fmt)
    for hidden in (torch.randn(5, 64), torch.randn(64, 5).t()):  # the fake output is contiguous too
        routing = (hidden, torch.randint(0, 4, (5, 2)), torch.rand(5, 2))
        args = (*routing, *gu, *dn, None, None, None, None, "silu", 0.0, 0.0, 4, 16)
        torch.library.opcheck(QUANTIZED_EXPERTS, args, test_utils=checks)
    torch.library.opcheck(
        QUANTIZED_EMBEDDING, (torch.randint(0, 16, (2, 3)), qw, s, z, 4, 32), test_utils=checks
    )
