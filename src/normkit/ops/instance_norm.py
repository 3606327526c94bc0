"""Instance normalization (Ulyanov et al., 2016, arXiv:1607.08022), torch's semantics.

Shapes: ``input (N, C, *)``; ``weight``, ``bias``, ``running_mean``, ``running_var`` of shape ``(C,)``.

With ``use_input_stats`` (the default), each ``(n, c)`` slice is standardized over its ``m = prod(*)``
spatial values -- batch norm with one sample per group -- and running statistics, when given, move
towards the batch average of the per-instance statistics::

    x_hat = (x - mean_nc) / sqrt(var_nc + eps)        y = x_hat * weight_c + bias_c
    running_mean <- (1 - momentum) * running_mean + momentum * mean_n(mean_nc)
    running_var  <- (1 - momentum) * running_var  + momentum * mean_n(var_nc * m / (m - 1))

    g = dy * weight_c        dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (means over the slice)
    dweight_c = sum(dy * x_hat)        dbias_c = sum(dy)

Without it, the running statistics normalize, as batch norm does in eval mode
(``y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias``, ``dx = dy * weight * rstd``).

In terms of the spec (:mod:`normkit._spec`): ``standardize`` over dims ``(2, ...)`` and ``affine``, backward
``normalize_backward``, running statistics ``running_stats`` (of the batch averages); without input statistics
``affine_with_stats`` and ``affine_with_stats_backward``. :func:`~normkit.ops._normalize.standardize_affine`
and :func:`~normkit.ops._normalize.stats_affine` run them, through a native kernel where one applies.
Contract (torch's): parameters as for batch norm, but any eps (torch checks none here); a contiguous output.
"""

from __future__ import annotations

import math

from .. import _checks
from .. import _spec as spec
from . import _plan
from ._normalize import channel_view, check_norm_args, empty_output, standardize_affine, stats_affine, write_back


def instance_norm_stateless(input, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm as a pure function: returns ``(output, new_running_mean, new_running_var)``.

    The output is contiguous whatever the input's memory format, as torch's is."""
    op = "instance_norm"
    route = _plan.route(op, input, (use_input_stats, momentum, eps), running_mean, running_var, weight, bias)
    if route is not None:  # a checked signature: the kernel
        return route(input, running_mean, running_var, weight, bias)
    check_norm_args(op, input, weight, bias, running_mean, running_var, momentum, eps, need_running=not use_input_stats)
    if input.numel() == 0:
        return empty_output(input, weight, bias), running_mean, running_var
    m = math.prod(input.shape[2:])
    if use_input_stats:
        _checks.check_more_than_one(op, input, m, "spatial element")
    w, b = channel_view(weight, input.dim()), channel_view(bias, input.dim())
    if not use_input_stats:
        mean, var = channel_view(running_mean, input.dim()), channel_view(running_var, input.dim())
        return stats_affine(input, mean, var, w, b, eps).contiguous(), running_mean, running_var
    num_features = input.shape[1]
    y, mean, var = standardize_affine(input, w, b, tuple(range(2, input.dim())), eps)
    y = y.contiguous()
    running_mean, running_var = spec.running_stats(running_mean, running_var, mean.reshape(-1, num_features).mean(0),
                                                   var.reshape(-1, num_features).mean(0), m, momentum)
    return y, running_mean, running_var


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm``: same signature and semantics; running statistics, when given
    with ``use_input_stats``, are updated in place. See :func:`instance_norm_stateless` for the pure form."""
    y, new_mean, new_var = instance_norm_stateless(input, running_mean, running_var, weight, bias,
                                                   use_input_stats, momentum, eps)
    if use_input_stats:
        write_back(running_mean, new_mean)
        write_back(running_var, new_var)
    return y
