"""`sparse24_storage`: store 2:4-pruned weights compressed (values + 2-bit positions), halving them.

Pruning leaves zeros in dense tensors, which saves no memory. This pass finds every linear and
every MoE layer's experts whose weights (float, or quantized codes where a pruned entry is the
zero-point code) follow the 2:4 pattern and rewrites them into `moepass::sparse24_linear` /
`moepass::sparse24_experts` over the layout of `moepass.ir.sparse`: same outputs, bf16 weights 1.78x
smaller, int4 ones 1.6x. It is lossless by construction, so the test is the pattern itself, not
which pass pruned. It is the `store` stage: it runs after every compression pass (run it last in a
recipe); `moepass.lower` expands the weights again where no 2:4 kernel exists (CPU, ONNX).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from moepass.ir.quant_ops import QUANTIZED_LINEAR
from moepass.ir.quantized import FormatError
from moepass.ir.sparse import SparsityPatternError, compress_24, compress_codes_24
from moepass.ir.structure import arg_tensors, op_args, tensor_at
from moepass.ir.surgery import linear_nodes, sparsify_experts, sparsify_linear
from moepass.slimming import coverage, coverage_table

from .base import PassConfig, TransformPass, TransformResult, register_pass

logger = logging.getLogger("moepass")
_LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class Sparse24StorageConfig(PassConfig):
    """No options: every weight that follows the pattern is stored compressed."""


@register_pass
class Sparse24Storage(TransformPass):
    name = "sparse24_storage"
    stage = "store"
    config_class = Sparse24StorageConfig

    def run(self, program, context) -> TransformResult:
        before = coverage(program)
        graph_module = program.graph_module
        routers = {b.mlp.router_linear_node for b in program.structure.moe_blocks}
        weights = []
        for node in graph_module.graph.nodes:
            if node.target in (_LINEAR, QUANTIZED_LINEAR) and node.name not in routers:
                weight = node.args[1]
                if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target not in weights:
                    weights.append(weight.target)
        linears = 0
        for fqn in weights:
            nodes = linear_nodes(graph_module, fqn)
            readers = {
                u for n in graph_module.graph.nodes if n.op == "get_attr" and n.target == fqn for u in n.users
            }
            if readers - set(nodes):  # also read elsewhere (a tied embedding): the dense copy stays anyway
                continue
            compressed = _compress(
                graph_module,
                op_args(nodes[0]) if nodes[0].target is QUANTIZED_LINEAR else None,
                fqn,
            )
            if compressed is not None:
                sparsify_linear(program, fqn, *compressed)
                linears += 1
        experts = []
        for block in program.structure.moe_blocks:
            moe = block.mlp
            if moe.quantization is not None and moe.quantization["layout"] != "quantized":
                continue
            node = next(n for n in graph_module.graph.nodes if n.name == moe.experts_node)
            args = op_args(node) if moe.quantization is not None else None
            pairs = [
                _compress(graph_module, args, fqn, proj)
                for fqn, proj in ((moe.gate_up, "gate_up"), (moe.down, "down"))
            ]
            if all(p is not None for p in pairs):
                sparsify_experts(program, block.index, *pairs)
                experts.append(block.index)
        if not linears and not experts:  # no table: its pruned shares would read as this pass's work
            logger.warning(
                "sparse24_storage: no weight was stored compressed; prune with pattern '2:4' first"
            )
            return TransformResult(False, {"linears": [], "experts_blocks": []})
        table = coverage(program, before)
        return TransformResult(
            True,
            {
                "linears": linears,
                "experts_blocks": experts,
                "coverage": table,
                "coverage_table": coverage_table(table, "Compression coverage after 2:4 storage"),
            },
        )


def _compress(graph_module, quantized: dict | None, fqn: str, proj: str = ""):
    """(values, meta) of the weight at `fqn` if it follows 2:4, else None. `quantized`: the quantized
    op's arguments (codes are compressed, pruned entries being the zero-point code)."""
    weight = tensor_at(graph_module, fqn)
    try:
        if quantized is None:
            return compress_24(weight, fqn)
        (zeros,) = arg_tensors(graph_module, quantized, f"{proj}_zeros" if proj else "zeros")
        return compress_codes_24(weight, zeros, quantized["bits"], quantized["group_size"], fqn)
    except SparsityPatternError:  # off the pattern (checked before any sorting, so cheap to try)
        return None
    except FormatError as error:  # quantization groups that split the runs of 4
        logger.warning("sparse24_storage: %s stays dense: %s", fqn, error)
        return None
