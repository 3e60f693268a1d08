"""The `moepass` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch

from moepass.errors import MoepassError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _inspect(args: argparse.Namespace) -> None:
    from moepass.ir import capture
    from moepass.zoo import load_model

    model = load_model(args.model, dtype=_DTYPES[args.dtype] if args.dtype else None)
    start = time.perf_counter()
    program = capture(model)
    print(f"captured {args.model} in {time.perf_counter() - start:.1f}s; verifier: ok\n")
    print(program.summary())


def _eval(args: argparse.Namespace) -> None:
    from moepass.evaluate import evaluate
    from moepass.ir import capture
    from moepass.zoo import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=_DTYPES[args.dtype] if args.dtype else None)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    subject = capture(model) if args.program else model
    per_source = None if args.max_per_source == 0 else args.max_per_source
    result = evaluate(
        subject,
        args.data,
        tokenizer=tokenizer,
        seq_len=args.seq_len,
        max_per_source=per_source,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    what = "captured program" if args.program else "transformers model"
    print(result.table(title=f"{args.model} ({what}) on {args.data}, windows of {args.seq_len} tokens"))
    if args.json:
        _write_atomically(args.json, result.to_json() + "\n")
        print(f"wrote {args.json}")


def _compress(args: argparse.Namespace) -> None:
    from pathlib import Path

    from moepass.artifact import manifest_of, save, unique_tensors, write_atomically, write_checkpoint
    from moepass.compress import compress
    from moepass.evaluate import evaluate
    from moepass.ir import capture
    from moepass.recipes import load_recipe
    from moepass.report import CompressionReport
    from moepass.zoo import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)  # validate before any work
    out = Path(args.out or f"out/{args.model.removeprefix('builtin:').replace('/', '_')}-{recipe.name}")
    if out.exists() and not args.force:
        raise MoepassError(f"{out} already exists; pass --force to replace it")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    original = capture(model)
    experts = {b.index: b.mlp.num_experts for b in original.structure.moe_blocks}
    evaluation = {"tokenizer": tokenizer, "max_per_source": args.eval_per_source}
    before = evaluate(original, args.eval_data, **evaluation) if args.eval_per_source else None
    program = compress(original, recipe, calibration=args.calib, tokenizer=tokenizer)
    after = evaluate(program, args.eval_data, **evaluation) if args.eval_per_source else None
    report = CompressionReport(
        args.model, recipe.to_dict(), before, after, program, original.info.num_layers, experts
    )
    coverage = [r.summary["coverage_table"] for r in program.report.records if "coverage_table" in r.summary]
    print(
        report.summary_table(), report.structure_table(), program.report.table(), *coverage[-1:], sep="\n\n"
    )
    if args.format == "hf":
        save(program, out, format="hf", overwrite=args.force)
        report.write(out)
    else:
        tensors, aliases = unique_tensors(program)

        def fill(staging: Path) -> None:
            write_checkpoint(staging, "manifest.json", manifest_of(program, aliases), tensors)
            report.write(staging)

        write_atomically(out, fill, overwrite=args.force)
    print(f"\nwrote {out}/ (model.safetensors, manifest.json, report.md, report.json, plots/)")


def _recipes(args: argparse.Namespace) -> None:
    from moepass.recipes import builtin_recipes, load_recipe
    from moepass.table import format_table

    rows = []
    for name in sorted(builtin_recipes()):
        recipe = load_recipe(name)
        passes = "; ".join(f"{n}({c.describe()})" for n, c in recipe.passes)
        rows.append([name, passes, recipe.description[:70] + ("..." if len(recipe.description) > 70 else "")])
    print(format_table(["recipe", "passes", "description"], rows))


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def build_parser() -> argparse.ArgumentParser:
    from moepass.zoo import builtin_names

    parser = argparse.ArgumentParser(
        prog="moepass", description="Compress Mixture-of-Experts language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="capture a model and print its IR summary")
    inspect.add_argument("model", help=f"local checkpoint directory or one of: {', '.join(builtin_names())}")
    inspect.add_argument("--dtype", choices=sorted(_DTYPES), help="load the weights in this dtype")
    inspect.set_defaults(run=_inspect)

    evaluation = commands.add_parser("eval", help="perplexity and next-token accuracy on held-out text")
    evaluation.add_argument(
        "model", help=f"local checkpoint directory or one of: {', '.join(builtin_names())}"
    )
    evaluation.add_argument(
        "--data",
        default="builtin:test",
        help="builtin:test, builtin:validation, a .txt/.jsonl(.gz) file or a directory",
    )
    evaluation.add_argument(
        "--tokenizer", help="tokenizer.json or checkpoint directory (default: the model's)"
    )
    evaluation.add_argument("--seq-len", type=int, default=256)
    evaluation.add_argument("--max-per-source", type=int, default=64, help="windows per domain; 0 = all")
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--threads", type=int, default=1)
    evaluation.add_argument("--dtype", choices=sorted(_DTYPES), help="load the weights in this dtype")
    evaluation.add_argument("--program", action="store_true", help="evaluate the captured program instead")
    evaluation.add_argument("--json", help="also write the result as JSON to this file")
    evaluation.set_defaults(run=_eval)

    comp = commands.add_parser(
        "compress", help="compress a model with a recipe; writes artifact, report, plots"
    )
    comp.add_argument("--model", default="builtin:tiny-mixtral", help="built-in name or checkpoint directory")
    comp.add_argument("--recipe", default="paper-layer-drop", help="built-in recipe name or YAML file")
    comp.add_argument(
        "--calib", default=None, help="calibration data (default: the recipe's, builtin:validation)"
    )
    comp.add_argument("--tokenizer", help="tokenizer.json or checkpoint directory (default: the model's)")
    comp.add_argument("--out", help="output directory (default: out/<model>-<recipe>)")
    comp.add_argument("--format", choices=["moepass", "hf"], default="moepass")
    comp.add_argument("--force", action="store_true", help="replace an existing output directory")
    comp.add_argument("--eval-data", default="builtin:test")
    comp.add_argument(
        "--eval-per-source", type=int, default=64, help="evaluation windows per domain; 0 = skip"
    )
    comp.add_argument("--threads", type=int, default=1)
    comp.set_defaults(run=_compress)

    recipes = commands.add_parser("recipes", help="list the built-in recipes")
    recipes.set_defaults(run=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("moepass")  # progress lines; other libraries' logs stay at their defaults
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        args.run(args)
    except MoepassError as error:
        print(f"moepass {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
