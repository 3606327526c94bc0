"""normkit: hand-written, numerically robust normalization operators for PyTorch."""

from . import functional, nn
from ._stats import Moments, merge_moments, moments
from .convert import convert, fold_batchnorm, revert
from .robust import robust

__version__ = "0.1.0"

__all__ = ["functional", "nn", "convert", "revert", "fold_batchnorm", "robust", "Moments", "merge_moments", "moments", "__version__"]
