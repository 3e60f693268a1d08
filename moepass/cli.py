"""The `moepass` command line."""

from __future__ import annotations

import argparse
import logging
import sys
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
