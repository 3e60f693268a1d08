"""Capture equals transformers eager on every family: logits, greedy generation, structure, safety."""

from __future__ import annotations

import copy
import functools
import logging
import types

import pytest
import torch
from transformers import DynamicCache

import helpers
import moepass
from helpers import FAMILIES, hf_mlp, hf_router_choices, model_for, seed_for
from moepass.ir import MoEEntry, trace_cache
from moepass.ir.families import family_of
from moepass.ir.ops import EXPERTS, ROUTE

TOL = 1e-5


def _model_state(model) -> dict:
    """What capture must leave alone: mode, config, module tree, forward, tensors (objects and values)."""
    return {
        "training": model.training,
        "config": copy.deepcopy(model.config.to_dict()),
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "forward": (model.forward, "forward" in vars(model)),
        "tensors": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
    }


@functools.cache
def _capture(family: str):
    """(family, transformers model, program, sample, model state before and after capture), once per
    family and worker: captures dominate this suite's time.

    The sample is a constant prompt: one repeated token routes every layer-0 token to the same experts,
    so the inputs used below exercise routings the capture sample never saw. The model is captured in
    train mode (capture must not flip it) and compared in eval mode.
    """
    model = model_for(family, seed=seed_for(family))
    model.train()
    sample = torch.full((2, 4), 5, dtype=torch.long)
    before = _model_state(model)
    program = moepass.capture(model, example_inputs=sample)
    after = _model_state(model)
    model.eval()
    return family, model, program, sample, (before, after)


@pytest.fixture(scope="module", params=FAMILIES)
def captured(request):
    """(family, transformers model, program, capture sample)."""
    return _capture(request.param)[:4]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_logits_match_transformers(captured, seed, batch, seq):
    family, model, program, sample = captured
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.no_grad():
        expected = model(ids).logits
    got = program(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL, family


def test_routing_is_not_baked_in(captured, seed):
    family, model, program, sample = captured
    ids = torch.randint(0, model.config.vocab_size, (3, 33))
    seen_at_capture = hf_router_choices(model, sample)
    seen_now = hf_router_choices(model, ids)
    assert any(now - before for now, before in zip(seen_now, seen_at_capture, strict=True)), (
        "test input should reach experts the capture sample did not"
    )
    with torch.no_grad():
        assert (program(ids) - model(ids).logits).abs().max().item() <= TOL


def test_padded_batch_matches_transformers(captured, seed):
    family, model, program, _ = captured
    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    got = program(ids, attention_mask=mask)
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max().item() <= TOL


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_matches_transformers(captured, seed, padded):
    family, model, program, _ = captured
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :2] = model.config.pad_token_id
        mask[1, :2] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = program.generate(ids, max_new_tokens=16, attention_mask=mask)
    assert torch.equal(got, expected), family


def test_generation_stops_at_eos_like_transformers(captured, seed):
    family, model, program, _ = captured
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    first = program.generate(ids, max_new_tokens=6, eos_token_id=None)
    eos = int(first[0, 7])  # a token the model emits mid-generation: make it the EOS
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = program.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


def test_sampled_generation_matches_transformers(captured, seed):
    """Same processing (temperature, then top-k) and the same draws from the global generator."""
    family, model, program, _ = captured
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7}
    torch.manual_seed(seed)
    expected = model.generate(ids, top_k=20, **options)
    torch.manual_seed(seed)
    assert torch.equal(program.generate(ids, top_k=20, **options), expected), family
    torch.manual_seed(seed)
    unlimited = model.generate(ids, top_k=0, **options)
    for no_limit in (0, None):
        torch.manual_seed(seed)
        assert torch.equal(program.generate(ids, top_k=no_limit, **options), unlimited), (family, no_limit)
    with pytest.raises(ValueError, match="temperature must be > 0 to sample, got 0"):
        program.generate(ids, 2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        program.generate(ids, 2, do_sample=True, top_k=-1)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])  # the logits differ; not the code
def test_top_p_and_repetition_penalty_match_transformers(family, seed):
    """Nucleus sampling after top-k, and the repetition penalty (prompt included, greedy or sampled),
    processed in transformers' order: the same seed draws the same tokens."""
    model, program = helpers.captured(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7}
    # top_p 0.05: little more than the likeliest token; min_p after top-k and top-p
    for top_k, top_p, min_p in ((0, 0.8, 0.0), (20, 0.9, 0.0), (0, 0.05, 0.0), (0, 1.0, 0.3), (20, 0.9, 0.1)):
        shaping = {"top_k": top_k, "top_p": top_p, "min_p": min_p, **options}
        torch.manual_seed(seed)
        expected = model.generate(ids, **shaping)
        torch.manual_seed(seed)
        assert torch.equal(program.generate(ids, **shaping), expected), shaping
    greedy = {"max_new_tokens": 8, "do_sample": False}
    for decoding in (greedy, {**options, "top_k": 0}):  # the penalty acts on greedy choices too
        torch.manual_seed(seed)
        expected = model.generate(ids, repetition_penalty=5.0, **decoding)
        torch.manual_seed(seed)
        assert torch.equal(program.generate(ids, repetition_penalty=5.0, **decoding), expected), decoding
    with pytest.raises(ValueError, match="repetition_penalty must be a positive number"):
        program.generate(ids, 2, repetition_penalty=0.0)
    for top_p in (0, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            program.generate(ids, 2, do_sample=True, top_p=top_p)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\]"):
        program.generate(ids, 2, do_sample=True, min_p=1.5)


def _character_tokenizer(vocab_size: int):
    """A transformers tokenizer of one character per token, none of them special: every token a
    random model draws is text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE({chr(ord("!") + i): i for i in range(vocab_size)}, []))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # the decoding loop is shared; not the logits
def test_stop_strings_finish_sequences_as_in_transformers(family, seed):
    """A sequence finishes when its text completes a stop string, even one begun in the prompt or
    spread over tokens; finished sequences are padded until all finish (or max_new_tokens), as in
    transformers `generate(stop_strings=..., tokenizer=...)`. One inside the prompt stops nothing."""
    model, program = helpers.captured(family)
    tokenizer = _character_tokenizer(model.config.vocab_size)
    ids = torch.randint(3, model.config.vocab_size, (3, 4))
    free = program.generate(ids, 10, eos_token_id=None)
    text = [tokenizer.decode(row) for row in free[:, 4:].tolist()]
    stops = [
        text[0][2:4],  # two tokens: sequence 0 stops after 4 new ones (unless it occurs earlier)
        tokenizer.decode(ids[1, -1:].tolist()) + text[1][0],  # begun in the prompt, done by the first
        tokenizer.decode(ids[2, :2].tolist()),  # inside sequence 2's prompt: stops only if it recurs
        text[2][5:7],  # sequence 2 stops after 7 new tokens at most
    ]
    options = {"max_new_tokens": 10, "stop_strings": stops, "tokenizer": tokenizer, "pad_token_id": 0}
    expected = model.generate(ids, **options)
    got = program.generate(ids, **options)
    assert torch.equal(got, expected), (got, expected)
    assert (got[1, 5:] == 0).all() and got.shape[1] <= 4 + 7  # finished rows padded, the batch done early
    sampled = {"do_sample": True, "temperature": 1.5, "top_k": 0, **options}
    torch.manual_seed(seed)
    expected = model.generate(ids, **sampled)
    torch.manual_seed(seed)
    assert torch.equal(program.generate(ids, **sampled), expected)
    # a special token's text stops too (a chat's end-of-turn token), though decoded text leaves it out
    special = tokenizer.convert_ids_to_tokens(int(free[0, 6]))
    assert tokenizer.add_special_tokens({"additional_special_tokens": [special]}) == 1
    options["stop_strings"] = [special]
    got = program.generate(ids, **options)
    assert torch.equal(got, model.generate(ids, **options)) and (got[0, 7:] == 0).all()
    with pytest.raises(ValueError, match=r"stop_strings must be non-empty strings .*tokenizer=NoneType"):
        program.generate(ids, 2, stop_strings=["a"])
    with pytest.raises(ValueError, match=r"stop_strings must be non-empty strings"):
        program.generate(ids, 2, stop_strings=[""], tokenizer=tokenizer)


def test_generation_past_the_models_positions_warns(caplog):
    """Like transformers: a user may know the model extrapolates, but must be told it was not made to."""
    model, program = helpers.captured("mixtral", max_position_embeddings=12)
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    with caplog.at_level(logging.WARNING, logger="moepass"):
        within = program.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="moepass"):
        beyond = program.generate(ids, max_new_tokens=7, eos_token_id=None)
    assert "6 prompt + 7 new tokens exceed the 12 positions" in caplog.text
    assert torch.equal(beyond[:, :12], within)


def test_structure_map(captured):
    family, model, program, _ = captured
    structure = program.structure
    config = model.config
    assert [b.index for b in structure.blocks] == list(range(config.num_hidden_layers))
    hf_moe = [i for i, layer in enumerate(model.model.layers) if hasattr(hf_mlp(model, layer), "experts")]
    assert [b.index for b in structure.moe_blocks] == hf_moe
    nodes = {n.name: n for n in program.graph_module.graph.nodes}
    for block in structure.blocks:
        hf_layer = model.model.layers[block.index]
        assert nodes[block.attention_residual].target is torch.ops.aten.add.Tensor
        assert nodes[block.mlp_residual].args[0] is nodes[block.attention_residual]
        assert block.attention.cache is not None
        assert block.attention.params and all(
            p.startswith(block.attention.module) for p in block.attention.params
        )
        hf_norms = {
            f"{block.module}.{name}": norm for name, norm in hf_layer.named_children() if "norm" in name
        }
        assert {norm.module for norm in block.norms} == hf_norms.keys()
        for norm in block.norms:
            assert norm.params == [f"{norm.module}.{n}" for n, _ in hf_norms[norm.module].named_parameters()]
        if block.is_moe:
            moe = block.mlp
            assert isinstance(moe, MoEEntry)
            hf_block = hf_mlp(model, hf_layer)
            hf_experts = hf_block.experts
            assert moe.num_experts == hf_experts.gate_up_proj.shape[0]
            assert nodes[moe.route_node].target is ROUTE and nodes[moe.experts_node].target is EXPERTS
            assert program.graph_module.get_parameter(moe.router_weight).shape[0] == moe.num_experts
            has_shared = hasattr(hf_block, family_of(model).shared_name)
            assert (moe.shared_experts is not None) == has_shared
            assert (moe.shared_expert_gate is not None) == hasattr(hf_block, "shared_expert_gate")
    assert structure.embeddings.params == ["model.embed_tokens.weight"]
    assert structure.lm_head.nodes and structure.final_norm.nodes


def test_verifier_passes(captured):
    captured[2].verify()


def test_graphs_hold_no_in_place_slice_writes(captured):
    """Keys built by writes into slices (DeepSeek's MLA, in transformers) trace ~3x slower and stay
    in the program as slice_scatter pairs: capture builds them with cat."""
    targets = {node.target for node in captured[2].graph_module.graph.nodes}
    assert torch.ops.aten.slice_scatter.default not in targets


def test_printer_lists_every_block(captured):
    family, model, program, _ = captured
    text = program.summary()
    for block in program.structure.blocks:
        assert f"\n{block.index:>5}  " in text
        # layers whose attention skips RoPE, as transformers decides it (EXAONE-MoE's and AFMoE's full
        # attention, Llama-4's every n-th layer)
        attention = model.model.layers[block.index].self_attn
        rotary = getattr(attention, "sliding_window", None) is None or getattr(attention, "is_sliding", True)
        rotary = getattr(attention, "is_local_attention", getattr(attention, "use_rope", rotary))
        assert ("no RoPE" in program.info.attention[block.index]) == (not rotary), block.index
    assert "all (tied counted once)" in text
    assert f"E={program.structure.moe_blocks[0].mlp.num_experts}" in text
    assert ("topk_sigmoid on inputs" in text) == (family == "llama4_text")  # its weights scale inputs


def test_node_count_does_not_depend_on_expert_count(captured, seed):
    family, _, program, _ = captured
    if family not in ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text"):
        pytest.skip("one family per expert layout and routing kind: a 16-expert capture each (CI time)")
    large = moepass.capture(model_for(family, seed=seed, num_experts=16))
    assert {b.mlp.num_experts for b in program.structure.moe_blocks} != {16}
    assert {b.mlp.num_experts for b in large.structure.moe_blocks} == {16}
    assert len(program.graph_module.graph.nodes) == len(large.graph_module.graph.nodes)


@pytest.mark.parametrize("family", FAMILIES)
def test_user_model_is_not_modified(family):
    *_, program, _, (before, after) = _capture(family)
    assert after["training"] and before["training"]
    assert after["config"] == before["config"]
    assert after["modules"] == before["modules"]
    assert after["forward"] == before["forward"] and not after["forward"][1]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, (tensor, value) in after["tensors"].items():
        assert tensor is before["tensors"][key][0] and torch.equal(value, before["tensors"][key][1]), key
    program.verify()


def _hub_kernel_forward(self, *args, **kwargs):
    """Stands in for a Hub kernel: the class's torch forward, off by one, so a trace of it shows."""
    out = type(self).forward(self, *args, **kwargs)
    return tuple(t + 1 for t in out) if isinstance(out, tuple) else out + 1


def _hub_kernelized(model) -> list:
    """What `kernels.kernelize` does to a model (transformers >= 5.25 does it on load onto a GPU):
    each Hub-extensible module, and each kernelized function wrapper in `_kernel_funcs`, gets its own
    forward. Returns those holders."""
    holders = [
        holder
        for module in model.modules()
        for holder in (module, *module.__dict__.get("_kernel_funcs", {}).values())
        if hasattr(type(holder), "kernel_layer_name")
    ]
    for holder in holders:
        holder.forward = types.MethodType(_hub_kernel_forward, holder)
    return holders


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_capture_of_hub_kernelized_model_traces_torch_forwards(family, seed, monkeypatch):
    """A model with Hub kernels (RMSNorm, rotary) is captured as transformers' torch code, and left
    kernelized; capture never kernelizes anything again (that would fetch kernels from the Hub)."""
    from transformers import PreTrainedModel

    model = model_for(family, seed=seed)
    if not any(hasattr(type(m), "kernel_layer_name") for m in model.modules()):
        pytest.skip("this transformers has no Hub-extensible layers (the `kernels` package is missing)")
    from kernels import Mode

    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        holders = _hub_kernelized(model)
        kernelized = model(ids).logits
    assert (kernelized - expected).abs().max().item() > 1e-2, "the stand-in kernels must change the logits"
    model.train()
    # as `set_use_kernels` leaves a model kernelized for training: its `eval()` kernelizes again
    model._use_kernels, model._kernels_mode = True, Mode.TRAINING

    def kernelize_again(*args, **kwargs):
        raise AssertionError("capture kernelized a model")

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", kernelize_again)
    program = moepass.capture(model)
    assert (program(ids) - expected).abs().max().item() <= TOL
    assert all("forward" in vars(holder) for holder in holders) and model.use_kernels
    model._use_kernels = False
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, kernelized)  # the user's model still runs its kernels


def test_decode_step_cost_grows_only_through_attention(seed):
    """A decode step runs the matmuls of one token: only attention reads the growing cache."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model_for("mixtral", seed=seed)
    model.set_attn_implementation("eager")  # attention as plain matmuls, visible to the flop counter
    program = moepass.capture(model)
    ids = torch.randint(0, 128, (1, 40))
    mask = torch.ones_like(ids)
    _, past = program.step(ids, mask, torch.arange(40)[None], program.empty_cache(1))

    def flops_at(past_len: int) -> dict[str, int]:
        cache = [t[:, :, :past_len] for t in past]
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            program.step(
                ids[:, :1], torch.ones(1, past_len + 1, dtype=torch.long), torch.tensor([[past_len]]), cache
            )
        return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}

    short, long = flops_at(4), flops_at(36)
    # projections, router, experts, lm_head: aten.mm on one token; attention scores: aten.bmm
    assert short["aten.mm"] == long["aten.mm"] > 0
    heads, head_dim, layers = 4, 16, 3
    assert long["aten.bmm"] - short["aten.bmm"] == 2 * 2 * heads * head_dim * (36 - 4) * layers


# Dynamo's full graph and AOT autograd over each family's own ops (MLA, attention sinks, clamped
# experts with biases); Inductor's CPU codegen (~1 min here) is run on the lowered program
# (test_lowering) and through the moepass backend (test_compile_backend)
@pytest.mark.parametrize(
    "family,backend", [("mixtral", "aot_eager"), ("deepseek_v3", "aot_eager"), ("gpt_oss", "aot_eager")]
)
def test_torch_compile_fullgraph(family, backend, seed):
    _, model, program, *_ = _capture(family)
    compiled = torch.compile(program.graph_module, fullgraph=True, dynamic=True, backend=backend)
    ids = torch.randint(0, 128, (2, 5))
    args = (ids, torch.ones_like(ids), torch.arange(5).expand(2, -1), *program.empty_cache(2))
    with torch.no_grad():
        got = compiled(*args)[0]
        expected = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_program_device_moves_never_touch_the_user_model(seed):
    model, program = helpers.captured("mixtral", tie_word_embeddings=True)
    assert program.structure.embeddings.params == program.structure.lm_head.params  # tied, stored once
    assert "embeddings (tied)" in program.summary()
    moved = program.fork()
    moved.generate(torch.randint(3, 128, (1, 4)), 2)  # caches the last-token step graph on CPU
    moved.to("meta")
    assert moved.device.type == "meta"
    for graph_module in (moved.graph_module, moved._last_token_module()):
        assert not any(
            n.kwargs.get("device", torch.device("meta")).type == "cpu" for n in graph_module.graph.nodes
        ), "graph constants still on the old device"
    assert all(p.device.type == "cpu" for p in [*model.parameters(), *program.graph_module.parameters()])
    with pytest.raises(moepass.MoepassError, match="captured in float32 and cannot be converted to bfloat16"):
        program.to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        assert (program(ids) - model(ids).logits).abs().max() <= TOL


def test_bfloat16_model_captures_and_matches(seed):
    model = model_for("qwen2_moe", seed=seed, dtype=torch.bfloat16)
    program = moepass.capture(model)
    assert program.info.dtype == "bfloat16"
    ids = torch.randint(3, 128, (4, 16))  # enough positions that a near-tie flipping by rounding is noise
    with torch.no_grad():
        expected = model(ids).logits.float()
    got = program(ids).float()
    # bf16 rounding differs where the canonical op sums in fp32; logits agree to bf16 precision
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def _trace_reused(caplog) -> bool:
    return any("reusing the graph" in record.getMessage() for record in caplog.records)


def _assert_program_matches_eager(program, model, seed: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(program(ids), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("family", ["deepseek_v3"])  # MLA, shared experts, grouped sigmoid routing
def test_recapture_reuses_the_trace_bound_to_the_new_weights(family, seed, caplog):
    """A second model built like the first reuses its trace: each program must still compute with its
    own model's weights (both equal their own transformers eager output)."""
    trace_cache.clear()
    first, second = (model_for(family, seed=s, num_hidden_layers=2) for s in (seed, seed + 1))
    first_program = moepass.capture(first)
    caplog.set_level(logging.INFO, logger="moepass")
    second_program = moepass.capture(second)
    assert _trace_reused(caplog)
    assert second_program.graph_module.code == first_program.graph_module.code
    _assert_program_matches_eager(first_program, first, seed)
    _assert_program_matches_eager(second_program, second, seed)


def test_recapture_traces_again_when_the_graph_could_differ(seed, caplog, monkeypatch):
    """Same shapes but another top-k, a forward hook, or patched model code (as liger-kernel patches
    transformers): reusing the first trace would compute the wrong function."""
    base = functools.partial(model_for, "mixtral", seed=seed, num_hidden_layers=1)
    moepass.capture(base())
    top1, hooked, edited = base(num_experts_per_tok=1), base(), base()
    hooked.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: (out[0] * 2, *out[1:]))
    edited.model.layers[0].mlp.gate.top_k = 1  # the config still says 2: the module is what runs
    caplog.set_level(logging.INFO, logger="moepass")
    for model in (top1, hooked, edited):
        caplog.clear()
        program = moepass.capture(model)
        assert not _trace_reused(caplog)
        _assert_program_matches_eager(program, model, seed)
    norm_class = type(top1.model.norm)
    norm_forward = norm_class.forward
    monkeypatch.setattr(norm_class, "forward", lambda self, x: norm_forward(self, x) * 2)
    caplog.clear()
    program = moepass.capture(top1)
    assert not _trace_reused(caplog)
    _assert_program_matches_eager(program, top1, seed)


def test_recapture_traces_again_when_a_container_setting_differs(seed, caplog, monkeypatch):
    """Model code reading a tuple, list or dict attribute traces it as constants: models differing
    only there (same class, config and shapes) must not share a trace."""
    base = functools.partial(model_for, "mixtral", seed=seed, num_hidden_layers=1)
    norm_class = type(base().model.norm)
    norm_forward = norm_class.forward
    monkeypatch.setattr(norm_class, "forward", lambda self, x: norm_forward(self, x) * self.gains[0])
    models = []
    for gains in [(1.0,), (2.0,), [3.0], [0.5], {0: 1.5}, {0: 0.25}]:
        model = base()
        for norm in (m for m in model.modules() if isinstance(m, norm_class)):
            norm.gains = gains
        models.append(model)
    trace_cache.clear()
    caplog.set_level(logging.INFO, logger="moepass")
    for model in models:
        caplog.clear()
        program = moepass.capture(model)
        assert not _trace_reused(caplog), model.model.norm.gains
        _assert_program_matches_eager(program, model, seed)
    caplog.clear()
    program = moepass.capture(models[2])  # gains seen before: their trace serves
    assert _trace_reused(caplog)
    _assert_program_matches_eager(program, models[2], seed)


def test_the_trace_cache_keeps_graphs_within_its_node_budget(seed, caplog, monkeypatch):
    """Eviction is by nodes (a graph's memory), oldest first: the newest graph always stays."""
    trace_cache.clear()
    one_layer = functools.partial(model_for, "mixtral", seed=seed, num_hidden_layers=1)
    nodes = len(moepass.capture(one_layer()).graph_module.graph.nodes)
    monkeypatch.setattr(trace_cache, "_MAX_NODES", nodes + 10)  # room for this graph only
    moepass.capture(one_layer(num_experts_per_tok=1))  # another trace: evicts the first
    caplog.set_level(logging.INFO, logger="moepass")
    moepass.capture(one_layer(num_experts_per_tok=1))
    assert _trace_reused(caplog)
    caplog.clear()
    moepass.capture(one_layer())
    assert not _trace_reused(caplog)
    monkeypatch.setattr(trace_cache, "_MAX_NODES", 0)  # a graph larger than the budget is still kept
    moepass.capture(one_layer(num_experts_per_tok=1))
    caplog.clear()
    moepass.capture(one_layer(num_experts_per_tok=1))
    assert _trace_reused(caplog)


def test_a_model_configured_to_output_router_logits_captures(seed):
    """Fine-tuned checkpoints often keep output_router_logits=True (a training loss); the program
    computes the logits, and the user's config is left as it was."""
    model = model_for("mixtral", seed=seed, output_router_logits=True)
    program = moepass.capture(model)
    _assert_program_matches_eager(program, model, seed)
    assert model.config.output_router_logits


def test_a_rotary_embedding_that_branches_on_positions_is_refused_by_name(seed):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = model_for("mixtral", seed=seed, rope_parameters=rope, max_position_embeddings=16, head_dim=16)
    with pytest.raises(moepass.MoepassError, match=r"model.rotary_emb is a 'dynamic' rotary embedding"):
        moepass.capture(model)


def test_hunyuans_ntk_alpha_rotary_captures_or_asks_for_a_newer_transformers(seed):
    """Hunyuan-A13B's rotary stretches its base by a fixed alpha. transformers 5.25 runs it as the
    static 'ntk_alpha' (captured, past the context the frequencies were set for); 5.17 as 'dynamic',
    which branches on positions: refused, naming the fix."""
    rope = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
    model = model_for("hunyuan_v1_moe", seed=seed, rope_parameters=rope, max_position_embeddings=16)
    if model.model.rotary_emb.rope_type == "dynamic":
        with pytest.raises(moepass.MoepassError, match=r"NTK-alpha rotary .* upgrade transformers"):
            moepass.capture(model)
        return
    assert model.model.rotary_emb.rope_type == "ntk_alpha"
    program = moepass.capture(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (program(ids) - model(ids).logits).abs().max().item() <= TOL


def test_phimoe_longrope_captures_and_switches_scale_like_transformers(seed):
    """Phi-3.5-MoE's rotary: cos/sin scaled by short_mscale, or long_mscale once a step's largest
    position passes the original context (8 here), which transformers decides with a Python branch."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": [1.0 + i for i in range(8)],
        "short_factor": [1.0 + i / 10 for i in range(8)],
        "original_max_position_embeddings": 8,
        "long_mscale": 1.3,
        "short_mscale": 1.1,
    }
    model = model_for("phimoe", seed=seed, rope_parameters=rope, max_position_embeddings=64, head_dim=16)
    program = moepass.capture(model)
    for length in (8, 12):
        ids = torch.randint(0, model.config.vocab_size, (2, length))
        with torch.no_grad():
            assert (program(ids) - model(ids).logits).abs().max().item() <= TOL, length
    # decoding with the cache across position 8, step by step (transformers' generate differs by
    # version there: 5.17 drops the cache at the switch, 5.24 does not)
    tokens, cache, past = torch.randint(3, model.config.vocab_size, (2, 5)), DynamicCache(), None
    for start in range(5, 11):
        new = tokens if past is None else tokens[:, -1:]
        positions = torch.arange(tokens.shape[1] - new.shape[1], tokens.shape[1]).expand(2, -1)
        with torch.no_grad():
            expected = model(new, position_ids=positions, past_key_values=cache, use_cache=True).logits
        past = program.empty_cache(2) if past is None else past
        got, past = program.step(new, torch.ones_like(tokens), positions, past)
        assert (got - expected).abs().max().item() <= TOL, start
        tokens = torch.cat([tokens, expected[:, -1:].argmax(-1)], dim=-1)


ALTERNATING = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]


@pytest.mark.parametrize(
    "family,overrides,edit,traced",
    [
        ("mixtral", {}, None, 2),
        ("deepseek_v3", {"first_k_dense_replace": 2}, None, 3),  # dense, dense, then MoE layers
        ("gpt_oss", {"layer_types": ALTERNATING}, None, 3),  # sliding, full, sliding, ...
        ("qwen2_moe", {"mlp_only_layers": [3]}, None, 4),  # a dense MLP among MoE layers
        ("olmoe", {}, 3, 4),  # one layer's router edited to top-1: that layer is traced, not copied
    ],
)
def test_deep_models_trace_each_kind_of_layer_and_copy_the_rest(
    family, overrides, edit, traced, seed, caplog, monkeypatch
):
    """Capture traces a prefix holding every kind of layer and copies the later layers of each kind:
    the result computes exactly what tracing every layer does, and what transformers does."""
    from moepass.ir import replicate

    model = model_for(family, seed=seed, num_hidden_layers=5, **overrides)
    if edit is not None:
        model.model.layers[edit].mlp.gate.top_k = 1
    trace_cache.clear()
    caplog.set_level(logging.INFO, logger="moepass")
    copied = moepass.capture(model)
    assert f"traced {traced} layers, copied {5 - traced}" in caplog.text
    monkeypatch.setattr(replicate, "plan", lambda model: None)
    trace_cache.clear()
    whole = moepass.capture(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    assert torch.equal(copied(ids), whole(ids))
    assert torch.equal(copied.generate(ids, max_new_tokens=4), whole.generate(ids, max_new_tokens=4))
    assert copied.summary().splitlines()[1:] == whole.summary().splitlines()[1:]  # blocks as traced
    _assert_program_matches_eager(copied, model, seed)
    model.model.layers[4].register_forward_hook(lambda module, args, out: out)
    assert replicate.plan(model) is None  # what a hook does is not a layer's kind: trace it all
