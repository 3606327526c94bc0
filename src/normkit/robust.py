"""``normkit.robust()``: run torch's functional normalization calls through normkit, converting nothing.

A :class:`torch.overrides.TorchFunctionMode`: while it is active, every call of a function in
:data:`ROUTES` -- ``torch.nn.functional.{batch,instance,layer,group,rms}_norm``,
``torch.nn.functional.local_response_norm``, and the ``torch.*`` functions the first five dispatch to
(``torch.batch_norm``, ``torch.instance_norm``, ``torch.layer_norm``, ``torch.group_norm``,
``torch.rms_norm``; torch 2.13's ``local_response_norm`` is composed of other ops) -- runs normkit's
implementation with the same arguments and semantics (running statistics updated in place). torch's own
modules (``nn.LayerNorm``, ``nn.BatchNorm2d``, ...) and third-party modules that call the functional API in
their own forward (torchvision's ConvNeXt ``LayerNorm2d``) are hardened without being converted. Every other
torch function passes through unchanged.

No recursion: torch removes a mode from the stack while its ``__torch_function__`` runs, so the torch ops
normkit's implementation is made of do not come back here (and normkit calls no torch norm function).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import functional as nf


# torch.* aten-level signatures (argument order differs from torch.nn.functional's) -> normkit
def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return nf.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                         cudnn_enabled=True):
    return nf.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return nf.layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return nf.group_norm(input, num_groups, weight, bias, eps)


# the dispatch table: torch function -> the normkit function that takes its arguments
ROUTES = {
    F.batch_norm: nf.batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: nf.instance_norm,
    torch.instance_norm: _torch_instance_norm,
    F.layer_norm: nf.layer_norm,
    torch.layer_norm: _torch_layer_norm,
    F.group_norm: nf.group_norm,
    torch.group_norm: _torch_group_norm,
    F.rms_norm: nf.rms_norm,
    torch.rms_norm: nf.rms_norm,
    F.local_response_norm: nf.local_response_norm,
}


class RobustMode(TorchFunctionMode, contextlib.ContextDecorator):
    """The mode behind :func:`robust`: a context manager and a decorator; nests (an inner mode handles the
    call, the outer ones see only the ops normkit is made of, which they pass through)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return ROUTES.get(func, func)(*args, **(kwargs or {}))

    def _recreate_cm(self):  # each decorated call enters a mode of its own (re-entrant, thread-safe)
        return type(self)()


def robust() -> RobustMode:
    """Inside ``with normkit.robust():`` (or in a function decorated ``@normkit.robust()``) torch's
    functional normalization calls run normkit's robust implementations; see :mod:`normkit.robust`.

    Composes with ``torch.no_grad``, ``torch.autocast`` (normkit's ops then decide the output dtype) and
    ``torch.compile`` (Dynamo traces through the mode; with the mode entered outside the compiled function,
    or inside it)."""
    return RobustMode()


# ------------------------------------------------------------------------------------------ recording
# torch function -> the name of the normalization it computes (the keys of ROUTES)
NORM_FUNCTIONS = {f: f.__name__ for f in ROUTES}


@dataclass
class NormCall:
    """One call of a torch functional normalization (a key of :data:`ROUTES`) seen by :func:`record_norm_calls`.

    ``module`` is the qualified name of the innermost module whose ``forward`` was running (``""``: the root
    model; ``None``: no module of the recorded model), ``module_type`` its class name; ``args``/``kwargs``
    are the call's arguments as passed (tensors not copied), ``output`` its result.
    """

    function: str
    module: str | None
    module_type: str | None
    args: tuple
    kwargs: dict
    output: object = None


class NormCallRecorder(TorchFunctionMode):
    """The mode behind :func:`record_norm_calls`: every call of a function in :data:`ROUTES` is recorded with
    the innermost running module, then runs unchanged: torch's own function, or normkit's when :func:`robust` was entered
    *outside* the recorder (modes nest innermost-first: a ``robust()`` entered inside the recorder handles
    the call before the recorder sees it)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.calls: list[NormCall] = []
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._stack: list[nn.Module] = []
        self._handles: list = []

    def __enter__(self):
        pre = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: self._stack.append(m))
        post = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: self._pop(m))
        self._handles = [pre, post]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._stack = [], []
        return super().__exit__(*exc)

    def _pop(self, module: nn.Module) -> None:
        while self._stack:  # a module that raised never reached its forward hook: unwind to this one
            if self._stack.pop() is module:
                break

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = NORM_FUNCTIONS.get(func)
        if name is not None:
            inner = next((m for m in reversed(self._stack) if id(m) in self._names), None) if self._names else (
                self._stack[-1] if self._stack else None)
            self.calls.append(NormCall(name, self._names.get(id(inner)) if inner is not None else None,
                                       type(inner).__name__ if inner is not None else None, args, kwargs, out))
        return out


def record_norm_calls(model: nn.Module | None = None) -> NormCallRecorder:
    """``with record_norm_calls(model) as rec: model(x)`` -- afterwards ``rec.calls`` lists every torch
    functional normalization call made (``F.layer_norm``, ``torch.batch_norm``, ...; the keys of
    :data:`ROUTES`), in order, each with the innermost module of ``model`` whose forward made it. Nothing is
    changed: the calls run as they would. This is how normkit sees norms that live inside other classes'
    own ``forward`` (timm's ``BatchNormAct2d``, a permute-LayerNorm-permute ``LayerNorm2d``)."""
    return NormCallRecorder(model)
