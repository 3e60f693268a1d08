"""`expand_sparse24`: 2:4-compressed weights back to dense storage (lowering stage).

On CPU no 2:4 kernel beats a dense matmul (ATen has none; a gather-based one loses to BLAS), and
onnxruntime has no 2:4 operator, so lowering for CPU and ONNX export expand `sparse24_storage`'s
ops into the float or quantized ops they came from: same outputs, the memory saving stays in the
artifact. On CUDA the linears keep their Triton 2:4 kernel and only experts expand (the fused MoE
kernel reads dense or quantized experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from moepass.ir.sparse import SPARSE24_EXPERTS, SPARSE24_LINEAR
from moepass.ir.surgery import expand_sparse24

from .base import PassConfig, TransformPass, TransformResult, register_pass


@dataclass(frozen=True)
class ExpandSparse24Config(PassConfig):
    keep_linears: bool = False  # True where a 2:4 linear kernel exists (CUDA)


@register_pass
class ExpandSparse24(TransformPass):
    name = "expand_sparse24"
    stage = "lower"
    config_class = ExpandSparse24Config

    def run(self, program, context) -> TransformResult:
        ops = (SPARSE24_EXPERTS,) if self.config.keep_linears else (SPARSE24_LINEAR, SPARSE24_EXPERTS)
        count = expand_sparse24(program, ops)
        return TransformResult(count > 0, {"expanded": count})
