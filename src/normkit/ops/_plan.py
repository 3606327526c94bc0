"""Layout planning for the native kernels: which kernel op (:mod:`normkit.ops._kernels`), in which layout
and on which view of the input, serves a call of :func:`normkit.ops._normalize.standardize_affine` or
:func:`~normkit.ops._normalize.stats_affine` -- or why none does.

:func:`standardize_affine` and :func:`stats_affine` take exactly the arguments of the functions of the same
names in :mod:`normkit.ops._normalize` and return their result computed by a kernel, or ``None`` where no
kernel applies; the caller then runs its eager path (the spec itself, :mod:`normkit._spec`). Both compute
the same functions, so the two paths agree within the tolerances every backend is held to.

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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _native
from ._kernels import CHANNELS, GROUPS, GROUPS_CL, ROWS, kernels_built, run_affine_eval, run_stats_norm

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_SEGMENT = 8  # channel layouts with fewer spatial values per (n, c) run eagerly (a kernel per value is no gain)


# ---- dispatch -------------------------------------------------------------------------------------------

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
    if not kernels_built():
        _native.note(_op_name(layout, center), "eager (kernels unavailable)")
        return None
    _native.note(_op_name(layout, center), "native (input copied to contiguous)" if copied else "native")
    y, stats = run_stats_norm(xv, _param(weight, n_params, 1.0), _param(bias, n_params, 0.0), layout, groups, float(eps),
                              center, weight, bias)
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
        elif not kernels_built():
            why = "kernels unavailable"
    if why is not None:
        _native.note("batch_norm/instance_norm (eval)", f"eager ({why})")
        return None
    _native.note("batch_norm/instance_norm (eval)", "native" if x.is_contiguous() else "native (input copied to contiguous)")
    x = x.contiguous()
    c = x.shape[1]
    y = run_affine_eval(x.reshape(x.shape[0], c, -1), _param(mean.detach(), c, 0.0), _param(var.detach(), c, 1.0),
                        _param(weight, c, 1.0), _param(bias, c, 0.0), float(eps), weight, bias)
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
    if plan is None or not kernels_built():
        return None
    perm, xv, rows, groups, name = plan
    n_params = rows.shape[2]
    _native.note(name, "native (channels_last)")
    y, stats = run_stats_norm(rows, _param(weight, n_params, 1.0), _param(bias, n_params, 0.0), GROUPS_CL, groups,
                              float(eps), center, weight, bias)
    return (_from_rows(y, xv, perm), *_moments(stats, x, dims))


def _stats_affine_channels_last(x, mean, var, weight, bias, eps):
    """:func:`stats_affine` for a channels-last input, as ``(N * S, C)`` rows; None where that does not apply."""
    found = _channels_minor(x, 0) if x.dim() >= 3 else None
    if found is None or not _per_channel(x, mean, var, weight, bias):
        return None
    c = x.shape[1]
    if not kernels_built():
        return None
    perm, xv = found
    _native.note("batch_norm/instance_norm (eval)", "native (channels_last)")
    y = run_affine_eval(xv.reshape(-1, c), _param(mean.detach(), c, 0.0), _param(var.detach(), c, 1.0),
                        _param(weight, c, 1.0), _param(bias, c, 0.0), float(eps), weight, bias)
    return _from_rows(y, xv, perm)
