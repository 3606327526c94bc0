"""Batch normalization (Ioffe & Szegedy, 2015, arXiv:1502.03167), torch's semantics.

Shapes: ``input (N, C, *)``; ``weight``, ``bias``, ``running_mean``, ``running_var`` of shape ``(C,)``.

Training, for each channel ``c`` over the ``n = N * prod(*)`` values of the batch and spatial dims::

    mean_c = sum(x) / n                var_c = sum((x - mean_c)**2) / n           (biased)
    x_hat = (x - mean_c) / sqrt(var_c + eps)          y = x_hat * weight_c + bias_c
    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * n / (n - 1)   (unbiased)

    g = dy * weight      dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))      (means over the channel)
    dweight = sum(dy * x_hat)        dbias = sum(dy)

Eval (``training=False``), with the running statistics::

    y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias
    dx = dy * weight / sqrt(running_var + eps)       dweight = sum(dy * x_hat)    dbias = sum(dy)

In terms of the spec (:mod:`normkit._spec`): training is ``standardize`` over dims ``(0, 2, ...)`` --
``moments`` then ``standardize_from_moments`` -- and ``affine``, backward ``normalize_backward``
(``affine_backward`` then ``standardize_backward``), running statistics ``running_stats``; eval is
``affine_with_stats`` and ``affine_with_stats_backward`` (``weight / sqrt(running_var + eps)`` one split
factor, so no intermediate overflows where ``y`` is finite). :func:`~normkit.ops._normalize.standardize_affine`
and :func:`~normkit.ops._normalize.stats_affine` run them, through a native kernel where one applies.
SyncBatchNorm (:mod:`normkit.ops.sync_batch_norm`) is the same with the moments merged across ranks.

eps: torch's rule, ``eps > 0`` in training and ``eps >= 0`` in eval (``ValueError`` otherwise). Output
memory format: the input's suggested one (channels_last kept, anything else contiguous), as torch's.
Precision: the spec's policy -- statistics in float32 for half inputs (float64 for float64); a mean offset
of 1e7 over unit noise, a constant 1e7 input, magnitudes from 1e-30 to the top of the dtype stay exact or
finite. Running statistics are updated in the compute dtype and stored in their own dtype.
"""

from __future__ import annotations

from .. import _checks
from .. import _spec as spec
from . import _plan
from ._normalize import channel_view, check_norm_args, empty_output, standardize_affine, stats_affine, torch_layout, write_back


def batch_norm_stateless(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch norm as a pure function: returns ``(output, new_running_mean, new_running_var)``.

    Nothing is mutated, so it composes with ``torch.func`` (``vmap``, ``grad``, ``jacrev``). The new
    running statistics are ``None`` where the given ones are ``None``, and the given ones in eval mode.
    """
    op = "batch_norm"
    route = _plan.route(op, input, (training, momentum, eps), running_mean, running_var, weight, bias)
    if route is not None:  # a checked signature: the kernel
        return route(input, running_mean, running_var, weight, bias)
    check_norm_args(op, input, weight, bias, running_mean, running_var, momentum, eps, need_running=not training)
    _checks.check_batch_norm_eps(op, eps, training)
    if input.numel() == 0:  # an empty batch normalizes nothing and leaves the statistics alone
        return empty_output(input, weight, bias), running_mean, running_var
    num_features = input.shape[1]
    n = input.numel() // num_features
    if training:
        _checks.check_more_than_one(op, input, n, "value per channel")
    w, b = channel_view(weight, input.dim()), channel_view(bias, input.dim())
    if not training:
        mean, var = channel_view(running_mean, input.dim()), channel_view(running_var, input.dim())
        return torch_layout(stats_affine(input, mean, var, w, b, eps), input), running_mean, running_var
    dims = (0, *range(2, input.dim()))
    y, mean, var = standardize_affine(input, w, b, dims, eps)
    y = torch_layout(y, input)
    new_mean, new_var = spec.running_stats(running_mean, running_var, mean.reshape(num_features), var.reshape(num_features),
                                           n, momentum)
    return y, new_mean, new_var


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm``: same signature and semantics; running statistics are updated
    in place when ``training`` is True. See :func:`batch_norm_stateless` for the pure form."""
    y, new_mean, new_var = batch_norm_stateless(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        write_back(running_mean, new_mean)
        write_back(running_var, new_var)
    return y
