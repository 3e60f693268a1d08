"""Split a program's graph into stages — prelude, one per block, tail — that run one after another.

Running stage by stage over a whole calibration set keeps only one block's activations alive at a
time (the paper's layer-by-layer "catcher"), and lets a pass compress block i before block i + 1
sees its output. Each stage is a GraphModule over the program's own parameters; its inputs and
outputs are named after the nodes of the full graph, so values flow between stages by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .structure import LAYERS, module_path


@dataclass
class Stage:
    name: str  # "prelude", "block 3", "tail"
    block: int | None  # original layer index for block stages
    module: fx.GraphModule  # forward(*inputs) -> tuple(outputs)
    inputs: list[str]  # names of full-graph nodes (or graph inputs) this stage reads
    outputs: list[str]  # names of nodes this stage produces for later stages, the result, or observers


def split_stages(
    graph_module: fx.GraphModule, observe: set[str] = frozenset(), only: str | None = None
) -> list[Stage]:
    """Stages in execution order; `observe` names extra nodes to return from their stage. `only`
    ("prelude", "block 3", "tail") builds that stage alone: finding the stages is one walk over the
    graph, building their modules is what costs, and a pass that asks for one block at a time would
    otherwise pay for every block each time (quadratic in depth)."""
    graph = graph_module.graph
    owner, order = _owners(graph)
    output_node = next(n for n in graph.nodes if n.op == "output")
    needed_later = {a.name for a in output_node.all_input_nodes} | set(observe)
    consumers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for source in node.all_input_nodes:
            consumers.setdefault(source.name, set()).add(owner.get(node.name, "output"))
    _check_stage(only, order)
    stages = []
    for key in order if only is None else [only]:
        members = [n for n in graph.nodes if owner.get(n.name) == key]
        outputs = [
            n.name
            for n in members
            if n.name in needed_later or any(c != key for c in consumers.get(n.name, ()))
        ]
        stages.append(_build(graph_module, key, members, outputs))
    return stages


def observing_stage(graph_module: fx.GraphModule, key: str, observe: set[str]) -> Stage:
    """The part of stage `key` that computes the nodes in `observe`, returning exactly those: a
    search that scores candidates by an attention output, or statistics of a projection's input,
    need not run the rest of the block (its experts, above all) on every calibration batch. A value
    the block reads from earlier stages is observed as it enters (a post-norm block's attention reads
    the residual stream itself)."""
    owner, order = _owners(graph_module.graph)
    _check_stage(key, order)
    by_name = {n.name: n for n in graph_module.graph.nodes}
    read = {a.name for n in graph_module.graph.nodes if owner.get(n.name) == key for a in n.all_input_nodes}
    entering = [name for name in observe if owner.get(name) != key and name in read]
    strangers = sorted(name for name in observe if owner.get(name) != key and name not in read)
    if strangers:
        raise ValueError(f"{key} computes no node named {', '.join(strangers)}")
    needed, pending = set(), [by_name[name] for name in observe if name not in entering]
    while pending:  # the observed nodes' ancestors inside the stage
        node = pending.pop()
        if node.name not in needed:
            needed.add(node.name)
            pending += [a for a in node.all_input_nodes if owner.get(a.name) == key]
    members = [n for n in graph_module.graph.nodes if n.name in needed]
    outputs = [*entering, *(n.name for n in members if n.name in observe)]
    return _build(graph_module, key, members, outputs, [by_name[name] for name in entering])


def _owners(graph: fx.Graph) -> tuple[dict[str, str], list[str]]:
    """The stage each computing node belongs to, and the stages in execution order."""
    owner: dict[str, str] = {}
    blocks: list[int] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = _block_key(node)
        if key is None:  # root-level node: after the blocks if it reads anything that is
            late = any(
                owner.get(a.name, "prelude") != "prelude" for a in node.all_input_nodes if a.op != "get_attr"
            )
            key = "tail" if late else "prelude"
        elif int(key.split()[1]) not in blocks:
            blocks.append(int(key.split()[1]))
        owner[node.name] = key
    return owner, ["prelude", *[f"block {i}" for i in blocks], "tail"]


def _check_stage(key: str | None, order: list[str]) -> None:
    if key is not None and key not in order:
        raise ValueError(f"the graph has no stage {key!r} (stages: {', '.join(order)})")


def _block_key(node: fx.Node) -> str | None:
    path = module_path(node)
    if path is None or not path.startswith(LAYERS + "."):
        return None
    return f"block {path.split('.')[2]}"


def _build(
    graph_module: fx.GraphModule,
    key: str,
    members: list[fx.Node],
    outputs: list[str],
    entering: list[fx.Node] = (),
) -> Stage:
    """`entering`: earlier values to take as inputs and return as they are, read by a member or not."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    member_names = {n.name for n in members}
    external = {s.name: s for s in entering} | {
        s.name: s
        for n in members
        for s in n.all_input_nodes
        if s.name not in member_names and s.op != "get_attr"
    }
    for name, source in external.items():  # placeholders first: produced earlier or graph inputs
        env[source] = graph.placeholder(name)
        env[source].meta = dict(source.meta)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:  # parameters and buffers: read from the program's own attributes
            env[node] = graph.get_attr(node.target)
        return env[node]

    for node in members:
        for source in node.all_input_nodes:
            lookup(source)
        env[node] = graph.node_copy(node, lookup)
    by_name = {n.name: env[n] for n in [*members, *entering]}
    graph.output(tuple(by_name[name] for name in outputs))
    block = int(key.split()[1]) if key.startswith("block") else None
    return Stage(key, block, fx.GraphModule(graph_module, graph), list(external), outputs)
