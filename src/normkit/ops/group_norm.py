"""Group normalization (Wu & He, 2018, arXiv:1803.08494), torch's semantics.

Shapes: ``input (N, C, *)``; ``weight``, ``bias`` of shape ``(C,)``; ``C`` divisible by ``num_groups``.
The ``C / num_groups`` channels of each group and all their spatial values, per sample, are standardized::

    mean_ng, var_ng (biased) over the group     x_hat = (x - mean_ng) / sqrt(var_ng + eps)
    y = x_hat * weight_c + bias_c

    g = dy * weight_c        dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))      (means over the group)
    dweight_c = sum over n and * of dy * x_hat       dbias_c = sum of dy

In terms of the spec (:mod:`normkit._spec`): the input viewed as ``(N, groups, C / groups, S)``, then
``standardize`` over dims ``(2, 3)`` and ``affine`` with the per-channel parameters viewed alike; backward
``normalize_backward``. :func:`~normkit.ops._normalize.standardize_affine` runs them, through the native
group kernels (contiguous and channels-last) where they apply.

Precision: the spec's policy, as layer norm's.
Contract (torch's): parameters as for layer norm; any eps; the output in the input's suggested memory
format (channels_last kept, any other non-contiguous input gives a contiguous output).
"""

from __future__ import annotations

import numbers

from .. import _checks
from .._spec import autocast_inputs
from ._normalize import empty_output, standardize_affine, torch_layout


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm``: same signature and semantics."""
    op = "group_norm"
    input, weight, bias = autocast_inputs(op, input, weight, bias)
    _checks.check_floating(op, input)
    _checks.check_min_dim(op, input, 2, "(N, C, *)")
    n, c = input.shape[:2]
    if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool) or num_groups < 1:
        raise _checks.NormArgumentError(f"{op}: num_groups must be a positive integer, got {num_groups!r}")
    if c % num_groups:
        raise _checks.NormArgumentError(
            f"{op}: Expected number of channels in input to be divisible by num_groups, but got input of "
            f"shape {list(input.shape)} and num_groups={num_groups}; num_groups={num_groups} must divide num_channels={c}"
        )
    _checks.check_param(op, "weight", weight, (c,))
    _checks.check_param(op, "bias", bias, (c,))
    _checks.check_param_dtypes(op, input, weight=weight, bias=bias)
    _checks.check_eps(op, eps)
    if input.numel() == 0:
        return empty_output(input, weight, bias)
    grouped = input.reshape(n, num_groups, c // num_groups, -1)
    view = (lambda t: None if t is None else t.view(1, num_groups, c // num_groups, 1))
    y = standardize_affine(grouped, view(weight), view(bias), (2, 3), eps)[0].reshape(input.shape)
    return torch_layout(y, input)
