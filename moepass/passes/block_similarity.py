"""Similarity between the residual stream at block boundaries (the paper's Block Drop score).

h_i is the input of block i (h_L the output of the last block). The gap matrix
Sim[i, g - 1] = mean over calibration tokens of cos(h_i, h_{i+g}), g >= 1, is what dropping blocks
i .. i+g-1 would replace by the identity; Sim[i, 0] is block i's own input/output similarity.
Blocks are those present in the program (original indices); cells past the last block are NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moepass.plots import heatmap
from moepass.table import format_table

from .base import AnalysisPass, PassConfig, register_pass
from .moe_similarity import mean_cosine_sum


@dataclass(frozen=True)
class BlockSimilarityConfig(PassConfig):
    pass


@dataclass
class BlockSimilarity:
    blocks: list[int]  # original indices, in order
    matrix: list[list[float]]  # [len(blocks)][len(blocks)]: row i, column g-1
    tokens: int

    def gap(self, block: int, gap: int) -> float:
        """Mean cos(h_block, h_{block+gap}) in units of present blocks."""
        return self.matrix[self.blocks.index(block)][gap - 1]

    def span(self, first: int, last: int) -> float:
        """Mean cos between block `first`'s input and block `last`'s output, both blocks of the
        scored program: the score of dropping them and every block between. By original index, so
        a score computed once (one-shot) still reads right after other blocks were dropped."""
        start = self.blocks.index(first)
        return self.matrix[start][self.blocks.index(last) - start]

    def table(self) -> str:
        n = len(self.blocks)
        rows = [
            [b, *[("" if math.isnan(v) else f"{v:.4f}") for v in row]]
            for b, row in zip(self.blocks, self.matrix, strict=True)
        ]
        return format_table(
            ["block", *[f"gap {g}" for g in range(1, n + 1)]],
            rows,
            title=f"Block similarity cos(h_i, h_i+gap) over {self.tokens} calibration tokens",
        )

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "matrix": self.matrix, "tokens": self.tokens}  # NaN past the end

    def plot(self, path: str) -> str:
        return heatmap(
            self.matrix,
            [f"block {b}" for b in self.blocks],
            [str(g) for g in range(1, len(self.blocks) + 1)],
            "Block similarity cos(h_i, h_i+gap)",
            path,
            colorbar="mean cosine",
        )


class _Observer:
    def __init__(self, program):
        blocks = program.structure.blocks
        self.blocks = [b.index for b in blocks]
        self.points = [b.input for b in blocks] + [blocks[-1].output]  # h_0 .. h_L
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        n = len(self.blocks)
        self.sums = [[0.0] * n for _ in range(n)]
        self.tokens = 0

    def nodes(self) -> set[str]:
        return set(self.points)

    def observe(self, batch: int, values) -> None:
        store = self.seen.setdefault(batch, {})
        store.update(values)  # in the activations' dtype: the cosines upcast
        if not all(p in store for p in self.points):
            # sequential calibration: the later boundaries come block by block, after every batch's
            # earlier ones; those wait off the device, which then holds one block's activations
            store.update({k: v.cpu() for k, v in store.items()})
            return
        device = values[next(iter(values))].device
        h = [store[p].to(device) for p in self.points]  # every boundary of this batch: score, free
        for i in range(len(self.blocks)):
            for g in range(1, len(self.blocks) - i + 1):
                self.sums[i][g - 1] += mean_cosine_sum(h[i], h[i + g])
        self.tokens += h[0].numel() // h[0].shape[-1]
        del self.seen[batch]

    def result(self) -> BlockSimilarity:
        n = len(self.blocks)
        matrix = [
            [self.sums[i][g] / max(1, self.tokens) if g < n - i else float("nan") for g in range(n)]
            for i in range(n)
        ]
        return BlockSimilarity(self.blocks, matrix, self.tokens)


@register_pass
class BlockSimilarityPass(AnalysisPass):
    name = "block_similarity"
    config_class = BlockSimilarityConfig

    def observer(self, program, context) -> _Observer:
        return _Observer(program)
