"""Layer normalization (Ba et al., 2016, arXiv:1607.06450), torch's semantics.

Shapes: ``input (*, *normalized_shape)``; ``weight``, ``bias`` of shape ``normalized_shape``.
Each row of ``D = prod(normalized_shape)`` trailing values is standardized::

    mean = sum(x) / D        var = sum((x - mean)**2) / D                          (biased)
    x_hat = (x - mean) / sqrt(var + eps)          y = x_hat * weight + bias        (weight, bias per element)

    g = dy * weight          dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (means over the row)
    dweight = sum over rows of dy * x_hat         dbias = sum over rows of dy

In terms of the spec (:mod:`normkit._spec`): ``standardize`` over the trailing dims (``moments``, then
``standardize_from_moments``) and ``affine``; backward ``normalize_backward`` (``affine_backward``, then
``standardize_backward``). :func:`~normkit.ops._normalize.normalize_trailing` runs them, through the native
row kernel where it applies.

Precision: the spec's policy -- statistics in float32 for half inputs (float64 for float64), power-of-two
scaled and shifted, so rows of float32 values near 1e30 or float16 values near 6e4 stay finite.
Contract (torch's): weight and bias in the input's dtype, or float32 for a half input; any eps; a contiguous
output.
"""

from __future__ import annotations

from .._spec import autocast_inputs
from . import _plan
from ._normalize import normalize_trailing


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``: same signature and semantics (a contiguous output, as torch's)."""
    route = _plan.route("layer_norm", input, (normalized_shape, eps), weight, bias)  # a checked signature: the kernel
    if route is not None:
        return route(input, weight, bias)
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    return normalize_trailing("layer_norm", input, normalized_shape, weight, bias, eps, center=True).contiguous()
