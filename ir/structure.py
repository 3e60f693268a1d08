"""The structure map: which graph nodes and parameters make up each part of the model.

Derived from the graph alone (each node's `nn_module_stack` metadata, `get_attr` targets, the cache
placeholders and the canonical MoE ops), so it is rebuilt after every transform instead of being
kept in sync by hand. Passes drop experts, MoE sub-layers and whole blocks through this map.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .ops import EXPERTS, ROUTE
from .quant_ops import QUANTIZED_EXPERTS


@dataclass(frozen=True)
class ExpertsOp:
    """How an experts op holds its weights: the arguments with the gate/up and down tensors, and
    their layout — "dense", "quantized" (`moepass.ir.quantized`) or a kernel's own (lowered) layout."""

    gate_up: str
    down: str
    layout: str = "dense"


# Every op that computes a MoE layer's routed experts; lowering registers its kernels' ops here.
EXPERT_OPS: dict = {
    EXPERTS: ExpertsOp("gate_up", "down"),
    QUANTIZED_EXPERTS: ExpertsOp("gate_up_qweight", "down_qweight", "quantized"),
}


def register_experts_op(op, spec: ExpertsOp) -> None:
    EXPERT_OPS[op] = spec


# Module paths of the transformers causal-LM layout shared by every supported family.
EMBEDDINGS, LAYERS, FINAL_NORM, LM_HEAD = "model.embed_tokens", "model.layers", "model.norm", "lm_head"
ATTENTION, MLP = "self_attn", "mlp"
BLOCK_PATH = re.compile(rf"^{re.escape(LAYERS)}\.(\d+)(?:\.|$)")
_RESIDUAL_ADD = torch.ops.aten.add.Tensor


@dataclass
class Entry:
    """A module of the model: its path, the graph nodes computed inside it, the tensors it owns."""

    module: str
    nodes: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)


@dataclass
class CacheEntry:
    """A block's past-key/past-value placeholders and the positions of its presents in the output."""

    past_key: str
    past_value: str
    present_key_index: int
    present_value_index: int


@dataclass
class AttentionEntry(Entry):
    description: str = ""
    cache: CacheEntry | None = None


@dataclass
class MoEEntry(Entry):
    """A canonical sparse-MoE sub-layer. Tensor fields hold FQNs (None where the family has none);
    for quantized experts `gate_up`/`down` name the packed codes (`*_qweight`)."""

    route_node: str = ""
    route_weights: str = ""  # getitem nodes unpacking the route op: top-k weights [T, k] fp32
    route_ids: str = ""  # and expert ids [T, k]
    experts_node: str = ""
    router_linear_node: str | None = None
    num_experts: int = 0
    router_rows: int = 0  # = num_experts, unless the router kept rows for dropped experts
    preserve_gate: bool = False
    # Llama-4: the route weights scale the experts' input rows; the experts op weighs outputs by ones
    scales_input: bool = False
    top_k: int = 0
    routing: str = ""
    n_group: int = 1
    topk_group: int = 1
    activation: str = ""
    router_weight: str = ""
    router_bias: str | None = None
    correction_bias: str | None = None
    gate_up: str = ""
    down: str = ""
    gate_up_bias: str | None = None
    down_bias: str | None = None
    expert_tensors: list[str] = field(default_factory=list)  # every tensor indexed by expert (dim 0)
    quantization: dict | None = None  # {"bits", "group_size", "layout"} when the experts are quantized
    shared_experts: Entry | None = None
    shared_expert_gate: Entry | None = None


@dataclass
class BlockEntry:
    """One decoder block. `input`/`output` are the residual-stream nodes entering and leaving it."""

    index: int
    module: str
    input: str
    output: str
    # the block's norms still in the graph: pre-norms, and post-norms where the family has them
    norms: list[Entry]
    attention: AttentionEntry
    attention_residual: str
    mlp: MoEEntry | Entry | None
    mlp_residual: str | None
    mlp_input: str | None = None  # what the MLP reads: the normed hidden state (post-norm layers: h)
    mlp_output: str | None = None  # what the MLP returns (AFMoE norms it before the residual add)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEEntry)


@dataclass
class StructureMap:
    embeddings: Entry
    blocks: list[BlockEntry]
    final_norm: Entry
    lm_head: Entry
    prelude: list[str]  # nodes shared by all blocks: positions, masks, rotary tables

    def block(self, index: int) -> BlockEntry:
        """The block with original layer index `index` (indices survive block drops)."""
        for block in self.blocks:
            if block.index == index:
                return block
        raise KeyError(f"block {index} is not in the program (present: {[b.index for b in self.blocks]})")

    @property
    def moe_blocks(self) -> list[BlockEntry]:
        return [b for b in self.blocks if b.is_moe]

    def entries(self):
        """Every entry with nodes/params, for the verifier and reports."""
        yield self.embeddings
        for block in self.blocks:
            yield from (*block.norms, block.attention)
            if block.mlp is not None:
                yield block.mlp
            if isinstance(block.mlp, MoEEntry):
                yield from (e for e in (block.mlp.shared_experts, block.mlp.shared_expert_gate) if e)
        yield from (self.final_norm, self.lm_head)


def module_path(node: fx.Node) -> str | None:
    """Innermost module a node was traced in ('' for the root), or None if unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return None if path.startswith("_empty_nn_module_stack") else path


def build_structure(
    graph_module: fx.GraphModule, attention_notes: dict[int, str], mlp_name: str = MLP
) -> StructureMap:
    """The structure map of a captured graph; `mlp_name` is the family's attribute for each layer's MLP
    (`Family.mlp_name`)."""
    graph = graph_module.graph
    by_module: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "get_attr":
            path = node.target.rsplit(".", 1)[0] if "." in node.target else ""
        elif node.op == "call_function":
            path = module_path(node)
        else:
            continue
        by_module[path or ""].append(node.name)
    nodes = {n.name: n for n in graph.nodes}

    def entry(path: str, cls=Entry, **fields) -> Entry:
        prefix = path + "."
        names = [n for p, group in by_module.items() if p == path or p.startswith(prefix) for n in group]
        return cls(path, names, _tensors_read(names, nodes), **fields)

    past = [n.name for n in graph.nodes if n.op == "placeholder" and n.name.startswith("past_")]
    block_indices = sorted({int(m.group(1)) for p in by_module if (m := BLOCK_PATH.match(p))})
    blocks = [
        _block(graph_module, i, entry, nodes, by_module, past, attention_notes.get(i, ""), mlp_name)
        for i in block_indices
    ]
    prelude = [
        n
        for p, names in by_module.items()
        if not p.startswith(LAYERS) and p not in (EMBEDDINGS, FINAL_NORM, LM_HEAD)
        for n in names
    ]
    return StructureMap(entry(EMBEDDINGS), blocks, entry(FINAL_NORM), entry(LM_HEAD), prelude)


def _tensors_read(names: list[str], nodes: dict[str, fx.Node]) -> list[str]:
    """FQNs of the parameters and buffers the given nodes read (tied weights appear under the one
    name export kept, e.g. `lm_head.weight` for both the embedding and the head)."""
    found: dict[str, None] = {}
    for name in names:
        node = nodes[name]
        for source in [node] if node.op == "get_attr" else node.all_input_nodes:
            if source.op == "get_attr":
                found[source.target] = None
    return list(found)


def _block(graph_module, index, entry, nodes, by_module, past, note, mlp_name) -> BlockEntry:
    path = f"{LAYERS}.{index}"
    adds = [nodes[n] for n in by_module.get(path, []) if nodes[n].target is _RESIDUAL_ADD]
    attention = entry(
        f"{path}.{ATTENTION}", AttentionEntry, description=note, cache=_cache_entry(index, past)
    )
    first, second = [*adds, None, None][:2]
    has_mlp = second is not None
    mlp = mlp_input = mlp_output = None
    if has_mlp:
        mlp_path = f"{path}.{mlp_name}"
        route = [nodes[n] for n in entry(mlp_path).nodes if nodes[n].target is ROUTE]
        mlp = _moe_entry(graph_module, entry, mlp_path, route[0], nodes) if route else entry(mlp_path)
        inside = set(mlp.nodes)
        feeds = {
            a.name
            for n in mlp.nodes
            for a in nodes[n].all_input_nodes
            if a.name not in inside and a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)
        }
        mlp_input = next(iter(feeds)) if len(feeds) == 1 else None
        results = {n for n in mlp.nodes if any(u.name not in inside for u in nodes[n].users)}
        mlp_output = next(iter(results)) if len(results) == 1 else None
    # the layer's children named *norm*: input and post-attention norms, AFMoE's pre/post-MLP ones,
    # FlexOlmo's post-feedforward one (after an MLP drop, those the graph no longer computes are gone)
    children = dict.fromkeys(p[len(path) + 1 :].split(".")[0] for p in by_module if p.startswith(path + "."))
    norms = [entry(f"{path}.{name}") for name in children if "norm" in name]
    return BlockEntry(
        index=index,
        module=path,
        input=first.args[0].name if first is not None else "",
        output=(second or first).name if first is not None else "",
        norms=norms,
        attention=attention,
        attention_residual=first.name if first is not None else "",
        mlp=mlp,
        mlp_residual=second.name if has_mlp else None,
        mlp_input=mlp_input,
        mlp_output=mlp_output,
    )


def _cache_entry(index: int, past: list[str]) -> CacheEntry | None:
    """Outputs are (logits, *presents) with presents in the order of the past placeholders."""
    key, value = f"past_key_{index}", f"past_value_{index}"
    if key not in past or value not in past:
        return None
    return CacheEntry(key, value, 1 + past.index(key), 1 + past.index(value))


def op_args(node: fx.Node) -> dict:
    """A call's arguments by schema name (positional and keyword alike)."""
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}


def _moe_entry(graph_module, entry, path: str, route: fx.Node, nodes) -> MoEEntry:
    experts = next(u for getter in route.users for u in getter.users if u.target in EXPERT_OPS)
    logits, correction, kind, top_k, n_group, topk_group = route.args[:6]
    args = op_args(experts)
    spec = EXPERT_OPS[experts.target]

    def fqn(name: str) -> str | None:
        value = args.get(name)
        return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None

    router_linear = logits if isinstance(logits, fx.Node) else None
    router_weight = router_bias = None
    if router_linear is not None and router_linear.target is torch.ops.aten.linear.default:
        w, *rest = router_linear.args[1:]
        router_weight = _tensor_name(w)
        router_bias = _tensor_name(rest[0]) if rest else None
    shared = f"{path}.shared_experts"
    gate = f"{path}.shared_expert_gate"
    moe = entry(path, MoEEntry)
    moe.route_node, moe.experts_node = route.name, experts.name
    getters = {u.args[1]: u.name for u in route.users if u.target is operator.getitem}
    moe.route_weights, moe.route_ids = getters.get(0, ""), getters.get(1, "")
    moe.router_linear_node = router_linear.name if router_linear is not None else None
    moe.gate_up, moe.down = fqn(spec.gate_up), fqn(spec.down)
    moe.gate_up_bias, moe.down_bias = fqn("gate_up_bias"), fqn("down_bias")
    moe.num_experts = tensor_at(graph_module, moe.gate_up).shape[0]
    moe.router_rows = tensor_at(graph_module, router_weight).shape[0] if router_weight else 0
    moe.preserve_gate = bool(route.meta.get("moepass_preserve_gate", False))
    weights = args.get("topk_weights")
    moe.scales_input = getattr(weights, "target", None) is torch.ops.aten.ones_like.default
    moe.top_k, moe.routing, moe.n_group, moe.topk_group = top_k, kind, n_group, topk_group
    moe.activation = args["activation"]
    moe.router_weight, moe.router_bias = router_weight or "", router_bias
    moe.correction_bias = _tensor_name(correction)
    moe.expert_tensors = [fqn(name) for name in args if name not in ("gate_up_input_scale",) and fqn(name)]
    moe.quantization = (
        None
        if spec.layout == "dense"
        else {"bits": args["bits"], "group_size": args.get("group_size", -1), "layout": spec.layout}
    )
    moe.shared_experts = entry(shared) if entry(shared).nodes else None
    moe.shared_expert_gate = entry(gate) if entry(gate).nodes else None
    return moe


def tensor_at(graph_module: nn.Module, fqn: str) -> torch.Tensor:
    """A parameter or buffer by FQN (quantized and lowered weights are buffers)."""
    module_path, _, name = fqn.rpartition(".")
    module = graph_module.get_submodule(module_path)
    return getattr(module, name)


def arg_tensors(graph_module: fx.GraphModule, args: dict, *names: str) -> list[torch.Tensor | None]:
    """The tensors behind a call's get_attr arguments `names` (None where an argument is None)."""
    return [None if args[n] is None else tensor_at(graph_module, args[n].target) for n in names]


def _tensor_name(node) -> str | None:
    """FQN behind a get_attr node, looking through dtype casts (fp32 routers cast their weight)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args:
        node = node.args[0]
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None
