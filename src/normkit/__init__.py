"""normkit: hand-written, numerically robust normalization operators for PyTorch."""

from . import functional, nn
from ._checks import MixedDtypeError, NormArgumentError, UnsupportedDtypeError
from ._stats import Moments, merge_moments, moments
from .convert import convert, revert
from .fold import fold_batchnorm
from ._native import build, get_backend, set_backend, status
from .robust import robust
from .watch import watch

__version__ = "0.1.0"

__all__ = ["functional", "nn", "convert", "revert", "fold_batchnorm", "robust", "Moments", "merge_moments", "moments", "__version__",
           "NormArgumentError", "UnsupportedDtypeError", "MixedDtypeError", "build", "get_backend", "set_backend", "status",
           "export_onnx", "harden_onnx", "verify_onnx", "watch"]

_ONNX_NAMES = ("export_onnx", "harden_onnx", "verify_onnx")


def __getattr__(name):  # the ONNX tools import onnx/onnxscript only when asked for (the "onnx" extra)
    if name in _ONNX_NAMES:
        from . import onnx as _onnx

        return getattr(_onnx, name)
    raise AttributeError(f"module 'normkit' has no attribute {name!r}")
