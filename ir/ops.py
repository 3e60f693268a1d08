"""Canonical MoE ops: routing and expert computation as single graph nodes.

Every supported family is captured onto these two ops, so later passes (expert drop, quantization,
kernels, ONNX) deal with one routing op and one experts op instead of eight modeling files. Both
are `torch.library` custom ops with fake implementations: they stay one opaque node under
torch.export and torch.compile, their output shapes never depend on data, and the graph's size does
not depend on the number of experts.

Canonical expert layout (all families are converted to it at capture time):
  gate_up [E, 2I, H]  rows [:I] are the gate projection, rows [I:] the up projection (F.linear layout)
  down    [E, H, I]
  gate_up_bias [E, 2I] and down_bias [E, H] are optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moepass.errors import OpArgumentError

# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
# (logits, bias, top_k, n_group, topk_group, renormalize, jitter_eps) -> (weights, ids), before scaling
RoutingFn = Callable[..., tuple[Tensor, Tensor]]
ROUTING_KINDS: dict[str, RoutingFn] = {}


def _routing_kind(name: str) -> Callable[[RoutingFn], RoutingFn]:
    def register(fn: RoutingFn) -> RoutingFn:
        ROUTING_KINDS[name] = fn
        return fn

    return register


def _group_mask(choice: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """Boolean [T, E] mask of the experts inside each token's `topk_group` best groups."""
    tokens, num_experts = choice.shape
    grouped = choice.view(tokens, n_group, num_experts // n_group)
    # DeepSeek-V2 scores a group by its best expert, DeepSeek-V3 by the sum of its best two.
    scores = grouped.max(dim=-1).values if group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    best = torch.topk(scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(scores).scatter_(1, best, 1.0)
    return mask.unsqueeze(-1).expand(-1, -1, num_experts // n_group).reshape(tokens, num_experts).bool()


@_routing_kind("softmax_topk")
def _softmax_topk(logits, bias, top_k, n_group, topk_group, renormalize, jitter_eps):
    """Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2, ERNIE-4.5: softmax over all experts, (group-limited)
    top-k; ERNIE's bias shifts the selection only, the probabilities weight the chosen experts."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    choice = probs
    if n_group > 1:
        choice = probs.masked_fill(~_group_mask(probs, n_group, topk_group, "max"), 0.0)
    if bias is None:
        weights, ids = torch.topk(choice, top_k, dim=-1)
    else:
        ids = torch.topk(choice + bias.float(), top_k, dim=-1)[1]
        weights = choice.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@_routing_kind("sigmoid_topk")
def _sigmoid_topk(logits, bias, top_k, n_group, topk_group, renormalize, jitter_eps):
    """DeepSeek-V3, GLM-4-MoE, MiniMax-M2: sigmoid scores, bias used for selection only, group-limited by
    top-2 sums."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        choice = choice.masked_fill(~_group_mask(choice, n_group, topk_group, "top2_sum"), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


@_routing_kind("topk_softmax")
def _topk_softmax(logits, bias, top_k, n_group, topk_group, renormalize, jitter_eps):
    """GPT-OSS: top-k on the raw logits, softmax over the k selected."""
    values, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(values, dim=-1), ids


@_routing_kind("topk_sigmoid")
def _topk_sigmoid(logits, bias, top_k, n_group, topk_group, renormalize, jitter_eps):
    """Llama-4: top-k on the raw logits, each chosen one weighted by its sigmoid. Not `sigmoid_topk`
    without a bias: sigmoid rounds large logits to the same fp32 value, which would tie them."""
    values, ids = torch.topk(logits, top_k, dim=-1)
    return torch.sigmoid(values.float()), ids


def _sparsemixer_pick(scores: Tensor, masked: Tensor, jitter_eps: float) -> tuple[Tensor, Tensor]:
    threshold, chosen = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    far = ((threshold - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(-1, chosen), chosen


@_routing_kind("sparsemixer")
def _sparsemixer(logits, bias, top_k, n_group, topk_group, renormalize, jitter_eps):
    """PhiMoE inference routing: two sequential arg-max picks, each weighted by a masked softmax."""
    scores = logits.float()
    w1, e1 = _sparsemixer_pick(scores, scores, jitter_eps)
    w2, e2 = _sparsemixer_pick(scores, scores.scatter(-1, e1, float("-inf")), jitter_eps)
    return torch.cat([w1, w2], dim=-1), torch.cat([e1, e2], dim=-1)


def routing(
    logits: Tensor,
    correction_bias: Tensor | None,
    kind: str,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
    jitter_eps: float,
) -> tuple[Tensor, Tensor]:
    """`moepass::route` as plain tensor code (the op's body; also what ONNX export traces)."""
    weights, ids = ROUTING_KINDS[kind](
        logits, correction_bias, top_k, n_group, topk_group, renormalize, jitter_eps
    )
    if scale != 1.0:
        weights = weights * scale
    return weights.float().contiguous(), ids.long().contiguous()


@torch.library.custom_op("moepass::route", mutates_args=())
def route(
    logits: Tensor,
    correction_bias: Tensor | None,
    kind: str,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
    jitter_eps: float,
) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (top-k weights [T, k] fp32, top-k expert ids [T, k] int64)."""
    return routing(logits, correction_bias, kind, top_k, n_group, topk_group, renormalize, scale, jitter_eps)


@route.register_fake
def _(logits, correction_bias, kind, top_k, n_group, topk_group, renormalize, scale, jitter_eps):
    tokens = logits.shape[0]
    return (
        logits.new_empty((tokens, top_k), dtype=torch.float32),
        logits.new_empty((tokens, top_k), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------
ActivationFn = Callable[[Tensor, float, float], Tensor]
ACTIVATIONS: dict[str, ActivationFn] = {}


def _activation(*names: str) -> Callable[[ActivationFn], ActivationFn]:
    def register(fn: ActivationFn) -> ActivationFn:
        for name in names:
            ACTIVATIONS[name] = fn
        return fn

    return register


def _split(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    half = gate_up.shape[-1] // 2
    return gate_up[..., :half], gate_up[..., half:]


@_activation("silu", "swish")
def _silu_glu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = _split(gate_up)
    return F.silu(gate) * up


@_activation("gelu")
def _gelu_glu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = _split(gate_up)
    return F.gelu(gate) * up


@_activation("gelu_pytorch_tanh", "gelu_new")
def _gelu_tanh_glu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = _split(gate_up)
    return F.gelu(gate, approximate="tanh") * up


@_activation("relu")
def _relu_glu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = _split(gate_up)
    return F.relu(gate) * up


@_activation("clamped_swiglu")
def _clamped_swiglu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    """GPT-OSS: gate clamped above, up clamped both ways, sigmoid(alpha * gate) gating, (up + 1)."""
    gate, up = _split(gate_up)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@torch.library.custom_op("moepass::experts", mutates_args=())
def experts(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    gate_up_bias: Tensor | None,
    down_bias: Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
) -> Tensor:
    """Weighted sum over each token's k experts of down(act(gate_up(x))). hidden [T, H] -> [T, H].

    Ids outside [0, E) (E = the experts given) contribute nothing: a router that kept its rows for
    dropped experts (`preserve_gate`) routes some slots to experts that no longer exist.

    Tokens are grouped by expert and each hit expert runs one matmul on views of its weights (no
    weight copies), so a decode step reads only the k selected experts. Each (token, slot) result
    lands in its own row and the k slots are summed in slot order, in fp32 (transformers sums in the
    model's dtype for some families, e.g. Qwen and OLMoE: bf16 results differ by that rounding).
    """
    check_experts(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias)

    def expert_weights(e: int):
        return (
            gate_up[e],
            down[e],
            expert_at(gate_up_bias, e),
            expert_at(down_bias, e),
        )

    return run_experts(
        hidden,
        topk_ids,
        topk_weights,
        gate_up.shape[0],
        expert_weights,
        ACTIVATIONS[activation],
        alpha,
        limit,
    )


def check_experts(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias) -> None:
    """`moepass::experts`' operands: shapes (`check_expert_shapes`, weights [E, 2I, H] and [E, H, I])
    and dtypes/devices (`check_operands`)."""
    name = "moepass::experts"
    inputs = {"gate_up": (gate_up, hidden.shape[-1]), "down": (down, gate_up.shape[-2] // 2)}
    check_shapes(name, **{proj: (w, (*w.shape[:-1], k)) for proj, (w, k) in inputs.items()})
    check_expert_shapes(name, hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias)
    check_operands(name, hidden, gate_up=gate_up, down=down, gate_up_bias=gate_up_bias, down_bias=down_bias)


def check_expert_shapes(
    op: str,
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    gate_up_bias: Tensor | None,
    down_bias: Tensor | None,
    gate_up_input_scale: Tensor | None = None,
    down_input_scale: Tensor | None = None,
) -> None:
    """An experts op's operands agree: hidden [T, H], topk ids and weights [T, k], projections with
    [E, 2I] and [E, H] output rows (weights, codes or 2:4 values: their input widths are the caller's
    to check), biases per expert, input scales [H] and [E, I]. A kernel reads past a short tensor
    (garbage, or out of bounds on a GPU) where the reference fails deep inside torch."""
    if hidden.dim() != 2 or gate_up.dim() != 3 or gate_up.shape[1] % 2:
        raise OpArgumentError(
            f"{op}: hidden must be [T, H] and gate_up [E, 2I, ...]; got {list(hidden.shape)} and "
            f"{list(gate_up.shape)}"
        )
    (tokens, h), (experts, two_inter) = hidden.shape, gate_up.shape[:2]
    check_shapes(
        op,
        topk_ids=(topk_ids, (tokens, topk_ids.shape[-1])),
        topk_weights=(topk_weights, tuple(topk_ids.shape)),
        down=(down, (experts, h, down.shape[-1])),
        gate_up_bias=(gate_up_bias, (experts, two_inter)),
        down_bias=(down_bias, (experts, h)),
        gate_up_input_scale=(gate_up_input_scale, (h,)),
        down_input_scale=(down_input_scale, (experts, two_inter // 2)),
    )


def check_shapes(op: str, **expected: tuple[Tensor | None, tuple[int, ...]]) -> None:
    """Each given tensor (None: absent, fine) has its expected shape; the error names it."""
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != tuple(shape):
            raise OpArgumentError(f"{op}: {name} has shape {list(tensor.shape)}; expected {list(shape)}")


def check_operands(op: str, x: Tensor, **tensors: Tensor | None) -> None:
    """Floating-point operands must share the activation's dtype and device: the reference matmuls
    refuse a dtype mix deep inside torch while the kernels would quietly compute it (one path would
    fail on CPU only), and a weight left on the meta device would be read as garbage."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != x.device:
            raise OpArgumentError(
                f"{op}: {name} is on {tensor.device} but the input is on {x.device}; move them to one device"
            )
        if tensor.is_floating_point() and tensor.dtype != x.dtype:
            raise OpArgumentError(
                f"{op}: {name} is {tensor.dtype} but the input is {x.dtype}; cast them to one dtype"
            )


ExpertWeights = Callable[[int], tuple[Tensor, Tensor, Tensor | None, Tensor | None]]


def expert_at(tensor: Tensor | None, e: int) -> Tensor | None:
    """Expert `e`'s slice of an optional per-expert tensor ([E, ...])."""
    return None if tensor is None else tensor[e]


def run_experts(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    expert_weights: ExpertWeights,
    act: ActivationFn,
    alpha: float,
    limit: float,
    gate_up_input_scale: Tensor | None = None,
    down_input_scale: Tensor | None = None,
    linear: Callable[[Tensor, Any, Tensor | None], Tensor] = F.linear,
) -> Tensor:
    """The experts computation for any weight storage: `expert_weights(e)` gives expert e's
    (gate_up [2I, H], down [H, I], gate_up bias, down bias), views or freshly dequantized tensors —
    or, with a matching `linear(x, weight, bias)`, weights in a kernel's packed form.
    Optional input scales multiply each projection's input (AWQ's folded activation scales)."""
    tokens, top_k = topk_ids.shape
    hidden_in = hidden if gate_up_input_scale is None else hidden * gate_up_input_scale

    def expert(e: int, x: Tensor) -> Tensor:
        gate_up_e, down_e, gate_up_bias_e, down_bias_e = expert_weights(e)
        h = act(linear(x, gate_up_e, gate_up_bias_e), alpha, limit)
        if down_input_scale is not None:
            h = h * down_input_scale[e]
        return linear(h, down_e, down_bias_e)

    if tokens == 1:  # decode step: run the k experts on views, accumulate in slot order
        out = hidden.new_zeros(hidden.shape, dtype=torch.float32)
        for slot, e in enumerate(topk_ids[0].tolist()):
            if 0 <= e < num_experts:
                out = out + expert(e, hidden_in).float() * topk_weights[:, slot : slot + 1]
        return out.to(hidden.dtype)
    slot_out = hidden.new_zeros((tokens * top_k, hidden.shape[-1]))
    for e, slots, rows in _expert_groups(topk_ids, num_experts):
        slot_out[slots] = expert(e, hidden_in[rows])
    weighted = slot_out.float() * topk_weights.reshape(-1, 1).float()
    return weighted.view(tokens, top_k, hidden.shape[-1]).sum(dim=1).to(hidden.dtype)


_FEW_SLOTS = 16  # decode-sized routings are grouped in Python: cheaper than sort + bincount


def _expert_groups(topk_ids: Tensor, num_experts: int):
    """Yield (expert, slot index, token index) for every expert in [0, num_experts) that received tokens.

    Slots are positions in the flattened [T * k] routing; indices are slices where a group holds a
    single slot, so a one-token decode step indexes its hidden state and output without copies.
    """
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    if flat.numel() <= _FEW_SLOTS:
        groups: dict[int, list[int]] = {}
        for slot, expert in enumerate(flat.tolist()):
            groups.setdefault(expert, []).append(slot)
        for expert, slots in groups.items():
            if not 0 <= expert < num_experts:
                continue
            if len(slots) == 1:
                slot = slots[0]
                yield expert, slice(slot, slot + 1), slice(slot // top_k, slot // top_k + 1)
            else:
                index = torch.tensor(slots, device=flat.device)
                yield expert, index, index // top_k
        return
    flat = torch.where(flat >= 0, flat, num_experts)  # unrouted slots sort after every expert
    order = torch.argsort(flat, stable=True)
    start = 0
    for expert, count in enumerate(torch.bincount(flat).tolist()[:num_experts]):
        if count:
            slots = order[start : start + count]
            yield expert, slots, slots // top_k
            start += count


@experts.register_fake
def _(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit):
    return hidden.new_empty(hidden.shape)  # contiguous, as the real op returns


def inlines_experts(hidden: Tensor) -> bool:
    """Whether a traceable experts body runs these tokens inline: one token (a decode step), on the
    CPU — on a GPU, reading each expert index as an integer would wait for the device every slot."""
    return isinstance(hidden.shape[0], int) and hidden.shape[0] == 1 and hidden.device.type == "cpu"


def traced_expert_slots(topk_ids: Tensor, count: int) -> Iterator[tuple[int, Any, Tensor]]:
    """For one token in traced code: each slot's expert index as a symbolic integer (to view that
    expert's weights at) and the slot's mask [1, 1]. Traced code cannot skip a slot routed to a dropped
    expert (an id outside the `count` experts, behind a router that kept its row): it runs a real
    expert there, and the caller masks the slot out with `where` (not a zero weight: that expert's
    output may be inf)."""
    ids, valid = topk_ids[0].clamp(0, count - 1), (topk_ids >= 0) & (topk_ids < count)
    for slot in range(topk_ids.shape[1]):
        e = ids[slot].item()
        torch._check(e >= 0)
        torch._check(e < count)
        yield slot, e, valid[:, slot : slot + 1]


def experts_body(*args) -> Tensor:
    """`moepass::experts` as traceable code (`TRACEABLE_BODIES`) for a CPU decode step's single token:
    `run_experts`' one-token arithmetic with each expert index read as a symbolic integer and its
    weights viewed at it, so a compiled step multiplies by the k chosen experts' weights from its own
    code instead of calling the op. Other shapes keep the op. Dynamo must be allowed to read the
    indices as integers (`torch._dynamo.config.capture_scalar_outputs`, or `fullgraph=True`)."""
    hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit = args
    if not inlines_experts(hidden):
        return experts(*args)
    act = ACTIVATIONS[activation]
    out = hidden.new_zeros(hidden.shape, dtype=torch.float32)
    for slot, e, valid in traced_expert_slots(topk_ids, gate_up.shape[0]):
        bias = None if gate_up_bias is None else gate_up_bias.select(0, e)
        h = act(F.linear(hidden, gate_up.select(0, e), bias), alpha, limit)
        y = F.linear(h, down.select(0, e), None if down_bias is None else down_bias.select(0, e))
        out = out + torch.where(valid, y.float() * topk_weights[:, slot : slot + 1], 0.0)
    return out.to(hidden.dtype)


ROUTE = torch.ops.moepass.route.default
EXPERTS = torch.ops.moepass.experts.default
# op -> its body as plain tensor code Dynamo can trace. Steps run through torch.compile call these
# inline (`MoEProgram` with `compile=True`), so Inductor fuses them with their neighbours: on CPU a
# custom op is an opaque call costing ~25 µs, which at decode is as much as the arithmetic.
TRACEABLE_BODIES: dict[Any, Callable] = {ROUTE: routing, EXPERTS: experts_body}
