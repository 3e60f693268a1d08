"""Evaluation against a float64 reference, and identical numbers for a model and its program."""

from __future__ import annotations

import math

import pytest
import torch

import moepass
from helpers import captured, model_for
from moepass.data import TokenSet
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


def test_text_data_needs_a_tokenizer(seed):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        moepass.evaluate(model_for("mixtral", seed=seed), "builtin:test")
