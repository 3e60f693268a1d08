"""The bundled trained models: offline loading, honest model cards, healthy routing, real importance."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

import moepass
from helpers import hf_expert_usage, hf_keep_experts
from moepass.cli import main
from moepass.data import calibration_set, evaluation_set
from moepass.errors import MoepassError
from moepass.zoo import TRAINED, load_model, load_tokenizer, models_dir, random_model, save_tokenizer


@pytest.fixture(scope="module", params=TRAINED)
def bundled(request):
    name = request.param
    card = json.loads((models_dir() / name / "card.json").read_text())
    return name, load_model(f"builtin:{name}"), load_tokenizer(f"builtin:{name}"), card


@pytest.mark.parametrize("name", TRAINED)
def test_loads_offline_in_a_fresh_process(name, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from moepass.zoo import load_model, load_tokenizer; "
        f"m = load_model('builtin:{name}'); t = load_tokenizer('builtin:{name}'); "
        "ids = t.encode('def main():').ids; "
        "print(type(m).__name__, m.config.vocab_size, len(ids) > 0, next(m.parameters()).dtype)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    model_class = {"tiny-mixtral": "MixtralForCausalLM", "tiny-deepseek": "DeepseekV3ForCausalLM"}[name]
    assert out.stdout.split() == [model_class, "4096", "True", "torch.float32"]


def test_perplexity_matches_the_model_card(bundled):
    name, model, tokenizer, card = bundled
    result = moepass.evaluate(model, "builtin:test", tokenizer=tokenizer)
    expected = card["default_eval"]
    for domain, score in result.domains.items():
        assert math.isclose(score.perplexity, expected["domains"][domain]["perplexity"], rel_tol=0.01), domain
    assert math.isclose(result.overall.perplexity, expected["overall"]["perplexity"], rel_tol=0.01)


def test_routing_is_not_collapsed(bundled):
    name, model, tokenizer, card = bundled
    data = evaluation_set("builtin:test", tokenizer, max_per_source=16)
    usage = hf_expert_usage(model, data.input_ids.split(8))
    for layer, (count, _) in usage.items():
        p = count.double() / count.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        assert entropy >= 0.8 * math.log(len(count)), f"{name} layer {layer}: usage {count.tolist()}"


def test_dropping_least_used_experts_beats_random_drops():
    """Importance is real: the two least-used experts per layer matter less than random ones.

    Use is the routing weight an expert receives (the paper's routing mass). Selection counts are no
    measure of it on this model: some experts are picked often as a low-weight second choice, and
    dropping the two least-selected experts hurts as much as dropping the two most-selected."""
    model, tokenizer = load_model("builtin:tiny-mixtral"), load_tokenizer("builtin:tiny-mixtral")
    calibration = calibration_set("builtin:validation", tokenizer, samples=32, seq_len=256)
    usage = hf_expert_usage(model, calibration.input_ids.split(8))
    test = evaluation_set("builtin:test", tokenizer, max_per_source=8)

    def perplexity_keeping(keep: dict[int, list[int]]) -> float:
        return moepass.evaluate(hf_keep_experts(model, keep), test).overall.perplexity

    guided = perplexity_keeping(
        {layer: sorted(mass.argsort(descending=True)[:-2].tolist()) for layer, (_, mass) in usage.items()}
    )
    generator = torch.Generator().manual_seed(0)
    random_drops = [
        perplexity_keeping(
            {
                layer: sorted(torch.randperm(len(mass), generator=generator)[:-2].tolist())
                for layer, (_, mass) in usage.items()
            }
        )
        for _ in range(5)
    ]
    assert guided < sorted(random_drops)[2], (guided, random_drops)


def test_cli_eval_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "eval.json"
    assert main(["eval", "builtin:tiny-mixtral", "--max-per-source", "4", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "python-docs" in out and "overall" in out and "next-token acc" in out
    payload = json.loads(path.read_text())
    assert set(payload["domains"]) == {"austen", "bible", "python-docs"}
    assert payload["overall"]["tokens"] == 3 * 4 * 256


@functools.cache
def _trimming_setup(model_name: str):
    """(captured program, calibration set, test set) of a bundled model, once per worker. 8 documents
    per source rank every guided and random drop as 16 do, with the same margins (checked at 8 and 16)."""
    model, tokenizer = load_model(f"builtin:{model_name}"), load_tokenizer(f"builtin:{model_name}")
    calibration = calibration_set("builtin:validation", tokenizer, samples=32)
    return moepass.capture(model), calibration, evaluation_set("builtin:test", tokenizer, max_per_source=8)


@pytest.mark.parametrize(
    "model_name,passes",
    [
        ("tiny-mixtral", [("expert_drop", {"keep": 6})]),
        ("tiny-mixtral", [("layer_drop", {"count": 2})]),
        ("tiny-mixtral", [("block_drop", {"count": 1})]),
        # on this bias-balanced router, routing mass ranks experts no better than chance
        # (RESULTS-trimming.md); REAP's output-norm saliency does
        ("tiny-deepseek", [("expert_drop", {"keep": 12, "score": "reap"})]),
    ],
)
def test_guided_trimming_beats_random_trimming(model_name, passes):
    """On the trained models, each importance-guided drop beats the median of 3 random drops of its size."""
    program, calibration, test = _trimming_setup(model_name)

    def perplexity(recipe) -> float:
        return moepass.evaluate(
            moepass.compress(program, recipe, calibration=calibration), test
        ).overall.perplexity

    name, options = passes[0]
    random_metric = {"expert_drop": {"score": "random"}}.get(name, {"metric": "random"})
    random = sorted(perplexity([(name, {**options, **random_metric, "seed": s})]) for s in range(3))
    assert perplexity(passes) < random[1], random


def test_a_trained_builtins_tokenizer_is_written_with_its_special_tokens(tmp_path):
    """transformers reads an output's special tokens from tokenizer_config.json: without them it could
    not pad, and moepass's own transformers path would find no end-of-text token."""
    save_tokenizer("builtin:tiny-mixtral", tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<eos>", "<pad>")
    ids = load_tokenizer("builtin:tiny-mixtral").encode("It is a truth").ids
    assert tokenizer("It is a truth")["input_ids"] == ids  # no BOS: the model was trained without one
    assert tokenizer(["It", "It is a truth"], padding=True)["input_ids"][0][-1] == tokenizer.pad_token_id


def test_save_tokenizer_copies_a_checkpoints_tokenizer_files_as_they_are(tmp_path):
    """transformers reads the special tokens and chat template from files beside tokenizer.json: an
    output keeps them byte for byte, and nothing else of the checkpoint."""
    source = tmp_path / "checkpoint"
    source.mkdir()
    (source / "tokenizer.json").write_bytes((models_dir() / "tiny-mixtral" / "tokenizer.json").read_bytes())
    (source / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "config.json").write_text("{}")
    for tokenizer, expected in [
        (source, ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]),
        (source / "tokenizer.json", ["tokenizer.json"]),
        (load_tokenizer(source), ["tokenizer.json"]),
    ]:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        save_tokenizer(tokenizer, out)
        assert sorted(p.name for p in out.iterdir()) == expected
        if isinstance(tokenizer, os.PathLike):  # copied, not re-serialized
            assert all((out / n).read_bytes() == (source / n).read_bytes() for n in expected)
        assert load_tokenizer(out).encode("It is").ids == load_tokenizer(source).encode("It is").ids
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoepassError, match="holds no tokenizer files"):
        save_tokenizer(tmp_path / "empty", tmp_path / "out-0")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_bfloat16_builtins_equal_the_checkpoint_loaded_by_transformers(family, seed, tmp_path):
    """A built-in asked for in bf16 is the model `from_pretrained(dtype=bfloat16)` gives for the same
    weights: bf16 parameters, rotary tables still in float32, identical logits."""
    random_model(family, seed=seed).save_pretrained(tmp_path)
    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = random_model(family, seed=seed, dtype=torch.bfloat16)
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert dtypes == {name: t.dtype for name, t in [*expected.named_parameters(), *expected.named_buffers()]}
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_checkpoints_load_without_hub_kernels(tmp_path):
    """transformers >= 5.25 kernelizes a model on load by default (hub kernels for RMSNorm, SiLU and
    RoPE on GPUs, fetched from the Hub); moepass loads the plain modules it captures."""
    random_model("mixtral", seed=0).save_pretrained(tmp_path)
    assert load_model(tmp_path).use_kernels is False


def test_a_multimodal_llama4_checkpoint_compresses_as_its_text_model(seed, tmp_path):
    """Released Llama-4 checkpoints hold a vision tower beside the text model: moepass loads the text
    model from the checkpoint directory (its logits are the multimodal model's on text) and refuses the
    multimodal object itself, saying how to get the text model."""
    text = random_model("llama4_text", seed=seed).config.to_dict()
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    vision |= dict(image_size=32, patch_size=16, vision_output_dim=16, projector_input_dim=16)
    config = transformers.Llama4Config(text_config=text, vision_config=vision | dict(projector_output_dim=16))
    torch.manual_seed(seed)
    multimodal = transformers.Llama4ForConditionalGeneration(config).eval()
    multimodal.save_pretrained(tmp_path)
    with pytest.raises(
        MoepassError, match=r"multimodal; moepass compresses its Llama-4 text model: load that"
    ):
        moepass.capture(multimodal)
    program = moepass.capture(load_model(tmp_path))
    ids = torch.randint(3, text["vocab_size"], (2, 9))
    with torch.no_grad():
        assert (program(ids) - multimodal(input_ids=ids).logits).abs().max() <= 1e-5
