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

from .. import _checks
from .._spec import autocast_inputs
from . import _plan
from ._normalize import empty_output, standardize_affine, torch_layout


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm``: same signature and semantics."""
    op = "group_norm"
    route = _plan.route(op, input, (num_groups, eps), weight, bias)  # a checked signature: the kernel
    if route is not None:
        return route(input, weight, bias)
    input, weight, bias = autocast_inputs(op, input, weight, bias)
    _checks.check_group_norm(op, input, num_groups, weight, bias, eps)
    if input.numel() == 0:
        return empty_output(input, weight, bias)
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, c // num_groups, -1)
    view = (lambda t: None if t is None else t.view(1, num_groups, c // num_groups, 1))
    y = standardize_affine(grouped, view(weight), view(bias), (2, 3), eps)[0].reshape(input.shape)
    return torch_layout(y, input)
