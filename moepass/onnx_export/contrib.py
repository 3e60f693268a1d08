"""onnxruntime contrib ops (domain `com.microsoft`) the exporter emits, each a torch custom op whose
reference implementation is the op's definition and whose ONNX translation is the contrib op itself
(and `moepass_onnx::last_positions`, a data-dependent `Slice`: `logits_to_keep`).

  moepass_onnx::matmul_nbits  ->  com.microsoft::MatMulNBits
      Y = A @ dequantize(B)^T + bias; B [N, K/block, block*bits/8] uint8 (low nibble first),
      scales [N * K/block], zero_points packed uint8 [N * ceil((K/block) * bits / 8)] or absent
      (2^(bits-1)). This is `moepass.ir.quantized`'s layout reshaped: no repacking.
  moepass_onnx::moe  ->  com.microsoft::MoE
      Softmax over all experts' router logits, top-k, renormalized, SwiGLU experts (plain, or
      GPT-OSS's clamped form) on fc1 rows interleaved (gate_0, up_0, gate_1, ...: `swiglu_fusion=1`,
      the layout the CPU kernel takes) and fc2, with optional biases; only the chosen experts run,
      token by token.
  moepass_onnx::qmoe  ->  com.microsoft::QMoE
      The same on 4-bit codes in the stored layout ([E, N, K/2] uint8, scales [E, N, K/block], packed
      zero points [E, N, K/block/2] or absent); onnxruntime 1.32 matches the dequantized math to 1e-6
      for 4 bits. 8 bits in blocks only in exports with int8 activations, since the CPU QMoE (1.31,
      1.32) runs them on int8 activations whatever `accuracy_level` says (0.5-1% off; exact only with
      the process-wide ORT_QMOE_CPU_QNBIT_GEMM=fp32); exact exports keep their MatMulNBits form.
      8-bit per-channel weights (`block_size` -1 here, 0 to onnxruntime) take its per-row layout,
      which both 1.30 and 1.32 compute exactly (3e-7): scales [E, N], zero points [E, N]. 4-bit
      per-channel weights take blocks repeating each row's scale (`rows_as_blocks`: its blocked
      kernels decode 1.1-2.3x faster than a MatMulNBits per expert, BENCHMARKS.md), or its per-row
      layout, zero points two rows a byte ([E, N/2]), where no power-of-two block of 16+ divides
      both projections' inputs.
Both always renormalize the top-k weights (`normalize_routing_weights=1`): onnxruntime does not
honour 0, so the exporter rescales the output for routing that does not renormalize. Routing they
cannot compute reaches them as logits under which softmax top-k is its choice
(`decompose.chosen_logits`).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import opset20
from torch import Tensor

from moepass.ir.ops import experts, routing
from moepass.ir.quant_ops import dequantized_linear
from moepass.ir.quantized import dequantize, pack, unpack

MICROSOFT = onnxscript.values.Opset("com.microsoft", 1)


def _schema(
    name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]], types, attributes
):
    """An OpSchema for a contrib op: onnx ships none for onnxruntime's ops, and onnxscript needs one to
    tell inputs from attributes. `inputs`: (name, type variable, optional)."""
    param = onnx.defs.OpSchema.FormalParameter
    option = onnx.defs.OpSchema.FormalParameterOption
    return onnx.defs.OpSchema(
        name,
        MICROSOFT.domain,
        MICROSOFT.version,
        inputs=[param(n, t, param_option=option.Optional if opt else option.Single) for n, t, opt in inputs],
        outputs=[param(n, t) for n, t in outputs],
        type_constraints=[(var, allowed, "") for var, allowed in types],
        attributes=[onnx.defs.OpSchema.Attribute(a, kind, "") for a, kind in attributes],
    )


_INT = onnx.defs.OpSchema.AttrType.INT
_STRING = onnx.defs.OpSchema.AttrType.STRING
_MATMUL_NBITS_OP = onnxscript.values.Op(
    MICROSOFT,
    "MatMulNBits",
    _schema(
        "MatMulNBits",
        [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
         ("g_idx", "T4", True), ("bias", "T1", True)],
        [("Y", "T1")],
        [("T1", ["tensor(float)", "tensor(float16)"]), ("T2", ["tensor(uint8)"]),
         ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"]), ("T4", ["tensor(int32)"])],
        [("K", _INT), ("N", _INT), ("bits", _INT), ("block_size", _INT)],
    ),
)  # fmt: skip


def fits_matmul_nbits(k: int, group_size: int, bits: int) -> str | None:
    """None when MatMulNBits can run this format, else why not."""
    block = k if group_size == -1 else group_size
    if bits not in (4, 8):
        return f"MatMulNBits takes 4- or 8-bit weights, got {bits}"
    if block < 16 or block & (block - 1):
        return f"MatMulNBits needs a power-of-two block of at least 16 inputs, got {block}"
    return None


def row_block(k: int) -> int | None:
    """The block size per-channel weights with `k` inputs take on the blocked contrib ops, their row's
    scale repeated per block (`rows_as_blocks`: the same weights): the largest power of two dividing
    `k`, at most 128; None below 16 (the ops' least)."""
    block = min(k & -k, 128)
    return block if block >= 16 else None


def rows_as_blocks(
    scales: Tensor, zeros: Tensor | None, bits: int, k: int, block: int
) -> tuple[Tensor, Tensor | None]:
    """Per-channel scales [..., N, 1] and zero points (stored layout) as `block`-input blocks holding
    the same values: [..., N, k/block], zero points packed as `moepass.ir.quantized` packs them."""
    groups = k // block
    scales = scales.expand(*scales.shape[:-1], groups).contiguous()
    if zeros is not None:
        codes = unpack(zeros, bits)[..., :1].expand(*zeros.shape[:-1], groups)
        if bits == 4 and groups % 2:  # an odd block count pads the last byte's high nibble
            codes = torch.nn.functional.pad(codes, (0, 1))
        zeros = pack(codes, bits)
    return scales, zeros


@torch.library.custom_op("moepass_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(
    a: Tensor,
    b: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    bias: Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> Tensor:
    zeros = None if zero_points is None else zero_points.reshape(n, -1)
    return dequantized_linear(a, b.reshape(n, -1), scales.reshape(n, -1), zeros, bias, None, bits, block_size)


@matmul_nbits.register_fake
def _(a, b, scales, zero_points, bias, k, n, bits, block_size):
    return a.new_empty((*a.shape[:-1], n))


def _matmul_nbits_onnx(a, b, scales, zero_points=None, bias=None, k=0, n=0, bits=4, block_size=32):
    return _MATMUL_NBITS_OP(a, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size)


_FLOAT = onnx.defs.OpSchema.AttrType.FLOAT
_MOE_ATTRIBUTES = [("k", _INT), ("activation_type", _STRING), ("normalize_routing_weights", _INT),
                   ("swiglu_fusion", _INT), ("activation_alpha", _FLOAT), ("activation_beta", _FLOAT),
                   ("swiglu_limit", _FLOAT)]  # fmt: skip
_MOE_OP = onnxscript.values.Op(
    MICROSOFT,
    "MoE",
    _schema(
        "MoE",
        [("input", "T", False), ("router_probs", "T", False), ("fc1_experts_weights", "T", False),
         ("fc1_experts_bias", "T", True), ("fc2_experts_weights", "T", False),
         ("fc2_experts_bias", "T", True)],
        [("output", "T")],
        [("T", ["tensor(float)", "tensor(float16)"])],
        _MOE_ATTRIBUTES,
    ),
)  # fmt: skip
_QMOE_OP = onnxscript.values.Op(
    MICROSOFT,
    "QMoE",
    _schema(
        "QMoE",
        [("input", "T", False), ("router_probs", "T", False), ("fc1_experts_weights", "T1", False),
         ("fc1_scales", "T2", False), ("fc1_experts_bias", "T", True), ("fc2_experts_weights", "T1", False),
         ("fc2_scales", "T2", False), ("fc2_experts_bias", "T", True), ("fc3_experts_weights", "T1", True),
         ("fc3_scales", "T2", True), ("fc3_experts_bias", "T", True), ("fc1_zero_points", "T1", True),
         ("fc2_zero_points", "T1", True)],
        [("output", "T")],
        [("T", ["tensor(float)", "tensor(float16)"]), ("T1", ["tensor(uint8)"]),
         ("T2", ["tensor(float)", "tensor(float16)"])],
        [*_MOE_ATTRIBUTES, ("expert_weight_bits", _INT), ("block_size", _INT)],
    ),
)  # fmt: skip


def _swiglu_attributes(activation: str, alpha: float, limit: float) -> dict:
    """The ops' SwiGLU is (up + beta) * gate * sigmoid(alpha * gate), gate clamped above and up both
    ways at the limit; its defaults (alpha 1, beta 0, no limit) are plain SwiGLU."""
    if activation == "clamped_swiglu":
        return {"activation_alpha": alpha, "activation_beta": 1.0, "swiglu_limit": limit}
    return {}


FUSED_ACTIVATIONS = ("silu", "swish", "clamped_swiglu")


def interleave_gate_up(tensor: Tensor) -> Tensor:
    """[E, 2I, ...] gate rows then up rows -> rows gate_0, up_0, gate_1, up_1, ... (what MoE/QMoE take)."""
    experts_, rows = tensor.shape[:2]
    gate, up = tensor[:, : rows // 2], tensor[:, rows // 2 :]
    return torch.stack([gate, up], dim=2).reshape(experts_, rows, *tensor.shape[2:])


def _deinterleave_gate_up(tensor: Tensor | None) -> Tensor | None:
    if tensor is None:
        return None
    experts_, rows = tensor.shape[:2]
    return tensor.reshape(experts_, rows // 2, 2, *tensor.shape[2:]).transpose(1, 2).reshape(tensor.shape)


@torch.library.custom_op("moepass_onnx::moe", mutates_args=())
def moe(
    x: Tensor,
    router_logits: Tensor,
    fc1: Tensor,
    fc1_bias: Tensor | None,
    fc2: Tensor,
    fc2_bias: Tensor | None,
    k: int,
    activation: str,
    alpha: float,
    limit: float,
) -> Tensor:
    weights, ids = routing(router_logits, None, "softmax_topk", k, 1, 1, True, 1.0, 0.0)
    gate_up, gate_up_bias = _deinterleave_gate_up(fc1), _deinterleave_gate_up(fc1_bias)
    return experts(x, ids, weights, gate_up, fc2, gate_up_bias, fc2_bias, activation, alpha, limit)


@moe.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, *attributes):
    return torch.empty_like(x)


def _moe_onnx(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k=2, activation="silu", alpha=1.0, limit=0.0):
    return _MOE_OP(
        x, router_logits, fc1, fc1_bias, fc2, fc2_bias,
        k=k, activation_type="swiglu", normalize_routing_weights=1, swiglu_fusion=1,
        **_swiglu_attributes(activation, alpha, limit),
    )  # fmt: skip


@torch.library.custom_op("moepass_onnx::qmoe", mutates_args=())
def qmoe(
    x: Tensor,
    router_logits: Tensor,
    fc1: Tensor,
    fc1_scales: Tensor,
    fc1_zeros: Tensor | None,
    fc1_bias: Tensor | None,
    fc2: Tensor,
    fc2_scales: Tensor,
    fc2_zeros: Tensor | None,
    fc2_bias: Tensor | None,
    k: int,
    activation: str,
    alpha: float,
    limit: float,
    bits: int,
    block_size: int,
) -> Tensor:
    fc1_dense = _qmoe_dense(fc1, fc1_scales, fc1_zeros, bits, block_size, x.dtype)
    fc2_dense = _qmoe_dense(fc2, fc2_scales, fc2_zeros, bits, block_size, x.dtype)
    return moe(x, router_logits, fc1_dense, fc1_bias, fc2_dense, fc2_bias, k, activation, alpha, limit)


def _qmoe_dense(
    weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, block_size: int, dtype: torch.dtype
) -> Tensor:
    """QMoE's expert weights [E, N, K] as floats: blocks in the stored layout, rows (-1) in
    onnxruntime's (`qmoe_rows`)."""
    if block_size != -1:
        return dequantize(weight, scales, zeros, bits, block_size, dtype)
    if zeros is not None:  # [E, N] codes (4-bit: two rows a byte) back to the stored [E, N, 1]
        zeros = unpack(zeros, bits)[..., : scales.shape[-1], None].to(torch.uint8)
    return dequantize(weight, scales[..., None], zeros, bits, -1, dtype)


def qmoe_rows(scales: Tensor, zeros: Tensor | None, bits: int) -> tuple[Tensor, Tensor | None]:
    """Per-channel scales and zero points, stored [E, N, 1] -> QMoE's per-row [E, N] (4-bit zero
    points two rows a byte, the even row in the low nibble: N is even, being 2 x intermediate for
    gate/up and the hidden size, 4-bit gate/up's even input count, for down)."""
    return scales[..., 0], None if zeros is None else pack(unpack(zeros, bits)[..., 0], bits)


@qmoe.register_fake
def _(x, router_logits, *rest):
    return torch.empty_like(x)


def _qmoe_onnx(
    x, router_logits, fc1, fc1_scales, fc1_zeros=None, fc1_bias=None, fc2=None, fc2_scales=None,
    fc2_zeros=None, fc2_bias=None, k=2, activation="silu", alpha=1.0, limit=0.0, bits=4, block_size=32,
):  # fmt: skip
    return _QMOE_OP(
        x, router_logits, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, None, None, None,
        fc1_zeros, fc2_zeros, k=k, activation_type="swiglu", normalize_routing_weights=1,
        swiglu_fusion=1, expert_weight_bits=bits, block_size=max(block_size, 0),
        **_swiglu_attributes(activation, alpha, limit),
    )  # fmt: skip


@torch.library.custom_op("moepass_onnx::last_positions", mutates_args=())
def last_positions(x: Tensor, count: Tensor) -> Tensor:
    """x[:, -count:] for x [batch, seq, ...] and an int64 scalar `count`; 0 (or >= seq) keeps every
    position. The length is data-dependent: an ONNX `Slice` reading `count` at run time."""
    return x[:, -int(count) :].clone()


@last_positions.register_fake
def _(x, count):
    return x.new_empty((x.shape[0], torch.library.get_ctx().new_dynamic_size(), *x.shape[2:]))


def _last_positions_onnx(x, count):
    starts = opset20.Neg(opset20.Reshape(count, opset20.Constant(value_ints=[1])))
    ends = opset20.Constant(value_ints=[2**63 - 1])
    return opset20.Slice(x, starts, ends, opset20.Constant(value_ints=[1]))


MATMUL_NBITS = torch.ops.moepass_onnx.matmul_nbits.default
MOE = torch.ops.moepass_onnx.moe.default
QMOE = torch.ops.moepass_onnx.qmoe.default
LAST_POSITIONS = torch.ops.moepass_onnx.last_positions.default
# fused op -> its weight inputs, in argument order
FUSED_INPUTS = {
    MOE: ("fc1", "fc1_bias", "fc2", "fc2_bias"),
    QMOE: ("fc1", "fc1_scales", "fc1_zeros", "fc1_bias", "fc2", "fc2_scales", "fc2_zeros", "fc2_bias"),
}
TRANSLATIONS = {
    MATMUL_NBITS: _matmul_nbits_onnx,
    MOE: _moe_onnx,
    QMOE: _qmoe_onnx,
    LAST_POSITIONS: _last_positions_onnx,
}
