"""Runs a pipeline of passes on a program: analyses cached, transforms verified, everything timed.

Scoring:
  one-shot   (default, the paper) every analysis a transform needs is computed on the program as it
             was before the first transform, once, and reused by every later transform.
  iterative  analyses are invalidated after each transform (except those it declares preserved)
             and recomputed on demand, so each transform scores the program it actually edits.
A failing pass raises PassError naming the pass, its config and the passes that already ran.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from moepass.data import TokenSet
from moepass.errors import MoepassError
from moepass.ir.sparse import SPARSE24_OPS
from moepass.passes.base import (
    AnalysisPass,
    Pass,
    PassConfig,
    TransformPass,
    TransformResult,
    create_pass,
    out_of_stage_order,
    run_analyses,
    shares_calibration,
)
from moepass.slimming import coverage, coverage_table
from moepass.table import format_table, human_bytes

SCORING = ("one-shot", "iterative")
# pass summary key -> what its starved experts (too few routed calibration tokens) fell back to
FALLBACKS = {"rtn_fallback_experts": "round-to-nearest", "magnitude_fallback_experts": "magnitude pruning"}
logger = logging.getLogger("moepass")


class PassError(MoepassError):
    """A pass failed; `.cause` holds the original exception."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


@dataclass
class PassRecord:
    name: str
    kind: str
    config: str
    seconds: float
    peak_rss: int
    modified: bool | None = None
    summary: dict = field(default_factory=dict)

    def fallback_notes(self) -> list[str]:
        """A line per kind of fallback this pass made, naming the experts by layer."""
        notes = []
        for key, method in FALLBACKS.items():
            layers = self.summary.get(key) or {}
            if layers:
                where = "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in layers.items())
                notes.append(
                    f"{self.name}: {sum(map(len, layers.values()))} experts got fewer than min_tokens routed "
                    f"calibration tokens and fell back to {method} ({where})"
                )
        return notes


@dataclass
class PassReport:
    records: list[PassRecord] = field(default_factory=list)
    analyses: dict[str, object] = field(default_factory=dict)  # "name(config)" -> result
    # per category, what is compressed in the program all the passes left, against the one they
    # started from: a slimming pass's own table predates the passes after it (a layer drop shrinks it)
    final_coverage: dict[str, dict] | None = None

    def __str__(self) -> str:  # print(report) shows the tables; repr() keeps the fields
        notes = [note for r in self.records for note in r.fallback_notes()]
        if self.final_coverage is not None:
            notes.append(coverage_table(self.final_coverage, "Compression coverage of the result"))
        return "\n\n".join([self.table(), *notes])

    def coverage_tables(self) -> list[tuple[str, str]]:
        """(pass name, what was compressed when it finished) for each slimming pass, in order."""
        return [(r.name, r.summary["coverage_table"]) for r in self.records if "coverage_table" in r.summary]

    def table(self) -> str:
        rows = [
            [
                r.name,
                r.kind,
                r.config or "defaults",
                f"{r.seconds:.2f}",
                human_bytes(r.peak_rss),
                "" if r.modified is None else ("yes" if r.modified else "no"),
            ]
            for r in self.records
        ]
        return format_table(
            ["pass", "kind", "config", "seconds", "peak RSS", "modified"], rows, title="Passes"
        )

    def to_dict(self) -> dict:
        return {
            "passes": [vars(r) for r in self.records],
            "analyses": {k: v.to_dict() for k, v in self.analyses.items() if hasattr(v, "to_dict")},
            "final_coverage": self.final_coverage,
        }


class PassContext:
    """What a pass sees besides the program: calibration data and the analysis cache."""

    def __init__(self, manager: PassManager, program):
        self._manager, self._program = manager, program
        self.calibration: TokenSet | None = manager.calibration
        self.calibration_mode = manager.calibration_mode
        self.batch_size = manager.batch_size

    def analysis(self, name: str, config: PassConfig | None = None):
        return self._manager.analysis(self._program, name, config)

    def invalidate(self) -> None:
        """Forget every cached analysis, one-shot ones included: an `iterative` pass calls this after
        each edit to re-score the program it is editing (later passes then see the edited program)."""
        self._manager.invalidate(keep=frozenset(), force=True)


class PassManager:
    def __init__(
        self,
        passes: list[Pass | tuple[str, PassConfig | dict | None]],
        *,
        calibration: TokenSet | None = None,
        scoring: str = "one-shot",
        calibration_mode: str = "whole",
        batch_size: int = 8,
        verify: bool = True,
    ):
        if scoring not in SCORING:
            raise MoepassError(f"unknown scoring {scoring!r}; choose one of {SCORING}")
        self.passes = [p if isinstance(p, Pass) else create_pass(p[0], p[1]) for p in passes]
        self.calibration, self.scoring = calibration, scoring
        self.calibration_mode, self.batch_size, self.verify = calibration_mode, batch_size, verify
        self._cache: dict[tuple[str, PassConfig], object] = {}
        self._pinned = False
        self.report = PassReport()
        self._done: list[str] = []

    def refuse_early(self, program) -> None:
        """The stage order, then each transform's `refuse_early` up to the first that removes structure:
        a recipe that cannot apply to this model fails now, naming its pass, not after the passes
        before it (or an evaluation) ran. Later passes see another structure and are judged when they
        run."""
        self._check_stages(program)
        for p in self.passes:
            if isinstance(p, TransformPass):
                try:
                    p.refuse_early(program)
                except MoepassError as error:
                    raise PassError(f"pass {_label(p)}: {error}", error) from None
                if p.removes_structure:
                    return

    def run(self, program, *, refused_early: bool = False) -> PassReport:
        """Run the passes on `program`, editing it. `refused_early`: the caller already ran
        `refuse_early` on this program (before reading calibration data, say), so it is not repeated."""
        if not refused_early:
            self.refuse_early(program)
        context = PassContext(self, program)
        before = coverage(program)
        if self.scoring == "one-shot":
            transforms = [p for p in self.passes if isinstance(p, TransformPass)]
            self.analyses(program, [request for t in transforms for request in t.required_analyses()])
            self._pinned = True
        edited = False
        for i, p in enumerate(self.passes):
            if isinstance(p, AnalysisPass):  # after an edit: of the edited program, even when one-shot
                if i == 0 or not isinstance(self.passes[i - 1], AnalysisPass):  # a run of analyses: at once
                    run = list(itertools.takewhile(lambda q: isinstance(q, AnalysisPass), self.passes[i:]))
                    self.analyses(program, [(q.name, q.config) for q in run], fresh=edited)
                continue
            if p.needs_calibration and self.calibration is None:
                raise PassError(
                    f"pass {p.name} needs calibration data, and none was given (pass calibration=...)"
                )
            result = self._timed([p], lambda p=p: _run_batched(p, program, context))
            self.report.records[-1].modified = result.modified
            edited |= result.modified
            self.report.records[-1].summary = result.summary
            for note in self.report.records[-1].fallback_notes():
                logger.warning(note)
            if p.stage == "lower":  # kernel-specific layouts: what saving and compressing refuse
                program.info.lowered = program.device.type
            if self.verify:
                try:
                    program.verify()
                except MoepassError as error:
                    raise PassError(
                        f"pass {_label(p)} left an invalid program, after {self._done_text()}: {error}",
                        error,
                    ) from None
            if not self._pinned:
                self.invalidate(keep=p.preserves)
        if self.report.coverage_tables():
            self.report.final_coverage = coverage(program, before)
        return self.report

    def _check_stages(self, program) -> None:
        """Compression passes run before lowering passes, and never on a lowered program."""
        lowered = getattr(program.info, "lowered", None)
        compressing = [p.name for p in self.passes if p.stage != "lower"]
        if lowered is not None and compressing:
            raise PassError(
                f"this program is lowered for {lowered}; pass {compressing[0]} needs the program before "
                "lowering (compress first, then moepass.lower; moepass.load(dir, lower=False) loads an "
                "artifact unlowered)"
            )
        stored = [p.name for p in self.passes if p.stage == "compress"]
        if stored and any(n.target in SPARSE24_OPS for n in program.graph_module.graph.nodes):
            raise PassError(
                f"this program stores 2:4-compressed weights (sparse24_storage); pass {stored[0]} needs "
                "them uncompressed: run compression passes before sparse24_storage"
            )
        disorder = out_of_stage_order(self.passes)
        if disorder:
            raise PassError(disorder[1])

    def analysis(self, program, name: str, config: PassConfig | None = None, fresh: bool = False):
        """The cached result, or a new one (`fresh`: always new, and not cached, so that one-shot
        transforms keep their scores). Each run is reported: a re-scoring as `name(...) #2`, ..."""
        (result,) = self.analyses(program, [(name, config)], fresh)
        return result

    def analyses(self, program, requests: list[tuple[str, PassConfig | None]], fresh: bool = False) -> list:
        """`analysis` for several at once: those not cached watch one calibration run together
        (`run_analyses`; a forward pass over the calibration data each would cost), reported as
        one pass record."""
        wanted = [create_pass(name, config) for name, config in requests]
        keys = [(a.name, a.config) for a in wanted]
        due = {k: a for k, a in zip(keys, wanted, strict=True) if fresh or k not in self._cache}
        if due and self.calibration is None:
            name = next(iter(due))[0]
            raise PassError(f"pass {name} needs calibration data, and none was given (pass calibration=...)")
        context = PassContext(self, program)
        shared = [a for a in due.values() if shares_calibration(a)]
        computed = {}
        if shared:
            observed = self._timed(shared, lambda: run_analyses(shared, program, context))
            computed.update(zip(shared, observed, strict=True))
        for alone in (a for a in due.values() if not shares_calibration(a)):
            computed[alone] = self._timed([alone], lambda a=alone: a.run(program, context))
        new = {key: computed[analysis] for key, analysis in due.items()}
        for (name, config), result in new.items():
            label = f"{name}({config.describe()})"
            runs = sum(1 for k in self.report.analyses if k.split(" #")[0] == label)
            self.report.analyses[f"{label} #{runs + 1}" if runs else label] = result
            if not fresh:
                self._cache[name, config] = result
        return [new[k] if k in new else self._cache[k] for k in keys]

    def invalidate(self, keep: frozenset[str], force: bool = False) -> None:
        if force or not self._pinned:
            self._cache = {k: v for k, v in self._cache.items() if k[0] in keep}

    def _timed(self, passes: list[Pass], work):
        """`work()`, recorded as one pass record for `passes` (analyses sharing a calibration run)."""
        label = " + ".join(_label(p) for p in passes)
        start = time.perf_counter()
        with _PeakRSS() as peak:
            try:
                result = work()
            except PassError:
                raise
            except Exception as error:
                raise PassError(
                    f"pass {label} failed after {self._done_text()}: {type(error).__name__}: {error}",
                    error,
                ) from None
        name = " + ".join(p.name for p in passes)
        configs = [p.config.describe() for p in passes]
        config = configs[0] if len(passes) == 1 else "; ".join(c or "defaults" for c in configs)
        seconds = time.perf_counter() - start
        self.report.records.append(PassRecord(name, passes[0].kind, config, seconds, peak.value))
        self._done.append(name)
        return result

    def _done_text(self) -> str:
        return f"[{', '.join(self._done)}]" if self._done else "no other pass"


def _label(p: Pass) -> str:
    options = p.config.describe()
    return f"{p.name} ({options})" if options else p.name


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.value, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.value = max(self.value, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.value = max(self.value, _rss())
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_batched(transform: TransformPass, program, context: PassContext) -> TransformResult:
    """The pass inside one `batch_edits` block: the graph's code is generated once, after its last
    edit (inside `_timed`, so a failure there is reported as the pass's)."""
    with program.batch_edits():
        return transform.run(program, context)
