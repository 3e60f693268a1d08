"""Structural edits of a program's graph, addressed through the structure map.

These are the primitives Expert Trimming passes build on. Each edit rewires the residual stream,
lets dead-code elimination remove what is no longer used, and leaves a graph the verifier accepts.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from moepass.errors import MoepassError

from .canonicalize import remove_dead_nodes
from .ops import EXPERTS
from .program import MoEProgram
from .quant_ops import PACKED_TENSORS, QUANTIZED_EMBEDDING, QUANTIZED_EXPERTS, QUANTIZED_LINEAR
from .quantized import QuantFormat
from .sparse import SPARSE24_EXPERTS, SPARSE24_LINEAR, decompress_24, decompress_codes_24
from .structure import EMBEDDINGS, arg_tensors, op_args


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
    """Remove block `index`'s MLP sub-layer and the norms only it used (its pre-norm; AFMoE's and
    FlexOlmo's post-norm): the block becomes its attention sub-layer, h + Attn(h) with its norms."""
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
    Group-limited routing (`n_group` > 1) needs the same number kept from each group, so that every
    group keeps only its own experts, and enough in each for its routing (`min_experts_per_group`).
    """
    moe = program.structure.block(index).mlp
    if moe is None or not hasattr(moe, "route_node"):
        raise MoepassError(f"block {index} has no MoE sub-layer")
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= moe.num_experts:
        raise MoepassError(
            f"block {index}: experts to keep must be a non-empty subset of 0..{moe.num_experts - 1}"
        )
    # a router holding exactly the kept experts has no rows to preserve: marking it would make HF
    # export refuse a layer that lost nothing
    preserve_gate = preserve_gate and len(keep) < moe.router_rows
    if preserve_gate and moe.n_group > 1:
        raise MoepassError(
            f"block {index}: preserve_gate reorders the router rows, which would regroup the experts of "
            f"its group-limited routing (n_group={moe.n_group}); drop experts with preserve_gate=False"
        )
    if not preserve_gate and len(keep) < fewest_kept(moe):
        raise MoepassError(
            f"block {index}: its sparsemixer routing always picks {fewest_kept(moe)} experts; keep at least "
            f"{fewest_kept(moe)} (or drop with preserve_gate=True)"
        )
    if moe.n_group > 1:
        _check_groups_stay_equal(moe, index, keep)
    rows = keep + [e for e in range(moe.router_rows) if e not in keep] if preserve_gate else keep
    graph_module = program.graph_module
    for fqn in (moe.router_weight, moe.router_bias, moe.correction_bias):
        if fqn is not None:
            _replace_tensor(graph_module, fqn, rows)
    for fqn in moe.expert_tensors:  # weights, biases, and packed codes/scales/zeros when quantized
        _replace_tensor(graph_module, fqn, keep)
    route = next(n for n in graph_module.graph.nodes if n.name == moe.route_node)
    if preserve_gate:
        route.meta["moepass_preserve_gate"] = True
    else:  # the router holds exactly the kept experts now, even after an earlier preserve_gate drop
        route.meta.pop("moepass_preserve_gate", None)
        args = list(route.args)
        args[3] = min(args[3], len(keep))
        route.args = tuple(args)
    program.info.edits.append(
        {"op": "keep_experts", "block": index, "keep": keep, "preserve_gate": preserve_gate}
    )
    program.graph_changed()


def kept_original_experts(program: MoEProgram, index: int) -> list[int]:
    """The original indices of the experts block `index` holds now, composing its keep_experts edits."""
    kept: list[int] | None = None
    for edit in program.info.edits:
        if edit["op"] == "keep_experts" and edit["block"] == index:
            kept = list(edit["keep"]) if kept is None else [kept[i] for i in edit["keep"]]
    if kept is None:
        return list(range(program.structure.block(index).mlp.num_experts))
    return kept


def _check_groups_stay_equal(moe, index: int, keep: list[int]) -> None:
    """Group-limited routing splits the router's experts into `n_group` equal consecutive groups, so
    after slicing, each group must still hold only its own experts: the same number kept from each."""
    groups, size = moe.n_group, moe.num_experts // moe.n_group
    counts = [0] * groups
    for e in keep:
        counts[e // size] += 1
    if len(set(counts)) > 1:  # (keep is non-empty, so equal counts are non-zero)
        raise MoepassError(
            f"block {index}: group-limited routing (n_group={groups}) splits the experts into {groups} "
            f"equal groups; keeping {counts} experts per group would move experts into other groups; "
            f"keep the same number of experts from each group of {size}"
        )
    need, why = min_experts_per_group(moe, len(keep))
    if counts[0] < need:
        raise MoepassError(
            f"block {index}: group-limited routing (n_group={groups}) needs {need} experts in each group "
            f"({why}), but {counts} experts per group would be kept; keep at least {need} from each group"
        )


def fewest_kept(moe) -> int:
    """Experts a layer must keep (its router sliced): sparsemixer routing always picks 2, others 1."""
    return 2 if moe.routing == "sparsemixer" else 1


def min_experts_per_group(moe, kept: int) -> tuple[int, str]:
    """Experts a group-limited router keeping `kept` experts needs in each group, and why:
    DeepSeek-V3's (sigmoid_topk) scores a group by the sum of its best 2 experts, DeepSeek-V2's by
    its best one, and the `topk_group` groups it keeps must hold its top-k (min(top_k, kept) after
    the slice) between them (else it would route to experts of the groups it masked out)."""
    scored_by = 2 if moe.routing == "sigmoid_topk" else 1
    top_k = min(moe.top_k, kept)
    picks = -(-top_k // moe.topk_group)
    if picks > scored_by:
        return picks, f"it picks top_k={top_k} experts from its best topk_group={moe.topk_group}"
    return scored_by, f"it scores each group by its best {scored_by}"


def _replace_tensor(graph_module: fx.GraphModule, fqn: str, rows: list[int]) -> None:
    """Swap a parameter or buffer for its selected rows (a new tensor: nothing shared is edited)."""
    owner_path, _, name = fqn.rpartition(".")
    owner = graph_module.get_submodule(owner_path)
    old = getattr(owner, name)
    set_tensor(graph_module, fqn, old.detach().index_select(0, torch.tensor(rows, device=old.device)))


def set_tensor(graph_module: fx.GraphModule, fqn: str, tensor: torch.Tensor) -> None:
    """Install `tensor` at `fqn`, replacing what is there (never editing it in place). An existing
    buffer stays a buffer; otherwise floating tensors become frozen parameters, integer codes
    buffers. Creates the owning submodule if needed."""
    owner_path, _, name = fqn.rpartition(".")
    owner = graph_module
    for part in owner_path.split(".") if owner_path else []:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    was_buffer = owner._buffers.pop(name, None) is not None
    owner._parameters.pop(name, None)
    if tensor.is_floating_point() and not was_buffer:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def quantize_experts(
    program,
    index: int,
    fmt: QuantFormat,
    gate_up: tuple,
    down: tuple,
    *,
    gate_up_input_scale: torch.Tensor | None = None,
    down_input_scale: torch.Tensor | None = None,
) -> None:
    """Rewrite block `index`'s experts node into `moepass::quantized_experts`.

    `gate_up` and `down` are (qweight, scales, zeros-or-None) in `moepass.ir.quantized`'s layout for
    all experts; input scales (AWQ) multiply the projections' inputs. The float weights go."""
    moe = program.structure.block(index).mlp
    if moe is None or not hasattr(moe, "experts_node"):
        raise MoepassError(f"block {index} has no MoE sub-layer to quantize")
    if moe.quantization is not None:
        raise MoepassError(f"block {index}: experts are already quantized ({moe.quantization})")
    graph_module = program.graph_module
    node = next(n for n in graph_module.graph.nodes if n.name == moe.experts_node)
    args = op_args(node)
    prefix = moe.gate_up.rpartition(".")[0]
    tensors = {
        "gate_up_qweight": gate_up[0],
        "gate_up_scales": gate_up[1],
        "gate_up_zeros": gate_up[2],
        "down_qweight": down[0],
        "down_scales": down[1],
        "down_zeros": down[2],
        "gate_up_input_scale": gate_up_input_scale,
        "down_input_scale": down_input_scale,
    }
    with graph_module.graph.inserting_before(node):
        attrs = {k: install_tensor(graph_module, f"{prefix}.{_STORED[k]}", v) for k, v in tensors.items()}
        new = graph_module.graph.call_function(
            QUANTIZED_EXPERTS,
            (
                args["hidden"],
                args["topk_ids"],
                args["topk_weights"],
                attrs["gate_up_qweight"],
                attrs["gate_up_scales"],
                attrs["gate_up_zeros"],
                attrs["down_qweight"],
                attrs["down_scales"],
                attrs["down_zeros"],
                args["gate_up_bias"],
                args["down_bias"],
                attrs["gate_up_input_scale"],
                attrs["down_input_scale"],
                args["activation"],
                args["alpha"],
                args["limit"],
                fmt.bits,
                fmt.group_size,
            ),
        )
    swap_node(node, new)
    for fqn in (moe.gate_up, moe.down):
        delete_if_unused(graph_module, fqn)
    program.info.edits.append(
        {
            "op": "quantize_experts",
            "block": index,
            **_format_record(fmt),
            "input_scales": gate_up_input_scale is not None,
        }
    )
    program.graph_changed()


def quantize_linear(
    program, weight: str, fmt: QuantFormat, packed: tuple, *, input_scale: torch.Tensor | None = None
) -> None:
    """Rewrite every `linear(x, <weight>, bias)` node into `moepass::quantized_linear`."""
    graph_module = program.graph_module
    nodes = [
        n
        for n in graph_module.graph.nodes
        if n.target is torch.ops.aten.linear.default
        and isinstance(n.args[1], fx.Node)
        and n.args[1].op == "get_attr"
        and n.args[1].target == weight
    ]
    if not nodes:
        raise MoepassError(f"no linear reads {weight}")
    prefix = weight.rpartition(".")[0]
    for node in nodes:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph_module.graph.inserting_before(node):
            q, s, z, scale = (
                install_tensor(graph_module, f"{prefix}.{name}", t)
                for name, t in (
                    ("qweight", packed[0]),
                    ("scales", packed[1]),
                    ("zeros", packed[2]),
                    ("input_scale", input_scale),
                )
            )
            new = graph_module.graph.call_function(
                QUANTIZED_LINEAR, (node.args[0], q, s, z, bias, scale, fmt.bits, fmt.group_size)
            )
        swap_node(node, new)
    delete_if_unused(graph_module, weight)
    program.info.edits.append(
        {
            "op": "quantize_linear",
            "weight": weight,
            **_format_record(fmt),
            "input_scale": input_scale is not None,
        }
    )
    program.graph_changed()


def quantize_embedding(program, weight: str, fmt: QuantFormat, packed: tuple) -> None:
    """Rewrite every `embedding(<weight>, ids)` node into `moepass::quantized_embedding`.

    A table tied to an LM head that is already quantized in this format without an input scale
    reads the head's codes (the same rows, one copy); otherwise the codes are stored under the
    embedding module, and a tied head keeps reading the float table."""
    graph_module = program.graph_module
    nodes = [
        n
        for n in graph_module.graph.nodes
        if n.target is torch.ops.aten.embedding.default
        and n.args[0].op == "get_attr"
        and n.args[0].target == weight
    ]
    if not nodes:
        raise MoepassError(f"no embedding reads {weight}")
    head = {"op": "quantize_linear", "weight": weight, **_format_record(fmt), "input_scale": False}
    prefix = weight.rpartition(".")[0]
    if head not in program.info.edits or not any(
        n.op == "get_attr" and n.target == f"{prefix}.qweight" for n in graph_module.graph.nodes
    ):
        prefix = None
    for node in nodes:
        with graph_module.graph.inserting_before(node):
            if prefix is not None:  # the head's codes: new reads of its tensors, placed before this use
                q, s, z = (
                    None
                    if name == "zeros" and fmt.symmetric
                    else graph_module.graph.get_attr(f"{prefix}.{name}")
                    for name in PACKED_TENSORS
                )
            else:
                q, s, z = (
                    install_tensor(graph_module, f"{EMBEDDINGS}.{name}", t)
                    for name, t in zip(PACKED_TENSORS, packed, strict=True)
                )
            new = graph_module.graph.call_function(
                QUANTIZED_EMBEDDING, (node.args[1], q, s, z, fmt.bits, fmt.group_size)
            )
        swap_node(node, new)
    delete_if_unused(graph_module, weight)
    program.info.edits.append({"op": "quantize_embedding", "weight": weight, **_format_record(fmt)})
    program.graph_changed()


def linear_nodes(graph_module: fx.GraphModule, weight: str) -> list[fx.Node]:
    """The linear and quantized-linear nodes whose weight (or codes) is the tensor at `weight`."""
    return [
        n
        for n in graph_module.graph.nodes
        if n.target in (torch.ops.aten.linear.default, QUANTIZED_LINEAR)
        and isinstance(n.args[1], fx.Node)
        and n.args[1].op == "get_attr"
        and n.args[1].target == weight
    ]


def sparsify_linear(program, weight: str, values: torch.Tensor, meta: torch.Tensor) -> None:
    """Rewrite the linears reading `weight` (float weight or quantized codes) into
    `moepass::sparse24_linear` over its 2:4-compressed `values` and `meta` (`moepass.ir.sparse`)."""
    graph_module = program.graph_module
    nodes = linear_nodes(graph_module, weight)
    if not nodes:
        raise MoepassError(f"no linear reads {weight}")
    prefix = weight.rpartition(".")[0]
    for node in nodes:
        args = op_args(node)  # aten.linear names its input `input`, the quantized op `x`
        with graph_module.graph.inserting_before(node):
            stored = {
                part: install_tensor(graph_module, f"{prefix}.{part}", tensor)
                for part, tensor in (("values", values), ("meta", meta))
            }
            new = _call_by_name(
                graph_module.graph,
                SPARSE24_LINEAR,
                {"x": args.get("input"), "bits": 0, "group_size": -1, **args, **stored},
            )
        swap_node(node, new)
    delete_if_unused(graph_module, weight)
    program.info.edits.append({"op": "sparsify_linear", "weight": weight})
    program.graph_changed()


def sparsify_experts(program, index: int, gate_up: tuple, down: tuple) -> None:
    """Rewrite block `index`'s experts node (float or quantized) into `moepass::sparse24_experts` over
    (values, meta) of every expert's gate/up and down projections."""
    moe = program.structure.block(index).mlp
    if moe is None or not hasattr(moe, "experts_node"):
        raise MoepassError(f"block {index} has no MoE sub-layer")
    if moe.quantization is not None and moe.quantization["layout"] != "quantized":
        raise MoepassError(f"block {index}: experts are stored as {moe.quantization['layout']}")
    graph_module = program.graph_module
    node = next(n for n in graph_module.graph.nodes if n.name == moe.experts_node)
    args = op_args(node)
    prefix = moe.gate_up.rpartition(".")[0]
    with graph_module.graph.inserting_before(node):
        stored = {
            f"{proj}_{part}": install_tensor(graph_module, f"{prefix}.{proj}_proj_{part}", tensor)
            for proj, pair in (("gate_up", gate_up), ("down", down))
            for part, tensor in zip(("values", "meta"), pair, strict=True)
        }
        new = _call_by_name(
            graph_module.graph, SPARSE24_EXPERTS, {"bits": 0, "group_size": -1, **args, **stored}
        )
    swap_node(node, new)
    for fqn in (moe.gate_up, moe.down):
        delete_if_unused(graph_module, fqn)
    program.info.edits.append({"op": "sparsify_experts", "block": index})
    program.graph_changed()


def expand_sparse24(program, ops: tuple = (SPARSE24_LINEAR, SPARSE24_EXPERTS)) -> int:
    """Rewrite every 2:4-compressed op back into its dense-storage op (float or quantized) with the
    same outputs: for devices or formats without a 2:4 kernel. Returns the number of ops rewritten.
    Not an edit of the saved structure (it is not recorded for replay)."""
    graph_module, count = program.graph_module, 0
    for node in [n for n in graph_module.graph.nodes if n.target in ops]:
        args = op_args(node)
        bits, group_size = args["bits"], args["group_size"]

        with graph_module.graph.inserting_before(node):
            if node.target is SPARSE24_LINEAR:
                if not bits and args["input_scale"] is not None:
                    raise MoepassError(f"node {node.name}: float 2:4 weights with an input scale")
                prefix, name = args["values"].target.rpartition(".")[0], "qweight" if bits else "weight"
                named = {"input": args["x"], **args}
                named[name] = install_tensor(
                    graph_module, f"{prefix}.{name}", _expanded(graph_module, args, "", bits, group_size)
                )
                op = QUANTIZED_LINEAR if bits else torch.ops.aten.linear.default
            else:
                prefix, suffix = args["gate_up_values"].target.rpartition(".")[0], "_qweight" if bits else ""
                named = dict(args)
                for proj in ("gate_up", "down"):
                    named[f"{proj}{suffix}"] = install_tensor(
                        graph_module,
                        f"{prefix}.{proj}_proj{suffix}",
                        _expanded(graph_module, args, f"{proj}_", bits, group_size),
                    )
                op = QUANTIZED_EXPERTS if bits else EXPERTS
            new = _call_by_name(graph_module.graph, op, named)
        stored = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        swap_node(node, new)
        for fqn in stored:
            if fqn.endswith(("values", "meta")):
                delete_if_unused(graph_module, fqn)
        count += 1
    if count:
        program.graph_changed()
    return count


def _expanded(graph_module, args: dict, proj: str, bits: int, group_size: int) -> torch.Tensor:
    """The dense float weight (bits 0) or dense quantized codes behind a 2:4 op's `{proj}values`."""
    values, meta, zeros = arg_tensors(graph_module, args, f"{proj}values", f"{proj}meta", f"{proj}zeros")
    if not bits:
        return decompress_24(values, meta)
    return decompress_codes_24(values, meta, zeros, bits, group_size)


def _call_by_name(graph: fx.Graph, op, named: dict) -> fx.Node:
    """A call of `op` taking each schema argument from `named` by name (None where absent): rewrites
    between ops that share argument names need not list them in order."""
    return graph.call_function(op, tuple(named.get(a.name) for a in op._schema.arguments))


# stored names of the quantized experts' tensors on the experts module
_STORED = {
    "gate_up_qweight": "gate_up_proj_qweight",
    "gate_up_scales": "gate_up_proj_scales",
    "gate_up_zeros": "gate_up_proj_zeros",
    "down_qweight": "down_proj_qweight",
    "down_scales": "down_proj_scales",
    "down_zeros": "down_proj_zeros",
    "gate_up_input_scale": "gate_up_input_scale",
    "down_input_scale": "down_input_scale",
}


def _format_record(fmt: QuantFormat) -> dict:
    return {"bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric}


def install_tensor(graph_module: fx.GraphModule, fqn: str, tensor: torch.Tensor | None) -> fx.Node | None:
    """Store `tensor` at `fqn` and return a get_attr node for it (inserted at the current point)."""
    if tensor is None:
        return None
    set_tensor(graph_module, fqn, tensor.detach())
    return graph_module.graph.get_attr(fqn)


def swap_node(old: fx.Node, new: fx.Node) -> None:
    """Replace `old` by `new` everywhere, keeping its metadata (module stack, value)."""
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def delete_if_unused(graph_module: fx.GraphModule, fqn: str) -> None:
    """Remove a tensor no graph node reads any more (tied weights stay while their twin reads them)."""
    if any(n.op == "get_attr" and n.target == fqn and n.users for n in graph_module.graph.nodes):
        return
    for n in [n for n in graph_module.graph.nodes if n.op == "get_attr" and n.target == fqn]:
        graph_module.graph.erase_node(n)
    owner_path, _, name = fqn.rpartition(".")
    owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)
