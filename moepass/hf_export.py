"""Write a program as a stock transformers checkpoint, where its structure allows it.

Expressible: block drop (blocks are renumbered, their cache config follows) and a uniform expert
count in every MoE layer (one `num_experts` in the config). Not expressible, with the reason in the
error: a dropped MoE sub-layer (no config field skips an MLP), different expert counts per layer,
a router that kept rows for dropped experts (`preserve_gate`).
"""

from __future__ import annotations

import re

import torch

from moepass.artifact import named_tensors
from moepass.errors import MoepassError
from moepass.ir import MoEProgram
from moepass.ir.families import EXPERT_COUNT_KEYS, FAMILIES, TOP_K_KEYS
from moepass.ir.quant_ops import CODE_ARGUMENTS
from moepass.ir.sparse import SPARSE24_OPS
from moepass.ir.structure import op_args
from moepass.ir.surgery import expand_sparse24

_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class NotExpressibleError(MoepassError):
    """The program cannot be written as a stock transformers checkpoint."""


def hf_config(
    program: MoEProgram, hint: str = "; save in the moepass format instead (moepass.save(program, dir))"
) -> dict:
    """The transformers config dict `program` is written with, or NotExpressibleError ending with
    `hint`: the checks alone, cheap enough to run before an expensive step whose result would then be
    refused."""
    quantized = [
        n
        for n in program.graph_module.graph.nodes
        if n.target in CODE_ARGUMENTS and (n.target not in SPARSE24_OPS or op_args(n)["bits"])
    ]
    if quantized:
        raise NotExpressibleError(
            f"node {quantized[0].name} reads quantized weights, which no transformers checkpoint holds{hint}"
        )
    structure = program.structure
    dropped_mlp = [b.index for b in structure.blocks if b.mlp is None]
    if dropped_mlp:
        raise NotExpressibleError(
            f"blocks {dropped_mlp} have no MoE sub-layer left, which a transformers config "
            f"cannot describe{hint}"
        )
    moe = [b.mlp for b in structure.moe_blocks]
    if len({m.num_experts for m in moe}) > 1:
        counts = {b.index: b.mlp.num_experts for b in structure.moe_blocks}
        raise NotExpressibleError(
            f"MoE layers keep different expert counts {counts}; a transformers config holds one{hint}"
        )
    if any(m.preserve_gate for m in moe):
        raise NotExpressibleError(f"a router kept rows for dropped experts (preserve_gate){hint}")
    return _config(program, [b.index for b in structure.blocks], moe[0] if moe else None, hint)


def hf_checkpoint(program: MoEProgram) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """({JSON file name: document}, state dict in transformers names) for `program`, or
    NotExpressibleError. The generation config travels too: it holds the EOS and pad ids `generate`
    stops and pads with, which often differ from config.json's."""
    config = hf_config(program)
    if any(n.target in SPARSE24_OPS for n in program.graph_module.graph.nodes):
        program = program.fork()  # the checkpoint holds the pruned weights dense
        expand_sparse24(program)
    structure, family = program.structure, FAMILIES[program.info.family]
    renumber = {b.index: new for new, b in enumerate(structure.blocks)}
    state = {}
    for name, tensor in _named_tensors(program):
        match = _BLOCK.match(name)
        if match:
            old, rest = int(match.group(1)), match.group(2)
            rest, tensor = _moe_tensor(rest, tensor, family)
            name = f"model.layers.{renumber[old]}.{rest}"
        state[name] = tensor
    state = _experts_layout(state, family)
    if config.get("tie_word_embeddings"):  # one tensor; the program may hold it under either name
        head = state.pop("lm_head.weight", None)
        if state.get("model.embed_tokens.weight") is None:
            state["model.embed_tokens.weight"] = head
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floating) == 1:  # the weights' dtype, not the source config's: from_pretrained casts to it
        config["dtype"] = str(floating.pop()).removeprefix("torch.")
        config.pop("torch_dtype", None)
    # marks the directory as moepass's output (`atomic_write.OUTPUT_MARKERS`), and says what made it
    recipes = [entry["recipe"] for entry in program.info.history if "recipe" in entry]
    marker = {"format": "moepass-hf-checkpoint", "recipes": recipes}
    documents = {"config.json": config, "moepass.json": marker}
    if program.info.generation_config:
        documents["generation_config.json"] = program.info.generation_config
    return documents, state


def _config(program: MoEProgram, blocks: list[int], moe, hint: str) -> dict:
    config = dict(program.info.config)
    config["num_hidden_layers"] = len(blocks)
    if moe is not None:
        for key in EXPERT_COUNT_KEYS:
            if key in config:
                config[key] = moe.num_experts
        for key in [k for k in TOP_K_KEYS if k in config] or TOP_K_KEYS[:1]:
            config[key] = moe.top_k
    # per-layer attention kinds; GLM-4-MoE-Lite's MLP kinds; Llama-4's RoPE flags
    for key in ("layer_types", "mlp_layer_types", "no_rope_layers"):
        if isinstance(config.get(key), list):
            config[key] = [config[key][i] for i in blocks]
    kinds = [program.structure.block(i).is_moe for i in blocks]  # per kept layer: MoE or dense
    leading = next((new for new, is_moe in enumerate(kinds) if is_moe), len(kinds))
    for key in ("first_k_dense_replace", "num_dense_layers"):  # DeepSeek-V3's and AFMoE's leading dense
        if key in config:
            if not all(kinds[leading:]):
                raise NotExpressibleError(f"dense layers are no longer all before the MoE layers{hint}")
            config[key] = leading
    if "moe_layer_start_index" in config:
        config.update(_moe_layer_range(config, kinds, hint))
    if config.get("mlp_only_layers"):
        config["mlp_only_layers"] = [new for new, is_moe in enumerate(kinds) if not is_moe]
    if config.get("moe_layers") is not None:  # Llama-4 lists its MoE layers
        config["moe_layers"] = [new for new, is_moe in enumerate(kinds) if is_moe]
    if config.get("decoder_sparse_step", 1) != 1 and len(blocks) != program.info.num_layers:
        raise NotExpressibleError(
            f"decoder_sparse_step={config['decoder_sparse_step']} cannot describe the remaining layers{hint}"
        )
    config.pop("_name_or_path", None)
    return config


def _moe_layer_range(config: dict, kinds: list[bool], hint: str) -> dict:
    """ERNIE-4.5's MoE layers: every `interval`-th layer from `start` to `end`. The kept layers' kinds
    in those terms (the model's interval, else 1), or NotExpressibleError."""
    moe = [i for i, is_moe in enumerate(kinds) if is_moe]
    start, end = (moe[0], moe[-1]) if moe else (len(kinds), len(kinds))
    for interval in dict.fromkeys((config.get("moe_layer_interval", 1), 1)):
        if kinds == [(i + 1) % interval == 0 and start <= i <= end for i in range(len(kinds))]:
            return dict(moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval)
    raise NotExpressibleError(f"the remaining MoE layers {moe} are no one range of every n-th layer{hint}")


def _named_tensors(program: MoEProgram):
    for name, tensor in named_tensors(program):
        if not name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):  # from the config
            yield name, tensor.detach().contiguous().cpu()


def _moe_tensor(rest: str, tensor: torch.Tensor, family) -> tuple[str, torch.Tensor]:
    """A block tensor's name (after `model.layers.N.`) and value in the family's transformers layout."""
    mlp = family.mlp_name
    if rest == f"{mlp}.router.e_score_correction_bias":
        if family.correction_bias_to_hf:
            tensor = family.correction_bias_to_hf(tensor)
        if family.correction_bias_name:
            return f"{mlp}.{family.correction_bias_name}", tensor
    rest = rest.replace(f"{mlp}.router.", f"{mlp}.{family.router_name}.")
    return rest.replace(f"{mlp}.shared_experts.", f"{mlp}.{family.shared_name}."), tensor


def _experts_layout(state: dict, family) -> dict:
    if family.experts_to_hf is None:
        return state
    grouped: dict[str, dict] = {}
    for name in [n for n in state if f".{family.mlp_name}.experts." in n]:
        prefix, field = name.rsplit(".", 1)
        grouped.setdefault(prefix, {})[field] = state.pop(name)
    for prefix, tensors in grouped.items():
        for field, tensor in family.experts_to_hf(tensors).items():
            state[f"{prefix}.{field}"] = tensor
    return state
