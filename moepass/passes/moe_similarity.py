"""How much each MoE sub-layer changes the residual stream (the paper's Layer Drop score).

  S_NM  cos(x', x' + MoE(Norm(x'))): x' is the residual stream after attention; the similarity
        across the whole Norm + MoE + residual unit. High means the sub-layer barely changes the
        stream: the paper drops the highest first.
  S_M   cos(Norm(x'), MoE(Norm(x'))): the MoE's raw input against its output, no residual (the paper
        shows it is low everywhere, so it cannot rank layers alone).
Cosine per token over the hidden dimension, then the mean over all calibration tokens (fp64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from moepass.plots import lines
from moepass.table import format_table

from .base import AnalysisPass, ConfigError, PassConfig, register_pass


@dataclass(frozen=True)
class MoESimilarityConfig(PassConfig):
    metric: Literal["S_NM", "S_M"] = "S_NM"


@dataclass
class MoESimilarity:
    metric: str
    per_layer: dict[int, float]  # block index -> mean cosine
    tokens: int

    def table(self) -> str:
        rows = [[layer, f"{value:.5f}"] for layer, value in self.per_layer.items()]
        return format_table(
            ["block", f"mean cos ({self.metric})"],
            rows,
            title=f"MoE sub-layer similarity over {self.tokens} calibration tokens",
        )

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "tokens": self.tokens,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
        }

    def plot(self, path: str, dropped: list[int] = ()) -> str:
        layers = list(self.per_layer)
        return lines(
            {self.metric: list(self.per_layer.values())},
            [str(i) for i in layers],
            "MoE sub-layer input/output similarity (circled: dropped)",
            path,
            ylabel="mean cosine",
            marked={self.metric: [layers.index(i) for i in dropped if i in layers]},
        )


def mean_cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of the cosine over the last dimension, accumulated in fp64."""
    return (
        F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1).double().sum().item()
    )


class _Observer:
    def __init__(self, program, metric: str):
        self.metric = metric
        blocks = program.structure.moe_blocks
        if metric == "S_NM":
            self.pairs = {b.index: (b.attention_residual, b.mlp_residual) for b in blocks}
        else:
            self.pairs = {b.index: (b.mlp_input, b.mlp_output) for b in blocks}
        self.sums = dict.fromkeys(self.pairs, 0.0)
        self.tokens = dict.fromkeys(self.pairs, 0)

    def nodes(self) -> set[str]:
        return {name for pair in self.pairs.values() for name in pair}

    def observe(self, batch: int, values) -> None:
        for layer, (a, b) in self.pairs.items():
            if a in values and b in values:
                x, y = values[a], values[b]
                self.sums[layer] += mean_cosine_sum(x, y.reshape(x.shape))
                self.tokens[layer] += x.numel() // x.shape[-1]

    def result(self) -> MoESimilarity:
        per_layer = {k: self.sums[k] / max(1, self.tokens[k]) for k in self.pairs}
        return MoESimilarity(self.metric, per_layer, max(self.tokens.values(), default=0))


@register_pass
class MoESimilarityPass(AnalysisPass):
    name = "moe_similarity"
    config_class = MoESimilarityConfig

    def observer(self, program, context) -> _Observer:
        if not program.structure.moe_blocks:  # a block drop can remove a model's only MoE layer
            raise ConfigError(f"{self.name}: the program has no MoE layer left")
        return _Observer(program, self.config.metric)
