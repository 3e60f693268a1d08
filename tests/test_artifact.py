"""Save/load round trips (moepass and transformers formats), atomic writes, and `moepass compress`."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys

import onnxruntime
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, processors

import moepass
from helpers import captured, model_for
from moepass import artifact
from moepass.artifact import ArtifactError, load, save
from moepass.atomic_write import write_atomically, write_file_atomically
from moepass.cli import main
from moepass.data import TokenSet, corpus_dir, load_documents
from moepass.hf_export import NotExpressibleError, hf_checkpoint, hf_config
from moepass.ir.surgery import drop_block, keep_experts
from moepass.passes import PASSES, TransformPass, create_pass
from moepass.quantization import QuantizationPass
from moepass.zoo import random_config, random_model

ATOL = 1e-6  # reloaded weights can sit at other addresses, and BLAS results depend on alignment


def _calibration(vocab: int = 128) -> TokenSet:
    ids = torch.randint(3, vocab, (8, 17))
    return TokenSet(ids[:, :-1], ids[:, 1:], ["x"] * 8)


def _same_outputs(a, b, vocab: int = 128) -> None:
    ids = torch.randint(3, vocab, (2, 9))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() <= ATOL
    assert torch.equal(a.generate(ids, 6), b.generate(ids, 6))


# plain and shared-expert, group-routed families, selection biases held by the block (MiniMax-M2) or
# as [1, E] (ERNIE-4.5), per-layer MLP kinds (GLM-4-MoE-Lite); GPT-OSS's converted expert layout and
# Qwen's shared experts round-trip in tests/test_sparse24.py
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "minimax_m2", "ernie4_5_moe", "glm4_moe_lite"])
def test_moepass_format_round_trip(family, tmp_path):
    _, original = captured(family)
    recipe = [
        ("expert_drop", {"keep": 6, "selection": "layerwise"}),
        ("layer_drop", {"count": 1}),
        ("block_drop", {"count": 1}),
    ]
    program = moepass.compress(original, recipe, calibration=_calibration())
    save(program, tmp_path / "artifact")
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["edits"] == program.info.edits and manifest["history"][0]["recipe"]["passes"]
    assert len(manifest["structure"]["dropped_blocks"]) == 1
    kept = {
        int(i): b["kept_original_experts"]
        for i, b in manifest["structure"]["blocks"].items()
        if b["mlp"] == "moe"
    }
    assert all(len(v) == 6 for v in kept.values())
    load_file(str(tmp_path / "artifact" / "model.safetensors"))  # plain safetensors, no pickle
    reloaded = load(tmp_path / "artifact", lower=False)
    reloaded.verify()
    assert [b.index for b in reloaded.structure.blocks] == [b.index for b in program.structure.blocks]
    _same_outputs(program, reloaded)


@pytest.mark.parametrize(
    "family",
    [
        "mixtral",
        "qwen2_moe",
        "deepseek_v3",
        "glm4_moe",
        "glm4_moe_lite",
        "dots1",
        "minimax_m2",
        "ernie4_5_moe",
        "hunyuan_v1_moe",
        "granitemoe",
        "exaone_moe",
        "afmoe",
        "flex_olmo",
        "solar_open",
        "llama4_text",
        "gpt_oss",
        "phimoe",
    ],
)
def test_transformers_format_loads_in_stock_transformers(family, tmp_path):
    _, original = captured(family)
    keep = 6 if family != "phimoe" else 4
    program = moepass.compress(
        original, [("expert_drop", {"keep": keep}), ("block_drop", {"count": 1})], calibration=_calibration()
    )
    save(program, tmp_path / "hf", format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_hidden_layers == original.info.num_layers - 1
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - program(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "family,key",
    [
        ("glm4_moe_lite", "mlp_layer_types"),
        ("gpt_oss", "layer_types"),
        ("dots1", "layer_types"),
        ("afmoe", "layer_types"),
        ("llama4_text", "no_rope_layers"),
    ],
)
def test_transformers_format_drops_the_first_blocks_entry_of_per_layer_lists(family, key, tmp_path):
    """Block 0 is GLM-4-MoE-Lite's dense MLP, GPT-OSS's sliding attention, dots.llm1's dense MLP
    under full attention (its later layers slide), AFMoE's dense MLP under sliding attention and
    Llama-4's dense MLP under chunked attention with RoPE: the config's per-layer list must lose that
    entry and the count (or list) of dense layers follow, or stock transformers builds the remaining
    layers of the wrong kinds."""
    _, original = captured(family)
    program = original.fork()
    drop_block(program, 0)
    save(program, tmp_path / "hf", format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert getattr(model.config, key) == original.info.config[key][1:]
    if "moe_layers" in original.info.config:
        assert model.config.moe_layers == [i - 1 for i in original.info.config["moe_layers"]]
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - program(ids)).abs().max() <= 1e-5


def test_hunyuans_fp32_router_in_a_bf16_model_stays_fp32_in_both_formats(seed, tmp_path):
    """Hunyuan builds its router (`gate.wg`) in fp32 whatever the model's dtype and routes on fp32
    logits: capture, the moepass artifact and the transformers checkpoint must keep it so."""
    torch.manual_seed(seed)
    config = random_config("hunyuan_v1_moe")
    model = transformers.HunYuanMoEV1ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    assert model.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    ids = torch.randint(3, 128, (2, 9))
    program = moepass.capture(model)
    with torch.no_grad():
        expected = model(ids).logits.float()
    torch.testing.assert_close(program(ids).float(), expected, atol=0.02 * expected.abs().max(), rtol=0)
    program = moepass.compress(program, [("expert_drop", {"keep": 6})], calibration=_calibration())
    save(program, tmp_path / "artifact")
    save(program, tmp_path / "hf", format="hf")
    reloaded = load(tmp_path / "artifact", lower=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    for block in program.structure.moe_blocks:
        router = program.graph_module.get_parameter(block.mlp.router_weight)
        assert router.dtype == torch.float32 and router.shape[0] == 6
        assert torch.equal(reloaded.graph_module.get_parameter(block.mlp.router_weight), router)
        assert torch.equal(hf_model.model.layers[block.index].mlp.gate.wg.weight, router)
    _same_outputs(program, reloaded)
    with torch.no_grad():
        assert (hf_model(ids).logits - program(ids)).abs().max() <= ATOL


def test_transformers_format_places_ernies_moe_layers_or_refuses(tmp_path):
    """ERNIE-4.5 places its MoE layers as every n-th layer of a range: dropping a block re-derives the
    range, and a drop no range describes is refused, not written with layers of the wrong kinds."""
    _, original = captured("ernie4_5_moe")  # dense, MoE, MoE
    program = original.fork()
    drop_block(program, 0)
    save(program, tmp_path / "hf", format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (model.config.moe_layer_start_index, model.config.moe_layer_end_index) == (0, 1)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - program(ids)).abs().max() <= 1e-5
    _, alternating = captured("ernie4_5_moe", num_hidden_layers=6, moe_layer_interval=2)  # MoE: 1, 3, 5
    program = alternating.fork()
    drop_block(program, 0)  # MoE at 0, 2 and 4 of 5 layers: every 2nd layer counts from the 2nd
    with pytest.raises(NotExpressibleError, match=r"remaining MoE layers \[0, 2, 4\] are no one range"):
        hf_config(program)


def test_transformers_format_keeps_tied_embeddings_and_the_weights_dtype(tmp_path):
    """A tied model (one tensor for embeddings and LM head) whose config says bf16 but whose weights
    were loaded in fp32 — the bundled tiny-deepseek — reloads as the same fp32 function."""
    _, original = captured("deepseek_v2", tie_word_embeddings=True)
    program = moepass.compress(original, [("expert_drop", {"keep": 4, "score": "random"})])
    program.info.config["dtype"] = "bfloat16"
    save(program, tmp_path / "hf", format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.dtype == torch.float32
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - program(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("quantized", [False, True])
def test_moepass_format_keeps_tied_embeddings(quantized, tmp_path, monkeypatch):
    """Loading allocates the model before filling it; the tie between embeddings and LM head (one
    tensor, stored once) must survive that, and so must their shared int4 codes — which loading
    never recomputes (placeholders of their shapes, replaced by the stored ones)."""
    _, program = captured("deepseek_v2", tie_word_embeddings=True)
    if quantized:
        config = {"group_size": 16, "targets": ["lm_head", "embeddings"]}
        program = moepass.compress(program, [("rtn", config)])
    save(program, tmp_path / "tied")

    def no_rounding(*args, **kwargs):
        raise AssertionError("load quantized a placeholder")

    monkeypatch.setattr(sys.modules["moepass.ir.quantized"], "scales_and_zeros", no_rounding)
    stored = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert not any(name.startswith("model.embed_tokens") for name in stored)
    assert ("lm_head.qweight" in stored) == quantized
    reloaded = load(tmp_path / "tied", lower=False)
    reloaded.verify()
    _same_outputs(program, reloaded)
    if quantized:  # the lowered program reads the shared codes too
        _same_outputs(program, load(tmp_path / "tied"))


@pytest.mark.parametrize("cast", ["to", "from_pretrained"])
def test_a_bfloat16_model_round_trips(cast, tmp_path):
    """Which tensors of a bf16 model are bf16 depends on how it was made: `model.to(torch.bfloat16)`
    casts them all, `from_pretrained(dtype=bfloat16)` (and the built-ins) keep DeepSeek's router and
    the rotary inv_freq in float32, where the skeleton a load builds has its own mix: the rebuilt graph
    must read every tensor as saved."""
    if cast == "to":
        model = random_model("deepseek_v3", seed=0, num_hidden_layers=2).to(torch.bfloat16)
    else:
        model = random_model("deepseek_v3", seed=0, num_hidden_layers=2, dtype=torch.bfloat16)
    correction_bias = model.model.layers[1].mlp.gate.e_score_correction_bias  # float32 in every version
    assert correction_bias.dtype == (torch.bfloat16 if cast == "to" else torch.float32)
    program = moepass.capture(model)
    save(program, tmp_path / "a")
    _same_outputs(program, load(tmp_path / "a", lower=False))


def test_manifests_are_strict_json(tmp_path):
    """A block-similarity matrix is NaN past the last block, a perplexity can be infinite: written as
    null, which any JSON parser reads (Python's alone accepts NaN)."""
    _, program = captured("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 128, (4, 17))
    dropped = moepass.compress(
        program, [("block_drop", {"count": 1})], calibration=TokenSet(ids[:, :-1], ids[:, 1:], ["d"] * 4)
    )
    save(dropped, tmp_path / "out")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(), parse_constant=refuse)
    matrix = manifest["history"][-1]["report"]["analyses"]["block_similarity()"]["matrix"]
    assert matrix[-1][1:] == [None, None] and all(isinstance(v, float) for v in matrix[0])
    assert load(tmp_path / "out").structure.blocks[0].index == dropped.structure.blocks[0].index


def test_the_generation_config_travels_with_the_program(tmp_path):
    """Checkpoints often stop on more EOS ids than config.json names (generation_config.json): after
    save/load (and so in an ONNX export of the loaded program) and in the transformers format,
    generation stops on the same ids; an artifact written before they were kept gets the config's."""
    model = random_model("mixtral", seed=0)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [2, 86], 5
    program = moepass.capture(model)
    assert (program.info.eos_token_ids, program.info.pad_token_id) == ([2, 86], 5)
    save(program, tmp_path / "a")
    loaded = load(tmp_path / "a", lower=False)
    assert (loaded.info.eos_token_ids, loaded.info.pad_token_id) == ([2, 86], 5)
    save(program, tmp_path / "hf", format="hf")
    reread = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (reread.eos_token_id, reread.pad_token_id) == ([2, 86], 5)
    older = json.loads((tmp_path / "a" / "manifest.json").read_text())
    del older["generation_config"]
    skeleton = artifact._skeleton(older, {})
    assert skeleton.generation_config.eos_token_id == model.config.eos_token_id


def test_transformers_format_refuses_what_it_cannot_express(tmp_path):
    _, original = captured("mixtral")
    layer_dropped = moepass.compress(original, [("layer_drop", {"count": 1})], calibration=_calibration())
    with pytest.raises(NotExpressibleError, match=r"no MoE sub-layer left.*save in the moepass format"):
        save(layer_dropped, tmp_path / "hf", format="hf")
    uneven = original.fork()  # what a global expert drop may leave
    keep_experts(uneven, uneven.structure.moe_blocks[0].index, [0, 2, 5])
    with pytest.raises(NotExpressibleError, match="different expert counts"):
        save(uneven, tmp_path / "hf", format="hf")
    quantized = moepass.compress(original, [("rtn", {"group_size": 16})])
    with pytest.raises(NotExpressibleError, match=r"quantized_linear.* reads quantized weights"):
        save(quantized, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


# options a pass needs before it does anything on an 8-expert model
_EXAMPLE_OPTIONS = {"expert_drop": {"keep": 6}, "layer_drop": {"count": 1}, "block_drop": {"count": 1}}


@pytest.mark.parametrize(
    "name", [n for n, cls in PASSES.items() if issubclass(cls, TransformPass) and cls.stage == "compress"]
)
def test_each_pass_declares_what_a_transformers_checkpoint_cannot_hold(name):
    """`--format hf` refuses a recipe up front by its passes' `leaves_not_in_hf_checkpoints`; the checkpoint
    writer checks the result. A pass whose result the writer refuses must say so, and only then."""
    _, original = captured("mixtral")
    recipe = [(name, _EXAMPLE_OPTIONS.get(name, {}))]
    if name == "magnitude":  # 2:4 storage is held dense; check that path too
        recipe = [(name, {"pattern": "2:4"}), ("sparse24_storage", {})]
    result = moepass.compress(original, recipe, calibration=_calibration())
    record = next(r for r in result.report.records if r.name == name)
    assert record.modified, "the pass must change something for this check to mean anything"
    if create_pass(name, _EXAMPLE_OPTIONS.get(name, {})).leaves_not_in_hf_checkpoints():
        with pytest.raises(NotExpressibleError):
            hf_checkpoint(result)
    else:
        hf_checkpoint(result)


def test_transformers_format_holds_2_4_weights_dense(tmp_path):
    _, original = captured("qwen2_moe")
    stored = moepass.compress(original, [("magnitude", {"pattern": "2:4"}), ("sparse24_storage", {})])
    save(stored, tmp_path / "hf", format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - stored(ids)).abs().max() <= 1e-5
    assert stored.report.records[-1].modified, "the program itself keeps its 2:4 storage"


def test_existing_targets_and_failed_writes(tmp_path, monkeypatch):
    _, program = captured("olmoe")
    target = tmp_path / "out"
    save(program, target)
    before = (target / "manifest.json").read_text()
    with pytest.raises(ArtifactError, match="already exists; pass overwrite=True"):
        save(program, target)
    save(program, target, overwrite=True)
    assert (target / "manifest.json").read_text() == before

    def broken(staging):
        (staging / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(tmp_path / "never", broken, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no target, no staging left behind
    (tmp_path / "file").write_text("x")
    for bad, message in [
        (tmp_path / "file" / "out", "file is not a writable directory"),  # checked before any work
        (tmp_path / "file", "file is a file; name a directory"),  # whether overwriting or not
    ]:
        with pytest.raises(ArtifactError, match=message):
            save(program, bad)
    monkeypatch.chdir(target)
    for here in (".", "../out"):  # replacing it would leave the process in a deleted directory
        with pytest.raises(ArtifactError, match="is the current directory or holds it"):
            save(program, here, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
    assert (target / "manifest.json").read_text() == before


def test_overwrite_never_deletes_a_directory_that_is_not_an_earlier_output(tmp_path, seed):
    _, program = captured("olmoe")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match=r"holds notes\.txt but no moepass manifest.* will not delete it"):
        save(program, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # a user's checkpoint (every one holds a config.json), or another tool's manifest.json, is no output
    # of ours; a transformers checkpoint moepass wrote says so in moepass.json and may be replaced
    user = tmp_path / "user-checkpoint"
    model_for("olmoe", seed=seed).save_pretrained(user)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "some-other-tool"}')
    for directory in (user, tmp_path / "other"):
        before = sorted(p.name for p in directory.iterdir())
        with pytest.raises(ArtifactError, match="not an earlier output of moepass"):
            save(program, directory, overwrite=True)
        assert sorted(p.name for p in directory.iterdir()) == before
    ours = save(program, tmp_path / "ours-hf", format="hf")
    assert json.loads((ours / "moepass.json").read_text())["format"] == "moepass-hf-checkpoint"
    save(program, ours, overwrite=True)  # replaced by a moepass artifact
    assert (ours / "manifest.json").is_file() and not (ours / "config.json").exists()
    (tmp_path / "empty").mkdir()
    save(program, tmp_path / "empty", overwrite=True)  # an empty directory holds nothing to lose
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_write_errors_name_the_output_and_leave_nothing_behind(tmp_path, caplog):
    def disk_full(staging):
        (staging / "half-written").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArtifactError, match=r"cannot write \S+never: No space left on device; nothing was"):
        write_atomically(tmp_path / "never", disk_full, overwrite=False)
    target = tmp_path / "result.json"
    with pytest.raises(UnicodeEncodeError):
        write_file_atomically(target, lambda path: path.write_text("\ud800", encoding="utf-8"))
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file or directory
    umask = os.umask(0o022)
    try:
        write_file_atomically(target, lambda path: path.write_text("{}"))
    finally:
        os.umask(umask)
    assert target.read_text() == "{}" and target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    killed = tmp_path / ".out.moepass-tmp.x1y2"  # what a write killed outright (SIGKILL) leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(bytes(2**20))
    with caplog.at_level(logging.WARNING, logger="moepass"):
        write_atomically(tmp_path / "out", lambda staging: (staging / "f").write_text("x"), overwrite=False)
    assert ".out.moepass-tmp.x1y2: left by an interrupted earlier write (1.0 MiB)" in caplog.text


def test_load_checks_its_arguments_before_any_work(tmp_path, monkeypatch):
    _, program = captured("mixtral")
    save(program, tmp_path / "a")

    def rebuild(*args):
        raise AssertionError("the slow rebuild ran before the arguments were checked")

    monkeypatch.setattr(artifact, "_rebuild", rebuild)
    cases = [
        ({"device": "gpu"}, "device 'gpu' is not a torch device"),
        ({"device": "meta"}, "no lowering for device 'meta'; supported: cpu, cuda"),
        ({"lower": False, "compile": True}, "compile=True needs lower=True"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "device 'cuda': this machine or torch build has no CUDA GPU"))
    for options, message in cases:
        with pytest.raises(moepass.MoepassError, match=message):
            load(tmp_path / "a", **options)


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"no manifest\.json: not a moepass artifact"):
        load(tmp_path)
    random_model("mixtral", seed=0).save_pretrained(tmp_path / "hf")
    with pytest.raises(ArtifactError, match="looks like a transformers checkpoint"):
        load(tmp_path / "hf")
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def edited_artifact(tmp_path_factory):
    """An artifact whose program had experts and a block dropped (edits to replay), written once."""
    _, original = captured("mixtral")
    program = moepass.compress(
        original, [("expert_drop", {"keep": 6}), ("block_drop", {"count": 1})], calibration=_calibration()
    )
    return save(program, tmp_path_factory.mktemp("edited") / "a")


def _damage_manifest(change):
    def damage(directory):
        manifest = json.loads((directory / "manifest.json").read_text())
        change(manifest)
        (directory / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _retype(directory):
    """Right names and shapes, wrong dtype: loading it would compute with other numbers."""
    tensors = load_file(str(directory / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].double()
    save_file(tensors, str(directory / "model.safetensors"))


def _truncate(directory):
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "manifest.json").write_text("{"), r"manifest\.json is not valid JSON"),
        (_damage_manifest(lambda m: m.pop("edits")), r"manifest\.json lacks edits"),
        (
            _damage_manifest(lambda m: m["edits"][0].update(block=17)),
            r"edit 0 \(keep_experts\) does not apply",
        ),
        (
            _damage_manifest(lambda m: m["config"].update(num_hidden_layers=2)),
            r"edit \d \(\w+\) does not apply",
        ),
        (
            _damage_manifest(lambda m: m["config"].update(hidden_size=48)),
            r"is float32 \(.*\) where manifest\.json gives float32 \(",
        ),
        (
            _damage_manifest(lambda m: next(iter(m["structure"]["blocks"].values())).update(experts=8)),
            "structure it records differs",
        ),
        (_retype, r"model\.safetensors: \S+ is float64 \(.*\) where manifest\.json gives float32 \("),
        (_damage_manifest(lambda m: m.update(aliases=[])), r"manifest\.json: aliases is a list, not a dict"),
        (
            _damage_manifest(lambda m: m.update(aliases={"x": ["y"]})),
            r"manifest\.json: alias 'x' -> \['y'\] is not a pair of tensor names",
        ),
        (
            _damage_manifest(lambda m: m["edits"][0].update(keep=[float(e) for e in m["edits"][0]["keep"]])),
            r"edit 0 \(keep_experts\) does not apply .*\(RuntimeError: ",
        ),
        (_damage_manifest(lambda m: m.update(history="x")), r"manifest\.json: history is a str, not a list"),
        (_damage_manifest(lambda m: m["edits"].insert(0, 5)), r"manifest\.json: edit 0 is not an object"),
        (
            _damage_manifest(lambda m: m["config"].update(hidden_size=-1)),
            r"its config does not build a model \(RuntimeError: .*\): the artifact is damaged",
        ),
        (_truncate, r"model\.safetensors is unreadable"),
        (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors is missing"),
    ],
)
def test_a_damaged_artifact_is_refused_naming_the_damage(damage, message, edited_artifact, tmp_path):
    shutil.copytree(edited_artifact, tmp_path / "a")
    damage(tmp_path / "a")
    with pytest.raises(ArtifactError, match=message):
        load(tmp_path / "a", lower=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random model with the corpus tokenizer's vocabulary, saved as a transformers checkpoint."""
    path = tmp_path_factory.mktemp("model")
    # fewer positions than the default evaluation window (256): compress evaluates on windows that fit
    random_model(
        "qwen2_moe", seed=1, vocab_size=4096, num_hidden_layers=4, max_position_embeddings=128
    ).save_pretrained(path)
    shutil.copy(corpus_dir() / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "model_max_length": 256}')
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return path


def test_cli_compress_writes_artifact_report_and_plots(checkpoint, tmp_path, capsys):
    out = tmp_path / "result"
    recipe = tmp_path / "small.yaml"  # the paper recipe's groups of 128 do not fit this 64-wide model
    recipe.write_text(
        "name: small\ncalibration: {samples: 8, seq_len: 128, text_key: body}\npasses:\n"
        "  - awq: {group_size: 16}\n  - layer_drop: {ratio: 0.25}\n"
    )
    calibration = tmp_path / "calibration.jsonl"  # records whose text is under "body"
    records = [{"body": d.text, "source": d.source} for d in load_documents("builtin:validation")]
    calibration.write_text("\n".join(json.dumps(r) for r in records))
    argv = [
        "compress",
        "--model",
        str(checkpoint),
        "--recipe",
        str(recipe),
        "--calib",
        str(calibration),
        "--eval-data",  # read with the recipe's text_key too
        str(calibration),
        "--out",
        str(out),
        "--eval-per-source",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity overall" in printed and "MoE sub-layer dropped" in printed and "layer_drop" in printed
    assert "routed experts" in printed and "100.0%" in printed  # what AWQ covered
    assert {p.name for p in out.iterdir()} == {
        "manifest.json",
        "model.safetensors",
        "report.md",
        "report.json",
        "plots",
        "tokenizer.json",
        "tokenizer_config.json",  # the checkpoint's tokenizer files travel as they are
        "chat_template.jinja",
    }
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["calibration"]["text_key"] == "body"
    assert report["recipe"]["calibration"]["data"] == str(calibration)  # --calib, not the recipe's
    assert load(out, lower=False).info.history[-1]["recipe"]["calibration"]["data"] == str(calibration)
    assert report["before"]["seq_len"] == report["after"]["seq_len"] == 128  # the model's positions
    assert [e["op"] for e in report["edits"]].count("drop_mlp") == 1
    assert "quantize_experts" in [e["op"] for e in report["edits"]]
    # an artifact is inspected and compressed further like a model
    assert main(["inspect", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"loaded {out} in ")
    (tmp_path / "drop.yaml").write_text("name: drop\npasses:\n  - layer_drop: {count: 1, metric: random}\n")
    further = [
        "--recipe",
        str(tmp_path / "drop.yaml"),
        "--eval-per-source",
        "0",
        "--out",
        str(tmp_path / "more"),
    ]
    assert main(["compress", "--model", str(out), *further]) == 0
    edits = [e["op"] for e in load(tmp_path / "more", lower=False).info.edits]
    assert edits.count("drop_mlp") == 2 and "quantize_experts" in edits
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 2  # exists: refused, untouched
    assert "(CLI: --force)" in capsys.readouterr().err and (out / "manifest.json").stat().st_mtime_ns == stamp

    # the artifact streams text through the lowered PyTorch program and, exported, through onnxruntime
    onnx_dir = tmp_path / "onnx"
    assert main(["export-onnx", str(out), str(onnx_dir)]) == 0
    assert "MatMulNBits int4" in capsys.readouterr().out
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (onnx_dir / name).read_text() == (checkpoint / name).read_text()
    texts = {}
    engines = {"torch": [str(out)], "static": [str(out), "--static-cache"], "onnx": [str(onnx_dir), "--onnx"]}
    sampling = ["--sample", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "3"]
    batch = ["--prompt", "It is", "--prompt", "A"]  # left-padded: the second prompt is shorter
    for engine, argv in engines.items():
        for decoding, options in {"greedy": [], "sampled": sampling, "batch": batch}.items():
            prompt = [] if decoding == "batch" else ["--prompt", "It is"]
            assert main(["generate", *argv, *prompt, "--max-new-tokens", "6", *options]) == 0
            captured_io = capsys.readouterr()
            texts[engine, decoding] = captured_io.out
            assert "tokens in" in captured_io.err or "steps x 2 prompts in" in captured_io.err
    for decoding in ("greedy", "sampled", "batch"):  # the same draws from the same seed, whatever the engine
        assert texts["torch", decoding] == texts["static", decoding] == texts["onnx", decoding]
        assert texts["torch", decoding].startswith("It is" if decoding != "batch" else "[1/2]\nIt is")
    assert texts["torch", "batch"].startswith(f"[1/2]\n{texts['torch', 'greedy']}\n\n[2/2]\nA")
    assert main(["generate", str(out), "--top-p", "0.9", "--temperature", "0.7"]) == 2  # not ignored silently
    assert "--temperature, --top-p shape sampling, and decoding is greedy: add --sample" in (
        capsys.readouterr().err
    )
    assert main(["eval", str(onnx_dir), "--max-per-source", "1"]) == 0  # scored by onnxruntime
    assert "(ONNX export, onnxruntime)" in capsys.readouterr().out
    questions = tmp_path / "questions.jsonl"  # multiple choice: onnxruntime scores as PyTorch does
    questions.write_text(
        json.dumps({"context": "It is", "choices": ["a truth", "the end of it"], "label": 0})
    )
    for subject in (out, onnx_dir):
        result = tmp_path / f"{subject.name}.json"
        assert main(["eval", str(subject), "--choices", str(questions), "--json", str(result)]) == 0
    scores = [
        json.loads((tmp_path / f"{d.name}.json").read_text())["loglikelihoods"] for d in (out, onnx_dir)
    ]
    assert (
        scores[0][0] == pytest.approx(scores[1][0], abs=1e-3)
        and capsys.readouterr().out.count("acc_norm") == 2
    )
    int8_dir = tmp_path / "onnx-int8"
    assert main(["export-onnx", str(out), str(int8_dir), "--int8-activations"]) == 0
    assert "MatMulNBits/QMoE on int8 activations (accuracy_level 4)" in capsys.readouterr().out
    if tuple(map(int, onnxruntime.__version__.split(".")[:2])) >= (1, 31):
        assert main(["eval", str(int8_dir), "--max-per-source", "1"]) == 0
        assert "(ONNX export, onnxruntime, int8 activations)" in capsys.readouterr().out
    else:
        assert main(["eval", str(int8_dir), "--max-per-source", "1"]) == 2
        assert "exported with int8 activations" in capsys.readouterr().err
    assert main(["eval", str(onnx_dir), "--program"]) == 2
    assert "is an ONNX export, run by onnxruntime's CPU provider" in capsys.readouterr().err
    assert main(["export-onnx", str(out), str(onnx_dir)]) == 2  # refused before loading anything
    assert "(CLI: --force)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no bfloat16 in onnxruntime: refused by argparse, before loading
        main(["export-onnx", str(out), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert "invalid choice: 'bfloat16'" in capsys.readouterr().err
    assert main(["export-onnx", str(out), str(tmp_path / "f16"), "--dtype", "float16"]) == 2
    assert "keeps its compressed dtype" in capsys.readouterr().err
    bare = tmp_path / "onnx-without-tokenizer"
    shutil.copytree(onnx_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    bare_artifact = tmp_path / "artifact-without-tokenizer"
    shutil.copytree(out, bare_artifact, ignore=shutil.ignore_patterns("tokenizer*"))
    for argv in ([str(bare), "--onnx"], [str(bare_artifact)]):
        assert main(["generate", *argv, "--prompt", "It is"]) == 2
        assert "holds no tokenizer (written without one)" in capsys.readouterr().err
    assert main(["eval", str(out), "--dtype", "float32"]) == 2  # not ignored silently
    assert "keeps its compressed dtype" in capsys.readouterr().err
    assert main(["generate", str(onnx_dir), "--onnx", "--compile"]) == 2
    assert "drop them with --onnx" in capsys.readouterr().err
    assert main(["generate", str(out), "--compile", "--no-lower"]) == 2
    assert "drop --no-lower" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="compile=True needs lower=True"):
        load(out, lower=False, compile=True)


def test_cli_chat_answers_a_message_put_in_the_models_chat_template(checkpoint, tmp_path, capsys):
    """--chat: the prompt becomes a user message in the checkpoint's template, tokenized without a
    second BOS; the reply alone is printed, and it is transformers' greedy reply to the same ids."""
    chat = tmp_path / "chat"
    shutil.copytree(checkpoint, chat)
    (chat / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"})
    )
    vocabulary = Tokenizer.from_file(str(chat / "tokenizer.json"))  # adds a BOS, as Mixtral's does
    bos = ("<bos>", vocabulary.token_to_id("<bos>"))
    vocabulary.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[bos])
    vocabulary.save(str(chat / "tokenizer.json"))
    (chat / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat)
    rendered = "<bos><system>Be brief.\n<user>Hello there\n<assistant>"  # the template, by hand
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id  # by default: not in a chat
    model = transformers.AutoModelForCausalLM.from_pretrained(chat).eval()
    reply = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
    argv = ["generate", str(chat), "--chat", "--prompt", "Hello there", "--max-new-tokens", "6"]
    assert main([*argv, "--system", "Be brief."]) == 0
    printed = capsys.readouterr()
    assert printed.out == tokenizer.decode(reply, skip_special_tokens=True) and printed.out.strip()
    assert f"prompt {len(ids)} tokens" in printed.err

    (chat / "chat_template.jinja").write_text(
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    )
    assert main([*argv, "--system", "Be brief."]) == 2
    assert "the model's chat template refused the messages: System role not supported" in (
        capsys.readouterr().err
    )
    (chat / "chat_template.jinja").unlink()
    assert main(argv) == 2
    assert f"{chat} has no chat template (chat_template.jinja, or chat_template in" in capsys.readouterr().err
    assert main(["generate", str(chat), "--system", "Be brief."]) == 2
    assert "--system is the chat's system message: add --chat" in capsys.readouterr().err


def test_cli_compress_format_hf_refuses_a_recipe_by_its_pass_options_before_any_work(tmp_path, capsys):
    """Whether a pass leaves what a transformers checkpoint cannot hold can depend on its options
    (expert_drop: global selection leaves uneven expert counts, preserve_gate keeps the dropped
    experts' router rows): such a recipe is refused before the model is even read."""
    for options, leaves in [
        ("{keep: 4, preserve_gate: true}", "routers that keep rows for dropped experts"),
        ("{keep: 4, selection: global}", "MoE layers with different expert counts"),
    ]:
        (tmp_path / "r.yaml").write_text(  # an analysis pass first: it leaves nothing
            f"name: r\npasses:\n  - expert_importance: {{}}\n  - expert_drop: {options}\n"
        )
        recipe = ["--recipe", str(tmp_path / "r.yaml"), "--format", "hf"]
        assert main(["compress", "--model", str(tmp_path / "no-model"), *recipe]) == 2
        error = capsys.readouterr().err
        assert f"--format hf: pass expert_drop of recipe r leaves {leaves}" in error
        assert "use --format moepass" in error


def test_cli_compress_without_evaluation_reports_the_size(checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "rtn.yaml").write_text("name: rtn\npasses:\n  - rtn: {group_size: 16}\n")
    monkeypatch.chdir(tmp_path)  # the default output: out/<model directory name>-<recipe>
    judged = []  # once: a quantization pass's judgement reads every targeted weight
    judge = QuantizationPass.refuse_early
    monkeypatch.setattr(QuantizationPass, "refuse_early", lambda self, p: judged.append(judge(self, p)))
    argv = ["compress", "--model", str(checkpoint), "--recipe", "rtn.yaml", "--eval-per-source", "0"]
    assert main([*argv, "--calib", "unread.jsonl"]) == 0
    assert len(judged) == 1
    printed, err = capsys.readouterr()
    assert "note: --calib is unused: recipe rtn reads no calibration data" in err
    assert "parameters" in printed and "weight bytes" in printed and "perplexity" not in printed
    assert (tmp_path / "out" / f"{checkpoint.name}-rtn" / "manifest.json").is_file()
    monkeypatch.chdir(checkpoint)  # `--model .`: the report is titled by the directory's name
    out = tmp_path / "here"
    here = ["compress", "--model", ".", "--recipe", str(tmp_path / "rtn.yaml"), "--out", str(out)]
    assert main([*here, "--eval-per-source", "0"]) == 0
    assert f"# Compression report: {checkpoint.name}, recipe `rtn`" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["model"] == "."  # as given


def test_cli_compress_refuses_a_recipe_the_model_cannot_take_before_evaluating(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """Counts and formats that no earlier pass could make possible fail right after capture, not after
    minutes of evaluation and calibration."""

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated or calibrated before refusing")

    monkeypatch.setattr(sys.modules["moepass.evaluate"], "evaluate", no_work)  # (moepass.evaluate is
    monkeypatch.setattr(sys.modules["moepass.compress"], "_calibration_tokens", no_work)  # a function)
    for passes, message in [
        (
            "  - rtn: {}\n  - layer_drop: {count: 10}",
            "pass layer_drop (count=10): layer_drop: dropping 10 of",
        ),
        ("  - awq: {group_size: 48}", "group size 48 does not divide its 64 inputs"),
    ]:
        (tmp_path / "big.yaml").write_text(f"passes:\n{passes}\n")
        argv = ["compress", "--model", str(checkpoint), "--recipe", str(tmp_path / "big.yaml")]
        assert main([*argv, "--out", str(tmp_path / "never")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_compress_rejects_a_bad_recipe_before_any_work(checkpoint, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("passes:\n  - layer_drop: {count: 1, depth: 3}\n")
    out = tmp_path / "never"
    assert (
        main(
            [
                "compress",
                "--model",
                str(checkpoint),
                "--recipe",
                str(tmp_path / "bad.yaml"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "layer_drop.depth: unknown option" in capsys.readouterr().err
    assert not out.exists()
    # --force would replace the model itself, also when a symbolic link names one or the other
    link = tmp_path / "link"
    link.symlink_to(checkpoint)
    for model, target in ((checkpoint, checkpoint), (link, checkpoint), (checkpoint, link)):
        for argv in (
            ["compress", "--model", str(model), "--out", str(target), "--force"],
            ["export-onnx", str(model), str(target), "--force"],
        ):
            assert main(argv) == 2
            assert f"is or holds the model {model}" in capsys.readouterr().err
    assert (checkpoint / "config.json").is_file()
    assert main(["compress", "--model", str(checkpoint), "--out", ""]) == 2  # an unset shell variable
    assert "--out is empty" in capsys.readouterr().err
    # data that cannot be read: refused before the model is even read
    (tmp_path / "elsewhere.yaml").write_text(
        "name: elsewhere\ncalibration: {data: /no/such/calibration.jsonl}\npasses:\n  - awq: {}\n"
    )
    for flags, message in [
        (["--calib", "builtin:validaton"], "--calib: unknown built-in data 'builtin:validaton'"),
        (["--calib", ""], "--calib: the data path is empty"),  # not the recipe's data
        (
            ["--eval-data", "/no/such/test.jsonl"],
            "--eval-data: data path '/no/such/test.jsonl' does not exist",
        ),
        (
            ["--recipe", str(tmp_path / "elsewhere.yaml")],
            "recipe elsewhere: calibration.data: data path '/no/such/calibration.jsonl' does not exist",
        ),
    ]:
        assert main(["compress", "--model", str(tmp_path / "no-model"), *flags]) == 2
        assert message in capsys.readouterr().err
    # a transformers checkpoint cannot hold quantized weights: refused before the model is even read
    argv = ["compress", "--model", str(tmp_path / "no-model"), "--recipe", "int4-gptq", "--format", "hf"]
    assert main(argv) == 2
    assert "--format hf: pass gptq of recipe int4-gptq leaves quantized weights" in capsys.readouterr().err


def test_cli_compress_names_the_data_at_fault_and_writes_before_printing(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """Two data sources: an error reading one names its flag. A model given as a file is refused as
    a model, not read as a tokenizer. The result is written before the tables are printed, so a
    pager closing the pipe early (a BrokenPipeError) does not lose it."""
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "drop.yaml").write_text("passes:\n  - layer_drop: {count: 1}\n")
    argv = ["compress", "--model", str(checkpoint), "--recipe", str(tmp_path / "drop.yaml")]
    assert main([*argv, "--calib", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "a")]) == 2
    assert "error: --calib: the data holds no text" in capsys.readouterr().err
    (tmp_path / "none.txt").touch()  # no bytes at all: told before the model is read
    assert main([*argv, "--calib", str(tmp_path / "none.txt"), "--out", str(tmp_path / "a")]) == 2
    assert re.search(r"error: --calib: data file '.*none\.txt' is empty", capsys.readouterr().err)
    with monkeypatch.context() as patch:  # read before the passes: a bad file must not cost their work
        patch.setattr(sys.modules["moepass.compress"], "compress", lambda *_, **__: pytest.fail("compressed"))
        assert main([*argv, "--eval-data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "b")]) == 2
    assert "error: --eval-data: the data holds no text" in capsys.readouterr().err
    for command in (["compress", "--model"], ["generate"], ["eval"]):
        assert main([*command, str(tmp_path / "empty.txt")]) == 2
        assert "empty.txt is a file; name a checkpoint directory" in capsys.readouterr().err

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            pass

        def fileno(self):
            return sys.__stdout__.fileno()

    (tmp_path / "rtn.yaml").write_text("passes:\n  - rtn: {group_size: 16}\n")
    out = tmp_path / "piped"
    quantize = ["--recipe", str(tmp_path / "rtn.yaml"), "--eval-per-source", "0", "--out", str(out)]
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(os, "dup2", lambda *args: None)  # main silences the real stdout: not here
    assert main(["compress", "--model", str(checkpoint), *quantize]) == 1
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()


def test_cli_analysis_only_recipe_prints_its_tables_and_copies_no_model(checkpoint, tmp_path, capsys):
    """A recipe of analyses changes nothing: its output is the report (printed and written), without a
    second evaluation of the same model or a copy of its weights (as large as the model)."""
    (tmp_path / "look.yaml").write_text(
        "calibration: {samples: 4, seq_len: 64}\npasses:\n  - expert_importance: {}\n"
    )
    out = tmp_path / "out"
    argv = [
        "compress",
        "--model",
        str(checkpoint),
        "--recipe",
        str(tmp_path / "look.yaml"),
        "--out",
        str(out),
    ]
    argv += ["--eval-per-source", "1", "--eval-seq-len", "64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "the model unchanged: no copy" in printed and "model.safetensors" not in printed
    report = json.loads((out / "report.json").read_text())
    importance = next(iter(report["passes"]["analyses"].values()))
    assert report["before"] == report["after"] and importance
    assert not (out / "model.safetensors").exists() and (out / "report.md").is_file()
    assert main([*argv, "--force"]) == 0  # its report marks it as an earlier output
