"""Native fast paths for the statistics-based normalizations, behind the same functional API.

:func:`standardize_affine` and :func:`stats_affine` take exactly the arguments of the functions of the same
names in :mod:`normkit.ops._normalize` and return their result computed by a fused CPU kernel
(``ops/norm_kernel.cpp``, ``ops/channels_last_kernel.cpp``), or ``None`` where no kernel applies; the caller
then runs its eager path. The kernels compute the same robust statistics as :mod:`normkit._stats`
(power-of-two scaling, pivot shift, two-pass moments, ``rstd = r * 2**k``), so the two paths agree within the
core's tolerances.

A kernel serves when: the backend is not ``"eager"`` (:func:`normkit.set_backend`, ``NORMKIT_NATIVE=0``) and the
kernels are built; the input is a CPU tensor of float32, bfloat16 or float16 with elements; no ``torch.func``
transform or forward-mode AD is active on it; and the reduction is one of

* trailing dims (layer / RMS norm): rows ``(R, D)``;
* dims ``2..``, affine-free or with a per-channel affine ``(1, A, *lead, 1, ...)`` (instance norm, group
  norm's grouped view): groups of consecutive channels ``(N, C, S)``;
* dims ``(0, 2, ...)`` (batch norm in training): a group per channel, ``(N, C, S)`` with ``S >= 8``;
* given statistics (batch / instance norm in eval): ``(N, C, S)`` with ``S >= 8``.

Channels-last inputs (``channels_last``, ``channels_last_3d``, and group norm's grouped view of them: any
input whose channel dims are innermost in memory) run natively in that layout, as the contiguous ``(N, S, C)``
array ``x.permute(0, 2, ..., 1)`` is, with no copy and any ``S``: batch norm (train), instance and group norm
as groups of ``S`` rows by ``Cg`` channels (``GROUPS_CL``; batch norm as one sample of ``N * S`` rows with a
group per channel), eval as ``(N * S, C)``; the output keeps the input's strides. Any other non-contiguous
input is first copied to contiguous.

The kernels are ``torch.library`` custom ops (``normkit::stats_norm``, ``normkit::stats_norm_backward``,
``normkit::affine_eval``, ``normkit::affine_eval_backward``) with fake kernels, so fx, ``torch.compile`` and
``torch.export`` see one op each. A training forward keeps for backward only the input and 8 floats per group;
backward recomputes ``x_hat`` in the kernel. When a graph is being built in backward (double backward) the
backward runs in differentiable eager ops instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _native
from .._stats import compute_dtype, normalize_with_stats, standardize, standardize_backward

ROWS, GROUPS, CHANNELS = 0, 1, 2
GROUPS_CL = 3  # channels last: x (N, S, C), a group per (n, g) = S rows x C / groups channels (channels_last_kernel.cpp)
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_SEGMENT = 8  # channel layouts with fewer spatial values per (n, c) run eagerly (a kernel per value is no gain)


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
    ``e, pivot, mean_d, r, k, mean, var`` (see norm_kernel.cpp). weight/bias: float32 of D (rows) or C values."""
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
    if torch.is_grad_enabled():  # double backward: differentiable eager ops, statistics rebuilt from x
        xv, wv, dims = _eager_view(x, weight, layout, groups)
        ct = compute_dtype(x.dtype)
        s = standardize(xv.to(ct), dims, eps, center)
        dyv = dy.reshape(xv.shape).to(ct)
        dx = standardize_backward(dyv * wv, s.x_hat, s.r, s.k, dims, center).to(x.dtype).view(x.shape) if need_dx else None
        dw = (dyv * s.x_hat).sum_to_size(wv.shape).reshape(weight.shape) if need_w else None
        db = dyv.sum_to_size(wv.shape).reshape(weight.shape) if need_b else None
        return dx, dw, db, None, None, None, None
    dx, dw, db = _route(stats_norm_backward, _stats_norm_bwd, dy)(
        dy.contiguous(), x, weight, stats, layout, groups, center, need_dx, need_w or need_b)
    return dx if need_dx else None, dw if need_w else None, db if need_b else None, None, None, None, None


stats_norm.register_autograd(_stats_norm_backward, setup_context=_stats_norm_setup)


def _affine_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` per channel of ``x (N, C, S)``, or of ``x (R, C)``
    (channels last); params float32 (C,)."""
    rstd = torch.rsqrt(var + eps)
    return _entry("eval_forward", x.dim() == 2)(x, mean, rstd, weight, bias)


affine_eval = torch.library.custom_op("normkit::affine_eval", _affine_eval, mutates_args=())


@affine_eval.register_fake
def _(x, mean, var, weight, bias, eps):
    return x.new_empty(x.shape)


def _affine_eval_bwd(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, eps: float,
                     need_dx: bool, need_param: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`affine_eval` (empty where not asked for)."""
    rstd = torch.rsqrt(var + eps)
    dx, dw, db = _entry("eval_backward", x.dim() == 2)(dy, x, mean, rstd, weight, need_dx, need_param)
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
    if torch.is_grad_enabled():  # double backward: x_hat as a differentiable function of x
        ct = compute_dtype(x.dtype)
        view = (lambda t: t.view(1, -1, *[1] * (x.dim() - 2)))  # (N, C, S) or channels-last (R, C)
        x_hat, rstd = normalize_with_stats(x.to(ct), view(mean), view(var), ctx.eps)
        dyc = dy.to(ct)
        dx = (dyc * view(weight) * rstd).to(x.dtype) if need_dx else None
        dw = (dyc * x_hat).sum_to_size(view(weight).shape).reshape(-1) if need_w else None
        db = dyc.sum_to_size(view(weight).shape).reshape(-1) if need_b else None
        return dx, None, None, dw, db, None
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


# ---- dispatch -------------------------------------------------------------------------------------------

@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the kernels are loaded (building them on first use). torch.compile runs this once while it
    traces and keeps the answer as a constant: the loader's lock and build are never traced."""
    return _native.load("norm_kernel") is not None


def _plain(t: Tensor | None) -> bool:
    """Not a torch.func-wrapped tensor (vmap / grad / jvp run the eager path, which has their rules)."""
    return t is None or not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _why_not(x: Tensor, *others: Tensor | None) -> str | None:
    """The reason no kernel can serve this input, or None."""
    if _native.get_backend() == "eager":
        return "backend eager"
    if x.device.type != "cpu":
        return f"device {x.device.type}"
    if x.dtype not in NATIVE_DTYPES:
        return f"dtype {x.dtype}"
    if x.numel() == 0:
        return "empty"
    if torch.compiler.is_exporting():  # the program keeps the reference decomposition: portable, ONNX-exportable
        return "exporting"
    if not torch.compiler.is_compiling() and (
            not all(_plain(t) for t in (x, *others)) or torch.autograd.forward_ad._current_level >= 0):
        return "torch.func transform or forward AD"
    if any(t is not None and (t.device != x.device) for t in others):
        return "parameters on another device"
    return None


def _param(t: Tensor | None, n: int, fill: float) -> Tensor:
    """A parameter as a contiguous float32 vector of ``n`` values (autograd flows through the cast)."""
    if t is None:
        return torch.full((n,), fill, dtype=torch.float32)
    return t.reshape(n).to(torch.float32).contiguous()


def _per_channel(x: Tensor, *params: Tensor | None) -> bool:
    """Every given parameter is shaped ``(1, C, 1, ...)`` against ``x (N, C, *)``."""
    shape = (1, x.shape[1], *([1] * (x.dim() - 2)))
    return all(p is None or tuple(p.shape) == shape for p in params)


def _moments(stats: Tensor, x: Tensor, dims) -> tuple[Tensor, Tensor]:
    """The mean and biased variance the kernels saved in ``stats``, in ``x``'s shape with ``dims`` kept as 1."""
    reduced = {d % x.dim() for d in dims}
    keep = [1 if i in reduced else n for i, n in enumerate(x.shape)]
    return stats[:, 5].reshape(keep), stats[:, 6].reshape(keep)


def _channel_split(x: Tensor, p: Tensor) -> int | None:
    """For a parameter ``p`` shaped ``(1, A, *lead, 1, ...)`` against ``x (N, A, *lead, ...)``: ``len(lead)``, else None."""
    if p.dim() != x.dim() or p.shape[0] != 1 or p.shape[1] != x.shape[1]:
        return None
    rest, full = list(p.shape[2:]), list(x.shape[2:])
    lead = 0
    while lead < len(rest) and rest[lead] == full[lead] and rest[lead] != 1:
        lead += 1
    return lead if all(v == 1 for v in rest[lead:]) else None


def _plan(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, center: bool):
    """``(layout, x view for the kernel, groups, number of parameters)`` or a reason string."""
    nd = x.dim()
    dims = sorted(d % nd for d in dims)
    trailing = dims == list(range(nd - len(dims), nd))
    spatial = nd >= 3 and dims == list(range(2, nd))  # instance norm, group norm's grouped view
    if spatial and center and weight is None and bias is None:  # per-channel constants beat per-element ones
        return GROUPS, x.reshape(x.shape[0], x.shape[1], -1), x.shape[1], x.shape[1]
    if trailing and all(p is None or tuple(p.shape) == tuple(x.shape[dims[0]:]) for p in (weight, bias)):
        d = math.prod(x.shape[dims[0]:])
        return ROWS, x.reshape(-1, d), 1, d  # layer / RMS norm (and other trailing standardizations)
    if not center:
        return "RMS over non-trailing dims"
    if spatial:
        leads = {_channel_split(x, p) for p in (weight, bias) if p is not None}
        if None in leads or len(leads) > 1:
            return "parameter shape"
        lead = leads.pop() if leads else 0
        a, cg = x.shape[1], math.prod(x.shape[2:2 + lead])
        return GROUPS, x.reshape(x.shape[0], a * cg, -1), a, a * cg  # instance norm, group norm's grouped view
    if nd >= 2 and dims == [0, *range(2, nd)]:
        s = math.prod(x.shape[2:])
        if s < MIN_SEGMENT:
            return f"fewer than {MIN_SEGMENT} values per (n, c)"
        if not _per_channel(x, weight, bias):
            return "parameter shape"
        return CHANNELS, x.reshape(x.shape[0], x.shape[1], s), 1, x.shape[1]  # batch norm in training
    return "reduction pattern"


def _op_name(layout: int, center: bool) -> str:
    return {ROWS: "rows: layer_norm" if center else "rows: rms_norm",
            GROUPS: "groups: group_norm/instance_norm",
            CHANNELS: "channels: batch_norm (train)", GROUPS_CL: "groups: group_norm/instance_norm"}[layout]


def standardize_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, eps: float, center: bool = True):
    """``(y, mean, var)`` as :func:`normkit.ops._normalize.standardize_affine` returns them, from a native
    kernel; ``None`` where none applies (the caller then runs the eager path)."""
    why = _why_not(x, weight, bias)
    if why is None and not x.is_contiguous():
        fast = _standardize_channels_last(x, weight, bias, dims, eps, center)
        if fast is not None:
            return fast
    copied = why is None and not x.is_contiguous()
    if copied:  # a strided view (channels last ran above): kernels read (N, C, S) rows, so copy once (autograd-tracked)
        x = x.contiguous()
    plan = why if why is not None else _plan(x, weight, bias, dims, center)
    if isinstance(plan, str):
        _native.note("layer/rms/group/instance/batch norm", f"eager ({plan})")
        return None
    layout, xv, groups, n_params = plan
    if not _kernels_built():
        _native.note(_op_name(layout, center), "eager (kernels unavailable)")
        return None
    _native.note(_op_name(layout, center), "native (input copied to contiguous)" if copied else "native")
    y, stats = _route(stats_norm, _stats_norm, xv, weight, bias)(
        xv, _param(weight, n_params, 1.0), _param(bias, n_params, 0.0), layout, groups, float(eps), center)
    return (y.view(x.shape), *_moments(stats, x, dims))


def stats_affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """``y`` as :func:`normkit.ops._normalize.stats_affine` returns it, from a native kernel; else ``None``."""
    why = _why_not(x, mean, var, weight, bias)
    if why is None and not x.is_contiguous():
        fast = _stats_affine_channels_last(x, mean, var, weight, bias, eps)
        if fast is not None:
            return fast
    if why is None:
        if x.dim() < 3 or math.prod(x.shape[2:]) < MIN_SEGMENT:
            why = f"fewer than {MIN_SEGMENT} values per (n, c)"
        elif not _per_channel(x, mean, var, weight, bias):
            why = "parameter shape"
        elif not _kernels_built():
            why = "kernels unavailable"
    if why is not None:
        _native.note("batch_norm/instance_norm (eval)", f"eager ({why})")
        return None
    _native.note("batch_norm/instance_norm (eval)", "native" if x.is_contiguous() else "native (input copied to contiguous)")
    x = x.contiguous()
    c = x.shape[1]
    y = _route(affine_eval, _affine_eval, x, weight, bias)(
        x.reshape(x.shape[0], c, -1), _param(mean.detach(), c, 0.0), _param(var.detach(), c, 1.0),
        _param(weight, c, 1.0), _param(bias, c, 0.0), float(eps))
    return y.view(x.shape)


# ---- channels last -------------------------------------------------------------------------------------

def _channels_minor(x: Tensor, lead: int):
    """``(perm, x.permute(perm))`` when that view is contiguous: ``perm`` moves dims ``(1, 2, ..., 1 + lead)``
    (the channel dims) after the spatial ones; else None."""
    nd = x.dim()
    perm = (0, *range(2 + lead, nd), 1, *range(2, 2 + lead))
    xv = x.permute(perm)
    return (perm, xv) if xv.is_contiguous() else None


def _from_rows(y: Tensor, xv: Tensor, perm) -> Tensor:
    """The kernel's output, laid out as ``xv = x.permute(perm)``, viewed back in ``x``'s shape and strides."""
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return y.view(xv.shape).permute(inverse)


def _channels_last_plan(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, center: bool):
    """For an input whose channel dims are innermost in memory: ``(perm, xv, x rows (N', S, C), groups, op name)``
    for layout ``GROUPS_CL``, or None (the caller's copy to contiguous then serves)."""
    nd = x.dim()
    if not center or nd < 3:
        return None
    dims = sorted(d % nd for d in dims)
    if dims == [0, *range(2, nd)]:  # batch norm in training: one sample of N * S rows, a group per channel
        if not _per_channel(x, weight, bias):
            return None
        found = _channels_minor(x, 0)
        if found is None:
            return None
        return (*found, found[1].reshape(1, -1, x.shape[1]), x.shape[1], _op_name(CHANNELS, center))
    if dims != list(range(2, nd)):
        return None
    leads = {_channel_split(x, p) for p in (weight, bias) if p is not None}  # instance norm, group norm's grouped view
    if None in leads or len(leads) > 1:
        return None
    for lead in (leads if leads else range(nd - 2)):  # without parameters: whichever split the strides show
        found = _channels_minor(x, lead) if lead < nd - 2 else None
        if found is not None:
            a, cg = x.shape[1], math.prod(x.shape[2:2 + lead])
            return (*found, found[1].reshape(x.shape[0], -1, a * cg), a, _op_name(GROUPS, center))
    return None


def _standardize_channels_last(x, weight, bias, dims, eps, center):
    """:func:`standardize_affine` for a channels-last input, in its layout; None where that does not apply."""
    plan = _channels_last_plan(x, weight, bias, dims, center)
    if plan is None or not _kernels_built():
        return None
    perm, xv, rows, groups, name = plan
    n_params = rows.shape[2]
    _native.note(name, "native (channels_last)")
    y, stats = _route(stats_norm, _stats_norm, rows, weight, bias)(
        rows, _param(weight, n_params, 1.0), _param(bias, n_params, 0.0), GROUPS_CL, groups, float(eps), center)
    return (_from_rows(y, xv, perm), *_moments(stats, x, dims))


def _stats_affine_channels_last(x, mean, var, weight, bias, eps):
    """:func:`stats_affine` for a channels-last input, as ``(N * S, C)`` rows; None where that does not apply."""
    found = _channels_minor(x, 0) if x.dim() >= 3 else None
    if found is None or not _per_channel(x, mean, var, weight, bias):
        return None
    c = x.shape[1]
    if not _kernels_built():
        return None
    perm, xv = found
    _native.note("batch_norm/instance_norm (eval)", "native (channels_last)")
    y = _route(affine_eval, _affine_eval, xv, weight, bias)(
        xv.reshape(-1, c), _param(mean.detach(), c, 0.0), _param(var.detach(), c, 1.0), _param(weight, c, 1.0),
        _param(bias, c, 0.0), float(eps))
    return _from_rows(y, xv, perm)
