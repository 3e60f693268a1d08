"""The canonical sparse-MoE sub-layer that every family's MoE block is rewritten into before export.

Traced, it yields the same node pattern for every family:
  router linear -> moepass::route -> moepass::experts -> (+ shared experts, optionally sigmoid-gated)
with all expert weights in the canonical layout described in `moepass.ir.ops`. Llama-4 adds one
multiply between the two ops: its routing weight scales the expert's input rows, and the experts
op weighs the outputs by ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import ACTIVATIONS, ROUTING_KINDS


@dataclass(frozen=True)
class RoutingSpec:
    """Static routing parameters; they become literal arguments of the `moepass::route` node."""

    kind: str
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    scale: float = 1.0
    jitter_eps: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ROUTING_KINDS:
            raise ValueError(f"unknown routing kind {self.kind!r}; known: {sorted(ROUTING_KINDS)}")


class Router(nn.Module):
    """Holds the router parameters; computes logits only (selection happens in `moepass::route`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, correction_bias: Tensor | None, fp32: bool):
        super().__init__()
        self.weight = _as_parameter(weight)
        self.bias = None if bias is None else _as_parameter(bias)
        if correction_bias is not None:
            self.register_buffer("e_score_correction_bias", correction_bias)
        else:
            self.e_score_correction_bias = None
        self.fp32 = fp32

    def forward(self, hidden: Tensor) -> Tensor:
        if self.fp32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(hidden.float(), self.weight.float(), bias)
        return F.linear(hidden, self.weight, self.bias)


class Experts(nn.Module):
    """Routed experts in canonical layout; one `moepass::experts` node when traced."""

    def __init__(
        self,
        gate_up_proj: Tensor,
        down_proj: Tensor,
        gate_up_proj_bias: Tensor | None = None,
        down_proj_bias: Tensor | None = None,
        activation: str = "silu",
        alpha: float = 0.0,
        limit: float = 0.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported expert activation {activation!r}; supported: {sorted(ACTIVATIONS)}"
            )
        self.gate_up_proj = _as_parameter(gate_up_proj)
        self.down_proj = _as_parameter(down_proj)
        self.gate_up_proj_bias = None if gate_up_proj_bias is None else _as_parameter(gate_up_proj_bias)
        self.down_proj_bias = None if down_proj_bias is None else _as_parameter(down_proj_bias)
        self.activation, self.alpha, self.limit = activation, alpha, limit

    def forward(self, hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        return torch.ops.moepass.experts(
            hidden,
            topk_ids,
            topk_weights,
            self.gate_up_proj,
            self.down_proj,
            self.gate_up_proj_bias,
            self.down_proj_bias,
            self.activation,
            self.alpha,
            self.limit,
        )


class SparseMoE(nn.Module):
    """Canonical MoE sub-layer: routed experts plus optional (optionally gated) shared experts."""

    def __init__(
        self,
        router: Router,
        experts: Experts,
        routing: RoutingSpec,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        returns_router_scores: bool = False,
        scales_input: bool = False,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
        self.routing = routing
        # GPT-OSS decoder layers unpack `(hidden, router_scores)` from their MLP.
        self.returns_router_scores = returns_router_scores
        # Llama-4 weights its one expert's *input* by the routing weight (the output is not rescaled)
        self.scales_input = scales_input

    def forward(self, hidden: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        spec = self.routing
        weights, ids = torch.ops.moepass.route(
            self.router(flat),
            self.router.e_score_correction_bias,
            spec.kind,
            spec.top_k,
            spec.n_group,
            spec.topk_group,
            spec.renormalize,
            spec.scale,
            spec.jitter_eps,
        )
        if self.scales_input:  # one expert per token: [T, 1] weights scale rows, in the model's dtype
            out = self.experts(flat * weights.to(flat.dtype), ids, torch.ones_like(weights))
        else:
            out = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        out = out.reshape(shape)
        return (out, weights) if self.returns_router_scores else out


def _as_parameter(tensor: Tensor) -> nn.Parameter:
    """Reuse an existing Parameter (shares storage with the source model) or wrap a new tensor."""
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
