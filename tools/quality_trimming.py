"""Expert Trimming quality on the bundled models: importance-guided vs random, one-shot vs iterative.

    python tools/quality_trimming.py                      # both bundled models -> RESULTS-trimming.md
    python tools/quality_trimming.py --models builtin:tiny-mixtral --eval-per-source 16   # quicker

For every setting: test perplexity (token-weighted over the three domains), next-token accuracy and
weight bytes, with calibration on the validation split. Random choices are the median (and range)
of five seeds. One thread; the table is written to a Markdown file and printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from plot_quality import SLIMMING, write_plot

import moepass
from moepass.data import calibration_set, evaluation_set
from moepass.evaluate import model_size
from moepass.pass_manager import PassError
from moepass.passes import ConfigError
from moepass.table import format_table, human_bytes
from moepass.zoo import load_model, load_tokenizer

SEEDS = range(5)


def settings(num_experts: int) -> list[tuple[str, list, bool]]:
    """(label, recipe passes, random baseline?) for a model whose MoE layers have `num_experts`."""
    quarter, half = num_experts * 3 // 4, num_experts // 2
    rows = []
    for keep, share in ((quarter, "25%"), (half, "50%")):
        rows += [
            (f"expert drop {share}, layer-wise", [("expert_drop", {"keep": keep})], False),
            (f"expert drop {share}, global", [("expert_drop", {"keep": keep, "selection": "global"})], False),
            (
                f"expert drop {share}, layer-wise REAP",
                [("expert_drop", {"keep": keep, "score": "reap"})],
                False,
            ),
            (f"expert drop {share}, random", [("expert_drop", {"keep": keep, "score": "random"})], True),
        ]
    for count in (1, 2, 3):
        rows += [
            (f"layer drop {count}", [("layer_drop", {"count": count})], False),
            (f"layer drop {count}, iterative", [("layer_drop", {"count": count, "iterative": True})], False),
            (f"layer drop {count}, random", [("layer_drop", {"count": count, "metric": "random"})], True),
        ]
    for count in (1, 2):
        rows += [
            (f"block drop {count}", [("block_drop", {"count": count})], False),
            (f"block drop {count}, iterative", [("block_drop", {"count": count, "iterative": True})], False),
            (
                f"block drop {count}, consecutive",
                [("block_drop", {"count": count, "method": "consecutive"})],
                False,
            ),
            (f"block drop {count}, random", [("block_drop", {"count": count, "metric": "random"})], True),
        ]
    return rows


def with_seed(passes: list, seed: int) -> list:
    return [(name, {**options, "seed": seed}) for name, options in passes]


def run(model_name: str, calibration_samples: int, per_source: int) -> str:
    model, tokenizer = load_model(model_name, dtype=torch.float32), load_tokenizer(model_name)
    program = moepass.capture(model)
    calibration = calibration_set(
        "builtin:validation",
        tokenizer,
        samples=calibration_samples,
        seq_len=256,
        vocab_size=program.info.vocab_size,
    )
    test = evaluation_set(
        "builtin:test", tokenizer, max_per_source=per_source, vocab_size=program.info.vocab_size
    )
    base = moepass.evaluate(program, test)
    base_bytes = model_size(program)[1]
    rows = [
        [
            "original",
            f"{base.overall.perplexity:.3f}",
            "",
            f"{100 * base.overall.accuracy:.2f}%",
            human_bytes(base_bytes),
            "",
        ]
    ]
    num_experts = program.structure.moe_blocks[0].mlp.num_experts
    start = time.perf_counter()
    for label, passes, randomised in settings(num_experts):
        try:
            results = [
                _score(program, p, calibration, test)
                for p in ([with_seed(passes, s) for s in SEEDS] if randomised else [passes])
            ]
        except (ConfigError, PassError) as error:
            rows.append([label, "n/a", "", "", "", str(error).split(": ", 2)[-1][:60]])
            continue
        ppl = [r[0] for r in results]
        median = statistics.median(ppl)
        spread = f"{min(ppl):.2f}..{max(ppl):.2f}" if randomised else ""
        accuracy = statistics.median(r[1] for r in results)
        rows.append(
            [
                label,
                f"{median:.3f}",
                f"{100 * (median / base.overall.perplexity - 1):+.1f}%",
                f"{100 * accuracy:.2f}%",
                human_bytes(statistics.median(r[2] for r in results)),
                spread,
            ]
        )
        print(f"{model_name} {label}: ppl {median:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    title = (
        f"{model_name}: test perplexity over {sum(d.tokens for d in base.domains.values())} tokens "
        f"({per_source} windows of 256 per domain), calibration {calibration_samples} x 256 validation tokens"
    )
    return format_table(
        ["setting", "perplexity", "vs original", "next-token acc", "weights", "random range"],
        rows,
        title=title,
    )


def _score(program, passes, calibration, test) -> tuple[float, float, int]:
    compressed = moepass.compress(program, passes, calibration=calibration)
    result = moepass.evaluate(compressed, test)
    return result.overall.perplexity, result.overall.accuracy, model_size(compressed)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["builtin:tiny-mixtral", "builtin:tiny-deepseek"])
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--eval-per-source", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("RESULTS-trimming.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tables = [run(name, args.calibration_samples, args.eval_per_source) for name in args.models]
    text = (
        "# Expert Trimming on the bundled models\n\nRegenerate with `python tools/quality_trimming.py`. "
        "Random rows: median of 5 seeds, range in the last column. Quality against size of every setting, "
        "with the slimming ones: `RESULTS-quality-vs-size.png`.\n\n"
        + "\n\n".join(f"```\n{t}\n```" for t in tables)
        + "\n"
    )
    args.out.write_text(text)
    print(text)
    print(f"wrote {write_plot([args.out, SLIMMING])}")


if __name__ == "__main__":
    main()
