"""Expert importance per MoE layer, from the routing seen on calibration data.

Scores (per expert, original indices):
  frequency     (token, slot) assignments per calibration sample.
  softmax_mass  the paper's score for Mixtral/Qwen: the router's full distribution over all experts
                (softmax; sigmoid scores normalised to sum 1 for sigmoid routers), summed over a
                sample's tokens, averaged over samples.
  topk_mass     the paper's code for DeepSeek: the top-k routing weights scattered into a zero
                vector (non-selected experts get 0), summed per sample, averaged over samples.
  reap          REAP saliency: mean over the tokens routed to an expert of the weight its output gets
                times that output's norm (0 for experts that receive no tokens). Llama-4's routing
                weight scales the expert's input instead: there, the output's weight is 1.
Shared experts are not routed, so they are never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import fx

from moepass.ir import MoEEntry
from moepass.ir.structure import tensor_at
from moepass.ir.surgery import kept_original_experts
from moepass.plots import heatmap
from moepass.table import format_table

from .base import AnalysisPass, ConfigError, PassConfig, register_pass

SCORES = ("softmax_mass", "topk_mass", "frequency", "reap")


@dataclass(frozen=True)
class ExpertImportanceConfig(PassConfig):
    score: Literal["softmax_mass", "topk_mass", "frequency", "reap"] = "softmax_mass"


@dataclass
class ExpertImportance:
    score: str
    per_layer: dict[int, torch.Tensor]  # block index -> [E] float64, the experts the block held
    samples: int
    experts: dict[int, list[int]]  # block index -> original index of each scored expert

    def _by_original_index(self, normalise: bool = False) -> list[list[float | None]]:
        """Per layer, each expert's score in the column of its original index (None: dropped), so an
        earlier expert drop does not shift the labels."""
        width = 1 + max(max(kept) for kept in self.experts.values())
        rows = []
        for layer, scores in self.per_layer.items():
            if normalise:
                scores = scores / scores.sum().clamp_min(1e-30)
            row: list[float | None] = [None] * width
            for original, value in zip(self.experts[layer], scores.tolist(), strict=True):
                row[original] = value
            rows.append(row)
        return rows

    def table(self) -> str:
        by_layer = self._by_original_index()
        # one number of decimals for the whole table (3 significant digits on its largest score), so
        # the columns line up and compare at a glance
        top = max((abs(v) for row in by_layer for v in row if v is not None), default=0.0)
        decimals = max(0, 2 - math.floor(math.log10(top))) if top > 0 else 3
        rows = [
            [layer, *("-" if v is None else f"{v:.{decimals}f}" for v in row)]
            for layer, row in zip(self.per_layer, by_layer, strict=True)
        ]
        return format_table(
            ["block", *[f"e{i}" for i in range(len(rows[0]) - 1)]],
            rows,
            title=f"Expert importance ({self.score}, {self.samples} calibration samples; -: dropped)",
        )

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "samples": self.samples,
            "per_layer": {str(k): v.tolist() for k, v in self.per_layer.items()},
            "experts": {str(k): v for k, v in self.experts.items()},
        }

    def plot(self, path: str) -> str:
        rows = [[float("nan") if v is None else v for v in row] for row in self._by_original_index(True)]
        return heatmap(
            rows,
            [f"block {k}" for k in self.per_layer],
            [str(i) for i in range(len(rows[0]))],
            f"Expert usage ({self.score}, normalised per layer; blank: dropped)",
            path,
            colorbar="share",
        )


class _Observer:
    def __init__(self, program, score: str, seq_len: int):
        self.score, self.seq_len = score, seq_len
        self.moe: dict[int, MoEEntry] = {b.index: b.mlp for b in program.structure.moe_blocks}
        nodes = {n.name: n for n in program.graph_module.graph.nodes}
        self.logits = {i: nodes[m.route_node].args[0].name for i, m in self.moe.items()}
        self.hidden = {i: nodes[m.experts_node].args[0].name for i, m in self.moe.items()}
        self.gates = {i: nodes[m.experts_node].args[2].name for i, m in self.moe.items()}  # output weights
        reap = [nodes[m.experts_node] for m in self.moe.values()] if score == "reap" else []
        self.one_expert = {node.name: _one_expert(node, program.graph_module) for node in reap}
        zeros = partial(torch.zeros, dtype=torch.float64, device=program.device)  # summed where routing runs
        self.sums = {i: zeros(m.num_experts) for i, m in self.moe.items()}
        self.counts = {i: zeros(m.num_experts) for i, m in self.moe.items()}
        self.tokens = 0
        self.kinds = {i: m.routing for i, m in self.moe.items()}
        self.experts = {i: kept_original_experts(program, i) for i in self.moe}

    def nodes(self) -> set[str]:
        names = set()
        for i, moe in self.moe.items():
            names |= {moe.route_weights, moe.route_ids, self.logits[i]}
            if self.score == "reap":
                names |= {self.hidden[i], self.gates[i]}
        return names

    def observe(self, batch: int, values) -> None:
        for i, moe in self.moe.items():
            if moe.route_ids not in values:
                continue
            ids, weights = values[moe.route_ids], values[moe.route_weights].double()
            num_experts = moe.num_experts
            valid = ids < num_experts  # preserve_gate routers may pick dropped (out-of-range) experts
            flat_ids = ids.clamp(max=num_experts - 1).reshape(-1)
            self.counts[i] += torch.bincount(
                flat_ids, weights=valid.reshape(-1).double(), minlength=num_experts
            )
            if i == min(self.moe):
                self.tokens += ids.shape[0]
            if self.score == "softmax_mass":
                logits = values[self.logits[i]].double()
                if self.kinds[i] in ("sigmoid_topk", "topk_sigmoid"):
                    scores = torch.sigmoid(logits)
                    probs = scores / scores.sum(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits, dim=-1)
                self.sums[i] += probs.sum(0)[:num_experts]
            elif self.score == "topk_mass":
                self.sums[i] += weights.new_zeros(num_experts).index_add_(
                    0, flat_ids, (weights * valid).reshape(-1)
                )
            elif self.score == "reap":
                gates = values[self.gates[i]]
                self.sums[i] += self._reap(moe, values[self.hidden[i]], ids, gates.double(), gates.dtype)

    def _reap(self, moe: MoEEntry, hidden, ids, weights, weight_dtype: torch.dtype) -> torch.Tensor:
        one_expert = self.one_expert[moe.experts_node]
        out = weights.new_zeros(moe.num_experts, dtype=torch.float64)
        for expert in range(moe.num_experts):
            rows, slots = (ids == expert).nonzero(as_tuple=True)
            if rows.numel():
                y = one_expert(hidden[rows], expert, weight_dtype)
                out[expert] = (weights[rows, slots] * y.double().norm(dim=-1)).sum()
        return out

    def result(self) -> ExpertImportance:
        samples = max(1, self.tokens // self.seq_len)
        per_layer = {}
        for i in self.moe:
            if self.score == "frequency":
                per_layer[i] = self.counts[i] / samples
            elif self.score == "reap":
                per_layer[i] = self.sums[i] / self.counts[i].clamp_min(1)
            else:
                per_layer[i] = self.sums[i] / samples
        return ExpertImportance(self.score, {i: s.cpu() for i, s in per_layer.items()}, samples, self.experts)


def _one_expert(node: fx.Node, graph_module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`f(hidden, e)`: expert e's output for each token, from the experts op itself with every token
    routed to e at weight 1 — whatever the weights' layout (float, quantized, 2:4)."""
    computed = [a.name for a in node.args[3:] if isinstance(a, fx.Node) and a.op != "get_attr"]
    if computed:
        raise ConfigError(
            f"expert_importance: experts node {node.name} reads {computed[0]}, not a stored tensor"
        )
    stored = [tensor_at(graph_module, a.target) if isinstance(a, fx.Node) else a for a in node.args[3:]]

    def run(hidden: torch.Tensor, expert: int, weight_dtype: torch.dtype) -> torch.Tensor:
        ids = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
        ones = torch.ones(ids.shape, dtype=weight_dtype, device=hidden.device)
        return node.target(hidden, ids, ones, *stored, **node.kwargs)

    return run


@register_pass
class ExpertImportancePass(AnalysisPass):
    name = "expert_importance"
    config_class = ExpertImportanceConfig

    def observer(self, program, context) -> _Observer:
        if not program.structure.moe_blocks:  # a block drop can remove a model's only MoE layer
            raise ConfigError(f"{self.name}: the program has no MoE layer left")
        return _Observer(program, self.config.score, context.calibration.seq_len)
