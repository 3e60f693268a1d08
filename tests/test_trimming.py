"""Analyses against references computed on the transformers model with hooks, and Expert
Trimming transforms against module surgery on it."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import moepass
from helpers import FAMILIES, captured, hf_keep_experts, hf_mlp
from moepass.data import TokenSet
from moepass.ir.families import FAMILIES as FAMILY_SPECS
from moepass.pass_manager import PassError, PassManager
from moepass.passes.block_similarity import BlockSimilarityConfig
from moepass.passes.expert_importance import ExpertImportanceConfig
from moepass.passes.moe_similarity import MoESimilarityConfig

TOL = 1e-5


def _calibration(vocab: int, samples: int = 12, seq_len: int = 24) -> TokenSet:
    ids = torch.randint(3, vocab, (samples, seq_len + 1))
    return TokenSet(ids[:, :-1], ids[:, 1:], ["calib"] * samples)


def _analyses(program, passes, data, mode="whole") -> list:
    manager = PassManager(passes, calibration=data, calibration_mode=mode, batch_size=5)
    manager.run(program.fork())
    return list(manager.report.analyses.values())


class _Hooks:
    """Router outputs, MoE-unit boundaries and block boundaries, seen by the transformers model."""

    def __init__(self, model, data: TokenSet):
        self.router, self.unit_in, self.norm_out, self.mlp_out, self.layer_out, self.block_in = (
            {} for _ in range(6)
        )
        hooks = []
        for i, layer in enumerate(model.model.layers):
            mlp = hf_mlp(model, layer)
            router = getattr(mlp, "gate", None) if hasattr(mlp, "experts") else None
            router = getattr(mlp, "router", router)
            if router is not None and hasattr(mlp, "experts"):
                hooks.append(router.register_forward_hook(self._keep(self.router, i, lambda o: o)))
            # the MLP's pre-norm: AFMoE's `post_attention_layernorm` norms the attention's output;
            # FlexOlmo's layers norm no sub-layer's input, so their MLP reads the residual stream
            if hasattr(layer, "input_layernorm"):
                mlp_norm = getattr(layer, "pre_mlp_layernorm", layer.post_attention_layernorm)
                unit_in = mlp_norm.register_forward_pre_hook(
                    self._keep(self.unit_in, i, lambda a: a[0], pre=True)
                )
                norm_out = mlp_norm.register_forward_hook(self._keep(self.norm_out, i, lambda o: o))
            else:
                unit_in = mlp.register_forward_pre_hook(self._keep(self.unit_in, i, lambda a: a[0], pre=True))
                norm_out = mlp.register_forward_pre_hook(
                    self._keep(self.norm_out, i, lambda a: a[0], pre=True)
                )
            hooks += [unit_in, norm_out]
            hooks.append(
                mlp.register_forward_hook(
                    self._keep(self.mlp_out, i, lambda o: o[0] if isinstance(o, tuple) else o)
                )
            )
            hooks.append(
                layer.register_forward_pre_hook(self._keep(self.block_in, i, lambda a: a[0], pre=True))
            )
            hooks.append(
                layer.register_forward_hook(
                    self._keep(self.layer_out, i, lambda o: o[0] if isinstance(o, tuple) else o)
                )
            )
        with torch.no_grad():
            for rows in data.input_ids.split(5):
                model(rows, use_cache=False)
        for h in hooks:
            h.remove()

    @staticmethod
    def _keep(store, index, pick, pre=False):
        def hook(module, args, output=None):
            value = pick(args) if pre else pick(output)
            store.setdefault(index, []).append(value if isinstance(value, tuple) else value.detach())

        if pre:
            return lambda module, args: hook(module, args)
        return hook


def _mean_cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in a]).double()
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in b]).double()
    return F.cosine_similarity(x, y, dim=-1).mean().item()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_expert_importance_matches_router_outputs(family):
    model, program = captured(family)
    data = _calibration(model.config.vocab_size)
    scores = ("softmax_mass", "topk_mass", "frequency")
    results = _analyses(
        program, [("expert_importance", ExpertImportanceConfig(score=s)) for s in scores], data
    )
    hooks = _Hooks(model, data)
    for score, result in zip(scores, results, strict=True):
        for layer, outputs in hooks.router.items():
            logits = torch.cat([o[0] for o in outputs]).double()
            weights = torch.cat([o[1] for o in outputs]).double()
            ids = torch.cat([o[2] for o in outputs])
            num_experts = logits.shape[-1]
            if score == "softmax_mass":
                sigmoid = torch.sigmoid(logits)
                probs = (
                    sigmoid / sigmoid.sum(-1, keepdim=True) if family == "deepseek_v3" else logits.softmax(-1)
                )
                expected = probs.sum(0)
            elif score == "topk_mass":
                expected = torch.zeros(num_experts, dtype=torch.float64)
                expected.index_add_(0, ids.reshape(-1), weights.reshape(-1))
            else:
                expected = torch.bincount(ids.reshape(-1), minlength=num_experts).double()
            torch.testing.assert_close(result.per_layer[layer], expected / len(data), rtol=1e-5, atol=1e-8)


@torch.no_grad()
@pytest.mark.parametrize("family", ["mixtral", "llama4_text"])
def test_reap_matches_a_direct_computation(family):
    """Routing weight times the norm of the expert's output; Llama-4's weight scales the expert's
    input instead, so there it is the norm of the expert's output on the scaled input."""
    model, program = captured(family)
    data = _calibration(128)
    (result,) = _analyses(program, [("expert_importance", ExpertImportanceConfig(score="reap"))], data)
    hooks = _Hooks(model, data)
    for layer, outputs in hooks.router.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in hooks.norm_out[layer]])
        experts = hf_mlp(model, model.model.layers[layer]).experts
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if family == "llama4_text":  # the router gives (sigmoid scores, 0 where not chosen; logits)
            scores = torch.cat([o[0] for o in outputs])
            weights, ids = scores.max(-1, keepdim=True)
            x, weights = x * weights, torch.ones_like(weights)
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # stored [E, in, out]
        else:
            weights, ids = torch.cat([o[1] for o in outputs]), torch.cat([o[2] for o in outputs])
        for e in range(8):
            rows, slots = (ids == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[rows], gate_up[e]).chunk(2, -1)
            y = F.linear(F.silu(gate) * up, down[e])
            expected = (weights[rows, slots] * y.norm(dim=-1)).double().mean() if len(rows) else 0.0
            assert math.isclose(
                result.per_layer[layer][e].item(), float(expected), rel_tol=1e-4, abs_tol=1e-9
            )


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_reap_reads_quantized_experts_through_their_op(family):
    """REAP after quantization (the paper's slim-then-trim order) scores the experts the op runs:
    int8 weights score as the float ones, to int8's precision. The first MoE layer's routing sees
    float inputs; later layers' can move a near-tie token (~1/70 of an expert's tokens) to another
    expert."""
    _, program = captured(family)
    data = _calibration(program.info.vocab_size)
    config = ExpertImportanceConfig(score="reap")
    (float_scores,) = _analyses(program, [("expert_importance", config)], data)
    int8 = moepass.compress(program, [("rtn", {"bits": 8, "group_size": 16, "targets": ["experts"]})])
    (int8_scores,) = _analyses(int8, [("expert_importance", config)], data)
    first = min(float_scores.per_layer)
    for layer, scores in float_scores.per_layer.items():
        assert torch.allclose(int8_scores.per_layer[layer], scores, rtol=1e-2 if layer == first else 1e-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_similarity_matches_hooks(family):
    model, program = captured(family)
    data = _calibration(model.config.vocab_size)
    metrics = [("moe_similarity", MoESimilarityConfig(metric=m)) for m in ("S_NM", "S_M")]
    s_nm, s_m = _analyses(program, metrics, data)
    hooks = _Hooks(model, data)
    for layer in s_nm.per_layer:
        assert math.isclose(
            s_nm.per_layer[layer], _mean_cos(hooks.unit_in[layer], hooks.layer_out[layer]), rel_tol=1e-5
        )
        assert math.isclose(
            s_m.per_layer[layer],
            _mean_cos(hooks.norm_out[layer], hooks.mlp_out[layer]),
            rel_tol=1e-4,
            abs_tol=1e-6,
        )
    assert set(s_nm.per_layer) == {
        i for i, layer in enumerate(model.model.layers) if hasattr(hf_mlp(model, layer), "experts")
    }


@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_block_similarity_matches_hooks_in_both_calibration_modes(mode):
    model, program = captured("qwen3_moe", num_hidden_layers=4)
    data = _calibration(128)
    (result,) = _analyses(program, [("block_similarity", BlockSimilarityConfig())], data, mode=mode)
    hooks = _Hooks(model, data)
    h = [hooks.block_in[i] for i in range(4)] + [hooks.layer_out[3]]
    for i in range(4):
        for gap in range(1, 5 - i):
            assert math.isclose(result.gap(i, gap), _mean_cos(h[i], h[i + gap]), rel_tol=1e-5)


def test_whole_and_sequential_calibration_agree():
    _, program = captured("deepseek_v3")
    data = _calibration(128)
    passes = [
        ("expert_importance", ExpertImportanceConfig(score="reap")),
        ("moe_similarity", MoESimilarityConfig()),
    ]
    whole = _analyses(program, passes, data, "whole")
    sequential = _analyses(program, passes, data, "sequential")
    for a, b in zip(whole, sequential, strict=True):
        a, b = a.to_dict(), b.to_dict()
        assert a.keys() == b.keys()
        for layer, values in a["per_layer"].items():
            assert values == pytest.approx(b["per_layer"][layer], rel=1e-6)


def test_importance_after_an_expert_drop_is_shown_under_the_original_indices(tmp_path):
    _, program = captured("mixtral")
    recipe = [
        ("expert_drop", {"keep": 6, "selection": "global", "score": "random", "seed": 3}),
        ("expert_importance", ExpertImportanceConfig(score="frequency")),
    ]
    result = list(moepass.compress(program, recipe, calibration=_calibration(128)).report.analyses.values())[
        -1
    ]
    header, rule, *rows = result.table().splitlines()[1:]
    columns = header.split()
    assert columns == ["block", *(f"e{i}" for i in range(8))]
    decimals = {len(cell.partition(".")[2]) for row in rows for cell in row.split()[1:] if cell != "-"}
    assert len(decimals) == 1  # one format for the whole table, so its columns line up
    for row, (layer, scores) in zip(rows, result.per_layer.items(), strict=True):
        cells = dict(zip(columns, row.split(), strict=True))
        for position, original in enumerate(result.experts[layer]):
            assert float(cells[f"e{original}"]) == pytest.approx(
                float(scores[position]), abs=10.0 ** -min(decimals)
            )
        assert [c for c, v in cells.items() if v == "-"] == [
            f"e{e}" for e in range(8) if e not in result.experts[layer]
        ]
    assert result.plot(str(tmp_path / "usage.png")).endswith("usage.png")


def test_expert_drop_nothing_is_the_identity():
    model, original = captured("mixtral")
    data = _calibration(128)
    program = moepass.compress(original, [("expert_drop", {"keep": 8})], calibration=data)
    assert program.report.records[-1].modified is False and program.info.edits == []
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(program(ids), original(ids))


@pytest.mark.parametrize(
    "family,selection",
    [("mixtral", "global"), ("qwen2_moe", "layerwise"), ("phimoe", "global"), ("gpt_oss", "layerwise")],
)
def test_expert_drop_matches_module_surgery(family, selection):
    model, original = captured(family)
    data = _calibration(model.config.vocab_size)
    options = {"keep": 6, "selection": selection, "score": "softmax_mass"}
    program = moepass.compress(original, [("expert_drop", options)], calibration=data)
    program.verify()
    scores = program.report.analyses["expert_importance()"].per_layer
    if selection == "layerwise":
        expected = {i: sorted(s.topk(6).indices.tolist()) for i, s in scores.items()}
    else:
        flat = sorted((float(s[e]), i, e) for i, s in scores.items() for e in range(8))
        dropped = {(i, e) for _, i, e in flat[: 2 * len(scores)]}
        expected = {i: [e for e in range(8) if (i, e) not in dropped] for i in scores}
    kept = {edit["block"]: edit["keep"] for edit in program.info.edits}
    assert {i: kept.get(i, list(range(8))) for i in expected} == expected
    reference = hf_keep_experts(model, expected)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= TOL
    assert torch.equal(program.generate(ids, 8), reference.generate(ids, max_new_tokens=8, do_sample=False))


def test_grouped_expert_drop_keeps_groups_equal():
    model, original = captured("deepseek_v3")  # 8 experts in 2 groups
    recipe = [("expert_drop", {"keep": 6, "score": "topk_mass"})]
    program = moepass.compress(original, recipe, calibration=_calibration(128))
    for edit in program.info.edits:
        assert sum(e < 4 for e in edit["keep"]) == sum(e >= 4 for e in edit["keep"]) == 3
    reference = hf_keep_experts(model, {e["block"]: e["keep"] for e in program.info.edits})
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= TOL
    # a ratio keeps the next multiple of the groups: 40% of 16 experts in 4 groups keeps 9.6 -> 12
    model, original = captured("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2)
    program = moepass.compress(original, [("expert_drop", {"ratio": 0.4, "score": "random"})])
    for edit in program.info.edits:
        assert sorted(e // 4 for e in edit["keep"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(moepass.MoepassError, match="use a multiple of 4"):
        moepass.compress(original, [("expert_drop", {"keep": 10, "score": "random"})])


class _ZeroMLP(torch.nn.Module):
    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden):
        return (torch.zeros_like(hidden), None) if self.tuple_out else torch.zeros_like(hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_matches_skipping_the_sublayer(family):
    model, original = captured(family)
    count = min(2, len(original.structure.moe_blocks) - 1)  # DeepSeek's first layer is dense
    data = _calibration(model.config.vocab_size)
    program = moepass.compress(original, [("layer_drop", {"count": count})], calibration=data)
    scores = program.report.analyses["moe_similarity()"].per_layer
    expected = sorted(sorted(scores, key=scores.get, reverse=True)[:count])
    assert sorted(e["block"] for e in program.info.edits) == expected
    reference = copy.deepcopy(model)
    for index in expected:
        setattr(
            reference.model.layers[index],
            FAMILY_SPECS[family].mlp_name,
            _ZeroMLP(family in ("gpt_oss", "llama4_text")),
        )
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= TOL
    assert torch.equal(program.generate(ids, 8), reference.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize(("ratio", "dropped"), [(0.25, 1), (0.34, 2), (0.5, 3)])
def test_a_drop_ratio_never_removes_more_than_it_asks(ratio, dropped):
    model, original = captured("mixtral", num_hidden_layers=6)
    data = _calibration(model.config.vocab_size, samples=4)
    for pass_name in ("layer_drop", "block_drop"):
        program = moepass.compress(original, [(pass_name, {"ratio": ratio})], calibration=data)
        assert len(program.info.edits) == dropped, pass_name
    # the smallest ratio that drops one (ceil(100 / 6) / 100 = 0.17), which the test checks it does
    with pytest.raises(moepass.MoepassError, match=r"0\.1 of 6 MoE sub-layers rounds to 0 .*ratio 0\.17 "):
        moepass.compress(original, [("layer_drop", {"ratio": 0.1})], calibration=data)
    least = moepass.compress(original, [("layer_drop", {"ratio": 0.17, "metric": "random"})])
    assert len(least.info.edits) == 1
    one_left = moepass.compress(original, [("layer_drop", {"count": 5, "metric": "random"})])
    for options in ({"ratio": 0.5}, {"count": 1}):  # not "raise the ratio": nothing can be dropped
        with pytest.raises(moepass.MoepassError, match="has 1 MoE sub-layers left; one must remain"):
            moepass.compress(one_left, [("layer_drop", {**options, "metric": "random"})])
    for score in ("random", "topk_mass"):  # refused before calibration data is even asked for
        with pytest.raises(
            moepass.MoepassError, match=r"expert_drop.ratio: 0\.05 of the experts rounds to none"
        ):
            moepass.compress(original, [("expert_drop", {"ratio": 0.05, "score": score})])
    for selection in ("layerwise", "global"):
        options = {"ratio": ratio, "score": "random", "selection": selection}
        program = moepass.compress(original, [("expert_drop", options)])
        left = [b.mlp.num_experts for b in program.structure.moe_blocks]
        assert 48 - sum(left) == (6 * int(8 * ratio) if selection == "layerwise" else int(48 * ratio))


def test_a_layerwise_drop_ratio_applies_to_each_layers_own_experts():
    """After a global drop left layers with different counts, each layer loses its own share."""
    _, original = captured("mixtral", num_hidden_layers=6)
    uneven = moepass.compress(
        original, [("expert_drop", {"keep": 5, "selection": "global", "score": "random"})]
    )
    before = [b.mlp.num_experts for b in uneven.structure.moe_blocks]
    assert len(set(before)) > 1
    halved = moepass.compress(uneven, [("expert_drop", {"ratio": 0.5, "score": "random"})])
    assert [b.mlp.num_experts for b in halved.structure.moe_blocks] == [n - n // 2 for n in before]


def _without_blocks(model, blocks: list[int]):
    ref = copy.deepcopy(model)
    for index in sorted(blocks, reverse=True):
        del ref.model.layers[index]
        if getattr(ref.config, "layer_types", None):
            del ref.config.layer_types[index]
    for new, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = new
    ref.config.num_hidden_layers = len(ref.model.layers)
    return ref


@pytest.mark.parametrize(
    "family,method",
    [
        ("mixtral", "discrete"),
        ("deepseek_v2", "consecutive"),
        ("gpt_oss", "consecutive"),
    ],
)
def test_block_drop_matches_removing_blocks(family, method):
    model, original = captured(family, num_hidden_layers=5)
    data = _calibration(model.config.vocab_size)
    program = moepass.compress(original, [("block_drop", {"count": 2, "method": method})], calibration=data)
    sim = program.report.analyses["block_similarity()"]
    if method == "discrete":
        expected = sorted(sorted(range(5), key=lambda b: sim.gap(b, 1), reverse=True)[:2])
    else:
        start = max(range(4), key=lambda b: sim.gap(b, 2))
        expected = [start, start + 1]
    assert sorted(e["block"] for e in program.info.edits) == expected
    assert len(program.cache_names) == 2 * 3
    reference = _without_blocks(model, expected)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= TOL
    assert torch.equal(program.generate(ids, 10), reference.generate(ids, max_new_tokens=10, do_sample=False))


@pytest.mark.parametrize("random_seed", range(4))
def test_a_consecutive_block_drop_after_another_drop_scores_its_windows_by_their_blocks(random_seed):
    """One-shot: the similarity matrix predates the first drop, so a window of present blocks spans
    a different number of the scored model's blocks where it crosses the dropped one."""
    _, original = captured("mixtral", num_hidden_layers=6)
    recipe = [
        ("block_drop", {"count": 1, "metric": "random"}),
        ("block_drop", {"count": 2, "method": "consecutive"}),
    ]
    program = moepass.compress(original, recipe, calibration=_calibration(128))
    sim = program.report.analyses["block_similarity()"]
    dropped = program.info.edits[0]["block"]
    left = [b for b in range(6) if b != dropped]
    windows = [(left[s], left[s + 1]) for s in range(4)]  # input of the first, output of the second
    expected = max(windows, key=lambda w: sim.gap(w[0], w[1] + 1 - w[0]))
    assert tuple(e["block"] for e in program.info.edits[1:]) == expected
    program.verify()


def test_iterative_scoring_rescores_after_each_drop():
    _, original = captured("mixtral", num_hidden_layers=5)
    data = _calibration(128)
    one_shot = moepass.compress(original, [("layer_drop", {"count": 3})], calibration=data)
    iterative = moepass.compress(
        original, [("layer_drop", {"count": 3, "iterative": True})], calibration=data
    )
    analyses = [r.name for r in iterative.report.records if r.kind == "analysis"]
    assert analyses == ["moe_similarity"] * 3
    scorings = iterative.report.analyses  # every scoring is reported, each of the program it scored
    assert list(scorings) == ["moe_similarity()", "moe_similarity() #2", "moe_similarity() #3"]
    assert [len(s.per_layer) for s in scorings.values()] == [5, 4, 3]
    assert [r.name for r in one_shot.report.records if r.kind == "analysis"] == ["moe_similarity"]
    for program in (one_shot, iterative):
        program.verify()
        assert len([b for b in program.structure.blocks if b.mlp is None]) == 3


def test_an_analysis_after_an_edit_scores_the_edited_program():
    _, original = captured("mixtral", num_hidden_layers=4)
    recipe = [("layer_drop", {"count": 2}), ("moe_similarity", {})]  # one-shot: the drop's scores come first
    program = moepass.compress(original, recipe, calibration=_calibration(128))
    before, after = program.report.analyses.values()
    dropped = [e["block"] for e in program.info.edits]
    assert sorted(before.per_layer) == [0, 1, 2, 3]
    assert sorted(after.per_layer) == sorted(set(range(4)) - set(dropped))
    for layer, score in after.per_layer.items():  # the kept layers' inputs changed with the drop
        assert score != before.per_layer[layer] or layer < min(dropped)


@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_analyses_in_a_row_share_one_calibration_run_with_the_same_results(mode, monkeypatch):
    """Analyses side by side watch one forward pass over the calibration data (each used to run its
    own), and find exactly what each finds alone."""
    _, program = captured("deepseek_v3")
    data = _calibration(program.info.vocab_size)
    passes = [
        ("expert_importance", {"score": "reap"}),
        ("moe_similarity", {"metric": "S_NM"}),
        ("block_similarity", {}),
    ]
    runs, real = [], moepass.passes.base.run_calibration

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(moepass.passes.base, "run_calibration", counted)
    together = _analyses(program, passes, data, mode)
    assert len(runs) == 1
    alone = [_analyses(program, [p], data, mode)[0] for p in passes]
    assert len(runs) == 4
    for joint, single in zip(together, alone, strict=True):  # JSON: NaN (block pairs past the end) too
        assert json.dumps(joint.to_dict()) == json.dumps(single.to_dict())


def test_composed_trimming_one_shot_scores_the_original_model():
    _, original = captured("qwen2_moe", num_hidden_layers=4)
    data = _calibration(128)
    recipe = {
        "scoring": "one-shot",
        "passes": [{"expert_drop": {"keep": 6}}, {"layer_drop": {"count": 1}}, {"block_drop": {"count": 1}}],
    }
    program = moepass.compress(original, recipe, calibration=data)
    # every score computed before the first edit, in one calibration run
    assert [(r.kind, r.name) for r in program.report.records][:2] == [
        ("analysis", "expert_importance + moe_similarity + block_similarity"),
        ("transform", "expert_drop"),
    ]
    assert len(program.report.records) == 4 and len(program.report.analyses) == 3
    program.verify()
    iterative = moepass.compress(original, {**recipe, "scoring": "iterative"}, calibration=data)
    assert [r.kind for r in iterative.report.records].count("analysis") == 3
    assert iterative.report.records[0].kind == "analysis"


@pytest.mark.parametrize("selection", ["layerwise", "global"])
def test_a_second_one_shot_expert_drop_reads_the_scores_of_the_experts_left(selection):
    """One-shot scores are measured before the first drop, which renumbers the experts: the second
    drop must still drop the lowest-scored survivors, by their original index."""
    _, original = captured("mixtral", num_hidden_layers=3)
    data = _calibration(128)
    recipe = [("expert_drop", {"keep": 6}), ("expert_drop", {"keep": 4, "selection": selection})]
    program = moepass.compress(original, recipe, calibration=data)
    scores = next(iter(program.report.analyses.values())).per_layer
    first, second = (r.summary["dropped_experts"] for r in program.report.records if r.name == "expert_drop")
    survivors = {i: [e for e in range(8) if e not in first[str(i)]] for i in scores}
    if selection == "layerwise":
        expected = {
            i: sorted(sorted(left, key=lambda e: float(scores[i][e]))[:2]) for i, left in survivors.items()
        }
    else:
        ranked = sorted((float(scores[i][e]), i, e) for i, left in survivors.items() for e in left)
        expected = {i: sorted(e for _, j, e in ranked[: 2 * len(scores)] if j == i) for i in scores}
    dropped = {i: sorted(survivors[i][p] for p in second.get(str(i), [])) for i in scores}
    assert dropped == expected
    summary = program.report.records[-1].summary["dropped_original_experts"]
    assert {i: summary.get(str(i), []) for i in scores} == expected
    program.verify()


@pytest.mark.parametrize("name", ["layer_drop", "expert_drop", "expert_importance", "moe_similarity"])
def test_a_program_without_moe_layers_is_refused_by_name(name):
    """DeepSeek's first block is dense: dropping its only MoE block leaves nothing to score or drop."""
    from moepass.ir.surgery import drop_block

    _, program = captured("deepseek_v3", num_hidden_layers=2)
    dense = program.fork()
    drop_block(dense, 1)
    options = {"layer_drop": {"count": 1}, "expert_drop": {"keep": 2}}.get(name, {})
    with pytest.raises(PassError, match="the program has no MoE layer left"):
        moepass.compress(dense, [(name, options)], calibration=_calibration(128))


def test_non_finite_activations_name_the_block():
    model, _ = captured("mixtral")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(PassError, match="non-finite activations in block 1"):
        moepass.compress(broken, [("layer_drop", {"count": 1})], calibration=_calibration(128))
    # the paper recipe quantizes first, which names the tensor before any activation is computed
    with pytest.raises(PassError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight holds NaN or inf"):
        moepass.compress(broken, "paper-layer-drop", calibration=_calibration(128))


def test_a_block_drop_that_leaves_no_moe_block_warns(caplog):
    """DeepSeek's first blocks are dense: dropping the MoE ones leaves a dense model, which works but
    is no longer what moepass captures, so the user hears of it (and only then)."""
    _, original = captured("deepseek_v3")  # block 0 dense, blocks 1-2 MoE
    assert [b.index for b in original.structure.moe_blocks] == [1, 2]
    outcomes = set()
    for seed in range(8):  # random choices of 2 of the 3 blocks: some keep a MoE block, some do not
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moepass"):
            options = {"count": 2, "metric": "random", "seed": seed}
            program = moepass.compress(original, [("block_drop", options)])
        dense = not program.structure.moe_blocks
        assert ("dropping blocks [1, 2] left no MoE block" in caplog.text) == dense, seed
        outcomes.add(dense)
    assert outcomes == {True, False}
