"""Saving and loading compressed programs: safetensors weights plus a JSON manifest, no pickle.

    <dir>/manifest.json      format, family, transformers config, the structural edits since
                             capture (replayable), per-layer expert counts and kept original expert
                             indices, dropped MoE sub-layers and blocks, recipes and reports, versions
    <dir>/model.safetensors  every parameter and buffer of the program, by graph FQN

`load` rebuilds the model skeleton from the config (no weights are read from anywhere else),
captures it, replays the edits, then loads the tensors, so the result is the same graph and the same
outputs. Writes are atomic: everything goes to a temporary directory beside the target, which is then
renamed; an existing target is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from moepass.atomic_write import output_directory, write_atomically
from moepass.errors import ArtifactError, MoepassError
from moepass.ir import MoEProgram, capture
from moepass.ir.families import convert_moe_blocks, family_of
from moepass.ir.quant_ops import QUANTIZED_LINEAR
from moepass.ir.quantized import QuantFormat, empty_packed, in_features
from moepass.ir.structure import op_args, tensor_at
from moepass.ir.surgery import (
    drop_block,
    drop_mlp,
    keep_experts,
    kept_original_experts,
    linear_nodes,
    quantize_embedding,
    quantize_experts,
    quantize_linear,
    sparsify_experts,
    sparsify_linear,
)
from moepass.json_document import json_document

FORMAT, VERSION = "moepass-artifact", 1


def _replay_quantize_experts(program: MoEProgram, edit: dict) -> None:
    """Rebuild the op with placeholders of the right shapes (never quantized: the artifact's tensors
    replace them)."""
    moe = program.structure.block(edit["block"]).mlp
    fmt = QuantFormat(edit["bits"], edit["group_size"], edit["symmetric"])
    gate_up, down = (program.graph_module.get_parameter(n) for n in (moe.gate_up, moe.down))
    scales = {}
    if edit["input_scales"]:
        scales = {
            "gate_up_input_scale": gate_up.new_ones(gate_up.shape[-1]),
            "down_input_scale": down.new_ones(down.shape[0], down.shape[-1]),
        }
    quantize_experts(
        program, edit["block"], fmt, empty_packed(gate_up, fmt), empty_packed(down, fmt), **scales
    )


def _replay_quantize_linear(program: MoEProgram, edit: dict) -> None:
    fmt = QuantFormat(edit["bits"], edit["group_size"], edit["symmetric"])
    weight = program.graph_module.get_parameter(edit["weight"])
    scale = weight.new_ones(weight.shape[-1]) if edit["input_scale"] else None
    quantize_linear(program, edit["weight"], fmt, empty_packed(weight, fmt), input_scale=scale)


def _replay_quantize_embedding(program: MoEProgram, edit: dict) -> None:
    fmt = QuantFormat(edit["bits"], edit["group_size"], edit["symmetric"])
    table = program.graph_module.get_parameter(edit["weight"])
    quantize_embedding(program, edit["weight"], fmt, empty_packed(table, fmt))


def _placeholder_24(stored: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero (values, meta) shaped for a weight stored as `stored` (float, or codes of `bits`)."""
    k = in_features(stored, bits) if bits else stored.shape[-1]
    lead = stored.shape[:-1]
    return stored.new_zeros((*lead, stored.shape[-1] // 2)), torch.zeros((*lead, k // 8), dtype=torch.uint8)


def _replay_sparsify_linear(program: MoEProgram, edit: dict) -> None:
    node = linear_nodes(program.graph_module, edit["weight"])[0]
    bits = op_args(node)["bits"] if node.target is QUANTIZED_LINEAR else 0
    stored = tensor_at(program.graph_module, edit["weight"])
    sparsify_linear(program, edit["weight"], *_placeholder_24(stored, bits))


def _replay_sparsify_experts(program: MoEProgram, edit: dict) -> None:
    moe = program.structure.block(edit["block"]).mlp
    bits = 0 if moe.quantization is None else moe.quantization["bits"]
    gate_up, down = (
        _placeholder_24(tensor_at(program.graph_module, n), bits) for n in (moe.gate_up, moe.down)
    )
    sparsify_experts(program, edit["block"], gate_up, down)


REPLAY = {
    "drop_block": lambda program, edit: drop_block(program, edit["block"]),
    "drop_mlp": lambda program, edit: drop_mlp(program, edit["block"]),
    "keep_experts": lambda program, edit: keep_experts(
        program, edit["block"], edit["keep"], preserve_gate=edit.get("preserve_gate", False)
    ),
    "quantize_embedding": _replay_quantize_embedding,
    "quantize_experts": _replay_quantize_experts,
    "quantize_linear": _replay_quantize_linear,
    "sparsify_linear": _replay_sparsify_linear,
    "sparsify_experts": _replay_sparsify_experts,
}


def save(
    program: MoEProgram, path: str | os.PathLike, *, format: str = "moepass", overwrite: bool = False
) -> Path:
    """Write `program` to directory `path`; `format="hf"` writes a stock transformers checkpoint instead,
    where the program's structure allows it."""
    if program.info.lowered is not None:
        raise ArtifactError(
            f"this program is lowered for {program.info.lowered} (kernel-specific weight layouts); save the "
            "program before lowering it — moepass.load lowers on load"
        )
    if format not in ("moepass", "hf"):
        raise ArtifactError(f"unknown format {format!r}; choose 'moepass' or 'hf'")
    path = output_directory(path, overwrite)
    if format == "hf":
        from moepass.hf_export import hf_checkpoint

        documents, tensors = hf_checkpoint(program)  # raises before anything is written
    else:
        tensors, aliases = unique_tensors(program)
        documents = {"manifest.json": manifest_of(program, aliases)}
    return write_atomically(path, lambda staging: write_checkpoint(staging, documents, tensors), overwrite)


def write_checkpoint(directory: Path, documents: dict[str, dict], tensors: dict) -> None:
    """JSON documents by file name, and the tensors as model.safetensors."""
    for name, document in documents.items():
        (directory / name).write_text(json_document(document), encoding="utf-8")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def named_tensors(program: MoEProgram) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it has (a tied tensor appears under each)."""
    return [
        *program.graph_module.named_parameters(remove_duplicate=False),
        *program.graph_module.named_buffers(remove_duplicate=False),
    ]


def unique_tensors(program: MoEProgram) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor once (safetensors refuses shared storage); `aliases` maps the other names to it."""
    tensors, aliases, first = {}, {}, {}
    for name, tensor in named_tensors(program):
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def manifest_of(program: MoEProgram, aliases: dict[str, str]) -> dict:
    structure = program.structure
    blocks = {}
    for block in structure.blocks:
        entry = {"mlp": "dropped" if block.mlp is None else ("moe" if block.is_moe else "dense")}
        if block.is_moe:
            entry.update(
                experts=block.mlp.num_experts,
                top_k=block.mlp.top_k,
                kept_original_experts=kept_original_experts(program, block.index),
            )
        blocks[str(block.index)] = entry
    present = {b.index for b in structure.blocks}
    return {
        "format": FORMAT,
        "version": VERSION,
        "family": program.info.family,
        "model_class": program.info.model_class,
        "dtype": program.info.dtype,
        "config": program.info.config,
        "generation_config": program.info.generation_config,
        "edits": program.info.edits,
        "structure": {
            "blocks": blocks,
            "dropped_blocks": [i for i in range(program.info.num_layers) if i not in present],
            "dropped_moe_layers": [b.index for b in structure.blocks if b.mlp is None],
        },
        "history": program.info.history,
        "pruned": program.info.pruned,
        "aliases": aliases,
        "versions": {
            "moepass": _version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory `save` wrote in the moepass format."""
    return os.path.isfile(os.path.join(path, "manifest.json"))


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    lower: bool = True,
    compile: bool = False,
) -> MoEProgram:
    """A runnable program from a directory written by `save` (moepass format).

    By default it is lowered for `device` (`moepass.lower`: the fast kernels, outputs equal within
    the kernels' precision; `compile=True` adds torch.compile); `lower=False` gives the program
    exactly as saved, which can be compressed further or saved again."""
    from moepass.lowering import target_device

    if compile and not lower:
        raise ArtifactError("compile=True needs lower=True: only the lowered program is compiled")
    device = target_device(device, lowering=lower)  # before the slow rebuild
    path = Path(path)
    manifest_path = path / "manifest.json"
    manifest = _read_manifest(manifest_path)
    state = _read_tensors(path / "model.safetensors")  # before the slow rebuild: fail fast
    program = _rebuild(manifest, manifest_path, {name: t.dtype for name, t in state.items()})
    _check_tensors(state, path / "model.safetensors", manifest_path, program, manifest.get("aliases", {}))
    program.graph_module.load_state_dict(state, strict=True, assign=True)
    del state  # lowering replaces tensors: the originals must not stay alive here (peak memory)
    for module in program.graph_module.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
    program.verify()
    program.to(device)
    if lower:
        from moepass.lowering import lower as lower_program

        program = lower_program(program, copy=False, compile=compile)
    return program


def _read_manifest(manifest_path: Path) -> dict:
    path = manifest_path.parent
    if not path.is_dir():
        raise ArtifactError(f"{path} does not exist or is not a directory")
    if not manifest_path.is_file():
        hint = (
            " (it looks like a transformers checkpoint: load it with transformers)"
            if (path / "config.json").is_file()
            else " (an ONNX export? run it with moepass.OnnxProgram)"
            if (path / "model.onnx").is_file()
            else ""
        )
        raise ArtifactError(f"{path} has no manifest.json: not a moepass artifact{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({error}): the artifact is damaged") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        found = manifest if isinstance(manifest, dict) else {}
        raise ArtifactError(
            f"{manifest_path}: format {found.get('format')!r} version {found.get('version')!r} "
            f"is not {FORMAT!r} version {VERSION}"
        )
    missing = [key for key in ("config", "dtype", "edits", "structure") if key not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks {', '.join(missing)}: the artifact is damaged")
    kinds = {
        "config": dict,
        "generation_config": dict,
        "dtype": str,
        "edits": list,
        "structure": dict,
        "aliases": dict,
        "history": list,
        "pruned": dict,
    }
    for key, kind in kinds.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise ArtifactError(
                f"{manifest_path}: {key} is a {type(manifest[key]).__name__}, not a {kind.__name__}: "
                "the artifact is damaged"
            )
    return manifest


def _rebuild(manifest: dict, manifest_path: Path, dtypes: dict[str, torch.dtype]) -> MoEProgram:
    """The saved program's graph, without its tensors: the config's model, captured, with the
    manifest's edits replayed; its structure must be the one the manifest records."""
    try:
        program = capture(_skeleton(manifest, dtypes))
    except Exception as error:  # damaged config values fail anywhere in transformers or torch
        raise ArtifactError(
            f"{manifest_path}: its config does not build a model ({type(error).__name__}: {error}): "
            "the artifact is damaged"
        ) from error
    with program.batch_edits():  # the graph's code is generated once, not once per edit
        _replay(program, manifest["edits"], manifest_path)
    structure = json.loads(json.dumps(manifest_of(program, {})["structure"]))
    if structure != manifest["structure"]:
        raise ArtifactError(
            f"{manifest_path}: the structure it records differs from what its edits give: "
            "the artifact is damaged"
        )
    program.info.history = manifest.get("history", [])
    program.info.pruned = manifest.get("pruned", {})
    return program


def _replay(program: MoEProgram, edits: list, manifest_path: Path) -> None:
    """The manifest's edits in order; one that does not apply is an ArtifactError naming it."""
    for number, edit in enumerate(edits):
        if not isinstance(edit, dict):
            raise ArtifactError(f"{manifest_path}: edit {number} is not an object: the artifact is damaged")
        op = edit.get("op")
        if op not in REPLAY:
            raise ArtifactError(f"{manifest_path}: unknown edit {op!r}; written by a newer moepass?")
        try:
            REPLAY[op](program, edit)
        except (
            MoepassError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
            RuntimeError,
        ) as error:
            raise ArtifactError(
                f"{manifest_path}: edit {number} ({op}) does not apply to the model its config builds "
                f"({type(error).__name__}: {error}): the artifact is damaged"
            ) from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ArtifactError(f"{file} is missing: the artifact is incomplete")
    try:
        return load_file(str(file))
    except Exception as error:  # safetensors raises its own error type for truncated or foreign files
        raise ArtifactError(f"{file} is unreadable ({error}): the artifact is damaged") from None


def _check_tensors(
    state: dict[str, torch.Tensor], file: Path, manifest_path: Path, program: MoEProgram, aliases: dict
) -> None:
    """The artifact's tensors against the rebuilt program, name by name and shape by shape; aliases
    (one tensor under several names) are filled in."""
    for alias, name in aliases.items():
        if not isinstance(alias, str) or not isinstance(name, str):
            raise ArtifactError(f"{manifest_path}: alias {alias!r} -> {name!r} is not a pair of tensor names")
        if name in state:
            state[alias] = state[name]
    expected = dict(named_tensors(program))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{file} does not match {manifest_path.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape or state[name].dtype != tensor.dtype:
            raise ArtifactError(
                f"{file}: {name} is {_describe(state[name])} where {manifest_path.name} "
                f"gives {_describe(tensor)}: the artifact is damaged"
            )


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def _skeleton(manifest: dict, dtypes: dict[str, torch.dtype]):
    """The manifest's transformers model with its parameters allocated but never written (their pages
    stay unmapped until the artifact's tensors replace them, so they cost no resident memory) and its
    buffers zeroed, in the saved dtypes: the graph is traced on them, and a model's tensors may mix
    its dtype with float32 either way (DeepSeek's float32 router in a bf16 model loaded by
    `from_pretrained`, all bf16 after `.to(bfloat16)`; the same for rotary `inv_freq`)."""
    config_dict = dict(manifest["config"])
    model_type = config_dict.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ArtifactError(
            f"the artifact's model_type {model_type!r} is unknown to transformers {transformers.__version__}"
        )
    config = transformers.CONFIG_MAPPING[model_type].from_dict(config_dict)
    dtype = getattr(torch, manifest["dtype"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if "generation_config" in manifest:  # older artifacts: the config's defaults, as before
        model.generation_config = transformers.GenerationConfig.from_dict(manifest["generation_config"])
    # as capture would: tensors get the program's names. On the meta device still, so that the
    # converters' copies (GPT-OSS's and Llama-4's transposed experts) take no memory either
    convert_moe_blocks(model, family_of(model))
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each parameter its own storage, untying embeddings and LM head
    mixable = {dtype, torch.float32}  # any other saved dtype is damage, refused by _check_tensors
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        saved = dtypes.get(name, tensor.dtype)
        if saved != tensor.dtype and saved in mixable and tensor.dtype in mixable:
            tensor.data = torch.empty_like(tensor, dtype=saved)
    with torch.no_grad():
        for tensor in model.buffers():
            tensor.zero_()
    return model.eval()


def _version() -> str:
    from moepass import __version__

    return __version__
