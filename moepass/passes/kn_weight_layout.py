"""`kn_weight_layout`: dense matmul weights stored input-major on CPU (lowering stage).

A weight W [N, K] (or experts [E, N, K]) keeps its shape but its storage becomes W^T contiguous, so
`F.linear(x, W)` runs as x @ W^T with W^T in [K, N] order. At decode, when the weights stream from
memory, one core reads them 1.2-1.9x faster that way (`BENCHMARKS.md`), and the result is the same
product (summation order aside). Prefill speed is unchanged. GPUs need no such change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from moepass.ir.ops import EXPERTS
from moepass.ir.structure import op_args, tensor_at
from moepass.ir.surgery import set_tensor

from .base import PassConfig, TransformPass, TransformResult, register_pass

_LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class KnWeightLayoutConfig(PassConfig):
    """No options: every dense linear and expert weight is restored."""


@register_pass
class KnWeightLayout(TransformPass):
    name = "kn_weight_layout"
    stage = "lower"
    config_class = KnWeightLayoutConfig

    def run(self, program, context) -> TransformResult:
        graph_module = program.graph_module
        names = sorted(_dense_weights(graph_module))
        changed = 0
        for fqn in names:
            weight = tensor_at(graph_module, fqn)
            if weight.stride(-1) == 1:  # not yet input-major
                stored = weight.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
                set_tensor(graph_module, fqn, stored)
                changed += 1
        if changed:
            program.graph_changed()
        return TransformResult(changed > 0, {"weights": changed})


def _dense_weights(graph_module: fx.GraphModule) -> set[str]:
    """FQNs of the floating weights read as a linear's weight or a dense experts op's matrices."""
    names = set()
    for node in graph_module.graph.nodes:
        if node.target is _LINEAR:
            candidates = [node.args[1]]
        elif node.target is EXPERTS:
            args = op_args(node)
            candidates = [args["gate_up"], args["down"]]
        else:
            continue
        for value in candidates:
            if isinstance(value, fx.Node) and value.op == "get_attr":
                names.add(value.target)
    return names
