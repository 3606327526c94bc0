"""The native kernels as ``torch.library`` operators: schemas, fake kernels, and the double-backward forms.

The C++ side (``ops/norm_ops.cpp``) registers each operator's CPU kernel and its autograd (a C++
``torch::autograd::Function``) for these schemas; the kernels themselves (``ops/norm_kernel.cpp``,
``ops/channels_last_kernel.cpp``) implement the functions of :mod:`normkit._spec` named in the comment above
each of their loops. The operators:

* ``normkit::stats_norm(x, weight?, bias?, layout, groups, C, eps, center) -> (y, stats)``: statistics of
  ``x`` per group, ``y = standardize(x) * weight + bias``; ``stats (groups, 8)`` float32 holds
  ``e, pivot, mean_d, r, k, mean, var`` (``Stat`` in ``norm_common.h``);
* ``normkit::stats_norm_backward(dy, x, weight?, stats, layout, groups, C, center, need_dx, need_param)
  -> (dx, dweight, dbias)``;
* ``normkit::affine_eval(x, mean, var, weight?, bias?, layout, eps) -> y``: given statistics per channel;
* ``normkit::affine_eval_backward(dy, x, mean, var, weight?, layout, eps, need_dx, need_param)
  -> (dx, dweight, dbias)``;
* ``normkit::eval_constants(mean, var, weight?, eps) -> (6, C)``: ``affine_eval``'s per-channel constants, for
  the form of it that ``torch.compile`` fuses (:class:`normkit.ops._normalize.StatsAffineCompiled`);
* ``normkit::group_stats(x, layout, groups, C, eps, center) -> (stats, (7, groups))``: ``stats_norm``'s statistics
  alone and each group's ``x_hat`` constants, for the form of batch norm in training that ``torch.compile`` fuses
  (:class:`normkit.ops._normalize.StandardizeAffineCompiled`);
* ``normkit::running_stats(running_mean, running_var, stats, count, momentum) -> (new_mean, new_var)``: batch
  norm's running statistics after a training step (:func:`normkit._spec.running_stats` in float32, from
  ``stats_norm``'s per-channel statistics), in the running tensors' dtypes;
* ``normkit::stats_norm_backward_graph`` / ``normkit::affine_eval_backward_graph``: the backward in the spec's
  differentiable torch ops (``CompositeImplicitAutograd``), which the C++ backward calls when a graph is
  being built in backward (double backward).

Fake kernels make each one node under fx, ``torch.compile`` and ``torch.export``. A training forward keeps for
backward only the input, the parameters and 8 floats per group; backward recomputes ``x_hat`` in the kernel.
Parameters (``weight``, ``bias``, ``mean``, ``var``) may have any shape holding ``C`` values, in float32 or
``x``'s dtype; ``None`` is ones (weight, var) or zeros (bias, mean). Parameter gradients come back in their
parameter's dtype and shape. Only CPU kernels are registered.

Layouts (``layout``), ``x`` contiguous: ``ROWS`` ``x (R, D)`` read as rows of ``D = C`` values, a group per
row, affine per element (layer / RMS norm); ``GROUPS`` ``x (N, C, *)`` read as ``(N, C, S)``, a group per
``(n, g)`` of ``C / groups`` consecutive channels, affine per channel (group, instance norm); ``CHANNELS``
``(N, C, S)``, a group per channel (batch norm in training); ``GROUPS_CL`` ``x (N, *, C)``, channels last, a
group per ``(n, g)`` of ``S`` rows by ``C / groups`` channels. ``affine_eval`` takes ``CHANNELS`` (``x (N, C,
*)``) or ``GROUPS_CL`` (``x (..., C)``).

Inputs may have any strides (the ops are tagged ``flexible_layout``: Inductor keeps convolutions channels last on
CPU and need not convert around them); outputs of ``x``'s shape have the strides ``torch.empty_like(x)`` gives.

Calls: :func:`stats_norm_call` and :func:`affine_eval_call` are the operators -- one C++ call through the
dispatcher (``normkit._native``'s entry points), or, while Dynamo traces, the ``torch.ops`` overloads it
records.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .. import _spec as spec

ROWS, GROUPS, CHANNELS = 0, 1, 2
GROUPS_CL = 3  # channels last: x (N, *, C), a group per (n, g) = S rows x C / groups channels (channels_last_kernel.cpp)

_SCHEMAS = {
    "stats_norm": "(Tensor x, Tensor? weight, Tensor? bias, int layout, int groups, int C, float eps, bool center)"
                  " -> (Tensor, Tensor)",
    "stats_norm_backward": "(Tensor dy, Tensor x, Tensor? weight, Tensor stats, int layout, int groups, int C,"
                           " bool center, bool need_dx, bool need_param) -> (Tensor, Tensor, Tensor)",
    "affine_eval": "(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, int layout, float eps) -> Tensor",
    "affine_eval_backward": "(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, int layout, float eps,"
                            " bool need_dx, bool need_param) -> (Tensor, Tensor, Tensor)",
    "eval_constants": "(Tensor mean, Tensor var, Tensor? weight, float eps) -> Tensor",
    "group_stats": "(Tensor x, int layout, int groups, int C, float eps, bool center) -> (Tensor, Tensor)",
    "running_stats": "(Tensor running_mean, Tensor running_var, Tensor stats, int count, float momentum) -> (Tensor, Tensor)",
    "stats_norm_backward_graph": "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, int layout, int groups, int C,"
                                 " float eps, bool center, bool need_dx, bool need_w, bool need_b)"
                                 " -> (Tensor, Tensor, Tensor)",
    "affine_eval_backward_graph": "(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias,"
                                  " int layout, float eps, bool need_dx, bool need_w, bool need_b)"
                                  " -> (Tensor, Tensor, Tensor)",
}
for _name, _schema in _SCHEMAS.items():  # flexible_layout: Inductor may pass any strides (outputs follow x's)
    torch.library.define(f"normkit::{_name}", _schema, tags=(torch.Tag.flexible_layout,))

stats_norm = torch.ops.normkit.stats_norm.default
stats_norm_backward = torch.ops.normkit.stats_norm_backward.default
affine_eval = torch.ops.normkit.affine_eval.default
affine_eval_backward = torch.ops.normkit.affine_eval_backward.default
eval_constants = torch.ops.normkit.eval_constants.default
group_stats = torch.ops.normkit.group_stats.default
running_stats = torch.ops.normkit.running_stats.default
stats_norm_backward_graph = torch.ops.normkit.stats_norm_backward_graph.default


def n_groups(x_shape, layout: int, groups: int, C) -> int:
    """Groups of a ``stats_norm`` call (rows of ``C`` for ``ROWS``; channels for ``CHANNELS``)."""
    numel = 1
    for s in x_shape:
        numel *= s
    return numel // C if layout == ROWS else C if layout == CHANNELS else x_shape[0] * groups


# Outputs of x's shape have x's strides, as torch.empty_like lays them out (ops/norm_ops.cpp does the same).

@torch.library.register_fake("normkit::stats_norm")
def _(x, weight, bias, layout, groups, C, eps, center):
    return torch.empty_like(x), x.new_empty((n_groups(x.shape, layout, groups, C), 8), dtype=torch.float32)


def _grad_fakes(x, n, need_dx, need_param):
    n = n if need_param else 0
    return (torch.empty_like(x) if need_dx else x.new_empty((0,)), x.new_empty((n,), dtype=torch.float32),
            x.new_empty((n,), dtype=torch.float32))


@torch.library.register_fake("normkit::stats_norm_backward")
def _(dy, x, weight, stats, layout, groups, C, center, need_dx, need_param):
    return _grad_fakes(x, C, need_dx, need_param)


@torch.library.register_fake("normkit::affine_eval")
def _(x, mean, var, weight, bias, layout, eps):
    return torch.empty_like(x)


@torch.library.register_fake("normkit::group_stats")
def _(x, layout, groups, C, eps, center):
    g = n_groups(x.shape, layout, groups, C)
    return x.new_empty((g, 8), dtype=torch.float32), x.new_empty((7, g), dtype=torch.float32)


@torch.library.register_fake("normkit::running_stats")
def _(running_mean, running_var, stats, count, momentum):
    return torch.empty_like(running_mean), torch.empty_like(running_var)


@torch.library.register_fake("normkit::eval_constants")
def _(mean, var, weight, eps):
    return var.new_empty((6, var.numel()), dtype=torch.float32)


@torch.library.register_fake("normkit::affine_eval_backward")
def _(dy, x, mean, var, weight, layout, eps, need_dx, need_param):
    return _grad_fakes(x, x.shape[1] if layout == CHANNELS else x.shape[-1], need_dx, need_param)


# ---- double backward: the spec's differentiable ops --------------------------------------------------------

def _eager_view(x: Tensor, layout: int, groups: int, C: int):
    """``x`` shaped for the eager formulas, the shape per-channel parameters broadcast in, and the reduced dims."""
    n = x.shape[0]
    if layout == ROWS:
        return x.reshape(-1, C), (C,), (1,)
    if layout == GROUPS_CL:
        return x.reshape(n, -1, groups, C // groups), (1, 1, groups, C // groups), (1, 3)
    if layout == GROUPS:
        return x.reshape(n, groups, C // groups, -1), (1, groups, C // groups, 1), (2, 3)
    return x.reshape(n, C, -1), (1, C, 1), (0, 2)


def _grad_as(g: Tensor | None, param: Tensor | None, x: Tensor) -> Tensor:
    """A gradient in its parameter's shape and dtype; an empty placeholder (read as none) where not computed."""
    return x.new_empty((0,)) if g is None or param is None else g.reshape(param.shape).to(param.dtype)


@torch.library.impl("normkit::stats_norm_backward_graph", "CompositeImplicitAutograd")
def _stats_norm_backward_graph(dy, x, weight, bias, layout, groups, C, eps, center, need_dx, need_w, need_b):
    """``(dx, dweight, dbias)`` of ``stats_norm`` in the spec's differentiable ops, statistics rebuilt from ``x``."""
    xv, pshape, dims = _eager_view(x, layout, groups, C)
    ct = spec.compute_dtype(x.dtype)
    view = (lambda t: None if t is None else t.reshape(pshape).to(ct))
    s = spec.standardize(xv.to(ct), dims, eps, center)
    dx, dw, db = spec.normalize_backward(dy.reshape(xv.shape).to(ct), s.x_hat, s.r, s.k, view(weight), view(bias), dims,
                                         center, (need_dx, need_w, need_b))
    return (x.new_empty((0,)) if dx is None else dx.to(x.dtype).reshape(x.shape)), _grad_as(dw, weight, x), _grad_as(db, bias, x)


@torch.library.impl("normkit::affine_eval_backward_graph", "CompositeImplicitAutograd")
def _affine_eval_backward_graph(dy, x, mean, var, weight, bias, layout, eps, need_dx, need_w, need_b):
    """``(dx, dweight, dbias)`` of ``affine_eval`` in the spec's differentiable ops (no gradient to the statistics)."""
    ct = spec.compute_dtype(x.dtype)
    shape = [1] * x.dim()
    channel = 1 if layout == CHANNELS else x.dim() - 1
    shape[channel] = x.shape[channel]
    view = (lambda t: None if t is None else t.reshape(shape).to(ct))
    dims = [d for d in range(x.dim()) if d != channel]
    dyc = dy.to(ct)
    dx, dw = spec.affine_with_stats_backward(dyc, x.to(ct), view(mean), view(var), eps, view(weight), dims, need_dx,
                                             need_w and weight is not None)
    db = dyc.sum_to_size(shape) if need_b and bias is not None else None
    return (x.new_empty((0,)) if dx is None else dx.to(x.dtype)), _grad_as(dw, weight, x), _grad_as(db, bias, x)


# ---- calls ------------------------------------------------------------------------------------------------

def stats_norm_call(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, groups: int, C: int, eps: float,
                    center: bool) -> tuple[Tensor, Tensor]:
    """:data:`stats_norm`: the extension's one-call entry point (kernels built), or the ``torch.ops`` overload
    while Dynamo traces."""
    if torch.compiler.is_compiling():
        return stats_norm(x, weight, bias, layout, groups, C, eps, center)
    return _native.load().stats_norm(x, weight, bias, layout, groups, C, eps, center)


def affine_eval_call(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int,
                     eps: float) -> Tensor:
    """:data:`affine_eval`, called as :func:`stats_norm_call` calls its op."""
    if torch.compiler.is_compiling():
        return affine_eval(x, mean, var, weight, bias, layout, eps)
    return _native.load().affine_eval(x, mean, var, weight, bias, layout, eps)


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (about 2 s) with
    normkit: the decorator only marks ``fn``, and Dynamo reads the mark when it traces a call
    (test_native.py checks that the public decorator marks a function the same way)."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def kernels_built() -> bool:
    """Whether the kernels are loaded (building them on first use). torch.compile runs this once while it
    traces and keeps the answer as a constant: the loader's lock and build are never traced."""
    return _native.load("norm_kernel") is not None
