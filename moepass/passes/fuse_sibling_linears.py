"""`fuse_sibling_linears`: linears that read the same input become one matmul (lowering stage).

Attention's q/k/v (MLA's q_a/kv_a, a shared expert's gate/up) read the same hidden state. One matmul
over their stacked weights, then a split, is the same arithmetic with one kernel call and one
activation cast instead of three: at decode, per-call cost is what these small matmuls are made of
(BENCHMARKS.md). Quantized weights stack in moepass's stored layout (codes, scales and zero points
are per output row), so this runs before `cpu_packed_weights` (ATen's packed int4 layout tiles rows
in blocks of 64 and does not stack); dense weights stack before `kn_weight_layout` stores them
input-major. Siblings fuse only when their formats, input scales and present tensors agree and
nothing else reads their weights (tied weights stay); routers never fuse.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from moepass.ir.ops import ROUTE
from moepass.ir.quant_ops import QUANTIZED_LINEAR
from moepass.ir.structure import op_args, tensor_at
from moepass.ir.surgery import delete_if_unused, install_tensor, swap_node

from .base import PassConfig, TransformPass, TransformResult, register_pass

_LINEAR = torch.ops.aten.linear.default
_SPLIT = torch.ops.aten.split_with_sizes.default
# op -> (tensor arguments stacked along output rows: name -> dim), every other argument must match
_STACKED = {
    _LINEAR: {"weight": 0, "bias": 0},
    QUANTIZED_LINEAR: {"qweight": 0, "scales": 0, "zeros": 0, "bias": 0},
}
_WEIGHT = {_LINEAR: "weight", QUANTIZED_LINEAR: "qweight"}  # the argument whose rows are the outputs


@dataclass(frozen=True)
class FuseSiblingLinearsConfig(PassConfig):
    """No options: every fusable group is fused."""


@register_pass
class FuseSiblingLinears(TransformPass):
    name = "fuse_sibling_linears"
    stage = "lower"
    config_class = FuseSiblingLinearsConfig

    def run(self, program, context) -> TransformResult:
        graph_module = program.graph_module
        groups = _sibling_groups(graph_module)
        for group in groups:
            _fuse(graph_module, group)
        if groups:
            program.graph_changed()
        return TransformResult(bool(groups), {"groups": len(groups), "linears": sum(map(len, groups))})


def _sibling_groups(graph_module: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of 2+ fusable linears reading the same input, in graph order."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        key = _fusion_key(graph_module, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    return [group for group in groups.values() if len(group) > 1]


def _fusion_key(graph_module: fx.GraphModule, node: fx.Node) -> tuple | None:
    if node.op != "call_function" or node.target not in _STACKED:
        return None
    if any(user.target is ROUTE for user in node.users):
        return None  # a router stays a linear of its own: the structure map and trimming passes find it
    args = op_args(node)
    stacked = _STACKED[node.target]
    for name in stacked:
        value = args.get(name)
        if value is not None and (value.op != "get_attr" or len(value.users) != 1):
            return None  # computed or shared (tied) weights stay as they are
    weight = tensor_at(graph_module, args[_WEIGHT[node.target]].target)
    rest = []
    for name, value in args.items():
        if name in stacked:
            continue
        if isinstance(value, fx.Node) and value.op == "get_attr":  # input scales: equal values fuse
            value = tuple(tensor_at(graph_module, value.target).flatten().tolist())
        rest.append((name, value))
    present = tuple(args.get(name) is not None for name in stacked)
    return (node.target, present, weight.dtype, weight.shape[1:], tuple(rest))


def _fuse(graph_module: fx.GraphModule, group: list[fx.Node]) -> None:
    graph = graph_module.graph
    first, args = group[0], op_args(group[0])
    weights = [op_args(node)[_WEIGHT[first.target]].target for node in group]
    owners = [fqn.rpartition(".")[0] for fqn in weights]
    parent = owners[0].rpartition(".")[0]
    prefix = f"{parent}.fused_{'_'.join(o.rpartition('.')[2] for o in owners)}".lstrip(".")
    sizes = [tensor_at(graph_module, fqn).shape[0] for fqn in weights]
    stored = []
    with graph.inserting_before(first):
        fused_args = dict(args)
        for name, dim in _STACKED[first.target].items():
            if args.get(name) is None:
                continue
            targets = [op_args(node)[name].target for node in group]
            stored += targets
            stacked = torch.cat([tensor_at(graph_module, t) for t in targets], dim=dim)
            fused_args[name] = install_tensor(graph_module, f"{prefix}.{name}", stacked)
        fused = graph.call_function(first.target, tuple(fused_args.values()))
        split = graph.call_function(_SPLIT, (fused, sizes, -1))
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for node, part in zip(group, parts, strict=True):
        swap_node(node, part)
    for fqn in stored:
        delete_if_unused(graph_module, fqn)
