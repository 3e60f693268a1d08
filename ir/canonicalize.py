"""Graph clean-ups applied right after export; each keeps the program's outputs bit-identical.

- re-check nodes (`_assert_*`) go: they would reject the sizes 0 and 1 the graph handles (an
  empty cache at prefill, a one-token decode step);
- `.to()` calls that change neither dtype nor device go: eager returns the input itself, so the
  tracer records later uses of the tensor as uses of the cast, and the residual stream would seem
  to flow through a norm's cast;
- transformers' `repeat_kv` copy in front of SDPA becomes SDPA's own grouped-query mode
  (`enable_gqa=True`): the same math without materialising the repeated cache every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

aten = torch.ops.aten
_ASSERTS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
_FULL = 2**63 - 1


def canonicalize(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
        elif node.target in _CASTS and _same_dtype_and_device(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default:
            _fold_repeat_kv(node)
    graph.eliminate_dead_code()


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
    """x for `x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)`, else None."""
    if not (isinstance(node, fx.Node) and node.target is aten.reshape.default):
        return None
    expand = node.args[0]
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
