"""`moepass inspect` on built-in models and local checkpoints; errors exit with status 2."""

from __future__ import annotations

import pytest

from helpers import model_for
from moepass.cli import main


def test_inspect_builtin(capsys):
    assert main(["inspect", "builtin:random-qwen2-moe"]) == 0
    out = capsys.readouterr().out
    assert "verifier: ok" in out and "Qwen2MoeForCausalLM" in out
    assert "MoE E=8 top-2 softmax_topk +shared (sigmoid-gated)" in out


def test_inspect_local_checkpoint(tmp_path, capsys, seed):
    model_for("olmoe", seed=seed).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "OlmoeForCausalLM" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,message",
    [
        ("builtin:random-llama", "unknown built-in model"),
        ("/no/such/dir", "neither a built-in model"),
    ],
)
def test_inspect_bad_model(name, message, capsys):
    assert main(["inspect", name]) == 2
    assert message in capsys.readouterr().err
