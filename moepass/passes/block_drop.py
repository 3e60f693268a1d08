"""Block Drop: remove whole transformer blocks, attention and MLP, with their KV cache (§2.3).

Sim[i, g - 1] = mean cos(h_i, h_{i+g}) over calibration tokens (block_similarity).
  discrete     drop the `count` blocks with the highest Sim[i, 0] (one-shot, need not be adjacent).
  consecutive  drop blocks b .. b+count-1 for the start b with the highest Sim[b, count - 1]: skipping
               `count` blocks maps h_b straight to h_{b+count}, a gap of `count`. (The reference code
               reads column `count`, i.e. gap count + 1 — an off-by-one we do not copy.)
Blocks keep their original indices in the program; `moepass.save` renumbers them for checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from moepass.ir.surgery import drop_block

from .base import ConfigError, PassConfig, TransformPass, TransformResult, check_range, register_pass
from .block_similarity import BlockSimilarityConfig
from .layer_drop import drop_count

logger = logging.getLogger("moepass")


@dataclass(frozen=True)
class BlockDropConfig(PassConfig):
    count: int | None = None
    ratio: float | None = None  # or: share of the blocks (rounded down)
    method: Literal["discrete", "consecutive"] = "discrete"
    metric: Literal["similarity", "random"] = "similarity"
    seed: int = 0
    iterative: bool = False

    def check(self) -> None:
        if (self.count is None) == (self.ratio is None):
            raise ConfigError("block_drop: give exactly one of count or ratio")
        check_range("block_drop.count", self.count, 1)
        check_range("block_drop.ratio", self.ratio, 0.0, 1.0, inclusive_low=False, inclusive_high=False)
        if self.iterative and self.method == "consecutive":
            raise ConfigError("block_drop.iterative: only the discrete method re-scores between drops")


@register_pass
class BlockDropPass(TransformPass):
    name = "block_drop"
    removes_structure = True
    config_class = BlockDropConfig

    def required_analyses(self):
        return [] if self.config.metric == "random" else [("block_similarity", BlockSimilarityConfig())]

    def refuse_early(self, program) -> None:
        drop_count(
            self.config.count, self.config.ratio, len(program.structure.blocks), "blocks", "block_drop"
        )

    def run(self, program, context) -> TransformResult:
        config = self.config
        blocks = [b.index for b in program.structure.blocks]
        n = drop_count(config.count, config.ratio, len(blocks), "blocks", "block_drop")
        generator = torch.Generator().manual_seed(config.seed)
        if config.method == "consecutive":
            chosen = self._consecutive(program, context, blocks, n, generator)
            for index in chosen:
                drop_block(program, index)
            return self._result(program, chosen)
        dropped: list[int] = []
        while len(dropped) < n:
            remaining = [b for b in blocks if b not in dropped]
            if config.metric == "random":
                scores = {b: float(torch.rand((), generator=generator)) for b in remaining}
            else:
                if dropped and config.iterative:
                    context.invalidate()
                similarity = context.analysis("block_similarity", BlockSimilarityConfig())
                scores = {b: similarity.gap(b, 1) for b in remaining if b in similarity.blocks}
            step = 1 if config.iterative else n - len(dropped)
            chosen = sorted(scores, key=scores.get, reverse=True)[:step]
            for index in chosen:
                drop_block(program, index)
            dropped += chosen
        return self._result(program, sorted(dropped))

    @staticmethod
    def _result(program, dropped: list[int]) -> TransformResult:
        if not program.structure.moe_blocks:  # possible on shallow models with dense blocks first
            logger.warning(
                "block_drop: dropping blocks %s left no MoE block; the result is a dense model (moepass "
                "compresses MoE models: it will not capture the transformers checkpoint of this one)",
                dropped,
            )
        return TransformResult(True, {"dropped_blocks": dropped})

    def _consecutive(self, program, context, blocks, n, generator) -> list[int]:
        starts = list(range(len(blocks) - n + 1))
        if self.config.metric == "random":
            start = starts[int(torch.randint(len(starts), (), generator=generator))]
        else:
            similarity = context.analysis("block_similarity", BlockSimilarityConfig())
            start = max(starts, key=lambda s: similarity.span(blocks[s], blocks[s + n - 1]))
        return blocks[start : start + n]
