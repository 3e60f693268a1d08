"""`cpu_packed_weights`: quantized ops onto ATen's packed int4/int8 CPU kernels (lowering stage).

Weights are converted once, here, into the layout `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`
read (`moepass.kernels.cpu`); those kernels run 1.5-6x faster than the dense fp32 op at decode sizes,
while dequantizing on every call is slower than dense. Formats ATen cannot express keep the
reference op; the result lists each with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from moepass.ir.quant_ops import QUANTIZED_EXPERTS, QUANTIZED_LINEAR
from moepass.ir.quantized import in_features
from moepass.ir.structure import arg_tensors, op_args
from moepass.ir.surgery import delete_if_unused, install_tensor, swap_node
from moepass.kernels import pack_for_cpu, why_not_packable
from moepass.kernels.ops import PACKED_EXPERTS, PACKED_LINEAR

from .base import PassConfig, TransformPass, TransformResult, register_pass


@dataclass(frozen=True)
class CpuPackedWeightsConfig(PassConfig):
    """No options: every packable quantized op is converted."""


@register_pass
class CpuPackedWeights(TransformPass):
    name = "cpu_packed_weights"
    stage = "lower"
    config_class = CpuPackedWeightsConfig

    def run(self, program, context) -> TransformResult:
        graph_module = program.graph_module
        converted, kept = 0, {}
        for node in list(graph_module.graph.nodes):
            if node.target is QUANTIZED_LINEAR:
                refusal = lower_linear_node(graph_module, node)
            elif node.target is QUANTIZED_EXPERTS:
                refusal = lower_experts_node(graph_module, node)
            else:
                continue
            if refusal is None:
                converted += 1
            else:
                tensor, reason = refusal
                kept[tensor] = reason
        if converted:
            program.graph_changed()
        return TransformResult(converted > 0, {"converted": converted, "kept reference": kept})


def lower_linear_node(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    """Swap the node for the packed op; else (the weight no kernel takes, why)."""
    args = op_args(node)
    bits, group = args["bits"], args["group_size"]
    qweight, scales, zeros = arg_tensors(graph_module, args, "qweight", "scales", "zeros")
    n, k = qweight.shape[0], in_features(qweight, bits)
    reason = why_not_packable(n, k, bits, group, zeros is None)
    if reason is not None:
        return args["qweight"].target, reason
    packed = pack_for_cpu(qweight, scales, zeros, bits, group)
    prefix = args["qweight"].target.rpartition(".")[0]
    with graph_module.graph.inserting_before(node):
        weight = install_tensor(graph_module, f"{prefix}.packed_weight", packed.weight)
        packed_scales = install_tensor(graph_module, f"{prefix}.packed_scales", packed.scales)
        new = graph_module.graph.call_function(
            PACKED_LINEAR,
            (args["x"], weight, packed_scales, args["bias"], args["input_scale"], bits, packed.group_size),
        )
    stored = [args[name].target for name in ("qweight", "scales", "zeros") if args[name] is not None]
    swap_node(node, new)
    for fqn in stored:
        delete_if_unused(graph_module, fqn)
    return None


def lower_experts_node(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    args = op_args(node)
    bits, group = args["bits"], args["group_size"]
    projections = {}
    for proj in ("gate_up", "down"):
        qweight, scales, zeros = arg_tensors(
            graph_module, args, f"{proj}_qweight", f"{proj}_scales", f"{proj}_zeros"
        )
        n, k = qweight.shape[-2], in_features(qweight, bits)
        reason = why_not_packable(n, k, bits, group, zeros is None)
        if reason is not None:
            return args[f"{proj}_qweight"].target, reason
        projections[proj] = pack_for_cpu(qweight, scales, zeros, bits, group)
    prefix = args["gate_up_qweight"].target.rpartition(".")[0]
    with graph_module.graph.inserting_before(node):
        installed = {
            proj: (
                install_tensor(graph_module, f"{prefix}.{proj}_proj_packed", packed.weight),
                install_tensor(graph_module, f"{prefix}.{proj}_proj_packed_scales", packed.scales),
            )
            for proj, packed in projections.items()
        }
        new = graph_module.graph.call_function(
            PACKED_EXPERTS,
            (
                args["hidden"],
                args["topk_ids"],
                args["topk_weights"],
                *installed["gate_up"],
                *installed["down"],
                args["gate_up_bias"],
                args["down_bias"],
                args["gate_up_input_scale"],
                args["down_input_scale"],
                args["activation"],
                args["alpha"],
                args["limit"],
                bits,
                projections["gate_up"].group_size,
                projections["down"].group_size,
            ),
        )
    stored = [
        args[f"{proj}_{part}"].target
        for proj in ("gate_up", "down")
        for part in ("qweight", "scales", "zeros")
        if args[f"{proj}_{part}"] is not None
    ]
    swap_node(node, new)
    for fqn in stored:
        delete_if_unused(graph_module, fqn)
    return None
