"""Shared test helpers: references built from transformers itself."""

from __future__ import annotations

import copy
import os
import zlib

import torch
from torch import nn

from moepass.ir.families import FAMILIES as FAMILY_SPECS
from moepass.zoo import RANDOM_FAMILIES, random_model

FAMILIES = list(RANDOM_FAMILIES)
# every target a quantization recipe can take
ALL_TARGETS = ["experts", "shared_experts", "attention", "dense_mlp", "lm_head", "embeddings"]
SESSION_SEED = int(os.environ.get("MOEPASS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def seed_for(name: str) -> int:
    """A seed that differs per name and per run (replay a run with MOEPASS_TEST_SEED)."""
    return zlib.crc32(f"{SESSION_SEED}:{name}".encode())


def hf_mlp(model, layer: nn.Module) -> nn.Module:
    """A transformers decoder layer's MLP or MoE block (GraniteMoE calls it `block_sparse_moe`)."""
    return getattr(layer, FAMILY_SPECS[model.config.model_type].mlp_name)


def hf_router_choices(model, input_ids: torch.Tensor) -> list[set[int]]:
    """Experts selected in each MoE layer by the transformers model itself (via its experts' inputs;
    Llama-4's experts take every row, so via its router's scores)."""
    choices: list[set[int]] = []
    hooks = []
    for layer in model.model.layers:
        experts = getattr(hf_mlp(model, layer), "experts", None)
        if experts is None:
            continue
        seen: set[int] = set()
        choices.append(seen)

        def record(module, args, kwargs, seen=seen):
            ids = args[1] if len(args) > 1 else next(iter(kwargs.values()))
            seen.update(int(i) for i in ids.reshape(-1))

        def record_scores(module, args, output, seen=seen):
            seen.update(int(i) for i in (output[0] > 0).nonzero()[:, 1])

        if model.config.model_type == "llama4_text":  # experts run every row pre-scaled: no ids to read
            hooks.append(hf_mlp(model, layer).router.register_forward_hook(record_scores))
        else:
            hooks.append(experts.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return choices


def model_for(family: str, seed: int, **overrides):
    return random_model(family, seed=seed, **overrides)


def hf_keep_experts(model, keep: dict[int, list[int]]):
    """Module surgery on a copy of the transformers model: in each listed layer, keep only the given
    experts (router rows and expert tensors sliced, top-k capped at the kept count)."""
    ref = copy.deepcopy(model)
    for index, kept in keep.items():
        block = hf_mlp(ref, ref.model.layers[index])
        rows = torch.tensor(kept)
        router = block.gate if hasattr(block, "gate") else block.router
        # Hunyuan's router holds its weight in a linear `wg`, AFMoE's in `gate`
        linear = getattr(router, "wg", getattr(router, "gate", router))
        linear.weight = torch.nn.Parameter(linear.weight[rows])
        if getattr(linear, "bias", None) is not None:
            linear.bias = torch.nn.Parameter(linear.bias[rows])
        # DeepSeek's router holds it, MiniMax-M2's block, ERNIE-4.5's router statistics ([1, E]);
        # AFMoE's block calls it `expert_bias`
        for holder in (router, block, getattr(router, "moe_statics", None)):
            for name in ("e_score_correction_bias", "expert_bias"):
                bias = getattr(holder, name, None)
                if bias is not None:
                    sliced = bias[..., rows]
                    setattr(
                        holder,
                        name,
                        nn.Parameter(sliced, False) if isinstance(bias, nn.Parameter) else sliced,
                    )
        router.top_k = min(router.top_k, len(kept))
        router.num_experts = len(kept)
        experts = block.experts
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if hasattr(experts, name):
                setattr(experts, name, torch.nn.Parameter(getattr(experts, name)[rows]))
        experts.num_experts = len(kept)
    return ref


def hf_expert_usage(model, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer (by index), measured on the transformers model itself: (how many (token, slot)
    pairs go to each expert, the routing weight each expert receives in total)."""
    usage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        experts = getattr(hf_mlp(model, layer), "experts", None)
        if experts is None:
            continue
        num_experts = experts.gate_up_proj.shape[0]
        usage[index] = (
            torch.zeros(num_experts, dtype=torch.long),
            torch.zeros(num_experts, dtype=torch.float64),
        )

        def record(module, args, kwargs, index=index):
            ids, weights = args[1], args[2]
            counts, mass = usage[index]
            counts += torch.bincount(ids.reshape(-1), minlength=counts.numel())
            mass.index_add_(0, ids.reshape(-1), weights.reshape(-1).double())

        hooks.append(experts.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return usage


_CAPTURED: dict[tuple, tuple] = {}


def captured(family: str, **overrides):
    """(transformers model, captured program) for a random model, captured once per session.

    Tests that edit the program must edit `program.fork()` (moepass.compress forks by itself).
    """
    import moepass

    key = (family, tuple(sorted(overrides.items())))
    if key not in _CAPTURED:
        model = model_for(family, seed=seed_for(repr(key)), **overrides)
        _CAPTURED[key] = (model, moepass.capture(model))
    return _CAPTURED[key]


def rtn(program, bits: int = 4, group_size: int = 32, symmetric: bool = False, targets=ALL_TARGETS):
    """The program RTN-quantized (a new program; the input is left as it was)."""
    import moepass

    config = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "targets": list(targets)}
    return moepass.compress(program, [("rtn", config)])


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def position_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Relative error of each position's logits, flattened. The pad token first in a sequence of a
    random model has all-zero logits (a zero embedding row; zero-initialised biases): such a position
    counts as exact only where `got` is zero too, instead of 0/0 = NaN."""
    got, want = got.float(), want.float()
    scale = want.norm(dim=-1).clamp_min(torch.finfo(want.dtype).tiny)
    return ((got - want).norm(dim=-1) / scale).flatten()


def greedy_under(reference, sequences: torch.Tensor, prompt: int, tie: float = 1e-4) -> None:
    """Every generated token is the reference's greedy choice on that prefix, up to a near tie (fused
    kernels sum in another order: two logits within `tie` of the scale may swap)."""
    logits = reference(sequences)[:, prompt - 1 : -1]
    chosen = logits.gather(-1, sequences[:, prompt:, None]).squeeze(-1)
    assert (logits.amax(-1) - chosen <= tie * logits.abs().amax()).all()
