"""Passes: named analyses and transforms, each with a typed config, found through a registry.

An analysis computes a result from a program (and calibration data) and changes nothing. A
transform rewrites the program and declares which analyses stay valid afterwards; the pass manager
verifies the program after every transform. Configs are dataclasses: recipes are validated against
their fields (names, types, ranges) before anything runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from moepass.calibration import Observer, run_calibration
from moepass.errors import MoepassError


class ConfigError(MoepassError):
    """A pass config or recipe entry is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses add typed fields and override `check()` for ranges."""

    def check(self) -> None:
        """Raise ConfigError for out-of-range values (types are checked by `from_dict`)."""

    def describe(self) -> str:
        """The options that differ from their defaults, e.g. "ratio=0.25, selection='global'"."""
        default = (
            type(self)()
            if all(f.default is not dataclasses.MISSING for f in dataclasses.fields(self))
            else None
        )
        return ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if default is None or getattr(self, f.name) != getattr(default, f.name)
        )


@dataclass
class TransformResult:
    modified: bool
    summary: dict = field(default_factory=dict)


STAGES = ("compress", "store", "lower")  # pipelines run stages in this order


class Pass:
    name: ClassVar[str]
    kind: ClassVar[str]  # "analysis" or "transform"
    config_class: ClassVar[type[PassConfig]]
    # "store": storage formats after all compression (2:4); "lower": a device's kernels (`moepass.lower`)
    stage: ClassVar[str] = "compress"
    # what this pass leaves that no stock transformers checkpoint can hold (None: nothing; analyses)
    not_in_hf_checkpoints: ClassVar[str | None] = None

    def __init__(self, config: PassConfig | None = None):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(
                f"pass {self.name!r} takes a {self.config_class.__name__}, got {type(self.config).__name__}"
            )
        self.config.check()

    def leaves_not_in_hf_checkpoints(self) -> str | None:
        """What this pass, as configured, leaves that no transformers checkpoint holds (None: nothing),
        known before it runs so that a refused output costs no compression time."""
        return self.not_in_hf_checkpoints


class AnalysisObserver(Observer, Protocol):
    def result(self) -> Any:
        """The analysis' result, once the calibration run is over."""


class AnalysisPass(Pass):
    kind = "analysis"

    def observer(self, program, context) -> AnalysisObserver:
        """What this analysis watches of a calibration run (`moepass.calibration.Observer`), and its
        result from that. Analyses watch runs rather than start them so that several share one
        forward pass over the calibration data (`run_analyses`)."""
        raise NotImplementedError

    def run(self, program, context):
        """Return a result object with `table()`, `to_dict()` and optionally `plot(path)`."""
        (result,) = run_analyses([self], program, context)
        return result


def shares_calibration(analysis: AnalysisPass) -> bool:
    """Whether `analysis` can watch a shared calibration run (it defines `observer`; one that
    overrides only `run` calibrates on its own)."""
    return type(analysis).observer is not AnalysisPass.observer


def run_analyses(analyses: list[AnalysisPass], program, context) -> list:
    """The analyses' results from one calibration run: each observes the same forward passes."""
    observers = [a.observer(program, context) for a in analyses]
    run_calibration(
        program,
        context.calibration,
        observers,
        mode=context.calibration_mode,
        batch_size=context.batch_size,
    )
    return [o.result() for o in observers]


class TransformPass(Pass):
    kind = "transform"
    preserves: ClassVar[frozenset[str]] = frozenset()  # analyses still valid after this pass
    needs_calibration: ClassVar[bool] = False  # reads calibration data itself (GPTQ, AWQ, Wanda...)
    # removes blocks, MoE layers or experts: what later passes find is no longer the input's
    # structure, so their `refuse_early` cannot judge the input (a layer it objects to may be gone)
    removes_structure: ClassVar[bool] = False

    def required_analyses(self) -> list[tuple[str, PassConfig]]:
        """Analyses this transform will ask for, so a one-shot run can compute them up front."""
        return []

    def refuse_early(self, program) -> None:
        """Raise ConfigError if this pass cannot apply to `program` as the earlier passes leave it,
        before minutes of calibration and evaluation. Called only while no earlier pass removes
        structure (`removes_structure`): then the program's blocks, experts and weight shapes are
        what this pass will see."""

    def run(self, program, context) -> TransformResult:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def out_of_stage_order(passes: list[Pass]) -> tuple[int, str] | None:
    """(index, why) of the first pass that runs before a stage it belongs after, or None."""
    for index, (before, after) in enumerate(itertools.pairwise(passes), start=1):
        if STAGES.index(before.stage) > STAGES.index(after.stage):
            return index, (
                f"pass {after.name} (stage {after.stage}) cannot follow {before.name} "
                f"(stage {before.stage}); stages run in the order {', '.join(STAGES)}"
            )
    return None


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASSES:
        raise ValueError(f"pass {cls.name!r} is registered twice")
    PASSES[cls.name] = cls
    return cls


def create_pass(name: str, config: PassConfig | dict | None = None, where: str = "") -> Pass:
    if name not in PASSES:
        at = f"{where.rstrip('.')}: " if where else ""
        raise ConfigError(f"{at}unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    cls = PASSES[name]
    if not isinstance(config, PassConfig):
        config = config_from_dict(cls.config_class, {} if config is None else config, where=f"{where}{name}.")
    return cls(config)


def config_from_dict(cls: type[PassConfig], data: dict, where: str = "") -> PassConfig:
    """Build a config from a recipe mapping, rejecting unknown keys, wrong types and bad ranges."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.')}: expected a mapping of options, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown option; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}{name}") for name, value in data.items()}
    config = cls(**values)
    try:
        config.check()
    except ConfigError as error:  # name the recipe entry, as the key and type errors above do
        # "x.yaml: passes[0].awq." -> "awq", "my.recipe.yaml: calibration." -> "calibration"
        scope = where.rstrip(".").rpartition(": ")[2].rpartition(".")[2]
        message = str(error)
        for separator in (".", ": "):
            if scope and message.startswith(scope + separator):
                message = message[len(scope) + len(separator) :]
                if separator == ": ":
                    raise ConfigError(f"{where.rstrip('.')}: {message}") from None
        raise ConfigError(f"{where}{message}") from None
    return config


def _coerce(value: Any, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
            quote = (
                f' (quote it: "{args[1]}")'
                if isinstance(value, int) and any(":" in str(a) for a in args)
                else ""
            )
            raise ConfigError(
                f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}{quote}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not fit {_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        note = ""
        if hint is float and isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-2 as text
            note = f" (YAML reads {value} as text; write it with a decimal point, such as {float(value)!r})"
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}{note}")
    return value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _name(hint) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_range(
    where: str, value, low=None, high=None, *, inclusive_low: bool = True, inclusive_high: bool = True
) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if low is not None and (value < low if inclusive_low else value <= low):
        raise ConfigError(
            f"{where}: {value!r} is out of range; must be {'>=' if inclusive_low else '>'} {low}"
        )
    if high is not None and (value > high if inclusive_high else value >= high):
        raise ConfigError(
            f"{where}: {value!r} is out of range; must be {'<=' if inclusive_high else '<'} {high}"
        )
