"""Standard-op forms of moepass's canonical ops, substituted into a graph copy before ONNX export.

Routing and experts stay in the exported graph as computations, never as the sample's choices:
  route    the family's routing function (`ROUTING_KINDS`), scaled, exactly as `moepass::route`.
  experts  every expert kept. One decode token (T == 1) gathers its k experts' weights and runs
           them — reading k of E experts; longer inputs run all experts on all tokens and weight
           each by its routing weight (zero for experts not chosen). `torch.cond` keeps both paths
           in the graph (an ONNX `If`), chosen by the token count at run time.
  quantized experts  the same, with codes unpacked and dequantized in the graph (weights stay int4/int8).
Ids >= E (experts dropped with `preserve_gate`) contribute nothing, as in the op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moepass.ir.ops import ACTIVATIONS, ROUTING_KINDS
from moepass.ir.quantized import dequantize

from .contrib import matmul_nbits


def route(logits, correction_bias, kind, top_k, n_group, topk_group, renormalize, scale, jitter_eps):
    weights, ids = ROUTING_KINDS[kind](
        logits, correction_bias, top_k, n_group, topk_group, renormalize, jitter_eps
    )
    if scale != 1.0:
        weights = weights * scale
    return weights.float(), ids.long()


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
    """One token: each slot's expert weights gathered ([T, k, N, K]), then two batched matmuls."""
    hidden, ids, weights = tensors["hidden"], tensors["ids"], tensors["weights"]
    gate_up, down = weights_for(tensors, ids)
    x = hidden if "gate_up_input_scale" not in tensors else hidden * tensors["gate_up_input_scale"]
    h = act(_projection(x[:, None, None, :], gate_up, _take(tensors, "gate_up_bias", ids)), alpha, limit)
    if "down_input_scale" in tensors:
        h = h * tensors["down_input_scale"][ids].unsqueeze(-2)
    out = _projection(h, down, _take(tensors, "down_bias", ids)).squeeze(-2)  # [T, k, H]
    return (out.float() * weights.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)


def _all_experts(
    tensors: dict[str, Tensor], weights_for: WeightsFn, act, alpha: float, limit: float
) -> Tensor:
    """Several tokens: every expert on every token ([E, T, ...]), combined by a [T, E] routing matrix."""
    hidden, ids, weights = tensors["hidden"], tensors["ids"], tensors["weights"]
    gate_up, down = weights_for(tensors, None)
    x = hidden if "gate_up_input_scale" not in tensors else hidden * tensors["gate_up_input_scale"]
    h = act(_projection(x.unsqueeze(0), gate_up, tensors.get("gate_up_bias")), alpha, limit)  # [E, T, I]
    if "down_input_scale" in tensors:
        h = h * tensors["down_input_scale"].unsqueeze(1)
    out = _projection(h, down, tensors.get("down_bias"))  # [E, T, H]
    one_hot = (ids.unsqueeze(-1) == torch.arange(gate_up.shape[0], device=ids.device)).float()  # [T, k, E]
    routing = (one_hot * weights.unsqueeze(-1)).sum(dim=1)  # [T, E]
    return torch.einsum("te,eth->th", routing, out.float()).to(hidden.dtype)


def _run(
    tensors: dict[str, Tensor | None], num_experts: int, weights_for: WeightsFn, activation, alpha, limit
):
    """Both paths in the graph (`torch.cond` -> ONNX `If`), chosen by the token count at run time."""
    ids, weights = tensors["ids"], tensors["weights"].float()
    valid = ids < num_experts
    tensors = {
        **{name: t for name, t in tensors.items() if t is not None},
        "ids": torch.where(valid, ids, torch.zeros_like(ids)),
        "weights": torch.where(valid, weights, torch.zeros_like(weights)),
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


def quantized_linear(x, qweight, scales, zeros, bias, input_scale, bits, group_size):
    """Formats MatMulNBits cannot take: dequantize in the graph, then a MatMul."""
    weight = dequantize(qweight, scales, zeros, bits, group_size, x.dtype)
    return torch.nn.functional.linear(x if input_scale is None else x * input_scale, weight, bias)


def _routing_matrix(ids: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """[T, E] routing weights (zero for experts not chosen; ids >= E dropped)."""
    one_hot = (ids.unsqueeze(-1) == torch.arange(num_experts, device=ids.device)).float()
    return (one_hot * weights.float().unsqueeze(-1)).sum(dim=1)


def nbits_experts(
    hidden, topk_ids, topk_weights, gate_up_b, gate_up_scales, gate_up_zeros, down_b, down_scales, down_zeros,
    gate_up_bias, down_bias, gate_up_input_scale, down_input_scale, activation, alpha, limit,
    hidden_size, intermediate, bits, gate_up_block, down_block,
):  # fmt: skip
    """Quantized experts on MatMulNBits, codes never unpacked in the graph. Expert tensors are the
    stored ones reshaped per expert (b [E, N, K/block, block*bits/8], scales [E, N*K/block], zeros
    [E, N*ceil(...)]): one decode token runs its k experts on their gathered codes (reading k of E);
    several tokens run the experts' stacked gate/up rows as one MatMulNBits and each expert's down
    projection on its routing-weighted activations."""
    num_experts, top_k = gate_up_b.shape[0], topk_ids.shape[1]
    ids, weights = topk_ids, topk_weights.float()
    valid = ids < num_experts
    ids, weights = (
        torch.where(valid, ids, torch.zeros_like(ids)),
        torch.where(valid, weights, torch.zeros_like(weights)),
    )
    tensors = dict(
        hidden=hidden, ids=ids, weights=weights, gate_up_b=gate_up_b, gate_up_scales=gate_up_scales,
        gate_up_zeros=gate_up_zeros, down_b=down_b, down_scales=down_scales, down_zeros=down_zeros,
        gate_up_bias=gate_up_bias, down_bias=down_bias, gate_up_input_scale=gate_up_input_scale,
        down_input_scale=down_input_scale,
    )  # fmt: skip
    tensors = {name: t for name, t in tensors.items() if t is not None}
    names, act = list(tensors), ACTIVATIONS[activation]
    shapes = (num_experts, top_k, hidden_size, intermediate, bits, gate_up_block, down_block)

    def branch(path):
        return lambda *operands: path(dict(zip(names, operands, strict=True)), act, alpha, limit, *shapes)

    return torch.cond(
        hidden.shape[0] == 1, branch(_nbits_decode), branch(_nbits_prefill), tuple(tensors.values())
    )


def _input(t: dict[str, Tensor]) -> Tensor:
    return t["hidden"] if "gate_up_input_scale" not in t else t["hidden"] * t["gate_up_input_scale"]


def _nbits_decode(t, act, alpha, limit, experts, top_k, hidden_size, intermediate, bits, gu_block, d_block):
    x, out = _input(t), None
    for slot in range(top_k):
        e = t["ids"][0, slot : slot + 1]  # a 1-element index: gathers, no data-dependent shape
        gate_up = [_row(t, f"gate_up_{name}", e) for name in ("b", "scales", "zeros", "bias")]
        h = act(matmul_nbits(x, *gate_up, hidden_size, 2 * intermediate, bits, gu_block), alpha, limit)
        if "down_input_scale" in t:
            h = h * _row(t, "down_input_scale", e)
        down = [_row(t, f"down_{name}", e) for name in ("b", "scales", "zeros", "bias")]
        y = matmul_nbits(h, *down, intermediate, hidden_size, bits, d_block)
        y = y.float() * t["weights"][:, slot : slot + 1]
        out = y if out is None else out + y
    return out.to(t["hidden"].dtype)


def _nbits_prefill(t, act, alpha, limit, experts, top_k, hidden_size, intermediate, bits, gu_block, d_block):
    tokens = t["hidden"].shape[0]
    routing = _routing_matrix(t["ids"], t["weights"], experts)  # [T, E]
    zeros = t.get("gate_up_zeros")
    stacked = (
        t["gate_up_b"].flatten(0, 1),
        t["gate_up_scales"].reshape(-1),
        None if zeros is None else zeros.reshape(-1),
    )
    h = matmul_nbits(_input(t), *stacked, None, hidden_size, experts * 2 * intermediate, bits, gu_block)
    h = h.reshape(tokens, experts, 2 * intermediate)
    if "gate_up_bias" in t:
        h = h + t["gate_up_bias"]
    h = act(h, alpha, limit)  # [T, E, I]
    if "down_input_scale" in t:
        h = h * t["down_input_scale"]
    h = h * routing.unsqueeze(-1).to(h.dtype)
    out = None
    for e in range(experts):
        down = [t["down_b"][e], t["down_scales"][e], t["down_zeros"][e] if "down_zeros" in t else None]
        y = matmul_nbits(h[:, e], *down, None, intermediate, hidden_size, bits, d_block)
        out = y if out is None else out + y
    if "down_bias" in t:
        out = out + routing.to(t["down_bias"].dtype) @ t["down_bias"]
    return out.to(t["hidden"].dtype)


def _row(t: dict[str, Tensor], name: str, e: Tensor) -> Tensor | None:
    """Expert `e`'s slice ([1] index tensor) of a per-expert tensor, or None when absent."""
    return t[name][e].squeeze(0) if name in t else None
