"""Triton kernels for moepass's ops, with the fastest CPU paths beside them.

Importing the package registers the kernels as the CUDA implementations of the canonical ops
(`moepass.kernels.ops`). Kernels: weight-only quantized GEMM (`quant_gemm`), fused MoE
(`fused_moe`), 2:4 sparse GEMM (`sparse24`); CPU paths: `cpu`.

From a source checkout's root, this folder is also findable as a top-level `kernels` package, and
transformers imports `kernels` to probe for its hub-kernels library. Imported under that name, it
defines nothing: running it twice would register moepass's torch ops a second time and leave the
first registration's handles dangling (a segfault at the next packed-op call).
"""

if __name__ == "moepass.kernels":
    from . import ops
    from .cpu import CpuPacked, pack_for_cpu, why_not_packable
    from .sparse24 import SparsityPatternError, compress_24, decompress_24

    __all__ = [
        "CpuPacked",
        "SparsityPatternError",
        "compress_24",
        "decompress_24",
        "ops",
        "pack_for_cpu",
        "why_not_packable",
    ]
