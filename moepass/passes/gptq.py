"""GPTQ: quantize each weight column by column, spreading every rounding error onto the columns not
yet quantized through the inverse Hessian of the layer's inputs (Frantar et al. 2023).

MoE-aware: each routed expert gets its own Hessian from the tokens routed to it only; experts with
fewer than `min_tokens` fall back to round-to-nearest (H = I). Blocks are processed in order and,
inside a block, true-sequentially — attention q/k/v (MLA: the low-rank projections, then q_b/kv_b),
then o, then every expert's gate/up (and the shared experts'), then every down projection — each
group calibrated on the outputs of the groups already quantized. Groups are static (scales from the
unquantized weight, contiguous along K) even with `act_order`, so the stored layout stays the plain
group-wise one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moepass.calibration import BlockwiseRunner, InputStats
from moepass.ir.ops import ACTIVATIONS
from moepass.ir.quantized import QuantFormat, dequantize, packed_triple, quantize, scales_and_zeros
from moepass.ir.surgery import quantize_experts, quantize_linear
from moepass.quantization import (
    CalibratedQuantizeConfig,
    QuantizationPass,
    quantization_targets,
    quantize_head_rtn,
    quantize_table,
    stack,
    summary,
)
from moepass.slimming import coverage, expert_groups, routed_rows

from .base import ConfigError, TransformResult, check_range, register_pass

# GPTQ's true-sequential order inside a block, by projection role
SEQUENTIAL = [
    ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"),
    ("q_b_proj", "kv_b_proj"),  # MLA: they read the (quantized) low-rank projections' outputs
    ("o_proj",),
    ("gate_proj", "up_proj", "experts_gate_up"),
    ("down_proj", "experts_down"),
]


@dataclass(frozen=True)
class GPTQConfig(CalibratedQuantizeConfig):
    damp: float = 0.01  # of the mean Hessian diagonal
    block_size: int = 128
    act_order: bool = False

    def check(self) -> None:
        super().check()
        check_range("damp", self.damp, 0.0, 1.0, inclusive_low=False)  # 0: H may be singular
        if self.block_size < 1:
            raise ConfigError(f"block_size: {self.block_size} is out of range; must be >= 1")


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    fmt: QuantFormat,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    pruned: Tensor | None = None,
) -> tuple:
    """GPTQ on one matrix [N, K] with input Hessian [K, K]; returns the stored (codes, scales, zeros).

    `pruned` [N, K] marks entries that must stay exactly zero (a pruned weight): they are "rounded"
    to zero and their error is compensated like any rounding error, so the sparsity pattern survives."""
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = scales_and_zeros(w, fmt, weight.dtype)  # static groups
    scale, zero = scale.double(), zero.double()
    group = fmt.group(w.shape[1])
    perm = (
        torch.argsort(torch.diag(h), descending=True)
        if act_order
        else torch.arange(w.shape[1], device=w.device)
    )
    w, h = w[:, perm], h[perm][:, perm]
    pruned = None if pruned is None else pruned[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    columns = w.shape[1]
    groups = (perm // group).tolist()  # each column's scale group, read without a device sync
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        w1, h1 = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            g = groups[start + i]
            column = w1[:, i]
            q = torch.clamp(torch.round(column / scale[:, g]) + zero[:, g], 0, fmt.max_code)
            if pruned is not None:
                q = torch.where(pruned[:, start + i], zero[:, g], q)
            error = (column - (q - zero[:, g]) * scale[:, g]) / h1[i, i]
            codes[:, start + i] = q
            w1[:, i:] -= error.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    return packed_triple(unpermuted.to(torch.int16), scale, zero, fmt, weight.dtype)


@register_pass
class GPTQPass(QuantizationPass):
    name = "gptq"
    config_class = GPTQConfig
    needs_calibration = True

    def run(self, program, context) -> TransformResult:
        config = self.config
        before = coverage(program)
        linears, experts, table = quantization_targets(program, config)
        runner = BlockwiseRunner(program, context.calibration, context.batch_size, self.name)
        fallbacks: dict[int, list[int]] = {}
        for block in [b.index for b in program.structure.blocks]:
            for roles in SEQUENTIAL:
                self._linears(
                    program, runner, block, [t for t in linears if t.block == block and t.role in roles]
                )
                if block in experts and "experts_gate_up" in roles:
                    fallbacks[block] = self._experts(program, runner, block)
            known = {role for roles in SEQUENTIAL for role in roles}
            self._linears(
                program, runner, block, [t for t in linears if t.block == block and t.role not in known]
            )
            runner.commit(runner.outputs(block))
        heads = quantize_head_rtn(program, config, linears, self.name)
        quantize_table(program, config, table)
        return TransformResult(bool(linears or experts or table), summary(program, before, fallbacks, heads))

    def _linears(self, program, runner: BlockwiseRunner, block: int, group) -> None:
        if not group:
            return
        get = program.graph_module.get_parameter
        weights = {t.input: get(t.weight) for t in group}
        hessians = {name: InputStats(w.shape[-1], w.device, squares=False) for name, w in weights.items()}
        for values in runner.observe(block, set(hessians)):
            for name, hessian in hessians.items():
                hessian.add(values[name])
        c = self.config
        for target in group:
            weight = program.graph_module.get_parameter(target.weight)
            fmt = c.format_for(weight)
            packed = gptq_quantize(
                weight,
                hessians[target.input].mean_hessian(),
                fmt,
                c.damp,
                c.block_size,
                c.act_order,
                _pruned(program, target.weight, weight),
            )
            quantize_linear(program, target.weight, fmt, packed)

    def _experts(self, program, runner: BlockwiseRunner, block: int) -> list[int]:
        """Per-expert GPTQ on routed tokens: every gate/up first, then every down projection on the
        quantized gate/up's outputs. Returns the experts that fell back to round-to-nearest."""
        c = self.config
        moe = program.structure.block(block).mlp
        get = program.graph_module.get_parameter
        node = next(n for n in program.graph_module.graph.nodes if n.name == moe.experts_node)
        hidden, act, alpha, limit = node.args[0].name, ACTIVATIONS[moe.activation], node.args[8], node.args[9]
        gate_up, down = get(moe.gate_up), get(moe.down)
        gate_up_bias = None if moe.gate_up_bias is None else get(moe.gate_up_bias)
        fmt = c.format_for(gate_up, down)

        def routed_hessians(size: int, features, experts: range) -> list[InputStats]:
            result = [InputStats(size, gate_up.device, squares=False) for _ in experts]
            for values in runner.observe(block, {hidden, moe.route_ids}):
                x, ids = values[hidden], values[moe.route_ids]
                for e, hessian in zip(experts, result, strict=True):
                    rows = routed_rows(ids, e)
                    if rows.numel():
                        hessian.add(features(e, x[rows]))
            return result

        def quantize_all(weights: Tensor, features, name: str) -> tuple[tuple, list[int]]:
            """Every expert's packed triple, and the experts that fell back to round-to-nearest."""
            pruned, size = _pruned(program, name, weights), weights.shape[-1]
            packed, fallbacks = [], []
            for experts in expert_groups(moe.num_experts, size * size * 8, name):
                for e, h in zip(experts, routed_hessians(size, features, experts), strict=True):
                    if h.tokens < max(c.min_tokens, 1):
                        packed.append(quantize(weights[e], fmt, f"{name}[{e}]"))
                        fallbacks.append(e)
                        continue
                    zeros = None if pruned is None else pruned[e]
                    packed.append(
                        gptq_quantize(
                            weights[e], h.mean_hessian(), fmt, c.damp, c.block_size, c.act_order, zeros
                        )
                    )
            return stack(packed), fallbacks

        packed_gate_up, fallbacks = quantize_all(gate_up, lambda e, x: x, moe.gate_up)
        quantized = dequantize(*packed_gate_up, fmt.bits, fmt.group_size, dtype=gate_up.dtype)

        def down_inputs(e: int, x: Tensor) -> Tensor:
            bias = None if gate_up_bias is None else gate_up_bias[e]
            return act(F.linear(x, quantized[e].to(x.dtype), bias), alpha, limit)

        packed_down, _ = quantize_all(down, down_inputs, moe.down)
        quantize_experts(program, block, fmt, packed_gate_up, packed_down)
        return fallbacks


def _pruned(program, name: str, weight: Tensor) -> Tensor | None:
    """The zeros of a weight a pruning pass left (`program.info.pruned`), which GPTQ must keep."""
    return weight == 0 if name in program.info.pruned else None
