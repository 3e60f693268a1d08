"""Structural edits of a program's graph, addressed through the structure map.

These are the primitives Expert Trimming passes build on. Each edit rewires the residual stream,
lets dead-code elimination remove what is no longer used, and leaves a graph the verifier accepts.
"""

from __future__ import annotations

from torch import fx

from moepass.errors import MoepassError

from .canonicalize import remove_dead_nodes


def drop_block(program, index: int) -> None:
    """Remove decoder block `index` (original numbering): attention, MLP, norms and its KV cache."""
    structure = program.structure
    block = structure.block(index)
    if len(structure.blocks) == 1:
        raise MoepassError(f"cannot drop block {index}: it is the last block of the program")
    graph = program.graph_module.graph
    nodes = {n.name: n for n in graph.nodes}
    nodes[block.output].replace_all_uses_with(nodes[block.input])
    cache = block.attention.cache
    output = next(n for n in graph.nodes if n.op == "output")
    results = list(output.args[0])
    for position in sorted((cache.present_key_index, cache.present_value_index), reverse=True):
        del results[position]
    output.args = (tuple(results),)
    remove_dead_nodes(graph)
    for name in (cache.past_key, cache.past_value):
        placeholder = nodes[name]
        if placeholder.users:
            raise MoepassError(
                f"block {index}: cache input {name} is still used by {list(placeholder.users)}"
            )
        graph.erase_node(placeholder)
    program.graph_changed()


def drop_mlp(program, index: int) -> None:
    """Remove block `index`'s MLP sub-layer and its pre-norm: the block becomes h + Attn(Norm(h))."""
    block = program.structure.block(index)
    if block.mlp_residual is None:
        raise MoepassError(f"block {index} has no MLP sub-layer left to drop")
    graph: fx.Graph = program.graph_module.graph
    nodes = {n.name: n for n in graph.nodes}
    nodes[block.mlp_residual].replace_all_uses_with(nodes[block.attention_residual])
    program.graph_changed()
