"""AWQ: activation-aware weight quantization (Lin et al. 2024), MoE-aware as in METHOD.md §3.2.

Input channels that carry large activations are scaled up before quantization (W * s) and their
inputs scaled down (x / s), which protects them from rounding; s = mean|x|^a / mean|w|^(1-a) with
`a` searched on a grid to minimise the output error of the group of projections that share the
input. Groups: q/k/v (and MLA's first projections); o; the gate/up projections of ALL routed
experts together with the shared experts' — one scale searched on all tokens entering the MoE,
scored on the MoE output; each expert's down projection on its own routed tokens; dense MLPs
alike. The router stays in full precision. Then each weight's clipping range is searched per
(row, group). The scales are stored as the quantized ops' `input_scale` (1 / s) instead of being
folded into the previous layer, which keeps every family's graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moepass.calibration import BlockwiseRunner
from moepass.ir.ops import ACTIVATIONS, run_experts
from moepass.ir.quantized import QuantFormat, codes_for, dequantize_codes, quantize, scales_and_zeros
from moepass.ir.surgery import quantize_experts, quantize_linear, set_tensor
from moepass.quantization import (
    CalibratedQuantizeConfig,
    QuantizationPass,
    quantization_targets,
    quantize_head_rtn,
    quantize_table,
    stack,
    summary,
)
from moepass.slimming import coverage, routed_rows

from .base import TransformResult, check_range, register_pass

SAMPLE_TOKENS = 2048  # tokens per group kept for the searches
NO_CLIP = ("q_proj", "k_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")
LOSS_BATCHES = 2  # calibration batches run through the graph per candidate attention scale


@dataclass(frozen=True)
class AWQConfig(CalibratedQuantizeConfig):
    grid: int = 20  # scale exponents tried: 0, 1/grid, ..., (grid-1)/grid
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5  # clipping ranges tried: 1 down to 1 - max_shrink

    def check(self) -> None:
        super().check()
        check_range("grid", self.grid, 1)
        check_range("clip_grid", self.clip_grid, 1)
        check_range("max_shrink", self.max_shrink, 0.0, 0.9)


def fake_quantize(weight: Tensor, fmt: QuantFormat) -> Tensor:
    """What round-to-nearest in `fmt` stores for `weight`, dequantized (without packing the codes)."""
    scale, zero = scales_and_zeros(weight, fmt)
    codes = codes_for(weight, scale, zero, fmt)
    group = fmt.group(weight.shape[-1])
    return dequantize_codes(codes, zero.to(torch.int16), scale.to(weight.dtype), group, weight.dtype)


def search_scale(x: Tensor, weights: list[Tensor], loss, fmt: QuantFormat, grid: int) -> Tensor:
    """The input-channel scale s minimising `loss(list of fake-quantized W*s / s)`; x [T, K]."""
    x_mean = x.abs().float().mean(0)
    group = fmt.group(x.shape[-1])
    w = torch.cat([w.reshape(-1, w.shape[-1]) for w in weights]).float()
    w_norm = (
        w.abs().view(w.shape[0], -1, group)
        / w.abs().view(w.shape[0], -1, group).amax(-1, keepdim=True).clamp_min(1e-12)
    ).view(w.shape)
    w_mean = w_norm.mean(0)
    candidates = [torch.ones_like(x_mean)]  # plain rounding competes too: the search never does worse
    for step in range(grid):
        ratio = step / grid
        s = (x_mean.pow(ratio) / w_mean.clamp_min(1e-4).pow(1 - ratio)).clamp_min(1e-4)
        candidates.append(s / (s.max() * s.min()).sqrt())
    best, best_scale = float("inf"), candidates[0]
    for s in candidates:
        scale = s.to(weights[0].dtype)
        error = loss([fake_quantize(weight * scale, fmt) / scale for weight in weights])
        if error < best:
            best, best_scale = error, s
    return best_scale


def output_error(x: Tensor, group: int):
    """A function of a weight change d [n, k] giving, per (row, group of `group` input channels), the
    mean over x's rows [T, k] of (x_g . d_g)^2, as [n, k / group]. Through each group's Gram matrix
    x_g^T x_g when the group is narrower than T: a change then costs n*k*group, not n*k*T (AWQ scores
    every candidate scale and clipping range this way); directly otherwise."""
    tokens, k = x.shape
    xg = x.float().view(tokens, k // group, group)
    if group < tokens:
        gram = torch.einsum("tgk,tgl->gkl", xg, xg) / tokens

        def error(d: Tensor) -> Tensor:
            d = d.float().view(d.shape[0], -1, group)
            return (torch.einsum("ngk,gkl->ngl", d, gram) * d).sum(-1)

        return error
    return lambda d: torch.einsum("tgk,ngk->tng", xg, d.float().view(d.shape[0], -1, group)).pow(2).mean(0)


def linear_loss(x: Tensor, weights: list[Tensor]):
    """Scores candidates for `weights` (each [n, k], all reading x) by the mean squared error of
    their outputs, summed over the weights."""
    error = output_error(x, x.shape[-1])
    return lambda candidate: sum(error(c - w).mean().item() for c, w in zip(candidate, weights, strict=True))


def search_clip(weight: Tensor, x: Tensor, fmt: QuantFormat, steps: int, max_shrink: float) -> Tensor:
    """`weight` with each (row, group) clipped to the range that minimises that group's output error."""
    n, k = weight.shape
    group = fmt.group(k)
    w = weight.float().view(n, -1, group)
    error = output_error(x[: SAMPLE_TOKENS // 4], group)
    best_err = torch.full((n, k // group), float("inf"), device=weight.device)
    best = w.clone()
    top = w.abs().amax(-1, keepdim=True)
    for step in range(steps):
        limit = top * (1 - max_shrink * step / steps)
        clipped = w.clamp(-limit, limit)
        err = error(fake_quantize(clipped.view(n, k), fmt).float() - w.view(n, k))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), clipped, best)
    return best.view(n, k).to(weight.dtype)


def _sample(chunks: list[Tensor]) -> Tensor:
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
    return x[_spread_rows(x)]


def _spread_rows(x: Tensor) -> Tensor:
    """Indices of at most SAMPLE_TOKENS rows of `x`, evenly spread (all of them when fewer)."""
    return torch.linspace(0, x.shape[0] - 1, min(SAMPLE_TOKENS, x.shape[0]), device=x.device).long()


@register_pass
class AWQPass(QuantizationPass):
    name = "awq"
    config_class = AWQConfig
    needs_calibration = True

    def run(self, program, context) -> TransformResult:
        config = self.config
        before = coverage(program)
        linears, experts, table = quantization_targets(program, config)
        runner = BlockwiseRunner(program, context.calibration, context.batch_size, self.name)
        fallbacks: dict[int, list[int]] = {}
        for block in [b.index for b in program.structure.blocks]:
            group_linears = [t for t in linears if t.block == block]
            moe = program.structure.block(block).mlp if block in experts else None
            inputs = {t.input for t in group_linears}
            extra = set()
            if moe is not None:
                node = next(n for n in program.graph_module.graph.nodes if n.name == moe.experts_node)
                extra = {node.args[0].name, moe.route_ids, node.args[2].name}  # the op's own inputs
            observed: dict[str, list[Tensor]] = {name: [] for name in inputs | extra}
            for values in runner.observe(block, inputs | extra):
                for name, value in values.items():
                    observed[name].append(value)
            plan = self._plan(
                program, runner, block, group_linears, observed, moe, fallbacks.setdefault(block, [])
            )
            for apply in plan:  # every search ran on full-precision weights; now rewrite
                apply()
            runner.commit(runner.outputs(block))
        heads = quantize_head_rtn(program, config, linears, self.name)
        quantize_table(program, config, table)
        return TransformResult(bool(linears or experts or table), summary(program, before, fallbacks, heads))

    def _plan(self, program, runner, block, linears, observed, moe, fallback) -> list:
        plan = []
        by_input: dict[str, list] = {}
        for target in linears:
            by_input.setdefault(target.input, []).append(target)
        hidden = None
        if moe is not None:
            node = next(n for n in program.graph_module.graph.nodes if n.name == moe.experts_node)
            hidden = node.args[0].name
        attention = program.structure.block(block)
        attention_out = next(
            n for n in program.graph_module.graph.nodes if n.name == attention.attention_residual
        )
        for name, group in by_input.items():
            if name == hidden:
                continue  # the shared experts' gate/up join the routed experts' group
            loss = None
            if all(t.category == "attention" and t.role != "o_proj" for t in group):
                loss = self._sublayer_loss(runner, block, group, attention_out.args[1].name)
            plan.append(self._linear_group(program, group, _sample(observed[name]), loss))
        if moe is not None:
            shared = by_input.get(hidden, [])
            plan += self._experts(program, moe, observed, shared, fallback)
        return plan

    def _sublayer_loss(self, runner, block: int, group, output: str):
        """Score candidate weights by the attention sub-layer's output (through softmax and o_proj),
        running the block's graph on a few calibration batches: what AutoAWQ measures, for any family.
        The block's stage is built once and each candidate swapped into it, never into the program."""
        stage = runner.stage(block, {output})
        weights = [stage.module.get_parameter(t.weight) for t in group]

        def run() -> list[Tensor]:
            return [values[output].float() for values in runner.observe(block, {output}, stage, LOSS_BATCHES)]

        reference = run()

        def loss(candidate):
            for target, weight in zip(group, candidate, strict=True):
                set_tensor(stage.module, target.weight, weight)
            try:
                return sum(
                    (out - ref).pow(2).mean().item() for out, ref in zip(run(), reference, strict=True)
                )
            finally:
                for target, weight in zip(group, weights, strict=True):
                    set_tensor(stage.module, target.weight, weight)

        return loss

    def _linear_group(self, program, group, x, loss=None):
        c, get = self.config, program.graph_module.get_parameter
        weights = [get(t.weight) for t in group]
        fmt = c.format_for(*weights)
        x = x.to(weights[0].dtype)
        loss = loss or linear_loss(x, weights)

        s = search_scale(x, weights, loss, fmt, c.grid).to(weights[0].dtype)
        scaled = [w * s for w in weights]
        if c.clip:  # queries and keys keep their range: clipping them distorts the attention softmax
            scaled = [
                w if t.role in NO_CLIP else search_clip(w, x / s, fmt, c.clip_grid, c.max_shrink)
                for w, t in zip(scaled, group, strict=True)
            ]
        packed = [quantize(w, fmt, t.weight) for w, t in zip(scaled, group, strict=True)]

        def apply():
            for target, triple in zip(group, packed, strict=True):
                quantize_linear(program, target.weight, fmt, triple, input_scale=1 / s)

        return apply

    def _experts(self, program, moe, observed, shared, fallback) -> list:
        c, get = self.config, program.graph_module.get_parameter
        node = next(n for n in program.graph_module.graph.nodes if n.name == moe.experts_node)
        hidden, act, alpha, limit = node.args[0].name, ACTIVATIONS[moe.activation], node.args[8], node.args[9]
        x_all = torch.cat(observed[hidden])
        ids_all = torch.cat(observed[moe.route_ids])
        weights_all = torch.cat(observed[node.args[2].name])  # Llama-4's: ones (its input is scaled)
        keep = _spread_rows(x_all)
        x, ids, route_w = x_all[keep], ids_all[keep], weights_all[keep]
        gate_up, down = get(moe.gate_up), get(moe.down)
        gu_bias = None if moe.gate_up_bias is None else get(moe.gate_up_bias)
        dn_bias = None if moe.down_bias is None else get(moe.down_bias)
        shared_weights = [get(t.weight) for t in shared]
        fmt = c.format_for(gate_up, down)  # the shared experts' gate/up share the routed ones' scale

        def moe_out(gate_up_weights, shared_weights_now):
            def weights_of(e):
                return (
                    gate_up_weights[e],
                    down[e],
                    None if gu_bias is None else gu_bias[e],
                    (None if dn_bias is None else dn_bias[e]),
                )

            routed = run_experts(x, ids, route_w, moe.num_experts, weights_of, act, alpha, limit)
            parts = [F.linear(x, w) for w in shared_weights_now]
            return routed, parts

        reference = moe_out(gate_up, shared_weights)

        def loss(candidate):
            routed, parts = moe_out(torch.stack(candidate[: moe.num_experts]), candidate[moe.num_experts :])
            error = (routed - reference[0]).float().pow(2).mean().item()
            return error + sum(
                (p - r).float().pow(2).mean().item() for p, r in zip(parts, reference[1], strict=True)
            )

        s = search_scale(x, [*gate_up.unbind(0), *shared_weights], loss, fmt, c.grid).to(gate_up.dtype)
        gate_up_scaled = gate_up * s
        shared_scaled = [w * s for w in shared_weights]
        down_scales, packed_down, packed_gate_up = [], [], []
        for e in range(moe.num_experts):
            rows = routed_rows(ids_all, e)
            xe = x_all[rows][:SAMPLE_TOKENS]
            w = gate_up_scaled[e]
            if rows.numel() >= max(c.min_tokens, 1):
                if c.clip:
                    w = search_clip(w, xe / s, fmt, c.clip_grid, c.max_shrink)
                h = act(F.linear(xe, gate_up[e], None if gu_bias is None else gu_bias[e]), alpha, limit)
                sd = search_scale(h, [down[e]], linear_loss(h, [down[e]]), fmt, c.grid).to(down.dtype)
                wd = down[e] * sd
                if c.clip:
                    wd = search_clip(wd, h / sd, fmt, c.clip_grid, c.max_shrink)
            else:  # too few routed tokens to trust a search: plain round-to-nearest
                fallback.append(e)
                sd, wd = torch.ones(down.shape[-1], dtype=down.dtype, device=down.device), down[e]
            packed_gate_up.append(quantize(w, fmt, f"{moe.gate_up}[{e}]"))
            packed_down.append(quantize(wd, fmt, f"{moe.down}[{e}]"))
            down_scales.append(1 / sd)
        if c.clip:
            clip = c.clip_grid, c.max_shrink
            shared_scaled = [search_clip(w, x / s, fmt, *clip) for w in shared_scaled]
        shared_packed = [quantize(w, fmt, t.weight) for w, t in zip(shared_scaled, shared, strict=True)]
        index = next(b.index for b in program.structure.moe_blocks if b.mlp.experts_node == moe.experts_node)

        def apply():
            quantize_experts(
                program,
                index,
                fmt,
                stack(packed_gate_up),
                stack(packed_down),
                gate_up_input_scale=1 / s,
                down_input_scale=torch.stack(down_scales),
            )
            for target, triple in zip(shared, shared_packed, strict=True):
                quantize_linear(program, target.weight, fmt, triple, input_scale=1 / s)

        return [apply]
