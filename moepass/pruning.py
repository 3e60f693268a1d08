"""What magnitude, Wanda and SparseGPT pruning share: config, masks, and the block-by-block driver.

Pruned weights stay dense with zeros (the graph keeps its ops, so any later pass can read them) and
are listed in `program.info.pruned`; `sparse24_storage`, run after the last compression pass, stores
2:4 ones compressed (`moepass.ir.sparse`). Statistics are
collected per block on the calibration set: each routed expert sees only the tokens routed to it
(its down projection sees its own gate/up outputs), and an expert with fewer than `min_tokens`
falls back (Wanda and SparseGPT to magnitude). The router is never a target; shared experts only
when asked (the paper finds them less compressible). `propagation`: "dense" feeds each block the
unpruned model's activations (the paper's code), "pruned" the pruned model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from moepass.calibration import BlockwiseRunner, InputStats
from moepass.ir.ops import ACTIVATIONS
from moepass.ir.surgery import set_tensor
from moepass.passes.base import ConfigError, PassConfig, check_range
from moepass.slimming import (
    CATEGORIES,
    QUANTIZATION_ONLY,
    coverage,
    coverage_table,
    expert_blocks,
    expert_groups,
    fallback_experts,
    linear_targets,
    routed_rows,
)

PATTERNS = ("unstructured", "2:4", "4:8")


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    sparsity: float = 0.5  # share of weights zeroed per output row (unstructured)
    pattern: Literal["unstructured", "2:4", "4:8"] = "unstructured"
    targets: tuple[str, ...] = ("experts",)  # add "shared_experts", "attention", "dense_mlp" to widen

    def check(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, inclusive_low=False)
        if self.sparsity >= 1.0:
            raise ConfigError(f"sparsity: {self.sparsity} would remove every weight; must be < 1")
        nm = self.nm()
        if nm and self.sparsity != nm[0] / nm[1]:  # the pattern fixes the share
            raise ConfigError(
                f"sparsity: {self.sparsity} does not match pattern {self.pattern}, which zeroes "
                f"{nm[0]} of every {nm[1]} weights; leave sparsity out"
            )
        allowed = ", ".join(c for c in CATEGORIES if c not in QUANTIZATION_ONLY)
        if not self.targets:
            raise ConfigError(f"targets: empty, so nothing would be pruned; choose among {allowed}")
        unknown = [t for t in self.targets if t not in CATEGORIES or t in QUANTIZATION_ONLY]
        if unknown:
            raise ConfigError(f"targets: {unknown[0]!r} is not allowed; choose among {allowed}")

    def nm(self) -> tuple[int, int] | None:
        """(n zeros, per m) for N:M patterns."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(m) - int(n), int(m)  # 2:4 keeps 2 of 4 -> 2 zeros per 4


@dataclass(frozen=True)
class CalibratedPruneConfig(PruneConfig):
    """Wanda's and SparseGPT's: magnitude pruning reads no calibration data, so it takes no
    calibration options."""

    min_tokens: int = 16  # experts with fewer calibration tokens fall back to magnitude
    propagation: Literal["dense", "pruned"] = "dense"

    def check(self) -> None:
        super().check()
        check_range("min_tokens", self.min_tokens, 0)


def check_groups(cols: int, config: PruneConfig, name: str) -> None:
    """N:M patterns need whole groups of m inputs."""
    m = config.nm()[1]
    if cols % m:
        raise ConfigError(
            f"{name}: {config.pattern} sparsity needs the input dimension to be a multiple of {m}, got {cols}"
        )


def zeros_before(cols: int, sparsity: float) -> int:
    """Weights zeroed among a row's first `cols` inputs (unstructured): the row total for the whole row,
    and a column block's share is the difference at its ends, so blocks add up to the same total."""
    return int(cols * sparsity)


def check_zeroes(cols: int, config: PruneConfig, name: str) -> None:
    """An unstructured ratio must zero at least one weight per row: otherwise the tensor would be
    listed as pruned while left unchanged."""
    if config.nm() is None and zeros_before(cols, config.sparsity) == 0:
        smallest = float(f"{1 / cols:.3g}")  # the least 3-digit ratio that zeroes one
        if zeros_before(cols, smallest) == 0:
            smallest = float(f"{smallest + 10.0 ** (math.floor(math.log10(smallest)) - 2):.3g}")
        raise ConfigError(
            f"{name}: sparsity {config.sparsity} zeroes none of the {cols} weights in a row; "
            f"use at least {smallest:g}"
        )


def mask_lowest_count(score: Tensor, count: int) -> Tensor:
    """Boolean mask of the `count` lowest-scoring weights of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def mask_lowest(score: Tensor, config: PruneConfig, name: str) -> Tensor:
    """Boolean mask of the weights to zero: the lowest-scoring share per row, or per m-group (N:M)."""
    rows, cols = score.shape
    nm = config.nm()
    if nm is None:
        check_zeroes(cols, config, name)
        return mask_lowest_count(score, zeros_before(cols, config.sparsity))
    zeros, m = nm
    check_groups(cols, config, name)
    grouped = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, torch.topk(grouped, zeros, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


# method(weight [N, K], stats or None (no calibration), config, name) -> pruned weight
PruneFn = Callable[[Tensor, InputStats | None, PruneConfig, str], Tensor]


def prune_program(
    program, context, config: PruneConfig, method: PruneFn, needs_hessian: bool, calibrated: bool
) -> dict:
    """Apply `method` to every target; returns the pass summary (coverage, fallbacks)."""
    before = coverage(program)
    linears = linear_targets(program, config.targets)
    experts = expert_blocks(program, config.targets)
    _check_targets(program, config, linears, experts)
    get = program.graph_module.get_parameter
    fallbacks: dict[int, list[int]] = {}
    if not calibrated:
        for target in linears:
            _install(program, target.weight, method(get(target.weight), None, config, target.weight), config)
        for index in experts:
            moe = program.structure.block(index).mlp
            for name in (moe.gate_up, moe.down):
                weights = get(name)
                _install(
                    program,
                    name,
                    torch.stack([method(w, None, config, f"{name}[{e}]") for e, w in enumerate(weights)]),
                    config,
                )
        return _summary(program, before, fallbacks)
    label = method.__name__.removesuffix("_prune")
    runner = BlockwiseRunner(program, context.calibration, context.batch_size, label)
    for block in [b.index for b in program.structure.blocks]:
        dense_outputs = runner.outputs(block) if config.propagation == "dense" else None
        block_linears = [t for t in linears if t.block == block]
        stats = {
            t.input: InputStats(get(t.weight).shape[-1], get(t.weight).device, hessian=needs_hessian)
            for t in block_linears
        }
        moe = program.structure.block(block).mlp if block in experts else None
        # observed, like the linears' inputs, before anything in the block changes
        pruned_experts = _pruned_experts(program, runner, block, moe, method, config, needs_hessian)
        if stats:
            for values in runner.observe(block, set(stats)):
                for name, s in stats.items():
                    s.add(values[name])
        for target in block_linears:
            _install(
                program,
                target.weight,
                method(get(target.weight), stats[target.input], config, target.weight),
                config,
            )
        if pruned_experts is not None:
            weights, fallbacks[block] = pruned_experts
            for name, weight in weights.items():
                _install(program, name, weight, config)
        runner.commit(dense_outputs if dense_outputs is not None else runner.outputs(block))
    return _summary(program, before, fallbacks)


def _pruned_experts(
    program, runner: BlockwiseRunner, block: int, moe, method: PruneFn, config: PruneConfig, hessian: bool
) -> tuple[dict[str, Tensor], list[int]] | None:
    """Every expert's gate/up and down pruned on the statistics of its routed tokens (down inputs
    from the dense gate/up), gathered a group of experts at a time; and the experts that fell back
    to statistics-free pruning. None without routed experts to prune."""
    if moe is None:
        return None
    get = program.graph_module.get_parameter
    node = next(n for n in program.graph_module.graph.nodes if n.name == moe.experts_node)
    hidden, act, alpha, limit = node.args[0].name, ACTIVATIONS[moe.activation], node.args[8], node.args[9]
    gate_up, down = get(moe.gate_up), get(moe.down)
    gate_up_bias = None if moe.gate_up_bias is None else get(moe.gate_up_bias)
    widths = (gate_up.shape[-1], down.shape[-1])
    per_expert = sum(w * w if hessian else w for w in widths) * 8
    pruned: dict[str, list[Tensor]] = {moe.gate_up: [], moe.down: []}
    fallbacks = []
    for experts in expert_groups(moe.num_experts, per_expert, f"layer {block} experts"):
        stats = {e: [InputStats(w, gate_up.device, hessian=hessian) for w in widths] for e in experts}
        for values in runner.observe(block, {hidden, moe.route_ids}):
            x, ids = values[hidden], values[moe.route_ids]
            for e in experts:
                rows = routed_rows(ids, e)
                if rows.numel():
                    stats[e][0].add(x[rows])
                    bias = None if gate_up_bias is None else gate_up_bias[e]
                    stats[e][1].add(act(F.linear(x[rows], gate_up[e], bias), alpha, limit))
        for e in experts:
            enough = stats[e][0].tokens >= max(config.min_tokens, 1)
            if not enough:
                fallbacks.append(e)
            for name, s in zip((moe.gate_up, moe.down), stats.pop(e), strict=True):
                pruned[name].append(method(get(name)[e], s if enough else None, config, f"{name}[{e}]"))
    return {name: torch.stack(weights) for name, weights in pruned.items()}, fallbacks


def _check_targets(program, config: PruneConfig, linears, experts) -> None:
    """Check every target before changing any: finite, whole m-groups (N:M), at least one zero per row."""
    nm = config.nm()
    get = program.graph_module.get_parameter
    names = [t.weight for t in linears]
    for index in experts:
        moe = program.structure.block(index).mlp
        names += [moe.gate_up, moe.down]
    for name in names:
        weight = get(name)
        if not torch.isfinite(weight).all():
            raise ConfigError(f"{name} holds NaN or inf values; prune a finite model")
        if nm is not None:
            check_groups(weight.shape[-1], config, name)
    if names:  # the narrowest rows need the largest ratio: naming theirs fits every target at once
        narrowest = min(names, key=lambda name: get(name).shape[-1])
        check_zeroes(get(narrowest).shape[-1], config, narrowest)


def _install(program, name: str, weight: Tensor, config: PruneConfig) -> None:
    set_tensor(program.graph_module, name, weight)
    program.info.pruned[name] = config.pattern if config.nm() else f"{config.sparsity:.0%} unstructured"


def _summary(program, before, fallbacks) -> dict:
    table = coverage(program, before)
    return {
        "coverage": table,
        "coverage_table": coverage_table(table, "Pruning coverage"),
        "magnitude_fallback_experts": fallback_experts(program, fallbacks),
    }


def magnitude_prune(weight: Tensor, config: PruneConfig, name: str) -> Tensor:
    return weight.masked_fill(mask_lowest(weight.abs().float(), config, name), 0)
