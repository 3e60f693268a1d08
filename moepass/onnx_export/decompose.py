"""Standard-op forms of moepass's canonical ops, substituted into a graph copy before ONNX export
where onnxruntime's fused MoE/QMoE ops cannot take the experts (fp16, most 8-bit formats, 4 bits per
channel, activations other than SwiGLU), and the routing those ops are handed when they cannot
compute it.

Routing and experts stay in the exported graph as computations, never as the sample's choices
(routing and quantized linears that MatMulNBits cannot take trace the ops' own bodies,
`moepass.ir.ops.routing` and `moepass.ir.quant_ops.dequantized_linear`):
  experts  every expert kept. One decode token (T == 1) gathers its k experts' weights and runs
           them — reading k of E experts; longer inputs run all experts on all tokens and keep, per
           token, the outputs of the experts it chose, weighted by their routing weights.
           `torch.cond` keeps both paths in the graph (an ONNX `If`), chosen by the token count at
           run time.
  quantized experts  the same, with codes unpacked and dequantized in the graph (weights stay int4/int8).
Ids >= E (experts dropped with `preserve_gate`) contribute nothing, as in the op. Outputs computed
for a token that did not choose the expert are masked out (`Where`), never multiplied by a zero
weight: in fp16 such an output may overflow, and 0 * inf would be NaN where the op, which never
computes it, is finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moepass.ir.ops import ACTIVATIONS
from moepass.ir.quantized import dequantize

from .contrib import matmul_nbits


def _projection(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., M, K] @ weight[..., N, K]^T (+ bias [..., N]) for stacked per-slot or per-expert weights."""
    y = torch.matmul(x, weight.transpose(-1, -2))
    return y if bias is None else y + bias.unsqueeze(-2)


# (tensors by argument name, slot ids [T, k] or None for all experts) -> (gate_up, down) weights
WeightsFn = Callable[[dict[str, Tensor], Tensor | None], tuple[Tensor, Tensor]]


def _take(tensors: dict[str, Tensor], name: str, ids: Tensor | None) -> Tensor | None:
    tensor = tensors.get(name)
    return tensor if tensor is None or ids is None else tensor[ids]


def _gathered(tensors: dict[str, Tensor], weights_for: WeightsFn, act, alpha: float, limit: float) -> Tensor:
    """One token: each slot's expert weights gathered ([T, k, N, K]), then two batched matmuls; slots
    routed to dropped experts (ids >= E) read expert 0 and are masked out."""
    hidden, weights, valid = tensors["hidden"], tensors["weights"], tensors["valid"]
    ids = torch.where(valid, tensors["ids"], torch.zeros_like(tensors["ids"]))
    gate_up, down = weights_for(tensors, ids)
    x = hidden if "gate_up_input_scale" not in tensors else hidden * tensors["gate_up_input_scale"]
    h = act(_projection(x[:, None, None, :], gate_up, _take(tensors, "gate_up_bias", ids)), alpha, limit)
    if "down_input_scale" in tensors:
        h = h * tensors["down_input_scale"][ids].unsqueeze(-2)
    out = _projection(h, down, _take(tensors, "down_bias", ids)).squeeze(-2)  # [T, k, H]
    weighted = torch.where(valid.unsqueeze(-1), out.float() * weights.unsqueeze(-1), 0.0)
    return weighted.sum(dim=1).to(hidden.dtype)


def _all_experts(
    tensors: dict[str, Tensor], weights_for: WeightsFn, act, alpha: float, limit: float
) -> Tensor:
    """Several tokens: every expert on every token ([E, T, ...]), combined by a [T, E] routing matrix."""
    hidden = tensors["hidden"]
    gate_up, down = weights_for(tensors, None)
    x = hidden if "gate_up_input_scale" not in tensors else hidden * tensors["gate_up_input_scale"]
    h = act(_projection(x.unsqueeze(0), gate_up, tensors.get("gate_up_bias")), alpha, limit)  # [E, T, I]
    if "down_input_scale" in tensors:
        h = h * tensors["down_input_scale"].unsqueeze(1)
    out = _projection(h, down, tensors.get("down_bias"))  # [E, T, H]
    routing, chosen = _routing_matrix(tensors["ids"], tensors["weights"], gate_up.shape[0])
    out = torch.where(chosen.t().unsqueeze(-1), out.float(), 0.0)
    return torch.einsum("te,eth->th", routing, out).to(hidden.dtype)


def _run(
    tensors: dict[str, Tensor | None], num_experts: int, weights_for: WeightsFn, activation, alpha, limit
):
    """Both paths in the graph (`torch.cond` -> ONNX `If`), chosen by the token count at run time."""
    tensors = {
        **{name: t for name, t in tensors.items() if t is not None},
        "weights": tensors["weights"].float(),
        "valid": tensors["ids"] < num_experts,
    }
    names, act = list(tensors), ACTIVATIONS[activation]

    def branch(path):
        return lambda *operands: path(dict(zip(names, operands, strict=True)), weights_for, act, alpha, limit)

    hidden = tensors["hidden"]
    return torch.cond(hidden.shape[0] == 1, branch(_gathered), branch(_all_experts), tuple(tensors.values()))


def _dense_weights(tensors: dict[str, Tensor], ids: Tensor | None) -> tuple[Tensor, Tensor]:
    return _take(tensors, "gate_up", ids), _take(tensors, "down", ids)


def experts(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit):
    tensors = dict(
        hidden=hidden, ids=topk_ids, weights=topk_weights, gate_up=gate_up, down=down,
        gate_up_bias=gate_up_bias, down_bias=down_bias,
    )  # fmt: skip
    return _run(tensors, gate_up.shape[0], _dense_weights, activation, alpha, limit)


def _quantized_weights(bits: int, group_size: int, dtype: torch.dtype) -> WeightsFn:
    def weights_for(tensors: dict[str, Tensor], ids: Tensor | None) -> tuple[Tensor, Tensor]:
        return tuple(  # type: ignore[return-value]
            dequantize(
                _take(tensors, f"{proj}_qweight", ids),
                _take(tensors, f"{proj}_scales", ids),
                _take(tensors, f"{proj}_zeros", ids),
                bits,
                group_size,
                dtype,
            )
            for proj in ("gate_up", "down")
        )

    return weights_for


def quantized_experts(
    hidden, topk_ids, topk_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
    down_scales, down_zeros, gate_up_bias, down_bias, gate_up_input_scale, down_input_scale,
    activation, alpha, limit, bits, group_size,
):  # fmt: skip
    tensors = dict(
        hidden=hidden, ids=topk_ids, weights=topk_weights, gate_up_qweight=gate_up_qweight,
        gate_up_scales=gate_up_scales, gate_up_zeros=gate_up_zeros, down_qweight=down_qweight,
        down_scales=down_scales, down_zeros=down_zeros, gate_up_bias=gate_up_bias, down_bias=down_bias,
        gate_up_input_scale=gate_up_input_scale, down_input_scale=down_input_scale,
    )  # fmt: skip
    weights_for = _quantized_weights(bits, group_size, hidden.dtype)
    return _run(tensors, gate_up_qweight.shape[0], weights_for, activation, alpha, limit)


def _routing_matrix(ids: Tensor, weights: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """[T, E] routing weights (zero for experts not chosen; ids >= E dropped) and [T, E] whether
    the token chose the expert."""
    one_hot = ids.unsqueeze(-1) == torch.arange(num_experts, device=ids.device)
    return (one_hot.float() * weights.float().unsqueeze(-1)).sum(dim=1), one_hot.any(dim=1)


def chosen_logits(topk_ids: Tensor, topk_weights: Tensor, num_experts: int) -> Tensor:
    """[T, E] logits under which softmax top-k picks exactly the chosen experts (ids >= E: none) with
    their weights renormalised: log w where chosen, the lowest float elsewhere. onnxruntime's fused
    ops then run a routing they cannot compute themselves (`chosen_mass` restores the scale)."""
    routing, chosen = _routing_matrix(topk_ids, topk_weights, num_experts)
    fp32 = torch.finfo(torch.float32)
    return torch.where(chosen, routing.clamp_min(fp32.tiny).log(), fp32.min)


def chosen_mass(topk_ids: Tensor, topk_weights: Tensor, num_experts: int) -> Tensor:
    """[T, 1] sum of the weights of the chosen experts that exist: renormalised weights times it are
    the model's."""
    return torch.where(topk_ids < num_experts, topk_weights.float(), 0.0).sum(dim=-1, keepdim=True)


def nbits_experts(
    hidden, topk_ids, topk_weights, experts, gate_up_bias, down_bias, gate_up_input_scale, down_input_scale,
    activation, alpha, limit, hidden_size, intermediate, bits, gate_up_block, down_block,
):  # fmt: skip
    """Quantized experts on MatMulNBits with constant per-expert codes, never unpacked in the graph.

    `experts` holds, per expert, (gate_up b, scales, zeros, down b, scales, zeros) in MatMulNBits'
    shapes. Each expert runs under its own `torch.cond` (ONNX `If`) only when some token chose it, on
    all tokens, kept for the tokens that chose it and weighted by its routing column: a decode step
    runs its k experts and reads k of E; onnxruntime's kernel needs constant weights to run fast, so
    codes are never gathered."""
    num_experts = len(experts)
    routing, chosen = _routing_matrix(topk_ids, topk_weights, num_experts)
    x = hidden if gate_up_input_scale is None else hidden * gate_up_input_scale
    act = ACTIVATIONS[activation]
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for e, (gu_b, gu_s, gu_z, d_b, d_s, d_z) in enumerate(experts):
        extras = {
            "gate_up_bias": None if gate_up_bias is None else gate_up_bias[e],
            "down_bias": None if down_bias is None else down_bias[e],
            "down_input_scale": None if down_input_scale is None else down_input_scale[e],
            "gu_z": gu_z,
            "d_z": d_z,
        }
        extras = {name: t for name, t in extras.items() if t is not None}
        names = list(extras)

        def run(x, weight, chose, gu_b, gu_s, d_b, d_s, *rest, names=names):
            t = dict(zip(names, rest, strict=True))
            h = matmul_nbits(x, gu_b, gu_s, t.get("gu_z"), t.get("gate_up_bias"), hidden_size,
                             2 * intermediate, bits, gate_up_block)  # fmt: skip
            h = act(h, alpha, limit)
            if "down_input_scale" in t:
                h = h * t["down_input_scale"]
            y = matmul_nbits(h, d_b, d_s, t.get("d_z"), t.get("down_bias"), intermediate, hidden_size, bits,
                             down_block)  # fmt: skip
            return torch.where(chose, y.float() * weight, 0.0)

        def skip(x, *rest):
            return torch.zeros_like(x, dtype=torch.float32)

        operands = (x, routing[:, e : e + 1], chosen[:, e : e + 1], gu_b, gu_s, d_b, d_s, *extras.values())
        out = out + torch.cond((topk_ids == e).any(), run, skip, operands)
    return out.to(hidden.dtype)
