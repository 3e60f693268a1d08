"""IR invariants, checked after capture and after every transform.

Each check appends a readable problem naming the block, node or tensor; all problems are reported
together so a broken transform shows everything it broke at once.
"""

from __future__ import annotations

import torch
from torch import fx

from moepass.errors import IRVerificationError

from .ops import ACTIVATIONS, ROUTING_KINDS
from .quantized import FormatError, check_codes, in_features
from .structure import MoEEntry, op_args


def verify(program) -> None:
    problems: list[str] = []
    graph_module: fx.GraphModule = program.graph_module
    try:
        graph_module.graph.lint()
    except Exception as error:  # lint raises bare RuntimeError/AssertionError with the reason
        problems.append(f"graph lint: {error}")
    _check_signature(graph_module, problems)
    structure = program.structure
    nodes = {n.name: n for n in graph_module.graph.nodes}
    live = set(nodes)
    tensors = dict(graph_module.named_parameters(remove_duplicate=False))
    tensors.update(graph_module.named_buffers(remove_duplicate=False))
    for entry in structure.entries():
        missing = [n for n in entry.nodes if n not in live]
        if missing:
            problems.append(f"{entry.module}: nodes not in the graph: {missing[:5]}")
        if not entry.nodes and not entry.params:
            problems.append(f"{entry.module}: no nodes and no parameters")
    for block in structure.blocks:
        where = f"block {block.index}"
        for name in (block.input, block.output, block.attention_residual, block.mlp_residual):
            if name is not None and name not in live:
                problems.append(f"{where}: residual-stream node {name!r} is not in the graph")
        cache = block.attention.cache
        if cache is None:
            problems.append(f"{where}: no past_key_{block.index}/past_value_{block.index} cache inputs")
        else:
            inside = set(block.attention.nodes)
            for name in (cache.past_key, cache.past_value):
                strays = [u.name for u in nodes[name].users if u.name not in inside]
                if strays:
                    problems.append(
                        f"{where}: cache input {name} is read outside the block's attention by "
                        f"{strays}; dropping the block would break them"
                    )
        if isinstance(block.mlp, MoEEntry):
            _check_moe(where, block.mlp, tensors, problems)
            _check_moe_wiring(where, block.mlp, nodes, problems)
    past = [n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name.startswith("past_")]
    owners = {b.attention.cache.past_key for b in structure.blocks if b.attention.cache} | {
        b.attention.cache.past_value for b in structure.blocks if b.attention.cache
    }
    orphans = [n.name for n in past if n.name not in owners]
    if orphans:
        problems.append(f"cache inputs without a block: {orphans}")
    if problems:
        raise IRVerificationError(problems)


def _check_quantized_experts(where, moe, tensors, quant, hidden, inter, problems) -> None:
    """Each projection's codes, scales and zero points describe its [E, N, K] weight (`check_codes`;
    2:4 storage keeps half the inputs, in groups of half the size)."""
    prefix = moe.gate_up.rpartition(".")[0]
    kept = 2 if quant["layout"] == "sparse24" else 1
    group = quant["group_size"] if quant["group_size"] == -1 else quant["group_size"] // kept
    for proj, codes, k in (("gate_up_proj", moe.gate_up, hidden), ("down_proj", moe.down, inter)):
        scales = tensors.get(f"{prefix}.{proj}_scales")
        if scales is None:
            problems.append(f"{where}: quantized {proj} has no scales tensor")
            continue
        zeros = tensors.get(f"{prefix}.{proj}_zeros")
        try:
            check_codes(f"{where}: {codes}", k // kept, tensors[codes], scales, zeros, quant["bits"], group)
        except FormatError as error:
            problems.append(str(error))


def _check_moe_wiring(where: str, moe: MoEEntry, nodes: dict[str, fx.Node], problems: list[str]) -> None:
    """The experts op reads its own router's ids and weights and the hidden state the router reads
    (its width): a rewire that breaks these still passes lint and fails, or runs wrong, later."""
    experts = nodes.get(moe.experts_node)
    if experts is None:
        return  # reported with the entry's missing nodes
    args = op_args(experts)
    weights, hidden = args.get("topk_weights"), args.get("hidden")
    if moe.scales_input:  # Llama-4: ones, with the router's weights in the input rows instead
        weights, hidden = weights.args[0], _unscaled(hidden, moe.route_weights)
        if hidden is None:
            problems.append(
                f"{where}: experts node {experts.name} weighs its outputs by ones, but its input rows "
                f"are not scaled by the router's {moe.route_weights}"
            )
    for name, want, got in (
        ("topk_ids", moe.route_ids, args.get("topk_ids")),
        ("topk_weights", moe.route_weights, weights),
    ):
        got = getattr(got, "name", None)
        if got != want:
            problems.append(
                f"{where}: experts node {experts.name} reads {name} from {got}, not the router's {want}"
            )
    router = nodes.get(moe.router_linear_node or "")
    width, router_width = _width(hidden), _width(router.args[0] if router is not None else None)
    if width is not None and router_width is not None and width != router_width:
        problems.append(
            f"{where}: experts node {experts.name} reads a hidden state {width} wide; "
            f"the router reads {router_width}"
        )


_CASTS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)


def _unscaled(node, weights: str):
    """The rows `node` scales by the route weights `weights` (through a dtype cast), else None."""
    if not isinstance(node, fx.Node) or node.target is not torch.ops.aten.mul.Tensor:
        return None
    rows, factor = node.args
    while isinstance(factor, fx.Node) and factor.name != weights and factor.target in _CASTS:
        factor = factor.args[0]
    return rows if getattr(factor, "name", None) == weights else None


def _width(node) -> int | None:
    """The last dimension of a node's traced value, when it has one."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    shape = getattr(value, "shape", None)
    return int(shape[-1]) if shape else None


def _check_signature(graph_module: fx.GraphModule, problems: list[str]) -> None:
    placeholders = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    if placeholders[:3] != ["input_ids", "attention_mask", "position_ids"]:
        problems.append(
            f"inputs must start with input_ids, attention_mask, position_ids; got {placeholders[:3]}"
        )
    past = placeholders[3:]
    if len(past) % 2 or any(
        not (k.startswith("past_key_") and v.startswith("past_value_") and k[9:] == v[11:])
        for k, v in zip(past[0::2], past[1::2], strict=False)
    ):
        problems.append(f"cache inputs must come in past_key_i, past_value_i pairs; got {past}")
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    results = output.args[0]
    if not isinstance(results, (tuple, list)) or len(results) != 1 + len(past):
        problems.append(
            f"outputs must be (logits, one present per cache input): "
            f"{len(past)} cache inputs, {len(results) - 1} presents"
        )


def _check_moe(where: str, moe: MoEEntry, tensors: dict, problems: list[str]) -> None:
    quant = moe.quantization

    def shape(name: str | None):
        """Logical shape: packed codes count their unpacked inputs."""
        if name is None or name not in tensors:
            return None
        value = tuple(tensors[name].shape)
        if quant is not None and name in (moe.gate_up, moe.down):
            bits, kept = quant["bits"], 0.5 if quant["layout"] == "sparse24" else 1
            stored = in_features(tensors[name], bits) if bits else value[-1]
            value = (*value[:-1], int(stored / kept))
        return value

    for field in ("router_weight", "gate_up", "down"):
        name = getattr(moe, field)
        if shape(name) is None:
            problems.append(f"{where}: MoE {field} tensor {name!r} not found")
            return
    gate_up, down = shape(moe.gate_up), shape(moe.down)
    if len(gate_up) != 3 or len(down) != 3:
        problems.append(f"{where}: expert tensors must be 3-D, got gate_up {gate_up}, down {down}")
        return
    router_fields = ("router_weight", "router_bias", "correction_bias")
    expert_fields = ("gate_up", "down", "gate_up_bias", "down_bias")
    counts = {
        f: shape(getattr(moe, f))[0] for f in (*router_fields, *expert_fields) if shape(getattr(moe, f))
    }
    counts.update({t.rsplit(".", 1)[-1]: shape(t)[0] for t in moe.expert_tensors if shape(t)})
    rows = {f: n for f, n in counts.items() if f in router_fields}
    experts = {f: n for f, n in counts.items() if f not in router_fields}
    # preserve_gate routers keep rows for dropped experts: they must have at least one per expert
    agree = (
        len(set(rows.values())) <= 1
        and len(set(experts.values())) <= 1
        and (
            min(rows.values(), default=0) >= moe.num_experts
            if moe.preserve_gate
            else len(set(counts.values())) <= 1
        )
    )
    if not agree:
        problems.append(
            f"{where}: MoE tensors disagree on the number of experts: "
            + ", ".join(f"{f}={n}" for f, n in counts.items())
        )
        return
    num_experts = moe.num_experts
    hidden, inter = down[1], down[2]
    expected = {
        "router_weight": (moe.router_rows, hidden),
        "gate_up": (num_experts, 2 * inter, hidden),
        "down": (num_experts, hidden, inter),
        "gate_up_bias": (num_experts, 2 * inter),
        "down_bias": (num_experts, hidden),
        "router_bias": (moe.router_rows,),
        "correction_bias": (moe.router_rows,),
    }
    for field, want in expected.items():
        name = getattr(moe, field)
        if name is not None and shape(name) != want:
            problems.append(
                f"{where}: {field} {name} has shape {shape(name)}, expected {want} "
                f"(E={num_experts}, H={hidden}, I={inter})"
            )
    if quant is not None and quant["layout"] in ("quantized", "sparse24") and quant["bits"]:
        _check_quantized_experts(where, moe, tensors, quant, hidden, inter, problems)
    if not 1 <= moe.top_k <= moe.router_rows:
        problems.append(
            f"{where}: top_k={moe.top_k} must be between 1 and the number of experts ({moe.router_rows})"
        )
    if moe.routing not in ROUTING_KINDS:
        problems.append(f"{where}: unknown routing kind {moe.routing!r}")
    if moe.routing == "sparsemixer" and moe.top_k != 2:
        problems.append(f"{where}: sparsemixer routing always picks 2 experts, top_k={moe.top_k}")
    if moe.n_group > 1:
        if moe.router_rows % moe.n_group:
            problems.append(
                f"{where}: {moe.router_rows} experts do not split into n_group={moe.n_group} groups"
            )
        elif not 1 <= moe.topk_group <= moe.n_group:
            problems.append(f"{where}: topk_group={moe.topk_group} must be in 1..n_group={moe.n_group}")
        elif moe.routing == "sigmoid_topk" and moe.router_rows // moe.n_group < 2:
            problems.append(
                f"{where}: sigmoid_topk scores groups by their top-2 experts; "
                f"{moe.router_rows} experts in {moe.n_group} groups leaves fewer than 2 per group"
            )
        elif moe.top_k > moe.topk_group * (moe.router_rows // moe.n_group):
            problems.append(f"{where}: top_k={moe.top_k} exceeds the experts in {moe.topk_group} groups")
    if moe.activation not in ACTIVATIONS:
        problems.append(f"{where}: unknown expert activation {moe.activation!r}")
