"""Decode speed on CPU with a static KV cache vs the growing (dynamic) one, same program, same run.

    python tools/bench_static_cache.py [--contexts 16 512] [--variants uncompressed "paper recipe"]
                                       [--tokens 32] [--rounds 3] [--no-compile]

The mid-size random Mixtral of `tools/bench_e2e.py` (hidden 512, 8 layers, 8 experts top-2), one
thread. A dynamic-cache step concatenates each layer's whole cache with the new token (a copy that
grows with the context); a static-cache step writes the token in place into buffers allocated once
(`cache_implementation="static"`), attending over every slot with the unwritten ones masked. Each
(variant, engine, context) decodes `--tokens` tokens after a prompt of `context` tokens, both caches
alternately for `--rounds` rounds; the table gives median ms/token and the ratio dynamic/static
(> 1: static faster), and the largest difference between the two caches' logits (the static
steps are fed the tokens the dynamic ones chose).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_e2e import MID_MIXTRAL, VARIANTS

import moepass
from moepass.ir.static_cache import static_capacity
from moepass.table import format_table
from moepass.zoo import random_model


def decode_dynamic(program, prompt: torch.Tensor, tokens: int) -> tuple[list[float], list[torch.Tensor]]:
    """Greedy decode through the growing cache: seconds per step and each step's logits."""
    mask, positions = torch.ones_like(prompt), torch.arange(prompt.shape[1])[None]
    logits, past = program.step(prompt, mask, positions, program.empty_cache(1), last_token_only=True)
    times, steps = [], []
    for _ in range(tokens):
        token, positions = logits[:, -1:].argmax(-1), positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=-1)
        start = time.perf_counter()
        logits, past = program.step(token, mask, positions, past, last_token_only=True)
        times.append(time.perf_counter() - start)
        steps.append(logits)
    return times, steps


def decode_static(
    program, prompt: torch.Tensor, fed: list[torch.Tensor]
) -> tuple[list[float], list[torch.Tensor]]:
    """The same steps through a static cache, fed the tokens the growing cache's logits chose (a
    near tie decided the other way would otherwise send the two down different texts)."""
    mask, positions = torch.ones_like(prompt), torch.arange(prompt.shape[1])[None]
    logits, past = program.step(prompt, mask, positions, program.empty_cache(1), last_token_only=True)
    cache = program.static_cache(
        past, mask, static_capacity(prompt.shape[1] + len(fed), program.info.attention)
    )
    times, steps = [], []
    for chooser in [logits, *fed[:-1]]:
        token, positions = chooser[:, -1:].argmax(-1), positions[:, -1:] + 1
        start = time.perf_counter()
        logits = program.static_step(token, positions, cache)
        times.append(time.perf_counter() - start)
        steps.append(logits)
    return times, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", nargs="+", type=int, default=[16, 512])
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["uncompressed", "paper recipe"]
    )
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile engine")
    args = parser.parse_args()
    torch.set_num_threads(1)
    program = moepass.capture(random_model("mixtral", seed=0, **MID_MIXTRAL))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for variant in args.variants:
        compressed = moepass.compress(program, VARIANTS[variant]) if VARIANTS[variant] else program
        for compiled in [False] if args.no_compile else [False, True]:
            engine = "compiled" if compiled else "eager"
            lowered = moepass.lower(compressed, compile=compiled)
            for context in args.contexts:
                prompt = torch.randint(3, MID_MIXTRAL["vocab_size"], (1, context), generator=generator)
                print(f"{variant}, {engine}, context {context} ...", file=sys.stderr, flush=True)
                _, warm = decode_dynamic(lowered, prompt, 2)  # warm-up: compiles
                decode_static(lowered, prompt, warm)
                dynamic, static, difference = [], [], 0.0
                for _ in range(args.rounds):
                    times, dynamic_logits = decode_dynamic(lowered, prompt, args.tokens)
                    dynamic.append(statistics.median(times))
                    times, static_logits = decode_static(lowered, prompt, dynamic_logits)
                    static.append(statistics.median(times))
                    for want, got in zip(dynamic_logits, static_logits, strict=True):
                        difference = max(difference, float((got - want).abs().max()))
                dyn_ms, static_ms = 1e3 * statistics.median(dynamic), 1e3 * statistics.median(static)
                rows.append([variant, engine, context, f"{dyn_ms:.2f}", f"{static_ms:.2f}",
                             f"{dyn_ms / static_ms:.2f}x", f"{difference:.1e}"])  # fmt: skip
    header = ["variant", "engine", "context", "dynamic ms/token", "static ms/token", "dynamic/static"]
    print(format_table([*header, "max |logits diff|"], rows))


if __name__ == "__main__":
    main()
