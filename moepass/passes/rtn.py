"""RTN: round-to-nearest weight-only quantization — no calibration, the baseline the others beat."""

from __future__ import annotations

from moepass.ir.surgery import quantize_experts, quantize_linear
from moepass.quantization import QuantizeConfig, check_formats, rtn, summary
from moepass.slimming import coverage, expert_blocks, linear_targets

from .base import TransformPass, TransformResult, register_pass


@register_pass
class RTNPass(TransformPass):
    name = "rtn"
    config_class = QuantizeConfig

    def run(self, program, context) -> TransformResult:
        config, fmt = self.config, self.config.format
        before = coverage(program)
        linears = linear_targets(program, config.targets)
        experts = expert_blocks(program, config.targets)
        check_formats(program, config, linears, experts)
        get = program.graph_module.get_parameter
        for target in linears:
            quantize_linear(program, target.weight, fmt, rtn(get(target.weight), fmt, target.weight))
        for index in experts:
            moe = program.structure.block(index).mlp
            quantize_experts(
                program,
                index,
                fmt,
                rtn(get(moe.gate_up), fmt, moe.gate_up),
                rtn(get(moe.down), fmt, moe.down),
            )
        return TransformResult(bool(linears or experts), summary(program, before, {}))
