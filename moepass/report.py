"""The compression report: before/after quality and size, structure, passes, analyses and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moepass.evaluate import EvalResult, model_size
from moepass.ir import MoEProgram
from moepass.json_document import json_document
from moepass.multiple_choice import ChoiceResult
from moepass.table import format_table, human_bytes, human_count
from moepass.zoo import model_name


@dataclass
class CompressionReport:
    model: str
    recipe: dict
    before: EvalResult | None
    after: EvalResult | None
    program: MoEProgram
    original_blocks: int
    original_experts: dict[int, int]
    original_size: tuple[int, int]  # (parameters, weight bytes) before compression
    plots: dict[str, str] = field(default_factory=dict)  # analysis -> png file name
    data: dict[str, str] = field(default_factory=dict)  # "calibration"/"evaluation" -> what was read
    choices: tuple[ChoiceResult, ChoiceResult] | None = None  # multiple choice, before and after

    @property
    def title(self) -> str:
        """The model as titles name it: as given, but `.` or `..` by the directory they stand for."""
        return self.model if Path(self.model).name not in ("", "..") else model_name(self.model)

    def summary_table(self) -> str:
        params, nbytes = model_size(self.program)
        params_before, bytes_before = self.original_size
        rows = [
            ["parameters", human_count(params_before), human_count(params), _ratio(params, params_before)],
            ["weight bytes", human_bytes(bytes_before), human_bytes(nbytes), _ratio(nbytes, bytes_before)],
        ]
        if self.before is not None and self.after is not None:
            for name in [*sorted(self.before.domains), "overall"]:
                b = self.before.overall if name == "overall" else self.before.domains[name]
                a = self.after.overall if name == "overall" else self.after.domains[name]
                rows.append(
                    [
                        f"perplexity {name}",
                        f"{b.perplexity:.3f}",
                        f"{a.perplexity:.3f}",
                        f"{100 * (a.perplexity / b.perplexity - 1):+.2f}%",
                    ]
                )
            b, a = self.before.overall.accuracy, self.after.overall.accuracy
            kept = f"{100 * a / b:.1f}% kept" if b else ""
            rows.append(["next-token accuracy", f"{100 * b:.2f}%", f"{100 * a:.2f}%", kept])
        if self.choices is not None:
            before, after = (result.overall for result in self.choices)
            for name, metric in (("acc", "accuracy"), ("acc_norm", "accuracy_norm")):
                b, a = getattr(before, metric), getattr(after, metric)
                rows.append([f"multiple choice {name}", f"{100 * b:.2f}%", f"{100 * a:.2f}%", _points(a, b)])
        return format_table(
            ["", "before", "after", "change"], rows, title=f"{self.title}: {self.recipe['name']}"
        )

    def structure_table(self) -> str:
        structure = self.program.structure
        present = {b.index: b for b in structure.blocks}
        rows = []
        for index in range(self.original_blocks):
            block = present.get(index)
            if block is None:
                rows.append([index, "dropped", "-", "-"])
            elif block.mlp is None:
                rows.append([index, "kept", "MoE sub-layer dropped", "-"])
            elif block.is_moe:
                rows.append(
                    [
                        index,
                        "kept",
                        f"{block.mlp.num_experts} of {self.original_experts[index]} experts",
                        f"top-{block.mlp.top_k}",
                    ]
                )
            else:
                rows.append([index, "kept", "dense MLP", "-"])
        return format_table(
            ["block", "block kept", "mlp", "routing"], rows, title="Structure after compression"
        )

    def choices_table(self) -> str:
        """acc_norm (the paper's metric) before and after, per task and overall."""
        before, after = self.choices
        pairs = {name: (score, after.tasks[name]) for name, score in before.tasks.items()}
        if len(pairs) > 1:
            pairs["overall"] = (before.overall, after.overall)
        rows = [
            [
                name,
                b.questions,
                *(f"{100 * s.accuracy_norm:.2f}%" for s in (b, a)),
                _points(a.accuracy_norm, b.accuracy_norm),
            ]
            for name, (b, a) in pairs.items()
        ]
        header = ["task", "questions", "acc_norm before", "after", "change"]
        return format_table(header, rows, title="Multiple choice")

    def to_dict(self) -> dict:
        choices = [] if self.choices is None else [result.to_dict()["tasks"] for result in self.choices]
        return {
            "format": "moepass-report",  # marks the directory as moepass's output (atomic_write)
            "model": self.model,
            "recipe": self.recipe,
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "edits": self.program.info.edits,
            "passes": self.program.report.to_dict() if self.program.report else {},
            "plots": self.plots,
            "data": self.data,
            "choices": None if self.choices is None else dict(zip(("before", "after"), choices, strict=True)),
        }

    def data_lines(self) -> list[str]:
        """What the passes were calibrated on and the quality measured on: results depend on both."""
        return [f"{use.capitalize()}: {what}." for use, what in self.data.items()]

    def markdown(self) -> str:
        report = self.program.report
        parts = [
            f"# Compression report: {self.title}, recipe `{self.recipe['name']}`",
            "",
            self.recipe.get("description", ""),
            "",
            *([*self.data_lines(), ""] if self.data else []),
            "```",
            self.summary_table(),
            "```",
            "",
            "```",
            self.structure_table(),
            "```",
            "",
        ]
        if self.choices is not None:
            parts += ["```", self.choices_table(), "```", ""]
        if report is not None:
            parts += ["```", str(report), "```", ""]
            for name, table in report.coverage_tables():
                parts += [f"## {name}: what was compressed when it finished", "", "```", table, "```", ""]
            for name, result in report.analyses.items():
                parts += [f"## {name}", "", "```", result.table(), "```", ""]
                if name in self.plots:
                    parts += [f"![{name}](plots/{self.plots[name]})", ""]
        return "\n".join(parts)

    def write(self, directory: Path) -> None:
        """Write report.md, report.json and plots/*.png into `directory`."""
        dropped = [e["block"] for e in self.program.info.edits if e["op"] == "drop_mlp"]
        report = self.program.report
        for i, (name, result) in enumerate((report.analyses if report else {}).items()):
            if hasattr(result, "plot"):
                file = f"{i}-{name.split('(')[0]}.png"
                kwargs = {"dropped": dropped} if name.startswith("moe_similarity") else {}
                result.plot(str(directory / "plots" / file), **kwargs)
                self.plots[name] = file
        (directory / "report.md").write_text(self.markdown() + "\n", encoding="utf-8")
        (directory / "report.json").write_text(json_document(self.to_dict()), encoding="utf-8")


def _ratio(after: float, before: float) -> str:
    return f"{100 * (after / before - 1):+.1f}%" if before else ""


def _points(after: float, before: float) -> str:
    return f"{100 * (after - before):+.2f} pts"
