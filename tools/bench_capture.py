"""Capture cost per family, and decode speed of the captured program vs transformers eager.

    python tools/bench_capture.py            # all families + mid-size Mixtral decode
    python tools/bench_capture.py --quick    # fewer decode tokens

One thread; decode times are medians over tokens, and both paths run in the same process so the
ratio is meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

import moepass
from moepass.ir.ops import EXPERTS, ROUTE
from moepass.table import format_table
from moepass.zoo import RANDOM_FAMILIES, random_model


def capture_table() -> str:
    rows = []
    for family in RANDOM_FAMILIES:
        model = random_model(family, seed=0)
        start = time.perf_counter()
        program = moepass.capture(model)
        seconds = time.perf_counter() - start
        targets = Counter(n.target for n in program.graph_module.graph.nodes if n.op == "call_function")
        rows.append(
            [
                family,
                f"{seconds:.2f}",
                len(program.graph_module.graph.nodes),
                targets[ROUTE],
                targets[EXPERTS],
                len(program.structure.blocks),
            ]
        )
    return format_table(
        ["family", "capture s", "nodes", "route ops", "experts ops", "blocks"],
        rows,
        title="Capture (tiny random models, 3 layers, 8 experts)",
    )


def _decode_times(step, tokens: int) -> list[float]:
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def decode_table(tokens: int, prompt: int) -> str:
    model = random_model(
        "mixtral",
        seed=0,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=8,
    )
    params = sum(p.numel() for p in model.parameters())
    program = moepass.capture(model)
    ids = torch.randint(0, 32000, (1, prompt))

    # transformers eager: prefill, then one token at a time with its DynamicCache
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True)
        state = {"next": out.logits[:, -1:].argmax(-1), "len": prompt}

        def hf_step():
            out = model(state["next"], past_key_values=cache, use_cache=True)
            state["next"] = out.logits[:, -1:].argmax(-1)

        hf = _decode_times(hf_step, tokens)

        mask = torch.ones(1, prompt, dtype=torch.long)
        logits, past = program.step(ids, mask, torch.arange(prompt)[None], program.empty_cache(1))
        pstate = {"next": logits[:, -1:].argmax(-1), "past": past, "mask": mask, "pos": prompt}

        def moepass_step():
            pstate["mask"] = torch.cat([pstate["mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            logits, pstate["past"] = program.step(
                pstate["next"], pstate["mask"], torch.tensor([[pstate["pos"]]]), pstate["past"]
            )
            pstate["next"] = logits[:, -1:].argmax(-1)
            pstate["pos"] += 1

        ours = _decode_times(moepass_step, tokens)
    hf_ms, our_ms = statistics.median(hf) * 1e3, statistics.median(ours) * 1e3
    rows = [
        ["transformers eager (grouped_mm)", f"{hf_ms:.2f}", "1.00x"],
        ["moepass captured program", f"{our_ms:.2f}", f"{hf_ms / our_ms:.2f}x"],
    ]
    title = (
        f"Decode, batch 1, prompt {prompt}, {tokens} tokens, 1 thread: Mixtral hidden 512, 8 layers, "
        f"8 experts top-2, {params / 1e6:.0f}M params, fp32"
    )
    return format_table(["path", "ms/token (median)", "speed vs eager"], rows, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(capture_table(), end="\n\n")
    print(decode_table(tokens=16 if args.quick else 64, prompt=32))


if __name__ == "__main__":
    main()
