"""RTN: round-to-nearest weight-only quantization — no calibration, the baseline the others beat."""

from __future__ import annotations

from moepass.ir.quantized import quantize
from moepass.ir.surgery import quantize_experts, quantize_linear
from moepass.quantization import (
    QuantizationPass,
    QuantizeConfig,
    quantization_targets,
    quantize_table,
    summary,
)
from moepass.slimming import coverage

from .base import TransformResult, register_pass


@register_pass
class RTNPass(QuantizationPass):
    name = "rtn"
    config_class = QuantizeConfig

    def run(self, program, context) -> TransformResult:
        config = self.config
        before = coverage(program)
        linears, experts, table = quantization_targets(program, config)
        get = program.graph_module.get_parameter
        for target in linears:
            weight = get(target.weight)
            fmt = config.format_for(weight)
            quantize_linear(program, target.weight, fmt, quantize(weight, fmt, target.weight))
        for index in experts:
            moe = program.structure.block(index).mlp
            gate_up, down = get(moe.gate_up), get(moe.down)
            fmt = config.format_for(gate_up, down)
            packed = quantize(gate_up, fmt, moe.gate_up), quantize(down, fmt, moe.down)
            quantize_experts(program, index, fmt, *packed)
        quantize_table(program, config, table)
        return TransformResult(bool(linears or experts or table), summary(program, before, {}))
