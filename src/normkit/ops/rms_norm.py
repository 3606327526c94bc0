"""Root-mean-square normalization (Zhang & Sennrich, 2019, arXiv:1910.07467), torch's semantics.

Shapes: ``input (*, *normalized_shape)``; ``weight`` of shape ``normalized_shape``; no bias.
Each row of ``D`` trailing values::

    y = x / sqrt(mean(x**2) + eps) * weight          eps=None means torch.finfo(input.dtype).eps

Gradient: ``dx = rstd * (g - x_hat * mean(g * x_hat))`` with ``g = dy * weight``, ``x_hat = x * rstd``;
``dweight = sum over rows of dy * x_hat``.

Precision: the mean square is taken of power-of-two-scaled values in float32 (float64 for float64), so it
cannot overflow for float32 inputs near 3e38 or float16 inputs near 6.5e4.
"""

from __future__ import annotations

import torch

from .. import _checks
from .layer_norm import normalize_trailing


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: same signature and semantics."""
    _checks.check_floating("rms_norm", input)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return normalize_trailing("rms_norm", input, normalized_shape, weight, None, eps, center=False)
