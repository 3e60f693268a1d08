"""Expert Slimming: quantization and pruning as graph rewrites, on every family."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import moepass
from helpers import FAMILIES, captured, rel_error
from moepass.artifact import load, save
from moepass.calibration import BlockwiseRunner, InputStats, _graph_inputs
from moepass.data import TokenSet
from moepass.evaluate import model_size
from moepass.ir.quant_ops import QUANTIZED_EMBEDDING, QUANTIZED_EXPERTS, QUANTIZED_LINEAR
from moepass.ir.quantized import QuantFormat, dequantize, quantize
from moepass.ir.stages import observing_stage, split_stages
from moepass.ir.structure import tensor_at
from moepass.ir.surgery import set_tensor
from moepass.pass_manager import PassError
from moepass.passes import ConfigError
from moepass.passes.awq import fake_quantize, linear_loss, output_error, search_scale
from moepass.passes.gptq import gptq_quantize
from moepass.passes.sparsegpt import sparsegpt_prune
from moepass.passes.wanda import wanda_prune
from moepass.pruning import PruneConfig, magnitude_prune
from moepass.slimming import DEFAULT_TARGETS, expert_blocks, linear_targets


def _calibration(vocab: int = 128, samples: int = 16) -> TokenSet:
    ids = torch.randint(3, vocab, (samples, 33))
    return TokenSet(ids[:, :-1], ids[:, 1:], ["x"] * samples)


def _correlated_inputs(tokens: int, features: int) -> torch.Tensor:
    """Strongly correlated input channels: what GPTQ's and SparseGPT's error compensation exploits."""
    latent = features // 4  # channels are mixtures of a few sources, plus a little noise of their own
    mixing = torch.randn(latent, features) / latent**0.5
    sources = torch.randn(tokens, latent) * torch.linspace(0.2, 3, latent)
    return sources @ mixing + 0.05 * torch.randn(tokens, features)


def _outlier_inputs(tokens: int, features: int) -> torch.Tensor:
    """Input channels of very different sizes: what Wanda's |W| * ||x|| exploits."""
    return torch.randn(tokens, features) * torch.logspace(-1, 1, features)[torch.randperm(features)]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # DeepSeek: a dense block first
@pytest.mark.parametrize("trimmed", [False, True])
def test_stages_built_one_at_a_time_run_the_program(family, trimmed):
    """A calibrated pass asks for one block's stage at a time (`only`), which must be exactly that
    stage of the full split; run in order, the stages compute the program's logits (also once a
    block and a MoE sub-layer are gone)."""
    model, program = captured(family, num_hidden_layers=4)
    if trimmed:
        drops = [
            ("block_drop", {"count": 1, "metric": "random", "seed": 1}),
            ("layer_drop", {"count": 1, "metric": "random"}),
        ]
        program = moepass.compress(program, drops)
    assert len(program.structure.blocks) == (3 if trimmed else 4)
    gm = program.graph_module
    observed = {program.structure.blocks[1].attention_residual}
    stages = split_stages(gm, observe=observed)
    assert [s.name for s in stages] == [
        "prelude",
        *[f"block {b.index}" for b in program.structure.blocks],
        "tail",
    ]
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    state = _graph_inputs(program, ids)
    for stage in stages:
        (alone,) = split_stages(gm, observe=observed, only=stage.name)
        assert (alone.block, alone.inputs, alone.outputs) == (stage.block, stage.inputs, stage.outputs)
        assert alone.module.code == stage.module.code
        state.update(zip(alone.outputs, alone.module(*[state[n] for n in alone.inputs]), strict=True))
    assert next(iter(observed)) in stages[2].outputs
    with torch.no_grad():
        assert torch.equal(state[stages[-1].outputs[0]], program(ids))
    with pytest.raises(ValueError, match="no stage 'block 99'"):
        split_stages(gm, only="block 99")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # Qwen2-MoE: shared experts
def test_observing_stage_computes_what_it_observes_and_no_more(family):
    """The statistics and scale searches observe nodes before the experts: the stage they run must
    give the full stage's values of those nodes without computing the experts op."""
    _, program = captured(family, num_hidden_layers=2)
    gm, block = program.graph_module, program.structure.blocks[1]
    attention_out = next(n for n in gm.graph.nodes if n.name == block.attention_residual).args[1].name
    observe = {attention_out, block.mlp.route_ids}
    (full,) = split_stages(gm, observe=observe, only="block 1")
    part = observing_stage(gm, "block 1", observe)
    assert sorted(part.outputs) == sorted(observe)
    assert not [n for n in part.module.graph.nodes if n.target is torch.ops.moepass.experts.default]
    assert [n for n in full.module.graph.nodes if n.target is torch.ops.moepass.experts.default]
    state = _graph_inputs(program, torch.randint(3, 128, (2, 7)))
    (prelude, block0) = split_stages(gm, only="prelude") + split_stages(gm, only="block 0")
    for stage in (prelude, block0):
        state.update(zip(stage.outputs, stage.module(*[state[n] for n in stage.inputs]), strict=True))
    with torch.no_grad():
        ours = dict(zip(part.outputs, part.module(*[state[n] for n in part.inputs]), strict=True))
        theirs = dict(zip(full.outputs, full.module(*[state[n] for n in full.inputs]), strict=True))
    for name in observe:
        assert torch.equal(ours[name], theirs[name]), name
    with pytest.raises(ValueError, match="block 1 computes no node named nowhere"):
        observing_stage(gm, "block 1", {"nowhere"})


def test_gptq_beats_rtn_on_correlated_inputs(seed):
    x = _correlated_inputs(2048, 128)
    weight = torch.randn(64, 128) / 128**0.5
    fmt = QuantFormat(4, 32)
    hessian = 2 * x.double().T @ x.double() / x.shape[0]
    reference = F.linear(x, weight)
    for act_order in (False, True):
        ours = dequantize(*gptq_quantize(weight, hessian, fmt, act_order=act_order), 4, 32)
        baseline = dequantize(*quantize(weight, fmt, "w"), 4, 32)
        gptq_error = (F.linear(x, ours) - reference).pow(2).mean()
        rtn_error = (F.linear(x, baseline) - reference).pow(2).mean()
        assert gptq_error < 0.8 * rtn_error, (act_order, gptq_error, rtn_error)


def test_awq_scales_protect_outlier_input_channels(seed):
    """LLM-like activations (a few channels 30x the rest): AWQ's scale search must cut the output
    error of plain rounding by more than half — the effect it exists for."""
    x = torch.randn(2048, 128)
    x[:, torch.randperm(128)[:4]] *= 30
    weight = torch.randn(64, 128) / 128**0.5
    fmt = QuantFormat(4, 32)
    reference = F.linear(x, weight)

    def error(candidates):
        return (F.linear(x, candidates[0]) - reference).pow(2).mean().item()

    s = search_scale(x, [weight], error, fmt, grid=20)
    awq = dequantize(*quantize(weight * s, fmt, "w"), 4, 32) / s
    baseline = dequantize(*quantize(weight, fmt, "w"), 4, 32)
    assert error([awq]) < 0.5 * error([baseline])


@pytest.mark.parametrize("tokens", [300, 40])  # more tokens than a group's width (Gram matrices), fewer
@pytest.mark.parametrize("group", [16, 64])
def test_awq_output_error_is_the_mean_squared_output_change(seed, tokens, group):
    """AWQ scores candidates through Gram matrices when the inputs are narrower than the token count;
    the scores must be the plain mean squared output errors, per (row, group) and per weight."""
    x = torch.randn(tokens, 64) * torch.linspace(0.1, 3, 64)
    weights = [torch.randn(24, 64), torch.randn(8, 64)]
    candidates = [w + 0.05 * torch.randn_like(w) for w in weights]
    d = (candidates[0] - weights[0]).double().view(24, -1, group)
    xg = x.double().view(tokens, -1, group)
    expected = torch.einsum("tgk,ngk->tng", xg, d).pow(2).mean(0)
    got = output_error(x, group)(candidates[0] - weights[0])
    assert got.shape == (24, 64 // group)
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    pairs = zip(candidates, weights, strict=True)
    whole = sum(F.linear(x.double(), c.double() - w.double()).pow(2).mean() for c, w in pairs)
    assert linear_loss(x, weights)(candidates) == pytest.approx(whole.item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_stats_sum_many_batches_like_float64(dtype, seed):
    """Each batch is summed in float32, the running totals in float64: after 64 batches of large,
    correlated activations the Hessian and the squares match float64 sums of the same inputs."""
    batches = [(_correlated_inputs(512, 96) * 30).to(dtype) for _ in range(64)]
    stats = InputStats(96, device="cpu")
    for x in batches:
        stats.add(x.view(8, 64, 96))
    x = torch.cat(batches).double()
    assert stats.tokens == 64 * 512
    torch.testing.assert_close(stats.mean_hessian(), 2 * x.T @ x / len(x), rtol=1e-6, atol=1e-6 * 900)
    torch.testing.assert_close(stats.mean_squares(), x.pow(2).mean(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "inputs,method",
    [
        (_outlier_inputs, wanda_prune),
        (_correlated_inputs, sparsegpt_prune),
        (_outlier_inputs, sparsegpt_prune),
    ],
)
def test_calibrated_pruning_beats_magnitude(inputs, method, seed):
    x = inputs(2048, 128)
    weight = torch.randn(64, 128) / 128**0.5
    stats = InputStats(128, hessian=True, device="cpu")
    stats.add(x)
    reference = F.linear(x, weight)
    for pattern in ("unstructured", "2:4"):
        config = PruneConfig(pattern=pattern)

        def error(pruned, config=config):
            return (F.linear(x, pruned) - reference).pow(2).mean()

        assert error(method(weight, stats, config, "w")) < 0.9 * error(magnitude_prune(weight, config, "w"))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_nm_equals_column_by_column_obs(pattern, seed):
    """SparseGPT's blocked, lazily updated N:M pruning against the plain OBS sweep written from the
    paper: one column at a time, each group of m columns masked from the weights updated so far."""
    x = _correlated_inputs(1024, 256)
    weight = torch.randn(32, 256) / 256**0.5
    stats = InputStats(256, hessian=True, device="cpu")
    stats.add(x)
    h = stats.hessian / stats.tokens
    h += 0.01 * h.diag().mean() * torch.eye(256, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    kept, m = map(int, pattern.split(":"))
    w = weight.double().clone()
    for i in range(256):
        if i % m == 0:
            score = w[:, i : i + m].pow(2) / hinv.diag()[i : i + m].pow(2)
            zeroed = torch.zeros_like(score, dtype=torch.bool).scatter_(
                1, score.topk(m - kept, dim=1, largest=False).indices, True
            )
        error = torch.where(zeroed[:, i % m], w[:, i], 0.0) / hinv[i, i]
        w[:, i:] -= error.unsqueeze(1) * hinv[i, i:]
        w[zeroed[:, i % m], i] = 0.0  # exactly: the update leaves rounding residue
    ours = sparsegpt_prune(weight, stats, PruneConfig(pattern=pattern), "w")
    assert torch.equal(ours == 0, w.float() == 0)
    assert torch.allclose(ours, w.float(), atol=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_masks_have_the_requested_shape(pattern, seed):
    x = torch.randn(256, 64)
    stats = InputStats(64, hessian=True, device="cpu")
    stats.add(x)
    weight = torch.randn(24, 64)
    config = PruneConfig(sparsity=0.375, pattern=pattern)
    for pruned in (
        magnitude_prune(weight, config, "w"),
        wanda_prune(weight, stats, config, "w"),
        sparsegpt_prune(weight, stats, config, "w"),
    ):
        zeros = pruned == 0
        if pattern == "unstructured":
            assert (zeros.sum(1) == int(64 * 0.375)).all(), "sparsity must equal the ratio in every row"
        else:
            n_kept, m = map(int, pattern.split(":"))
            assert (zeros.view(24, -1, m).sum(-1) == m - n_kept).all(), f"exactly {m - n_kept} zeros per {m}"


@pytest.mark.parametrize("cols", [384, 1000])
@pytest.mark.parametrize("ratio", [0.3, 0.005])
def test_sparsegpt_zeroes_as_many_per_row_as_the_whole_row_methods(cols, ratio, seed):
    """SparseGPT chooses its mask 128 columns at a time; rounding each block's share on its own lost
    up to a weight per block (and pruned nothing below 1/128)."""
    stats = InputStats(cols, hessian=True, device="cpu")
    stats.add(torch.randn(2 * cols, cols))
    weight = torch.randn(8, cols)
    config = PruneConfig(sparsity=ratio)
    expected = int(cols * ratio)  # floor: 115 of 384 at 0.3, 1 at 0.005
    for pruned in (
        magnitude_prune(weight, config, "w"),
        wanda_prune(weight, stats, config, "w"),
        sparsegpt_prune(weight, stats, config, "w"),
    ):
        assert ((pruned == 0).sum(1) == expected).all()


def _rounded(program, group_size: int):
    """The float program with every default int4 target replaced by its rounded values: the reference
    of RTN. An op's weights with rows shorter than the group share the largest group dividing them."""
    rounded, get = program.fork(), program.graph_module.get_parameter
    ops = [[t.weight] for t in linear_targets(program, DEFAULT_TARGETS)]
    for index in expert_blocks(program, DEFAULT_TARGETS):
        ops.append([program.structure.block(index).mlp.gate_up, program.structure.block(index).mlp.down])
    for names in ops:
        inputs = [get(name).shape[-1] for name in names]
        fmt = QuantFormat(4, group_size if group_size <= min(inputs) else math.gcd(*inputs))
        for name in names:
            set_tensor(rounded.graph_module, name, fake_quantize(get(name), fmt))
    return rounded


# families whose layers norm each sub-layer's output: their residual stream is all compressed layers'
# output, not partly the embeddings', so the same rounding moves their random models' logits ~3x more
POST_NORMED = ("afmoe", "flex_olmo")


@pytest.mark.parametrize("family", FAMILIES)
def test_four_bit_covers_every_routed_expert_parameter(family):
    model, program = captured(family)
    quantized = moepass.compress(program, [("rtn", {"bits": 4, "group_size": 16})])
    quantized.verify()
    coverage = quantized.report.records[-1].summary["coverage"]
    assert coverage["routed experts"]["share"] == 1.0
    assert coverage["routed experts"]["bytes"] < 0.4 * coverage["routed experts"]["bytes_before"]
    assert "router" not in {c for c, row in coverage.items() if row["compressed"]}, "the router stays precise"
    for block in quantized.structure.moe_blocks:
        assert block.mlp.quantization == {"bits": 4, "group_size": 16, "layout": "quantized"}
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        expected = _rounded(program, 16)(ids)
        assert (quantized(ids) - expected).norm() / expected.norm() < 1e-4
        bound = 0.6 if family in POST_NORMED else 0.4  # random weights: 0.2-0.45 where others lose <= 0.13
        assert (expected - model(ids).logits).norm() / model(ids).logits.norm() < bound, (
            "int4 keeps the model"
        )


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
def test_groups_longer_than_a_row_fit_the_row(family):
    """A g128 recipe on a model whose rows are shorter (MLA's kv_b_proj reads 16 inputs; experts read
    64 and 48) quantizes instead of failing: each op's group becomes the largest dividing its rows."""
    _, program = captured(family)
    quantized = moepass.compress(program, [("rtn", {"group_size": 128})])
    quantized.verify()
    groups = {n.args[-1] for n in quantized.graph_module.graph.nodes if n.target == QUANTIZED_LINEAR}
    assert max(groups) < 128 and len(groups) > 1
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        expected = _rounded(program, 128)(ids)
        assert (quantized(ids) - expected).norm() / expected.norm() < 1e-4


# one calibrated method per family (a family added without one fails here, by name)
METHODS = {
    "mixtral": "gptq",
    "qwen2_moe": "awq",
    "qwen3_moe": "wanda",
    "olmoe": "sparsegpt",
    "deepseek_v2": "magnitude",
    "deepseek_v3": "gptq",
    "glm4_moe": "awq",
    "glm4_moe_lite": "gptq",
    "dots1": "magnitude",
    "minimax_m2": "sparsegpt",
    "ernie4_5_moe": "wanda",
    "hunyuan_v1_moe": "gptq",
    "granitemoe": "awq",
    "exaone_moe": "sparsegpt",
    "afmoe": "awq",
    "flex_olmo": "gptq",
    "solar_open": "wanda",
    "llama4_text": "awq",
    "phimoe": "awq",
    "gpt_oss": "wanda",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_slimming_runs_on_every_family_and_stays_verified(family):
    method = METHODS[family]
    model, program = captured(family)
    options = {"group_size": 16} if method in ("gptq", "awq") else {"pattern": "2:4"}
    options["targets"] = (
        ["experts", "shared_experts", "attention"]
        if method in ("gptq", "awq")
        else ["experts", "shared_experts"]
    )
    slim = moepass.compress(program, [(method, options)], calibration=_calibration())
    slim.verify()
    ops = {n.target for n in slim.graph_module.graph.nodes}
    if method in ("gptq", "awq"):
        assert QUANTIZED_EXPERTS in ops and QUANTIZED_LINEAR in ops
        other = slim.report.records[-1].summary["coverage"].get("other", {"bytes": 0, "bytes_before": 0})
        assert other["bytes"] == other["bytes_before"], "AWQ's input scales count with their layer"
    else:
        for block in slim.structure.moe_blocks:
            weight = slim.graph_module.get_parameter(block.mlp.gate_up)
            assert (weight.view(*weight.shape[:-1], -1, 4) == 0).sum(-1).eq(2).all()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        error = (slim(ids) - model(ids).logits).norm() / model(ids).logits.norm()
    assert error < (0.7 if family in POST_NORMED else 0.5)


def test_the_report_covers_the_program_the_passes_left():
    """Slim, then drop layers: the slimming pass's own coverage predates the drop; the report's
    final coverage is the result's, the same as dropping first, and adds up to its size."""
    _, program = captured("mixtral")
    drop = ("layer_drop", {"count": 2, "metric": "random", "seed": 0})
    slim_first = moepass.compress(program, [("rtn", {}), drop])
    trim_first = moepass.compress(program, [drop, ("rtn", {})])
    final = slim_first.report.final_coverage
    assert final == trim_first.report.final_coverage
    assert sum(row["bytes"] for row in final.values()) == model_size(slim_first)[1]
    assert sum(row["bytes_before"] for row in final.values()) == model_size(program)[1]
    at_rtn = slim_first.report.records[-2].summary["coverage"]["routed experts"]["params"]
    assert at_rtn == 3 * final["routed experts"]["params"]  # 3 MoE layers when rtn ran, 1 left
    assert "Compression coverage of the result" in str(slim_first.report)


def test_coverage_bytes_add_up_when_a_tied_lm_head_is_quantized():
    """Quantizing a head tied to the embeddings stores a new copy: the report must show it."""
    _, program = captured("mixtral", tie_word_embeddings=True)
    quantized = moepass.compress(program, [("rtn", {"group_size": 16, "targets": ["lm_head"]})])
    coverage = quantized.report.records[-1].summary["coverage"]
    assert sum(row["bytes_before"] for row in coverage.values()) == model_size(program)[1]
    assert sum(row["bytes"] for row in coverage.values()) == model_size(quantized)[1]
    assert coverage["lm_head"]["bytes_before"] == 0 < coverage["lm_head"]["bytes"]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_embeddings_opt_in_quantizes_the_table_and_only_it(family):
    """`targets: [embeddings]` stores the table as int4 codes, looked up row by row: the program
    equals the float one with the table replaced by its rounded values, and the report covers it."""
    _, program = captured(family)
    quantized = moepass.compress(program, [("rtn", {"group_size": 16, "targets": ["embeddings"]})])
    quantized.verify()
    ops = [n.target for n in quantized.graph_module.graph.nodes]
    assert QUANTIZED_EMBEDDING in ops and torch.ops.aten.embedding.default not in ops
    assert QUANTIZED_LINEAR not in ops and QUANTIZED_EXPERTS not in ops
    coverage = quantized.report.records[-1].summary["coverage"]
    assert coverage["embeddings"]["share"] == 1.0
    assert coverage["embeddings"]["bytes"] < 0.2 * coverage["embeddings"]["bytes_before"]
    rounded, table = program.fork(), program.structure.embeddings.params[0]
    weight = program.graph_module.get_parameter(table)
    set_tensor(rounded.graph_module, table, fake_quantize(weight, QuantFormat(4, 16)))
    ids = torch.randint(0, program.info.vocab_size, (2, 9))
    with torch.no_grad():
        assert rel_error(quantized(ids), rounded(ids)) < 1e-5
        assert rel_error(quantized(ids), program(ids)) > 1e-3  # the table did change


def test_a_tied_table_shares_the_quantized_head_codes(caplog):
    """Embeddings and LM head are one tensor in a tied model: quantized together, both ops read one
    copy of the codes (the artifact shrinks); the table alone is a second copy, said in a warning."""
    _, program = captured("mixtral", tie_word_embeddings=True)
    config = {"group_size": 16, "targets": ["lm_head", "embeddings"]}
    both = moepass.compress(program, [("rtn", config)])
    both.verify()
    reads = {
        n.target: [a.target for a in n.all_input_nodes if a.op == "get_attr"]
        for n in both.graph_module.graph.nodes
        if n.target in (QUANTIZED_LINEAR, QUANTIZED_EMBEDDING)
    }
    assert (
        reads[QUANTIZED_EMBEDDING]
        == reads[QUANTIZED_LINEAR]
        == ["lm_head.qweight", "lm_head.scales", "lm_head.zeros"]
    )
    table = program.graph_module.get_parameter("lm_head.weight")
    assert model_size(both)[1] < model_size(program)[1] - 0.7 * table.numel() * table.element_size()
    head_only = moepass.compress(program, [("rtn", {"group_size": 16, "targets": ["lm_head"]})])
    ids = torch.randint(0, program.info.vocab_size, (2, 9))
    with torch.no_grad():  # the head's logits are unchanged by sharing; the inputs now go through codes too
        rounded = program.fork()
        set_tensor(
            rounded.graph_module,
            "lm_head.weight",
            fake_quantize(program.graph_module.get_parameter("lm_head.weight"), QuantFormat(4, 16)),
        )
        assert rel_error(both(ids), rounded(ids)) < 1e-5 < rel_error(head_only(ids), rounded(ids))
    with caplog.at_level(logging.WARNING, logger="moepass"):
        table_only = moepass.compress(program, [("rtn", {"group_size": 16, "targets": ["embeddings"]})])
    assert "the embedding table is tied to the LM head (one tensor, lm_head.weight)" in caplog.text
    assert model_size(table_only)[1] > model_size(program)[1]
    coverage = table_only.report.records[-1].summary["coverage"]
    assert sum(row["bytes"] for row in coverage.values()) == model_size(table_only)[1]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_calibrated_method_says_it_quantized_the_lm_head_round_to_nearest(method, caplog):
    """The head reads the final norm, which block-by-block calibration never observes: it gets RTN,
    said in a warning and in the summary, not silently."""
    _, program = captured("mixtral")
    config = {"group_size": 16, "targets": ["attention", "lm_head", "embeddings"]}
    with caplog.at_level(logging.WARNING, logger="moepass"):
        slim = moepass.compress(program, [(method, config)], calibration=_calibration())
    assert slim.report.records[-1].summary["rtn_linears"] == ["lm_head.weight"]
    assert f"{method}: lm_head.weight is quantized round-to-nearest" in caplog.text
    rtn = moepass.compress(program, [("rtn", {"group_size": 16, "targets": ["lm_head", "embeddings"]})])
    for codes in ("lm_head.qweight", "model.embed_tokens.qweight"):  # a lookup table has no statistics
        assert torch.equal(*(p.graph_module.get_buffer(codes) for p in (slim, rtn)))


def test_awq_input_scales_count_with_the_experts_not_their_biases():
    """GPT-OSS's experts module holds biases too: the input scales AWQ adds beside the expert weights
    are expert bytes (the biases' row stays as it was)."""
    _, program = captured("gpt_oss")
    config = {"group_size": 16, "targets": ["experts"]}
    slim = moepass.compress(program, [("awq", config)], calibration=_calibration(samples=4))
    coverage = slim.report.records[-1].summary["coverage"]
    assert coverage["biases"]["bytes"] == coverage["biases"]["bytes_before"]
    assert any(n.endswith("gate_up_input_scale") for n, _ in slim.graph_module.named_parameters())


def test_awq_scales_are_moe_aware():
    _, program = captured("qwen2_moe")
    slim = moepass.compress(
        program,
        [("awq", {"group_size": 16, "targets": ["experts", "shared_experts"]})],
        calibration=_calibration(),
    )
    for block in slim.structure.moe_blocks:
        prefix = block.mlp.gate_up.rpartition(".")[0]
        shared_scale = slim.graph_module.get_parameter(f"{prefix}.gate_up_input_scale")
        down_scales = slim.graph_module.get_parameter(f"{prefix}.down_input_scale")
        assert shared_scale.shape == (64,)  # one scale for every expert's gate/up (all MoE tokens)
        assert down_scales.shape == (block.mlp.num_experts, 48)  # one per expert (its routed tokens)
        shared_gate = f"{block.mlp.module}.shared_experts.gate_proj"
        assert torch.equal(slim.graph_module.get_parameter(f"{shared_gate}.input_scale"), shared_scale)
        # the shared experts' ranges are clipped like every other projection's, not just rounded
        weight = program.graph_module.get_parameter(f"{shared_gate}.weight")
        plain_scales = quantize(weight / shared_scale, QuantFormat(4, 16), shared_gate)[1]
        assert (tensor_at(slim.graph_module, f"{shared_gate}.scales") < 0.99 * plain_scales).any()


@pytest.mark.parametrize("order", ["slim-then-trim", "trim-then-slim"])
def test_slimming_composes_with_trimming(order, tmp_path):
    model, program = captured("mixtral", num_hidden_layers=4)
    slim = [("gptq", {"group_size": 16})]
    trim = [("expert_drop", {"keep": 6}), ("layer_drop", {"count": 1})]
    recipe = slim + trim if order == "slim-then-trim" else trim + slim
    result = moepass.compress(program, recipe, calibration=_calibration())
    result.verify()
    assert sum(b.mlp is None for b in result.structure.blocks) == 1
    assert all(b.mlp.num_experts == 6 and b.mlp.quantization for b in result.structure.moe_blocks)
    save(result, tmp_path / "artifact")
    reloaded = load(tmp_path / "artifact", lower=False)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (reloaded(ids) - result(ids)).abs().max() <= 1e-5
    assert torch.equal(reloaded.generate(ids, 6), result.generate(ids, 6))


@pytest.mark.parametrize("method", ["awq", "sparsegpt"])
def test_save_load_round_trip_of_slimmed_programs(method, tmp_path):
    _, program = captured("deepseek_v3")
    options = (
        {"group_size": 8, "targets": ["experts", "shared_experts", "dense_mlp"]} if method == "awq" else {}
    )
    slim = moepass.compress(program, [(method, options)], calibration=_calibration())
    save(slim, tmp_path / "a")
    reloaded = load(tmp_path / "a", lower=False)
    assert reloaded.info.pruned == slim.info.pruned
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (reloaded(ids) - slim(ids)).abs().max() <= 1e-5


def test_gptq_calibrates_mla_up_projections_on_the_quantized_low_rank_outputs():
    """True-sequential inside MLA attention: q_b_proj is quantized after q_a_proj, with the Hessian of
    what the quantized q_a_proj feeds it — not of the float model's activations."""
    _, program = captured("deepseek_v3")
    data = _calibration()
    slim = moepass.compress(
        program, [("gptq", {"group_size": 16, "targets": ["attention"]})], calibration=data
    )
    target = next(t for t in linear_targets(program, ("attention",)) if t.role == "q_b_proj")
    weight = program.graph_module.get_parameter(target.weight)

    def codes_from(source) -> torch.Tensor:
        hessian = InputStats(weight.shape[-1], weight.device, squares=False)
        for values in BlockwiseRunner(source, data).observe(target.block, {target.input}):
            hessian.add(values[target.input])
        return gptq_quantize(weight, hessian.mean_hessian(), QuantFormat(4, 16))[0]

    stored = slim.graph_module.get_buffer(target.weight.rpartition(".")[0] + ".qweight")
    assert torch.equal(stored, codes_from(slim))
    assert not torch.equal(stored, codes_from(program)), "the float activations give other codes"


def test_starved_experts_fall_back_and_are_listed(caplog):
    _, program = captured("mixtral")
    slim = moepass.compress(
        program, [("gptq", {"group_size": 16, "min_tokens": 10**6})], calibration=_calibration()
    )
    fallbacks = slim.report.records[-1].summary["rtn_fallback_experts"]
    assert {int(k): sorted(v) for k, v in fallbacks.items()} == {
        b.index: list(range(8)) for b in program.structure.moe_blocks
    }
    # said where a user looks: in the printed report and as a warning while it runs
    note = "gptq: 24 experts got fewer than min_tokens routed calibration tokens and fell back to "
    note += "round-to-nearest"
    assert note + " (layer 0: 0, 1, 2, 3, 4, 5, 6, 7; layer 1:" in str(slim.report)
    assert note in caplog.text
    # after an expert drop, by the ids the checkpoint gives the experts left, not their new positions
    recipe = [
        ("expert_drop", {"keep": 6, "score": "random", "seed": 0}),
        ("wanda", {"sparsity": 0.5, "min_tokens": 10**6}),
    ]
    slim = moepass.compress(program, recipe, calibration=_calibration())
    fallbacks = slim.report.records[-1].summary["magnitude_fallback_experts"]
    dropped = slim.report.records[-2].summary["dropped_original_experts"]
    assert {int(k): sorted(v) for k, v in fallbacks.items()} == {
        b.index: sorted(set(range(8)) - set(dropped[str(b.index)])) for b in program.structure.moe_blocks
    }


@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_expert_hessians_over_the_budget_are_gathered_in_groups_with_the_same_result(
    method, monkeypatch, caplog
):
    """DeepSeek-V3-sized layers cannot hold every expert's float64 Hessian at once: over the budget,
    experts are taken a few at a time (one calibration pass each), with bit-identical weights."""
    _, program = captured("mixtral")
    recipe = [(method, {"group_size": 16} if method == "gptq" else {"sparsity": 0.5})]
    calibration = _calibration()
    whole = moepass.compress(program, recipe, calibration=calibration)
    moe = program.structure.moe_blocks[0].mlp
    down_width = program.graph_module.get_parameter(moe.down).shape[-1]
    monkeypatch.setattr("moepass.slimming.HESSIAN_BUDGET_BYTES", 3 * down_width**2 * 8)
    with caplog.at_level(logging.INFO, logger="moepass"):
        grouped = moepass.compress(program, recipe, calibration=calibration)
    assert "one calibration pass each" in caplog.text
    want, got = whole.graph_module.state_dict(), grouped.graph_module.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)


@pytest.mark.parametrize(
    "passes,error,message",
    [
        ([("rtn", {"bits": 3})], ConfigError, "bits: 3 is not allowed; choose one of 4, 8"),
        ([("rtn", {"group_size": 48})], PassError, "group size 48 does not divide its 64 inputs"),
        ([("wanda", {"sparsity": 1.0})], ConfigError, "would remove every weight"),
        ([("gptq", {"targets": ["routers"]})], ConfigError, "targets: 'routers' is not allowed"),
        ([("gptq", {"damp": 0.0})], ConfigError, "damp: 0.0 is out of range; must be > 0"),
        # a second compression of quantized weights would skip them yet report the pass as done:
        # refused when the recipe loads, before the first pass runs
        (
            [("rtn", {"group_size": 16}), ("magnitude", {"pattern": "2:4"})],
            ConfigError,
            r"passes\[1\]: pass magnitude would compress experts after rtn quantized them",
        ),
        (
            [("rtn", {"group_size": 16, "targets": ["attention"]}), ("gptq", {"targets": ["attention"]})],
            ConfigError,
            r"passes\[1\]: pass gptq would compress attention after rtn quantized them",
        ),
    ],
)
def test_bad_slimming_requests(passes, error, message):
    _, program = captured("mixtral")
    before = [n.name for n in program.graph_module.graph.nodes]
    with pytest.raises(error, match=message):
        moepass.compress(program, passes, calibration=_calibration())
    assert [n.name for n in program.graph_module.graph.nodes] == before


@pytest.mark.parametrize(
    "first,second,message",
    [
        (
            "rtn",
            ("magnitude", {"pattern": "2:4"}),
            r"layer 0's routed experts are already stored as .*prune before",
        ),
        (
            "rtn",
            ("gptq", {"targets": ["attention"]}),
            r"q_proj.*\(attention, layer 0\) is already compressed",
        ),
    ],
)
def test_compressing_a_quantized_program_again_is_refused_by_tensor(first, second, message):
    """An artifact quantized earlier, compressed further: only the program knows, so the pass says."""
    _, program = captured("mixtral")
    quantized = moepass.compress(program, [(first, {"group_size": 16})])
    with pytest.raises(PassError, match=message):
        moepass.compress(quantized, [second], calibration=_calibration())


def test_nm_pattern_that_does_not_fit_and_non_finite_weights_name_the_tensor():
    config = PruneConfig(pattern="4:8")
    with pytest.raises(
        ConfigError,
        match=r"q_proj.weight: 4:8 sparsity needs the input dimension to be a "
        r"multiple of 8, got 12",
    ):
        magnitude_prune(torch.randn(4, 12), config, "layers.0.self_attn.q_proj.weight")
    model, program = captured("olmoe")
    broken = program.fork()
    moe = broken.structure.moe_blocks[0].mlp
    weight = broken.graph_module.get_parameter(moe.gate_up).detach().clone()
    weight[0, 0, 0] = float("nan")
    from moepass.ir.surgery import set_tensor

    set_tensor(broken.graph_module, moe.gate_up, weight)
    for passes in ([("rtn", {"group_size": 16})], [("magnitude", {})]):
        with pytest.raises(PassError, match=f"{moe.gate_up}.*NaN or inf"):
            moepass.compress(broken, passes, calibration=_calibration())


def test_a_sparsity_that_zeroes_nothing_is_refused_before_any_change():
    """0.012 zeroes one of the experts' 96 down inputs per row but none of their 64 gate/up inputs: the
    narrowest target names the smallest ratio that prunes every target."""
    refusal = r"sparsity {} zeroes none of the 64 weights in a row; use at least 0\.0157$"
    with pytest.raises(ConfigError, match=r"^w: " + refusal.format(0.01)):
        magnitude_prune(torch.randn(4, 64), PruneConfig(sparsity=0.01), "w")
    _, program = captured("mixtral")
    before = {n: p.detach().clone() for n, p in program.graph_module.named_parameters()}
    for method in ("magnitude", "wanda", "sparsegpt"):
        with pytest.raises(PassError, match=r"experts\.gate_up_proj: " + refusal.format(0.012)):
            moepass.compress(program, [(method, {"sparsity": 0.012})], calibration=_calibration())
    assert all(torch.equal(p, before[n]) for n, p in program.graph_module.named_parameters())
    assert not program.info.pruned


@pytest.mark.parametrize(
    "family,passes",
    [
        (
            "deepseek_v3",
            [("gptq", {"group_size": 16, "act_order": True, "targets": ["experts", "attention"]})],
        ),
        ("qwen2_moe", [("awq", {"group_size": 16, "targets": ["experts", "shared_experts", "attention"]})]),
        ("gpt_oss", [("wanda", {"targets": ["experts", "attention"]})]),
        ("olmoe", [("sparsegpt", {"pattern": "2:4"})]),
        ("mixtral", [("expert_drop", {"keep": 4, "score": "reap"}), ("rtn", {"group_size": 16})]),
    ],
)
def test_passes_create_their_tensors_on_the_programs_device(family, passes):
    """A CUDA program must be compressed with its statistics on the GPU. Under a meta default device,
    any tensor a pass creates without `device=` lands on meta and fails against the CPU program,
    as a CPU-made Hessian would fail against a CUDA program's activations."""
    _, program = captured(family)
    tokens = _calibration()
    expected = moepass.compress(program, passes, calibration=tokens)
    with torch.device("meta"):
        result = moepass.compress(program, passes, calibration=tokens)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(result(ids), expected(ids))
