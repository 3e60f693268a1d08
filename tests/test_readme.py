"""The README's Python examples as users copy them: the IR example runs as written and its comments'
claims hold; the compression example (minutes of calibration: run by hand) names only the API that
exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import moepass
import moepass.zoo

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> dict[str, str]:
    """Each ```python block of the README under the heading it follows."""
    examples, heading = {}, None
    for part in re.split(r"(^## [^\n]*$|```python\n.*?```)", README.read_text(), flags=re.S | re.M):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif part.startswith("```python"):
            examples[heading] = part.removeprefix("```python\n").removesuffix("```")
    return examples


def test_the_ir_example_runs_as_written_and_does_what_its_comments_say(seed, capsys):
    scope: dict = {}
    exec(compile(_examples()["Using the IR"], "README.md: Using the IR", "exec"), scope)
    model, input_ids, program = scope["model"], scope["input_ids"], scope["program"]
    with torch.no_grad():
        expected = model(input_ids).logits
    torch.testing.assert_close(scope["logits"], expected, rtol=1e-5, atol=1e-5)  # "(fp32: within 1e-5)"
    greedy = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(scope["tokens"], greedy)  # "equals model.generate"
    assert "MoE E=" in capsys.readouterr().out  # the summary printed its MoE blocks
    gate_up = program.graph_module.get_parameter(program.structure.block(1).mlp.gate_up)
    config = model.config
    assert gate_up.shape == (config.n_routed_experts, 2 * config.moe_intermediate_size, config.hidden_size)


def test_the_compression_example_names_only_existing_api():
    """`moepass.X` and `from moepass.zoo import X` in the example exist (a rename breaks it here)."""
    tree = ast.parse(_examples()["Compressing from Python"])
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _is_name(n.value, "moepass")}
    imported = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert used >= {"compress", "evaluate", "save", "load", "export_onnx", "OnnxProgram"}
    assert [name for name in sorted(used) if not hasattr(moepass, name)] == []
    assert imported == {("moepass.zoo", "load_model"), ("moepass.zoo", "load_tokenizer")}
    assert all(hasattr(moepass.zoo, name) for _, name in imported)


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name
