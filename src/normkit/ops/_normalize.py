"""The autograd wiring of every statistics-based normalization: the math is :mod:`normkit._spec`'s, the
dims each operator reduces over are in its own file; this module only connects them to autograd,
forward-mode AD, ``vmap`` and the native kernels.

* :class:`StandardizeAffine`: statistics of ``x`` itself over ``dims`` (batch norm in training, instance,
  layer, group and RMS norm). Forward :func:`~normkit._spec.standardize` then :func:`~normkit._spec.affine`;
  backward :func:`~normkit._spec.affine_backward` then :func:`~normkit._spec.standardize_backward`; jvp
  :func:`~normkit._spec.standardize_jvp`.
* :class:`StatsAffine`: given statistics (batch / instance norm with running statistics in eval mode).
  Forward :func:`~normkit._spec.affine_with_stats`; backward ``dx = dy * weight * rstd`` as one split
  factor (:func:`~normkit._spec.apply_factor`), ``dweight = sum(dy * x_hat)`` with ``rstd`` applied to
  the scaled sum (:func:`~normkit._spec.eval_dweight`).

``weight`` and ``bias`` arrive already viewed to a shape that broadcasts against ``x``. The entry points
:func:`standardize_affine` and :func:`stats_affine` try a native kernel first (:mod:`normkit.ops._plan`),
which implements the same spec functions, and fall back to these Functions.

When grad mode is on inside backward or jvp (backward with ``create_graph=True``; jvp nearly always, since
reverse mode may be differentiating it and functorch's wrapped tensors do not say whether it is), they
first rebuild ``x_hat`` from ``x`` with the spec's differentiable ops, so second derivatives (double
backward, ``hessian``, ``jacrev(jacfwd(f))``) differentiate through the statistics exactly; otherwise they
reuse the ``x_hat`` saved by forward.

Tool chain: no host syncs and no Python branching on tensor values, so both Functions trace under
``torch.export``, ``torch.compile(fullgraph=True)`` and on the meta device; ``generate_vmap_rule`` gives
``vmap``, ``jvp`` gives ``jvp``/``jacfwd``/``hessian`` (on a subclass that dynamo never sees: :func:`_with_jvp`).
Outputs in the input's dtype, gradients in their inputs' dtypes.

Also here, shared by the operators' files: the argument checks of batch / instance norm
(:func:`check_norm_args`), the trailing-dims reduction of layer / RMS norm (:func:`normalize_trailing`),
the per-channel view, the in-place write-back of running statistics, the empty-input result and torch's
output memory format.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _checks, _native
from .. import _spec as spec
from . import _plan


def _output(y: Tensor, dtype: torch.dtype, x_hat: Tensor) -> Tensor:
    """``y`` in ``dtype``; always a tensor of its own, never ``x_hat`` itself (``x_hat`` is also returned, as
    a non-differentiable output, and the two must not alias)."""
    y = y.to(dtype)
    return y.clone() if y is x_hat else y


def _affine_tangent(tx_hat_w: Tensor, x_hat: Tensor, tweight: Tensor | None, tbias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Tangent of ``y = x_hat * weight + bias`` given ``tx_hat * weight`` (already weighted):
    ``tx_hat * weight + x_hat * tweight + tbias``, returned in ``dtype``."""
    ty = tx_hat_w
    if tweight is not None:
        ty = ty + x_hat * tweight.to(x_hat.dtype)
    if tbias is not None:
        ty = ty + tbias.to(x_hat.dtype)
    return ty.to(dtype)


class StandardizeAffineCompiled(torch.autograd.Function):
    """Batch norm in training for ``torch.compile``: ``(y, stats)`` as ``normkit::stats_norm`` gives them, with the
    statistics and each channel's ``x_hat`` constants from the kernels (``normkit::group_stats``: one read of
    ``x``, nothing written but the constants) and ``y = x_hat * weight + bias`` as a chain of multiplies
    (:func:`~normkit._spec.standardize_from_moments`' ``x_hat`` as the kernels form it) that Inductor fuses with
    its neighbours (the activation after it), so no normalized copy of ``x`` is written and read again.
    Backward is the kernels' (``normkit::stats_norm_backward``); while a graph is being built in backward, the
    spec's differentiable ops (``normkit::stats_norm_backward_graph``). ``x (N, C, *)`` in any strides;
    ``weight``, ``bias`` per channel."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        from ._kernels import CHANNELS, group_stats

        c = x.shape[1]
        stats, consts = group_stats(x, CHANNELS, 1, c, eps, True)
        shape = (1, c, *([1] * (x.dim() - 2)))
        s, piv, md, r, p1, p2, p3 = (k.view(shape) for k in consts.unbind(0))
        x_hat = ((((((x.to(torch.float32) * s) - piv) - md) * r) * p1) * p2) * p3
        y = spec.affine(x_hat, None if weight is None else weight.view(shape), None if bias is None else bias.view(shape))
        return y.to(x.dtype), stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, bias, output[1])
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, dstats):
        from ._kernels import CHANNELS, stats_norm_backward, stats_norm_backward_graph

        x, weight, bias, stats = ctx.saved_tensors
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        c = x.shape[1]
        if torch.is_grad_enabled():
            dx, dw, db = stats_norm_backward_graph(dy, x, weight, bias, CHANNELS, 1, c, ctx.eps, True, need_dx, need_w, need_b)
        else:
            dx, dw, db = stats_norm_backward(dy, x, weight, stats, CHANNELS, 1, c, True, need_dx, need_w or need_b)
            dw = dw.reshape(weight.shape).to(weight.dtype) if need_w else None
            db = db.reshape(bias.shape).to(bias.dtype) if need_b else None
        return (dx if need_dx else None), (dw if need_w else None), (db if need_b else None), None


def _stats_affine_backward(dy, x, mean, var, weight, bias, eps, needs):
    """The gradients of :class:`StatsAffine` (and :class:`StatsAffineCompiled`), one per input: ``dx`` and
    ``dweight`` by :func:`~normkit._spec.affine_with_stats_backward`, ``dbias = sum(dy)``; none to the statistics."""
    ct = spec.compute_dtype(x.dtype)
    dy = dy.to(ct)
    w = None if weight is None else weight.to(ct)
    dims = [i for i in range(x.dim()) if mean.shape[i] == 1]  # the per-channel statistics' broadcast dims
    dx, dweight = spec.affine_with_stats_backward(dy, x.to(ct), mean.to(ct), var.to(ct), eps, w, dims, needs[0],
                                                  weight is not None and needs[3])
    dweight = None if dweight is None else dweight.sum_to_size(weight.shape).to(weight.dtype)
    dbias = dy.sum_to_size(bias.shape).to(bias.dtype) if bias is not None and needs[4] else None
    return (None if dx is None else dx.to(x.dtype)), None, None, dweight, dbias, None


def _weighted(t: Tensor, weight: Tensor | None) -> Tensor:
    return t if weight is None else t * weight.to(t.dtype)


class StandardizeAffine(torch.autograd.Function):
    """``y = standardize(x over dims) * weight + bias``; also returns the statistics.

    Outputs: ``y`` (dtype of ``x``), then, non-differentiable, in the compute dtype and keepdim shape:
    ``x_hat`` (full shape), ``r``, ``k`` (``rstd = r * 2**k``), ``mean``, ``var`` (biased).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: Sequence[int], eps: float, center: bool):
        s = spec.standardize(x.to(spec.compute_dtype(x.dtype)), dims, eps, center)
        return _output(spec.affine(s.x_hat, weight, bias), x.dtype, s.x_hat), s.x_hat, s.r, s.k, s.mean, s.var

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
            s = spec.standardize(x.to(spec.compute_dtype(x.dtype)), ctx.dims, ctx.eps, ctx.center)
            return s.x_hat, s.r, s.k
        return x_hat, r, k

    @staticmethod
    def backward(ctx, dy, *unused):
        x, weight, bias, x_hat, r, k = ctx.saved_tensors
        x_hat, r, k = StandardizeAffine._statistics(ctx, x, x_hat, r, k, torch.is_grad_enabled())
        dx, dweight, dbias = spec.normalize_backward(dy.to(x_hat.dtype), x_hat, r, k, weight, bias, ctx.dims, ctx.center,
                                                     ctx.needs_input_grad)
        return (None if dx is None else dx.to(x.dtype)), dweight, dbias, None, None, None

    @staticmethod
    def tangent(ctx, tx, tweight, tbias, *unused):
        """The ``jvp`` of :class:`StandardizeAffineJvp` (see :func:`_with_jvp`)."""
        x, weight, bias, x_hat, r, k = ctx.saved_tensors
        x_hat, r, k = StandardizeAffine._statistics(ctx, x, x_hat, r, k, torch.is_grad_enabled())
        tx_hat = torch.zeros_like(x_hat) if tx is None else spec.standardize_jvp(tx.to(x_hat.dtype), x_hat, r, k, ctx.dims, ctx.center)
        return _affine_tangent(_weighted(tx_hat, weight), x_hat, tweight, tbias, x.dtype), None, None, None, None, None


class StatsAffine(torch.autograd.Function):
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` with given statistics (no gradient to them),
    in :func:`normkit._spec.affine_with_stats`' product order. Outputs: ``y`` (dtype of ``x``) and,
    non-differentiable, ``x_hat`` in the compute dtype.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        ct = spec.compute_dtype(x.dtype)
        w = None if weight is None else weight.to(ct)
        y, x_hat, _ = spec.affine_with_stats(x.to(ct), mean.to(ct), var.to(ct), eps, w, bias)
        return _output(y, x.dtype, x_hat), x_hat

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, mean, var, weight, bias, output[1])
        ctx.save_for_forward(x, mean, var, weight, bias, output[1])
        ctx.eps = eps

    @staticmethod
    def _x_hat(ctx, x, mean, var, x_hat, rebuild: bool):
        """``x_hat`` as saved, or rebuilt as a function of ``x`` when a graph is being built."""
        if rebuild:
            ct = x_hat.dtype
            return spec.affine_with_stats(x.to(ct), mean.to(ct), var.to(ct), ctx.eps, None, None)[1]
        return x_hat

    @staticmethod
    def backward(ctx, dy, unused):
        x, mean, var, weight, bias, _ = ctx.saved_tensors
        return _stats_affine_backward(dy, x, mean, var, weight, bias, ctx.eps, ctx.needs_input_grad)

    @staticmethod
    def tangent(ctx, tx, tmean, tvar, tweight, tbias, unused):
        """The ``jvp`` of :class:`StatsAffineJvp` (see :func:`_with_jvp`)."""
        x, mean, var, weight, bias, x_hat = ctx.saved_tensors
        x_hat = StatsAffine._x_hat(ctx, x, mean, var, x_hat, torch.is_grad_enabled())
        ct = x_hat.dtype
        w = None if weight is None else weight.to(ct)
        _, _, m, q = spec.eval_factor(var.to(ct), w, ctx.eps)
        txw = torch.zeros_like(x_hat) if tx is None else spec.apply_factor(tx.to(ct), m, q)  # tx * weight * rstd
        return _affine_tangent(txw, x_hat, tweight, tbias, x.dtype), None


class StatsAffineCompiled(torch.autograd.Function):
    """:class:`StatsAffine` for ``torch.compile``: the same function, as a chain of multiplies by per-channel
    constants (``normkit::eval_constants``, from the native kernels) that Inductor fuses with its neighbours:
    ``y = ((((x * a - a * mean) * m') * 2**k1) * 2**k2) * 2**k3 + bias`` -- :func:`~normkit._spec.affine_with_stats`'s
    split factor (:func:`~normkit._spec.eval_factor`, :func:`~normkit._spec.apply_factor` and
    :func:`~normkit._spec.mul_pow2`'s three powers of two) with ``x - mean`` taken in halves for every element of a
    channel whose mean is large enough for the difference to overflow (``ops/norm_ops.cpp`` shows why that gives
    each element the spec's value). Backward is :class:`StatsAffine`'s. (Written as the spec's ops, Inductor
    computed the powers of two for every element: compiled ResNet-18 took 1.5x torch's compiled time.)"""

    @staticmethod
    def forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        from ._kernels import eval_constants

        ct = spec.compute_dtype(x.dtype)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        a, am, m, p1, p2, p3 = (c.view(shape) for c in eval_constants(mean, var, weight, eps).unbind(0))
        y = ((((x.to(ct) * a - am) * m) * p1) * p2) * p3
        return (y if bias is None else y + bias.to(ct)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps = inputs
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy):
        return _stats_affine_backward(dy, *ctx.saved_tensors, ctx.eps, ctx.needs_input_grad)


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


# ---- the entry points the operators call -------------------------------------------------------------------

def standardize_affine(x, weight, bias, dims, eps, center=True):
    """``(y, mean, var)``: ``y = standardize(x over dims) * weight + bias`` with biased ``var`` (keepdim
    shape). A fused native kernel serves where one applies (:func:`normkit.ops._plan.plan_standardize`); batch
    norm in training under torch.compile takes its statistics from the kernels and gives Inductor the affine
    to fuse (:class:`StandardizeAffineCompiled`)."""
    plan = _plan.plan_standardize(x, weight, bias, dims, center)
    if isinstance(plan, _plan.Plan):
        if plan.op == _plan.BATCH_NORM_TRAIN and torch.compiler.is_compiling():
            y, stats = StandardizeAffineCompiled.apply(x, weight, bias, float(eps))
        else:
            y, stats = _plan.run_standardize(plan, x, weight, bias, eps, center)
        return (y, *_plan.moments(stats, x, dims))
    _native.note("layer/rms/group/instance/batch norm", f"eager ({plan})")
    y, _, _, _, mean, var = _pick(StandardizeAffine, StandardizeAffineJvp).apply(x, weight, bias, tuple(dims), float(eps), center)
    return y, mean, var


def stats_affine(x, mean, var, weight, bias, eps):
    """``y`` with given statistics (:class:`StatsAffine`). A fused native kernel serves where one applies
    (:func:`normkit.ops._plan.plan_affine`); under torch.compile, the form Inductor fuses (:class:`StatsAffineCompiled`)."""
    plan = _plan.plan_affine(x, mean, var, weight, bias)
    if plan is _plan.COMPILED:
        return StatsAffineCompiled.apply(x, mean, var, weight, bias, float(eps))
    if isinstance(plan, _plan.Plan):
        return _plan.run_affine(plan, x, mean.detach(), var.detach(), weight, bias, eps)
    _native.note("batch_norm/instance_norm (eval)", f"eager ({plan})")
    return _pick(StatsAffine, StatsAffineJvp).apply(x, mean, var, weight, bias, float(eps))[0]


# ---- shared by the operators' files ------------------------------------------------------------------------

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


def channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    """A per-channel ``(C,)`` tensor viewed as ``(1, C, 1, ...)`` to broadcast against an ``ndim`` input."""
    return None if t is None else t.view(1, -1, *([1] * (ndim - 2)))


def write_back(running: Tensor | None, new: Tensor | None) -> None:
    """Store updated running statistics in place (the only side effect of the torch-style API)."""
    if running is not None and new is not None and new is not running:
        running.detach().copy_(new.detach())


def check_norm_args(op, input, weight, bias, running_mean, running_var, momentum, eps, need_running):
    """Checks shared by batch, instance and synchronized batch norm: ``(N, C, *)`` input and ``(C,)`` parameters."""
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


def normalize_trailing(op, input, normalized_shape, weight, bias, eps, center, same_dtype_params=True):
    """Layer and RMS norm: check (:func:`normkit._checks.check_trailing`), then standardize over the trailing
    ``normalized_shape`` dims and apply the per-element affine. ``same_dtype_params``: torch's CPU
    parameter-dtype rule (layer norm; torch's RMS norm accepts any). Returns ``y`` in torch's layout for
    neither (the caller decides)."""
    shape = _checks.check_trailing(op, input, normalized_shape, weight, bias, eps, same_dtype_params)
    if input.numel() == 0:
        return empty_output(input, weight, bias)
    return standardize_affine(input, weight, bias, tuple(range(-len(shape), 0)), eps, center)[0]


# ---- the cached routes of the functional entry points (normkit.ops._plan.route) ----------------------------
# Each builder runs its op's argument checks (raising the op's own errors), plans the call and returns the
# closure later calls of the same signature run: the kernel call and the output layout torch gives, nothing
# else. None: the uncached path serves the signature (eager, or a layout only the planner handles).

def _kernel_call(plan: _plan.Plan, eps: float, center: bool, fmt):
    """``run(x, weight, bias) -> (y, stats)`` for a plan of :func:`normkit.ops._plan.plan_standardize`."""
    if plan.perm is not None or plan.copy or plan.view is not None:
        def run(x, weight, bias):
            y, stats = _plan.run_standardize(plan, x, weight, bias, eps, center)
            return (y if fmt is None else y.contiguous(memory_format=fmt)), stats
        return run
    call, layout, groups, c, op, path = _native.load().stats_norm, plan.layout, plan.groups, plan.C, plan.op, plan.path

    def run(x, weight, bias):
        if _native._recording:
            _native.note(op, path)
        y, stats = call(x, weight, bias, layout, groups, c, eps, center)
        return (y if fmt is None else y.contiguous(memory_format=fmt)), stats
    return run


def _eval_call(plan: _plan.Plan, eps: float, fmt):
    """``run(x, mean, var, weight, bias) -> y`` for a plan of :func:`normkit.ops._plan.plan_affine`."""
    if plan.perm is not None or plan.copy:
        def run(x, mean, var, weight, bias):
            y = _plan.run_affine(plan, x, mean, var, weight, bias, eps)
            return y if fmt is None else y.contiguous(memory_format=fmt)
        return run
    call, layout, op, path = _native.load().affine_eval, plan.layout, plan.op, plan.path

    def run(x, mean, var, weight, bias):
        if _native._recording:
            _native.note(op, path)
        y = call(x, mean, var, weight, bias, layout, eps)
        return y if fmt is None else y.contiguous(memory_format=fmt)
    return run


def _fmt(plan, x, torch_layout: bool):
    """The memory format the route must convert its output to (torch's: the input's suggested one when
    ``torch_layout``, else contiguous), or None when the kernel's output already has it."""
    return _plan.output_layout(plan, x, suggest_memory_format(x) if torch_layout else torch.contiguous_format)


def _trailing_builder(op: str, center: bool, same_dtype_params: bool, torch_layout: bool):
    def build(x, args, weight, bias=None):
        normalized_shape, eps = args
        if eps is None:  # RMS norm: the compute dtype's eps (rms_norm.py)
            _checks.check_floating(op, x)
            eps = torch.finfo(spec.compute_dtype(x.dtype)).eps
        shape = _checks.check_trailing(op, x, normalized_shape, weight, bias, eps, same_dtype_params)
        plan = _plan.plan_standardize(x, weight, bias, list(range(x.dim() - len(shape), x.dim())), center)
        if isinstance(plan, str):
            return None
        run = _kernel_call(plan, float(eps), center, _fmt(plan, x, torch_layout))
        if center:  # layer norm: route(x, weight, bias)
            return lambda x, weight, bias: run(x, weight, bias)[0]
        return lambda x, weight: run(x, weight, None)[0]  # RMS norm: route(x, weight)
    return build


_plan.BUILDERS["layer_norm"] = _trailing_builder("layer_norm", True, True, False)
_plan.BUILDERS["rms_norm"] = _trailing_builder("rms_norm", False, False, True)


def _build_group_norm(x, args, weight, bias):
    num_groups, eps = args
    _checks.check_group_norm("group_norm", x, num_groups, weight, bias, eps)
    why = _plan.why_not(x, weight, bias)
    if why is not None or not _plan.kernels_built():
        return None
    c = x.shape[1]
    if x.is_contiguous():
        plan = _plan.Plan(_plan.GROUPS, num_groups, c, "groups: group_norm/instance_norm")
    else:
        perm = _plan._channels_minor(x, 0) if x.dim() >= 3 else None
        if perm is None:
            return None  # the planner's copy (or grouped view) serves
        plan = _plan.Plan(_plan.GROUPS_CL, num_groups, c, "groups: group_norm/instance_norm", "native (channels_last)", perm)
    run = _kernel_call(plan, float(eps), True, _fmt(plan, x, True))
    return lambda x, weight, bias: run(x, weight, bias)[0]


_plan.BUILDERS["group_norm"] = _build_group_norm


def _channel_norm_builder(op: str):
    """Batch norm (``args = (training, momentum, eps)``) and instance norm (``(use_input_stats, momentum,
    eps)``): ``route(x, running_mean, running_var, weight, bias) -> (y, new_running_mean, new_running_var)``
    as their ``*_stateless`` forms return them."""
    batch = op == "batch_norm"

    def build(x, args, running_mean, running_var, weight, bias):
        use_batch, momentum, eps = args
        check_norm_args(op, x, weight, bias, running_mean, running_var, momentum, eps, need_running=not use_batch)
        if batch:
            _checks.check_batch_norm_eps(op, eps, use_batch)
        if x.numel() == 0:
            return None
        nd, c = x.dim(), x.shape[1]
        count = x.numel() // c if batch else math.prod(x.shape[2:])
        if use_batch:
            _checks.check_more_than_one(op, x, count, "value per channel" if batch else "spatial element")
        if not use_batch:
            plan = _plan.plan_affine(x, running_mean, running_var, weight, bias)
            if isinstance(plan, str):
                return None
            run_eval = _eval_call(plan, float(eps), _fmt(plan, x, batch))

            def eval_route(x, running_mean, running_var, weight, bias):
                return run_eval(x, running_mean, running_var, weight, bias), running_mean, running_var
            return eval_route
        dims = [0, *range(2, nd)] if batch else list(range(2, nd))
        plan = _plan.plan_standardize(x, channel_view(weight, nd), channel_view(bias, nd), dims, True)
        if isinstance(plan, str):
            return None
        run = _kernel_call(plan, float(eps), True, _fmt(plan, x, batch))
        if batch and plan.op == _plan.BATCH_NORM_TRAIN and type(momentum) in (float, int) and all(
                t is not None and not t.requires_grad for t in (running_mean, running_var)):
            running = _native.load().running_stats  # the spec's running_stats as one call

            def batch_route(x, running_mean, running_var, weight, bias):
                y, stats = run(x, weight, bias)
                return (y, *running(running_mean, running_var, stats, count, momentum))
            return batch_route

        def train_route(x, running_mean, running_var, weight, bias):
            y, stats = run(x, weight, bias)
            mean, var = stats[:, 5], stats[:, 6]
            if not batch:  # instance norm: the batch averages of the per-instance statistics
                mean, var = mean.view(-1, c).mean(0), var.view(-1, c).mean(0)
            return (y, *spec.running_stats(running_mean, running_var, mean, var, count, momentum))
        return train_route
    return build


_plan.BUILDERS["batch_norm"] = _channel_norm_builder("batch_norm")
_plan.BUILDERS["instance_norm"] = _channel_norm_builder("instance_norm")
