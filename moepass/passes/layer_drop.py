"""Layer Drop: remove whole MoE sub-layers with their pre-norm; attention stays (METHOD.md §2.2).

The MoE sub-layers whose unit barely changes the residual stream (highest S_NM similarity) go
first; a dropped block computes h + Attn(Norm(h)). Scores come from the original model (one-shot,
the paper) unless `iterative`, which re-scores after each single drop. Dense MLP layers are never
candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from moepass.ir.surgery import drop_mlp

from .base import ConfigError, PassConfig, TransformPass, TransformResult, check_range, register_pass
from .moe_similarity import MoESimilarityConfig


@dataclass(frozen=True)
class LayerDropConfig(PassConfig):
    count: int | None = None  # MoE sub-layers to drop
    ratio: float | None = None  # or: share of the MoE sub-layers to drop (rounded down)
    metric: Literal["S_NM", "S_M", "random"] = "S_NM"
    seed: int = 0  # for metric: random
    iterative: bool = False

    def check(self) -> None:
        if (self.count is None) == (self.ratio is None):
            raise ConfigError("layer_drop: give exactly one of count or ratio")
        check_range("layer_drop.count", self.count, 1)
        check_range("layer_drop.ratio", self.ratio, 0.0, 1.0, inclusive_low=False, inclusive_high=False)


def drop_count(count: int | None, ratio: float | None, available: int, what: str, where: str) -> int:
    """How many to drop; refuses to drop everything (one must always remain).

    A ratio rounds down: it never removes more than the share it asks for (25% of 6 layers drops 1,
    not 2 = 33%); ask with `count` for more."""
    if available <= 1:  # one must remain: no count or ratio can drop anything
        raise ConfigError(
            f"{where}: the program has {available} {what} left; one must remain, so none can be dropped"
        )
    n = count if count is not None else math.floor(ratio * available + 1e-9)
    if n >= available:
        raise ConfigError(
            f"{where}: dropping {n} of {available} {what} would leave none; drop at most {available - 1}"
        )
    if n < 1:
        least = math.ceil(100 / available) / 100
        raise ConfigError(
            f"{where}: ratio {ratio} of {available} {what} rounds to 0 (a ratio never drops more than its "
            f"share); ask for ratio {least} or count 1 (a recipe file's `- {where}: {{count: 1}}`)"
        )
    return n


@register_pass
class LayerDropPass(TransformPass):
    name = "layer_drop"
    removes_structure = True
    not_in_hf_checkpoints = "blocks without their MoE sub-layer"
    config_class = LayerDropConfig
    preserves = frozenset()

    def required_analyses(self):
        return [] if self.config.metric == "random" else [("moe_similarity", self._analysis_config())]

    def _analysis_config(self) -> MoESimilarityConfig:
        return MoESimilarityConfig(metric=self.config.metric)

    def refuse_early(self, program) -> None:
        self._count(program)

    def _count(self, program) -> int:
        available = len(program.structure.moe_blocks)
        if not available:
            raise ConfigError("layer_drop: the program has no MoE layer left")
        return drop_count(self.config.count, self.config.ratio, available, "MoE sub-layers", "layer_drop")

    def run(self, program, context) -> TransformResult:
        config = self.config
        candidates = [b.index for b in program.structure.moe_blocks]
        n = self._count(program)
        dropped, scores = [], {}
        generator = torch.Generator().manual_seed(config.seed)
        while len(dropped) < n:
            if config.metric == "random":
                scores = {i: float(torch.rand((), generator=generator)) for i in candidates}
            else:
                if dropped and config.iterative:
                    context.invalidate()
                scores = context.analysis("moe_similarity", self._analysis_config()).per_layer
            remaining = [i for i in candidates if i not in dropped]
            step = 1 if config.iterative else n
            chosen = sorted(remaining, key=lambda i: scores[i], reverse=True)[:step]
            for index in chosen:
                drop_mlp(program, index)
            dropped += chosen
        return TransformResult(
            True, {"dropped_moe_layers": sorted(dropped), "scores": {str(k): v for k, v in scores.items()}}
        )
