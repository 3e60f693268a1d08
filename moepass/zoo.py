"""Built-in models, loadable by name with no download.

- `builtin:tiny-mixtral`, `builtin:tiny-deepseek`: small MoE models trained on the bundled corpus
  (model cards in `moepass/assets/models/<name>/MODEL_CARD.md`); use them where quality matters.
- `builtin:random-<family>`: a tiny randomly initialised model of each supported family, for tests
  and demos; only structure and speed mean anything there.
A local directory holding a transformers checkpoint loads offline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import lzma
import os
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load as safetensors_load
from tokenizers import Tokenizer
from torch import nn

from moepass.data import end_of_text_id
from moepass.errors import MoepassError
from moepass.ir.families import EXPERT_COUNT_KEYS

BUILTIN_PREFIX = "builtin:"
# a checkpoint's tokenizer: the vocabulary (tokenizer.json, or sentencepiece / BPE files) and, beside
# it, the special tokens, added tokens and chat template transformers reads
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MLA: dict[str, Any] = dict(
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)
# DeepSeek-V3's block under GQA attention (GLM-4-MoE, dots.llm1, Solar Open): 2 groups, 1 chosen
_GROUPED_GQA: dict[str, Any] = dict(
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    head_dim=16,
)
# family -> (config class, model class, config overrides for a tiny model)
RANDOM_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=96, num_local_experts=8)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=8
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, norm_topk_prob=True, head_dim=16),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=8)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _MLA,
            intermediate_size=96,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(_MLA, intermediate_size=96, q_lora_rank=32, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(_GROUPED_GQA, intermediate_size=96, use_qk_norm=True, attention_bias=True),
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",
        dict(_MLA, intermediate_size=96, q_lora_rank=32, n_group=2, topk_group=1, routed_scaling_factor=1.8),
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            _GROUPED_GQA,
            intermediate_size=96,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            sliding_window=8,
            max_window_layers=2,  # layers from the third on slide
        ),
    ),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(_GROUPED_GQA)),
    "exaone_moe": (
        "ExaoneMoeConfig",
        "ExaoneMoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            head_dim=16,
            sliding_window=8,
            sliding_window_pattern=2,  # sliding (with RoPE), full (without), sliding
        ),
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, head_dim=16, partial_rotary_factor=0.5),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            moe_num_experts=8,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            use_bias=True,
            tie_word_embeddings=False,  # as every family here; tied models have tests of their own
        ),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(intermediate_size=48, num_experts=8, head_dim=16),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(  # muP multipliers away from 1, so a graph that dropped one would compute otherwise
            intermediate_size=48,
            num_local_experts=8,
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.05,
            logits_scaling=2.0,
        ),
    ),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(intermediate_size=48, num_experts=8)),
    "afmoe": (
        "AfmoeConfig",
        "AfmoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_shared_experts=1,
            num_dense_layers=1,
            route_scale=2.5,
            head_dim=16,
            sliding_window=8,
            global_attn_every_n_layers=2,  # sliding (with RoPE), full (without), sliding
            mup_enabled=True,
        ),
    ),
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=32,  # the experts' and the shared MLP's
            intermediate_size_mlp=96,  # the dense layers'
            num_local_experts=8,
            num_experts_per_tok=1,
            head_dim=16,
            moe_layers=[1, 2],  # dense, then MoE (a list: deeper configs give their own, or None for all)
            no_rope_layer_interval=2,  # chunked with RoPE, full without (temperature-tuned), chunked
            attention_chunk_size=4,
            floor_scale=4,  # the temperature grows from position 3 on, inside the tests' lengths
            attn_scale=0.5,
        ),
    ),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=96, num_local_experts=8)),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=48,
            num_local_experts=8,
            head_dim=16,
            sliding_window=8,
            max_position_embeddings=131072,
        ),
    ),
}


def random_config(family: str, **overrides: Any):
    """A tiny config of `family` (2 routed experts per token by default); overrides win.

    `num_experts=` and `top_k=` set the routed expert count and experts per token in any family.
    """
    if family not in RANDOM_FAMILIES:
        raise MoepassError(f"no random config for family {family!r}; known: {sorted(RANDOM_FAMILIES)}")
    config_class, _, family_overrides = RANDOM_FAMILIES[family]
    kwargs = {**_COMMON, "num_experts_per_tok": 2, **family_overrides}
    if "num_experts" in overrides:
        count = overrides.pop("num_experts")
        for key in EXPERT_COUNT_KEYS:
            if key in kwargs:
                kwargs[key] = count
    if "top_k" in overrides:
        kwargs["num_experts_per_tok"] = overrides.pop("top_k")
    kwargs.update(overrides)
    return getattr(transformers, config_class)(**kwargs)


def random_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> nn.Module:
    """A tiny randomly initialised causal-LM MoE model of `family`, in eval mode.

    Tensors that initialise to one value (biases and routers' selection biases at zero, norm gains at
    one) get random perturbations, as trained checkpoints have: code that dropped, mixed up or
    misplaced them would otherwise compute the same function. Selection biases get smaller ones, of
    the size of the scores they shift (a softmax over 8 experts spreads ~0.02): larger ones would
    route every token alike.
    """
    config = random_config(family, **overrides)
    model_class = getattr(transformers, RANDOM_FAMILIES[family][1])
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            selection_bias = name.endswith("e_score_correction_bias")
            if (isinstance(tensor, nn.Parameter) or selection_bias) and _is_constant(tensor):
                tensor.add_(torch.randn_like(tensor) * (0.01 if selection_bias else 0.05))
    return _cast(model, dtype).eval()


def _is_constant(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all())


TRAINED = ("tiny-mixtral", "tiny-deepseek")


def models_dir():
    return resources.files("moepass") / "assets" / "models"


def model_name(name_or_path: str | os.PathLike) -> str:
    """A model's own name: a built-in's, or its directory's (also for `.`; "model" for `/`)."""
    return Path(os.path.abspath(str(name_or_path).removeprefix(BUILTIN_PREFIX))).name or "model"


def builtin_names() -> list[str]:
    random = [f"{BUILTIN_PREFIX}random-{family.replace('_', '-')}" for family in RANDOM_FAMILIES]
    return [f"{BUILTIN_PREFIX}{name}" for name in TRAINED] + random


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A built-in model (`builtin:<name>`) or a local transformers checkpoint, loaded offline, eval mode.

    Bundled models are stored in bf16 and load as float32 unless `dtype` says otherwise (fp32 is
    about 3x faster than bf16 on CPUs without native bf16).
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name in TRAINED:
            return _load_bundled(name, dtype or torch.float32)
        family = name.removeprefix("random-").replace("-", "_")
        if not name.startswith("random-") or family not in RANDOM_FAMILIES:
            raise MoepassError(
                f"unknown built-in model {name_or_path!r}; built-ins: {', '.join(builtin_names())}"
            )
        return random_model(family, dtype=dtype or torch.float32)
    path = _checkpoint_dir(name_or_path)
    with _readable(path, "a transformers causal LM checkpoint"):
        # use_kernels=False: transformers >= 5.25 swaps some layers' forwards for hub kernels by default
        # (on CUDA: RMSNorm, SiLU, RoPE; fetched from the Hub); capture wants the plain modules
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype or "auto", use_kernels=False
        )
    return model.eval()


@contextlib.contextmanager
def _readable(path: str, what: str) -> Iterator[None]:
    """transformers, safetensors and tokenizers raise their own error types for a damaged or foreign
    checkpoint (bad JSON, unknown model_type, missing or truncated weights): name the directory."""
    try:
        yield
    except MoepassError:
        raise
    except Exception as error:
        message = " ".join(str(error).split())[:400]
        raise MoepassError(f"{path} cannot be read as {what} ({type(error).__name__}: {message})") from None


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a built-in model, of a local checkpoint directory, or a tokenizer.json file."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        with _readable(name_or_path, "a tokenizers JSON file"):
            return Tokenizer.from_file(name_or_path)
    if name_or_path.startswith(BUILTIN_PREFIX):
        directory = trained_model_dir(name_or_path)
        if directory is None:
            raise MoepassError(
                f"{name_or_path!r} has no tokenizer; built-ins with one: "
                + ", ".join(BUILTIN_PREFIX + n for n in TRAINED)
            )
        return Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    if os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):  # checkpoint or moepass artifact
        tokenizer = load_tokenizer(os.path.join(name_or_path, "tokenizer.json"))
        if end_of_text_id(tokenizer) is None and _names_eos(name_or_path):
            # an end-of-text token only tokenizer_config.json names (eos_token): transformers reads it
            with contextlib.suppress(MoepassError):  # else data packing names the missing token
                return _transformers_tokenizer(name_or_path)
        return tokenizer
    if not os.path.isfile(os.path.join(name_or_path, "config.json")) and any(
        os.path.isfile(os.path.join(name_or_path, f)) for f in ("manifest.json", "model.onnx")
    ):
        raise MoepassError(
            f"{name_or_path!r} holds no tokenizer (written without one); load the original model's "
            "(its checkpoint directory or tokenizer.json; CLI: --tokenizer)"
        )
    path = _checkpoint_dir(name_or_path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):  # else transformers
        raise MoepassError(  # blames a missing sentencepiece or tiktoken package
            f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass the model's tokenizer "
            "(its checkpoint directory or tokenizer.json; CLI: --tokenizer)"
        )
    return _transformers_tokenizer(path)


def load_chat_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a model directory (checkpoint, moepass artifact or ONNX export) through
    transformers, which reads the chat template beside it (chat_template.jinja or
    tokenizer_config.json): instruct models answer well only to prompts in their template."""
    name_or_path = os.fspath(name_or_path)
    builtin = name_or_path.startswith(BUILTIN_PREFIX)
    directory = trained_model_dir(name_or_path) if builtin else name_or_path
    if directory is None or not os.path.isdir(directory):
        raise MoepassError(
            f"{name_or_path!r} is no model directory, and a chat template lives in one (beside the "
            "tokenizer); pass the checkpoint directory"
        )
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        load_tokenizer(name_or_path)  # raises, naming what the directory lacks, as without --chat
    tokenizer = _transformers_tokenizer(directory)
    if not getattr(tokenizer, "chat_template", None):
        raise MoepassError(
            f"{name_or_path} has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json): a base model continues text as it is"
        )
    return tokenizer


def chat_prompt_ids(tokenizer, message: str, system: str | None = None) -> list[int]:
    """A user message (after an optional system one) in the tokenizer's chat template, ready for the
    assistant's reply. Rendered to text, then tokenized without added special tokens: the template
    writes its own (a second BOS would shift what the model sees)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": message}
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja's TemplateError, or what the template raises itself
        raise MoepassError(f"the model's chat template refused the messages: {error}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _names_eos(directory: str) -> bool:
    """tokenizer_config.json beside the vocabulary names an EOS token (data packs it between documents)."""
    path = os.path.join(directory, "tokenizer_config.json")
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
        return isinstance(config, dict) and bool(config.get("eos_token"))
    return False


def _transformers_tokenizer(path: str):
    with _readable(path, "a tokenizer transformers can load (pass another with --tokenizer)"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    # with no vocabulary files, transformers builds some tokenizer classes (Qwen2, GPT-NeoX) empty: every
    # text would become no tokens, and perplexity the vocabulary size at 100% accuracy
    if not tokenizer("a tokenizer reads this", add_special_tokens=False)["input_ids"]:
        raise MoepassError(
            f"{path} holds no tokenizer vocabulary: transformers built an empty {type(tokenizer).__name__} "
            "from it; pass the model's tokenizer (CLI: --tokenizer)"
        )
    return tokenizer


def trained_model_dir(name: str) -> str | None:
    """The bundled directory of a trained built-in (`builtin:tiny-mixtral`), else None."""
    bundled = name.removeprefix(BUILTIN_PREFIX)
    return str(models_dir() / bundled) if name.startswith(BUILTIN_PREFIX) and bundled in TRAINED else None


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """Write `tokenizer` into `directory`: a `tokenizers.Tokenizer`, a transformers tokenizer, a
    tokenizer.json file, or a checkpoint directory (or built-in model name) whose tokenizer files are
    copied as they are — the special tokens and chat template transformers needs live beside
    tokenizer.json, not in it."""
    if isinstance(tokenizer, (str, os.PathLike)):
        source = os.fspath(tokenizer)
        source = trained_model_dir(source) or source  # a built-in's files with its tokenizer_config.json
        files = [source] if os.path.isfile(source) else [os.path.join(source, f) for f in TOKENIZER_FILES]
        found = [f for f in files if os.path.isfile(f)]
        if not found:
            raise MoepassError(f"{source!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        for file in found:
            name = "tokenizer.json" if file == source else os.path.basename(file)
            shutil.copyfile(file, os.path.join(directory, name))
    elif isinstance(tokenizer, Tokenizer):
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
    else:
        tokenizer.save_pretrained(directory)


def _checkpoint_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise MoepassError(
            f"{path!r} is neither a built-in model ({', '.join(builtin_names())}) nor a local "
            f"directory; moepass loads models offline only"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = (
            " (it holds an ONNX export: `moepass generate --onnx` and `moepass eval` run it, "
            "moepass.OnnxProgram in Python)"
            if os.path.isfile(os.path.join(path, "model.onnx"))
            else ""
        )
        raise MoepassError(
            f"{path!r} has no config.json nor manifest.json: neither a transformers checkpoint nor a "
            f"moepass artifact{hint}"
        )
    return path


def _load_bundled(name: str, dtype: torch.dtype) -> nn.Module:
    """Config + xz-compressed bf16 safetensors (the decompressed bytes are a plain safetensors file)."""
    directory = models_dir() / name
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    with resources.as_file(directory / "model.safetensors.xz") as path:
        state = safetensors_load(lzma.decompress(path.read_bytes()))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = {name for name, p in model.named_parameters() if p.is_meta}
    if missing:
        raise MoepassError(f"bundled model {name!r} is missing tensors: {sorted(missing)[:5]}")
    _materialize_buffers(model, config)
    return _cast(model, dtype).eval()


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast as `from_pretrained(dtype=...)` loads: parameters and saved buffers take `dtype`, except
    what the model class keeps in float32 (DeepSeek's router: `_keep_in_fp32_modules_strict` for bf16
    and fp16, `_keep_in_fp32_modules` for fp16), and buffers computed at init (rotary `inv_freq`) keep
    the float32 they were computed in. A plain `.to(dtype)` would route and rotate less precisely than
    the same model loaded from a checkpoint."""
    keep = set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    spared = []  # (slots, name, tensor, data it keeps): `.to` swaps a parameter's data in place
    for module_name, module in model.named_modules():
        for slots in (module._parameters, module._buffers):
            for name, tensor in slots.items():
                if tensor is None:
                    continue
                if any(f".{pattern}." in f".{module_name}.{name}." for pattern in keep):
                    spared.append((slots, name, tensor, tensor.data.float()))
                elif slots is module._buffers and name in module._non_persistent_buffers_set:
                    spared.append((slots, name, tensor, tensor.data))
    model.to(dtype)
    for slots, name, tensor, data in spared:
        slots[name] = tensor
        tensor.data = data
    return model


def _materialize_buffers(model: nn.Module, config) -> None:
    """Rotary tables and other non-persistent buffers are not in the checkpoint: rebuild them."""
    fresh = None
    for module_name, module in model.named_modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if fresh is None:
                    fresh = dict(transformers.AutoModelForCausalLM.from_config(config).named_buffers())
                module._buffers[buffer_name] = fresh[f"{module_name}.{buffer_name}".lstrip(".")]
