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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except MoepassError as error:
        print(f"moepass {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
