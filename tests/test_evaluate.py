"""Evaluation against a float64 reference, and identical numbers for a model and its program."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moepass
from helpers import captured, model_for
from moepass.data import DataError, TokenSet
from moepass.evaluate import model_size


def _token_set(vocab: int, rows: int, seq_len: int, sources: list[str]) -> TokenSet:
    ids = torch.randint(3, vocab, (rows, seq_len + 1))
    return TokenSet(ids[:, :-1], ids[:, 1:], [sources[i % len(sources)] for i in range(rows)])


def test_perplexity_and_accuracy_match_float64_reference(seed):
    model = model_for("qwen3_moe", seed=seed)
    data = _token_set(model.config.vocab_size, rows=7, seq_len=12, sources=["a", "b"])
    result = moepass.evaluate(model, data, batch_size=3)
    with torch.no_grad():
        logits = model(data.input_ids).logits.double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, data.labels[..., None]).squeeze(-1)
    hits = logits.argmax(-1) == data.labels
    for source in ("a", "b"):
        rows = [i for i, s in enumerate(data.sources) if s == source]
        score = result.domains[source]
        assert score.tokens == len(rows) * 12
        assert math.isclose(score.perplexity, math.exp(-logp[rows].mean().item()), rel_tol=1e-5)
        assert score.correct == int(hits[rows].sum())
    assert math.isclose(result.overall.perplexity, math.exp(-logp.mean().item()), rel_tol=1e-5)
    params = sum(p.numel() for p in model.parameters())
    assert result.parameters == params and result.weight_bytes >= 4 * params


def test_a_model_in_training_mode_is_scored_without_dropout_and_left_as_it_was(seed):
    model = model_for("mixtral", seed=seed, attention_dropout=0.5)
    data = _token_set(128, rows=2, seq_len=8, sources=["d"])
    reference = moepass.evaluate(model, data)
    model.train()
    again = moepass.evaluate(model, data)
    assert again.overall.nll == reference.overall.nll and model.training


def test_ignored_labels_are_not_scored_and_narrow_integer_ids_are_read(seed):
    """Labels of -100 (transformers' convention) are neither losses nor tokens; int32 ids score as int64."""
    model = model_for("mixtral", seed=seed)
    data = _token_set(model.config.vocab_size, rows=4, seq_len=10, sources=["a"])
    labels = data.labels.clone()
    labels[:, :3] = -100  # a prompt not to score
    labels[1, 7] = -100
    narrow = TokenSet(data.input_ids.int(), labels.int(), data.sources)
    result = moepass.evaluate(model, narrow)
    with torch.no_grad():
        logits = model(data.input_ids).logits.double()
    scored = labels != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert result.overall.tokens == int(scored.sum()) == 4 * 7 - 1
    assert math.isclose(result.overall.perplexity, math.exp(-logp[scored].mean().item()), rel_tol=1e-5)
    assert result.overall.correct == int(((logits.argmax(-1) == labels) & scored).sum())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_model_and_program_score_identically(family, seed):
    model, program = captured(family)
    data = _token_set(model.config.vocab_size, rows=6, seq_len=16, sources=["x", "y", "z"])
    on_model = moepass.evaluate(model, data)
    on_program = moepass.evaluate(program, data)
    for source, score in on_model.domains.items():
        assert math.isclose(score.perplexity, on_program.domains[source].perplexity, rel_tol=1e-5)
        assert score.correct == on_program.domains[source].correct
    assert on_program.parameters == on_model.parameters
    quantized = moepass.compress(program, [("rtn", {"bits": 4, "group_size": 16})])
    params, nbytes = model_size(quantized)
    assert params == on_model.parameters, "packed codes count at their logical size, scales not at all"
    assert nbytes < on_model.weight_bytes


def test_result_table_and_json(seed):
    model = model_for("mixtral", seed=seed)
    result = moepass.evaluate(model, _token_set(128, rows=4, seq_len=8, sources=["d"]))
    text = result.table(title="t")
    assert "overall" in text and "perplexity" in text
    payload = result.to_dict()
    assert payload["overall"]["tokens"] == 32
    assert math.isclose(payload["domains"]["d"]["perplexity"], result.domains["d"].perplexity)


def test_a_loss_beyond_float_range_gives_infinite_perplexity_and_valid_json(seed):
    """A model broken by compression can lose over 709 nats per token: its perplexity is infinite
    (the run and its report go on), null in JSON, which has no Infinity."""
    model = model_for("mixtral", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    result = moepass.evaluate(model, _token_set(128, rows=2, seq_len=8, sources=["d"]))
    assert result.overall.nll / result.overall.tokens > 710 and result.overall.perplexity == math.inf
    assert "inf" in result.table()
    payload = json.loads(result.to_json())
    assert payload["overall"]["perplexity"] is None and payload["domains"]["d"]["perplexity"] is None


def test_default_windows_fit_a_model_with_fewer_positions(seed):
    """Windows are 256 tokens by default, or the model's positions if fewer: evaluation and
    calibration from text just work on a short-context model."""
    from moepass.zoo import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-mixtral")
    model = model_for("mixtral", seed=seed, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=48)
    result = moepass.evaluate(model, "builtin:test", tokenizer=tokenizer, max_per_source=1)
    assert result.seq_len == 48
    recipe = {"passes": [{"expert_drop": {"keep": 6}}], "calibration": {"samples": 2}}
    program = moepass.compress(model, recipe, tokenizer=tokenizer)
    scored = next(iter(program.report.analyses.values()))
    assert scored.samples == 2  # two windows of 48 tokens


def test_text_data_needs_a_tokenizer(seed):
    with pytest.raises(DataError, match="needs a tokenizer"):
        moepass.evaluate(model_for("mixtral", seed=seed), "builtin:test")


def test_data_the_model_cannot_score_is_refused(seed):
    """Windows beyond the model's positions run (RoPE extrapolates) but score it where it was never
    trained; ids beyond its vocabulary, or an empty set, are no evaluation either."""
    model, program = captured("mixtral", max_position_embeddings=16)
    ids = torch.randint(0, 128, (2, 17))
    too_long = TokenSet(ids, ids, ["a", "a"])
    for subject in (model, program):
        with pytest.raises(DataError, match="windows of 17 tokens exceed the model's 16 positions"):
            moepass.evaluate(subject, too_long)
    with pytest.raises(DataError, match="windows of 17 tokens exceed the model's 16 positions"):
        moepass.compress(program, [("expert_drop", {"keep": 4})], calibration=too_long)
    outside = TokenSet(ids[:, :8] + 128, ids[:, :8], ["a", "a"])
    with pytest.raises(DataError, match=r"token id 2\d\d is outside the model's vocabulary of 128"):
        moepass.evaluate(program, outside)
    with pytest.raises(DataError, match="holds no windows"):
        moepass.evaluate(program, TokenSet(ids[:0], ids[:0], []))
    for label, message in ((128, "label 128 is not a token id"), (-1, "label -1 is not a token id")):
        with pytest.raises(DataError, match=message):
            moepass.evaluate(program, TokenSet(ids[:, :8], ids[:, :8].clone().fill_(label), ["a", "a"]))
    with pytest.raises(DataError, match="every label is -100"):
        moepass.evaluate(program, TokenSet(ids[:, :8], ids[:, :8].clone().fill_(-100), ["a", "a"]))
    with pytest.raises(DataError, match="batch_size must be at least 1, got 0"):
        moepass.evaluate(program, TokenSet(ids[:, :8], ids[:, :8], ["a", "a"]), batch_size=0)
    with pytest.raises(DataError, match="TokenSet's windows are 8 tokens"):
        moepass.evaluate(program, TokenSet(ids[:, :8], ids[:, :8], ["a", "a"]), seq_len=4)
    # options that pick windows of text would be ignored: named, not dropped silently
    with pytest.raises(DataError, match=r"^max_per_source=4, seed=1: options that pick windows of text"):
        moepass.evaluate(program, TokenSet(ids[:, :8], ids[:, :8], ["a", "a"]), max_per_source=4, seed=1)
    with pytest.raises(DataError, match=r"^text_key='body': options that pick"):
        moepass.evaluate(program, TokenSet(ids[:, :8], ids[:, :8], ["a", "a"]), text_key="body")
