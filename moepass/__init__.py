"""moepass: a compiler for compressing Mixture-of-Experts language models."""

import os as _os

# From a source checkout (repo root on sys.path, package not installed), ir/ and kernels/ sit beside
# this folder rather than inside it; let them resolve as moepass.ir and moepass.kernels.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "ir")) and _os.path.isfile(
    _os.path.join(_checkout, "ir", "__init__.py")
):
    __path__.append(_checkout)

from moepass.artifact import load, save  # noqa: E402
from moepass.compress import compress  # noqa: E402
from moepass.errors import (  # noqa: E402
    IRVerificationError,
    MoepassError,
    NotAnMoEModelError,
    UnsupportedModelError,
)
from moepass.evaluate import EvalResult, evaluate  # noqa: E402
from moepass.ir import MoEProgram, capture  # noqa: E402
from moepass.kernels import ops as _kernel_ops  # noqa: E402, F401  (CUDA kernels of the canonical ops)
from moepass.multiple_choice import evaluate_choices, load_questions  # noqa: E402

__version__ = "0.1.0"

_LAZY = {  # heavy imports (the ONNX exporter) load on first use
    "export_onnx": "moepass.onnx_export",
    "OnnxProgram": "moepass.onnx_export",
    "lower": "moepass.lowering",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moepass' has no attribute {name!r}")


__all__ = [
    "EvalResult",
    "IRVerificationError",
    "MoEProgram",
    "MoepassError",
    "NotAnMoEModelError",
    "OnnxProgram",
    "UnsupportedModelError",
    "capture",
    "compress",
    "evaluate",
    "evaluate_choices",
    "export_onnx",
    "load",
    "load_questions",
    "lower",
    "save",
]
