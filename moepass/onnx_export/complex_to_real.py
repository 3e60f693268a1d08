"""Complex arithmetic rewritten on real (re, im) pairs: ONNX has no complex tensors.

DeepSeek-V2 rotates queries and keys by viewing them as complex numbers and multiplying them by
polar(1, θ). Every complex value becomes a real tensor with a trailing axis of 2 — exactly the
memory layout `view_as_complex` / `view_as_real` convert between — so those views vanish, `polar`
becomes (r cos θ, r sin θ) and a complex product its four real ones. An op on complex values with no
rule here is refused by name rather than exported wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from moepass.errors import MoepassError

aten = torch.ops.aten


def complex_to_real(graph_module: fx.GraphModule) -> int:
    """Rewrite the graph's complex values in place; returns how many complex nodes were replaced."""
    graph = graph_module.graph
    pairs: dict[fx.Node, fx.Node] = {}  # complex node -> the real node holding its (re, im) pairs
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if not _is_complex(node) and not any(arg in pairs for arg in node.all_input_nodes):
            continue
        rule = _RULES.get(node.target)
        if rule is None:
            raise MoepassError(
                f"node {node.name} ({node.target}) computes with complex numbers, which ONNX cannot "
                "express, and moepass has no real-valued rewrite for it"
            )
        with graph.inserting_before(node):
            real = rule(graph, node, lambda arg: pairs.get(arg, arg))
        if _is_complex(node):
            pairs[node] = real
        else:  # back to real values (view_as_real): its users read the pairs directly
            node.replace_all_uses_with(real)
            graph.erase_node(node)
    for node in reversed(list(pairs)):  # users first
        graph.erase_node(node)
    if pairs:
        graph.lint()
        graph_module.recompile()
    return len(pairs)


def _is_complex(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_complex()


Pair = Callable[[object], object]


def _polar(graph: fx.Graph, node: fx.Node, pair: Pair) -> fx.Node:
    magnitude, angle = node.args
    re = graph.call_function(aten.mul.Tensor, (magnitude, graph.call_function(aten.cos.default, (angle,))))
    im = graph.call_function(aten.mul.Tensor, (magnitude, graph.call_function(aten.sin.default, (angle,))))
    return graph.call_function(aten.stack.default, ([re, im], -1))


def _as_pairs(graph: fx.Graph, node: fx.Node, pair: Pair) -> fx.Node:
    return node.args[0]  # view_as_complex reads [..., 2] pairs: the same tensor


def _from_pairs(graph: fx.Graph, node: fx.Node, pair: Pair) -> fx.Node:
    return pair(node.args[0])  # view_as_real gives the pairs back


def _unsqueeze(graph: fx.Graph, node: fx.Node, pair: Pair) -> fx.Node:
    value, dim = node.args
    return graph.call_function(aten.unsqueeze.default, (pair(value), dim if dim >= 0 else dim - 1))


def _slice(graph: fx.Graph, node: fx.Node, pair: Pair) -> fx.Node:
    value, dim, *bounds = node.args
    return graph.call_function(aten.slice.Tensor, (pair(value), dim if dim >= 0 else dim - 1, *bounds))


def _mul(graph: fx.Graph, node: fx.Node, pair: Pair) -> fx.Node:
    a, b = node.args
    complex_a, complex_b = (isinstance(x, fx.Node) and _is_complex(x) for x in (a, b))
    if complex_a and complex_b:
        ar, ai, br, bi = (
            graph.call_function(aten.select.int, (pair(x), -1, part)) for x in (a, b) for part in (0, 1)
        )

        def product(x, y):
            return graph.call_function(aten.mul.Tensor, (x, y))

        re = graph.call_function(aten.sub.Tensor, (product(ar, br), product(ai, bi)))
        im = graph.call_function(aten.add.Tensor, (product(ar, bi), product(ai, br)))
        return graph.call_function(aten.stack.default, ([re, im], -1))
    value, factor = (a, b) if complex_a else (b, a)
    if isinstance(factor, fx.Node):  # a real tensor scales both parts
        factor = graph.call_function(aten.unsqueeze.default, (factor, -1))
    return graph.call_function(aten.mul.Tensor, (pair(value), factor))


_RULES = {
    aten.polar.default: _polar,
    aten.view_as_complex.default: _as_pairs,
    aten.view_as_real.default: _from_pairs,
    aten.unsqueeze.default: _unsqueeze,
    aten.slice.Tensor: _slice,  # Llama-4 indexes its rotation [:, :, None, :]
    aten.mul.Tensor: _mul,
}
