"""Lowering (`moepass.lower`): the optimized PyTorch program against the canonical one it came from."""

from __future__ import annotations

import logging

import pytest
import torch

import moepass
from helpers import ALL_TARGETS, FAMILIES, captured, rel_error, rtn
from moepass.artifact import ArtifactError, load, save
from moepass.ir.quant_ops import QUANTIZED_EXPERTS, QUANTIZED_LINEAR
from moepass.kernels.ops import PACKED_EXPERTS, PACKED_LINEAR
from moepass.lowering import lower
from moepass.pass_manager import PassError, PassManager

BF16_REL = 5e-2  # the packed CPU kernels compute in bf16: ~4e-3 per op, compounding over layers (3e-2 seen)


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


@pytest.mark.parametrize(  # int8 per channel (one ATen call) and in groups with zero points (one per group)
    "family,bits,group", [("mixtral", 4, 32), ("qwen2_moe", 8, -1), ("olmoe", 8, 16), ("deepseek_v3", 4, 32)]
)
def test_quantized_programs_run_on_aten_packed_kernels(family, bits, group):
    _, program = captured(family)
    targets = ["experts", "lm_head"] if family == "deepseek_v3" else ALL_TARGETS  # its MLA has 16 inputs
    quantized = rtn(program, bits, group, symmetric=group == -1, targets=targets)
    ops = _ops(lower(quantized))
    assert ops.get(PACKED_LINEAR, 0) > 0
    if "attention" in targets:  # quantized q/k/v fuse before packing: fewer packed matmuls
        assert ops[PACKED_LINEAR] < _ops(quantized)[QUANTIZED_LINEAR]
    assert ops.get(PACKED_EXPERTS, 0) == len(program.structure.moe_blocks)
    lowered = lower(quantized)
    ids = torch.randint(0, program.info.vocab_size, (2, 7))
    assert rel_error(lowered(ids), quantized(ids)) < BF16_REL


def test_formats_the_kernels_cannot_take_keep_the_reference_op(caplog):
    _, program = captured("mixtral")
    quantized = rtn(program, 4, group_size=16)  # ATen's int4 kernel needs groups of 32+
    with caplog.at_level(logging.WARNING, logger="moepass"):
        lowered = lower(quantized)
    summary = _summary(lowered, "cpu_packed_weights")
    kept = summary["kept reference"]
    assert summary["converted"] == 0 and all("32/64/128/256" in r for r in kept.values())
    # every quantized op kept (by its weight), and the user told: these decode slower than float
    reference_ops = (QUANTIZED_LINEAR, QUANTIZED_EXPERTS)
    assert len(kept) == sum(n.target in reference_ops for n in lowered.graph_module.graph.nodes) > 0
    assert f"lowered for cpu: {len(kept)} quantized ops keep the reference path" in caplog.text
    assert f"{len(kept)} x int4 CPU kernel needs groups of 32/64/128/256 inputs, got 16" in caplog.text
    ids = torch.randint(0, program.info.vocab_size, (1, 5))
    assert torch.allclose(lowered(ids), quantized(ids), atol=1e-5, rtol=1e-4)


def test_load_lowers_and_lowered_programs_refuse_compression_and_saving(tmp_path):
    _, program = captured("mixtral")
    quantized = rtn(program)
    save(quantized, tmp_path / "artifact")
    loaded = load(tmp_path / "artifact")
    assert loaded.info.lowered == "cpu" and load(tmp_path / "artifact", lower=False).info.lowered is None
    ids = torch.randint(0, program.info.vocab_size, (2, 6))
    assert rel_error(loaded(ids), quantized(ids)) < BF16_REL
    with pytest.raises(PassError, match="lowered for cpu; pass rtn needs the program before lowering"):
        rtn(loaded)
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
