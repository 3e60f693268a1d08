"""Bad input gets a clear error naming the offending model class and what is supported."""

from __future__ import annotations

import pytest
import torch
import transformers

import moepass
from helpers import model_for
from moepass.errors import NotAnMoEModelError, UnsupportedModelError


def test_dense_model_of_another_family_is_unsupported():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError) as error:
        moepass.capture(model)
    message = str(error.value)
    assert "LlamaForCausalLM" in message and "dense" in message
    assert "Mixtral" in message and "DeepSeek-V3" in message and "GPT-OSS" in message


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen2_moe", {"mlp_only_layers": [0, 1, 2]}),
        ("deepseek_v3", {"first_k_dense_replace": 3}),
    ],
)
def test_moe_family_with_only_dense_layers_is_rejected(family, overrides):
    model = model_for(family, seed=0, **overrides)
    with pytest.raises(NotAnMoEModelError, match=type(model).__name__ + ".*no MoE layers"):
        moepass.capture(model)


def test_base_model_without_lm_head_is_rejected():
    model = model_for("mixtral", seed=0).model  # MixtralModel
    with pytest.raises(UnsupportedModelError, match=r"MixtralModel.*causal LM"):
        moepass.capture(model)


@pytest.mark.parametrize("thing", ["mixtral", None, torch.nn.Linear(2, 2)])
def test_not_a_model_is_rejected(thing):
    with pytest.raises(UnsupportedModelError, match="not a supported"):
        moepass.capture(thing)


def test_bad_example_inputs():
    model = model_for("mixtral", seed=0)
    with pytest.raises(ValueError, match="example_inputs"):
        moepass.capture(model, example_inputs=torch.randn(2, 3))


def test_batch_one_example_still_gives_dynamic_batch(seed):
    model = model_for("mixtral", seed=seed)
    program = moepass.capture(model, example_inputs=torch.tensor([[7]]))
    ids = torch.randint(0, 128, (4, 5))
    with torch.no_grad():
        assert (program(ids) - model(ids).logits).abs().max() <= 1e-5
