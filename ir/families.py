"""Supported model families: how each one's MoE block maps onto the canonical `SparseMoE`.

A family is found through `FAMILIES` by `config.model_type`; everything family-specific in moepass
lives here (routing math, weight layout, shared experts, attention description). After capture,
passes see only canonical ops and the structure map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moepass.errors import NotAnMoEModelError, UnsupportedModelError

from .moe_block import Experts, Router, RoutingSpec, SparseMoE
from .ops import ACTIVATIONS


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers `config.model_type`
    display: str
    moe_block_classes: tuple[str, ...]  # class names of the family's sparse-MoE blocks
    convert: Callable[[nn.Module, object], SparseMoE]
    attention_notes: tuple[str, ...] = ()  # shown by the printer, e.g. "sinks"
    router_name: str = "gate"  # transformers' attribute names inside the MoE block,
    shared_name: str = "shared_experts"  # used to write checkpoints back in its layout
    correction_bias_name: str | None = None  # where the block holds a selection bias the router does not
    correction_bias_to_hf: Callable[[torch.Tensor], torch.Tensor] | None = None  # its transformers shape
    experts_to_hf: Callable[[dict], dict] | None = None  # canonical expert tensors -> transformers layout
    mlp_name: str = "mlp"  # the decoder layer's attribute holding its MLP or MoE block
    rotary_in_layer: Callable[[object, int], bool] | None = None  # (config, layer); default: every layer


FAMILIES: dict[str, Family] = {}
# config keys naming the routed expert count, and the experts per token, across families
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k")


def _register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def supported_families() -> list[str]:
    return [family.display for family in FAMILIES.values()]


def family_of(model: nn.Module) -> Family:
    """The family of a transformers causal-LM MoE model, or a clear error naming what is wrong."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a supported model: moepass.capture takes a transformers "
            f"causal-LM model object (e.g. from AutoModelForCausalLM) of these families: "
            f"{', '.join(supported_families())}."
        )
    config = model.config
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    text = getattr(config, "text_config", None)
    if family is None and getattr(text, "model_type", None) in FAMILIES:  # a multimodal checkpoint
        display = FAMILIES[text.model_type].display
        raise UnsupportedModelError(
            f"{type(model).__name__} is multimodal; moepass compresses its {display} text model: load "
            f"that with AutoModelForCausalLM.from_pretrained(<its checkpoint>) (or give the checkpoint "
            f"directory to the `moepass` CLI), which reads the text weights only"
        )
    if family is None:
        kind = "dense (non-MoE) model" if _looks_dense(model) else "model"
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported {kind}. "
            f"moepass captures causal-LM MoE models of these families: {', '.join(supported_families())}."
        )
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a {family.display} model but not a causal LM with an LM head; "
            f"pass the ...ForCausalLM class (e.g. AutoModelForCausalLM)."
        )
    if not any(
        type(m).__name__ in family.moe_block_classes or isinstance(m, SparseMoE)  # already converted
        for m in model.model.layers.modules()
    ):
        raise NotAnMoEModelError(
            f"{type(model).__name__} has no MoE layers (every layer is a dense MLP with this config); "
            f"there is nothing for moepass to compress. "
            f"Supported families: {', '.join(supported_families())}."
        )
    return family


def _looks_dense(model: nn.Module) -> bool:
    return not any(
        "moe" in type(m).__name__.lower() or "expert" in type(m).__name__.lower() for m in model.modules()
    )


def convert_moe_blocks(model: nn.Module, family: Family) -> int:
    """Replace each MoE block under `model.model.layers` by a canonical `SparseMoE`; returns the count."""
    count = 0
    for index, layer in enumerate(model.model.layers):
        for name, child in list(layer.named_children()):
            if type(child).__name__ in family.moe_block_classes:
                try:
                    setattr(layer, name, family.convert(child, model.config))
                except UnsupportedModelError as error:
                    raise UnsupportedModelError(f"layer {index} ({type(child).__name__}): {error}") from None
                count += 1
    return count


def attention_description(config, layer: int, family: Family) -> str:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "kv_lora_rank", None):  # DeepSeek multi-head latent attention
        q = f"q_lora {config.q_lora_rank}" if getattr(config, "q_lora_rank", None) else "full q"
        parts = [f"MLA {heads}h, kv_lora {config.kv_lora_rank}, {q}, rope {config.qk_rope_head_dim}"]
    else:
        kind = "MHA" if kv_heads == heads else ("MQA" if kv_heads == 1 else "GQA")
        parts = [f"{kind} {heads}q/{kv_heads}kv x{head_dim}"]
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None)
    use_sliding = getattr(config, "use_sliding_window", True)
    if layer_types is not None and layer < len(layer_types):
        if layer_types[layer] == "sliding_attention" and sliding:
            parts.append(f"sliding {sliding}")
        if layer_types[layer] == "chunked_attention" and getattr(config, "attention_chunk_size", None):
            parts.append(f"chunked {config.attention_chunk_size}")  # Llama-4: causal within each chunk
    elif sliding and use_sliding:
        parts.append(f"sliding {sliding}")
    if family.rotary_in_layer is not None and not family.rotary_in_layer(config, layer):
        parts.append("no RoPE")
        if getattr(config, "attn_temperature_tuning", False):  # Llama-4: queries scaled by position
            parts.append(f"temperature step {config.floor_scale}")
    return ", ".join([*parts, *family.attention_notes])


# ---------------------------------------------------------------------------------------------
# Converters: read the HF block's own attributes (not the config) so edited models convert as-is.
# ---------------------------------------------------------------------------------------------
def _experts(block: nn.Module, config) -> Experts:
    ex = block.experts
    _check_activation(getattr(ex, "act_fn", None), config.hidden_act)
    return Experts(ex.gate_up_proj, ex.down_proj, activation=config.hidden_act)


def _check_activation(act_fn: nn.Module | None, name: str) -> None:
    """The experts' own `act_fn` must compute what `config.hidden_act` names: artifacts and HF export
    rebuild the model from its config, so following either one alone would silently change an
    edited model's function somewhere. Compared on sample values, whatever class implements it."""
    if name not in ACTIVATIONS or name == "clamped_swiglu":
        raise UnsupportedModelError(
            f"config.hidden_act={name!r} is not an expert activation moepass supports "
            f"({', '.join(a for a in ACTIVATIONS if a != 'clamped_swiglu')})"
        )
    if act_fn is None:
        return
    x = torch.linspace(-8.0, 8.0, 161)
    with torch.no_grad():
        expected = ACTIVATIONS[name](torch.cat([x, torch.ones_like(x)]), 0.0, 0.0)
        got = act_fn(x)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(
            f"the experts' act_fn ({type(act_fn).__name__}) does not compute config.hidden_act={name!r}; "
            "moepass rebuilds models from their config (artifacts, HF export), so the two must agree: "
            "set config.hidden_act to what the modules compute, or the modules to what it names"
        )


def _softmax_router(gate: nn.Module, renormalize: bool) -> tuple[Router, RoutingSpec]:
    return Router(gate.weight, None, None, fp32=False), RoutingSpec(
        "softmax_topk", gate.top_k, renormalize=renormalize
    )


def _convert_mixtral(block, config) -> SparseMoE:
    router, spec = _softmax_router(block.gate, renormalize=True)
    return SparseMoE(router, _experts(block, config), spec)


def _convert_qwen_olmoe(block, config) -> SparseMoE:
    router, spec = _softmax_router(block.gate, renormalize=bool(block.gate.norm_topk_prob))
    return SparseMoE(router, _experts(block, config), spec)


def _convert_qwen2_moe(block, config) -> SparseMoE:
    router, spec = _softmax_router(block.gate, renormalize=bool(block.gate.norm_topk_prob))
    return SparseMoE(router, _experts(block, config), spec, block.shared_expert, block.shared_expert_gate)


def _convert_deepseek_v2(block, config) -> SparseMoE:
    gate = block.gate
    grouped = gate.topk_method == "group_limited_greedy"
    spec = RoutingSpec(
        "softmax_topk",
        gate.top_k,
        n_group=gate.num_group if grouped else 1,
        topk_group=gate.topk_group if grouped else 1,
        scale=float(gate.routed_scaling_factor),
    )
    router = Router(gate.weight, None, None, fp32=True)
    return SparseMoE(router, _experts(block, config), spec, block.shared_experts)


def _convert_deepseek_v3(block, config) -> SparseMoE:
    gate = block.gate
    spec = RoutingSpec(
        "sigmoid_topk",
        gate.top_k,
        n_group=gate.num_group,
        topk_group=gate.topk_group,
        renormalize=bool(gate.norm_topk_prob),
        scale=float(gate.routed_scaling_factor),
    )
    router = Router(gate.weight, None, gate.e_score_correction_bias, fp32=True)
    return SparseMoE(router, _experts(block, config), spec, block.shared_experts)


def _convert_minimax_m2(block, config) -> SparseMoE:
    """DeepSeek-V3's sigmoid routing without groups or scaling; the selection bias is the block's."""
    spec = RoutingSpec("sigmoid_topk", block.gate.top_k, renormalize=True)
    router = Router(block.gate.weight, None, block.e_score_correction_bias, fp32=False)
    return SparseMoE(router, _experts(block, config), spec)


def _convert_ernie4_5_moe(block, config) -> SparseMoE:
    """Softmax top-k with a selection-only bias (stored [1, E]), renormalized: the sum it clamps at
    `moe_norm_min` is at least k/E for k of E softmax probabilities."""
    gate = block.gate
    bias = gate.moe_statics.e_score_correction_bias.reshape(-1)
    spec = RoutingSpec("softmax_topk", gate.top_k, renormalize=True)
    router = Router(gate.weight, None, bias, fp32=True)
    return SparseMoE(router, _experts(block, config), spec, block.shared_experts)


def _convert_hunyuan_v1_moe(block, config) -> SparseMoE:
    """Mixtral's renormalized softmax top-k, plus an always-on shared MLP. The router is `gate.wg`,
    built in fp32 whatever the model's dtype: its logits are fp32 while it stays so."""
    gate = block.gate
    fp32 = gate.wg.weight.dtype == torch.float32
    spec = RoutingSpec("softmax_topk", gate.top_k, renormalize=True)
    return SparseMoE(
        Router(gate.wg.weight, None, None, fp32=fp32), _experts(block, config), spec, block.shared_mlp
    )


def _convert_granitemoe(block, config) -> SparseMoE:
    """transformers takes the top-k logits and a softmax over those k (in fp32): the same experts and
    weights as Mixtral's renormalized softmax top-k, which onnxruntime's MoE op routes by itself."""
    router, spec = _softmax_router(block.router, renormalize=True)
    return SparseMoE(router, _experts(block, config), spec)


def _convert_afmoe(block, config) -> SparseMoE:
    """DeepSeek-V3's sigmoid routing without groups: the selection bias is the block's `expert_bias`,
    the renormalized weights are scaled by `route_scale`; an always-on shared MLP."""
    gate = block.router.gate
    spec = RoutingSpec(
        "sigmoid_topk", block.router.top_k, renormalize=True, scale=float(block.router.route_scale)
    )
    router = Router(gate.weight, None, block.expert_bias, fp32=False)
    return SparseMoE(router, _experts(block, config), spec, block.shared_experts)


def _convert_llama4(block, config) -> SparseMoE:
    """Top-1 on the router's logits, weighted by the chosen logit's sigmoid, which scales the expert's
    input; experts stored transposed ([E, H, 2I], gate then up); an always-on shared MLP."""
    if block.router.top_k != 1:  # the router's own count is the one its forward uses
        raise UnsupportedModelError(
            f"num_experts_per_tok={block.router.top_k}: Llama-4's routing weight scales its expert's input, "
            "which moepass expresses for one expert per token only (every released Llama-4 routes to 1)"
        )
    ex = block.experts
    _check_activation(ex.act_fn, config.hidden_act)
    experts = Experts(
        ex.gate_up_proj.transpose(1, 2).contiguous(),
        ex.down_proj.transpose(1, 2).contiguous(),
        activation=config.hidden_act,
    )
    router = Router(block.router.weight, None, None, fp32=False)
    spec = RoutingSpec("topk_sigmoid", 1)
    return SparseMoE(
        router, experts, spec, block.shared_expert, returns_router_scores=True, scales_input=True
    )


def _transposed_experts_to_hf(tensors: dict) -> dict:
    """Inverse of `_convert_llama4`: both projections transposed back ([E, H, 2I], [E, I, H])."""
    return {name: t.transpose(1, 2).contiguous() for name, t in tensors.items()}


def _convert_phimoe(block, config) -> SparseMoE:
    router = block.router
    spec = RoutingSpec("sparsemixer", 2, jitter_eps=float(router.router_jitter_noise))
    return SparseMoE(Router(router.weight, router.bias, None, fp32=False), _experts(block, config), spec)


def _convert_gpt_oss(block, config) -> SparseMoE:
    """GPT-OSS stores experts transposed with gate/up interleaved: [E, H, 2I], gate = [..., ::2]."""
    ex = block.experts
    gate_up = torch.cat([ex.gate_up_proj[..., ::2], ex.gate_up_proj[..., 1::2]], dim=-1)
    gate_up_bias = torch.cat([ex.gate_up_proj_bias[..., ::2], ex.gate_up_proj_bias[..., 1::2]], dim=-1)
    experts = Experts(
        gate_up.transpose(1, 2).contiguous(),
        ex.down_proj.transpose(1, 2).contiguous(),
        gate_up_bias.contiguous(),
        ex.down_proj_bias,
        activation="clamped_swiglu",
        alpha=float(ex.alpha),
        limit=float(ex.limit),
    )
    router = Router(block.router.weight, block.router.bias, None, fp32=False)
    spec = RoutingSpec("topk_softmax", block.router.top_k)
    return SparseMoE(router, experts, spec, returns_router_scores=True)


def _gpt_oss_experts_to_hf(tensors: dict) -> dict:
    """Inverse of `_convert_gpt_oss`: [E, 2I, H] gate-then-up -> [E, H, 2I] interleaved, down transposed."""
    out = {}
    for name, t in tensors.items():
        if name in ("gate_up_proj", "gate_up_proj_bias"):
            half = t.shape[-2 if name == "gate_up_proj" else -1] // 2
            if name == "gate_up_proj":
                t = t.transpose(1, 2)
            gate, up = t[..., :half], t[..., half:]
            t = torch.stack([gate, up], dim=-1).flatten(-2)
        elif name == "down_proj":
            t = t.transpose(1, 2)
        out[name] = t.contiguous()
    return out


_register(Family("mixtral", "Mixtral", ("MixtralSparseMoeBlock",), _convert_mixtral))
_register(
    Family(
        "qwen2_moe", "Qwen2-MoE", ("Qwen2MoeSparseMoeBlock",), _convert_qwen2_moe, shared_name="shared_expert"
    )
)
_register(Family("qwen3_moe", "Qwen3-MoE", ("Qwen3MoeSparseMoeBlock",), _convert_qwen_olmoe, ("qk-norm",)))
_register(Family("olmoe", "OLMoE", ("OlmoeSparseMoeBlock",), _convert_qwen_olmoe, ("qk-norm",)))
# FlexOlmo: OLMoE's block in OLMo-2's layers, which norm each sub-layer's output instead of its input
_register(Family("flex_olmo", "FlexOlmo", ("FlexOlmoSparseMoeBlock",), _convert_qwen_olmoe, ("qk-norm",)))
_register(Family("deepseek_v2", "DeepSeek-V2", ("DeepseekV2Moe",), _convert_deepseek_v2))
_register(Family("deepseek_v3", "DeepSeek-V3", ("DeepseekV3MoE",), _convert_deepseek_v3))
# GLM-4.5/4.6: DeepSeek-V3's MoE block (grouped sigmoid routing, shared experts) under GQA attention
_register(Family("glm4_moe", "GLM-4-MoE", ("Glm4MoeMoE",), _convert_deepseek_v3))
# GLM-4.7-Flash: the same block under DeepSeek's multi-head latent attention
_register(Family("glm4_moe_lite", "GLM-4-MoE-Lite", ("Glm4MoeLiteMoE",), _convert_deepseek_v3))
# dots.llm1: the same block under GQA attention with qk-norm, its last layers sliding-window
_register(Family("dots1", "dots.llm1", ("Dots1MoE",), _convert_deepseek_v3, ("qk-norm",)))
# Solar Open: the same block (fp32 router) in plain GQA layers, every one MoE
_register(Family("solar_open", "Solar Open", ("SolarOpenMoE",), _convert_deepseek_v3))
# K-EXAONE: the same block (fp32 router) under qk-norm attention; sliding layers use RoPE, the others none
_register(
    Family(
        "exaone_moe",
        "EXAONE-MoE",
        ("ExaoneMoeSparseMoEBlock",),
        _convert_deepseek_v3,
        ("qk-norm",),
        rotary_in_layer=lambda config, layer: (
            config.sliding_window is None or config.layer_types[layer] == "sliding_attention"
        ),
    )
)
_register(
    Family(
        "minimax_m2",
        "MiniMax-M2",
        ("MiniMaxM2SparseMoeBlock",),
        _convert_minimax_m2,
        ("qk-norm",),
        correction_bias_name="e_score_correction_bias",
    )
)
_register(
    Family(
        "ernie4_5_moe",
        "ERNIE-4.5-MoE",
        ("Ernie4_5_MoeSparseMoeBlock",),
        _convert_ernie4_5_moe,
        correction_bias_name="gate.moe_statics.e_score_correction_bias",
        correction_bias_to_hf=lambda bias: bias.reshape(1, -1),
    )
)
_register(
    Family(
        "hunyuan_v1_moe",
        "Hunyuan-MoE",
        ("HunYuanMoEV1Moe",),
        _convert_hunyuan_v1_moe,
        ("qk-norm",),
        router_name="gate.wg",
        shared_name="shared_mlp",
    )
)
# Granite 3.x MoE: muP multipliers (embeddings, residual branches, attention scale, logits) stay in the graph
_register(
    Family(
        "granitemoe",
        "GraniteMoE",
        ("GraniteMoeMoE",),
        _convert_granitemoe,
        router_name="router",
        mlp_name="block_sparse_moe",
    )
)
# Arcee Trinity: norms on both sides of each sub-layer; a sigmoid gate on the attention output; sliding
# layers use RoPE, the full-attention ones none
_register(
    Family(
        "afmoe",
        "AFMoE",
        ("AfmoeSparseMoeBlock",),
        _convert_afmoe,
        ("qk-norm", "gated output"),
        router_name="router.gate",
        correction_bias_name="expert_bias",
        rotary_in_layer=lambda config, layer: config.layer_types[layer] == "sliding_attention",
    )
)
# Llama 4 (text): every n-th layer without RoPE (attention temperature-tuned by position instead), the
# others chunked with qk-norm; complex rotary arithmetic; `feed_forward` holds the MLP
_register(
    Family(
        "llama4_text",
        "Llama-4",
        ("Llama4TextMoe",),
        _convert_llama4,
        router_name="router",
        shared_name="shared_expert",
        experts_to_hf=_transposed_experts_to_hf,
        mlp_name="feed_forward",
        rotary_in_layer=lambda config, layer: bool(config.no_rope_layers[layer]),
    )
)
_register(Family("phimoe", "PhiMoE", ("PhimoeSparseMoeBlock",), _convert_phimoe, router_name="router"))
_register(
    Family(
        "gpt_oss",
        "GPT-OSS",
        ("GptOssMLP",),
        _convert_gpt_oss,
        ("sinks",),
        router_name="router",
        experts_to_hf=_gpt_oss_experts_to_hf,
    )
)
