"""Expert Drop: remove the least important routed experts (METHOD.md §2.1).

Layer-wise keeps the `keep` best experts of every MoE layer; global concatenates all layers'
scores and drops the (mean E - keep) * layers lowest, so layers end with different counts (the
paper's choice for combined results). `ratio` is the alternative: the share of routed experts to
drop — of each layer's own experts (layer-wise) or of all of them (global), rounded down (a ratio
never drops more than it asks), so layers left with different counts by an earlier drop each lose
their own share. Router rows and expert tensors are sliced together and top-k becomes
min(k, kept) (`preserve_gate` instead keeps the full router). Shared experts are never routed, so
never dropped; dense layers are untouched. Group-limited routers (DeepSeek-V2/V3 `n_group` > 1)
lose the same number of experts from every group, so their grouping stays valid (a ratio keeps the
next multiple of the groups: 30% of 256 experts in 8 groups drops 72, 9 per group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from moepass.ir.surgery import fewest_kept, keep_experts, kept_original_experts, min_experts_per_group

from .base import ConfigError, PassConfig, TransformPass, TransformResult, check_range, register_pass
from .expert_importance import ExpertImportanceConfig


@dataclass(frozen=True)
class ExpertDropConfig(PassConfig):
    keep: int | None = None  # experts kept per MoE layer (the average, for global selection)
    ratio: float | None = None  # or: share of the routed experts to drop
    selection: Literal["layerwise", "global"] = "layerwise"
    score: Literal["softmax_mass", "topk_mass", "frequency", "reap", "random"] = "softmax_mass"
    seed: int = 0  # for score: random
    preserve_gate: bool = False
    reverse: bool = False  # ablation: drop the most important experts instead

    def check(self) -> None:
        if (self.keep is None) == (self.ratio is None):
            raise ConfigError("expert_drop: give exactly one of keep (experts kept per layer) or ratio")
        if self.keep == 0:
            raise ConfigError(
                "expert_drop.keep: 0 would drop every expert of a layer; to remove whole MoE "
                "sub-layers use layer_drop"
            )
        check_range("expert_drop.keep", self.keep, 1)
        check_range("expert_drop.ratio", self.ratio, 0.0, 1.0, inclusive_low=False, inclusive_high=False)


@register_pass
class ExpertDropPass(TransformPass):
    name = "expert_drop"
    removes_structure = True
    config_class = ExpertDropConfig

    def leaves_not_in_hf_checkpoints(self) -> str | None:
        if self.config.preserve_gate:
            return "routers that keep rows for dropped experts (preserve_gate)"
        if self.config.selection == "global":
            return "MoE layers with different expert counts (selection: global; layerwise keeps one count)"
        return None

    def required_analyses(self):
        if self.config.score == "random":
            return []
        return [("expert_importance", ExpertImportanceConfig(score=self.config.score))]

    def refuse_early(self, program) -> None:
        """What no scores change: counts, groups and routing minimums against the layers' experts."""
        moe = self._moe(program)
        targets = self._kept_per_layer(moe)
        if self.config.selection == "layerwise":
            scores = {i: torch.zeros(m.num_experts, device="cpu") for i, m in moe.items()}  # any will do
            dropping = any(
                len(kept) < moe[i].num_experts for i, kept in _layerwise(scores, targets, moe).items()
            )
        else:
            dropping = _global_drop_count(targets, moe) > 0
        if not dropping:
            self._refuse_ratio_dropping_none()

    @staticmethod
    def _moe(program) -> dict:
        moe = {b.index: b.mlp for b in program.structure.moe_blocks}
        if not moe:
            raise ConfigError("expert_drop: the program has no MoE layer left")
        return moe

    def run(self, program, context) -> TransformResult:
        config = self.config
        moe = self._moe(program)
        scores = self._scores(program, context, moe)
        if config.reverse:
            scores = {k: -v for k, v in scores.items()}
        targets = self._kept_per_layer(moe)
        keep = (
            _layerwise(scores, targets, moe)
            if config.selection == "layerwise"
            else _global(scores, targets, moe)
        )
        dropped, originals = {}, {}
        for index, kept in keep.items():
            if len(kept) < moe[index].num_experts:
                dropped[index] = sorted(set(range(moe[index].num_experts)) - set(kept))
                held = kept_original_experts(program, index)  # differs after an earlier drop
                originals[index] = [held[e] for e in dropped[index]]
                keep_experts(program, index, kept, preserve_gate=config.preserve_gate)
        if not dropped:  # before any edit: none was made
            self._refuse_ratio_dropping_none()
        return TransformResult(
            bool(dropped),
            {
                "dropped_experts": {str(k): v for k, v in dropped.items()},  # positions in the layer
                "dropped_original_experts": {str(k): v for k, v in originals.items()},
                "experts_per_layer": {str(b.index): b.mlp.num_experts for b in program.structure.moe_blocks},
            },
        )

    def _refuse_ratio_dropping_none(self) -> None:
        if self.config.ratio is not None:  # a keep equal to the expert count is a no-op asked for
            raise ConfigError(
                f"expert_drop.ratio: {self.config.ratio} of the experts rounds to none dropped; raise it or "
                "give keep"
            )

    def _scores(self, program, context, moe) -> dict[int, torch.Tensor]:
        if self.config.score == "random":
            generator = torch.Generator().manual_seed(self.config.seed)
            return {
                i: torch.rand(m.num_experts, generator=generator, dtype=torch.float64) for i, m in moe.items()
            }
        importance = context.analysis("expert_importance", ExpertImportanceConfig(score=self.config.score))
        scores = {}  # one-shot scores predate earlier drops in this recipe: matched by original index
        for index in moe:
            position = {expert: p for p, expert in enumerate(importance.experts[index])}
            held = [position[expert] for expert in kept_original_experts(program, index)]
            scores[index] = importance.per_layer[index][held]
        return scores

    def _kept_per_layer(self, moe) -> dict[int, float]:
        if self.config.keep is not None:
            return {index: float(self.config.keep) for index in moe}
        return {index: _ratio_target(m, self.config.ratio) for index, m in moe.items()}


def _ratio_target(moe, ratio: float) -> float:
    """Experts a drop ratio keeps in one layer; a group-limited router keeps the next multiple of its
    groups (the same number from every group, never dropping more than asked)."""
    target = moe.num_experts * (1 - ratio)
    if moe.n_group <= 1:
        return target
    return float(math.ceil(target / moe.n_group - 1e-9) * moe.n_group)


def _layerwise(scores, targets: dict[int, float], moe) -> dict[int, list[int]]:
    keep = {}
    for index, m in moe.items():
        count = max(1, math.ceil(targets[index] - 1e-9))
        if count > m.num_experts:
            raise ConfigError(
                f"expert_drop.keep: {count} experts per layer exceeds the {m.num_experts} experts of "
                f"block {index}; this recipe was written for a model with more experts"
            )
        keep[index] = _best(scores[index], count, m, index)
    return keep


def _global(scores, targets: dict[int, float], moe) -> dict[int, list[int]]:
    drop = _global_drop_count(targets, moe)
    ranked = sorted(((float(scores[i][e]), i, e) for i, m in moe.items() for e in range(m.num_experts)))
    dropped: dict[int, set[int]] = {i: set() for i in moe}
    for _, i, e in ranked[:drop]:
        dropped[i].add(e)
    for i, m in moe.items():
        left, need = m.num_experts - len(dropped[i]), fewest_kept(m)
        if left < need:
            why = "all" if not left else f"all but {left} of the"
            routing = f" (its sparsemixer routing always picks {need})" if need > 1 else ""
            raise ConfigError(
                f"expert_drop: global selection would drop {why} {m.num_experts} experts of block {i}"
                f"{routing}; keep more experts on average (keep/ratio) or use selection: layerwise"
            )
    return {i: sorted(set(range(m.num_experts)) - dropped[i]) for i, m in moe.items()}


def _best(score: torch.Tensor, count: int, moe, index: int) -> list[int]:
    """The `count` best experts; for group-limited routers the same number from every group."""
    need = fewest_kept(moe)
    if count < need:
        raise ConfigError(
            f"expert_drop: block {index} routes with sparsemixer, which always picks {need} experts; "
            f"{_keep_at_least(need, moe)}"
        )
    if moe.n_group <= 1:
        return sorted(torch.topk(score, count).indices.tolist())
    groups, size = moe.n_group, moe.num_experts // moe.n_group
    if count % groups:
        raise ConfigError(
            f"expert_drop: block {index} has group-limited routing with {groups} groups of {size}; "
            f"keeping {count} experts cannot keep the groups equal (use a multiple of {groups})"
        )
    per_group, (need, why) = count // groups, min_experts_per_group(moe, count)
    if per_group < need:
        raise ConfigError(
            f"expert_drop: block {index}'s group-limited routing needs {need} experts in each of its "
            f"{groups} groups ({why}); {_keep_at_least(need * groups, moe)}"
        )
    kept = []
    for g in range(groups):
        kept += (g * size + torch.topk(score[g * size : (g + 1) * size], per_group).indices).tolist()
    return sorted(kept)


def _keep_at_least(count: int, moe) -> str:
    """The fix, in both of the config's terms: a count for `keep`, a ceiling for `ratio`."""
    return f"keep at least {count} experts per layer (ratio: at most {1 - count / moe.num_experts:.4g})"


def _global_drop_count(targets: dict[int, float], moe) -> int:
    """How many experts global selection drops in all, once the model allows it at all."""
    grouped = [i for i, m in moe.items() if m.n_group > 1]
    if grouped:
        raise ConfigError(
            f"expert_drop.selection: global selection cannot keep the groups of block {grouped[0]}'s "
            f"group-limited routing (n_group={moe[grouped[0]].n_group}); use selection: layerwise"
        )
    total = sum(m.num_experts for m in moe.values())
    kept = sum(targets.values())
    drop = math.floor(total - kept + 1e-9)
    if drop < 0:
        raise ConfigError(
            f"expert_drop.keep: {kept / len(moe):g} experts per layer on average exceeds the program's "
            f"{total / len(moe):g}; this recipe was written for a model with more experts"
        )
    return drop
