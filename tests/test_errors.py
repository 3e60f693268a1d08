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


def test_llama4_routing_to_more_than_one_expert_is_refused_by_layer():
    """Llama-4's routing weight scales its expert's input, expressed for one expert per token."""
    model = model_for("llama4_text", seed=0)
    model.model.layers[2].feed_forward.router.top_k = 2
    with pytest.raises(UnsupportedModelError, match=r"layer 2 \(Llama4TextMoe\): num_experts_per_tok=2"):
        moepass.capture(model)


def test_base_model_without_lm_head_is_rejected():
    model = model_for("mixtral", seed=0).model  # MixtralModel
    with pytest.raises(UnsupportedModelError, match=r"MixtralModel.*causal LM"):
        moepass.capture(model)


@pytest.mark.parametrize("thing", ["mixtral", None, torch.nn.Linear(2, 2)])
def test_not_a_model_is_rejected(thing):
    with pytest.raises(UnsupportedModelError, match="not a supported"):
        moepass.capture(thing)


@pytest.mark.parametrize(
    "example,message",
    [
        (torch.randn(2, 3), r"must be input_ids of shape \[batch, seq\]"),
        ({"ids": torch.ones(1, 2, dtype=torch.long)}, r"has no 'input_ids' \(has \['ids'\]\)"),
        (torch.zeros(0, 3, dtype=torch.long), r"input_ids of shape \[0, 3\] hold no token"),
        (torch.zeros(2, 0, dtype=torch.long), r"input_ids of shape \[2, 0\] hold no token"),
        (torch.tensor([[1, 128]]), r"input_ids must lie in \[0, 128\) \(the vocabulary\), got \[1, 128\]"),
        (torch.tensor([[-1, 3]]), r"input_ids must lie in \[0, 128\)"),
    ],
)
def test_bad_example_inputs(example, message):
    model = model_for("mixtral", seed=0, vocab_size=128)
    with pytest.raises(ValueError, match="example_inputs " + message):
        moepass.capture(model, example_inputs=example)


def test_weights_never_loaded_are_refused_by_name():
    """A partial load leaves weights on the meta device: capture names them instead of running on garbage."""
    model = model_for("mixtral", seed=0)
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.empty_like(experts.gate_up_proj, device="meta"))
    with pytest.raises(
        UnsupportedModelError,
        match=r"MixtralForCausalLM: model\.layers\.1\.mlp\.experts\.gate_up_proj is on the meta device",
    ):
        moepass.capture(model)


def test_weights_a_quantizer_holds_are_refused_by_name():
    """FP8 or other quantized weights keep their scales outside the tensors capture reads: computing
    with the codes would give garbage, so capture refuses them and says how to dequantize."""
    from transformers import FineGrainedFP8Config
    from transformers.quantizers import AutoHfQuantizer

    model = model_for("mixtral", seed=0)
    model.hf_quantizer = AutoHfQuantizer.from_config(FineGrainedFP8Config())  # as from_pretrained sets it
    with pytest.raises(
        UnsupportedModelError, match=r"loaded quantized by transformers \(quant_method='fp8'\)"
    ):
        moepass.capture(model)
    del model.hf_quantizer
    experts = model.model.layers[1].mlp.experts
    codes = experts.gate_up_proj.detach().to(torch.float8_e4m3fn)
    experts.gate_up_proj = torch.nn.Parameter(codes, requires_grad=False)
    with pytest.raises(
        UnsupportedModelError,
        match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj is torch\.float8_e4m3fn, not a full-precision "
        r"weight; .*dequantize=True",
    ):
        moepass.capture(model)


def test_batch_one_example_still_gives_dynamic_batch(seed):
    model = model_for("mixtral", seed=seed)
    program = moepass.capture(model, example_inputs=torch.tensor([[7]]))
    ids = torch.randint(0, 128, (4, 5))
    with torch.no_grad():
        assert (program(ids) - model(ids).logits).abs().max() <= 1e-5


def test_a_program_refuses_malformed_prompts_by_name():
    """A 1-D prompt, an empty one or an id past the vocabulary fails deep inside the graph; a mask of
    another shape broadcasts."""
    from helpers import captured

    _, program = captured("mixtral")
    ids = torch.randint(3, 128, (2, 5))
    for call, message in [
        (lambda: program(ids[0]), r"input_ids must be integer token ids \[batch, tokens\], got int64 \[5\]"),
        (lambda: program(ids.float()), "got float32"),
        (lambda: program(ids[:, :0]), "input_ids holds no tokens"),
        (lambda: program(ids[:0]), r"input_ids holds no tokens \(\[0, 5\]\)"),  # a reshape error, before
        (
            lambda: program(ids, ids[:, :1]),
            r"attention_mask must be shaped like input_ids \[2, 5\], got \[2, 1\]",
        ),
        (
            lambda: program(ids.index_fill(1, torch.tensor([3]), 300)),
            r"input_ids\[0, 3\] is 300: .*\[0, 128\)",
        ),
        (lambda: program.generate(ids.index_fill(1, torch.tensor([0]), -2), 3), r"input_ids\[0, 0\] is -2"),
        (lambda: program.generate(ids[0], 3), r"input_ids must be integer token ids"),
        (lambda: program.generate(ids, 3, ids[:1]), r"attention_mask must be shaped like input_ids"),
    ]:
        with pytest.raises(moepass.MoepassError, match=message):
            call()


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_experts_compute_the_configured_activation(activation, seed):
    model = model_for("qwen3_moe", seed=seed, hidden_act=activation)
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert (moepass.capture(model)(ids) - model(ids).logits).abs().max() <= 1e-5


def test_experts_whose_act_fn_disagrees_with_the_config_are_refused_by_layer(seed):
    """Artifacts and HF export rebuild the model from its config: capturing either side alone would
    change an edited model's function somewhere, silently."""
    model = model_for("mixtral", seed=seed, num_hidden_layers=3)
    model.model.layers[2].mlp.experts.act_fn = torch.nn.ReLU()
    with pytest.raises(UnsupportedModelError, match=r"layer 2 .* act_fn \(ReLU\) does not compute .*'silu'"):
        moepass.capture(model)
    model = model_for("deepseek_v3", seed=seed)
    model.config.hidden_act = "gelu"
    with pytest.raises(
        UnsupportedModelError, match=r"layer 1 .*\(SiLUActivation\) does not compute .*'gelu'"
    ):
        moepass.capture(model)
    model.config.hidden_act = "quick_gelu"
    with pytest.raises(UnsupportedModelError, match="hidden_act='quick_gelu' is not an expert activation"):
        moepass.capture(model)
