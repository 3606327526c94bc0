"""Root-mean-square normalization (Zhang & Sennrich, 2019, arXiv:1910.07467), torch's semantics.

Shapes: ``input (*, *normalized_shape)``; ``weight`` of shape ``normalized_shape``; no bias.
Each row of ``D`` trailing values::

    ms = sum(x**2) / D       x_hat = x / sqrt(ms + eps)          y = x_hat * weight

    g = dy * weight          dx = rstd * (g - x_hat * mean(g * x_hat))          (no mean(g) term: not centred)
    dweight = sum over rows of dy * x_hat

In terms of the spec (:mod:`normkit._spec`): ``standardize`` with ``center=False`` over the trailing dims
(``moments`` of the scaled, unshifted values: ``m2 = sum(y**2)``) and ``affine``; backward
``normalize_backward`` with ``center=False``. :func:`~normkit.ops._normalize.normalize_trailing` runs them,
through the native row kernel where it applies.

``eps=None`` means the eps of the compute dtype, as in torch 2.13 (which computes half inputs in float32):
``torch.finfo(torch.float32).eps`` for float16, bfloat16 and float32 input, float64's own for float64.
Any parameter dtype is accepted (torch's ``rms_norm`` is composite); the output has the input's dtype and
torch's memory format (channels_last kept, anything else contiguous).
Precision: the mean square is taken of power-of-two-scaled values in float32 (float64 for float64), so it
cannot overflow for float32 inputs near 3e38 or float16 inputs near 6.5e4.
"""

from __future__ import annotations

import torch

from .. import _checks
from .._spec import compute_dtype
from . import _plan
from ._normalize import normalize_trailing, torch_layout


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: same signature and semantics."""
    route = _plan.route("rms_norm", input, (normalized_shape, eps), weight)  # a checked signature: the kernel
    if route is not None:
        return route(input, weight)
    _checks.check_floating("rms_norm", input)
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps  # torch 2.13: float32's eps for half inputs
    y = normalize_trailing("rms_norm", input, normalized_shape, weight, None, eps, center=False, same_dtype_params=False)
    return torch_layout(y, input)
