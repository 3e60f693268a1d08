"""Shared test helpers: references built from transformers itself."""

from __future__ import annotations

import os
import zlib

import torch

from moepass.zoo import RANDOM_FAMILIES, random_model

FAMILIES = list(RANDOM_FAMILIES)
SESSION_SEED = int(os.environ.get("MOEPASS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def seed_for(name: str) -> int:
    """A seed that differs per name and per run (replay a run with MOEPASS_TEST_SEED)."""
    return zlib.crc32(f"{SESSION_SEED}:{name}".encode())


def hf_router_choices(model, input_ids: torch.Tensor) -> list[set[int]]:
    """Experts selected in each MoE layer by the transformers model itself (via its experts' inputs)."""
    choices: list[set[int]] = []
    hooks = []
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        seen: set[int] = set()
        choices.append(seen)

        def record(module, args, kwargs, seen=seen):
            ids = args[1] if len(args) > 1 else next(iter(kwargs.values()))
            seen.update(int(i) for i in ids.reshape(-1))

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
