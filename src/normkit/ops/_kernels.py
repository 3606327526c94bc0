"""The native kernels as ``torch.library`` custom ops: registration, fake kernels and autograd.

The C++ entry points (``ops/norm_kernel.cpp``, ``ops/channels_last_kernel.cpp``) implement the functions of
:mod:`normkit._spec` named in the comment above each of their loops. Here they become four custom ops,

* ``normkit::stats_norm(x, weight, bias, layout, groups, eps, center) -> (y, stats)``: statistics of ``x``
  per group, ``y = standardize(x) * weight + bias``; ``stats (groups, 8)`` float32 holds
  ``e, pivot, mean_d, r, k, mean, var`` (``Stat`` in ``norm_common.h``);
* ``normkit::stats_norm_backward(dy, x, weight, stats, ...) -> (dx, dweight, dbias)``;
* ``normkit::affine_eval(x, mean, var, weight, bias, eps) -> y``: given statistics per channel;
* ``normkit::affine_eval_backward(dy, x, mean, var, weight, eps, ...) -> (dx, dweight, dbias)``,

with fake kernels, so fx, ``torch.compile`` and ``torch.export`` see one op each. A training forward keeps
for backward only the input and 8 floats per group; backward recomputes ``x_hat`` in the kernel. When a
graph is being built in backward (double backward) the backward runs in the spec's differentiable torch ops
instead. Which layout and view of the input a call uses is decided by :mod:`normkit.ops._plan`.

Layouts (the ``layout`` argument): ``ROWS`` ``x (R, D)``, a group per row, affine per element (layer / RMS
norm); ``GROUPS`` ``x (N, C, S)``, a group per ``(n, g)`` of ``C / groups`` consecutive channels, affine per
channel (group, instance norm); ``CHANNELS`` ``x (N, C, S)``, a group per channel (batch norm in training);
``GROUPS_CL`` ``x (N, S, C)``, channels last, a group per ``(n, g)`` of ``S`` rows by ``C / groups``
channels. ``affine_eval`` takes ``x (N, C, S)``, or ``(R, C)`` for channels last.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .. import _spec as spec

ROWS, GROUPS, CHANNELS = 0, 1, 2
GROUPS_CL = 3  # channels last: x (N, S, C), a group per (n, g) = S rows x C / groups channels (channels_last_kernel.cpp)


def _n_groups(x_shape, layout: int, groups: int) -> int:
    return x_shape[0] if layout == ROWS else x_shape[0] * groups if layout in (GROUPS, GROUPS_CL) else x_shape[1]


def _n_params(x_shape, layout: int) -> int:
    return x_shape[2] if layout == GROUPS_CL else x_shape[1]  # D for rows, C for (N, C, S) and (N, S, C)


def _entry(name: str, channels_last: bool):
    """The kernel function ``name`` of norm_kernel.cpp, or its ``name_cl`` twin of channels_last_kernel.cpp."""
    if channels_last:
        return getattr(_native.load("channels_last_kernel"), f"{name}_cl")
    return getattr(_native.load("norm_kernel"), name)


# ---- custom ops -------------------------------------------------------------------------------------------

def _stats_norm(x: Tensor, weight: Tensor, bias: Tensor, layout: int, groups: int, eps: float, center: bool) -> tuple[Tensor, Tensor]:
    """``(y, stats)``: ``y = standardize(x) * weight + bias`` per group; ``stats`` (groups, 8) float32 holds
    ``e, pivot, mean_d, r, k, mean, var`` (``Stat`` in norm_common.h). weight/bias: float32 of D (rows) or C values."""
    y, stats = _entry("stats_forward", layout == GROUPS_CL)(x, weight, bias, layout, groups, eps, center)
    return y, stats


stats_norm = torch.library.custom_op("normkit::stats_norm", _stats_norm, mutates_args=())


@stats_norm.register_fake
def _(x, weight, bias, layout, groups, eps, center):
    return x.new_empty(x.shape), x.new_empty((_n_groups(x.shape, layout, groups), 8), dtype=torch.float32)


def _stats_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, stats: Tensor, layout: int, groups: int, center: bool,
                    need_dx: bool, need_param: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`stats_norm` (empty tensors where not asked for; parameter grads float32)."""
    dx, dw, db = _entry("stats_backward", layout == GROUPS_CL)(dy, x, weight, stats, layout, groups, center, need_dx, need_param)
    return dx, dw, db


stats_norm_backward = torch.library.custom_op("normkit::stats_norm_backward", _stats_norm_bwd, mutates_args=())


@stats_norm_backward.register_fake
def _(dy, x, weight, stats, layout, groups, center, need_dx, need_param):
    n = _n_params(x.shape, layout) if need_param else 0
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32))


def _eager_view(x: Tensor, weight: Tensor, layout: int, groups: int):
    """``x`` and ``weight`` shaped for the eager formulas, and the reduced dims."""
    if layout == ROWS:
        return x, weight, (1,)
    if layout == GROUPS_CL:
        n, s, c = x.shape
        return x.view(n, s, groups, c // groups), weight.view(1, 1, groups, c // groups), (1, 3)
    n, c, s = x.shape
    if layout == GROUPS:
        return x.view(n, groups, c // groups, s), weight.view(1, groups, c // groups, 1), (2, 3)
    return x, weight.view(1, c, 1), (0, 2)


def _stats_norm_setup(ctx, inputs, output):
    x, weight, bias, layout, groups, eps, center = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])  # the input and O(groups) statistics: no x_hat
    ctx.args = (layout, groups, eps, center)


def _stats_norm_backward(ctx, dy, dstats):
    x, weight, stats = ctx.saved_tensors
    layout, groups, eps, center = ctx.args
    need_dx, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # double backward: the spec's differentiable ops, statistics rebuilt from x
        xv, wv, dims = _eager_view(x, weight, layout, groups)
        s = spec.standardize(xv.to(spec.compute_dtype(x.dtype)), dims, eps, center)
        dx, dw, db = spec.normalize_backward(dy.reshape(xv.shape).to(s.x_hat.dtype), s.x_hat, s.r, s.k, wv, wv, dims,
                                             center, (need_dx, need_w, need_b))
        return (None if dx is None else dx.to(x.dtype).view(x.shape), None if dw is None else dw.reshape(weight.shape),
                None if db is None else db.reshape(weight.shape), None, None, None, None)
    dx, dw, db = _route(stats_norm_backward, _stats_norm_bwd, dy)(
        dy.contiguous(), x, weight, stats, layout, groups, center, need_dx, need_w or need_b)
    return dx if need_dx else None, dw if need_w else None, db if need_b else None, None, None, None, None


stats_norm.register_autograd(_stats_norm_backward, setup_context=_stats_norm_setup)


def _affine_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` per channel of ``x (N, C, S)``, or of ``x (R, C)``
    (channels last), as :func:`normkit._spec.affine_with_stats`; params float32 (C,)."""
    return _entry("eval_forward", x.dim() == 2)(x, mean, var, weight, bias, eps)


affine_eval = torch.library.custom_op("normkit::affine_eval", _affine_eval, mutates_args=())


@affine_eval.register_fake
def _(x, mean, var, weight, bias, eps):
    return x.new_empty(x.shape)


def _affine_eval_bwd(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, eps: float,
                     need_dx: bool, need_param: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`affine_eval` (empty where not asked for)."""
    dx, dw, db = _entry("eval_backward", x.dim() == 2)(dy, x, mean, var, weight, eps, need_dx, need_param)
    return dx, dw, db


affine_eval_backward = torch.library.custom_op("normkit::affine_eval_backward", _affine_eval_bwd, mutates_args=())


@affine_eval_backward.register_fake
def _(dy, x, mean, var, weight, eps, need_dx, need_param):
    n = x.shape[1] if need_param else 0
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32))


def _affine_eval_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps = eps


def _affine_eval_backward(ctx, dy):
    x, mean, var, weight = ctx.saved_tensors
    need_dx, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if torch.is_grad_enabled():  # double backward: the spec's differentiable ops
        ct = spec.compute_dtype(x.dtype)
        view = (lambda t: t.view(1, -1, *[1] * (x.dim() - 2)))  # (N, C, S) or channels-last (R, C)
        dyc = dy.to(ct)
        dims = [0, *range(2, x.dim())]  # every dim but the channels'
        dx, dw = spec.affine_with_stats_backward(dyc, x.to(ct), view(mean), view(var), ctx.eps, view(weight), dims, need_dx,
                                                 need_w)
        dw = dw.reshape(-1) if need_w else None
        db = dyc.sum_to_size(view(weight).shape).reshape(-1) if need_b else None
        return (None if dx is None else dx.to(x.dtype)), None, None, dw, db, None
    dx, dw, db = _route(affine_eval_backward, _affine_eval_bwd, dy)(
        dy.contiguous(), x, mean, var, weight, ctx.eps, need_dx, need_w or need_b)
    return dx if need_dx else None, None, None, dw if need_w else None, db if need_b else None, None


affine_eval.register_autograd(_affine_eval_backward, setup_context=_affine_eval_setup)


# ---- the same ops without the dispatcher ------------------------------------------------------------------

def _route(op, impl, *tensors: Tensor | None):
    """``impl`` (the op's own body) where no graph can be recorded and no gradient is needed -- plain eager
    tensors under no_grad or without requires_grad, and the backward ops as autograd runs them -- where
    torch.library's dispatch (15-40 us) would cost as much as a small layer's kernel; ``op`` itself
    otherwise (autograd through the forward ops, torch.compile, make_fx, tensor subclasses)."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the checks below
        return op
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    tracing = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None  # make_fx
    return op if needs_grad or tracing or type(tensors[0]) is not Tensor else impl



# ---- availability ---------------------------------------------------------------------------------------

def run_stats_norm(x: Tensor, weight: Tensor, bias: Tensor, layout: int, groups: int, eps: float, center: bool,
                   *sources: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`stats_norm`, through the dispatcher or straight to its body (:func:`_route`); ``sources``: the
    tensors ``weight``/``bias`` were made from (whether a gradient is needed is read from them)."""
    return _route(stats_norm, _stats_norm, x, *sources)(x, weight, bias, layout, groups, eps, center)


def run_affine_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                    *sources: Tensor | None) -> Tensor:
    """:func:`affine_eval`, through the dispatcher or straight to its body (:func:`_route`)."""
    return _route(affine_eval, _affine_eval, x, *sources)(x, mean, var, weight, bias, eps)


@torch.compiler.assume_constant_result
def kernels_built() -> bool:
    """Whether the kernels are loaded (building them on first use). torch.compile runs this once while it
    traces and keeps the answer as a constant: the loader's lock and build are never traced."""
    return _native.load("norm_kernel") is not None


