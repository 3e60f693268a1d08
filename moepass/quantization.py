"""What RTN, GPTQ and AWQ share: their config, round-to-nearest, the format checks and the summary.

Every method turns a float weight into (codes, per-group scale, zero) in `moepass.ir.quantized`'s
layout and installs it through `moepass.ir.surgery`, so the graph ends with quantized ops whatever
the method. Routed experts are quantized one expert at a time on the tokens
routed to it (calibrated methods); experts that receive fewer than `min_tokens` calibration tokens
fall back to round-to-nearest and are listed in the pass summary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moepass.ir.quantized import QuantFormat, quantize
from moepass.ir.surgery import linear_nodes, quantize_embedding, quantize_linear
from moepass.passes.base import ConfigError, PassConfig, TransformPass, check_range
from moepass.slimming import (
    CATEGORIES,
    DEFAULT_TARGETS,
    LinearTarget,
    coverage,
    coverage_table,
    embedding_target,
    expert_blocks,
    fallback_experts,
    linear_targets,
)

logger = logging.getLogger("moepass")


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False
    targets: tuple[str, ...] = (
        DEFAULT_TARGETS  # among: experts, shared_experts, attention, dense_mlp, lm_head, embeddings
    )

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"bits: {self.bits} is not allowed; choose one of 4, 8")
        if self.group_size != -1 and self.group_size < 2:
            raise ConfigError(f"group_size: {self.group_size} is out of range; use -1 (per-channel) or >= 2")
        if not self.targets:
            raise ConfigError(
                f"targets: empty, so nothing would be quantized; choose among {', '.join(CATEGORIES)}"
            )
        unknown = [t for t in self.targets if t not in CATEGORIES]
        if unknown:
            raise ConfigError(f"targets: {unknown[0]!r} is not allowed; choose among {', '.join(CATEGORIES)}")

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size, self.symmetric)

    def format_for(self, *weights: Tensor) -> QuantFormat:
        """The format of these weights (one op's), fitted to rows shorter than the group."""
        return self.format.fitted(*(w.shape[-1] for w in weights))


@dataclass(frozen=True)
class CalibratedQuantizeConfig(QuantizeConfig):
    """GPTQ's and AWQ's: RTN reads no calibration data, so it takes no calibration options."""

    min_tokens: int = 16  # experts with fewer calibration tokens fall back to round-to-nearest

    def check(self) -> None:
        super().check()
        check_range("min_tokens", self.min_tokens, 0)


class QuantizationPass(TransformPass):
    """What RTN, GPTQ and AWQ passes share: their refusals before any work."""

    not_in_hf_checkpoints = "quantized weights"

    def refuse_early(self, program) -> None:
        # values too: a NaN weight named now beats "non-finite activations" after an analysis pass;
        # the read is small beside quantizing, and run() checks again for passes run on their own
        quantization_targets(program, self.config)


def quantization_targets(program, config: QuantizeConfig) -> tuple[list[LinearTarget], list[int], str | None]:
    """The linears, MoE blocks (their routed experts) and embedding table `config.targets` select, with
    the format and the values of every one checked before the first rewrite (nothing is left
    half-quantized)."""
    linears = linear_targets(program, config.targets)
    experts = expert_blocks(program, config.targets)
    table = embedding_target(program, config.targets)
    get = program.graph_module.get_parameter
    groups = [[t.weight] for t in linears] + ([[table]] if table else [])
    for index in experts:
        moe = program.structure.block(index).mlp
        groups.append([moe.gate_up, moe.down])
    for names in groups:
        fmt = config.format_for(*(get(name) for name in names))
        op_inputs = math.gcd(*(get(name).shape[-1] for name in names))
        for name in names:
            weight = get(name)
            fmt.groups(weight.shape[-1], name, op_inputs)
            if not torch.isfinite(weight).all():
                raise ConfigError(f"{name} holds NaN or inf values; quantize a finite model")
    return linears, experts, table


def quantize_table(program, config: QuantizeConfig, table: str | None) -> None:
    """The embedding table (opt-in target), round-to-nearest whatever the method: a lookup reads one
    row per token, so it has no input statistics for GPTQ's Hessian or AWQ's scales. Passes call it
    after the LM head, so a table tied to the head shares the head's codes."""
    if table is None:
        return
    weight = program.graph_module.get_parameter(table)
    fmt = config.format_for(weight)
    if linear_nodes(program.graph_module, table):
        logger.warning(
            "the embedding table is tied to the LM head (one tensor, %s), which stays in full precision: "
            "the quantized table is a second copy (add 'lm_head' to targets to share one quantized copy)",
            table,
        )
    quantize_embedding(program, table, fmt, quantize(weight, fmt, table))


def stack(triples: list[tuple]) -> tuple:
    """Per-expert (codes, scales, zeros) -> one stacked triple with a leading expert dimension."""
    codes, scales, zeros = zip(*triples, strict=True)
    return torch.stack(codes), torch.stack(scales), None if zeros[0] is None else torch.stack(zeros)


def summary(program, before: dict, fallbacks: dict[int, list[int]], rtn_linears: list[str] = ()) -> dict:
    table = coverage(program, before)
    return {
        "coverage": {k: {kk: vv for kk, vv in v.items()} for k, v in table.items()},
        "coverage_table": coverage_table(table),
        "rtn_fallback_experts": fallback_experts(program, fallbacks),
        "rtn_linears": list(rtn_linears),
    }


def quantize_head_rtn(program, config: QuantizeConfig, linears: list, method: str) -> list[str]:
    """The LM head (opt-in target) of a calibrated method, round-to-nearest: GPTQ and AWQ calibrate
    block by block and collect no statistics of the final norm's output. Said in a warning and in
    the pass summary (`rtn_linears`), never silently."""
    heads = [t.weight for t in linears if t.block is None]
    for fqn in heads:
        weight = program.graph_module.get_parameter(fqn)
        fmt = config.format_for(weight)
        quantize_linear(program, fqn, fmt, quantize(weight, fmt, fqn))
        logger.warning("%s: %s is quantized round-to-nearest (no calibration statistics for it)", method, fqn)
    return heads
