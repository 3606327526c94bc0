"""normkit: hand-written, numerically robust normalization operators for PyTorch."""

from . import functional
from ._stats import Moments, merge_moments, moments

__version__ = "0.1.0"

__all__ = ["functional", "Moments", "merge_moments", "moments", "__version__"]
