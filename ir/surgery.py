"""Structural edits of a program's graph, addressed through the structure map.

These are the primitives Expert Trimming passes build on. Each edit rewires the residual stream,
lets dead-code elimination remove what is no longer used, and leaves a graph the verifier accepts.
"""

from __future__ import annotations

import torch
from torch import fx, nn

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
    program.info.edits.append({"op": "drop_block", "block": index})
    program.graph_changed()


def drop_mlp(program, index: int) -> None:
    """Remove block `index`'s MLP sub-layer and its pre-norm: the block becomes h + Attn(Norm(h))."""
    block = program.structure.block(index)
    if block.mlp_residual is None:
        raise MoepassError(f"block {index} has no MLP sub-layer left to drop")
    graph: fx.Graph = program.graph_module.graph
    nodes = {n.name: n for n in graph.nodes}
    nodes[block.mlp_residual].replace_all_uses_with(nodes[block.attention_residual])
    program.info.edits.append({"op": "drop_mlp", "block": index})
    program.graph_changed()


def keep_experts(program, index: int, keep: list[int], *, preserve_gate: bool = False) -> None:
    """Keep only experts `keep` (indices into the current experts) of block `index`'s MoE sub-layer.

    Default (the paper's router surgery): router rows, correction bias and every expert tensor are
    sliced the same way and top-k becomes min(k, kept), so routing is recomputed over the survivors.
    `preserve_gate`: the router keeps all its rows, reordered [kept..., dropped...], and its top-k;
    a token routed to a dropped expert just loses that contribution (ids >= E are skipped by the
    experts op). Family-agnostic: it only touches what the structure map names.
    """
    moe = program.structure.block(index).mlp
    if moe is None or not hasattr(moe, "route_node"):
        raise MoepassError(f"block {index} has no MoE sub-layer")
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= moe.num_experts:
        raise MoepassError(
            f"block {index}: experts to keep must be a non-empty subset of 0..{moe.num_experts - 1}"
        )
    if preserve_gate and moe.n_group > 1:
        raise MoepassError(
            f"block {index}: preserve_gate reorders the router rows, which would regroup the experts of "
            f"its group-limited routing (n_group={moe.n_group}); drop experts with preserve_gate=False"
        )
    experts = torch.tensor(keep)
    rows = (
        torch.tensor(keep + [e for e in range(moe.router_rows) if e not in keep])
        if preserve_gate
        else experts
    )
    graph_module = program.graph_module
    router_tensors = (moe.router_weight, moe.router_bias, moe.correction_bias)
    for fqn in (*router_tensors, moe.gate_up, moe.down, moe.gate_up_bias, moe.down_bias):
        if fqn is not None:
            _replace_tensor(graph_module, fqn, rows if fqn in router_tensors else experts)
    route = next(n for n in graph_module.graph.nodes if n.name == moe.route_node)
    if preserve_gate:
        route.meta["moepass_preserve_gate"] = True
    else:
        args = list(route.args)
        args[3] = min(args[3], len(keep))
        route.args = tuple(args)
    program.info.edits.append(
        {"op": "keep_experts", "block": index, "keep": keep, "preserve_gate": preserve_gate}
    )
    program.graph_changed()


def _replace_tensor(graph_module: fx.GraphModule, fqn: str, rows: torch.Tensor) -> None:
    """Swap a parameter or buffer for its selected rows (a new tensor: nothing shared is edited)."""
    owner_path, _, name = fqn.rpartition(".")
    owner = graph_module.get_submodule(owner_path)
    old = getattr(owner, name)
    selected = old.detach().index_select(0, rows.to(old.device))
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(selected, requires_grad=False)
    else:
        owner._buffers[name] = selected
