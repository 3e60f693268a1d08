"""The `moepass` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from moepass.data import DEFAULT_SEQ_LEN
from moepass.errors import MoepassError

TEXT_KEY_HELP = "the text field of JSON records (default: text)"
DEVICE_HELP = "torch device to run on: cpu, cuda, cuda:1 (models load on the CPU first)"
USE_MOEPASS_FORMAT = "use --format moepass (the default)"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return _DTYPES[args.dtype] if args.dtype else None


def _device(args: argparse.Namespace) -> torch.device:
    """--device checked before minutes of loading: a typo or a missing GPU names itself. Only devices
    moepass lowers for (cpu, cuda) are offered: the others are untested."""
    from moepass.lowering import target_device

    try:
        return target_device(args.device)
    except MoepassError as error:
        raise MoepassError(f"--device: {error}") from None


def _inspect(args: argparse.Namespace) -> None:
    from moepass.artifact import is_artifact

    start = time.perf_counter()
    program = _load_program(args.model, lower=False, dtype=_dtype(args))
    how = "loaded" if is_artifact(args.model) else "loaded and captured"
    print(f"{how} {args.model} in {time.perf_counter() - start:.1f}s; verifier: ok\n")
    print(program.summary())


EVAL_FORMAT = "moepass-eval"  # marks `eval --json` files: only those are ever overwritten


def _eval(args: argparse.Namespace) -> None:
    from moepass.artifact import is_artifact
    from moepass.atomic_write import names_format
    from moepass.data import load_documents
    from moepass.evaluate import evaluate, model_config
    from moepass.ir import capture
    from moepass.zoo import load_model

    torch.set_num_threads(args.threads)
    device = _device(args)
    if args.json:  # before the evaluation, not after it
        directory = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            raise MoepassError(f"--json {args.json} is a directory; name a file")
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise MoepassError(
                f"--json {args.json}: cannot write a file there ({directory} must be a writable directory)"
            )
        if os.path.exists(args.json) and not names_format(args.json, EVAL_FORMAT):
            raise MoepassError(
                f"--json {args.json} exists and is not an earlier `moepass eval --json` result (the data, a "
                "manifest?); it is never overwritten: name another file"
            )
    if args.choices and (args.data is not None or args.seq_len is not None):
        raise MoepassError("--choices scores questions, --data and --seq-len text windows: give one of them")
    per_source = None if args.max_per_source == 0 else args.max_per_source
    if args.choices:  # read now (questions are small): a bad record is named before the model loads
        from moepass.multiple_choice import evaluate_choices, load_questions

        with _data_named("--choices"):
            questions = load_questions(args.choices, max_per_task=per_source, seed=args.seed)
    else:
        with _data_named("--data"):
            documents = load_documents(args.data or "builtin:test", text_key=args.text_key)
    onnx = os.path.isfile(os.path.join(args.model, "onnx_manifest.json"))
    if onnx and (args.program or args.dtype or device.type != "cpu"):
        raise MoepassError(
            f"{args.model} is an ONNX export, run by onnxruntime's CPU provider as exported; drop "
            "--program, --dtype and --device"
        )
    _refuse_file_model(args.model)
    tokenizer = _tokenizer(args)
    artifact = is_artifact(args.model)
    if onnx:
        from moepass.onnx_export.runtime import OnnxProgram

        subject, what = OnnxProgram(args.model), "ONNX export, onnxruntime"
        if subject.int8_activations:
            what += ", int8 activations"
    elif artifact:  # a compressed moepass artifact (a program already): evaluated as saved (canonical ops)
        subject = _load_program(args.model, lower=False, dtype=_dtype(args), device=device)
        what = "moepass artifact"
    else:
        model = load_model(args.model, dtype=_dtype(args))
        subject = (capture(model) if args.program else model).to(device)
        what = "captured program" if args.program else "transformers model"
    info = getattr(subject, "info", None)  # a program's, else the transformers model's config
    _check_tokenizer_fits(tokenizer, (subject.config if info is None else info).vocab_size, args)
    if args.choices:
        with _data_named("--choices"):
            result = evaluate_choices(subject, questions, tokenizer, batch_size=args.batch_size)
        print(result.table(title=f"{args.model} ({what}) on {args.choices}"))
        _write_eval_json(args, result.to_dict())
        return
    _refuse_long_windows([("--seq-len", args.seq_len)], model_config(subject, "max_position_embeddings"))
    with _data_named("--data"):  # what reading finds (no text, too short) names the flag
        result = evaluate(
            subject,
            documents,
            tokenizer=tokenizer,
            seq_len=args.seq_len,
            max_per_source=per_source,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    data = args.data or "builtin:test"
    print(result.table(title=f"{args.model} ({what}) on {data}, windows of {result.seq_len} tokens"))
    _write_eval_json(args, result.to_dict())


def _write_eval_json(args: argparse.Namespace, result: dict) -> None:
    from moepass.atomic_write import write_file_atomically

    if args.json:
        text = json.dumps({"format": EVAL_FORMAT, **result}, indent=2, allow_nan=False) + "\n"
        write_file_atomically(args.json, lambda path: path.write_text(text, encoding="utf-8"))
        print(f"wrote {args.json}")


def _compress(args: argparse.Namespace) -> None:
    """Options -> recipe and inputs (checked before any model loads) -> passes -> scores -> output."""
    from moepass.atomic_write import output_directory
    from moepass.compress import compress, needs_data
    from moepass.data import evaluation_set, window_length
    from moepass.multiple_choice import tokenize_questions
    from moepass.zoo import model_name

    torch.set_num_threads(args.threads)
    device = _device(args)
    recipe = _compress_recipe(args)
    questions = _checked_compress_inputs(args, recipe)
    if args.out is not None and not args.out.strip():  # an unset shell variable, not "the default"
        raise MoepassError("--out is empty; name the output directory, or leave --out out for the default")
    out = args.out or f"out/{model_name(args.model)}-{recipe.name}"
    _refuse_inside(out, args.model)  # the specific reason first; output_directory would refuse it too
    out = output_directory(out, args.force)
    _refuse_file_model(args.model)
    tokenizer = _tokenizer(args)
    # an artifact compresses further; calibration, the passes and evaluation run on `device`
    original = _load_program(args.model, lower=False, dtype=_dtype(args), device=device)
    _check_tokenizer_fits(tokenizer, original.info.vocab_size, args)
    positions = original.info.config.get("max_position_embeddings")
    windows = [("--eval-seq-len", args.eval_seq_len)]
    if needs_data(recipe):
        named = "--calib-seq-len" if args.calib_seq_len else f"recipe {recipe.name}: calibration.seq_len"
        windows.append((named, recipe.calibration.seq_len))
    _refuse_long_windows(windows, positions)
    held_out = None
    if args.eval_per_source:  # read now: a file that fails to tokenize must not cost the passes' work
        with _data_named("--eval-data"):
            held_out = evaluation_set(
                args.eval_data,
                tokenizer,
                seq_len=window_length(args.eval_seq_len, positions),  # 256, or the model's positions
                max_per_source=args.eval_per_source,
                vocab_size=original.info.vocab_size,
                text_key=recipe.calibration.text_key,  # --text-key, else the recipe's
            )
    if questions is not None:
        with _data_named("--eval-choices"):
            tokenize_questions(questions, tokenizer, original)  # a choice too long fails now, not after
    # compressing first (it forks `original`) fails a recipe this model cannot take before minutes of
    # evaluation: the pass manager refuses such a recipe before any pass runs
    with _data_named(_calibration_flag(args, recipe)):
        program = compress(original, recipe, tokenizer=tokenizer)
    report = _compression_report(args, recipe, original, program, held_out, questions, tokenizer)
    _write_compressed(args, out, program, report, tokenizer)


def _compress_recipe(args: argparse.Namespace):
    """The recipe with the command line's calibration options in it (the report and the artifact's
    history record what was used), refused by name where --format hf cannot hold its result."""
    from moepass.compress import needs_data
    from moepass.recipes import load_recipe

    recipe = load_recipe(args.recipe)  # validate before any work
    if args.text_key:
        recipe = replace(recipe, calibration=replace(recipe.calibration, text_key=args.text_key))
    calibration = {  # flag: (recipe calibration field, value given)
        "--calib": ("data", args.calib),
        "--calib-samples": ("samples", args.calib_samples),
        "--calib-seq-len": ("seq_len", args.calib_seq_len),
    }
    given = {flag: field_value for flag, field_value in calibration.items() if field_value[1] is not None}
    if given and not needs_data(recipe):
        unused = f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} unused"
        print(f"note: {unused}: recipe {recipe.name} reads no calibration data", file=sys.stderr)
    elif given:
        recipe = replace(recipe, calibration=replace(recipe.calibration, **dict(given.values())))
    if args.format == "hf":
        from moepass.passes import PASSES

        for name, config in recipe.passes:
            leaves = PASSES[name](config).leaves_not_in_hf_checkpoints()
            if leaves:
                raise MoepassError(
                    f"--format hf: pass {name} of recipe {recipe.name} leaves {leaves}, which no "
                    f"transformers checkpoint holds; {USE_MOEPASS_FORMAT}"
                )
    return recipe


def _calibration_flag(args: argparse.Namespace, recipe) -> str:
    return "--calib" if args.calib is not None else f"recipe {recipe.name}: calibration.data"


def _checked_compress_inputs(args: argparse.Namespace, recipe):
    """Data sources checked (a typo is an error now, not after loading the model); the multiple-choice
    questions, if asked for."""
    from moepass.compress import needs_data
    from moepass.data import DataError, check_source
    from moepass.multiple_choice import load_questions

    sources = [("--eval-data", args.eval_data)] if args.eval_per_source else []
    if needs_data(recipe):
        sources.append((_calibration_flag(args, recipe), recipe.calibration.data))
    for flag, data in sources:
        try:
            check_source(data)
        except DataError as error:
            raise MoepassError(f"{flag}: {error}") from None
    if not args.eval_choices:
        return None
    with _data_named("--eval-choices"):
        return load_questions(args.eval_choices)


def _compression_report(args: argparse.Namespace, recipe, original, program, held_out, questions, tokenizer):
    """Before/after scores of what the passes changed, and what calibrated and scored them."""
    from moepass.compress import needs_data
    from moepass.data import window_length
    from moepass.evaluate import evaluate, model_size
    from moepass.hf_export import hf_config
    from moepass.multiple_choice import evaluate_choices
    from moepass.report import CompressionReport

    transformed = _transformed(program)
    with _data_named("--eval-data"):
        before = None if held_out is None else evaluate(original, held_out)
    if args.format == "hf" and transformed:  # what the recipe's passes cannot tell up front
        hf_config(program, hint=f"; {USE_MOEPASS_FORMAT}")
    with _data_named("--eval-data"):
        after = evaluate(program, held_out) if held_out is not None and transformed else before
    experts = {b.index: b.mlp.num_experts for b in original.structure.moe_blocks}
    report = CompressionReport(
        args.model,
        recipe.to_dict(),
        before,
        after,
        program,
        original.info.num_layers,
        experts,
        model_size(original),
    )
    if questions is not None:
        with _data_named("--eval-choices"):
            choices_before = evaluate_choices(original, questions, tokenizer)
            choices_after = evaluate_choices(program, questions, tokenizer) if transformed else choices_before
        report.choices = (choices_before, choices_after)
        report.data["multiple choice"] = f"{len(questions)} questions from {args.eval_choices}"
    if needs_data(recipe):
        spec, positions = recipe.calibration, original.info.config.get("max_position_embeddings")
        windows = f"{spec.samples} windows of {window_length(spec.seq_len, positions)} tokens"
        report.data["calibration"] = f"{windows} from {spec.data}"
    if held_out is not None:
        report.data["evaluation"] = (
            f"{len(held_out)} windows of {held_out.seq_len} tokens from {args.eval_data}"
        )
    return report


def _transformed(program) -> bool:
    """Whether a transform ran. A recipe of analyses alone changes nothing: no second evaluation, no
    copy of the model (a transform that happened to change nothing still writes its artifact, which
    the user may load)."""
    return any(record.modified is not None for record in program.report.records)


def _write_compressed(args: argparse.Namespace, out: Path, program, report, tokenizer) -> None:
    """The artifact (if the passes changed the model) and the report, written atomically; then the
    tables printed."""
    from moepass.artifact import manifest_of, unique_tensors, write_checkpoint
    from moepass.atomic_write import write_atomically
    from moepass.hf_export import hf_checkpoint
    from moepass.zoo import save_tokenizer

    transformed = _transformed(program)
    documents, tensors = {}, {}
    if transformed and args.format == "hf":
        documents, tensors = hf_checkpoint(program)
    elif transformed:
        tensors, aliases = unique_tensors(program)
        documents = {"manifest.json": manifest_of(program, aliases)}

    def fill(staging: Path) -> None:
        if transformed:
            write_checkpoint(staging, documents, tensors)
            save_tokenizer(_tokenizer_to_write(args.tokenizer or args.model, tokenizer), staging)
        report.write(staging)

    write_atomically(out, fill, overwrite=args.force)
    # printed once written: a pager or `head` closing the pipe early must not cost the result
    analyses = [] if transformed else [result.table() for result in program.report.analyses.values()]
    choices = [] if report.choices is None else [report.choices_table()]
    print(
        report.summary_table(),
        *choices,
        report.structure_table(),
        program.report,
        *analyses,
        *report.data_lines(),
        sep="\n\n",
    )
    written = (
        [*documents, "model.safetensors", "tokenizer"] if transformed else ["the model unchanged: no copy"]
    )
    written += ["report.md", "report.json", *(["plots/"] if (out / "plots").is_dir() else [])]
    print(f"\nwrote {out}/ ({', '.join(written)})")


def _refuse_long_windows(windows: list[tuple[str, int | None]], positions: int | None) -> None:
    """(flag, window length) pairs longer than the model's positions, named before minutes of work."""
    for what, length in windows:
        if positions and length and length > positions:
            raise MoepassError(
                f"{what}: windows of {length} tokens exceed the model's {positions} positions "
                "(max_position_embeddings); use a shorter one, or leave it out (then it fits)"
            )


@contextlib.contextmanager
def _data_named(flag: str) -> Iterator[None]:
    """Data errors found while reading (empty, too short) name the flag of the data: compress reads
    two sources."""
    from moepass.data import DataError

    try:
        yield
    except DataError as error:
        raise MoepassError(f"{flag}: {error}") from None


def _refuse_file_model(model: str) -> None:
    """A model is a directory or a built-in name: refused before its tokenizer is read, since a file
    would be read as a tokenizer.json and blamed for that."""
    from moepass.zoo import builtin_names

    if os.path.isfile(model):
        raise MoepassError(
            f"{model} is a file; name a checkpoint directory, a moepass artifact or a built-in model "
            f"({', '.join(builtin_names())})"
        )


def _tokenizer(args: argparse.Namespace, load: Callable | None = None):
    """`--tokenizer`, else the model's own, read by `load` (default: `zoo.load_tokenizer`); an error
    names the flag that chose it."""
    from moepass.zoo import BUILTIN_PREFIX, load_tokenizer

    load = load or load_tokenizer
    if not args.tokenizer:
        return load(args.model)
    if not os.path.exists(args.tokenizer) and not args.tokenizer.startswith(BUILTIN_PREFIX):
        raise MoepassError(
            f"--tokenizer {args.tokenizer}: no such file or directory (a tokenizer.json file, a checkpoint "
            "directory or a built-in model)"
        )
    try:
        return load(args.tokenizer)
    except MoepassError as error:
        raise MoepassError(f"--tokenizer {args.tokenizer}: {error}") from None


def _check_tokenizer_fits(tokenizer, vocab_size: int, args: argparse.Namespace) -> None:
    """More tokens than the model's vocabulary: the tokenizer belongs to another model, and its ids
    would be refused mid-run or, unused, written into an output."""
    from tokenizers import Tokenizer

    plain = isinstance(tokenizer, Tokenizer)
    size = tokenizer.get_vocab_size(with_added_tokens=True) if plain else len(tokenizer)
    if size > vocab_size:
        source = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"{args.model}'s tokenizer"
        raise MoepassError(
            f"{source} has {size} tokens, more than the model's vocabulary of {vocab_size}: it belongs to "
            "another model; pass the model's own (--tokenizer)"
        )


def _tokenizer_to_write(source: str, tokenizer):
    """A local checkpoint's or a trained built-in's tokenizer files are copied as they are (special
    tokens, chat template); any other tokenizer object is written."""
    from moepass.zoo import trained_model_dir

    return source if os.path.exists(source) or trained_model_dir(source) else tokenizer


def _refuse_inside(out: str | Path, model: str) -> None:
    """--out naming the model's own directory (or one holding it) would replace the model with --force;
    compared with symbolic links resolved, so a link to the model (or named by --out) is caught too."""
    if os.path.exists(model) and Path(os.path.realpath(model)).is_relative_to(os.path.realpath(out)):
        raise MoepassError(f"--out {out} is or holds the model {model}; write the output elsewhere")


def _load_program(
    name_or_path: str,
    lower: bool = True,
    compile: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """A moepass artifact directory (loaded, lowered), or a model (captured in `dtype`, lowered), on
    `device`."""
    from moepass.artifact import is_artifact, load
    from moepass.ir import capture
    from moepass.lowering import lower as lower_program
    from moepass.zoo import load_model

    if is_artifact(name_or_path):
        if dtype is not None:
            raise MoepassError(
                f"--dtype applies to a model; the artifact {name_or_path} keeps its compressed dtype"
            )
        return load(name_or_path, device=device, lower=lower, compile=compile)
    program = capture(load_model(name_or_path, dtype=dtype)).to(device)
    return lower_program(program, copy=False, compile=compile) if lower else program


def _generate(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    if args.onnx and (
        args.compile or args.no_lower or args.static_cache or args.device.split(":")[0] != "cpu"
    ):
        raise MoepassError(
            "--compile, --no-lower, --static-cache and --device choose how PyTorch runs (onnxruntime runs "
            "on its CPU provider, growing its past tensors); drop them with --onnx"
        )
    if args.compile and args.no_lower:
        raise MoepassError("--compile compiles the lowered program; drop --no-lower")
    options = {
        "--temperature": args.temperature,
        "--top-k": args.top_k,
        "--top-p": args.top_p,
        "--min-p": args.min_p,
    }
    shaping = [option for option, value in options.items() if value is not None]
    if shaping and not args.sample:
        raise MoepassError(f"{', '.join(shaping)} shape sampling, and decoding is greedy: add --sample")
    if args.system is not None and not args.chat:
        raise MoepassError("--system is the chat's system message: add --chat")
    stops = args.stop or []
    if "" in stops:
        raise MoepassError("--stop '' would stop before the first token: give the text to stop at")
    device = torch.device("cpu") if args.onnx else _device(args)
    _refuse_file_model(args.model)
    prompts = args.prompt or ["The "]
    if args.chat:
        from moepass.zoo import chat_prompt_ids, load_chat_tokenizer

        tokenizer = _tokenizer(args, load=load_chat_tokenizer)
        prompts_ids = [chat_prompt_ids(tokenizer, prompt, args.system) for prompt in prompts]
    else:
        tokenizer = _tokenizer(args)
        # with the special tokens the tokenizer adds by default (a BOS where the model was trained with
        # one), the same whether tokenizer.json is read directly or through transformers
        prompts_ids = [tokenizer.encode(prompt) for prompt in prompts]
        if isinstance(tokenizer, Tokenizer):
            prompts_ids = [encoding.ids for encoding in prompts_ids]
    for number, prompt_ids in enumerate(prompts_ids, 1):
        if not prompt_ids:
            which = f"prompt {number} ({prompts[number - 1]!r})" if len(prompts) > 1 else "the prompt"
            raise MoepassError(f"{which} is empty after tokenization; pass --prompt TEXT")
    if args.onnx:
        from moepass.onnx_export.runtime import OnnxProgram

        program = OnnxProgram(args.model)
    else:
        program = _load_program(args.model, lower=not args.no_lower, compile=args.compile, device=device)
    _check_tokenizer_fits(tokenizer, program.info.vocab_size, args)
    # a chat prints the replies alone; the prompt is echoed with the first text, after generate's
    # warnings, not amid them
    texts = [[] if args.chat else [prompt] for prompt in prompts]
    # one prompt streams; a batch's texts are printed once all are done (interleaved, unreadable)
    writers = [_streamed(texts[0])] if len(prompts) == 1 else [text.append for text in texts]
    ends = program.info.eos_token_ids
    streams = [
        TextStream(tokenizer, ids, write, stops, ends)
        for ids, write in zip(prompts_ids, writers, strict=True)
    ]
    input_ids, attention_mask = _left_padded(prompts_ids, program.info.pad_token_id, device)

    def stream_rows(tokens: torch.Tensor) -> None:
        for row, stream in enumerate(streams):
            stream(tokens[row : row + 1])

    generator = torch.Generator(device).manual_seed(args.seed)  # sampling draws where the logits are
    start = time.perf_counter()
    program.generate(
        input_ids,
        args.max_new_tokens,
        attention_mask,
        do_sample=args.sample,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        top_p=args.top_p or 1.0,
        min_p=args.min_p or 0.0,
        stop_strings=stops,
        tokenizer=tokenizer,
        repetition_penalty=args.repetition_penalty,
        generator=generator,
        streamer=stream_rows,
        cache_implementation="static" if args.static_cache else "dynamic",
    )
    seconds = time.perf_counter() - start
    for number, (stream, text) in enumerate(zip(streams, texts, strict=True), 1):
        stream.finish()
        if len(streams) > 1:
            print(f"[{number}/{len(streams)}]", "".join(text), sep="\n", end="\n\n", flush=True)
    engine = "onnxruntime" if args.onnx else "PyTorch"
    if args.onnx and program.int8_activations:
        engine += ", int8 activations"
    if args.compile:
        engine += ", torch.compile: the time includes compiling for the prompt and for one token"
    # a batch steps until its longest row ends; rows that ended earlier count the tokens they kept
    steps, rows = max(len(stream.generated) for stream in streams), len(streams)
    tokens = sum(len(stream.generated) for stream in streams)
    lengths = ", ".join(str(len(ids)) for ids in prompts_ids)
    done = f"\n\n[{steps} tokens" if rows == 1 else f"[{steps} steps x {rows} prompts: {tokens} tokens"
    print(
        f"{done} in {seconds:.2f}s ({tokens / seconds:.1f} tokens/s), "
        f"{'prompts' if rows > 1 else 'prompt'} {lengths} tokens, {engine}]",
        file=sys.stderr,
    )


def _streamed(echo: list[str]) -> Callable[[str], None]:
    """A writer that prints each text as it comes, the first after `echo` (the prompt)."""

    def write(text: str) -> None:
        print(*echo, text, sep="", end="", flush=True)
        echo.clear()

    return write


def _left_padded(
    prompts_ids: list[list[int]], pad_id: int | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts padded on the left (as transformers generates), and its attention mask."""
    longest = max(map(len, prompts_ids))
    pad = 0 if pad_id is None else pad_id  # masked out: any id serves
    ids = [[pad] * (longest - len(p)) + p for p in prompts_ids]
    mask = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts_ids]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


class TextStream:
    """A streamer for `generate` that appends each new token to `generated` and writes the text it
    adds. Decoded after the prompt: a SentencePiece decoder drops the space before a text's first word,
    so decoding the new tokens alone would glue the first one to the prompt. Text that may begin a
    stop string is held back until it does not; a completed stop string and what follows it are never
    written. An end id (EOS) ends the text unwritten: a batch pads its finished rows with it."""

    def __init__(
        self,
        tokenizer,
        prompt_ids: list[int],
        write: Callable[[str], None],
        stops: list[str] = (),
        end_ids: list[int] = (),
    ):
        # a `tokenizers.Tokenizer` and a transformers tokenizer both decode so
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.prompt_ids, self.generated, self.write = prompt_ids, [], write
        self.stops, self.end_ids, self.stopped, self.ended = list(stops), set(end_ids), False, False
        self.text = self.decode(prompt_ids)
        self.prompt_length = self.shown = len(self.text)  # `shown`: how much of the text is written

    def __call__(self, next_tokens: torch.Tensor) -> None:
        if self.stopped or self.ended:
            return
        self.generated.append(int(next_tokens[0]))
        if self.generated[-1] in self.end_ids:
            self.ended = True
            return
        text = self.decode(self.prompt_ids + self.generated)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return
        self.text, end = text, len(text)
        for stop in self.stops:  # one begun in the prompt counts too
            found = text.find(stop, max(0, self.prompt_length - len(stop) + 1))
            if found >= 0:
                self.stopped, end = True, min(end, found)
        if not self.stopped:
            end -= max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if end > self.shown:
            self.write(text[self.shown : end])
            self.shown = end

    def finish(self) -> None:
        """Write what was held back for a stop string that did not come. Always writes (maybe
        nothing), so that a writer that echoes the prompt first does so even if no text came."""
        self.write("" if self.stopped else self.text[self.shown :])


def _export_onnx(args: argparse.Namespace) -> None:
    from moepass.atomic_write import output_directory
    from moepass.onnx_export import export_onnx
    from moepass.table import format_table
    from moepass.zoo import load_tokenizer

    _refuse_inside(args.out, args.model)
    output_directory(args.out, args.force)  # before minutes of loading and capturing
    program = _load_program(args.model, lower=False, dtype=_dtype(args))
    run = f"moepass generate {shlex.quote(args.out)} --onnx"
    try:
        tokenizer = _tokenizer_to_write(args.model, load_tokenizer(args.model))
    except (MoepassError, OSError, ValueError):
        tokenizer = None
        run += " --tokenizer TOKENIZER"
        print(f"note: {args.model} has no tokenizer; the export holds none", file=sys.stderr)
    start = time.perf_counter()
    print(
        f"exporting {program.info.model_class} ({len(program.structure.blocks)} blocks) ...", file=sys.stderr
    )
    export_onnx(
        program, args.out, tokenizer=tokenizer, overwrite=args.force, int8_activations=args.int8_activations
    )
    manifest = json.loads((Path(args.out) / "onnx_manifest.json").read_text(encoding="utf-8"))
    rows = [[kind, count] for kind, count in manifest["rewrites"].items()]
    print(format_table(["rewrite", "count"], rows))
    seconds = time.perf_counter() - start
    print(f"\nwrote {args.out}/ in {seconds:.1f}s; run it: {run}")


def _recipes(args: argparse.Namespace) -> None:
    from moepass.recipes import builtin_recipes, load_recipe
    from moepass.table import format_table

    recipes = [load_recipe(name) for name in sorted(builtin_recipes())]
    rows = [
        [r.name, "; ".join(f"{n}({c.describe() or 'defaults'})" for n, c in r.passes), r.scoring]
        for r in recipes
    ]
    print(format_table(["recipe", "passes (options that differ from the defaults)", "scoring"], rows))
    for recipe in recipes:
        print(
            f"\n{recipe.name}:\n"
            + textwrap.fill(recipe.description, 100, initial_indent="  ", subsequent_indent="  ")
        )


def _passes(args: argparse.Namespace) -> None:
    import dataclasses

    from moepass.passes import PASSES

    for name in sorted(PASSES):
        cls = PASSES[name]
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().split("\n\n")[0]
        print(f"{name} ({cls.kind}, stage {cls.stage})")
        print(textwrap.fill(" ".join(doc.split()), 100, initial_indent="  ", subsequent_indent="  "))
        if cls.stage == "lower":
            print("  (lowering: moepass.lower and moepass.load run it; recipes cannot name it)")
        for field in dataclasses.fields(cls.config_class):
            default = "required" if field.default is dataclasses.MISSING else repr(field.default)
            hint = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", field.type)
            print(f"    {field.name}: {hint} = {default}")
        print()


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum` (bad values get argparse's usage error,
    not a traceback from deep inside torch after the model has loaded)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse's "invalid integer value: 'x'"
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


_positive_float.__name__ = "number"


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


_probability.__name__ = "probability"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's --help line ends with its default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from moepass.zoo import builtin_names

    parser = argparse.ArgumentParser(
        prog="moepass", description="Compress Mixture-of-Experts language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser = functools.partial(commands.add_parser, formatter_class=_HelpWithDefaults)
    inspect = commands.add_parser("inspect", help="capture a model and print its IR summary")
    inspect.add_argument(
        "model", help=f"moepass artifact, checkpoint directory or one of: {', '.join(builtin_names())}"
    )
    inspect.add_argument("--dtype", choices=sorted(_DTYPES), help="load the weights in this dtype")
    inspect.set_defaults(run=_inspect)

    evaluation = commands.add_parser(
        "eval", help="perplexity and next-token accuracy on held-out text, or multiple-choice accuracy"
    )
    evaluation.add_argument(
        "model",
        help=f"checkpoint directory, moepass artifact, ONNX export or one of: {', '.join(builtin_names())}",
    )
    evaluation.add_argument(
        "--data",
        help="builtin:test, builtin:validation, a .txt/.jsonl(.gz)/.json file or a directory (default: "
        "builtin:test)",
    )
    evaluation.add_argument(
        "--choices",
        help="multiple-choice questions instead: builtin:continuations (which words follow held-out text) "
        'or a .jsonl(.gz)/.json file of {"context": ..., "choices": [...], "label": index, "task": name} '
        "records; acc and acc_norm per task, as lm-evaluation-harness",
    )
    evaluation.add_argument("--text-key", default="text", help=TEXT_KEY_HELP)
    evaluation.add_argument(
        "--tokenizer", help="tokenizer.json or checkpoint directory (default: the model's)"
    )
    evaluation.add_argument(
        "--seq-len",
        type=_at_least(2),
        help=f"tokens per evaluation window (default: {DEFAULT_SEQ_LEN}, or the model's positions if fewer)",
    )
    evaluation.add_argument(
        "--max-per-source",
        type=_at_least(0),
        default=64,
        help="windows per domain (with --choices: questions per task); 0 = all",
    )
    evaluation.add_argument(
        "--batch-size", type=_at_least(1), default=8, help="windows (or choices) per forward pass"
    )
    evaluation.add_argument("--seed", type=int, default=0, help="which windows (or questions) are drawn")
    evaluation.add_argument("--threads", type=_at_least(1), default=1, help="torch CPU threads")
    evaluation.add_argument("--device", default="cpu", help=DEVICE_HELP)
    evaluation.add_argument("--dtype", choices=sorted(_DTYPES), help="load the weights in this dtype")
    evaluation.add_argument("--program", action="store_true", help="evaluate the captured program instead")
    evaluation.add_argument("--json", help="also write the result as JSON to this file")
    evaluation.set_defaults(run=_eval)

    comp = commands.add_parser(
        "compress", help="compress a model with a recipe; writes artifact, report, plots"
    )
    comp.add_argument(
        "--model",
        default="builtin:tiny-mixtral",
        help="built-in name, checkpoint directory or moepass artifact (compressed further)",
    )
    comp.add_argument("--recipe", default="paper-layer-drop", help="built-in recipe name or YAML file")
    comp.add_argument(
        "--calib", default=None, help="calibration data (default: the recipe's, builtin:validation)"
    )
    comp.add_argument("--tokenizer", help="tokenizer.json or checkpoint directory (default: the model's)")
    comp.add_argument("--out", help="output directory (default: out/<model>-<recipe>)")
    comp.add_argument(
        "--format",
        choices=["moepass", "hf"],
        default="moepass",
        help="moepass: artifact for moepass.load (any recipe); hf: stock transformers checkpoint "
        "(expert drop, block drop, pruning)",
    )
    comp.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="load the weights in this dtype (the artifact keeps it)"
    )
    comp.add_argument("--force", action="store_true", help="replace an existing output directory")
    comp.add_argument("--eval-data", default="builtin:test", help="held-out text scored before and after")
    comp.add_argument(
        "--calib-samples", type=_at_least(1), help="calibration windows (default: the recipe's, 128)"
    )
    comp.add_argument(
        "--calib-seq-len",
        type=_at_least(2),
        help=f"calibration window length (default: the recipe's, {DEFAULT_SEQ_LEN} or the model's positions "
        "if fewer)",
    )
    comp.add_argument("--text-key", help=TEXT_KEY_HELP + " (--calib and --eval-data; default: the recipe's)")
    comp.add_argument(
        "--eval-per-source", type=_at_least(0), default=64, help="evaluation windows per domain; 0 = skip"
    )
    comp.add_argument(
        "--eval-choices",
        help="multiple-choice questions scored before and after too (builtin:continuations or a file, as "
        "eval --choices reads)",
    )
    comp.add_argument(
        "--eval-seq-len",
        type=_at_least(2),
        help=f"evaluation window length (default: {DEFAULT_SEQ_LEN}, or the model's positions if fewer)",
    )
    comp.add_argument("--threads", type=_at_least(1), default=1, help="torch CPU threads")
    comp.add_argument("--device", default="cpu", help=DEVICE_HELP + "; the artifact is the same")
    comp.set_defaults(run=_compress)

    gen = commands.add_parser("generate", help="stream text from a compressed artifact or a model")
    gen.add_argument("model", help="moepass artifact directory, built-in name or checkpoint directory")
    gen.add_argument(
        "--prompt",
        action="append",
        help="text to continue (with --chat: the user's message; default 'The '); repeat it for a batch, "
        "generated together and printed once all are done",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="put the prompt in the model's chat template, as a user message the model answers (instruct "
        "models); prints the reply alone",
    )
    gen.add_argument("--system", help="with --chat: a system message before the user's")
    gen.add_argument("--max-new-tokens", type=_at_least(1), default=64, help="tokens to generate")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument(
        "--temperature", type=_positive_float, help="with --sample: softmax temperature (default: 1)"
    )
    gen.add_argument("--top-k", type=_at_least(1), help="with --sample: draw among the k likeliest tokens")
    gen.add_argument(
        "--top-p",
        type=_probability,
        help="with --sample: draw among the likeliest tokens whose probabilities add up to P (nucleus)",
    )
    gen.add_argument(
        "--min-p",
        type=_probability,
        help="with --sample: drop tokens less likely than P times the likeliest one",
    )
    gen.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="stop once the text holds TEXT, printed up to it (repeatable; e.g. --stop $'\\n\\n')",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=_positive_float,
        default=1.0,
        help="above 1: tokens already in the text (prompt included) become less likely, greedy or sampled",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--tokenizer", help="tokenizer.json or directory (default: the model's)")
    gen.add_argument(
        "--onnx",
        action="store_true",
        help="MODEL is an exported ONNX directory (moepass export-onnx): run it in onnxruntime",
    )
    gen.add_argument("--no-lower", action="store_true", help="run the canonical ops, not the lowered kernels")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="run the lowered program through torch.compile (faster decode; compiles ~1 min first)",
    )
    gen.add_argument(
        "--static-cache",
        action="store_true",
        help="decode into a KV cache allocated once (one shape per step: with --compile on CUDA, replayed "
        "as a CUDA graph)",
    )
    gen.add_argument("--threads", type=_at_least(1), default=1, help="torch / onnxruntime CPU threads")
    gen.add_argument("--device", default="cpu", help=DEVICE_HELP + "; lowered for it")
    gen.set_defaults(run=_generate)

    onnx = commands.add_parser("export-onnx", help="export a program as an ONNX decoder for onnxruntime")
    onnx.add_argument("model", help="moepass artifact directory, built-in name or checkpoint directory")
    onnx.add_argument("out", help="output directory (model.onnx, onnx_manifest.json, tokenizer)")
    onnx.add_argument("--force", action="store_true", help="replace an existing output directory")
    onnx.add_argument(  # onnxruntime's CPU provider has no bfloat16 kernels: refused before loading
        "--dtype",
        choices=sorted(set(_DTYPES) - {"bfloat16"}),
        help="load a model's weights in this dtype (onnxruntime's CPU provider runs no bfloat16)",
    )
    onnx.add_argument(
        "--int8-activations",
        action="store_true",
        help="quantized matmuls quantize their activations to int8 as they run (onnxruntime's "
        "accuracy_level 4; int8 experts on its fused QMoE op): faster CPU decoding, logits slightly "
        "off the PyTorch program's; needs onnxruntime >= 1.31",
    )
    onnx.set_defaults(run=_export_onnx)

    recipes = commands.add_parser("recipes", help="list the built-in recipes")
    recipes.set_defaults(run=_recipes)

    passes = commands.add_parser("passes", help="list the passes a recipe can name, with their options")
    passes.set_defaults(run=_passes)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a line is logged, not as it was when the first command ran:
    a notebook or test that replaces (and closes) it between commands still gets the lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("moepass")  # progress lines; other libraries' logs stay at their defaults
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    # SIGTERM (kill, Slurm, docker stop) unwinds like Ctrl-C, so a write in progress removes its staging
    # directory (as large as the model) instead of leaving it behind
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        args.run(args)
    except MoepassError as error:
        print(f"moepass {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` or a pager that closed: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not fail
        return 1
    except KeyboardInterrupt as error:  # not a traceback from wherever the signal landed
        name = str(error) or signal.SIGINT.name
        print(f"moepass {args.command}: interrupted ({name}); nothing was left half-written", file=sys.stderr)
        return 128 + signal.Signals[name].value
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
