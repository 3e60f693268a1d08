"""Human-readable IR summary: one row per block, then totals (what `moepass inspect` prints)."""

from __future__ import annotations

from moepass.table import format_table, human_bytes, human_count

from .quant_ops import logical_count, packed_code_bits
from .structure import MoEEntry

QUANT_METADATA = ("_scales", "_zeros", ".scales", ".zeros", "input_scale", "_meta", ".meta")


def tensor_sizes(graph_module) -> dict[str, tuple[int, int]]:
    """FQN -> (logical parameters, bytes) of every tensor a program holds, shared tensors once.

    Packed codes count at their unpacked size; quantization scales and zero points, and buffers that
    are not weights (rotary frequencies), hold bytes but no parameters."""
    bits = packed_code_bits(graph_module)
    parameters = {id(p) for p in graph_module.parameters()}
    tensors = dict(graph_module.named_parameters(remove_duplicate=False))
    tensors.update(graph_module.named_buffers(remove_duplicate=False))
    sizes, seen = {}, set()
    for name, t in tensors.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if name in bits:
            count = logical_count(t, bits[name])
        elif id(t) in parameters and not name.endswith(QUANT_METADATA):
            count = t.numel()
        else:
            count = 0
        sizes[name] = (count, t.numel() * t.element_size())
    return sizes


def format_summary(program) -> str:
    structure, info = program.structure, program.info
    sizes = tensor_sizes(program.graph_module)

    def size(prefix: str, names: list[str] | None = None) -> tuple[int, int]:
        """Logical parameters and bytes of the tensors under `prefix` or with the given FQNs."""
        chosen = [v for n, v in sizes.items() if (n in names if names is not None else n.startswith(prefix))]
        return sum(c for c, _ in chosen), sum(b for _, b in chosen)

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
    text = f"MoE E={mlp.num_experts} top-{mlp.top_k} {mlp.routing}" + (
        " on inputs" if mlp.scales_input else ""
    )
    if mlp.quantization is not None:
        bits, sparse = mlp.quantization["bits"], mlp.quantization["layout"] == "sparse24"
        text += "".join((f" int{bits}" if bits else "", " 2:4" if sparse else ""))
    if mlp.n_group > 1:
        text += f" groups {mlp.topk_group}/{mlp.n_group}"
    if mlp.shared_experts is not None:
        text += " +shared" + (" (sigmoid-gated)" if mlp.shared_expert_gate is not None else "")
    return text
