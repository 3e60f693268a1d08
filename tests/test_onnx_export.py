"""ONNX export: onnxruntime (CPU provider) against the PyTorch program, on every exportable family,
uncompressed and quantized, with and without past key/values, on inputs unlike the export sample."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import moepass
from helpers import ALL_TARGETS, captured, position_errors, rel_error, rtn, seed_for
from moepass.artifact import ArtifactError
from moepass.data import TokenSet
from moepass.errors import MoepassError
from moepass.ir.structure import tensor_at
from moepass.ir.surgery import drop_mlp, keep_experts
from moepass.onnx_export import OnnxExportError, OnnxProgram, export_onnx, runtime
from moepass.onnx_export.complex_to_real import complex_to_real
from moepass.onnx_export.export import exportable_graph
from moepass.zoo import random_model

REL_TOL = 1e-5  # fp32 end to end; ORT's kernels sum in other orders than ATen's
# (batch, new tokens, past tokens): prefill, batched decode, chunked prefill on a cache
SHAPES = [(1, 5, 0), (3, 1, 7), (2, 4, 3)]
GPT_OSS_SMALL = {"num_hidden_layers": 1, "num_experts": 4, "intermediate_size": 64}
# tests of one expert layout: one layer of 4 experts (an export costs seconds per layer, more per If)
MIXTRAL_SMALL = {"num_hidden_layers": 1, "num_local_experts": 4}


def _matches(program, exported: OnnxProgram) -> None:
    vocab = program.info.vocab_size
    for batch, seq, past_len in SHAPES:
        ids = torch.randint(0, vocab, (batch, seq))
        mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        mask[0, 0] = 0 if past_len else 1  # a padded cache slot
        positions = torch.arange(past_len, past_len + seq).expand(batch, -1)
        past = [torch.randn(batch, t.shape[1], past_len, t.shape[3]) for t in program.empty_cache(batch)]
        ref_logits, ref_present = program.step(ids, mask, positions, past)
        logits, present = exported.step(ids, mask, positions, past)
        assert float((logits - ref_logits).norm() / ref_logits.norm()) < REL_TOL, (batch, seq, past_len)
        for ours, ref in zip(present, ref_present, strict=True):
            assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    prompt = torch.randint(0, vocab, (2, 4))
    assert torch.equal(
        exported.generate(prompt, 8, eos_token_id=None), program.generate(prompt, 8, eos_token_id=None)
    )


def _rewrites(path) -> dict[str, int]:
    """The export manifest's count of each rewrite kind."""
    return json.loads((path / "onnx_manifest.json").read_text())["rewrites"]


def _op_counts(path, *, inside_if: bool = False) -> dict[str, int]:
    """Node counts of the main graph, or of the If branches (the experts' decode/prefill paths)."""
    model = onnx.load(str(path / "model.onnx"))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        nodes = [node]
        if inside_if:
            nodes = [n for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for n in a.g.node]
        for n in nodes:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
            # the exporter's debugging record (stack traces, fx nodes: ~1.6 KB a node) is not shipped
            assert not n.metadata_props and not n.doc_string, n.name
    return counts


_EXPORTS: dict[str, object] = {}


def _exported(family: str, tmp_path_factory, **overrides):
    """Each uncompressed family exported once per session (exports take seconds)."""
    key = (family, tuple(sorted(overrides.items())))
    if key not in _EXPORTS:
        program = captured(family, **overrides)[1]
        _EXPORTS[key] = export_onnx(program, tmp_path_factory.mktemp(family) / "onnx")
    return _EXPORTS[key]


# mixtral is covered by the trimmed and quantized tests, deepseek_v3 by the quantized one;
# deepseek_v2's complex-number rotary embedding is exported on real (re, im) pairs. Families whose
# layers repeat one layout export one MoE layer, after their first, dense, layer where they have one
# (EXAONE-MoE's: sliding attention with RoPE; its MoE layer's full attention has none). The others'
# programs serve other tests here too.
ONE_MOE_LAYER = {
    "qwen3_moe": 1,
    "phimoe": 1,
    "deepseek_v2": 2,
    "glm4_moe": 2,
    "glm4_moe_lite": 2,
    "dots1": 2,
    "minimax_m2": 1,
    "ernie4_5_moe": 2,
    "hunyuan_v1_moe": 1,
    "granitemoe": 1,
    "exaone_moe": 2,
    "afmoe": 2,
    "flex_olmo": 1,
    "solar_open": 1,
    "llama4_text": 2,
}
ROUTED_IN_THE_GRAPH = {
    "phimoe",
    "deepseek_v2",
    "gpt_oss",
    "glm4_moe",
    "glm4_moe_lite",
    "dots1",
    "minimax_m2",
    "ernie4_5_moe",
    "exaone_moe",
    "afmoe",
    "solar_open",
    "llama4_text",
}


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "gpt_oss", *ONE_MOE_LAYER])
def test_uncompressed_families_match_pytorch(family, tmp_path_factory):
    overrides = {"num_hidden_layers": ONE_MOE_LAYER[family]} if family in ONE_MOE_LAYER else {}
    program = captured(family, **overrides)[1]
    path = _exported(family, tmp_path_factory, **overrides)
    _matches(program, OnnxProgram(path))
    # routing computed at run time, every family's experts on onnxruntime's fused MoE op (GPT-OSS's with
    # biases and clamped SwiGLU): softmax top-k families route in the op; the others in the graph
    counts, layers = _op_counts(path), len(program.structure.moe_blocks)
    assert (counts.get("MoE", 0), counts.get("If", 0)) == (layers, 0)
    rewrites = _rewrites(path)
    in_graph = rewrites.get("experts -> com.microsoft::MoE (routing in the graph)", 0)
    assert in_graph == (layers if family in ROUTED_IN_THE_GRAPH else 0)
    # every expert's weights are in the file, whatever the export sample routed to
    initializers = {t.name: list(t.dims) for t in onnx.load(str(path / "model.onnx")).graph.initializer}
    for block in program.structure.moe_blocks:
        for fqn, onnx_name in ((block.mlp.gate_up, "onnx_fc1"), (block.mlp.down, "onnx_fc2")):
            expected = list(tensor_at(program.graph_module, fqn).shape)
            name = f"{fqn.rpartition('.')[0]}.{onnx_name}"
            assert initializers.get(name) == expected and expected[0] == block.mlp.num_experts, fqn


@pytest.mark.parametrize(
    "family,bits,group_size,symmetric",
    [
        ("mixtral", 4, 32, False),
        ("qwen2_moe", 4, 16, False),
        ("deepseek_v3", 4, 16, True),
        ("gpt_oss", 4, 16, True),
    ],
)
def test_quantized_programs_use_matmul_nbits_and_match(family, bits, group_size, symmetric, tmp_path):
    _, program = captured(family)
    quantized = rtn(program, bits, group_size, symmetric)
    export_onnx(quantized, tmp_path / "onnx")
    linears = sum(1 for n in quantized.graph_module.graph.nodes if "quantized_linear" in str(n.target))
    counts, moe = _op_counts(tmp_path / "onnx"), program.structure.moe_blocks
    assert counts.get("MatMulNBits", 0) == linears > 0
    # int4 experts, whatever the routing (DeepSeek-V3's grouped sigmoid stays in the graph) or activation
    # (GPT-OSS's clamped SwiGLU with biases): onnxruntime's fused QMoE runs them
    assert counts.get("QMoE", 0) == len(moe)
    _matches(quantized, OnnxProgram(tmp_path / "onnx"))
    # codes stay packed: the file is about as large as the program's own tensors, not a float copy
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    onnx_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    tensors = {id(t): t for t in [*quantized.graph_module.parameters(), *quantized.graph_module.buffers()]}
    program_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert onnx_bytes < 1.1 * program_bytes


def test_trimmed_programs_export_what_is_left(tmp_path):
    _, program = captured("mixtral")
    first, second, third, *_ = program.structure.moe_blocks
    trimmed = program.fork()
    drop_mlp(trimmed, first.index)
    keep_experts(trimmed, second.index, [2], preserve_gate=True)  # fewer experts left than top-k
    keep_experts(trimmed, third.index, [1, 4, 5, 7])
    export_onnx(trimmed, tmp_path / "onnx")
    # every kept layer on the fused MoE op (the one whose router kept its rows for dropped experts
    # routes in the graph); the dropped one is absent
    counts = _op_counts(tmp_path / "onnx")
    assert (counts.get("If", 0), counts.get("MoE", 0)) == (0, len(program.structure.moe_blocks) - 1)
    rewrites = _rewrites(tmp_path / "onnx")
    assert rewrites["experts -> com.microsoft::MoE (routing in the graph)"] == 1
    _matches(trimmed, OnnxProgram(tmp_path / "onnx"))  # routes to dropped experts contribute nothing


def test_onnx_programs_evaluate_like_the_pytorch_program(tmp_path_factory):
    """`moepass.evaluate` scores an export through onnxruntime: the same perplexity and accuracy as
    the program it came from, its parameter count, and the bytes its files hold."""
    program = captured("olmoe")[1]
    path = _exported("olmoe", tmp_path_factory)
    ids = torch.randint(0, program.info.vocab_size, (6, 17))
    data = TokenSet(ids[:, :-1], ids[:, 1:], ["a", "b"] * 3)
    want, got = moepass.evaluate(program, data), moepass.evaluate(OnnxProgram(path), data)
    for source, score in want.domains.items():
        assert got.domains[source].tokens == score.tokens
        assert abs(got.domains[source].nll - score.nll) < 1e-5 * score.nll
        assert abs(got.domains[source].correct - score.correct) <= 1  # an argmax tie at most
    assert got.parameters == want.parameters
    assert got.weight_bytes == sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data"))


def test_export_writes_manifest_and_refuses_what_it_cannot_do(tmp_path, tmp_path_factory):
    _, program = captured("olmoe")
    path = _exported("olmoe", tmp_path_factory)
    manifest = json.loads((path / "onnx_manifest.json").read_text())
    assert manifest["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest["outputs"][0] == "logits" and len(manifest["outputs"]) == len(manifest["inputs"]) - 2
    with pytest.raises(ArtifactError, match="already exists"):
        export_onnx(program, path)
    with pytest.raises(OnnxExportError, match="lowered for cpu"):
        export_onnx(moepass.lower(program), tmp_path / "lowered")
    assert not (tmp_path / "lowered").exists()
    with pytest.raises(MoepassError, match="not an exported moepass ONNX directory"):
        OnnxProgram(tmp_path)
    with pytest.raises(
        OnnxExportError, match=r"computes in bfloat16.*artifact keeps its dtype: compress --dtype"
    ):
        export_onnx(moepass.capture(random_model("olmoe", dtype=torch.bfloat16)), tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()
    # int32 token ids and a bool mask, as the PyTorch program takes them
    exported, prompt = OnnxProgram(path), torch.randint(0, program.info.vocab_size, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.equal(
        exported.generate(prompt.int(), 3, attention_mask=mask, eos_token_id=None),
        program.generate(prompt, 3, eos_token_id=None),
    )


def test_complex_ops_without_a_real_rewrite_are_refused_by_name():
    def rotate_and_exp(x):
        return torch.view_as_real(torch.exp(torch.view_as_complex(x)))

    graph_module = make_fx(rotate_and_exp, tracing_mode="fake")(torch.randn(3, 4, 2))
    with pytest.raises(MoepassError, match=r"exp.*computes with complex numbers"):
        complex_to_real(graph_module)


def test_complex_rotation_on_real_pairs_equals_complex_math(seed):
    def rotate(x, angle):  # slices of complex values too (Llama-4 indexes its rotation)
        scaled = torch.polar(torch.ones_like(angle), angle) * 0.5
        turned = torch.view_as_complex(x).narrow(-1, 1, 3) * scaled.narrow(-1, 0, 3).unsqueeze(0)
        return torch.view_as_real(turned)

    x, angle = torch.randn(2, 5, 4, 2, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    graph_module = make_fx(rotate, tracing_mode="fake")(x, angle)
    assert complex_to_real(graph_module) > 0
    assert not any(
        isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()
        for n in graph_module.graph.nodes
        if n.op == "call_function"
    )
    torch.testing.assert_close(graph_module(x, angle), rotate(x, angle), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "group_size,form,ifs",
    [
        (16, "quantized_experts -> MatMulNBits int8", "one per expert"),
        (8, "quantized_experts (standard ops)", "one"),  # an 8-input block MatMulNBits cannot take
    ],
)
def test_int8_experts_run_off_the_fused_ops_keeping_every_expert(group_size, form, ifs, tmp_path):
    # GPT-OSS experts (biases, clamped SwiGLU) in int8 blocks, which QMoE does not take exactly:
    # power-of-two blocks put each expert under its own If, taken only when some token chose it, its
    # codes on MatMulNBits; other blocks dequantize in the graph (decode gathers k experts, prefill
    # runs all)
    _, program = captured("gpt_oss", num_hidden_layers=1, num_experts=4)  # an If per expert: few
    quantized = rtn(program, 8, group_size, symmetric=False)
    export_onnx(quantized, tmp_path / "onnx")
    rewrites = _rewrites(tmp_path / "onnx")
    (block,) = program.structure.moe_blocks
    experts = block.mlp.num_experts
    assert rewrites[form] == 1
    assert _op_counts(tmp_path / "onnx")["If"] == (experts if ifs == "one per expert" else 1)
    if ifs == "one per expert":
        assert _op_counts(tmp_path / "onnx", inside_if=True)["MatMulNBits"] == 2 * experts
    _matches(quantized, OnnxProgram(tmp_path / "onnx"))


@pytest.mark.parametrize(
    "family,bits,symmetric,overrides,qmoe_block,int8_on_nbits",
    [
        ("mixtral", 8, True, MIXTRAL_SMALL, 0, True),  # 64 and 96 inputs: MatMulNBits blocks of 64, 32
        ("gpt_oss", 8, False, GPT_OSS_SMALL, 0, True),
        ("mixtral", 8, False, {**MIXTRAL_SMALL, "intermediate_size": 40}, 0, False),  # 8 x 5: no 16+
        ("mixtral", 4, False, MIXTRAL_SMALL, 32, False),  # 64 and 96 inputs: blocks of 32
        ("gpt_oss", 4, True, GPT_OSS_SMALL, 64, False),
        ("mixtral", 4, False, {**MIXTRAL_SMALL, "intermediate_size": 40}, 0, False),
    ],
)
def test_per_channel_experts_run_on_qmoe(
    family, bits, symmetric, overrides, qmoe_block, int8_on_nbits, tmp_path
):
    """Per-channel experts (GPT-OSS's with biases and clamped SwiGLU) run on QMoE, exactly: int4 in
    blocks repeating each row's scale (its fast blocked kernels), or on its per-row layout (int8,
    and int4 whose input counts share no power-of-two block of 16+; 4-bit zero points two rows a
    byte). They used to take a MatMulNBits per expert under its own If, or standard ops. Exports
    with int8 activations put int8 experts on a MatMulNBits each (in blocks repeating the row's
    scale where rows are no power of two) wherever a block of 16+ fits: its int8 kernels are faster."""
    _, program = captured(family, **overrides)
    quantized = rtn(program, bits, -1, symmetric)
    layers = len(program.structure.moe_blocks)
    experts = program.structure.moe_blocks[0].mlp.num_experts
    for name, int8_activations in (("onnx", False), ("int8", True)):
        export_onnx(quantized, tmp_path / name, int8_activations=int8_activations)
        on_qmoe = not (int8_activations and int8_on_nbits)
        rewrites = _rewrites(tmp_path / name)
        assert sum(n for kind, n in rewrites.items() if f"QMoE int{bits}" in kind) == layers * on_qmoe
        assert _op_counts(tmp_path / name).get("If", 0) == (0 if on_qmoe else layers * experts)
        assert _contrib_attributes(tmp_path / name, "block_size")["QMoE", qmoe_block] == layers * on_qmoe
        if int8_activations:
            assert _contrib_attributes(tmp_path / name)["QMoE", 4] == layers * on_qmoe
    _matches(quantized, OnnxProgram(tmp_path / "onnx"))
    # the QMoE op's reference implementation reads its layouts as onnxruntime does
    graph_module, _ = exportable_graph(quantized)
    ids = torch.randint(0, program.info.vocab_size, (2, 7))
    mask, positions = torch.ones_like(ids), torch.arange(7).expand(2, -1)
    rewritten = graph_module(ids, mask, positions, *quantized.empty_cache(2), torch.tensor(0))[0]
    assert rel_error(rewritten, quantized(ids)) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_linears_of_any_length_run_on_matmul_nbits(bits, tmp_path):
    """A per-channel linear whose input count is no power of two (Qwen-MoE's 80-input shared-expert
    down projection here, DeepSeek-V3's 7168-input attention) runs on MatMulNBits in blocks of the
    largest power of two dividing it, each row's scale repeated (the same weights): it was
    dequantized in the graph on every call."""
    _, program = captured("qwen2_moe")
    quantized = rtn(program, bits, -1)
    export_onnx(quantized, tmp_path / "onnx")
    rewrites = _rewrites(tmp_path / "onnx")
    assert not [kind for kind in rewrites if "dequantized in the graph" in kind]
    blocks = _contrib_attributes(tmp_path / "onnx", "block_size")
    assert blocks["MatMulNBits", 16] == len(program.structure.moe_blocks)  # 80 = 16 x 5
    _matches(quantized, OnnxProgram(tmp_path / "onnx"))


def test_per_channel_fp16_experts_of_any_length_run_on_matmul_nbits(tmp_path):
    """fp16 experts (which QMoE does not take here) of 96-input rows: MatMulNBits per expert in blocks
    of 32, each row's scale repeated, instead of standard ops."""
    model = random_model("mixtral", seed=seed_for("fp16 rows"), dtype=torch.float16, **MIXTRAL_SMALL)
    program = moepass.capture(model)
    quantized = rtn(program, 4, -1)
    export_onnx(quantized, tmp_path / "onnx")
    layers, experts = len(program.structure.moe_blocks), program.structure.moe_blocks[0].mlp.num_experts
    rewrites = _rewrites(tmp_path / "onnx")
    assert rewrites["quantized_experts -> MatMulNBits int4"] == layers
    assert _contrib_attributes(tmp_path / "onnx", "block_size")["MatMulNBits", 32] == layers * experts
    ids = torch.randint(0, program.info.vocab_size, (2, 9))
    logits, reference = OnnxProgram(tmp_path / "onnx")(ids).float(), quantized(ids).float()
    # fp16 rounding may flip a near-tie routing choice: most positions match to fp16 precision
    error = position_errors(logits, reference)
    assert (error < 5e-3).float().mean() >= 0.9, error


def _contrib_attributes(path, name: str = "accuracy_level") -> Counter:
    """(op type, attribute `name` or None) of every MatMulNBits and QMoE node, If branches included."""
    values: Counter = Counter()

    def visit(nodes) -> None:
        for node in nodes:
            if node.op_type in ("MatMulNBits", "QMoE"):
                values[node.op_type, {a.name: a.i for a in node.attribute}.get(name)] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node)

    visit(onnx.load(str(path / "model.onnx")).graph.node)
    return values


@pytest.mark.parametrize(  # int8 experts: QMoE with int8 activations, MatMulNBits in an If per expert without
    "family,bits,overrides",
    [
        ("mixtral", 4, MIXTRAL_SMALL),
        ("mixtral", 8, MIXTRAL_SMALL),
        ("gpt_oss", 8, {"num_hidden_layers": 1, "num_experts": 4}),
    ],
)
def test_int8_activations_set_every_quantized_matmul_and_stay_close(
    family, bits, overrides, tmp_path, caplog
):
    _, program = captured(family, **overrides)
    quantized = rtn(program, bits, 16)
    with caplog.at_level(logging.WARNING, logger="moepass"):
        exact = export_onnx(quantized, tmp_path / "exact")
        slow = [r.getMessage() for r in caplog.records if "8-bit MatMulNBits on float" in r.getMessage()]
        caplog.clear()
        fast = export_onnx(quantized, tmp_path / "int8", int8_activations=True)
    # exact 8-bit MatMulNBits (every linear, and experts not on QMoE) are slow in onnxruntime: said once
    assert len(slow) == (bits == 8) and not any("8-bit" in r.getMessage() for r in caplog.records)
    levels, exact_levels = _contrib_attributes(fast), _contrib_attributes(exact)
    assert levels and set(level for _, level in levels) == {4}
    assert all(level is None for _, level in exact_levels)
    layers = len(program.structure.moe_blocks)
    assert levels["QMoE", 4] == layers and _op_counts(fast).get("If", 0) == 0
    assert exact_levels["QMoE", None] == (layers if bits == 4 else 0)
    assert _op_counts(fast)["MatMulNBits"] == _op_counts(exact)["MatMulNBits"]  # the linears
    manifests = [json.loads((p / "onnx_manifest.json").read_text()) for p in (exact, fast)]
    assert [m["int8_activations"] for m in manifests] == [False, True]
    assert sum(n for kind, n in manifests[1]["rewrites"].items() if "int8 activations" in kind) == sum(
        levels.values()
    )
    if tuple(map(int, runtime.ort.__version__.split(".")[:2])) < runtime.OLDEST_FOR_INT8_ACTIVATIONS:
        with pytest.raises(MoepassError, match=r"exported with int8 activations.*'onnxruntime>=1.31'"):
            OnnxProgram(fast)
        return
    ids = torch.randint(0, program.info.vocab_size, (2, 9))
    want, got = OnnxProgram(exact)(ids), OnnxProgram(fast)(ids)
    # per position: one whose top-k is a near tie may route differently (7-8% off, seen), a typical one
    # is ~0.7% off; a wrong scale or layout would move every position
    errors = position_errors(got, want)
    assert errors.max() > 0 and errors.median() < 0.02


def test_int8_activations_are_refused_without_quantized_matmuls(tmp_path, monkeypatch):
    with pytest.raises(OnnxExportError, match=r"int8_activations: MixtralForCausalLM has no quantized"):
        export_onnx(captured("mixtral")[1], tmp_path / "onnx", int8_activations=True)
    assert not (tmp_path / "onnx").exists()
    # an onnxruntime without QMoE's accuracy_level is named before it fails to load the file
    path = export_onnx(rtn(captured("mixtral")[1], 4, 16), tmp_path / "int8", int8_activations=True)
    monkeypatch.setattr(runtime.ort, "__version__", "1.30.2")
    with pytest.raises(MoepassError, match=r"onnxruntime 1.30.2 cannot run .*'onnxruntime>=1.31'"):
        OnnxProgram(path)


def test_awq_scales_fold_into_the_fused_qmoe_op(tmp_path):
    _, program = captured("mixtral")
    ids = torch.randint(3, program.info.vocab_size, (8, 17))
    calibration = TokenSet(ids[:, :-1], ids[:, 1:], ["x"] * 8)
    config = {"bits": 4, "group_size": 16, "targets": ALL_TARGETS}
    quantized = moepass.compress(program, [("awq", config)], calibration=calibration)
    export_onnx(quantized, tmp_path / "onnx")
    assert _op_counts(tmp_path / "onnx")["QMoE"] == len(program.structure.moe_blocks)
    _matches(quantized, OnnxProgram(tmp_path / "onnx"))


def _fp16_overflowing_expert(seed: int):
    """An fp16 Mixtral whose layer-0 expert 7 overflows to inf on exactly the tokens that do not
    choose it (router row -20 d; gate = up = 4 x.d: silu(g) u is large only where x.d > 0)."""
    model = random_model("mixtral", seed=seed, dtype=torch.float16, num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    direction = (direction / direction.norm()).half()
    with torch.no_grad():
        mlp.gate.weight[7] = -20 * direction
        mlp.experts.gate_up_proj[7] = 4 * direction
        mlp.experts.down_proj[7] = 300.0
    return model, mlp.experts


@pytest.mark.parametrize("quantized", [False, True], ids=["fp16", "int4"])
def test_fp16_experts_overflowing_on_tokens_that_did_not_choose_them_stay_out(quantized, tmp_path):
    model, experts = _fp16_overflowing_expert(seed_for("fp16-overflow"))
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    seen = {}
    hook = experts.register_forward_pre_hook(lambda _, args: seen.update(x=args[0], ids=args[1]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    with torch.no_grad():  # the premise: expert 7 is chosen by some tokens and overflows on others
        h = torch.nn.functional.linear(seen["x"], experts.gate_up_proj[7])
        gate, up = h.chunk(2, dim=-1)
        out = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[7])
    chose = (seen["ids"] == 7).any(dim=-1)
    assert chose.any() and out[~chose].isinf().any() and out[chose].isfinite().all()
    program = moepass.capture(model)
    if quantized:  # int4 experts on MatMulNBits, one If per expert; fp16 keeps them off the fused ops
        program = moepass.compress(program, [("rtn", {"bits": 4, "group_size": 16, "targets": ["experts"]})])
    export_onnx(program, tmp_path / "onnx")
    reference = program(ids)
    assert reference.isfinite().all()
    # onnxruntime's CPU provider happens to run some fp16 ops in fp32 (no overflow there): the
    # standard-op graph itself, run by PyTorch, is checked too
    graph_module, _ = exportable_graph(program)
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    standard_ops = graph_module(ids, mask, positions, *program.empty_cache(ids.shape[0]), torch.tensor(0))[0]
    for logits in (OnnxProgram(tmp_path / "onnx")(ids), standard_ops):
        assert logits.isfinite().all()
        # fp16 rounding may flip a near-tie routing choice (6% off for that token): most tokens match
        error = position_errors(logits, reference)
        assert (error < 5e-3).float().mean() >= 0.9, error


def test_prefill_runs_the_lm_head_only_on_the_positions_asked_for(tmp_path_factory):
    _, program = captured("olmoe")
    exported, vocab = OnnxProgram(_exported("olmoe", tmp_path_factory)), program.info.vocab_size
    ids = torch.randint(0, vocab, (3, 6))
    mask, positions, past = torch.ones_like(ids), torch.arange(6).expand(3, -1), program.empty_cache(3)
    reference = program.step(ids, mask, positions, past)[0]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({name: t.numpy() for name, t in zip(exported.cache_names, past, strict=True)})
    # the optional `logits_to_keep` input: absent (the decoder contract without it) or 0, every position
    for extra in ({}, {"logits_to_keep": np.array(0)}, {"logits_to_keep": np.array(2)}):
        logits = torch.from_numpy(exported.session.run(["logits"], {**feeds, **extra})[0])
        kept = int(extra.get("logits_to_keep", 0)) or 6
        assert logits.shape == (3, kept, vocab)
        torch.testing.assert_close(logits, reference[:, -kept:], rtol=1e-4, atol=1e-5)
    last, _ = exported.step(ids, mask, positions, past, last_token_only=True)
    torch.testing.assert_close(last, program.step(ids, mask, positions, past, last_token_only=True)[0])


def test_steps_refuse_inputs_the_graph_would_misread(tmp_path_factory):
    _, program = captured("olmoe")
    exported = OnnxProgram(_exported("olmoe", tmp_path_factory))
    ids = torch.randint(0, program.info.vocab_size, (2, 5))
    ids[1, 3] = -1  # onnxruntime's Gather would read the last embedding row; both refuse it alike
    for engine in (program, exported):
        with pytest.raises(MoepassError, match=r"input_ids\[1, 3\] is -1: token ids must lie in \[0, "):
            engine(ids)
        with pytest.raises(MoepassError, match=r"input_ids must be integer token ids \[batch, tokens\]"):
            engine(ids[0])  # a shape that did not unpack
    ids[1, 3] = 0
    positions, mask = torch.arange(3, 8).expand(2, -1), torch.ones(2, 8, dtype=torch.long)
    for engine in (program, exported):  # one check serves both steps
        past = [torch.zeros(2, t.shape[1], 3, t.shape[3]) for t in engine.empty_cache(2)]
        for short in (5, 1):  # [2, 1] would broadcast over the past: silently wrong where it is padded
            with pytest.raises(
                MoepassError, match=r"attention_mask must be \[batch, past \+ new tokens\] = \[2, 8\]"
            ):
                engine.step(ids, mask[:, :short], positions, past)
        with pytest.raises(MoepassError, match="position_ids must be"):
            engine.step(ids, mask, positions[:, :1], past)
        with pytest.raises(MoepassError, match=f"takes {len(past)} past tensors"):
            engine.step(ids, mask, positions, past[:-1])
        past[-1] = past[-1][:1]
        with pytest.raises(MoepassError, match=f"{engine.cache_names[-1]} is .*: past tensors must all be"):
            engine.step(ids, mask, positions, past)
        past[-1] = torch.zeros(2, 3, 8)  # 3-D
        with pytest.raises(MoepassError, match=f"{engine.cache_names[-1]} is \\[2, 3, 8\\]: past tensors"):
            engine.step(ids, mask, positions, past)
    with pytest.raises(
        MoepassError, match=r"input_ids must be integer token ids \[batch, tokens\], got float32"
    ):
        exported(ids.float() + 0.5)  # onnxruntime would be fed truncated ids
    with pytest.raises(MoepassError, match="input_ids holds no tokens"):
        exported(ids[:, :0])
    with pytest.raises(MoepassError, match=r"OnnxProgram decodes with a growing \(dynamic\) cache only"):
        exported.generate(ids, 2, cache_implementation="static")  # its graph takes and returns past tensors


def test_a_truncated_onnx_model_is_refused_naming_the_file(tmp_path, tmp_path_factory):
    source = _exported("olmoe", tmp_path_factory)
    copy = tmp_path / "onnx"
    copy.mkdir()
    (copy / "onnx_manifest.json").write_bytes((source / "onnx_manifest.json").read_bytes())
    model = (source / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(model[: len(model) // 2])
    with pytest.raises(
        MoepassError, match=r"model.onnx does not load in onnxruntime .*export the model again"
    ):
        OnnxProgram(copy)


def test_an_onnxruntime_too_old_for_the_exports_is_named(tmp_path_factory, monkeypatch):
    """Older onnxruntimes fail to load the contrib ops, or crash on the first step: name the version."""
    source = _exported("olmoe", tmp_path_factory)
    monkeypatch.setattr(runtime.ort, "__version__", "1.22.1")
    with pytest.raises(MoepassError, match=r"onnxruntime 1.22.1 is older than 1.30, .*'onnxruntime>=1.30'"):
        OnnxProgram(source)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    floor = ".".join(map(str, runtime.OLDEST_ONNXRUNTIME))
    assert f'"onnxruntime>={floor}",' in pyproject, "pip must enforce the same floor"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda m: m["info"].update(newer_field=1), "is damaged or from another moepass .*newer_field"),
        (lambda m: m.update(version=2), "version 2 is not a moepass ONNX manifest of version 1"),
        (lambda m: m.pop("inputs"), "is damaged or from another moepass"),
    ],
)
def test_a_damaged_onnx_manifest_is_refused_naming_the_file(damage, message, tmp_path, tmp_path_factory):
    source = _exported("olmoe", tmp_path_factory)
    copy = tmp_path / "onnx"
    copy.mkdir()
    for name in ("model.onnx", "onnx_manifest.json"):
        (copy / name).write_bytes((source / name).read_bytes())
    manifest = json.loads((copy / "onnx_manifest.json").read_text())
    damage(manifest)
    (copy / "onnx_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MoepassError, match=f"onnx_manifest.json.*{message}"):
        OnnxProgram(copy)


def test_the_export_gives_onnxruntime_the_graph_the_full_onnxscript_optimizer_gives(tmp_path, monkeypatch):
    """The export runs six of onnxscript's rewrite rules, not all ~45 (which cost ~40% of a deep
    export): what onnxruntime runs after its own optimizations must not grow for it. DeepSeek-V3 is
    the family where missing rules left nodes in every layer (and a Slice under torch 2.11)."""
    import onnxruntime as ort
    import onnxscript.optimizer

    from moepass.onnx_export import export as exporter

    _, program = captured("deepseek_v3", num_hidden_layers=2)  # a dense layer, a MoE layer

    def ops_onnxruntime_runs(directory: Path) -> Counter:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(directory / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        return Counter(
            n.op_type
            for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
        )

    export_onnx(program, tmp_path / "ours")
    monkeypatch.setattr(
        exporter,
        "_fold_and_tidy",
        lambda model: onnxscript.optimizer.optimize_ir(model, output_size_limit=exporter._FOLD_LIMIT),
    )
    export_onnx(program, tmp_path / "full")
    assert ops_onnxruntime_runs(tmp_path / "ours") == ops_onnxruntime_runs(tmp_path / "full")
