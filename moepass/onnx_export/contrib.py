"""onnxruntime contrib ops (domain `com.microsoft`) the exporter emits, each a torch custom op whose
reference implementation is the op's definition and whose ONNX translation is the contrib op itself.

  moepass_onnx::matmul_nbits  ->  com.microsoft::MatMulNBits
      Y = A @ dequantize(B)^T + bias; B [N, K/block, block*bits/8] uint8 (low nibble first),
      scales [N * K/block], zero_points packed uint8 [N * ceil((K/block) * bits / 8)] or absent
      (2^(bits-1)). This is `moepass.ir.quantized`'s layout reshaped: no repacking.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from torch import Tensor

from moepass.ir.quant_ops import dequantized_linear

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


MATMUL_NBITS = torch.ops.moepass_onnx.matmul_nbits.default
TRANSLATIONS = {MATMUL_NBITS: _matmul_nbits_onnx}
