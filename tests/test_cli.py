"""The `moepass` command line: `inspect` on built-in models and local checkpoints, option checks; errors
exit with status 2."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import time

import pytest
import torch

from helpers import model_for
from moepass import cli, evaluate_choices, load, load_questions
from moepass.atomic_write import write_atomically
from moepass.cli import main
from moepass.zoo import load_model, load_tokenizer


def test_inspect_builtin(capsys):
    assert main(["inspect", "builtin:random-qwen2-moe"]) == 0
    out = capsys.readouterr().out
    assert "verifier: ok" in out and "Qwen2MoeForCausalLM" in out
    assert "MoE E=8 top-2 softmax_topk +shared (sigmoid-gated)" in out


def test_inspect_local_checkpoint(tmp_path, capsys, seed):
    model_for("olmoe", seed=seed).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "OlmoeForCausalLM" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,message",
    [
        ("builtin:random-llama", "unknown built-in model"),
        ("/no/such/dir", "neither a built-in model"),
    ],
)
def test_inspect_bad_model(name, message, capsys):
    assert main(["inspect", name]) == 2
    assert message in capsys.readouterr().err


def test_recipes_lists_every_builtin_recipe_with_its_passes_and_description(capsys):
    from moepass.recipes import builtin_recipes, load_recipe

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert f"\n{name}:\n" in out
        assert " ".join(recipe.description.split()[-6:]) in " ".join(out.split())  # not cut short
    assert "layer_drop(ratio=0.25)" in out and "awq(defaults)" in out


def test_passes_lists_every_registered_pass_with_its_options(capsys):
    import dataclasses

    from moepass.passes import PASSES

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name, cls in PASSES.items():
        assert f"\n{name} ({cls.kind}, stage {cls.stage})\n" in f"\n{out}"
        for field in dataclasses.fields(cls.config_class):
            assert f"    {field.name}: " in out
    assert "    group_size: int = 128\n" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["generate", "builtin:tiny-mixtral", "--max-new-tokens", "-1"],
            "--max-new-tokens: must be at least 1",
        ),
        (["generate", "builtin:tiny-mixtral", "--top-k", "0"], "--top-k: must be at least 1, got 0"),
        (["generate", "builtin:tiny-mixtral", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
        (
            ["generate", "builtin:tiny-mixtral", "--repetition-penalty", "0"],
            "--repetition-penalty: must be a positive number",
        ),
        (["generate", "builtin:tiny-mixtral", "--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
        (["generate", "builtin:tiny-mixtral", "--min-p", "-0.1"], "--min-p: must be in (0, 1], got -0.1"),
        (
            ["generate", "builtin:tiny-mixtral", "--temperature", "0"],
            "--temperature: must be a positive number",
        ),
        (["generate", "builtin:tiny-mixtral", "--threads", "two"], "--threads: invalid integer value: 'two'"),
        (["eval", "builtin:tiny-mixtral", "--seq-len", "1"], "--seq-len: must be at least 2"),
        (["compress", "--eval-per-source", "-2"], "--eval-per-source: must be at least 0"),
    ],
)
def test_numeric_options_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "--model", "builtin:random-mixtral", "--recipe", "int4-gptq", "--eval-per-source", "0"],
        ["eval", "builtin:random-mixtral"],
        ["generate", "builtin:random-mixtral"],
        ["generate", "builtin:random-mixtral", "--no-lower"],
    ],
)
@pytest.mark.parametrize(
    "device,message",
    [
        ("cuda:99", "--device: device 'cuda:99': "),  # no GPU here, or fewer than 100
        ("gpu", "--device: device 'gpu' is not a torch device"),
        ("meta", "--device: no lowering for device 'meta'"),
    ],
)
def test_a_device_is_checked_before_any_model_is_loaded(argv, device, message, capsys, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr("moepass.zoo.load_model", load_model)
    assert main([*argv, "--device", device]) == 2
    assert message in capsys.readouterr().err


def test_onnx_generation_refuses_the_pytorch_options(tmp_path, capsys):
    for option in (["--compile"], ["--no-lower"], ["--static-cache"], ["--device", "meta"]):
        assert main(["generate", str(tmp_path), "--onnx", *option]) == 2
        assert "drop them with --onnx" in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["compress", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "file is not a writable directory" in capsys.readouterr().err
    assert main(["eval", "builtin:tiny-mixtral", "--json", str(tmp_path / "missing" / "r.json")]) == 2
    assert "--json" in capsys.readouterr().err and "missing" not in str(list(tmp_path.iterdir()))


def test_damaged_checkpoints_and_tokenizers_are_named(tmp_path, capsys):
    model = model_for("mixtral", seed=0)
    model.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x08\x00")  # truncated
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text("{not json")
    (tmp_path / "tokenizer.json").write_text("{bad")
    for argv, message in [
        (["inspect", str(tmp_path / "ck")], "ck cannot be read as a transformers causal LM checkpoint"),
        (["inspect", str(tmp_path / "bad-config")], "bad-config cannot be read as a transformers causal LM"),
        (
            ["eval", "builtin:tiny-mixtral", "--tokenizer", str(tmp_path / "tokenizer.json")],
            "tokenizer.json cannot be read as a tokenizers JSON file",
        ),
        (
            ["compress", "--calib", str(tmp_path / "nowhere.txt")],
            "--calib: data path .*nowhere.txt' does not exist",
        ),
    ]:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err), argv


def test_a_tokenizer_that_cannot_serve_the_model_is_refused_by_name(tmp_path, capsys):
    model_for("mixtral", seed=0).save_pretrained(tmp_path / "mixtral")  # a vocabulary of 128
    model_for("qwen3_moe", seed=0).save_pretrained(tmp_path / "qwen3")  # and no tokenizer files
    model_for("qwen3_moe", seed=0).save_pretrained(tmp_path / "qwen3-config-only")
    (tmp_path / "qwen3-config-only" / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "Qwen2Tokenizer"}'
    )
    (tmp_path / "file").write_text("x")
    for argv, message in [
        (
            ["eval", str(tmp_path / "mixtral"), "--tokenizer", "builtin:tiny-mixtral"],
            "--tokenizer builtin:tiny-mixtral has 4096 tokens, more than the model's vocabulary of 128",
        ),
        (
            ["generate", str(tmp_path / "mixtral"), "--tokenizer", "tokenizr.json"],
            "--tokenizer tokenizr.json: no such file or directory",
        ),
        (  # transformers would blame a missing sentencepiece package, or build an empty Qwen2 tokenizer
            ["eval", str(tmp_path / "qwen3")],
            "qwen3 holds no tokenizer files (tokenizer.json, ",
        ),
        (  # a config naming a class but no vocabulary: perplexity 128 at 100% accuracy, before
            ["eval", str(tmp_path / "qwen3-config-only")],
            "qwen3-config-only holds no tokenizer vocabulary: transformers built an empty Qwen2Tokenizer",
        ),
        (["compress", "--out", str(tmp_path / "file"), "--force"], "file is a file; name a directory"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err, argv


def test_a_tokenizer_json_file_is_a_tokenizer(tmp_path):
    from moepass.zoo import load_tokenizer, models_dir

    path = str(models_dir() / "tiny-mixtral" / "tokenizer.json")
    assert (
        load_tokenizer(path).encode("It is").ids == load_tokenizer("builtin:tiny-mixtral").encode("It is").ids
    )


def test_compress_calibration_size_from_the_command_line(tmp_path, capsys, monkeypatch):
    """--calib-samples and --calib-seq-len replace the recipe's; what calibrated the passes and what
    scored them is stated in the printed result and report.md, and kept in report.json."""
    compress = importlib.import_module("moepass.compress")  # the module; moepass.compress is the function
    read = []

    def calibration_set(*args, **kwargs):
        tokens = real(*args, **kwargs)
        read.append(tuple(tokens.input_ids.shape))
        return tokens

    real = compress.calibration_set
    monkeypatch.setattr(compress, "calibration_set", calibration_set)
    out = tmp_path / "out"
    questions = tmp_path / "questions.jsonl"
    choices = ["a dark night", "the", "of the house"]
    questions.write_text(
        "".join(json.dumps({"context": "It was", "choices": choices, "label": i}) + "\n" for i in range(3))
    )
    recipe = tmp_path / "drop.yaml"  # calibrated, and cheap: forward passes only
    recipe.write_text("name: drop\npasses:\n  - expert_drop: {keep: 6}\n")
    argv = ["compress", "--model", "builtin:tiny-mixtral", "--recipe", str(recipe), "--out", str(out)]
    sizes = [
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "32",
        "--eval-per-source",
        "1",
        "--eval-seq-len",
        "16",
    ]
    assert main([*argv, *sizes, "--eval-choices", str(questions)]) == 0
    assert read == [(3, 32)]
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    calibration = report["recipe"]["calibration"]
    assert (calibration["samples"], calibration["seq_len"]) == (3, 32)
    domains = len(report["before"]["domains"])
    assert report["data"] == {
        "calibration": "3 windows of 32 tokens from builtin:validation",
        "evaluation": f"{domains} windows of 16 tokens from builtin:test",
        "multiple choice": f"3 questions from {questions}",
    }
    stated = [
        "Calibration: 3 windows of 32 tokens from builtin:validation.",
        f"Evaluation: {domains} windows",
    ]
    for line in [*stated, "Multiple choice: 3 questions from", "acc_norm before", "multiple choice acc_norm"]:
        assert line in printed and line in (out / "report.md").read_text()
    tokenizer, asked = load_tokenizer("builtin:tiny-mixtral"), load_questions(questions)
    for when, subject in (("before", load_model("builtin:tiny-mixtral")), ("after", load(out, lower=False))):
        assert report["choices"][when] == evaluate_choices(subject, asked, tokenizer).to_dict()["tasks"]
    assert report["choices"]["before"]["questions"]["acc"] == pytest.approx(1 / 3)  # one likeliest, 3 labels

    recipe = tmp_path / "rtn.yaml"  # reads no calibration data
    recipe.write_text("name: rtn\npasses:\n  - rtn: {}\n")
    argv = ["compress", "--recipe", str(recipe), "--out", str(tmp_path / "rtn"), "--eval-per-source", "0"]
    assert main([*argv, "--calib-samples", "3"]) == 0
    assert "note: --calib-samples is unused: recipe rtn reads no calibration data" in capsys.readouterr().err
    assert json.loads((tmp_path / "rtn" / "report.json").read_text())["data"] == {}
    assert read == [(3, 32)]


def test_eval_text_key_names_the_records_text_field(tmp_path, capsys, seed, monkeypatch):
    import shutil

    from moepass.data import Document, corpus_dir
    from moepass.evaluate import evaluate
    from moepass.zoo import load_tokenizer

    model = model_for("mixtral", seed=seed, vocab_size=4096)  # the corpus tokenizer's vocabulary
    model.save_pretrained(tmp_path / "model")
    shutil.copy(corpus_dir() / "tokenizer.json", tmp_path / "model" / "tokenizer.json")
    texts = [f"It was the {i}th morning, and the house was quiet before anyone came down." for i in range(40)]
    (tmp_path / "body.jsonl").write_text("\n".join(json.dumps({"body": t, "source": "mine"}) for t in texts))
    argv = ["eval", str(tmp_path / "model"), "--data", str(tmp_path / "body.jsonl"), "--seq-len", "32"]
    with monkeypatch.context() as patch:  # the data is read before the model loads
        patch.setattr("moepass.zoo.load_model", lambda *_, **__: pytest.fail("loaded the model first"))
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(
        r"--data: \S*body\.jsonl: record 1 has no 'text' field \(has \['body', 'source'\]\)", err
    )
    assert main([*argv, "--text-key", "body", "--json", str(tmp_path / "r.json")]) == 0
    docs = [Document(t, "mine") for t in texts]
    expected = evaluate(model, docs, tokenizer=load_tokenizer(str(tmp_path / "model")), seq_len=32)
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["overall"] == json.loads(expected.to_json())["overall"]
    assert main([*argv, "--text-key", "body", "--json", str(tmp_path / "r.json")]) == 0  # its own: replaced
    # what only reading or the loaded model can tell still names the flag at fault
    (tmp_path / "blank.txt").write_text("  \n")
    assert main([*argv[:2], "--data", str(tmp_path / "blank.txt")]) == 2
    assert "error: --data: the data holds no text" in capsys.readouterr().err
    too_long = str(model.config.max_position_embeddings + 1)
    assert main([*argv[:-1], too_long, "--text-key", "body"]) == 2
    assert f"error: --seq-len: windows of {too_long} tokens exceed the model's" in capsys.readouterr().err
    # any other file (the data itself, a manifest) is never overwritten, and refused before the work
    data = (tmp_path / "body.jsonl").read_bytes()
    assert main([*argv, "--text-key", "body", "--json", str(tmp_path / "body.jsonl")]) == 2
    assert "is not an earlier `moepass eval --json` result" in capsys.readouterr().err
    assert (tmp_path / "body.jsonl").read_bytes() == data


def test_streamed_text_keeps_the_space_a_sentencepiece_decoder_drops_at_the_start():
    """Metaspace (Mixtral's, Phi-MoE's tokenizers) decodes "▁even" alone as "even": streamed after the
    prompt it must read " even", and a transformers tokenizer's BOS must not show."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moepass.cli import TextStream

    vocab = {"<unk>": 0, "<s>": 1, "▁The": 2, "▁king": 3, "▁even": 4, "▁round": 5}
    sentencepiece_like = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece_like.decoder = decoders.Metaspace()
    assert sentencepiece_like.decode([4]) == "even"  # the trap
    transformers_tokenizer = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_like, bos_token="<s>")
    for tokenizer, prompt in ((sentencepiece_like, [2, 3]), (transformers_tokenizer, [1, 2, 3])):
        written = []
        stream = TextStream(tokenizer, prompt, written.append)
        for token in (4, 5):
            stream(torch.tensor([token]))
        assert written == [" even", " round"] and stream.generated == [4, 5]
        # stop strings: text that may begin one waits; a completed one and what follows never show
        for stops, shown in (
            ([" round"], [" even", ""]),
            (["n ro"], [" eve", ""]),
            (["nx"], [" eve", "n round", ""]),
        ):
            written = []
            stream = TextStream(tokenizer, prompt, written.append, stops)
            for token in (4, 5):
                stream(torch.tensor([token]))
            stream.finish()
            assert written == shown, stops
        # an end id (EOS; a batch's padding after it) ends the text: what was held back still shows
        written = []
        stream = TextStream(tokenizer, prompt, written.append, ["nx"], end_ids=[2])
        for token in (4, 2, 5, 2):
            stream(torch.tensor([token]))
        stream.finish()
        assert written == [" eve", "n"] and stream.generated == [4, 2]


def test_generation_stops_at_the_stop_strings_and_prints_the_text_before_them(capsys):
    argv = ["generate", "builtin:tiny-mixtral", "--prompt", "It is a truth", "--max-new-tokens", "12"]
    assert main(argv) == 0
    free = capsys.readouterr().out.rstrip("\n")
    generated = free[len("It is a truth") :]
    stop = generated[len(generated) // 2 : len(generated) // 2 + 3]  # mid-text, likely across tokens
    assert main([*argv, "--stop", "never in this text", "--stop", stop]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip("\n") == free[: free.index(stop, len("It is a truth"))]
    assert int(captured.err.split("[")[1].split()[0]) < 12  # tokens generated: it stopped early
    assert main([*argv, "--min-p", "0.2"]) == 2
    assert "--min-p shape sampling, and decoding is greedy: add --sample" in capsys.readouterr().err
    assert main([*argv, "--stop", ""]) == 2
    assert "--stop '' would stop before the first token" in capsys.readouterr().err


def test_a_batch_of_prompts_prints_what_each_prompt_gives_alone(capsys):
    """Prompts of different lengths, left-padded into one batch: each text is what it gives alone,
    greedy; a stop string ends the rows that reach it and leaves the others running. The stats line
    counts the tokens each row kept, as its run alone does."""
    prompts = ["It is a truth", "The king said that", "Once"]

    def alone(prompt: str, *options: str) -> tuple[str, int]:
        argv = ["generate", "builtin:tiny-mixtral", "--prompt", prompt, "--max-new-tokens", "10", *options]
        assert main(argv) == 0
        captured = capsys.readouterr()
        return captured.out.rstrip("\n"), int(captured.err.split("[")[-1].split()[0])

    texts, counts = zip(*(alone(prompt) for prompt in prompts), strict=True)
    second = texts[1][len(prompts[1]) :]
    stop = next(second[i : i + 3] for i in range(len(second)) if second[i : i + 3] not in texts[0] + texts[2])
    stopped = alone(prompts[1], "--stop", stop)
    argv = ["generate", "builtin:tiny-mixtral", "--max-new-tokens", "10"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    for options, expected in (
        ([], zip(texts, counts, strict=True)),
        (["--stop", stop], [(texts[0], counts[0]), stopped, (texts[2], counts[2])]),
    ):
        expected = list(expected)
        assert main([*argv, *options]) == 0
        captured = capsys.readouterr()
        blocks = [f"[{i}/3]\n{text}\n\n" for i, (text, _) in enumerate(expected, 1)]
        assert captured.out == "".join(blocks), options
        steps, tokens = max(count for _, count in expected), sum(count for _, count in expected)
        assert f"[{steps} steps x 3 prompts: {tokens} tokens in " in captured.err
    assert main([*argv, "--prompt", ""]) == 2
    assert "prompt 4 ('') is empty after tokenization" in capsys.readouterr().err


def test_sigterm_mid_write_unwinds_like_ctrl_c_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """kill, Slurm and docker stop send SIGTERM: its default ends the process where it stands, leaving
    a staging directory as large as the model beside the output."""

    def run(args):
        def fill(staging):
            (staging / "part").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # interrupted: the handler raises

        write_atomically(tmp_path / "out", fill, overwrite=False)

    monkeypatch.setattr(cli, "_recipes", run)  # any command; the parser reads the name when built
    before = signal.getsignal(signal.SIGTERM)
    assert main(["recipes"]) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before
    assert "moepass recipes: interrupted (SIGTERM); nothing was left half-written" in capsys.readouterr().err


def test_progress_lines_go_to_stderr_as_it_is_now(monkeypatch):
    """A notebook or test runner replaces (and closes) sys.stderr between commands: the next command's
    progress lines reach the new one, with no logging error from the closed one."""
    import io

    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    assert main(["inspect", "builtin:random-mixtral"]) == 0
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    assert main(["inspect", "builtin:random-mixtral"]) == 0
    assert "capture done in" in second.getvalue() and "Logging error" not in second.getvalue()
