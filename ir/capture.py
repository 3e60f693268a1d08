"""Capture a transformers causal-LM MoE model as a flat torch.fx graph with explicit KV-cache inputs.

How: a shadow copy of the model (new module objects, the same weight tensors) gets its MoE blocks
replaced by the canonical `SparseMoE`, then `torch.export` (non-strict) traces one decoder step

    (input_ids, attention_mask, position_ids, past_key_0, past_value_0, ...) ->
    (logits, present_key_0, present_value_0, ...)

with dynamic batch, sequence and past lengths. `present = cat(past, new)` per layer, the usual ONNX
decoder convention, so the same graph runs prefill (past length 0) and decode. Only a prefix of a
deep model is traced: later decoder layers are copies of traced ones (`replicate`). The user's model
is never modified: only the shadow's modules are swapped.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import operator
import time
import types
import warnings

import torch
import transformers
from torch import Tensor, fx, nn
from torch.export import Dim
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moepass.errors import UnsupportedModelError

from . import replicate, trace_cache
from .canonicalize import canonicalize
from .families import Family, attention_description, convert_moe_blocks, family_of
from .program import MoEProgram, ProgramInfo

logger = logging.getLogger("moepass")

# Sample sizes for export: every dynamic dimension must be >= 2 in the sample, otherwise export
# specialises it (a batch-1 sample silently fixes the batch size).
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST = 2, 3, 2


def capture(model: nn.Module, *, example_inputs: Tensor | dict | None = None) -> MoEProgram:
    """Capture `model` (a transformers ...ForCausalLM MoE model) as a `MoEProgram`.

    `example_inputs` (input_ids, or a dict with `input_ids`) only sets the sample used for tracing;
    routing is never baked in, so any sample gives the same program.
    """
    start = time.perf_counter()
    family = family_of(model)
    _check_weights_are_loaded(model)
    _check_weights_are_full_precision(model)
    _check_rotary_is_traceable(model)
    shadow = _shadow_copy(model)
    convert_moe_blocks(shadow, family)
    _concatenate_mla_keys(shadow)
    _select_longrope_scale_in_graph(shadow)
    sample_ids = _sample_input_ids(example_inputs, shadow)
    key = trace_cache.trace_key(shadow, sample_ids)
    graph_module = trace_cache.cached_graph_module(key, shadow)
    if graph_module is None:
        logger.info("capture %s (%s): tracing one decoder step", type(model).__name__, family.display)
        graph_module = _trace(shadow, sample_ids)
        trace_cache.remember(key, graph_module, shadow)
    _own_parameters(graph_module)
    graph_module.eval()  # the exported module comes in training mode, a reused trace in the model's
    info = _program_info(model, family)
    info.capture_seconds = time.perf_counter() - start
    program = MoEProgram(graph_module, info)
    program.verify()
    logger.info(
        "capture done in %.1fs: %d nodes, verifier ok", info.capture_seconds, len(graph_module.graph.nodes)
    )
    return program


def _check_weights_are_loaded(model: nn.Module) -> None:
    """Refuse weights left on the meta device (a partial or offloaded load) or spread over devices:
    the program would run on garbage memory or fail deep inside a kernel."""
    devices: dict[torch.device, str] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            raise UnsupportedModelError(
                f"{type(model).__name__}: {name} is on the meta device (never loaded); load the "
                "checkpoint fully on one device (no device_map offloading) before capture"
            )
        devices.setdefault(tensor.device, name)
    if len(devices) > 1:
        spread = ", ".join(f"{name} on {device}" for device, name in devices.items())
        raise UnsupportedModelError(
            f"{type(model).__name__}: weights on {len(devices)} devices ({spread}); move the model to one "
            "device (model.to(device)) before capture"
        )


_FULL_PRECISION = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEQUANTIZE = (
    "moepass compresses full-precision weights itself: load the unquantized checkpoint, or dequantize "
    "as it loads (from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize=True)) for "
    "FP8, Mxfp4Config(dequantize=True) for MXFP4) or after (model.dequantize())"
)


def _check_weights_are_full_precision(model: nn.Module) -> None:
    """Refuse weights a quantizer still holds (FP8, MXFP4, GPTQ, bitsandbytes, torchao...): their
    scales live outside the tensors moepass reads, so the program would compute with codes as values."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "unknown")
        raise UnsupportedModelError(
            f"{type(model).__name__} was loaded quantized by transformers "
            f"(quant_method={getattr(method, 'value', method)!r}); {_DEQUANTIZE}"
        )
    for name, param in model.named_parameters():
        form = quantized_form(param)
        if form is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: {name} is {form}, not a full-precision weight; {_DEQUANTIZE}"
            )


def quantized_form(weight: Tensor) -> str | None:
    """What `weight` holds when it is not full-precision values (a quantizer's codes or tensor type)."""
    if type(weight.data) is not Tensor:
        return f"a {type(weight.data).__name__}"
    return None if weight.dtype in _FULL_PRECISION else str(weight.dtype)


# rotary embeddings that pick their frequencies from the largest position id (a data-dependent branch)
_DATA_DEPENDENT_ROPE = ("dynamic", "longrope")


def _check_rotary_is_traceable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "rope_type", None) in _DATA_DEPENDENT_ROPE and not _is_phimoe_longrope(module):
            if (getattr(model.config, "rope_parameters", None) or {}).get("alpha") is not None:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: {name} is Hunyuan's NTK-alpha rotary embedding, which "
                    f"transformers {transformers.__version__} runs as a 'dynamic' one (switching frequencies "
                    "on the largest position id, which torch.export cannot trace); newer transformers (5.25 "
                    "does) run it as the static 'ntk_alpha', which moepass captures: upgrade transformers"
                )
            raise UnsupportedModelError(
                f"{type(model).__name__}: {name} is a {module.rope_type!r} rotary embedding, which switches "
                "frequencies on the largest position id; torch.export cannot trace that branch, so moepass "
                "cannot capture it yet (default, linear, llama3 and yarn rotary embeddings, and PhiMoE's "
                "longrope, are supported)"
            )


def _transformers_own(code, qualnames: tuple[str, ...]) -> bool:
    """`code` (a class or function) is transformers' own of one of these names, not a user's patch."""
    return getattr(code, "__qualname__", None) in qualnames and code.__module__.startswith(
        "transformers.models."
    )


def _is_phimoe_longrope(module: nn.Module) -> bool:
    return _transformers_own(type(module), ("PhimoeRotaryEmbedding",)) and module.rope_type == "longrope"


def _select_longrope_scale_in_graph(shadow: nn.Module) -> None:
    """PhiMoE's longrope rotary (Phi-3.5-MoE) picks its cos/sin scale with a Python branch on the
    largest position id, which torch.export cannot trace: the shadow picks it with `torch.where`."""
    for module in shadow.modules():
        if _is_phimoe_longrope(module):
            module.forward = types.MethodType(_phimoe_longrope_forward, module)


def _phimoe_longrope_forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' PhiMoE rotary under longrope: the frequencies its init function gives for the
    config (the short factors), scaled by long_mscale once the largest position passes the original
    context and by short_mscale before."""
    parameters = self.config.rope_parameters
    inv_freq, _ = self.rope_init_fn(self.config)
    longer = position_ids.max() + 1 > parameters["original_max_position_embeddings"]
    mscale = torch.where(longer, parameters["long_mscale"], parameters["short_mscale"])
    freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * mscale).to(x.dtype), (angles.sin() * mscale).to(x.dtype)


def _shadow_copy(model: nn.Module) -> nn.Module:
    """Deep-copy modules and config but share every parameter and buffer with `model`. The copy's
    forward returns no router logits: they are a training output (a load-balancing loss), read from
    the routers conversion replaces."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shadow = copy.deepcopy(model, memo)
    if getattr(shadow.config, "output_router_logits", False):
        shadow.config.output_router_logits = False
    _restore_torch_forwards(shadow)
    return shadow.eval()


def _restore_torch_forwards(shadow: nn.Module) -> None:
    """Undo Hub-kernel forwards on the shadow. transformers >= 5.25 kernelizes models loaded onto a GPU
    by default (Liger RMSNorm, rotary and SiLU kernels from the Hub): `kernelize` gives each module of a
    Hub-extensible class (`kernel_layer_name`), and each kernelized function wrapper a module holds in
    `_kernel_funcs`, its own `forward`. Their kernels compute what the class's torch forward computes,
    which is what the IR's canonical ops, lowering and ONNX export read; reverting is `kernels`' own
    revert (drop the instance forward)."""
    restored = 0
    for module in shadow.modules():
        for holder in (module, *module.__dict__.get("_kernel_funcs", {}).values()):
            if hasattr(type(holder), "kernel_layer_name") and "forward" in holder.__dict__:
                del holder.__dict__["forward"]
                holder.__dict__.pop("_kernel_repo", None)
                restored += 1
    if getattr(shadow, "use_kernels", False):
        shadow._use_kernels = False  # else `eval()` would kernelize the shadow again (a new kernels mode)
    if restored:
        logger.info("capture: traced the torch forwards of %d Hub-kernelized modules", restored)


# transformers' own MLA key builders (DeepSeek V2/V3), by qualified name: a patched one is left alone
_MLA_EXPAND_KV = (
    "DeepseekV2Attention.expand_kv",
    "DeepseekV3Attention.expand_kv",
    "Glm4MoeLiteAttention.expand_kv",
)


def _concatenate_mla_keys(shadow: nn.Module) -> None:
    """MLA attention builds each key by copying its two parts into slices of an empty tensor. Traced
    with dynamic shapes, those writes cost ~3x the whole capture (and the program, then ONNX export,
    carries the functionalized slice_scatter pairs); `torch.cat` gives the same values."""
    for module in shadow.modules():
        if _transformers_own(getattr(type(module), "expand_kv", None), _MLA_EXPAND_KV):
            module.expand_kv = types.MethodType(_concatenated_expand_kv, module)


def _concatenated_expand_kv(self, kv_nope: Tensor, k_rot: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' `expand_kv` with `torch.cat` for the slice copies (k_rot cast as `copy_` casts)."""
    batch, _, length, _ = kv_nope.shape
    kv = self.kv_b_proj(kv_nope).view(batch, length, -1, self.qk_nope_head_dim + self.v_head_dim)
    k_nope, values = torch.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    k_rot = k_rot.to(k_nope.dtype).expand(-1, k_nope.shape[1], -1, -1)
    return torch.cat((k_nope, k_rot), dim=-1), values


def _sample_input_ids(example_inputs: Tensor | dict | None, model: nn.Module) -> Tensor:
    device = next(model.parameters()).device
    if example_inputs is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (_SAMPLE_BATCH, _SAMPLE_SEQ), generator=generator)
        return ids.to(device)
    if isinstance(example_inputs, dict) and "input_ids" not in example_inputs:
        raise ValueError(f"example_inputs has no 'input_ids' (has {sorted(example_inputs)})")
    ids = example_inputs["input_ids"] if isinstance(example_inputs, dict) else example_inputs
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "example_inputs must be input_ids of shape [batch, seq] (int64), or a dict holding them"
        )
    if ids.numel() == 0:
        raise ValueError(f"example_inputs input_ids of shape {list(ids.shape)} hold no token")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(
            f"example_inputs input_ids must lie in [0, {vocab}) (the vocabulary), got "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    ids = ids.long().to(device)
    ids = ids.repeat((_SAMPLE_BATCH + ids.shape[0] - 1) // ids.shape[0], 1)[
        : max(_SAMPLE_BATCH, ids.shape[0])
    ]
    if ids.shape[1] < 2:
        ids = ids.repeat(1, 2)
    return ids


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword for a KV cache: transformers renamed `past_key_values` to `cache` (5.2x)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _explicit_cache(past: list[Tensor]) -> DynamicCache:
    """A DynamicCache whose layers start from the given past tensors ([k0, v0, k1, v1, ...])."""
    cache = DynamicCache()
    for key, value in zip(past[0::2], past[1::2], strict=True):
        layer = DynamicLayer()
        layer.keys, layer.values, layer.is_initialized = key, value, True
        layer.dtype, layer.device = key.dtype, key.device
        cache.layers.append(layer)
    return cache


def _probe_cache(model: nn.Module, ids: Tensor) -> list[tuple[int, int, torch.dtype]]:
    """Per cache tensor (k0, v0, k1, ...): its (heads, width, dtype). Found by running one step,
    since families cache different things (DeepSeek caches compressed latents)."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:1, :2], use_cache=True, **{cache_keyword(model): cache})
    if len(cache.layers) != model.config.num_hidden_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected one KV-cache layer per decoder layer "
            f"({model.config.num_hidden_layers}), found {len(cache.layers)}"
        )
    return [(t.shape[1], t.shape[3], t.dtype) for layer in cache.layers for t in (layer.keys, layer.values)]


def _trace(shadow: nn.Module, ids: Tensor) -> fx.GraphModule:
    """One decoder step traced; a deep model's later layers copied from a traced prefix that holds
    each kind of layer (`replicate`), which costs a fraction of tracing them all."""
    layout = replicate.plan(shadow)
    if layout is not None:
        with replicate.truncated(shadow, layout.prefix):
            prefix = _export_step(shadow, ids, _probe_cache(shadow, ids))
        whole = replicate.replicate(prefix, shadow, layout)
        if whole is not None:
            logger.info("capture: traced %d layers, copied %d", layout.prefix, len(layout.sources))
            return whole
        logger.info("capture: the traced layers are not self-contained; tracing every layer")
    return _export_step(shadow, ids, _probe_cache(shadow, ids))


def _export_step(model: nn.Module, ids: Tensor, cache_tails) -> fx.GraphModule:
    cache_kw = cache_keyword(model)
    model_forward = type(model).forward

    def step(self, input_ids, attention_mask, position_ids, past):
        cache = _explicit_cache(past)
        out = model_forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kw: cache},
        )
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])

    # Rebinding forward on the shadow (never on the user's model) keeps parameter FQNs identical
    # to the transformers checkpoint: `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`.
    model.forward = types.MethodType(step, model)
    batch, seq = ids.shape
    device = ids.device
    past = [
        torch.randn(batch, heads, _SAMPLE_PAST, width, dtype=dtype, device=device)
        for heads, width, dtype in cache_tails
    ]
    mask = torch.ones(batch, _SAMPLE_PAST + seq, dtype=torch.long, device=device)
    positions = torch.arange(_SAMPLE_PAST, _SAMPLE_PAST + seq, device=device).expand(batch, -1)
    b, s, p = Dim("batch"), Dim("seq"), Dim("past", min=0)
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: Dim.AUTO},
        "position_ids": {0: b, 1: s},
        "past": [{0: b, 2: p} for _ in past],
    }
    try:
        with torch.no_grad():
            exported = torch.export.export(
                model, (ids, mask, positions, past), dynamic_shapes=dynamic_shapes, strict=False
            )
    finally:
        del model.forward  # the class's again: a later probe or trace of the shadow calls it
    with torch.no_grad():
        if not _is_functional(exported.graph):
            logger.info("capture: functionalizing the graph")
            # Functionalize (no decompositions): in-place writes (say, a patched attention's copies
            # into slices) become pure ops, so dead-code elimination can drop any block.
            with warnings.catch_warnings():  # torch deep-copies tree specs with a deprecated isinstance
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                exported = exported.run_decompositions({})
    return _flat_graph_module(exported, len(past) // 2)


def _is_functional(graph: fx.Graph) -> bool:
    """Only ATen ops that write nothing, getitem and size arithmetic: functionalizing such a graph is
    a second full trace (half a capture's time) that changes nothing but spellings (`reshape` ->
    `view`)."""
    return all(
        node.target in _SIZE_ARITHMETIC
        or (isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.is_mutable)
        for node in graph.nodes
        if node.op == "call_function"
    )


# what torch.export records for Python ints and SymInts (sizes under dynamic shapes): pure
_SIZE_ARITHMETIC = {
    *(operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv),
    *(operator.mod, operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le),
    *(operator.gt, operator.ge, torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not),
}


def _flat_graph_module(exported, num_layers: int) -> fx.GraphModule:
    """Unlift the exported program into a GraphModule with flat, named inputs and a flat output tuple."""
    try:
        unlifted = exported.module(check_guards=False)
    except TypeError:  # torch without the check_guards argument
        unlifted = exported.module()
    old = unlifted.graph
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_{kind}_{layer}" for layer in range(num_layers) for kind in ("key", "value")
    ]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in old.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, names, strict=True):
        env[node] = graph.placeholder(name)
        env[node].meta = dict(node.meta)
    for node in old.nodes:
        if node.op == "placeholder" or (node.op == "call_module" and node.target == "_guards_fn"):
            continue
        if node.op == "output":
            graph.output(tuple(env[n] for n in node.args[0]))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    canonicalize(graph)
    graph_module = fx.GraphModule(unlifted, graph)
    graph_module.graph.lint()
    return graph_module


def _own_parameters(graph_module: fx.GraphModule) -> None:
    """Give the program its own Parameter objects over the model's storage.

    Storage stays shared (no copy of the weights), but `program.to(...)`, which reassigns
    `param.data`, and passes that swap parameters never reach the user's model.
    """
    owned: dict[int, nn.Parameter] = {}
    for module in graph_module.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in owned:
                    owned[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
                module._parameters[name] = owned[id(param)]


def _program_info(model: nn.Module, family: Family) -> ProgramInfo:
    config = model.config
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    dtype = next(model.parameters()).dtype
    return ProgramInfo(
        family=family.model_type,
        model_class=type(model).__name__,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        dtype=str(dtype).removeprefix("torch."),
        eos_token_ids=[int(e) for e in eos_ids],
        pad_token_id=None if pad is None else int(pad),
        generation_config={} if gen is None else gen.to_diff_dict(),
        attention={i: attention_description(config, i, family) for i in range(config.num_hidden_layers)},
        config=config.to_dict(),
    )
