"""Recipes: a validated list of passes plus how to calibrate and score them.

A recipe is a YAML file, a built-in name (`moepass recipes` lists them), a mapping with the same
keys, or a Python list of pass configs / (name, options) pairs:

    name: my-recipe
    scoring: one-shot            # or iterative
    calibration: {data: builtin:validation, samples: 128, seq_len: 256, mode: whole}
    passes:
      - expert_drop: {keep: 6, selection: global}
      - layer_drop: {count: 1}

Every key is checked before anything runs; errors name the key and the allowed values.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from .pass_manager import SCORING
from .passes import PASSES, ConfigError, PassConfig, create_pass
from .passes.base import Pass, check_range, config_from_dict, out_of_stage_order
from .pruning import PruneConfig
from .quantization import QuantizeConfig

TOP_LEVEL = ("name", "description", "scoring", "calibration", "passes")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CalibrationConfig(PassConfig):
    data: str = "builtin:validation"
    text_key: str = "text"  # the records' text field in JSON data
    samples: int = 128
    seq_len: int | None = None  # None: 256 tokens, or the model's positions if fewer
    seed: int = 0
    mode: Literal["whole", "sequential"] = "whole"
    batch_size: int = 8

    def check(self) -> None:
        check_range("calibration.samples", self.samples, 1)
        if self.seq_len is not None:
            check_range("calibration.seq_len", self.seq_len, 2)
        check_range("calibration.batch_size", self.batch_size, 1)
        if not self.data.strip():  # an unset shell variable; a path "" would read the current directory
            raise ConfigError("calibration.data: empty; give builtin:validation, a file or a directory")


@dataclass
class Recipe:
    name: str
    passes: list[tuple[str, PassConfig]]
    description: str = ""
    scoring: str = "one-shot"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "scoring": self.scoring,
            "calibration": vars(self.calibration),
            "passes": [{name: _plain(vars(config))} for name, config in self.passes],
        }


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("moepass") / "assets" / "recipes"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def load_recipe(spec) -> Recipe:
    """A Recipe from a built-in name, a YAML path, a mapping, or a list of passes."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, (list, tuple)):
        return recipe_from_dict({"name": "custom", "passes": list(spec)})
    if isinstance(spec, dict):
        return recipe_from_dict(spec)
    if isinstance(spec, (str, Path)):
        builtins = builtin_recipes()
        if str(spec) in builtins:
            path = builtins[str(spec)]
        elif Path(spec).is_file():
            path = Path(spec)
        else:
            raise ConfigError(
                f"recipe {str(spec)!r} is neither a built-in ({', '.join(sorted(builtins))}) nor a file"
            )
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except (OSError, UnicodeDecodeError) as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror
            raise ConfigError(f"recipe {path}: cannot be read ({reason})") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{at}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
        if isinstance(data, dict) and "name" not in data and NAME.fullmatch(path.stem):
            data = {"name": path.stem, **data}  # errors and the default output directory name the file
        return recipe_from_dict(data, where=f"{path.name}: ")
    raise ConfigError(f"cannot use a {type(spec).__name__} as a recipe")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key written twice in one mapping is an error (YAML keeps the last,
    silently dropping the first setting)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def recipe_from_dict(data, where: str = "") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}a recipe is a mapping with keys {', '.join(TOP_LEVEL)}")
    unknown = sorted(set(data) - set(TOP_LEVEL), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown recipe key; allowed: {', '.join(TOP_LEVEL)}")
    scoring = data.get("scoring", "one-shot")
    if scoring not in SCORING:
        raise ConfigError(f"{where}scoring: {scoring!r} is not allowed; choose one of {', '.join(SCORING)}")
    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise ConfigError(
            f"{where}calibration: a mapping of options (data, samples, ...); got {calibration!r}"
        )
    calibration = config_from_dict(CalibrationConfig, calibration or {}, f"{where}calibration.")
    entries = data.get("passes")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}passes: a recipe needs a non-empty list of passes")
    passes = [_pass_entry(entry, f"{where}passes[{i}].") for i, entry in enumerate(entries)]
    disorder = out_of_stage_order(passes) or _compressed_twice(passes)
    if disorder:
        raise ConfigError(f"{where}passes[{disorder[0]}]: {disorder[1]}")
    name = data.get("name", "custom")
    if not (isinstance(name, str) and NAME.fullmatch(name)):  # it names the default output directory
        raise ConfigError(f"{where}name: {name!r} is not a recipe name; use letters, digits, '.', '_', '-'")
    return Recipe(
        name,
        [(p.name, p.config) for p in passes],
        str(data.get("description", "")).strip(),
        scoring,
        calibration,
    )


def _compressed_twice(passes: list[Pass]) -> tuple[int, str] | None:
    """(index, why) of the first quantizing or pruning pass given weights an earlier pass quantized:
    it would fail only after the passes before it ran."""
    quantized: dict[str, str] = {}  # target category -> the pass that quantized it
    for index, p in enumerate(passes):
        if not isinstance(p.config, (QuantizeConfig, PruneConfig)):
            continue
        again = [t for t in p.config.targets if t in quantized]
        if again:
            return index, (
                f"pass {p.name} would compress {', '.join(again)} after {quantized[again[0]]} quantized "
                "them; prune before quantizing, quantize once, or leave them out of targets"
            )
        if isinstance(p.config, QuantizeConfig):
            quantized.update(dict.fromkeys(p.config.targets, p.name))
    return None


def _pass_entry(entry, where: str) -> Pass:
    if isinstance(entry, tuple) and len(entry) == 2:
        name, options = entry
    elif isinstance(entry, PassConfig):
        matches = [n for n, cls in PASSES.items() if cls.config_class is type(entry)]
        if len(matches) != 1:
            raise ConfigError(
                f"{where[:-1]}: {type(entry).__name__} "
                + (
                    f"configures {', '.join(matches)}; write (name, config)"
                    if matches
                    else "is not the config of a registered pass"
                )
            )
        name, options = matches[0], entry
    elif isinstance(entry, dict) and len(entry) == 1:
        ((name, options),) = entry.items()
    else:
        raise ConfigError(f"{where[:-1]}: each pass is written as `- pass_name: {{options}}`; got {entry!r}")
    if not isinstance(name, str):
        raise ConfigError(f"{where[:-1]}: a pass name is a string; got {name!r}")
    instance = create_pass(name, options, where=where)
    if instance.stage == "lower":
        raise ConfigError(
            f"{where}{name}: a lowering pass (kernel-specific layouts, which artifacts do not store); "
            "moepass.load and moepass.lower run it, a recipe does not"
        )
    return instance


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
