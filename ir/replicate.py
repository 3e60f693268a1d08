"""Capture of deep models: trace a few decoder layers, copy the rest.

torch.export's time grows with depth (about half a second per decoder layer here), yet decoder
layers of one kind trace to the same subgraph up to their parameter names and cache inputs. So
capture traces a prefix of the model that holds every kind of layer after its first one, then builds
each later layer by copying the subgraph of the last traced layer of its kind onto its own
parameters and cache inputs. A layer's kind is what its trace can depend on besides its position:
its module tree, each module's plain settings (its layer index aside, which only picks its cache),
its tensors' shapes and dtypes, and the config's per-layer entries (lists of one entry per layer).
As for the trace cache, forward hooks or an instance-level `forward` anywhere mean a full trace.

`replicate` first checks that each traced layer's subgraph reads only its own parameters and
cache, the previous layer's output and values computed before the first layer (positions, masks,
rotary tables), and that nothing after the last layer reads more than its output; otherwise it
returns None and the whole model is traced. The copy then computes what a trace of the layer does.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import fx, nn

from .structure import BLOCK_PATH, LAYERS, module_path, tensor_at
from .trace_cache import forwards_are_visible, holds_tensor, module_signature, tensor_signature

_CACHE_INPUT = re.compile(r"^past_(key|value)_(\d+)$")


@dataclass(frozen=True)
class Plan:
    prefix: int  # layers traced
    sources: dict[int, int]  # each later layer -> the traced layer copied for it (never layer 0)


def plan(model: nn.Module) -> Plan | None:
    """Which layers to trace and which to copy, or None when copying saves nothing."""
    layers = _layers(model)
    if layers is None or not forwards_are_visible(model):
        return None
    kinds = [_kind(model, layer, i) for i, layer in enumerate(layers)]
    for prefix in range(2, len(kinds)):
        last = {kinds[i]: i for i in range(1, prefix)}  # layer 0 reads the embedding, not a layer
        if all(kinds[j] in last for j in range(prefix, len(kinds))):
            return Plan(prefix, {j: last[kinds[j]] for j in range(prefix, len(kinds))})
    return None


@contextmanager
def truncated(model: nn.Module, prefix: int) -> Iterator[None]:
    """`model` with only its first `prefix` decoder layers (its config's per-layer entries too)."""
    layers, config = model.model.layers, model.config
    count = config.num_hidden_layers
    per_layer = _per_layer_entries(config)
    model.model.layers = nn.ModuleList(list(layers)[:prefix])
    config.num_hidden_layers = prefix
    for key, value in per_layer.items():
        setattr(config, key, value[:prefix])
    try:
        yield
    finally:
        model.model.layers = layers
        config.num_hidden_layers = count
        for key, value in per_layer.items():
            setattr(config, key, value)


@dataclass
class _Layers:
    """A traced prefix cut into its decoder layers."""

    nodes: dict[int, list[fx.Node]]  # in graph order; a layer's cache inputs included
    outputs: dict[int, fx.Node]  # the one value each layer hands on
    presents: list[fx.Node]  # the graph's cache outputs, in order
    after: set[fx.Node]  # what follows the last layer: final norm, LM head


def replicate(graph_module: fx.GraphModule, model: nn.Module, layout: Plan) -> fx.GraphModule | None:
    """The graph of the whole `model` from the trace of its first `layout.prefix` layers (whose graph
    this rewrites), bound to `model`'s tensors; None when the trace does not cut into self-contained
    layers."""
    graph = graph_module.graph
    layers = _cut(graph, layout.prefix)
    if layers is None or not _copies_fit(graph, layers, layout):
        return None
    cache_inputs = _new_cache_inputs(graph, layers, layout)
    last = layers.outputs[layout.prefix - 1]
    readers = [u for u in last.users if u in layers.after]
    insert_at = next(n for n in graph.nodes if n in layers.after or n.op == "output")
    with graph.inserting_before(insert_at):
        for j, source in sorted(layout.sources.items()):
            env = {layers.outputs[source - 1]: last}
            for node in layers.nodes[source]:
                if node.op == "placeholder":
                    env[node] = cache_inputs[_CACHE_INPUT.match(node.name).group(1), j]
                    continue
                env[node] = graph.node_copy(node, lambda n, env=env: env.get(n, n))
                if node.op == "get_attr":
                    env[node].target = _renamed(node.target, source, j)
                _rename_module_stack(env[node], source, j)
            last = env[layers.outputs[source]]
            layers.presents += [env[p] for p in layers.presents[2 * source : 2 * source + 2]]
    for reader in readers:
        reader.replace_input_with(layers.outputs[layout.prefix - 1], last)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0][0], *layers.presents),)
    in_layers = {n for members in layers.nodes.values() for n in members}
    tensors = {}
    for node in (n for n in graph.nodes if n.op == "get_attr"):
        if holds_tensor(model, node.target):
            tensors[node.target] = tensor_at(model, node.target)
        elif in_layers.isdisjoint(node.users) and holds_tensor(graph_module, node.target):
            # a constant made while tracing (a mask's fill value), read before or after the layers
            tensors[node.target] = tensor_at(graph_module, node.target)
        else:
            return None
    whole = fx.GraphModule(tensors, graph)  # parameters stay parameters, other tensors are buffers
    whole.graph.lint()
    return whole


def _cut(graph: fx.Graph, prefix: int) -> _Layers | None:
    """The traced prefix's layers, or None when a layer reads another layer's values other than the
    previous one's output, or what follows the last layer reads more than its output."""
    layer_of: dict[fx.Node, int] = {}
    for node in graph.nodes:
        layer = _layer_of(node)
        if layer is None and node.op == "call_function" and module_path(node) is None:
            # size arithmetic traced outside any module: part of the one layer it reads, if any
            read = {layer_of[a] for a in node.all_input_nodes if a in layer_of}
            layer = read.pop() if len(read) == 1 else None
        if layer is not None:
            layer_of[node] = layer
    nodes: dict[int, list[fx.Node]] = {i: [] for i in range(prefix)}
    for node, layer in layer_of.items():
        nodes[layer].append(node)
    output = next(n for n in graph.nodes if n.op == "output")
    presents = list(output.args[0][1:])
    if len(presents) != 2 * prefix or any(layer_of.get(p) != i // 2 for i, p in enumerate(presents)):
        return None
    outputs = {}
    for i, members in nodes.items():
        leaving = {n for n in members for u in n.users if layer_of.get(u) != i and u is not output}
        if len(leaving) != 1:
            return None
        outputs[i] = leaving.pop()
    after: set[fx.Node] = set()
    for node in graph.nodes:
        if node in layer_of or node.op in ("placeholder", "output"):
            continue
        read = {a for a in node.all_input_nodes if a in layer_of}
        if read - {outputs[prefix - 1]}:
            return None
        if read or any(a in after for a in node.all_input_nodes):
            after.add(node)
    for i, members in nodes.items():
        for node in members:
            for a in node.all_input_nodes:
                if a in after or (a in layer_of and layer_of[a] != i and a is not outputs.get(i - 1)):
                    return None
    return _Layers(nodes, outputs, presents, after)


def _copies_fit(graph: fx.Graph, layers: _Layers, layout: Plan) -> bool:
    """Whether every value a copied layer reads from outside it comes before the insertion point."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    insert_at = min((order[n] for n in layers.after), default=len(order))
    for source in set(layout.sources.values()):
        members = set(layers.nodes[source])
        if any(order[a] >= insert_at for n in members for a in n.all_input_nodes if a not in members):
            return False
    return True


def _new_cache_inputs(graph: fx.Graph, layers: _Layers, layout: Plan) -> dict[tuple[str, int], fx.Node]:
    """Placeholders past_key_j, past_value_j of every copied layer j, after the traced ones."""
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    created = {}
    for j, source in sorted(layout.sources.items()):
        for kind in ("key", "value"):
            like = next(n for n in layers.nodes[source] if n.name == f"past_{kind}_{source}")
            with graph.inserting_after(anchor):
                anchor = created[kind, j] = graph.placeholder(f"past_{kind}_{j}")
            anchor.meta = dict(like.meta)
    return created


def _layer_of(node: fx.Node) -> int | None:
    if node.op == "placeholder":
        match = _CACHE_INPUT.match(node.name)
        return int(match.group(2)) if match else None
    path = {"get_attr": node.target, "call_function": module_path(node)}.get(node.op)
    match = BLOCK_PATH.match(path or "")
    return int(match.group(1)) if match else None


def _renamed(text: str, source: int, target: int) -> str:
    """`model.layers.{source}...` (or a module-stack key's spelling) of layer `target`."""
    return re.sub(rf"(?<={re.escape(LAYERS)}[._]){source}(?=[._]|$)", str(target), text)


def _rename_module_stack(node: fx.Node, source: int, target: int) -> None:
    """The copy's module paths name its own layer: the structure map reads them."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {
            _renamed(key, source, target): (_renamed(path, source, target), cls)
            for key, (path, cls) in stack.items()
        }


def _layers(model: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        return None
    return layers


def _per_layer_entries(config) -> dict[str, list | tuple]:
    count = config.num_hidden_layers
    return {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == count}


def _kind(model: nn.Module, layer: nn.Module, index: int) -> Hashable:
    modules = tuple(
        module_signature(name, m, skip="layer_idx") for name, m in layer.named_modules(remove_duplicate=False)
    )
    tensors = tuple(
        tensor_signature(name, t)
        for name, t in [*layer.named_parameters(remove_duplicate=False), *layer.named_buffers()]
    )
    entries = tuple((k, repr(v[index])) for k, v in sorted(_per_layer_entries(model.config).items()))
    return modules, tensors, entries
