"""Expert Slimming quality on the bundled models: quantization and pruning methods, and the paper's
recipe (drop 25% of MoE layers + 4-bit AWQ) in both orders.

    python tools/quality_slimming.py                 # both bundled models -> RESULTS-slimming.md

2:4 rows store the pruned weights compressed (`sparse24_storage`), so their size is what an
artifact holds. A last table reruns int4 RTN/GPTQ/AWQ on tiny-mixtral given LLM-like outlier
activation channels by a function-preserving rewrite (what AWQ exists for).

Test perplexity (token-weighted over the three domains), next-token accuracy and weight bytes, with
the validation split as calibration data. One thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from plot_quality import TRIMMING, write_plot

import moepass
from moepass.data import calibration_set, evaluation_set
from moepass.evaluate import model_size
from moepass.table import format_table, human_bytes
from moepass.zoo import load_model, load_tokenizer

WIDE = ["experts", "shared_experts", "attention", "dense_mlp"]
OPT_IN = ["embeddings", "lm_head"]  # rounded to nearest whatever the method


STORE_24 = ("sparse24_storage", {})  # 2:4 rows keep the pruned weights compressed


def slim_then_trim(passes: list) -> dict:
    """The paper's S+T: the layers are scored on the quantized model, after the slimming pass."""
    return {"name": "slim-then-trim", "scoring": "iterative", "passes": passes}


def settings(group: int) -> list[tuple[str, list | dict]]:
    q4 = {"bits": 4, "group_size": group, "targets": WIDE}
    return [
        ("int4 RTN", [("rtn", q4)]),
        ("int4 GPTQ", [("gptq", q4)]),
        ("int4 AWQ", [("awq", q4)]),
        ("int8 RTN", [("rtn", {**q4, "bits": 8})]),
        ("int8 GPTQ", [("gptq", {**q4, "bits": 8})]),
        ("int4 RTN, embeddings and LM head too", [("rtn", {**q4, "targets": [*WIDE, *OPT_IN]})]),
        ("int4 GPTQ, embeddings and LM head too", [("gptq", {**q4, "targets": [*WIDE, *OPT_IN]})]),
        ("50% magnitude", [("magnitude", {})]),
        ("50% Wanda", [("wanda", {})]),
        ("50% SparseGPT", [("sparsegpt", {})]),
        ("50% Wanda, pruned propagation", [("wanda", {"propagation": "pruned"})]),
        ("50% SparseGPT, pruned propagation", [("sparsegpt", {"propagation": "pruned"})]),
        ("2:4 magnitude", [("magnitude", {"pattern": "2:4"}), STORE_24]),
        ("2:4 Wanda", [("wanda", {"pattern": "2:4"}), STORE_24]),
        ("2:4 SparseGPT", [("sparsegpt", {"pattern": "2:4"}), STORE_24]),
        ("2:4 SparseGPT, then int4 GPTQ", [("sparsegpt", {"pattern": "2:4"}), ("gptq", q4), STORE_24]),
        (
            "paper: AWQ int4, then drop 25% MoE layers",
            slim_then_trim([("awq", q4), ("layer_drop", {"ratio": 0.25})]),
        ),
        ("paper: drop 25% MoE layers, then AWQ int4", [("layer_drop", {"ratio": 0.25}), ("awq", q4)]),
        (
            "AWQ int4, then drop 2 MoE layers (count)",
            slim_then_trim([("awq", q4), ("layer_drop", {"count": 2})]),
        ),
    ]


def with_outlier_channels(model, channels: int = 4, factor: float = 40.0, seed: int = 0):
    """The same function with LLM-like outlier activation channels: in every layer a few RMSNorm gains
    grow `factor` times and the matching input columns of the projections reading that norm shrink as
    much (trained LLMs carry their massive channels in norm gains just so). Mixtral layout only."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for norm, readers in (
                (
                    layer.input_layernorm,
                    [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight],
                ),
                (layer.post_attention_layernorm, [mlp.gate.weight, mlp.experts.gate_up_proj]),
            ):
                picked = torch.randperm(norm.weight.shape[0], generator=generator)[:channels]
                norm.weight[picked] *= factor
                for weight in readers:
                    weight[..., picked] /= factor
    return model


def activation_spread(model, calibration, model_name: str) -> str:
    """Per layer, how far the largest input channel (mean |x| over calibration tokens) stands above
    the median one, at the attention and MLP inputs. AWQ protects outlier channels; LLMs have
    channels 20-100x the median, and without them there is little for AWQ to gain over rounding."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for where, norm in (("attention", layer.input_layernorm), ("MLP", layer.post_attention_layernorm)):

            def keep(module, args, out, key=(index, where)):
                sums[key] = sums.get(key, 0) + out.detach().abs().reshape(-1, out.shape[-1]).sum(0)

            hooks.append(norm.register_forward_hook(keep))
    with torch.no_grad():
        for batch in calibration.input_ids.split(8):
            model(batch)
    for hook in hooks:
        hook.remove()
    rows = []
    for (index, where), total in sums.items():
        median = total.median()
        top, p99 = total.max() / median, total.quantile(0.99) / median
        rows.append([str(index), where, f"{top:.1f}", f"{p99:.1f}"])
    return format_table(
        ["layer", "input of", "max / median channel", "99th pct / median"],
        rows,
        title=f"{model_name}: spread of mean |activation| across input channels (calibration tokens)",
    )


def run(
    model_name: str, group: int, calibration_samples: int, per_source: int, outliers: bool = False
) -> tuple[str, str]:
    model, tokenizer = load_model(model_name, dtype=torch.float32), load_tokenizer(model_name)
    if outliers:
        probe = torch.randint(0, model.config.vocab_size, (2, 32))
        with torch.no_grad():
            before = model(probe).logits
            after = with_outlier_channels(model)(probe).logits
        assert (after - before).norm() / before.norm() < 1e-4, "the outlier rewrite must keep the function"
        model_name = f"{model_name} with outlier channels"
    program = moepass.capture(model)
    vocab = program.info.vocab_size
    calibration = calibration_set(
        "builtin:validation", tokenizer, samples=calibration_samples, vocab_size=vocab
    )
    test = evaluation_set("builtin:test", tokenizer, max_per_source=per_source, vocab_size=vocab)
    base = moepass.evaluate(program, test).overall
    spread = activation_spread(model, calibration, model_name)
    rows = [
        [
            "original",
            f"{base.perplexity:.3f}",
            "",
            f"{100 * base.accuracy:.2f}%",
            "",
            human_bytes(model_size(program)[1]),
        ]
    ]
    start = time.perf_counter()
    for label, passes in settings(group)[:3] if outliers else settings(group):
        compressed = moepass.compress(program, passes, calibration=calibration)
        score = moepass.evaluate(compressed, test).overall
        rows.append(
            [
                label,
                f"{score.perplexity:.3f}",
                f"{100 * (score.perplexity / base.perplexity - 1):+.2f}%",
                f"{100 * score.accuracy:.2f}%",
                f"{100 * score.accuracy / base.accuracy:.1f}%",
                human_bytes(model_size(compressed)[1]),
            ]
        )
        print(
            f"{model_name} {label}: ppl {score.perplexity:.3f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    title = (
        f"{model_name}: test perplexity over {base.tokens} tokens ({per_source} windows of 256 per domain); "
        f"calibration {calibration_samples} x 256 validation tokens; int4 groups of {group}"
    )
    table = format_table(
        ["setting", "perplexity", "vs original", "next-token acc", "acc kept", "weights"], rows, title=title
    )
    return table, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["builtin:tiny-mixtral=128", "builtin:tiny-deepseek=64"],
        help="model=int4 group size (the paper: 128 for Mixtral, 64 for fine-grained DeepSeek)",
    )
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--eval-per-source", type=int, default=32)
    parser.add_argument(
        "--outliers",
        default="builtin:tiny-mixtral=128",
        help="model=group to rerun int4 RTN/GPTQ/AWQ on with LLM-like outlier channels ('' to skip)",
    )
    parser.add_argument("--out", type=Path, default=Path("RESULTS-slimming.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tables, spreads = [], []
    for spec in args.models:
        name, _, group = spec.partition("=")
        table, spread = run(name, int(group or 128), args.calibration_samples, args.eval_per_source)
        tables.append(table)
        spreads.append(spread)
    outlier_tables = []
    if args.outliers:
        name, _, group = args.outliers.partition("=")
        outlier_tables = list(
            run(name, int(group or 128), args.calibration_samples, args.eval_per_source, outliers=True)
        )
    text = (
        "# Expert Slimming on the bundled models\n\nRegenerate with `python tools/quality_slimming.py`. "
        "Quantization targets experts, shared experts, attention and dense MLPs (router, embeddings and LM "
        "head stay in full precision, except in the rows that say so: the opt-in targets are rounded to "
        "nearest whatever the method); pruning targets the routed experts (the paper's setting). A drop "
        "ratio rounds down: 25% of tiny-mixtral's 6 MoE layers drops 1; the `count` row drops 2 (33%). "
        "Rows that quantize, then drop, score the layers on the quantized model (the paper's "
        "slim-then-trim; `scoring: iterative`). "
        "2:4 rows keep their pruned weights compressed (`sparse24_storage`): the size is what an "
        "artifact holds. Quality against size of every setting, with the trimming ones: "
        "`RESULTS-quality-vs-size.png`.\n\n"
        + "\n\n".join(f"```\n{t}\n```" for t in tables)
        + "\n\n## Why AWQ barely beats rounding here\n\n"
        "AWQ scales up the input channels that carry large activations so rounding spares them. The "
        "bundled models have no such channels (tables below: the largest channel is at most a few times "
        "the median, where LLMs show 20-100x), so the scale search has little to work with. On inputs "
        "with outlier channels the same search cuts rounding's output error 4-5x "
        "(`tests/test_slimming.py::test_awq_scales_protect_outlier_input_channels`).\n\n"
        + "\n\n".join(f"```\n{t}\n```" for t in spreads)
        + "\n\n## The same model with LLM-like outlier channels\n\n"
        "`with_outlier_channels` multiplies 4 RMSNorm gains per norm by 40 and divides the matching input "
        "columns of the projections that read them: the function is unchanged (checked), but the activations "
        "now carry massive channels the way trained LLMs do, and the small weights in those columns are "
        "what round-to-nearest destroys.\n\n" + "\n\n".join(f"```\n{t}\n```" for t in outlier_tables) + "\n"
    )
    args.out.write_text(text)
    print(text)
    print(f"wrote {write_plot([args.out, TRIMMING])}")


if __name__ == "__main__":
    main()
