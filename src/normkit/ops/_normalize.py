"""The two autograd Functions that every statistics-based normalization is built from.

``y = x_hat * weight + bias`` where either

* :class:`StandardizeAffine`: ``x_hat`` is standardized with statistics of ``x`` itself over ``dims``
  (batch norm in training, instance, layer, group and RMS norm), or
* :class:`StatsAffine`: ``x_hat = (x - mean) * rsqrt(var + eps)`` with given statistics
  (batch / instance norm with running statistics in eval mode).

``weight`` and ``bias`` arrive already viewed to a shape that broadcasts against ``x``.

Gradients (closed form, ``g = dy * weight``, means over each reduction group, ``rstd = 1/sqrt(var+eps)``):

* statistics of ``x``: ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))``
  (without the ``mean(g)`` term when not centred, i.e. RMS norm);
* given statistics: ``dx = g * rstd``;
* ``dweight = sum(dy * x_hat)``, ``dbias = sum(dy)`` over every broadcast dimension.

Backward is written in differentiable torch ops. When a graph is being built (``create_graph=True``),
it first rebuilds ``x_hat`` from ``x`` with those ops, so double backward differentiates through the
statistics exactly; otherwise it reuses the ``x_hat`` saved by forward.

Precision: statistics and ``x_hat`` in the compute dtype (float32 for half inputs); output cast back to the
input's dtype, gradients to their inputs' dtypes. Overflow handling lives in :mod:`normkit._stats`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._stats import compute_dtype, normalize_with_stats, standardize, standardize_backward


def _output(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``y = x_hat * weight + bias`` in ``dtype``; always a tensor of its own, never ``x_hat`` itself
    (``x_hat`` is also returned, as a non-differentiable output, and the two must not alias)."""
    y = x_hat
    if weight is not None:
        y = y * weight.to(x_hat.dtype)
    if bias is not None:
        y = y + bias.to(x_hat.dtype)
    y = y.to(dtype)
    return y.clone() if y is x_hat else y


def _affine_grads(dy: Tensor, x_hat: Tensor, weight: Tensor | None, bias: Tensor | None, needs) -> tuple:
    """``(g, dweight, dbias)`` for ``y = x_hat * weight + bias``; ``dy`` in the compute dtype."""
    g = dy if weight is None else dy * weight.to(dy.dtype)
    dweight = (dy * x_hat).sum_to_size(weight.shape).to(weight.dtype) if weight is not None and needs[1] else None
    dbias = dy.sum_to_size(bias.shape).to(bias.dtype) if bias is not None and needs[2] else None
    return g, dweight, dbias


class StandardizeAffine(torch.autograd.Function):
    """``y = standardize(x over dims) * weight + bias``; also returns the statistics.

    Outputs: ``y`` (dtype of ``x``), then, non-differentiable, in the compute dtype and keepdim shape:
    ``x_hat`` (full shape), ``r``, ``k`` (``rstd = r * 2**k``), ``mean``, ``var`` (biased).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: Sequence[int], eps: float, center: bool):
        s = standardize(x.to(compute_dtype(x.dtype)), dims, eps, center)
        return _output(s.x_hat, weight, bias, x.dtype), s.x_hat, s.r, s.k, s.mean, s.var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, dims, eps, center = inputs
        _, x_hat, r, k, mean, var = output
        ctx.mark_non_differentiable(x_hat, r, k, mean, var)
        ctx.save_for_backward(x, weight, bias, x_hat, r, k)
        ctx.dims, ctx.eps, ctx.center = tuple(dims), eps, center

    @staticmethod
    def backward(ctx, dy, *unused):
        x, weight, bias, x_hat, r, k = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: rebuild the statistics as a function of x
            s = standardize(x.to(compute_dtype(x.dtype)), ctx.dims, ctx.eps, ctx.center)
            x_hat, r, k = s.x_hat, s.r, s.k
        dy = dy.to(x_hat.dtype)
        g, dweight, dbias = _affine_grads(dy, x_hat, weight, bias, ctx.needs_input_grad)
        dx = standardize_backward(g, x_hat, r, k, ctx.dims, ctx.center).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dweight, dbias, None, None, None


class StatsAffine(torch.autograd.Function):
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` with given statistics (no gradient to them).

    Outputs: ``y`` (dtype of ``x``) and, non-differentiable, ``x_hat`` in the compute dtype.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        ct = compute_dtype(x.dtype)
        x_hat, _ = normalize_with_stats(x.to(ct), mean.to(ct), var.to(ct), eps)
        return _output(x_hat, weight, bias, x.dtype), x_hat

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, mean, var, weight, bias, output[1])
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, unused):
        x, mean, var, weight, bias, x_hat = ctx.saved_tensors
        ct = x_hat.dtype
        rstd = torch.rsqrt(var.to(ct) + ctx.eps)
        if torch.is_grad_enabled():  # double backward: x_hat as a function of x
            x_hat, rstd = normalize_with_stats(x.to(ct), mean.to(ct), var.to(ct), ctx.eps)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        g, dweight, dbias = _affine_grads(dy.to(ct), x_hat, weight, bias, needs)
        dx = (g * rstd).to(x.dtype) if needs[0] else None
        return dx, None, None, dweight, dbias, None


def empty_output(input: Tensor, *params: Tensor | None) -> Tensor:
    """The result for an input with no elements: an empty tensor of its shape, connected to the parameters
    so that they receive zero gradients (as torch's do) rather than none."""
    y = input.clone()
    for p in params:
        if p is not None and p.requires_grad:
            y = y + 0 * p.sum().to(y.dtype)
    return y


def standardize_affine(x, weight, bias, dims, eps, center=True):
    """Apply :class:`StandardizeAffine`; returns ``(y, mean, var)`` with biased ``var`` (keepdim shape)."""
    y, _, _, _, mean, var = StandardizeAffine.apply(x, weight, bias, tuple(dims), float(eps), center)
    return y, mean, var


def stats_affine(x, mean, var, weight, bias, eps):
    """Apply :class:`StatsAffine`; returns ``y``."""
    return StatsAffine.apply(x, mean, var, weight, bias, float(eps))[0]
