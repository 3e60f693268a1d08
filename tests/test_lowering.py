"""Lowering (`moepass.lower`): the optimized PyTorch program against the canonical one it came from."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import moepass
from helpers import FAMILIES, captured
from moepass.artifact import ArtifactError, load, save
from moepass.ir.quant_ops import QUANTIZED_LINEAR
from moepass.kernels.ops import PACKED_EXPERTS, PACKED_LINEAR
from moepass.lowering import lower
from moepass.pass_manager import PassError, PassManager

ALL_TARGETS = ["experts", "shared_experts", "attention", "dense_mlp", "lm_head"]
BF16_REL = 5e-2  # the packed CPU kernels compute in bf16: ~4e-3 per op, compounding over layers (3e-2 seen)
# Compiled against eager lowered: the same kernels, but Inductor may keep bf16 values between them in
# fp32 (CPU-dependent: 0 here, 4.4e-4 on the CI host), so they agree to well under one bf16 rounding.
COMPILED_REL = 2**-9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _greedy_under(reference, sequences: torch.Tensor, prompt: int, tie: float = 1e-4) -> None:
    """Every generated token is the reference's greedy choice on that prefix, up to a near tie (fused
    kernels sum in another order: two logits within `tie` of the scale may swap)."""
    logits = reference(sequences)[:, prompt - 1 : -1]
    chosen = logits.gather(-1, sequences[:, prompt:, None]).squeeze(-1)
    assert (logits.amax(-1) - chosen <= tie * logits.abs().amax()).all()


def _rtn(program, bits: int = 4, group_size: int = 32, symmetric: bool = False, targets=ALL_TARGETS):
    config = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "targets": list(targets)}
    return moepass.compress(program, [("rtn", config)])


def _summary(program, pass_name: str) -> dict:
    return next(r.summary for r in program.report.records if r.name == pass_name)


def _ops(program) -> dict:
    counts: dict = {}
    for node in program.graph_module.graph.nodes:
        counts[node.target] = counts.get(node.target, 0) + 1
    return counts


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_lowering_equals_the_canonical_program(family):
    _, program = captured(family)
    lowered = lower(program)
    assert lowered.info.lowered == "cpu" and program.info.lowered is None  # the input is left as it was
    ids = torch.randint(0, program.info.vocab_size, (2, 7))
    assert torch.allclose(lowered(ids), program(ids), atol=1e-5, rtol=1e-4)
    assert torch.equal(
        lowered.generate(ids, 6, eos_token_id=None), program.generate(ids, 6, eos_token_id=None)
    )
    # dense weights are stored input-major (the decode-speed layout), same values
    assert _summary(lowered, "kn_weight_layout")["weights"] > 0
    # every attention's projections of the block input (q/k/v; MLA's q_a/kv_a) became one matmul
    assert _summary(lowered, "fuse_sibling_linears")["groups"] >= len(program.structure.blocks)


@pytest.mark.parametrize("family,bits", [("mixtral", 4), ("qwen2_moe", 8), ("deepseek_v3", 4)])
def test_quantized_programs_run_on_aten_packed_kernels(family, bits):
    _, program = captured(family)
    targets = ["experts", "lm_head"] if family == "deepseek_v3" else ALL_TARGETS  # its MLA has 16 inputs
    quantized = _rtn(program, bits, -1 if bits == 8 else 32, symmetric=bits == 8, targets=targets)
    ops = _ops(lower(quantized))
    assert ops.get(PACKED_LINEAR, 0) > 0
    if "attention" in targets:  # quantized q/k/v fuse before packing: fewer packed matmuls
        assert ops[PACKED_LINEAR] < _ops(quantized)[QUANTIZED_LINEAR]
    assert ops.get(PACKED_EXPERTS, 0) == len(program.structure.moe_blocks)
    lowered = lower(quantized)
    ids = torch.randint(0, program.info.vocab_size, (2, 7))
    assert _rel(lowered(ids), quantized(ids)) < BF16_REL


def test_formats_the_kernels_cannot_take_keep_the_reference_op():
    _, program = captured("mixtral")
    quantized = _rtn(program, 4, group_size=16)  # ATen's int4 kernel needs groups of 32+
    lowered = lower(quantized)
    summary = _summary(lowered, "cpu_packed_weights")
    assert summary["converted"] == 0 and all(
        "32/64/128/256" in r or "MOEPASS" in r for r in summary["kept reference"].values()
    )
    ids = torch.randint(0, program.info.vocab_size, (1, 5))
    assert torch.allclose(lowered(ids), quantized(ids), atol=1e-5, rtol=1e-4)


def test_load_lowers_and_lowered_programs_refuse_compression_and_saving(tmp_path):
    _, program = captured("mixtral")
    quantized = _rtn(program)
    save(quantized, tmp_path / "artifact")
    loaded = load(tmp_path / "artifact")
    assert loaded.info.lowered == "cpu" and load(tmp_path / "artifact", lower=False).info.lowered is None
    ids = torch.randint(0, program.info.vocab_size, (2, 6))
    assert _rel(loaded(ids), quantized(ids)) < BF16_REL
    with pytest.raises(PassError, match="lowered for cpu; pass rtn needs the program before lowering"):
        _rtn(loaded)
    with pytest.raises(ArtifactError, match="save the program before lowering"):
        save(loaded, tmp_path / "again")
    with pytest.raises(moepass.MoepassError, match="already lowered"):
        lower(loaded)
    assert moepass.lower is lower  # the package attribute stays the function beside moepass.lowering
    with pytest.raises(moepass.MoepassError, match="no lowering for device 'meta'"):
        lower(program, "meta")
    by_hand = quantized.fork()  # a lowering pass run outside moepass.lower marks the program too
    PassManager([("cpu_packed_weights", None)]).run(by_hand)
    assert by_hand.info.lowered == "cpu"
    with pytest.raises(ArtifactError, match="save the program before lowering"):
        save(by_hand, tmp_path / "by-hand")


def test_compiled_steps_match_the_lowered_program_and_do_not_recompile_per_token():
    _, program = captured("mixtral", num_hidden_layers=1)  # Inductor's CPU codegen: ~30 s per layer here
    quantized = _rtn(program, 4, 32)
    eager, compiled = lower(quantized), lower(quantized, compile=True)
    assert compiled.info.compiled and not eager.info.compiled
    before = counters["stats"]["unique_graphs"]
    ids = torch.randint(0, program.info.vocab_size, (2, 7))
    # the prompt step as generate runs it (last position only: full logits would be a third compile)
    prompt_step = (ids, torch.ones_like(ids), torch.arange(7).expand(2, -1), eager.empty_cache(2))
    got, want = (p.step(*prompt_step, last_token_only=True)[0] for p in (compiled, eager))
    assert _rel(got, want) < COMPILED_REL
    _greedy_under(eager, compiled.generate(ids, 8, eos_token_id=None), prompt=7, tie=COMPILED_REL)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 2  # one for prompts, one for single tokens (whatever the cache's layout)
    longer = torch.randint(0, program.info.vocab_size, (2, 11))
    _greedy_under(eager, compiled.generate(longer, 12, eos_token_id=None), prompt=11, tie=COMPILED_REL)
    assert counters["stats"]["unique_graphs"] == graphs  # new lengths reuse the dynamic graphs
