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

Also here: :func:`routes` builds the dispatch table for another namespace of functional norms (ONNX export
routes the calls to its custom ops); :func:`record_norm_calls` records every call with the module that made
it; :func:`harden` makes one module compute its own forward under the mode, permanently and picklably (what
:func:`normkit.convert` does to timm's ``LayerNorm2d``, ``BatchNormAct2d`` and the like).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import functional as nf
from .nn._toolchain import NotScriptable


# torch.* aten-level signatures (argument order differs from torch.nn.functional's) -> ``ns``'s functional form
def _torch_batch_norm(ns, input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return ns.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(ns, input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                         cudnn_enabled=True):
    return ns.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _torch_layer_norm(ns, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return ns.layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(ns, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return ns.group_norm(input, num_groups, weight, bias, eps)


class _Same:
    """``ns.<name>(*args, **kwargs)``, with ``ns.<name>`` looked up at call time: under
    ``torch.fx.symbolic_trace`` the module-level names of :mod:`normkit.functional` are fx's wrappers, so a
    routed call is recorded as one node, as a call from normkit's own modules is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, ns, *args, **kwargs):
        return getattr(ns, self.name)(*args, **kwargs)


# torch function -> an adapter ``(ns, *args, **kwargs)`` calling ``ns``'s function of torch.nn.functional's signature
_ADAPTERS = {
    F.batch_norm: _Same("batch_norm"),
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: _Same("instance_norm"),
    torch.instance_norm: _torch_instance_norm,
    F.layer_norm: _Same("layer_norm"),
    torch.layer_norm: _torch_layer_norm,
    F.group_norm: _Same("group_norm"),
    torch.group_norm: _torch_group_norm,
    F.rms_norm: _Same("rms_norm"),
    torch.rms_norm: _Same("rms_norm"),
    F.local_response_norm: _Same("local_response_norm"),
}


def routes(ns=nf) -> dict:
    """The dispatch table: every torch functional normalization -> a callable taking its arguments and
    computing with ``ns`` (a namespace with ``torch.nn.functional``'s signatures for ``batch_norm``,
    ``instance_norm``, ``layer_norm``, ``group_norm``, ``rms_norm``, ``local_response_norm``;
    :mod:`normkit.functional` by default, ONNX export passes its own)."""
    return {func: partial(adapter, ns) for func, adapter in _ADAPTERS.items()}


ROUTES = routes()


class RobustMode(TorchFunctionMode, contextlib.ContextDecorator):
    """The mode behind :func:`robust`: a context manager and a decorator; nests (an inner mode handles the
    call, the outer ones see only the ops normkit is made of, which they pass through). ``table``: the
    dispatch table (:data:`ROUTES` by default; see :func:`routes`).

    A :func:`record_norm_calls` recorder entered *outside* this mode still records each routed call (with
    normkit's output): the mode hands the call to the recorder, whose own call of the torch function comes
    back to a plain router (``tell_recorders=False``) pushed on top. So a model whose hardened modules route
    their calls inside their own forward (:func:`harden`) shows the same calls as the model it came from."""

    def __init__(self, table: dict | None = None, *, tell_recorders: bool = True) -> None:
        super().__init__()
        self.table = ROUTES if table is None else table
        self.tell_recorders = tell_recorders

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = self.table.get(func)
        if route is None:
            return func(*args, **(kwargs or {}))
        if self.tell_recorders and _RECORDERS and not _RECORDERS[-1].in_norm_call:
            with RobustMode(self.table, tell_recorders=False):
                return _RECORDERS[-1].__torch_function__(func, types, args, kwargs)
        return route(*args, **(kwargs or {}))

    def _recreate_cm(self):  # each decorated call enters a mode of its own (re-entrant, thread-safe)
        return type(self)(self.table, tell_recorders=self.tell_recorders)


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

    ``function`` is the normalization's name (``"layer_norm"``), ``torch_function`` the function called
    (``F.layer_norm`` and ``torch.layer_norm`` take their arguments in different orders); ``module`` is the
    qualified name of the innermost module whose ``forward`` was running (``""``: the root model; ``None``: no
    module of the recorded model, or modules not tracked), ``module_type`` its class name; ``args``/``kwargs``
    are the call's arguments as passed (tensors not copied unless the recorder's ``keep`` copies them),
    ``output`` its result.
    """

    function: str
    module: str | None
    module_type: str | None
    args: tuple
    kwargs: dict
    output: object = None
    torch_function: object = None


_RECORDERS: list["NormCallRecorder"] = []  # the recorders entered, innermost last (for RobustMode to tell)


class NormCallRecorder(TorchFunctionMode):
    """The mode behind :func:`record_norm_calls`: every call of a function in :data:`ROUTES` is recorded with
    the innermost running module, then runs unchanged: torch's own function, or normkit's when :func:`robust`
    is active (entered outside the recorder, or inside it -- a hardened module's own -- which hands the call
    to the recorder first: see :class:`RobustMode`). See :func:`record_norm_calls` for ``keep``, ``on_call``
    and ``track_modules``."""

    def __init__(self, model: nn.Module | None = None, *, keep: Callable | None = None,
                 on_call: Callable[[NormCall], None] | None = None, track_modules: bool = True) -> None:
        super().__init__()
        self.calls: list[NormCall] = []
        self.in_norm_call = False  # inside its own call of a recorded function (a RobustMode then just routes)
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._keep, self._on_call, self._track = keep, on_call, track_modules
        self._stack: list[nn.Module] = []
        self._handles: list = []

    def __enter__(self):
        if self._track:
            pre = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: self._stack.append(m))
            post = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: self._pop(m))
            self._handles = [pre, post]
        _RECORDERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._stack = [], []
        _RECORDERS.remove(self)
        return super().__exit__(*exc)

    def _pop(self, module: nn.Module) -> None:
        while self._stack:  # a module that raised never reached its forward hook: unwind to this one
            if self._stack.pop() is module:
                break

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = NORM_FUNCTIONS.get(func)
        if name is None:
            return func(*args, **kwargs)
        kept = (args, kwargs) if self._keep is None else (self._keep(tuple(args)), self._keep(dict(kwargs)))
        self.in_norm_call = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_norm_call = False
        inner = next((m for m in reversed(self._stack) if id(m) in self._names), None) if self._names else (
            self._stack[-1] if self._stack else None)
        call = NormCall(name, self._names.get(id(inner)) if inner is not None else None,
                        type(inner).__name__ if inner is not None else None, *kept, out, func)
        if self._on_call is None:
            self.calls.append(call)
        else:
            self._on_call(call)
        return out


def record_norm_calls(model: nn.Module | None = None, *, keep: Callable | None = None,
                      on_call: Callable[[NormCall], None] | None = None, track_modules: bool = True) -> NormCallRecorder:
    """``with record_norm_calls(model) as rec: model(x)`` -- afterwards ``rec.calls`` lists every torch
    functional normalization call made (``F.layer_norm``, ``torch.batch_norm``, ...; the keys of
    :data:`ROUTES`), in order, each with the innermost module of ``model`` whose forward made it. Nothing is
    changed: the calls run as they would. This is how normkit sees norms that live inside other classes'
    own ``forward`` (timm's ``BatchNormAct2d``, a permute-LayerNorm-permute ``LayerNorm2d``).

    ``keep``: applied to the call's arguments (the tuple, then the dict) before the function runs -- a copy, when
    the function or what follows changes them (batch norm updates the running statistics it is given).
    ``on_call``: called with each :class:`NormCall` as soon as it returns (then not kept in ``calls``).
    ``track_modules=False``: no module attribution (``module`` None) and no global module hooks, for a caller
    that knows which module is running (:func:`normkit.watch`)."""
    return NormCallRecorder(model, keep=keep, on_call=on_call, track_modules=track_modules)


# ------------------------------------------------------------------------------------ hardened classes
class Hardened(NotScriptable):
    """The base of the classes :func:`hardened_class` makes: the wrapped class's own ``forward`` runs as
    written (its permutes, activation, drop path, rank checks), with the torch functional normalization
    calls it makes routed to normkit (:class:`RobustMode`). Pickling (``torch.save`` of a whole model,
    ``copy.deepcopy``) rebuilds the class from the wrapped one."""

    _normkit_wraps: type

    def forward(self, *args, **kwargs):
        with RobustMode():
            return self._normkit_wraps.forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        rebuild, args, *rest = super().__reduce_ex__(protocol)  # args[0] is type(self), not importable by name
        return (_rebuild_hardened, (rebuild, self._normkit_wraps, args[1:]), *rest)


_HARDENED: dict[type, type] = {}


def hardened_class(cls: type) -> type:
    """The hardened subclass of ``cls`` (made once per class): same name, same everything, except that
    ``forward`` runs under :class:`RobustMode`."""
    h = _HARDENED.get(cls)
    if h is None:
        h = type(cls.__name__, (Hardened, cls), {"_normkit_wraps": cls, "__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        _HARDENED[cls] = h
    return h


def _rebuild_hardened(rebuild, cls: type, args: tuple):
    return rebuild(hardened_class(cls), *args)


def harden(module: nn.Module) -> None:
    """Make ``module`` (in place) an instance of :func:`hardened_class` of its class: parameters, buffers,
    hooks, state-dict keys and training mode are untouched; :func:`unharden` gives the class back."""
    module.__class__ = hardened_class(type(module))


def unharden(module: nn.Module) -> None:
    """The inverse of :func:`harden` (a module that is not hardened is left as it is)."""
    if isinstance(module, Hardened):
        module.__class__ = type(module)._normkit_wraps
