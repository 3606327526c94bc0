"""ONNX: export models with robust normalization subgraphs (or native operators), harden existing ONNX
files, and verify both in ONNX Runtime against float64. See the README section "ONNX"."""

from ._errors import OnnxError
from .export import export_onnx
from .harden import HardenReport, Replacement, harden_onnx
from .verify import OutputError, compare_onnx, format_errors, format_rows, verify_onnx

__all__ = ["OnnxError", "export_onnx", "harden_onnx", "verify_onnx", "compare_onnx", "HardenReport",
           "Replacement", "OutputError", "format_errors", "format_rows"]
