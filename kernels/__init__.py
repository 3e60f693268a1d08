"""Triton kernels for moepass's ops, with the fastest CPU paths beside them.

Importing the package registers the kernels as the CUDA implementations of the canonical ops
(`moepass.kernels.ops`). Kernels: weight-only quantized GEMM (`quant_gemm`), fused MoE
(`fused_moe`), 2:4 sparse GEMM (`sparse24`); CPU paths: `cpu`.

From a source checkout's root (`python -m pytest`, `python -m moepass`), this folder is also
findable as a top-level `kernels` package, ahead of the hub `kernels` library that transformers
imports (and, from 5.25, requires). Imported under that name it hands the import over to that
library when one is installed, and otherwise defines nothing: it must never run moepass's code a
second time (a second registration of the torch ops leaves the first one's handles dangling: a
segfault at the next packed-op call).
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
else:

    def _import_shadowed_package(name: str) -> None:
        """Import the `name` package the checkout shadows, in place of this module (the import system
        returns whatever `sys.modules[name]` holds once this module has run)."""
        import sys
        from importlib.machinery import PathFinder
        from importlib.util import module_from_spec
        from pathlib import Path

        checkout = Path(__file__).resolve().parent.parent
        elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != checkout]
        spec = PathFinder.find_spec(name, elsewhere)
        if spec is None:
            return
        package = module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)

    _import_shadowed_package(__name__)
