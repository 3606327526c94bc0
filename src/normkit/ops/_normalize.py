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

Forward-mode tangents (``jvp``), for input tangents ``(tx, tweight, tbias)``:

* ``ty = J(tx) * weight + x_hat * tweight + tbias`` where ``J`` is the Jacobian of standardization, which
  is symmetric: ``J(tx)`` is the backward formula above applied to ``tx`` (:func:`normkit._stats.standardize_jvp`);
* given statistics: ``J(tx) = tx * rstd`` (the statistics are constants, as in backward).

Backward and jvp are written in differentiable torch ops. When grad mode is on inside them (backward with
``create_graph=True``; jvp nearly always, since reverse mode may be differentiating it and functorch's
wrapped tensors do not say whether it is), they first rebuild ``x_hat`` from ``x`` with those ops, so second
derivatives (double backward, ``hessian``, ``jacrev(jacfwd(f))``) differentiate through the statistics
exactly; otherwise they reuse the ``x_hat`` saved by forward. The rebuild costs one more standardization.

Tool chain: no host syncs and no Python branching on tensor values, so both Functions trace under
``torch.export``, ``torch.compile(fullgraph=True)`` and on the meta device; ``generate_vmap_rule`` gives
``vmap``, ``jvp`` gives ``jvp``/``jacfwd``/``hessian`` (on a subclass that dynamo never sees: :func:`_with_jvp`).

Precision: statistics and ``x_hat`` in the compute dtype (float32 for half inputs); output cast back to the
input's dtype, gradients to their inputs' dtypes. Overflow handling lives in :mod:`normkit._stats`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import _fast
from .._stats import affine_with_stats, compute_dtype, mul_product, normalize_with_stats, standardize, standardize_backward, standardize_jvp


def _output(xw: Tensor, bias: Tensor | None, dtype: torch.dtype, x_hat: Tensor) -> Tensor:
    """``y = xw + bias`` in ``dtype`` (``xw = x_hat * weight``); always a tensor of its own, never ``x_hat``
    itself (``x_hat`` is also returned, as a non-differentiable output, and the two must not alias)."""
    y = xw if bias is None else xw + bias.to(xw.dtype)
    y = y.to(dtype)
    return y.clone() if y is x_hat else y


def _times(t: Tensor, weight: Tensor | None) -> Tensor:
    """``t * weight`` in ``t``'s dtype (``t`` when there is no weight)."""
    return t if weight is None else t * weight.to(t.dtype)


def _affine_grads(dy: Tensor, x_hat: Tensor, weight: Tensor | None, bias: Tensor | None, needs) -> tuple:
    """``(g, dweight, dbias)`` for ``y = x_hat * weight + bias``; ``dy`` in the compute dtype."""
    g = _times(dy, weight)
    dweight = (dy * x_hat).sum_to_size(weight.shape).to(weight.dtype) if weight is not None and needs[1] else None
    dbias = dy.sum_to_size(bias.shape).to(bias.dtype) if bias is not None and needs[2] else None
    return g, dweight, dbias


def _affine_tangent(tx_hat: Tensor, x_hat: Tensor, tweight: Tensor | None, tbias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Tangent of ``y = x_hat * weight + bias`` given ``tx_hat * weight`` (already weighted):
    ``tx_hat * weight + x_hat * tweight + tbias``, returned in ``dtype``."""
    ty = tx_hat
    if tweight is not None:
        ty = ty + x_hat * tweight.to(x_hat.dtype)
    if tbias is not None:
        ty = ty + tbias.to(x_hat.dtype)
    return ty.to(dtype)


class StandardizeAffine(torch.autograd.Function):
    """``y = standardize(x over dims) * weight + bias``; also returns the statistics.

    Outputs: ``y`` (dtype of ``x``), then, non-differentiable, in the compute dtype and keepdim shape:
    ``x_hat`` (full shape), ``r``, ``k`` (``rstd = r * 2**k``), ``mean``, ``var`` (biased).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: Sequence[int], eps: float, center: bool):
        s = standardize(x.to(compute_dtype(x.dtype)), dims, eps, center)
        return _output(_times(s.x_hat, weight), bias, x.dtype, s.x_hat), s.x_hat, s.r, s.k, s.mean, s.var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, dims, eps, center = inputs
        _, x_hat, r, k, mean, var = output
        ctx.mark_non_differentiable(x_hat, r, k, mean, var)
        ctx.save_for_backward(x, weight, bias, x_hat, r, k)
        ctx.save_for_forward(x, weight, bias, x_hat, r, k)
        ctx.dims, ctx.eps, ctx.center = tuple(dims), eps, center

    @staticmethod
    def _statistics(ctx, x, x_hat, r, k, rebuild: bool):
        """``(x_hat, r, k)``: as saved, or rebuilt as a function of ``x`` when a graph is being built."""
        if rebuild:
            s = standardize(x.to(compute_dtype(x.dtype)), ctx.dims, ctx.eps, ctx.center)
            return s.x_hat, s.r, s.k
        return x_hat, r, k

    @staticmethod
    def backward(ctx, dy, *unused):
        x, weight, bias, x_hat, r, k = ctx.saved_tensors
        x_hat, r, k = StandardizeAffine._statistics(ctx, x, x_hat, r, k, torch.is_grad_enabled())
        dy = dy.to(x_hat.dtype)
        g, dweight, dbias = _affine_grads(dy, x_hat, weight, bias, ctx.needs_input_grad)
        dx = standardize_backward(g, x_hat, r, k, ctx.dims, ctx.center).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dweight, dbias, None, None, None

    @staticmethod
    def tangent(ctx, tx, tweight, tbias, *unused):
        """The ``jvp`` of :class:`StandardizeAffineJvp` (see :func:`_with_jvp`)."""
        x, weight, bias, x_hat, r, k = ctx.saved_tensors
        x_hat, r, k = StandardizeAffine._statistics(ctx, x, x_hat, r, k, torch.is_grad_enabled())
        tx_hat = torch.zeros_like(x_hat) if tx is None else standardize_jvp(tx.to(x_hat.dtype), x_hat, r, k, ctx.dims, ctx.center)
        return _affine_tangent(_times(tx_hat, weight), x_hat, tweight, tbias, x.dtype), None, None, None, None, None


class StatsAffine(torch.autograd.Function):
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` with given statistics (no gradient to them).

    ``weight * rsqrt(var + eps)`` is applied as one power-of-two-split factor (:func:`normkit._stats.mul_product`),
    so no intermediate overflows where ``y`` is finite. Outputs: ``y`` (dtype of ``x``) and, non-differentiable,
    ``x_hat`` in the compute dtype.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        ct = compute_dtype(x.dtype)
        w = None if weight is None else weight.to(ct)
        x_hat, _, xw = affine_with_stats(x.to(ct), mean.to(ct), var.to(ct), eps, w)
        return _output(xw, bias, x.dtype, x_hat), x_hat

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, mean, var, weight, bias, output[1])
        ctx.save_for_forward(x, mean, var, weight, bias, output[1])
        ctx.eps = eps

    @staticmethod
    def _statistics(ctx, x, mean, var, x_hat, rebuild: bool):
        """``(x_hat, rstd)``: ``x_hat`` as saved, or rebuilt as a function of ``x`` when a graph is being built."""
        ct = x_hat.dtype
        if rebuild:
            return normalize_with_stats(x.to(ct), mean.to(ct), var.to(ct), ctx.eps)
        return x_hat, torch.rsqrt(var.to(ct) + ctx.eps)

    @staticmethod
    def backward(ctx, dy, unused):
        x, mean, var, weight, bias, x_hat = ctx.saved_tensors
        x_hat, rstd = StatsAffine._statistics(ctx, x, mean, var, x_hat, torch.is_grad_enabled())
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dy = dy.to(x_hat.dtype)
        _, dweight, dbias = _affine_grads(dy, x_hat, weight, bias, needs)
        w = None if weight is None else weight.to(x_hat.dtype)
        dx = mul_product(dy, w, rstd).to(x.dtype) if needs[0] else None  # dy * weight * rstd
        return dx, None, None, dweight, dbias, None

    @staticmethod
    def tangent(ctx, tx, tmean, tvar, tweight, tbias, unused):
        """The ``jvp`` of :class:`StatsAffineJvp` (see :func:`_with_jvp`)."""
        x, mean, var, weight, bias, x_hat = ctx.saved_tensors
        x_hat, rstd = StatsAffine._statistics(ctx, x, mean, var, x_hat, torch.is_grad_enabled())
        w = None if weight is None else weight.to(x_hat.dtype)
        txw = torch.zeros_like(x_hat) if tx is None else mul_product(tx.to(x_hat.dtype), w, rstd)  # tx * weight * rstd
        return _affine_tangent(txw, x_hat, tweight, tbias, x.dtype), None


def _with_jvp(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``function`` with its ``tangent`` installed as ``jvp``, for forward-mode AD.

    Two classes because torch 2.13's dynamo refuses to trace an ``autograd.Function`` that defines ``jvp``
    ("Unsupported custom jvp"): under ``torch.compile`` the class without it runs (forward-mode AD inside a
    compiled region is then unsupported, as for any such Function), everywhere else the one with it.
    """
    return type(f"{function.__name__}Jvp", (function,), {"jvp": staticmethod(function.tangent), "__doc__": function.__doc__})


StandardizeAffineJvp = _with_jvp(StandardizeAffine)
StatsAffineJvp = _with_jvp(StatsAffine)


def _pick(function, with_jvp):
    """The class to apply: without ``jvp`` while dynamo traces (it cannot trace one), with it otherwise."""
    return function if torch.compiler.is_compiling() else with_jvp


def empty_output(input: Tensor, *params: Tensor | None) -> Tensor:
    """The result for an input with no elements: an empty tensor of its shape, connected to the parameters
    so that they receive zero gradients (as torch's do) rather than none."""
    y = input.clone()
    for p in params:
        if p is not None and p.requires_grad:
            y = y + 0 * p.sum().to(y.dtype)
    return y


def torch_layout(y: Tensor, input: Tensor) -> Tensor:
    """``y`` in the memory format torch's batch, group and RMS norm give their output: the input's suggested
    format (channels_last / channels_last_3d when its strides are ordered that way, even if not dense),
    contiguous otherwise -- so a transposed or sliced input gives a contiguous output, as torch's does.
    Decided from strides alone (no data), so it traces under export and compile."""
    return y.contiguous(memory_format=suggest_memory_format(input))


def standardize_affine(x, weight, bias, dims, eps, center=True):
    """Apply :class:`StandardizeAffine`; returns ``(y, mean, var)`` with biased ``var`` (keepdim shape).
    A fused native kernel serves instead where one applies (:mod:`normkit.ops._fast`)."""
    fast = _fast.standardize_affine(x, weight, bias, dims, eps, center)
    if fast is not None:
        return fast
    y, _, _, _, mean, var = _pick(StandardizeAffine, StandardizeAffineJvp).apply(x, weight, bias, tuple(dims), float(eps), center)
    return y, mean, var


def stats_affine(x, mean, var, weight, bias, eps):
    """Apply :class:`StatsAffine`; returns ``y``. A fused native kernel serves instead where one applies."""
    fast = _fast.stats_affine(x, mean, var, weight, bias, eps)
    if fast is not None:
        return fast
    return _pick(StatsAffine, StatsAffineJvp).apply(x, mean, var, weight, bias, float(eps))[0]
