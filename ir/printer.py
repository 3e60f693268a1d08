"""Human-readable IR summary: one row per block, then totals (what `moepass inspect` prints)."""

from __future__ import annotations

from moepass.table import format_table, human_bytes, human_count

from .quant_ops import packed_code_bits
from .structure import MoEEntry

QUANT_METADATA = ("_scales", "_zeros", ".scales", ".zeros", "input_scale")


def format_summary(program) -> str:
    structure, info = program.structure, program.info
    tensors = dict(program.graph_module.named_parameters(remove_duplicate=False))
    tensors.update(program.graph_module.named_buffers(remove_duplicate=False))
    bits = packed_code_bits(program.graph_module)

    def size(prefix: str, names: list[str] | None = None) -> tuple[int, int]:
        """Logical parameters (packed codes at their unpacked count; quantization scales and zero
        points are not parameters) and bytes of the tensors under `prefix` or with the given FQNs."""
        seen, count, nbytes = set(), 0, 0
        for name, t in tensors.items():
            if (name in names if names is not None else name.startswith(prefix)) and id(t) not in seen:
                seen.add(id(t))
                nbytes += t.numel() * t.element_size()
                if name in bits:
                    count += t.numel() * 8 // bits[name]
                elif not name.endswith(QUANT_METADATA):
                    count += t.numel()
        return count, nbytes

    rows = []
    for block in structure.blocks:
        count, nbytes = size(block.module + ".")
        rows.append(
            [
                block.index,
                block.attention.description,
                _mlp_description(block),
                human_count(count),
                human_bytes(nbytes),
            ]
        )
    dropped = sorted(set(range(info.num_layers)) - {b.index for b in structure.blocks})
    for index in dropped:
        rows.append([index, "(block dropped)", "", "0", "0 B"])
    rows.sort(key=lambda r: r[0])
    total_count, total_bytes = size("")
    expert_count = sum(size(f"{b.mlp.module}.experts.")[0] for b in structure.moe_blocks)
    active = total_count - sum(
        size(f"{b.mlp.module}.experts.")[0] * (1 - b.mlp.top_k / b.mlp.num_experts)
        for b in structure.moe_blocks
    )
    embed, head = size("", structure.embeddings.params), size("", structure.lm_head.params)
    tied = " (tied)" if set(structure.embeddings.params) == set(structure.lm_head.params) else ""
    header = (
        f"{info.model_class} ({info.family}), {info.dtype}, hidden {info.hidden_size}, "
        f"vocab {info.vocab_size}; graph: {len(program.graph_module.graph.nodes)} nodes"
    )
    table = format_table(["block", "attention", "mlp", "params", "bytes"], rows, title=header)
    totals = format_table(
        ["total", "params", "bytes"],
        [
            ["embeddings" + tied, human_count(embed[0]), human_bytes(embed[1])],
            ["lm_head" + tied, human_count(head[0]), human_bytes(head[1])],
            ["routed experts", human_count(expert_count), ""],
            ["active per token", human_count(active), ""],
            ["all (tied counted once)", human_count(total_count), human_bytes(total_bytes)],
        ],
    )
    return f"{table}\n\n{totals}"


def _mlp_description(block) -> str:
    mlp = block.mlp
    if mlp is None:
        return "(MLP sub-layer dropped)"
    if not isinstance(mlp, MoEEntry):
        return "dense MLP"
    text = f"MoE E={mlp.num_experts} top-{mlp.top_k} {mlp.routing}"
    if mlp.quantization is not None:
        text += f" int{mlp.quantization['bits']}"
    if mlp.n_group > 1:
        text += f" groups {mlp.topk_group}/{mlp.n_group}"
    if mlp.shared_experts is not None:
        text += " +shared" + (" (sigmoid-gated)" if mlp.shared_expert_gate is not None else "")
    return text
