"""Structural edits through the structure map equal module surgery on the transformers model."""

from __future__ import annotations

import copy

import pytest
import torch

import moepass
from helpers import FAMILIES, captured, hf_keep_experts, model_for
from moepass.errors import MoepassError
from moepass.hf_export import hf_checkpoint
from moepass.ir.families import FAMILIES as FAMILY_SPECS
from moepass.ir.surgery import drop_block, drop_mlp, keep_experts
from moepass.slimming import categorize


class _ZeroMLP(torch.nn.Module):
    """Reference for a dropped MLP sub-layer: h + 0 == h exactly."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden):
        zero = torch.zeros_like(hidden)
        return (zero, None) if self.returns_tuple else zero


def _reference_without(model, block: int | None = None, mlp: int | None = None):
    ref = copy.deepcopy(model)
    layers = ref.model.layers
    if mlp is not None:
        name = FAMILY_SPECS[ref.config.model_type].mlp_name
        setattr(
            layers[mlp], name, _ZeroMLP(returns_tuple=ref.config.model_type in ("gpt_oss", "llama4_text"))
        )
    if block is not None:
        del layers[block]
        for new_index, layer in enumerate(layers):
            layer.self_attn.layer_idx = new_index
        ref.config.num_hidden_layers -= 1
        if getattr(ref.config, "layer_types", None):
            del ref.config.layer_types[block]
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_block_and_mlp_match_module_surgery(family, seed):
    model, captured_program = captured(family)
    program = captured_program.fork()
    params_before = sum(p.numel() for p in program.parameters())
    drop_block(program, 1)
    drop_mlp(program, 2)
    program.verify()
    # the dropped block's cache is gone with it; indices keep the original numbering
    assert program.cache_names == ["past_key_0", "past_value_0", "past_key_2", "past_value_2"]
    assert [b.index for b in program.structure.blocks] == [0, 2]
    assert program.structure.block(2).mlp is None
    assert sum(p.numel() for p in program.parameters()) < params_before
    # the block keeps its attention's norms only (AFMoE norms the attention's input and output,
    # FlexOlmo its output), and the coverage report still finds a category for every tensor left
    kept_norms = {
        "afmoe": ["input_layernorm", "post_attention_layernorm"],
        "flex_olmo": ["post_attention_layernorm"],
    }.get(family, ["input_layernorm"])
    assert [norm.module for norm in program.structure.block(2).norms] == [
        f"model.layers.2.{n}" for n in kept_norms
    ]
    graph_module = program.graph_module
    tensors = [name for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]]
    assert set(tensors) <= categorize(program).keys()
    reference = _reference_without(_reference_without(model, mlp=2), block=1)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= 1e-5
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(program.generate(ids, max_new_tokens=12), expected)


def test_surgery_rejects_impossible_edits():
    program = captured("mixtral")[1].fork()
    drop_mlp(program, 0)
    with pytest.raises(MoepassError, match="block 0 has no MLP sub-layer left"):
        drop_mlp(program, 0)
    drop_block(program, 0)
    drop_block(program, 1)
    with pytest.raises(MoepassError, match="cannot drop block 2: it is the last block"):
        drop_block(program, 2)
    with pytest.raises(KeyError, match="block 0 is not in the program"):
        drop_block(program, 0)
    program.verify()


def _logits_match_module_surgery(program, model, keep: dict[int, list[int]]):
    """Assert the program's logits equal transformers' after module surgery keeping `keep`; returns
    (reference model, ids) for further comparisons."""
    reference = hf_keep_experts(model, keep)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= 1e-5
    return reference, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_experts_matches_module_surgery(family, seed):
    model, captured_program = captured(family)
    program = captured_program.fork()
    block = program.structure.moe_blocks[-1].index
    # one expert dropped from each group of 4, so group-limited routers keep equal groups
    keep = sorted(torch.randperm(4)[:3].tolist() + (4 + torch.randperm(4)[:3]).tolist())
    keep_experts(program, block, keep)
    program.verify()
    assert program.structure.block(block).mlp.num_experts == 6
    reference, ids = _logits_match_module_surgery(program, model, {block: keep})
    assert torch.equal(program.generate(ids, 10), reference.generate(ids, max_new_tokens=10, do_sample=False))


def test_keeping_one_expert_lowers_top_k(seed):
    model, captured_program = captured("mixtral")
    program = captured_program.fork()
    keep_experts(program, 0, [5])
    assert program.structure.block(0).mlp.top_k == 1
    _logits_match_module_surgery(program, model, {0: [5]})
    with pytest.raises(MoepassError, match=r"non-empty subset of 0\.\.7"):
        keep_experts(program, 1, [8])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_keep_experts_preserving_the_gate_matches_zeroed_experts(family, seed):
    """preserve_gate: routing unchanged, dropped experts contribute nothing (= their output zeroed)."""
    ungrouped = {"n_group": 1, "topk_group": 1} if family == "deepseek_v3" else {}
    model, captured_program = captured(family, **ungrouped)
    program = captured_program.fork()
    block = program.structure.moe_blocks[-1].index
    keep = [0, 2, 3, 5, 6, 7]
    keep_experts(program, block, keep, preserve_gate=True)
    program.verify()
    moe = program.structure.block(block).mlp
    assert (moe.num_experts, moe.router_rows, moe.preserve_gate) == (6, 8, True)
    reference = copy.deepcopy(model)
    experts = reference.model.layers[block].mlp.experts
    with torch.no_grad():
        for dropped in (1, 4):
            experts.down_proj[dropped].zero_()
            if hasattr(experts, "down_proj_bias"):
                experts.down_proj_bias[dropped].zero_()
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (program(ids) - reference(ids).logits).abs().max() <= 1e-5
    # a plain drop after it slices the router to exactly the experts left: no longer preserve_gate
    keep_experts(program, block, [0, 1, 2, 3])
    moe = program.structure.block(block).mlp
    assert (moe.num_experts, moe.router_rows, moe.preserve_gate) == (4, 4, False)
    _logits_match_module_surgery(program, model, {block: [keep[i] for i in (0, 1, 2, 3)]})


def test_preserve_gate_keeping_every_expert_leaves_the_router_unmarked():
    """Nothing dropped, nothing to preserve: the layer stays HF-exportable, even under grouped routing."""
    for family in ("mixtral", "deepseek_v3"):
        model, captured_program = captured(family)
        program = captured_program.fork()
        block = program.structure.moe_blocks[-1].index
        keep_experts(program, block, list(range(8)), preserve_gate=True)
        assert not program.structure.block(block).mlp.preserve_gate
        hf_checkpoint(program)  # refuses a router kept for dropped experts
        _logits_match_module_surgery(program, model, {block: list(range(8))})


def test_keep_experts_refuses_fewer_experts_than_sparsemixer_picks():
    """PhiMoE's sparsemixer always picks 2 experts: sliced to 1, its second pick would be NaN."""
    program = captured("phimoe")[1].fork()
    with pytest.raises(MoepassError, match="block 1: its sparsemixer routing always picks 2 experts"):
        keep_experts(program, 1, [3])
    assert program.info.edits == [] and program.structure.block(1).mlp.num_experts == 8
    keep_experts(program, 1, [3], preserve_gate=True)  # the full router still picks 2: one is dropped
    ids = torch.randint(3, 128, (2, 7))
    assert torch.isfinite(program(ids)).all()
    program.verify()


def test_group_limited_routing_needs_groups_for_the_top_k_left_after_slicing(seed):
    """top_k=8 over 2 groups, both kept (topk_group=2): keeping 2 per group lowers top_k to 4, which
    the 2 + 2 experts left hold."""
    model = model_for("deepseek_v2", seed=seed, top_k=8, n_group=2, topk_group=2)
    program = moepass.capture(model)
    block = program.structure.moe_blocks[0].index
    keep = [0, 3, 5, 6]
    keep_experts(program, block, keep)
    program.verify()
    assert program.structure.block(block).mlp.top_k == 4
    _logits_match_module_surgery(program, model, {block: keep})


def test_preserve_gate_refuses_group_limited_routing():
    program = captured("deepseek_v3")[1].fork()
    with pytest.raises(MoepassError, match="regroup the experts of its group-limited routing"):
        keep_experts(program, 1, [0, 1, 2, 4, 5, 6], preserve_gate=True)


def test_keep_experts_refuses_uneven_groups_of_group_limited_routing(seed):
    """8 experts in 2 groups of 4: keeping [0..4] would leave groups [0, 1] and [2, 3, 4] after slicing."""
    model, captured_program = captured("deepseek_v3")
    program = captured_program.fork()
    block = program.structure.moe_blocks[0].index
    moe = program.structure.block(block).mlp
    assert (moe.num_experts, moe.n_group) == (8, 2)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = program(ids)
    message = (
        rf"block {block}: group-limited routing \(n_group=2\) splits the experts into 2 equal groups; "
        r"keeping \[4, 1\] experts per group .*keep the same number of experts from each group of 4"
    )
    with pytest.raises(MoepassError, match=message):
        keep_experts(program, block, [0, 1, 2, 3, 4])
    # DeepSeek-V3 scores each group by its best 2 experts: one per group is refused too
    with pytest.raises(
        MoepassError, match=r"\(it scores each group by its best 2\), but \[1, 1\] .*at least 2 from"
    ):
        keep_experts(program, block, [0, 4])
    # nothing was edited
    assert program.structure.block(block).mlp.num_experts == 8
    assert not any(e["op"] == "keep_experts" for e in program.info.edits)
    with torch.no_grad():
        assert torch.equal(program(ids), before)
    program.verify()
    # the same number from each group keeps each expert in its group: equals module surgery
    keep = [1, 2, 5, 7]
    keep_experts(program, block, keep)
    program.verify()
    moe = program.structure.block(block).mlp
    assert (moe.num_experts, moe.n_group, moe.topk_group) == (4, 2, 1)
    _logits_match_module_surgery(program, model, {block: keep})


def test_batched_edits_generate_code_once_and_compute_what_edits_one_by_one_do(seed, monkeypatch):
    """Inside `batch_edits` the graph's code is generated at the end, not per edit (which made a pass
    over every layer quadratic in depth); a run inside the block still sees every edit so far."""
    model, captured_program = captured("mixtral")
    one_by_one, batched = captured_program.fork(), captured_program.fork()
    generated = []
    generate = batched.graph_module.recompile
    monkeypatch.setattr(batched.graph_module, "recompile", lambda: generated.append(1) or generate())
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with batched.batch_edits():
        drop_mlp(batched, 0)
        keep_experts(batched, 1, [0, 2, 5, 7])
        assert not generated
        with torch.no_grad():  # a pass calibrating between its edits
            midway = batched(ids)
        assert len(generated) == 1
        drop_block(batched, 2)
        assert len(generated) == 1
    assert len(generated) == 2
    drop_mlp(one_by_one, 0)
    keep_experts(one_by_one, 1, [0, 2, 5, 7])
    with torch.no_grad():
        assert torch.equal(midway, one_by_one(ids))
    drop_block(one_by_one, 2)
    batched.verify()
    assert batched.graph_module.code == one_by_one.graph_module.code
    with torch.no_grad():
        assert torch.equal(batched(ids), one_by_one(ids))
