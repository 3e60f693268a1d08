"""The canonical MoE ops against float64 references, and their registration as custom ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepass.ir.ops import ACTIVATIONS, ROUTING_KINDS


def _reference_experts(
    hidden, ids, weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit
):
    """Per token, per slot, in float64: the textbook definition."""
    act = ACTIVATIONS[activation]
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            h = F.linear(
                hidden[t].double(),
                gate_up[e].double(),
                None if gate_up_bias is None else gate_up_bias[e].double(),
            )
            y = F.linear(
                act(h, alpha, limit), down[e].double(), None if down_bias is None else down_bias[e].double()
            )
            out[t] += weights[t, slot].double() * y
    return out


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 2), (7, 3), (16, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_experts_op_matches_float64_reference(seed, activation, num_experts, top_k, bias):
    tokens, hidden, inter = 13, 24, 20
    x = torch.randn(tokens, hidden)
    # skewed routing: some experts get no tokens at all
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)]) % max(1, num_experts - 1)
    ids = torch.where(torch.rand(tokens, top_k) < 0.5, ids, torch.randint(0, num_experts, (tokens, top_k)))
    weights = torch.rand(tokens, top_k)
    gate_up = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter) / inter**0.5
    gate_up_bias = torch.randn(num_experts, 2 * inter) if bias else None
    down_bias = torch.randn(num_experts, hidden) if bias else None
    args = (x, ids, weights, gate_up, down, gate_up_bias, down_bias, activation, 1.702, 7.0)
    got = torch.ops.moepass.experts(*args)
    expected = _reference_experts(*args)
    rel = (got.double() - expected).norm() / expected.norm()
    assert rel < 1e-6


def _small_experts_args(tokens: int) -> tuple:
    """Arguments of a 4-expert, top-2 experts op call with hidden 8 and intermediate 3."""
    return (
        torch.randn(tokens, 8),
        torch.randint(0, 4, (tokens, 2)),
        torch.rand(tokens, 2),
        torch.randn(4, 6, 8),
        torch.randn(4, 8, 3),
        None,
        None,
        "silu",
        0.0,
        0.0,
    )


def test_experts_op_handles_zero_tokens():
    out = torch.ops.moepass.experts(*_small_experts_args(tokens=0))
    assert out.shape == (0, 8)


@pytest.mark.parametrize("kind", sorted(ROUTING_KINDS))
def test_route_op_shapes_and_weights(seed, kind):
    tokens, num_experts, top_k = 9, 8, 2
    logits = torch.randn(tokens, num_experts)
    bias = torch.randn(num_experts) * 0.1 if kind == "sigmoid_topk" else None
    weights, ids = torch.ops.moepass.route(logits, bias, kind, top_k, 2, 1, True, 1.5, 0.01)
    assert weights.shape == ids.shape == (tokens, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < num_experts)).all()
    assert (ids[:, 0] != ids[:, 1]).all(), "an expert is picked twice for one token"
    if kind in ("softmax_topk", "sigmoid_topk"):  # renormalised, then scaled
        torch.testing.assert_close(weights.sum(-1), torch.full((tokens,), 1.5))
    if kind in ("softmax_topk", "sigmoid_topk"):  # group-limited: both picks in one group of 4
        assert (ids // 4)[:, 0].eq((ids // 4)[:, 1]).all()


def test_softmax_topk_matches_float64(seed):
    logits = torch.randn(11, 6)
    weights, ids = torch.ops.moepass.route(logits, None, "softmax_topk", 3, 1, 1, False, 2.0, 0.0)
    probs = torch.softmax(logits.double(), -1)
    top, top_ids = probs.topk(3, -1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights.double(), 2.0 * top, rtol=1e-6, atol=1e-7)


def test_topk_sigmoid_picks_by_logit_where_the_sigmoid_rounds_to_one(seed):
    """Llama-4's routing: top-k on the logits, then the chosen ones' sigmoid. Logits past ~17 share one
    fp32 sigmoid (1.0), so choosing by sigmoid score would tie them; the logits still order them."""
    logits = torch.randn(11, 6)
    logits[0] = torch.tensor([20.0, 30.0, 25.0, -1.0, 0.0, 1.0])
    weights, ids = torch.ops.moepass.route(logits, None, "topk_sigmoid", 2, 1, 1, False, 1.0, 0.0)
    top, top_ids = logits.double().topk(2, -1)
    assert torch.equal(ids, top_ids) and ids[0].tolist() == [1, 2]
    torch.testing.assert_close(weights.double(), torch.sigmoid(top), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "op,args",
    [
        (
            torch.ops.moepass.route.default,
            lambda: (torch.randn(5, 8), None, "softmax_topk", 2, 1, 1, True, 1.0, 0.0),
        ),
        (torch.ops.moepass.experts.default, lambda: _small_experts_args(tokens=5)),
        (  # a transposed hidden state: the fake output is contiguous, as the real one
            torch.ops.moepass.experts.default,
            lambda: (torch.randn(8, 5).t(), *_small_experts_args(tokens=5)[1:]),
        ),
    ],
)
def test_custom_ops_pass_opcheck(op, args):
    """Schema, fake (meta) implementation and dispatch agree: the op is safe under export/compile."""
    torch.library.opcheck(op, args(), test_utils=("test_schema", "test_faketensor"))


def test_experts_op_skips_ids_beyond_its_experts(seed):
    """A router that kept rows for dropped experts sends some slots to ids >= E: they add nothing."""
    args = list(_small_experts_args(tokens=9))
    ids = torch.randint(0, 6, (9, 2))  # 4 experts given, ids 4 and 5 do not exist
    args[1] = ids
    got = torch.ops.moepass.experts(*args)
    weights = args[2].clone()
    weights[ids >= 4] = 0
    expected = _reference_experts(args[0], ids.clamp(max=3), weights, *args[3:])
    # fp32 sums against float64: torch's fp32 atol (1e-6 failed on one seed by 1.8e-6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    one = torch.ops.moepass.experts(args[0][:1], ids[:1], args[2][:1], *args[3:])  # the decode path
    # two fp32 summation orders of outputs up to ~5: each within ~1e-6 of float64, so 1e-6 apart
    # failed on one seed by 1.75e-6
    torch.testing.assert_close(one, got[:1], rtol=1e-5, atol=1e-5)
