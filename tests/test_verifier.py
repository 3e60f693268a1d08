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


def _rewired(program, block: int, change) -> None:
    """Apply `change(experts node, route node, nodes)` to block `block`'s MoE and refresh the program."""
    moe = program.structure.block(block).mlp
    nodes = {n.name: n for n in program.graph_module.graph.nodes}
    change(nodes[moe.experts_node], nodes[moe.route_node], nodes)
    program.graph_changed()


@pytest.mark.parametrize(
    "change,message",
    [
        (  # the routing's ids and weights swapped
            lambda experts, route, nodes: setattr(
                experts, "args", (experts.args[0], experts.args[2], experts.args[1], *experts.args[3:])
            ),
            r"block 1: experts node \w+ reads topk_ids from \w+, not the router's",
        ),
        (  # the router's logits [T, E] fed to the experts as the hidden state [T, H]
            lambda experts, route, nodes: setattr(experts, "args", (route.args[0], *experts.args[1:])),
            r"block 1: experts node \w+ reads a hidden state 8 wide; the router reads 64",
        ),
    ],
)
def test_miswired_experts_are_reported(program, change, message):
    _rewired(program, 1, change)
    with pytest.raises(IRVerificationError, match=message):
        program.verify()


@pytest.mark.parametrize(
    "change",
    [
        lambda experts: setattr(experts, "args", (experts.args[0].args[0], *experts.args[1:])),  # unscaled
        lambda experts: experts.args[0].replace_input_with(  # scaled by themselves instead
            experts.args[0].args[1], experts.args[0].args[0]
        ),
    ],
    ids=["rows", "factor"],
)
def test_llama4_experts_must_read_rows_their_router_scaled(change):
    """Llama-4's experts op weighs outputs by ones: the routing weights must be in its input rows."""
    program = captured("llama4_text")[1].fork()
    program.verify()
    _rewired(program, 1, lambda experts, route, nodes: change(experts))
    with pytest.raises(
        IRVerificationError, match=r"block 1: experts node \w+ weighs its outputs by ones, but its input rows"
    ):
        program.verify()


def test_quantized_expert_scales_that_do_not_fit_are_reported(program):
    import moepass

    quantized = moepass.compress(program, [("rtn", {"bits": 4, "group_size": 16})])
    moe = quantized.structure.block(1).mlp
    experts = quantized.graph_module.get_submodule(moe.gate_up.rpartition(".")[0])
    experts.down_proj_scales = torch.nn.Parameter(experts.down_proj_scales[..., :1].clone())
    quantized.graph_changed()
    with pytest.raises(
        IRVerificationError,
        match=r"block 1: model\.layers\.1\.mlp\.experts\.down_proj_qweight: scales \[8, 64, 1\] do not fit",
    ):
        quantized.verify()
