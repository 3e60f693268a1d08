"""Graph clean-ups applied right after export; each keeps the program's outputs bit-identical.

- re-check nodes (`_assert_*`) go: they would reject the sizes 0 and 1 the graph handles (an
  empty cache at prefill, a one-token decode step);
- inference dropout goes: it is the identity, yet dead-code elimination keeps it as a random op;
- `.to()` calls that change neither dtype nor device go: eager returns the input itself, so the
  tracer records later uses of the tensor as uses of the cast, and the residual stream would seem
  to flow through a norm's cast;
- transformers' `repeat_kv` copy in front of SDPA becomes SDPA's own grouped-query mode
  (`enable_gqa=True`): the same math without materialising the repeated cache every step;
- sizes read off some layer's cache (the tracer picks any tensor with the right symbolic size: the
  batch from `past_value_1`, the past length from `past_key_0`) are re-read from `input_ids` and
  `attention_mask`, so each cache input is used only by its own block and drops with it.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

aten = torch.ops.aten
_ASSERTS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_FULL = 2**63 - 1


def canonicalize(graph: fx.Graph) -> None:
    _anchor_cache_sizes(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
        elif (node.target in _CASTS and _same_dtype_and_device(node, node.args[0])) or _is_noop_dropout(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default:
            _fold_repeat_kv(node)
    remove_dead_nodes(graph)


def remove_dead_nodes(graph: fx.Graph) -> None:
    """Dead-code elimination that also removes unused SDPA and dropout nodes.

    torch.fx keeps every op tagged as random (SDPA is, for its dropout argument) even when nothing
    reads it; in an inference graph only ops that mutate their inputs have effects worth keeping.
    """
    for node in reversed(graph.nodes):
        if node.op in ("call_function", "call_method", "get_attr") and not node.users and not _mutates(node):
            graph.erase_node(node)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return node.target in fx.node._side_effectful_functions


def _anchor_cache_sizes(graph: fx.Graph) -> None:
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    reads = [n for n in graph.nodes if n.target is aten.sym_size.int and n.args[0].name.startswith("past_")]
    if not reads:
        return
    last = list(placeholders.values())[-1]
    with graph.inserting_after(last):
        batch = graph.call_function(aten.sym_size.int, (placeholders["input_ids"], 0))
    with graph.inserting_after(batch):
        new_tokens = graph.call_function(aten.sym_size.int, (placeholders["input_ids"], 1))
    with graph.inserting_after(new_tokens):
        all_tokens = graph.call_function(aten.sym_size.int, (placeholders["attention_mask"], 1))
    with graph.inserting_after(all_tokens):
        past = graph.call_function(operator.sub, (all_tokens, new_tokens))
    for read in reads:
        cache, dim = read.args
        if dim == 0:
            read.replace_all_uses_with(batch)
        elif dim == 2:
            read.replace_all_uses_with(past)
        else:  # heads and width are static
            read.replace_all_uses_with(int(cache.meta["val"].shape[dim]))
        graph.erase_node(read)


def _is_noop_dropout(node: fx.Node) -> bool:
    """Inference dropout is the identity, but DCE keeps it (a random op) and all that feeds it."""
    if node.target is not aten.dropout.default:
        return False
    _, p, train = node.args
    return p == 0 or not train


def _val(node) -> Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, Tensor) else None


def _same_dtype_and_device(cast: fx.Node, source) -> bool:
    out, src = _val(cast), _val(source)
    return out is not None and src is not None and (out.dtype, out.device) == (src.dtype, src.device)


def _fold_repeat_kv(sdpa: fx.Node) -> None:
    if sdpa.kwargs.get("enable_gqa") or len(sdpa.args) > 7:
        return
    key, value = _repeat_kv_source(sdpa.args[1]), _repeat_kv_source(sdpa.args[2])
    if key is None or value is None:
        return
    sdpa.args = (sdpa.args[0], key, value, *sdpa.args[3:])
    sdpa.kwargs = {**sdpa.kwargs, "enable_gqa": True}


def _repeat_kv_source(node) -> fx.Node | None:
    """x for `x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)`, else None.

    After functionalization the reshape reads `_unsafe_view(clone(expand(...)))`.
    """
    if not (isinstance(node, fx.Node) and node.target in _RESHAPES):
        return None
    expand = node.args[0]
    if isinstance(expand, fx.Node) and expand.target is aten.clone.default:
        expand = expand.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default):
        return None
    source, unsqueezed = expand.args[0], 0
    while isinstance(source, fx.Node):
        if source.target is aten.slice.Tensor and _is_full_slice(source):
            source = source.args[0]
        elif source.target is aten.unsqueeze.default and source.args[1] == 2:
            source, unsqueezed = source.args[0], unsqueezed + 1
        else:
            break
    src, out = _val(source), _val(node)
    if unsqueezed != 1 or src is None or out is None or src.dim() != 4 or out.dim() != 4:
        return None
    heads, groups = src.shape[1], out.shape[1]
    if not (isinstance(heads, int) and isinstance(groups, int) and groups % heads == 0):
        return None
    return source


def _is_full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    _, _, start, end, step = args[:5]
    return start in (0, None) and end in (None, _FULL) and step in (1, None)
