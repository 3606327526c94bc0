"""Routing for the native kernels: which kernel op (:mod:`normkit.ops._kernels`), in which layout and on which
view of the input, serves a call -- or why none does -- and the cache that decides it once per signature.

**Plans.** :func:`plan_standardize` and :func:`plan_affine` look at one call (its tensors' device, dtype,
shape and strides, the reduced dims, the parameters' shapes) and return a :class:`Plan`, or the reason no
kernel applies; the caller then runs its eager path (the spec itself, :mod:`normkit._spec`). Both paths
compute the same functions, so they agree within the tolerances every backend is held to.

A kernel serves when: the backend is not ``"eager"`` (:func:`normkit.set_backend`, ``NORMKIT_NATIVE=0``) and the
kernels are built; the input is a CPU tensor of float32, bfloat16 or float16 with elements; no ``torch.func``
transform or forward-mode AD is active on it; the program is not being exported; and the reduction is one of

* trailing dims (layer / RMS norm): rows ``(R, D)``;
* dims ``2..``, affine-free or with a per-channel affine ``(1, A, *lead, 1, ...)`` (instance norm, group
  norm's grouped view): groups of consecutive channels ``(N, C, S)``;
* dims ``(0, 2, ...)`` (batch norm in training): a group per channel, ``(N, C, S)`` with ``S >= 8`` (``S = 1``:
  channels last, below);
* given statistics (batch / instance norm in eval): ``(N, C, S)``, any ``S``.

Channels-last inputs (``channels_last``, ``channels_last_3d``, and group norm's grouped view of them: any
input whose channel dims are innermost in memory) run natively in that layout, as the contiguous
``(N, *S, C)`` array ``x.permute(0, 2, ..., 1)`` is, with no copy and any ``S``: instance and group norm as
groups of ``S`` rows by ``Cg`` channels (``GROUPS_CL``; batch norm as one sample of ``N * S`` rows with a group
per channel -- also a contiguous ``(N, C)`` input, whose channels are innermost too), eval per channel of
``(..., C)``; the output keeps the input's strides. Any other non-contiguous input is first copied to
contiguous.

**The cache.** The functional entry points look their call up in :data:`ROUTES` first (:func:`route`): the key
is the op, the input's shape, strides, dtype and device, the op's Python arguments, and each other tensor's
type, shape, dtype and device -- everything their argument checks and the plan read. The first call of a
signature runs the op's route builder (:data:`BUILDERS`, in :mod:`normkit.ops._normalize`): the argument
checks (raising the op's own errors), the plan, and a closure that makes the kernel call and nothing else;
``None`` where the eager path serves. Later calls of the signature are one dictionary lookup and that
closure: the checks passed for the signature, and whether a gradient is needed, dispatch modes and fake
tensors are the dispatcher's business (the C++ autograd kernel). No cached route serves while Dynamo
traces, inside a ``torch.func`` transform or forward-mode AD, for tensor subclasses, or with the backend eager.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _native
from ._kernels import CHANNELS, GROUPS, GROUPS_CL, ROWS, affine_eval_call, kernels_built, stats_norm_call

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_SEGMENT = 8  # channel layouts with fewer spatial values per (n, c) run eagerly (a kernel per value is no gain)
MAX_ROUTES = 4096  # signatures cached; the cache starts afresh beyond (a model with ever-changing shapes)
COMPILED = "compiled: the pointwise form Inductor fuses"  # plan_affine under torch.compile (ops/_normalize.py)

_is_compiling = torch.compiler.is_compiling


class Plan(NamedTuple):
    """How a call reaches a kernel: ``x`` (copied to contiguous when ``copy``; permuted by ``perm`` and viewed
    as ``view`` when given) is read in ``layout`` with ``groups`` and ``C``; ``op`` and ``path`` name it in
    the path record (:func:`normkit._native.recording`)."""

    layout: int
    groups: int
    C: int
    op: str
    path: str = "native"
    perm: tuple | None = None
    view: tuple | None = None
    copy: bool = False

    def kernel_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x as the kernel reads it, x as permuted)``."""
        if self.copy:
            x = x.contiguous()
        xp = x.permute(self.perm) if self.perm is not None else x
        return (xp.reshape(self.view) if self.view is not None else xp), xp

    def output(self, y: Tensor, xp: Tensor) -> Tensor:
        """The kernel's output in the input's shape (and, channels last, its strides)."""
        if self.view is not None:
            y = y.view(xp.shape)
        return y.permute(_inverse(self.perm)) if self.perm is not None else y


def _inverse(perm) -> tuple:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tuple(inverse)


# ---- plans ------------------------------------------------------------------------------------------------

def _plain(t: Tensor | None) -> bool:
    """Not a torch.func-wrapped tensor (vmap / grad / jvp run the eager path, which has their rules)."""
    return t is None or not torch._C._functorch.is_functorch_wrapped_tensor(t)


def why_not(x: Tensor, *others: Tensor | None) -> str | None:
    """The reason no kernel can serve this input, or None."""
    if not _native.serving:
        return "backend eager"
    if x.device.type != "cpu":
        return f"device {x.device.type}"
    if x.dtype not in NATIVE_DTYPES:
        return f"dtype {x.dtype}"
    if x.numel() == 0:
        return "empty"
    if torch.compiler.is_exporting():  # the program keeps the reference decomposition: portable, ONNX-exportable
        return "exporting"
    if not _is_compiling() and (not all(_plain(t) for t in (x, *others)) or _forward_ad._current_level >= 0):
        return "torch.func transform or forward AD"
    if any(t is not None and (t.device != x.device) for t in others):
        return "parameters on another device"
    return None


def _per_channel(x: Tensor, *params: Tensor | None) -> bool:
    """Every given parameter is shaped ``(1, C, 1, ...)`` against ``x (N, C, *)``."""
    shape = (1, x.shape[1], *([1] * (x.dim() - 2)))
    return all(p is None or tuple(p.shape) == shape for p in params)


def _channel_split(x: Tensor, p: Tensor) -> int | None:
    """For a parameter ``p`` shaped ``(1, A, *lead, 1, ...)`` against ``x (N, A, *lead, ...)``: ``len(lead)``, else None."""
    if p.dim() != x.dim() or p.shape[0] != 1 or p.shape[1] != x.shape[1]:
        return None
    rest, full = list(p.shape[2:]), list(x.shape[2:])
    lead = 0
    while lead < len(rest) and rest[lead] == full[lead] and rest[lead] != 1:
        lead += 1
    return lead if all(v == 1 for v in rest[lead:]) else None


BATCH_NORM_TRAIN = "channels: batch_norm (train)"  # the op name of its plans (ops/_normalize.py compiles it apart)


def _op_name(layout: int, center: bool) -> str:
    return {ROWS: "rows: layer_norm" if center else "rows: rms_norm",
            GROUPS: "groups: group_norm/instance_norm",
            CHANNELS: BATCH_NORM_TRAIN, GROUPS_CL: "groups: group_norm/instance_norm"}[layout]


def _contiguous_plan(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, center: bool, copy: bool):
    """The plan for a contiguous ``x`` (or one copied to contiguous: ``copy``), or a reason string."""
    nd = x.dim()
    path = "native (input copied to contiguous)" if copy else "native"
    trailing = dims == list(range(nd - len(dims), nd))
    spatial = nd >= 3 and dims == list(range(2, nd))  # instance norm, group norm's grouped view
    if spatial and center and weight is None and bias is None:  # per-channel constants beat per-element ones
        return Plan(GROUPS, x.shape[1], x.shape[1], _op_name(GROUPS, center), path, copy=copy)
    if trailing and all(p is None or tuple(p.shape) == tuple(x.shape[dims[0]:]) for p in (weight, bias)):
        d = math.prod(x.shape[dims[0]:])
        return Plan(ROWS, 1, d, _op_name(ROWS, center), path, copy=copy)  # layer / RMS norm (any trailing standardization)
    if not center:
        return "RMS over non-trailing dims"
    if spatial:
        leads = {_channel_split(x, p) for p in (weight, bias) if p is not None}
        if None in leads or len(leads) > 1:
            return "parameter shape"
        lead = leads.pop() if leads else 0
        a, cg = x.shape[1], math.prod(x.shape[2:2 + lead])
        return Plan(GROUPS, a, a * cg, _op_name(GROUPS, center), path, copy=copy)  # instance / group norm
    if nd >= 2 and dims == [0, *range(2, nd)]:
        if math.prod(x.shape[2:]) < MIN_SEGMENT:
            return f"fewer than {MIN_SEGMENT} values per (n, c)"
        if not _per_channel(x, weight, bias):
            return "parameter shape"
        return Plan(CHANNELS, 1, x.shape[1], _op_name(CHANNELS, center), path, copy=copy)  # batch norm in training
    return "reduction pattern"


def _channels_minor(x: Tensor, lead: int) -> tuple | None:
    """``perm`` moving dims ``(1, 2, ..., 1 + lead)`` (the channel dims) after the spatial ones, when
    ``x.permute(perm)`` is contiguous; else None."""
    nd = x.dim()
    perm = (0, *range(2 + lead, nd), 1, *range(2, 2 + lead))
    return perm if x.permute(perm).is_contiguous() else None


def _channels_last_plan(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, center: bool) -> Plan | None:
    """For an input whose channel dims are innermost in memory, its plan in layout ``GROUPS_CL``; else None
    (the caller's copy to contiguous then serves)."""
    nd = x.dim()
    if not center or nd < 2:
        return None
    c = x.shape[1]
    if dims == [0, *range(2, nd)]:  # batch norm in training: one sample of N * S rows, a group per channel
        perm = _channels_minor(x, 0) if _per_channel(x, weight, bias) else None
        if perm is None:
            return None
        if perm == tuple(range(nd)):  # (N, C) or one value per (n, c): already channels last
            return Plan(GROUPS_CL, c, c, _op_name(CHANNELS, center), "native (channels_last)", view=(1, -1, c))
        return Plan(GROUPS_CL, c, c, _op_name(CHANNELS, center), "native (channels_last)", perm, (1, -1, c))
    if nd < 3 or dims != list(range(2, nd)):
        return None
    leads = {_channel_split(x, p) for p in (weight, bias) if p is not None}  # instance norm, group norm's grouped view
    if None in leads or len(leads) > 1:
        return None
    for lead in (leads if leads else range(nd - 2)):  # without parameters: whichever split the strides show
        perm = _channels_minor(x, lead) if lead < nd - 2 else None
        if perm is not None:
            return Plan(GROUPS_CL, c, c * math.prod(x.shape[2:2 + lead]), _op_name(GROUPS, center),
                        "native (channels_last)", perm)
    return None


def plan_standardize(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, center: bool) -> Plan | str:
    """The plan of ``standardize(x over dims) * weight + bias`` (weight, bias broadcasting against ``x``), or
    why no kernel serves it."""
    why = why_not(x, weight, bias)
    if why is not None:
        return why
    dims = sorted(d % x.dim() for d in dims)
    contiguous = x.is_contiguous()
    plan = None if contiguous else _channels_last_plan(x, weight, bias, dims, center)
    if plan is None:
        plan = _contiguous_plan(x, weight, bias, dims, center, copy=not contiguous)
    if isinstance(plan, str) and contiguous:  # batch norm of one value per (n, c): its channels are innermost
        plan = _channels_last_plan(x, weight, bias, dims, center) or plan
    if isinstance(plan, Plan) and not kernels_built():
        return "kernels unavailable"
    return plan


def plan_affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None) -> Plan | str:
    """The plan of ``(x - mean) * rsqrt(var + eps) * weight + bias`` with per-channel statistics and
    parameters (each shaped ``(1, C, 1, ...)`` or ``(C,)``), or why no kernel serves it; :data:`COMPILED`
    while Dynamo traces, where the kernels would serve: Inductor then gets the pointwise form it fuses with the
    neighbouring ops (:class:`normkit.ops._normalize.StatsAffineCompiled`) instead of an opaque kernel call."""
    why = why_not(x, mean, var, weight, bias)
    if why is None and _is_compiling():  # Inductor fuses a pointwise form with its neighbours: no kernel call
        return COMPILED if kernels_built() else "kernels unavailable"
    if why is None and x.dim() >= 3 and not x.is_contiguous():
        perm = _channels_minor(x, 0)
        if perm is not None and _per_channel_values(x, mean, var, weight, bias):
            return Plan(GROUPS_CL, 1, x.shape[1], "batch_norm/instance_norm (eval)", "native (channels_last)", perm) \
                if kernels_built() else "kernels unavailable"
    if why is None:
        if x.dim() < 2:
            why = "no channel dim"
        elif not _per_channel_values(x, mean, var, weight, bias):
            why = "parameter shape"
        elif not kernels_built():
            why = "kernels unavailable"
    if why is not None:
        return why
    copy = not x.is_contiguous()
    return Plan(CHANNELS, 1, x.shape[1], "batch_norm/instance_norm (eval)",
                "native (input copied to contiguous)" if copy else "native", copy=copy)


def _per_channel_values(x: Tensor, *params: Tensor | None) -> bool:
    """Every given parameter holds one value per channel of ``x``: shaped ``(1, C, 1, ...)`` or ``(C,)``."""
    return _per_channel(x, *(p for p in params if p is None or p.dim() != 1)) and all(
        p is None or p.dim() != 1 or p.shape[0] == x.shape[1] for p in params)


# ---- running a plan -------------------------------------------------------------------------------------------

def run_standardize(plan: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                    center: bool) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` of the kernel for ``plan`` (``y`` in ``x``'s shape; channels last, in its strides)."""
    _native.note(plan.op, plan.path)
    xv, xp = plan.kernel_input(x)
    y, stats = stats_norm_call(xv, weight, bias, plan.layout, plan.groups, plan.C, float(eps), center)
    return plan.output(y, xp), stats


def run_affine(plan: Plan, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    """``y`` of the given-statistics kernel for ``plan``."""
    _native.note(plan.op, plan.path)
    xv, xp = plan.kernel_input(x)
    return plan.output(affine_eval_call(xv, mean, var, weight, bias, plan.layout, float(eps)), xp)


def moments(stats: Tensor, x: Tensor, dims) -> tuple[Tensor, Tensor]:
    """The mean and biased variance the kernels saved in ``stats``, in ``x``'s shape with ``dims`` kept as 1."""
    reduced = {d % x.dim() for d in dims}
    keep = [1 if i in reduced else n for i, n in enumerate(x.shape)]
    return stats[:, 5].reshape(keep), stats[:, 6].reshape(keep)


def standardize_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims, eps: float, center: bool = True):
    """``(y, mean, var)`` as :func:`normkit.ops._normalize.standardize_affine` returns them, from a native
    kernel; ``None`` where none applies."""
    plan = plan_standardize(x, weight, bias, dims, center)
    if isinstance(plan, str):
        return None
    y, stats = run_standardize(plan, x, weight, bias, eps, center)
    return (y, *moments(stats, x, dims))


def stats_affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """``y`` as :func:`normkit.ops._normalize.stats_affine` returns it, from a native kernel; else ``None``."""
    plan = plan_affine(x, mean, var, weight, bias)
    return None if isinstance(plan, str) else run_affine(plan, x, mean.detach(), var.detach(), weight, bias, eps)


# ---- the cache ------------------------------------------------------------------------------------------------

ROUTES: dict = {}  # signature -> the route (a closure) or None (the eager path serves that signature)
BUILDERS: dict[str, Callable] = {}  # op -> builder(x, args, *tensors) -> route or None; raises the op's argument errors


def route(op: str, x, args: tuple, *tensors) -> Callable | None:
    """The cached route of a call of ``op`` -- input ``x``, hashable Python arguments ``args``, other tensor
    arguments ``tensors`` (or None) -- built on the first call of its signature; None where the eager path
    (or the uncached planner) serves. Called as ``route(x, *tensors)``. The tensors' part of the key is the
    extension's ``signature`` (type, sizes, strides, dtype, device of each, in one C++ call; None for
    anything but plain tensors and None)."""
    if _is_compiling():  # first: Dynamo traces the planner and the torch.ops overloads, never this cache
        return None
    module = _native._module
    if module is None or not _native.serving or type(x) is not Tensor or _forward_ad._current_level >= 0:
        return None
    tensors_key = module.signature(x, *tensors)
    if tensors_key is None:
        return None
    key = (op, args, tensors_key)
    try:
        return ROUTES[key]
    except KeyError:
        if len(ROUTES) >= MAX_ROUTES:
            ROUTES.clear()
        found = ROUTES[key] = BUILDERS[op](x, args, *tensors)
        return found
    except TypeError:  # an unhashable argument (a list): the call takes the uncached path
        return None


def output_layout(plan: Plan, x: Tensor, fmt: torch.memory_format) -> torch.memory_format | None:
    """The memory format a route must give its kernel's output to match ``fmt`` (what torch's op gives for
    ``x``); None where the output already has it. Decided from shapes and strides alone."""
    shape = tuple(x.shape)
    if plan.perm is None:
        probe = torch.empty(shape, device="meta")
    else:
        permuted = tuple(shape[p] for p in plan.perm)
        probe = torch.empty(permuted, device="meta").permute(_inverse(plan.perm))
    return None if probe.is_contiguous(memory_format=fmt) else fmt


def torch_format(x: Tensor) -> torch.memory_format:
    """The memory format torch's batch, group and RMS norm give their output for ``x``."""
    return suggest_memory_format(x)
