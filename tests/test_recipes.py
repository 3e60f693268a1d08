"""Recipe and pass-config validation: every mistake is named with the allowed values; bad trimming
requests fail before anything is written."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

import moepass
from helpers import captured
from moepass.data import DataError, TokenSet, corpus_dir
from moepass.pass_manager import PassError
from moepass.passes import ConfigError
from moepass.pruning import CalibratedPruneConfig
from moepass.recipes import builtin_recipes, load_recipe


def _calibration(samples: int = 8, seq_len: int = 16) -> TokenSet:
    ids = torch.randint(3, 128, (samples, seq_len + 1))
    return TokenSet(ids[:, :-1], ids[:, 1:], ["x"] * samples)


def test_builtin_recipes_load_and_include_the_papers():
    names = builtin_recipes()
    assert {"paper-layer-drop", "paper-block-drop", "expert-drop-global-25", "analyze"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.passes and recipe.description
    paper = load_recipe("paper-layer-drop")
    assert [name for name, _ in paper.passes] == ["awq", "layer_drop"]  # slim then trim, as the paper
    assert paper.passes[0][1].bits == 4 and paper.passes[1][1].ratio == 0.25


@pytest.mark.parametrize(
    "recipe,message",
    [
        (
            {"passes": [{"expert_dorp": {}}]},
            "passes\\[0\\]: unknown pass 'expert_dorp'; known passes: .*expert_drop",
        ),
        (
            {"passes": [{"layer_drop": {"count": 1, "metrc": "S_NM"}}]},
            "passes\\[0\\].layer_drop.metrc: unknown option; allowed: count, ratio, metric",
        ),
        ({"passes": [{"layer_drop": {"count": "two"}}]}, "layer_drop.count: expected int, got str 'two'"),
        (
            {"passes": [{"gptq": {"damp": "1e-2"}}]},
            r"gptq.damp: expected float, got str '1e-2' \(YAML reads 1e-2 as text; .* such as 0\.01\)",
        ),
        (
            {"passes": [{"layer_drop": {"ratio": float("nan")}}]},
            r"passes\[0\].layer_drop.ratio: nan is not a finite number",
        ),
        ({"passes": [{"awq": [1, 2]}]}, r"passes\[0\].awq: expected a mapping of options, got list"),
        ({"passes": [{1: {}}]}, r"passes\[0\]: a pass name is a string; got 1"),
        ({"passes": [{"gptq": {1: 2, "x": 3}}]}, r"passes\[0\].gptq.1: unknown option; allowed: bits"),
        # calibration options on passes that read no calibration data: refused, not ignored
        (
            {"passes": [{"rtn": {"min_tokens": 99}}]},
            r"rtn.min_tokens: unknown option; allowed: bits, group_size, symmetric, targets$",
        ),
        ({"passes": [{"magnitude": {"propagation": "pruned"}}]}, r"magnitude.propagation: unknown option"),
        ({1: "a", "foo": "b", "passes": []}, r"1: unknown recipe key; allowed: name"),
        (
            {"passes": [{"rtn": {}}, {"cpu_packed_weights": {}}]},
            r"passes\[1\].cpu_packed_weights: a lowering pass .* moepass.load and moepass.lower run it",
        ),
        (
            {"passes": [{"rtn": {}}, {"sparse24_storage": {}}, {"magnitude": {}}]},
            r"passes\[2\]: pass magnitude \(stage compress\) cannot follow sparse24_storage \(stage store\)",
        ),
        (
            {"passes": [{"layer_drop": {"count": 1, "metric": "cosine"}}]},
            "layer_drop.metric: 'cosine' is not allowed; choose one of 'S_NM', 'S_M', 'random'",
        ),
        (
            {"passes": [{"expert_drop": {"ratio": 1.5}}]},
            "passes\\[0\\].expert_drop.ratio: 1.5 is out of range; must be < 1.0",
        ),
        (
            {"passes": [{"layer_drop": {"ratio": 1.0}}]},
            "passes\\[0\\].layer_drop.ratio: 1.0 is out of range; must be < 1.0",
        ),
        ({"passes": [{"expert_drop": {"keep": 0}}]}, "keep: 0 would drop every expert of a layer"),
        (
            {"passes": [{"expert_drop": {}}]},
            "passes\\[0\\].expert_drop: give exactly one of keep .* or ratio",
        ),
        (
            {"passes": [{"block_drop": {"count": 1, "iterative": True, "method": "consecutive"}}]},
            "only the discrete method re-scores",
        ),
        ({"passes": []}, "needs a non-empty list of passes"),
        ({"passes": [{"layer_drop": {"count": 1}}], "scorng": "iterative"}, "scorng: unknown recipe key"),
        (
            {"passes": [{"layer_drop": {"count": 1}}], "scoring": "greedy"},
            "choose one of one-shot, iterative",
        ),
        (
            {"passes": [{"layer_drop": {"count": 1}}], "calibration": {"samples": -1}},
            "calibration.samples: -1 is out of range",
        ),
        ({"passes": ["layer_drop"]}, "each pass is written as"),
        (
            {"passes": [{"wanda": {"pattern": "2:4", "sparsity": 0.3}}]},
            r"wanda.sparsity: 0.3 does not match pattern 2:4, which zeroes 2 of every 4 weights",
        ),
        (
            {"passes": [{"layer_drop": {"count": 1}}], "calibration": {"data": ""}},
            "calibration.data: empty",
        ),
        (  # the name becomes the default output directory out/<model>-<name>
            {"name": "../../elsewhere", "passes": [{"layer_drop": {"count": 1}}]},
            r"name: '../../elsewhere' is not a recipe name",
        ),
        ({"name": None, "passes": [{"layer_drop": {"count": 1}}]}, "name: None is not a recipe name"),
        ({"passes": [{"rtn": {"targets": []}}]}, r"rtn.targets: empty, so nothing would be quantized"),
        ({"passes": [{"wanda": {"targets": []}}]}, r"wanda.targets: empty, so nothing would be pruned"),
        (
            {"passes": [{"layer_drop": {"count": 1}}], "calibration": []},
            r"calibration: a mapping of options \(data, samples, ...\); got \[\]",
        ),
        (  # YAML 1.1 reads an unquoted 2:4 as 124
            {"passes": [{"sparsegpt": {"pattern": 124}}]},
            r"sparsegpt.pattern: 124 is not allowed; .* \(quote it: \"2:4\"\)",
        ),
        (
            {"passes": [{"rtn": {}}, {"gptq": {"targets": ["attention"]}}]},
            r"passes\[1\]: pass gptq would compress attention after rtn quantized them; prune before",
        ),
        (
            {"passes": [{"awq": {"targets": ["experts"]}}, {"magnitude": {}}]},
            r"passes\[1\]: pass magnitude would compress experts after awq quantized them",
        ),
        (  # Wanda and SparseGPT share it (magnitude's PruneConfig names its pass alone)
            [CalibratedPruneConfig(pattern="2:4")],
            r"passes\[0\]: CalibratedPruneConfig configures (sparsegpt, wanda|wanda, sparsegpt); write",
        ),
    ],
)
def test_recipe_errors_name_the_key(recipe, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe)


def test_yaml_recipe_files(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\npasses:\n  - expert_drop: {keep: 6, selection: global}\n  - layer_drop: {count: 1}\n"
    )
    recipe = load_recipe(path)
    assert [name for name, _ in recipe.passes] == ["expert_drop", "layer_drop"]
    assert recipe.passes[0][1].selection == "global"
    (tmp_path / "bad.yaml").write_text("passes: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:1: not valid YAML \(expected the node content"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_recipe("no-such-recipe")
    (tmp_path / "twice.yaml").write_text("passes:\n  - rtn: {bits: 4, bits: 8}\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml:2:\d+: not valid YAML \(key 'bits' is given twice"):
        load_recipe(tmp_path / "twice.yaml")
    (tmp_path / "latin1.yaml").write_bytes(
        "name: caf\xe9\npasses:\n  - layer_drop: {count: 1}\n".encode("latin-1")
    )
    with pytest.raises(ConfigError, match=r"latin1\.yaml: cannot be read \(not UTF-8 text\)"):
        load_recipe(tmp_path / "latin1.yaml")
    (tmp_path / "merged.yaml").write_text(  # YAML merge keys: shared options, overridden per pass
        "passes:\n  - rtn: &q {bits: 4, group_size: 64, targets: [experts]}\n"
        "  - gptq: {<<: *q, group_size: 32, targets: [attention]}\n"
    )
    merged = load_recipe(tmp_path / "merged.yaml")
    assert merged.name == "merged"  # no name: the file's, in errors and the default output directory
    assert (merged.passes[1][1].bits, merged.passes[1][1].group_size) == (4, 32)
    assert merged.passes[1][1].targets == ("attention",)
    (tmp_path / "few.samples.yaml").write_text("calibration: {samples: 0}\npasses:\n  - awq: {bits: 3}\n")
    with pytest.raises(ConfigError, match=r"^few\.samples\.yaml: calibration\.samples: 0 is out of range"):
        load_recipe(tmp_path / "few.samples.yaml")  # the key named once, whatever dots the file name has
    (tmp_path / "few.samples.yaml").write_text("passes:\n  - awq: {bits: 3}\n")
    with pytest.raises(ConfigError, match=r"^few\.samples\.yaml: passes\[0\]\.awq\.bits: 3 is not allowed"):
        load_recipe(tmp_path / "few.samples.yaml")


@pytest.mark.parametrize(
    "family,passes,message",
    [
        ("mixtral", [("layer_drop", {"count": 3})], "dropping 3 of 3 MoE sub-layers would leave none"),
        ("mixtral", [("block_drop", {"count": 3})], "dropping 3 of 3 blocks would leave none"),
        ("mixtral", [("expert_drop", {"keep": 48})], "48 experts per layer exceeds the 8 experts of block 0"),
        (
            "deepseek_v3",
            [("expert_drop", {"keep": 5})],
            "2 groups of 4; keeping 5 experts cannot keep the groups",
        ),
        (
            "deepseek_v3",
            [("expert_drop", {"keep": 2})],
            r"needs 2 experts in each of its 2 groups \(it scores each group by its best 2\); keep at least",
        ),
        (  # one expert per group is enough to score groups, not to route top_k=2 within topk_group=1
            "deepseek_v2",
            [("expert_drop", {"keep": 2})],
            r"needs 2 experts .* \(it picks top_k=2 experts from its best topk_group=1\); keep at least 4",
        ),
        (  # a ratio gets its ceiling too: 75% of 8 leaves 2, where each of the 2 groups needs 2
            "deepseek_v3",
            [("expert_drop", {"ratio": 0.75})],
            r"keep at least 4 experts per layer \(ratio: at most 0\.5\)",
        ),
        (
            "deepseek_v3",
            [("expert_drop", {"keep": 6, "selection": "global"})],
            "global selection cannot keep",
        ),
        (
            "phimoe",
            [("expert_drop", {"keep": 1})],
            r"always picks 2 experts; keep at least 2 experts per layer \(ratio: at most 0\.75\)",
        ),
        (
            "phimoe",
            [("expert_drop", {"keep": 2, "selection": "global", "score": "random", "seed": 2})],
            r"would drop all but 1 of the 8 experts of block 1 \(its sparsemixer routing always picks 2\)",
        ),
    ],
)
def test_impossible_trimming_is_refused_and_leaves_the_input_alone(family, passes, message):
    model, program = captured(family)
    before = [n.name for n in program.graph_module.graph.nodes]
    with pytest.raises(PassError, match=message) as error:
        moepass.compress(program, passes, calibration=_calibration())
    assert passes[0][0] in str(error.value)  # names the pass
    assert [n.name for n in program.graph_module.graph.nodes] == before and program.info.edits == []


def test_calibration_errors():
    _, program = captured("mixtral")
    empty = TokenSet(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long), [])
    # a recipe the model cannot take is refused before its calibration data is read
    with pytest.raises(moepass.MoepassError, match=r"ratio 0\.25 of 3 MoE sub-layers rounds to 0"):
        moepass.compress(program, "paper-layer-drop", calibration=empty)
    drop_one = [("layer_drop", {"count": 1})]
    with pytest.raises(moepass.MoepassError, match="the data holds no windows"):
        moepass.compress(program, drop_one, calibration=empty)
    with pytest.raises(moepass.MoepassError, match="needs a tokenizer"):
        moepass.compress(program, drop_one)
    ids = torch.randint(0, program.info.vocab_size, (4, 16))
    for tokenizer in (None, Tokenizer.from_file(str(corpus_dir() / "tokenizer.json"))):  # not a record list
        with pytest.raises(
            DataError, match=r"data is an array \(torch.int64 \[4, 16\]\), not text: .*TokenSet"
        ):
            moepass.compress(program, drop_one, calibration=ids, tokenizer=tokenizer)
    tokenizer = Tokenizer.from_file(str(corpus_dir() / "tokenizer.json"))
    with pytest.raises(DataError, match="too short"):
        moepass.compress(program, drop_one, calibration=["a few words"], tokenizer=tokenizer)
