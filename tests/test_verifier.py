"""The verifier catches broken programs and names the block and tensor at fault."""

from __future__ import annotations

import pytest
import torch

from helpers import captured
from moepass.errors import IRVerificationError


@pytest.fixture
def program():
    return captured("deepseek_v3")[1].fork()  # forks edit their own modules and graph


def _expert_module(program, block):
    return program.graph_module.get_submodule(f"model.layers.{block}.mlp.experts")


def test_expert_count_mismatch_is_reported(program):
    experts = _expert_module(program, 1)
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[:-1].clone())
    program.graph_changed()
    with pytest.raises(
        IRVerificationError,
        match="block 1: MoE tensors disagree on the number of experts: "
        "router_weight=8, correction_bias=8, gate_up=7, down=8",
    ):
        program.verify()


def test_top_k_larger_than_expert_count_is_reported(program):
    moe = program.structure.block(2).mlp
    route = next(n for n in program.graph_module.graph.nodes if n.name == moe.route_node)
    args = list(route.args)
    args[3] = 9
    route.args = tuple(args)
    program.graph_changed()
    with pytest.raises(
        IRVerificationError, match="block 2: top_k=9 must be between 1 and the number of experts"
    ):
        program.verify()


def test_group_limited_routing_needs_divisible_expert_count(program):
    moe = program.structure.block(1).mlp
    gm = program.graph_module
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    experts = gm.get_submodule(moe.gate_up.rsplit(".", 1)[0])
    router = gm.get_submodule(moe.router_weight.rsplit(".", 1)[0])
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[keep].clone())
    experts.down_proj = torch.nn.Parameter(experts.down_proj[keep].clone())
    router.weight = torch.nn.Parameter(router.weight[keep].clone())
    router.e_score_correction_bias = router.e_score_correction_bias[keep].clone()
    program.graph_changed()
    with pytest.raises(IRVerificationError, match="block 1: 7 experts do not split into n_group=2"):
        program.verify()


def test_missing_cache_input_is_reported(program):
    graph = program.graph_module.graph
    placeholder = next(n for n in graph.nodes if n.name == "past_value_0")
    placeholder.name = "stray_input"
    program.graph_changed()
    with pytest.raises(IRVerificationError) as error:
        program.verify()
    assert "past_key_i, past_value_i pairs" in str(error.value)
    assert "block 0: no past_key_0/past_value_0 cache inputs" in str(error.value)
