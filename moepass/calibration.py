"""Run a program over calibration data and hand analyses the activations they ask for.

An observer names graph nodes (`nodes()`) and receives their values batch by batch (`observe`).
Two schedules over the same stages (`moepass.ir.stages`):
  whole       for each batch, every stage — fast, fine for small models;
  sequential  for each stage, every batch — only one block's activations for the whole calibration
              set are alive at a time (the paper's layer-by-layer run), so a model whose activations
              would not fit at once still calibrates.
Both give identical observations. Non-finite activations stop the run, naming the block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from moepass.data import TokenSet
from moepass.errors import MoepassError
from moepass.ir import MoEProgram
from moepass.ir.stages import Stage, split_stages

logger = logging.getLogger("moepass")
MODES = ("whole", "sequential")


class CalibrationError(MoepassError):
    """Calibration could not produce usable statistics (bad data, non-finite activations)."""


class Observer(Protocol):
    def nodes(self) -> set[str]:
        """Names of graph nodes whose values this observer needs."""

    def observe(self, batch: int, values: Mapping[str, Tensor]) -> None:
        """Values of (some of) the requested nodes for calibration batch `batch`."""


def run_calibration(
    program: MoEProgram,
    data: TokenSet,
    observers: Iterable[Observer],
    *,
    mode: str = "whole",
    batch_size: int = 8,
) -> None:
    if mode not in MODES:
        raise CalibrationError(f"unknown calibration mode {mode!r}; choose one of {MODES}")
    if len(data) == 0:
        raise CalibrationError("the calibration set is empty")
    observers = list(observers)
    wanted = set().union(*(o.nodes() for o in observers)) if observers else set()
    stages = split_stages(program.graph_module, observe=wanted)
    batches = [slice(b, min(b + batch_size, len(data))) for b in range(0, len(data), batch_size)]
    last_use = _last_use(stages)
    states = [_graph_inputs(program, data.input_ids[rows]) for rows in batches]
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "whole":
            stride = max(1, len(batches) // 4)
            for b, state in enumerate(states):
                for s, stage in enumerate(stages):
                    _run(stage, s, state, b, observers, wanted, last_use)
                states[b] = None  # free this batch before the next
                if (b + 1) % stride == 0 or b + 1 == len(batches):
                    seconds = time.perf_counter() - start
                    logger.info("calibration: batch %d/%d (%.1fs)", b + 1, len(batches), seconds)
        else:
            for s, stage in enumerate(stages):
                for b, state in enumerate(states):
                    _run(stage, s, state, b, observers, wanted, last_use)
                logger.info("calibration %s done (%.1fs)", stage.name, time.perf_counter() - start)


def _graph_inputs(program: MoEProgram, input_ids: Tensor) -> dict[str, Tensor]:
    batch, seq = input_ids.shape
    device = program.device
    input_ids = input_ids.to(device)
    values = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(seq, device=device).expand(batch, -1),
    }
    values.update(zip(program.cache_names, program.empty_cache(batch), strict=True))
    return values


def _last_use(stages: list[Stage]) -> dict[str, int]:
    last: dict[str, int] = {}
    for s, stage in enumerate(stages):
        for name in stage.inputs:
            last[name] = s
    return last


def _run(stage: Stage, index: int, state: dict, batch: int, observers, wanted: set[str], last_use) -> None:
    outputs = stage.module(*[state[name] for name in stage.inputs])
    produced = dict(zip(stage.outputs, outputs, strict=True))
    if stage.block is not None:
        for name, value in produced.items():
            if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CalibrationError(
                    f"non-finite activations in block {stage.block} (node {name}) on "
                    f"calibration batch {batch}; check the model weights and the data"
                )
    seen = {k: v for k, v in produced.items() if k in wanted}
    if seen:
        for observer in observers:
            mine = {k: v for k, v in seen.items() if k in observer.nodes()}
            if mine:
                observer.observe(batch, mine)
    state.update({k: v for k, v in produced.items() if last_use.get(k, -1) > index})
    for name in [n for n in state if last_use.get(n, -1) <= index]:
        del state[name]
