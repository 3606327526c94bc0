"""Layer normalization (Ba et al., 2016, arXiv:1607.06450), torch's semantics.

Shapes: ``input (*, *normalized_shape)``; ``weight``, ``bias`` of shape ``normalized_shape``.
Each row of ``D = prod(normalized_shape)`` trailing values is standardized::

    y = (x - mean) / sqrt(var + eps) * weight + bias        var biased, over the D values

Gradients: ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))``, ``g = dy * weight``;
``dweight = sum over rows of dy * x_hat``, ``dbias = sum over rows of dy``.

Precision: statistics in float32 for half inputs (float64 for float64), power-of-two scaled and shifted
(:mod:`normkit._stats`), so rows of float32 values near 1e30 or float16 values near 6e4 stay finite.

Contract (torch's): weight and bias in the input's dtype, or float32 for a half input; any eps; a contiguous
output. Forward-mode AD, export and compile: see :mod:`normkit.ops._normalize`.
"""

from __future__ import annotations

from .. import _checks
from .._stats import autocast_inputs
from ._normalize import empty_output, standardize_affine


def normalize_trailing(op, input, normalized_shape, weight, bias, eps, center, same_dtype_params=True):
    """Shared by layer norm and RMS norm: standardize over the trailing ``normalized_shape`` dims.
    ``same_dtype_params``: apply torch's CPU parameter-dtype rule (layer norm; torch's RMS norm accepts any)."""
    _checks.check_floating(op, input)
    shape = _checks.normalized_shape_tuple(op, normalized_shape, input)
    _checks.check_param(op, "weight", weight, shape)
    _checks.check_param(op, "bias", bias, shape)
    if same_dtype_params:
        _checks.check_param_dtypes(op, input, weight=weight, bias=bias)
    _checks.check_eps(op, eps)
    if input.numel() == 0:
        return empty_output(input, weight, bias)
    return standardize_affine(input, weight, bias, tuple(range(-len(shape), 0)), eps, center)[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``: same signature and semantics (a contiguous output, as torch's)."""
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    return normalize_trailing("layer_norm", input, normalized_shape, weight, bias, eps, center=True).contiguous()
