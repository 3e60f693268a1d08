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
from moepass.ir.stages import Stage, observing_stage, split_stages

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
        _check_finite(stage.block, produced, batch)
    seen = {k: v for k, v in produced.items() if k in wanted}
    if seen:
        for observer in observers:
            mine = {k: v for k, v in seen.items() if k in observer.nodes()}
            if mine:
                observer.observe(batch, mine)
    state.update({k: v for k, v in produced.items() if last_use.get(k, -1) > index})
    for name in [n for n in state if last_use.get(n, -1) <= index]:
        del state[name]


class InputStats:
    """What calibrated slimming needs about a projection's inputs: per-channel sums of squares (Wanda)
    and 2 XᵀX (GPTQ and SparseGPT's Hessian). Each batch's sums are formed in float32, as GPTQ's
    reference does (float64 matmuls run at half speed on CPUs and 1/64 on consumer GPUs), and
    accumulated in float64 so that many batches add up without loss."""

    def __init__(self, size: int, device: torch.device | str, *, squares: bool = True, hessian: bool = True):
        self.squares = torch.zeros(size, dtype=torch.float64, device=device) if squares else None
        self.hessian = torch.zeros(size, size, dtype=torch.float64, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.squares is not None:
            self.squares += (x * x).sum(0)
        if self.hessian is not None:
            self.hessian += 2 * (x.T @ x)
        self.tokens += x.shape[0]

    def mean_squares(self) -> Tensor:
        return self.squares / max(self.tokens, 1)

    def mean_hessian(self) -> Tensor:
        return self.hessian / max(self.tokens, 1)


class BlockwiseRunner:
    """Walks a calibration set through a program one block at a time, keeping only the values at
    the current block boundary (per batch). Blocks can be observed any number of times and edited
    between observations: each call re-splits the (possibly rewritten) graph. Used by the slimming
    passes: GPTQ/AWQ/Wanda/SparseGPT collect statistics for block i, compress it, then move on."""

    def __init__(self, program: MoEProgram, data: TokenSet, batch_size: int = 8, label: str = "calibrate"):
        if len(data) == 0:
            raise CalibrationError("the calibration set is empty")
        self.program, self.label = program, label
        self._committed, self._start = 0, time.perf_counter()
        batches = [slice(b, min(b + batch_size, len(data))) for b in range(0, len(data), batch_size)]
        self.states = [_graph_inputs(program, data.input_ids[rows]) for rows in batches]
        with torch.no_grad():
            (prelude,) = split_stages(program.graph_module, only="prelude")
            for state in self.states:
                state.update(
                    zip(prelude.outputs, prelude.module(*[state[n] for n in prelude.inputs]), strict=True)
                )

    def stage(self, block: int, observe: set[str]) -> Stage:
        """The part of block `block`'s stage that computes `observe`, as the graph is now; bound to the
        weights installed now (a search can swap candidates into `stage.module` without touching the
        program)."""
        return observing_stage(self.program.graph_module, f"block {block}", observe)

    @torch.no_grad()
    def observe(
        self, block: int, nodes: set[str], stage: Stage | None = None, batches: int | None = None
    ) -> Iterable[dict[str, Tensor]]:
        """For each batch (the first `batches`, or all), the values of `nodes` (inside block `block`)
        from its current weights, or from those of a `stage` built earlier."""
        for produced in self._run(stage if stage is not None else self.stage(block, nodes), batches):
            yield {name: produced[name] for name in nodes}

    @torch.no_grad()
    def outputs(self, block: int) -> list[dict[str, Tensor]]:
        """Everything block `block` hands to later stages, per batch (to commit now or later)."""
        (stage,) = split_stages(self.program.graph_module, only=f"block {block}")
        return list(self._run(stage))

    def _run(self, stage: Stage, batches: int | None = None) -> Iterable[dict[str, Tensor]]:
        for batch, state in enumerate(self.states[:batches]):
            produced = dict(zip(stage.outputs, stage.module(*[state[n] for n in stage.inputs]), strict=True))
            _check_finite(stage.block, produced, batch)
            yield produced

    def commit(self, produced: list[dict[str, Tensor]]) -> None:
        """Make a block's outputs the inputs of the next block (and log the progress: a pass over a
        large model spends minutes per block)."""
        for state, values in zip(self.states, produced, strict=True):
            state.update(values)
        self._committed += 1
        logger.info(
            "%s: block %d/%d (%.1fs)",
            self.label,
            self._committed,
            len(self.program.structure.blocks),
            time.perf_counter() - self._start,
        )


def _check_finite(block: int, values: Mapping[str, Tensor], batch: int) -> None:
    for name, value in values.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CalibrationError(
                f"non-finite activations in block {block} (node {name}) on calibration batch "
                f"{batch}; check the model weights and the data"
            )
