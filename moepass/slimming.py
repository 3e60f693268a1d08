"""What Expert Slimming compresses, and what it covered.

Targets are found through the structure map, never by module names: the routed experts of every
MoE sub-layer (the fused 3-D tensors, each expert's gate/up and down projection), the shared
experts, attention projections, dense MLPs and (opt-in, quantization only) the LM head and the
embedding table. Routers and shared-expert
gates are never compressed. `coverage` tells, per category, how much was compressed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from moepass.ir import MoEEntry, MoEProgram
from moepass.ir.printer import QUANT_METADATA
from moepass.ir.quant_ops import QUANTIZED_EMBEDDING, QUANTIZED_LINEAR, logical_count, packed_code_bits
from moepass.ir.sparse import SPARSE24_LINEAR
from moepass.ir.surgery import kept_original_experts
from moepass.passes.base import ConfigError
from moepass.table import format_table, human_bytes, human_count

CATEGORIES = ("experts", "shared_experts", "attention", "dense_mlp", "lm_head", "embeddings")
DEFAULT_TARGETS = ("experts", "shared_experts", "attention", "dense_mlp")
QUANTIZATION_ONLY = ("lm_head", "embeddings")  # pruning them is not part of the method
_LINEAR = torch.ops.aten.linear.default
logger = logging.getLogger("moepass")


@dataclass(frozen=True)
class LinearTarget:
    category: str
    block: int | None
    weight: str  # FQN
    node: str  # the linear node
    input: str  # the node it reads
    role: str  # q/k/v/o, gate/up/down, head: used to order GPTQ's sequential groups


def linear_targets(program: MoEProgram, categories: tuple[str, ...]) -> list[LinearTarget]:
    structure = program.structure
    nodes = {n.name: n for n in program.graph_module.graph.nodes}
    found: list[LinearTarget] = []

    def collect(category: str, block: int | None, names: list[str]) -> None:
        for name in names:
            node = nodes[name]
            if node.target in (QUANTIZED_LINEAR, SPARSE24_LINEAR):
                where = f"layer {block}" if block is not None else "after the last layer"
                module = node.args[1].target.rpartition(".")[0]  # the packed weight's owner
                raise ConfigError(
                    f"{module} ({category}, {where}) is already compressed ({node.target.name()}); "
                    f"prune before quantizing, quantize once, or leave {category!r} out of targets"
                )
            weight = node.args[1] if node.target is _LINEAR else None
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and node.args[0].op != "get_attr":
                role = weight.target.rsplit(".", 2)[-2]
                found.append(LinearTarget(category, block, weight.target, name, node.args[0].name, role))

    for block in structure.blocks:
        if "attention" in categories:
            collect("attention", block.index, block.attention.nodes)
        mlp = block.mlp
        if isinstance(mlp, MoEEntry):
            if "shared_experts" in categories and mlp.shared_experts is not None:
                collect("shared_experts", block.index, mlp.shared_experts.nodes)
        elif mlp is not None and "dense_mlp" in categories:
            collect("dense_mlp", block.index, mlp.nodes)
    if "lm_head" in categories:
        collect("lm_head", None, structure.lm_head.nodes)
    return found


def embedding_target(program: MoEProgram, categories: tuple[str, ...]) -> str | None:
    """FQN of the embedding table when `categories` opt into it (an already quantized one is an error)."""
    if "embeddings" not in categories:
        return None
    nodes = {n.name: n for n in program.graph_module.graph.nodes}
    for name in program.structure.embeddings.nodes:
        if nodes[name].target is QUANTIZED_EMBEDDING:
            raise ConfigError(
                "the embedding table is already quantized; quantize it once, or leave 'embeddings' out"
            )
        if nodes[name].target is torch.ops.aten.embedding.default:
            return nodes[name].args[0].target
    raise ConfigError("no embedding table found to quantize; leave 'embeddings' out of targets")


def expert_blocks(program: MoEProgram, categories: tuple[str, ...]) -> list[int]:
    """The MoE blocks whose routed experts a pass targeting `categories` compresses: all of them, or
    none without "experts". Experts already quantized are an error, not skipped: a recipe that
    quantizes and then prunes or quantizes again would otherwise report work it did not do."""
    if "experts" not in categories:
        return []
    for block in program.structure.moe_blocks:
        if block.mlp.quantization is not None:
            raise ConfigError(
                f"layer {block.index}'s routed experts are already stored as {block.mlp.quantization}; "
                "prune before quantizing, quantize once, or leave 'experts' out of targets"
            )
    return [b.index for b in program.structure.moe_blocks]


# Bytes of float64 input statistics (Hessians [K, K]) held at once for one MoE layer's experts: more
# experts are taken in groups, each one more pass over the calibration set (DeepSeek-V3's 256 experts
# hold 256 x 7168^2 x 8 B = 105 GB of gate/up Hessians)
HESSIAN_BUDGET_BYTES = 8 * 2**30


def expert_groups(num_experts: int, bytes_per_expert: int, name: str) -> list[range]:
    """Experts in consecutive groups whose statistics fit HESSIAN_BUDGET_BYTES (one expert at least)."""
    size = max(1, HESSIAN_BUDGET_BYTES // max(bytes_per_expert, 1))
    groups = [range(start, min(start + size, num_experts)) for start in range(0, num_experts, size)]
    if len(groups) > 1:
        logger.info(
            "%s: %d experts' statistics (%.1f GB) in %d groups, one calibration pass each",
            name,
            num_experts,
            num_experts * bytes_per_expert / 1e9,
            len(groups),
        )
    return groups


def fallback_experts(program: MoEProgram, fallbacks: dict[int, list[int]]) -> dict[str, list[int]]:
    """Per layer, the experts that fell back for want of routed tokens, by the ids the checkpoint gives
    them (an earlier expert drop renumbers the ones it keeps)."""
    return {
        str(layer): [kept_original_experts(program, layer)[e] for e in experts]
        for layer, experts in fallbacks.items()
        if experts
    }


def routed_rows(ids: torch.Tensor, expert: int) -> torch.Tensor:
    """Token rows routed to `expert` in any slot (each once)."""
    return (ids == expert).any(dim=-1).nonzero(as_tuple=True)[0]


def categorize(program: MoEProgram) -> dict[str, str]:
    """Tensor FQN -> category, for coverage reports."""
    structure = program.structure
    out: dict[str, str] = {}

    def mark(names, category):
        for name in names or []:
            if name:
                out.setdefault(name, category)

    for block in structure.blocks:
        mark(block.attention.params, "attention")
        for norm in block.norms:
            mark(norm.params, "norms")
        if isinstance(block.mlp, MoEEntry):
            moe = block.mlp
            mark([moe.router_weight, moe.router_bias, moe.correction_bias], "router")
            mark([moe.gate_up_bias, moe.down_bias], "biases")
            if moe.shared_expert_gate is not None:
                mark(moe.shared_expert_gate.params, "router")
            mark(moe.expert_tensors, "routed experts")
            if moe.shared_experts is not None:
                mark(moe.shared_experts.params, "shared experts")
        elif block.mlp is not None:
            mark(block.mlp.params, "dense mlp")
    mark(structure.embeddings.params, "embeddings")
    mark(structure.lm_head.params, "lm_head")
    mark(structure.final_norm.params, "norms")
    prelude = set(structure.prelude)  # rotary frequency tables
    mark(
        [n.target for n in program.graph_module.graph.nodes if n.op == "get_attr" and n.name in prelude],
        "positions",
    )
    # tensors a pass installed beside known ones (AWQ's input scales) belong to the same module's
    # weights, not to its biases (GPT-OSS's experts module holds both)
    owners: dict[str, str] = {}
    for name, category in out.items():
        if category != "biases":
            owners.setdefault(name.rpartition(".")[0], category)
    graph_module = program.graph_module
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in out and name.rpartition(".")[0] in owners:
            out[name] = owners[name.rpartition(".")[0]]
    return out


def coverage(program: MoEProgram, before: dict[str, tuple[int, int]] | None = None) -> dict[str, dict]:
    """Per category: logical parameters, compressed parameters, bytes (and bytes before, if given).

    A parameter counts as compressed when it is stored in a quantized format (its packed codes,
    counted at their logical size) or recorded as pruned in `program.info.compressed`."""
    categories = categorize(program)
    bits = packed_code_bits(program.graph_module)
    pruned = set(program.info.pruned)
    tensors = dict(program.graph_module.named_parameters())
    tensors.update(program.graph_module.named_buffers())
    table: dict[str, dict] = {}
    seen = set()
    for name, tensor in tensors.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        category = categories.get(name, "other")
        row = table.setdefault(category, {"params": 0, "compressed": 0, "bytes": 0})
        row["bytes"] += tensor.numel() * tensor.element_size()
        if name in bits:
            logical = logical_count(tensor, bits[name])
            row["params"] += logical
            row["compressed"] += logical
        elif name.endswith(QUANT_METADATA):
            continue  # quantization metadata: bytes, not parameters
        else:
            row["params"] += tensor.numel()
            row["compressed"] += tensor.numel() if name in pruned else 0
    for category, row in table.items():
        row["share"] = row["compressed"] / row["params"] if row["params"] else 0.0
        if before is not None:
            row["bytes_before"] = before.get(category, {}).get("bytes", 0)  # new: a tied head's copy
    return table


def coverage_table(table: dict[str, dict], title: str = "Compression coverage") -> str:
    order = [
        "routed experts",
        "shared experts",
        "attention",
        "dense mlp",
        "router",
        "biases",
        "embeddings",
        "lm_head",
        "norms",
        "positions",
        "other",
    ]
    rows = []
    for category in sorted(table, key=lambda c: order.index(c) if c in order else len(order)):
        row = table[category]
        rows.append(
            [
                category,
                human_count(row["params"]),
                human_count(row["compressed"]),
                f"{100 * row['share']:.1f}%",
                human_bytes(row.get("bytes_before", row["bytes"])),
                human_bytes(row["bytes"]),
            ]
        )
    return format_table(
        ["category", "params", "compressed", "share", "bytes before", "bytes after"], rows, title=title
    )
