"""2:4 storage of pruned weights: layout round trips, ops against float64 math, the storage pass on
every family (lossless, smaller, saved and loaded, lowered, exported), and its place in a recipe."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import moepass
from helpers import captured
from moepass.artifact import load, save
from moepass.data import TokenSet
from moepass.ir.ops import experts
from moepass.ir.quant_ops import QUANTIZED_LINEAR, quantized_experts
from moepass.ir.quantized import QuantFormat, dequantize, quantize
from moepass.ir.sparse import (
    SPARSE24_EXPERTS,
    SPARSE24_LINEAR,
    SparsityPatternError,
    compress_24,
    compress_codes_24,
    decompress_24,
    decompress_codes_24,
    sparse24_experts,
    sparse24_linear,
)
from moepass.lowering import lower
from moepass.onnx_export import OnnxProgram, export_onnx
from moepass.pass_manager import PassError, PassManager
from moepass.passes import ConfigError

TARGETS = ["experts", "shared_experts", "attention", "dense_mlp"]


def _pruned_24(*shape: int) -> torch.Tensor:
    """Random weights keeping 2 of every 4 inputs, and fewer in some runs (the pattern allows it)."""
    runs = (*shape[:-1], shape[-1] // 4)
    kept = torch.where(torch.rand(runs) < 0.8, 2, torch.randint(0, 2, runs))
    rank = torch.rand(*runs, 4).argsort(-1).argsort(-1)
    return torch.randn(*shape) * (rank < kept.unsqueeze(-1)).reshape(shape)


def _calibration(samples: int = 16) -> TokenSet:
    ids = torch.randint(3, 128, (samples, 33))
    return TokenSet(ids[:, :-1], ids[:, 1:], ["x"] * samples)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 16, False), (4, -1, True), (8, 32, False)])
def test_layout_round_trips_floats_and_codes(seed, bits, group_size, symmetric):
    weight = _pruned_24(3, 24, 64)
    values, meta = compress_24(weight)
    assert values.shape == (3, 24, 32) and meta.shape == (3, 24, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), weight)
    fmt = QuantFormat(bits, group_size, symmetric)
    qweight, scales, zeros = quantize(weight, fmt)
    dense = dequantize(qweight, scales, zeros, bits, group_size)
    assert (dense[weight == 0] == 0).all(), "a pruned entry quantizes to exactly zero"
    codes, code_meta = compress_codes_24(qweight, zeros, bits, group_size)
    assert codes.shape[-1] == qweight.shape[-1] // 2
    assert torch.equal(decompress_codes_24(codes, code_meta, zeros, bits, group_size), qweight)


def test_a_weight_off_the_pattern_is_refused_by_name():
    weight = _pruned_24(8, 16)
    weight[5, 9:12] = 1.0
    with pytest.raises(SparsityPatternError, match=r"layers.0.w: row 5, inputs 8..11"):
        compress_24(weight, "layers.0.w")
    with pytest.raises(SparsityPatternError, match="divisible by 8"):
        compress_24(torch.zeros(4, 12), "w")


@pytest.mark.parametrize("bits", [0, 4])
def test_ops_equal_float64_math_on_the_expanded_weights(seed, bits):
    e, h, inter, tokens = 4, 32, 24, 7
    gate_up, down = _pruned_24(e, 2 * inter, h).double(), _pruned_24(e, h, inter).double()
    x = torch.randn(tokens, h, dtype=torch.float64)
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(tokens)])
    route = torch.rand(tokens, 2, dtype=torch.float64)
    bias = torch.randn(h, dtype=torch.float64)
    if not bits:
        (gv, gm), (dv, dm) = compress_24(gate_up), compress_24(down)
        out = sparse24_experts(
            x,
            ids,
            route,
            gv,
            gm,
            None,
            None,
            dv,
            dm,
            None,
            None,
            None,
            None,
            None,
            None,
            "silu",
            1.0,
            0.0,
            0,
            -1,
        )
        ref = experts(x, ids, route, gate_up, down, None, None, "silu", 1.0, 0.0)
        h_in = torch.randn(tokens, inter, dtype=torch.float64)
        linear = sparse24_linear(h_in, dv[1], dm[1], None, None, bias, None, 0, -1)
        assert torch.allclose(linear, h_in @ down[1].T + bias, rtol=1e-12, atol=1e-12)
    else:
        fmt = QuantFormat(bits, 8, False)
        gq, dq = quantize(gate_up, fmt), quantize(down, fmt)
        (gv, gm), (dv, dm) = (compress_codes_24(q[0], q[2], bits, 8) for q in (gq, dq))
        scale = torch.rand(h, dtype=torch.float64) + 0.5
        down_scale = torch.rand(e, inter, dtype=torch.float64) + 0.5
        out = sparse24_experts(
            x,
            ids,
            route,
            gv,
            gm,
            gq[1],
            gq[2],
            dv,
            dm,
            dq[1],
            dq[2],
            None,
            None,
            scale,
            down_scale,
            "silu",
            1.0,
            0.0,
            bits,
            8,
        )
        ref = quantized_experts(
            x, ids, route, *gq, *dq, None, None, scale, down_scale, "silu", 1.0, 0.0, bits, 8
        )
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


def _linear_weights(program) -> list[str]:
    """Prefixes of the weights every linear / quantized linear reads."""
    return [
        n.args[1].target.rpartition(".")[0]
        for n in program.graph_module.graph.nodes
        if n.target in (torch.ops.aten.linear.default, QUANTIZED_LINEAR)
    ]


# one family per expert layout and routing kind (the 2:4 ops are family-agnostic; CI time is bounded)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_storage_is_lossless_smaller_and_survives_save_load_and_lowering(family, tmp_path):
    _, program = captured(family)
    recipe = [("magnitude", {"pattern": "2:4", "targets": TARGETS})]
    quantized = family in ("qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")  # half also get int4 after pruning
    if quantized:
        recipe.append(("rtn", {"group_size": 16, "targets": TARGETS}))
    pruned = moepass.compress(program, recipe)
    stored = moepass.compress(pruned, [("sparse24_storage", {})])
    stored.verify()
    record = stored.report.records[-1]
    assert record.modified
    ops = [n.target for n in stored.graph_module.graph.nodes]
    assert (
        ops.count(SPARSE24_EXPERTS)
        == len(stored.structure.moe_blocks)
        == len(record.summary["experts_blocks"])
    )
    was_pruned = [p for p in _linear_weights(pruned) if f"{p}.weight" in pruned.info.pruned]
    assert ops.count(SPARSE24_LINEAR) == record.summary["linears"] == len(was_pruned) > 0
    assert not set(was_pruned) & set(_linear_weights(stored)), "every pruned linear reads 2:4 storage"
    routed = record.summary["coverage"]["routed experts"]
    assert routed["share"] == 1.0
    assert routed["bytes"] < (0.9 if quantized else 0.54) * routed["bytes_before"]
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        reference = pruned(ids)
        assert torch.allclose(stored(ids), reference, rtol=1e-6, atol=1e-6)
    save(pruned, tmp_path / "pruned")
    save(stored, tmp_path / "stored")
    saved = sum(row["bytes_before"] - row["bytes"] for row in record.summary["coverage"].values())
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("pruned", "stored")]
    # the artifact shrinks by what was compressed (give or take the safetensors header's tensor names)
    assert abs((sizes[0] - sizes[1]) - saved) < 0.02 * saved + 4096
    reloaded = load(tmp_path / "stored", lower=False)
    lowered = lower(reloaded)  # what load(dir) does by default, without a second rebuild
    assert not {n.target for n in lowered.graph_module.graph.nodes} & {SPARSE24_LINEAR, SPARSE24_EXPERTS}
    with torch.no_grad():
        assert torch.equal(reloaded(ids), stored(ids))
        assert float((lowered(ids) - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(reloaded.generate(ids, 5), pruned.generate(ids, 5))


def test_stored_programs_export_to_onnx_dense(tmp_path):
    _, program = captured("mixtral")
    recipe = [
        ("magnitude", {"pattern": "2:4", "targets": TARGETS}),
        ("rtn", {"group_size": 32, "targets": TARGETS}),
    ]
    stored = moepass.compress(program, [*recipe, ("sparse24_storage", {})])
    export_onnx(stored, tmp_path / "onnx")
    rewrites = json.loads((tmp_path / "onnx" / "onnx_manifest.json").read_text())["rewrites"]
    assert any(kind.startswith("2:4 storage -> dense") for kind in rewrites)
    exported = OnnxProgram(tmp_path / "onnx")
    ids = torch.randint(3, 128, (2, 6))
    mask, positions = torch.ones(2, 6, dtype=torch.long), torch.arange(6).expand(2, -1)
    ref, _ = stored.step(ids, mask, positions, stored.empty_cache(2))
    logits, _ = exported.step(ids, mask, positions, stored.empty_cache(2))
    assert float((logits - ref).norm() / ref.norm()) < 1e-4
    assert torch.equal(
        exported.generate(ids, 6, eos_token_id=None), stored.generate(ids, 6, eos_token_id=None)
    )


def test_gptq_after_pruning_keeps_the_pattern():
    _, program = captured("mixtral")
    pruned = moepass.compress(program, [("magnitude", {"pattern": "2:4", "targets": TARGETS})])
    quantized = moepass.compress(
        pruned, [("gptq", {"group_size": 16, "targets": TARGETS})], calibration=_calibration()
    )
    stored = moepass.compress(quantized, [("sparse24_storage", {})])
    summary = stored.report.records[-1].summary
    assert summary["experts_blocks"] == [b.index for b in quantized.structure.moe_blocks]
    assert summary["linears"] == len(_linear_weights(quantized)) - len(quantized.structure.moe_blocks) - 1
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.allclose(stored(ids), quantized(ids), rtol=1e-6, atol=1e-6)


def test_storage_runs_after_compression_and_says_so(caplog):
    _, program = captured("qwen3_moe")
    with pytest.raises(ConfigError, match=r"passes\[1\]: .*stages run in the order compress, store, lower"):
        moepass.compress(program, [("sparse24_storage", {}), ("rtn", {})])  # refused as a recipe
    with pytest.raises(PassError, match="stages run in the order compress, store, lower"):
        PassManager([("sparse24_storage", None), ("rtn", None)]).run(program.fork())
    stored = moepass.compress(program, [("magnitude", {"pattern": "2:4"}), ("sparse24_storage", {})])
    with pytest.raises(PassError, match=r"stores 2:4-compressed weights.*pass rtn needs them uncompressed"):
        moepass.compress(stored, [("rtn", {})])
    with caplog.at_level(logging.WARNING, logger="moepass"):
        untouched = moepass.compress(program, [("magnitude", {}), ("sparse24_storage", {})])
    assert not untouched.report.records[-1].modified
    assert "no weight was stored compressed" in caplog.text
    # no coverage table of its own: the unstructured pruning's shares would read as stored 2:4
    assert [name for name, _ in untouched.report.coverage_tables()] == ["magnitude"]
    # quantization groups of 2 inputs split the runs of 4: the kernels could not find their scales
    split = moepass.compress(program, [("magnitude", {"pattern": "2:4"}), ("rtn", {"group_size": 2})])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moepass"):
        dense = moepass.compress(split, [("sparse24_storage", {})])
    assert not dense.report.records[-1].modified
    assert "stays dense" in caplog.text and "group_size 2 is not a multiple of 4" in caplog.text
