"""normkit: hand-written, numerically robust normalization operators for PyTorch."""

from . import functional, nn
from ._stats import Moments, merge_moments, moments
from .convert import convert, fold_batchnorm, revert
from ._native import build, get_backend, set_backend, status

__version__ = "0.1.0"

__all__ = ["functional", "nn", "convert", "revert", "fold_batchnorm", "Moments", "merge_moments", "moments", "__version__",
           "build", "get_backend", "set_backend", "status"]
