"""Batch normalization (Ioffe & Szegedy, 2015, arXiv:1502.03167), torch's semantics.

Shapes: ``input (N, C, *)``; ``weight``, ``bias``, ``running_mean``, ``running_var`` of shape ``(C,)``.

Training, for each channel ``c`` over the ``n = N * prod(*)`` values of the batch and spatial dims::

    mean_c = sum(x) / n                var_c = sum((x - mean_c)**2) / n           (biased)
    y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c
    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * n / (n - 1)   (unbiased)

Eval (``training=False``): ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, with
``weight / sqrt(running_var + eps)`` applied as one power-of-two-split factor, so no intermediate overflows
where ``y`` is finite.

eps: torch's rule, ``eps > 0`` in training and ``eps >= 0`` in eval (``ValueError`` otherwise). Output
memory format: the input's suggested one (channels_last kept, anything else contiguous), as torch's.

Gradients (training): ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` with ``g = dy * weight``;
``dweight = sum(dy * x_hat)``, ``dbias = sum(dy)``. Eval: ``dx = g * rstd``.

Precision: statistics in float32 for half inputs (float64 for float64); the scaled-and-shifted moments of
:mod:`normkit._stats` keep a mean offset of 1e7 over unit noise, or a constant 1e7 input, exact, and keep
every intermediate finite from 1e-30 to the top of the dtype. Running statistics are updated in the
compute dtype and stored in their own dtype.
"""

from __future__ import annotations

from torch import Tensor

from .. import _checks
from .._stats import compute_dtype
from ._normalize import empty_output, standardize_affine, stats_affine, torch_layout


def channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    """A per-channel ``(C,)`` tensor viewed as ``(1, C, 1, ...)`` to broadcast against an ``ndim`` input."""
    return None if t is None else t.view(1, -1, *([1] * (ndim - 2)))


def momentum_update(running: Tensor | None, stat: Tensor, momentum: float) -> Tensor | None:
    """``(1 - momentum) * running + momentum * stat`` in the compute dtype, returned in ``running``'s dtype."""
    if running is None:
        return None
    ct = compute_dtype(running.dtype)
    return (running.to(ct) * (1.0 - momentum) + stat.to(ct) * momentum).to(running.dtype)


def check_norm_args(op, input, weight, bias, running_mean, running_var, momentum, eps, need_running):
    """Checks shared by batch and instance norm: ``(N, C, *)`` input and ``(C,)`` parameters."""
    _checks.check_floating(op, input)
    if input.dim() < 2 and input.numel() == 0:
        return  # torch returns an empty result for an empty 1-D input, whatever the other arguments
    _checks.check_min_dim(op, input, 2, "(N, C, *)")
    num_features = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _checks.check_param(op, name, t, (num_features,))
    _checks.check_param_dtypes(op, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _checks.check_eps(op, eps)
    _checks.check_momentum(op, momentum)
    if need_running and (running_mean is None or running_var is None):
        raise _checks.NormArgumentError(
            f"{op}: running_mean and running_var must be given to normalize with running statistics; "
            f"pass them, or normalize with batch statistics (training=True / use_input_stats=True)"
        )


def batch_norm_stateless(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch norm as a pure function: returns ``(output, new_running_mean, new_running_var)``.

    Nothing is mutated, so it composes with ``torch.func`` (``vmap``, ``grad``, ``jacrev``). The new
    running statistics are ``None`` where the given ones are ``None``, and the given ones in eval mode.
    """
    op = "batch_norm"
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
    new_mean = momentum_update(running_mean, mean.reshape(num_features), momentum)
    new_var = momentum_update(running_var, var.reshape(num_features) * (n / (n - 1)), momentum)
    return y, new_mean, new_var


def write_back(running: Tensor | None, new: Tensor | None) -> None:
    """Store updated running statistics in place (the only side effect of the torch-style API)."""
    if running is not None and new is not None and new is not running:
        running.detach().copy_(new.detach())


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm``: same signature and semantics; running statistics are updated
    in place when ``training`` is True. See :func:`batch_norm_stateless` for the pure form."""
    y, new_mean, new_var = batch_norm_stateless(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        write_back(running_mean, new_mean)
        write_back(running_var, new_var)
    return y
