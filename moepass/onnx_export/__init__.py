"""ONNX export of moepass programs and their execution in onnxruntime."""

from .export import OnnxExportError, export_onnx
from .runtime import OnnxProgram

__all__ = ["OnnxExportError", "OnnxProgram", "export_onnx"]
