"""``normkit.watch(model)``: how far each norm layer is from overflow, recorded during real training steps.

A textbook normalization in a dtype forms the squares of its centred input, ``(x - mean)**2`` (LayerNorm,
GroupNorm, InstanceNorm, BatchNorm on batch statistics) or of its input, ``x**2`` (RMSNorm, LRN), and their
mean ``sum(x**2) / N`` (the variance), which is never larger than the largest square. A norm layer's
**headroom** is ``log2(finfo(dtype).max / largest intermediate)``: how many powers of two the input may still
grow before the squares overflow. BatchNorm on running statistics forms ``x - running_mean`` (no squares).
The largest square is ``max |x - mean|**2`` over the reduction groups (:func:`max_deviation`: a mean, a
subtraction and an infinity norm).

What is watched:

* torch's norm modules and normkit's (``nn.LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm``, ``InstanceNorm1d/2d/3d``, ``LocalResponseNorm``, normkit's subclasses and
  ``FrozenBatchNorm*d``): a forward pre-hook on each;
* norm layers inside other classes that call a functional norm in their own forward (timm's
  ``LayerNorm2d``, torchvision's ConvNeXt ``LayerNorm2d``: ``F.layer_norm``, ``F.group_norm``,
  ``F.batch_norm``, ``F.instance_norm``, ``F.rms_norm``, ``F.local_response_norm`` and the ``torch.*``
  functions they dispatch to): found during the first watched forward by a ``TorchFunctionMode``, then
  watched with that mode active inside those modules only;
* hand-written norms that call no norm function (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``): by class
  name, a module whose class name ends in ``RMSNorm`` (squares of the input) or ``LayerNorm`` (centred over
  the last axis) that made no functional norm call.

Each hook only launches the reductions; the values are read back once per forward of ``model`` (one host
sync per step), when a warning (:class:`HeadroomWarning`) is issued the first time a layer comes within
``threshold`` powers of two of overflow.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .nn.batchnorm import _FrozenBatchNorm


class HeadroomWarning(UserWarning):
    """A norm layer came within the watch's threshold of overflow (issued once per layer)."""


def extremes(x: torch.Tensor, kind: str, dims=None, *, groups: int | None = None,
             mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of what a textbook norm squares (or, for ``kind="given"``, subtracts): ``x - mean``
    per reduction group, or ``x`` itself for ``kind="rms"``; 0-D tensors in float32 (float64 for float64
    input), no autograd graph (the input is detached). Three kernels at most (mean, subtract, aminmax):
    cheap enough to run in every training step.

    ``kind``: ``"center"`` over the groups of ``dims``; ``"rms"``; ``"group"`` centred over
    ``(N, groups, -1)``; ``"instance"`` centred over dims 2..; ``"batch"`` centred over every dim but 1;
    ``"given"`` ``x - mean`` with ``mean`` per channel (dim 1).
    """
    x = x.detach()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        zero = torch.zeros((), dtype=acc, device=x.device)
        return zero, zero
    if kind == "rms":
        lo, hi = torch.aminmax(x)
        return lo.to(acc), hi.to(acc)
    if kind == "group":
        x, kind, dims = x.reshape(x.shape[0], groups, -1), "center", (2,)
    elif kind == "instance":
        kind, dims = "center", tuple(range(2, x.dim()))
    elif kind == "batch":
        dims = tuple(d for d in range(x.dim()) if d != 1)
    if kind == "given":
        m = mean.detach().to(device=x.device, dtype=acc).reshape([1, -1] + [1] * (x.dim() - 2))
    else:
        m = x.mean(dims, keepdim=True, dtype=acc)
    return torch.aminmax(x - m)


def max_deviation(x: torch.Tensor, kind: str, dims=None, *, groups: int | None = None,
                  mean: torch.Tensor | None = None) -> torch.Tensor:
    """The largest magnitude of :func:`extremes`' values, ``max(max, -min)``, as a 0-D tensor."""
    lo, hi = extremes(x, kind, dims, groups=groups, mean=mean)
    return torch.maximum(hi, -lo)


def largest_intermediate(deviation: float, kind: str) -> float:
    """The largest intermediate formed from :func:`max_deviation`'s value: its square, or the deviation
    itself for ``kind="given"`` (BatchNorm on running statistics forms no squares)."""
    return deviation if kind == "given" else deviation * deviation


def headroom(largest: float, dtype: torch.dtype | float) -> float:
    """``log2(finfo(dtype).max / largest)`` in powers of two (``inf`` for 0, ``-inf`` when non-finite);
    ``dtype`` may be given as its largest value."""
    if not math.isfinite(largest):
        return -math.inf
    if largest <= 0:
        return math.inf
    top = dtype if isinstance(dtype, float) else torch.finfo(dtype).max
    return math.log2(top) - math.log2(largest)


_TOP: dict = {}  # dtype -> (largest value, name)


# ------------------------------------------------------------------------------------------ what a call is
def _trailing(shape) -> tuple[int, ...]:
    n = 1 if isinstance(shape, int) else len(shape)
    return tuple(range(-n, 0))


def _batch_spec(x, running_mean, training):
    return ("batch", None, None, None) if training or running_mean is None else ("given", None, None, running_mean)


# functional norm -> (input, kind, dims, groups, mean) from its arguments (torch's own signatures)
FUNCTIONAL = {
    F.layer_norm: lambda input, normalized_shape, *a, **k: (input, "center", _trailing(normalized_shape), None, None),
    torch.layer_norm: lambda input, normalized_shape, *a, **k: (input, "center", _trailing(normalized_shape), None, None),
    F.rms_norm: lambda input, *a, **k: (input, "rms", None, None, None),
    torch.rms_norm: lambda input, *a, **k: (input, "rms", None, None, None),
    F.group_norm: lambda input, num_groups, *a, **k: (input, "group", None, num_groups, None),
    torch.group_norm: lambda input, num_groups, *a, **k: (input, "group", None, num_groups, None),
    F.batch_norm: lambda input, running_mean, running_var, weight=None, bias=None, training=False, *a, **k:
        (input, *_batch_spec(input, running_mean, training)),
    torch.batch_norm: lambda input, weight, bias, running_mean, running_var, training, *a, **k:
        (input, *_batch_spec(input, running_mean, training)),
    F.instance_norm: lambda input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, *a, **k:
        (input, "instance", None, None, None) if use_input_stats else (input, "given", None, None, running_mean),
    torch.instance_norm: lambda input, weight, bias, running_mean, running_var, use_input_stats, *a, **k:
        (input, "instance", None, None, None) if use_input_stats else (input, "given", None, None, running_mean),
    F.local_response_norm: lambda input, *a, **k: (input, "rms", None, None, None),
}


def module_spec(m: nn.Module):
    """``(kind, dims, groups, mean)`` of a norm module's current call, or None for another module."""
    if isinstance(m, nn.LayerNorm):
        return "center", _trailing(m.normalized_shape), None, None
    if isinstance(m, (nn.RMSNorm, nn.LocalResponseNorm)):
        return "rms", None, None, None
    if isinstance(m, nn.GroupNorm):
        return "group", None, m.num_groups, None
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        use_input = m.training or not m.track_running_stats
        return ("instance", None, None, None) if use_input else ("given", None, None, m.running_mean)
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return _batch_spec(None, m.running_mean, m.training or m.running_mean is None)
    if isinstance(m, _FrozenBatchNorm):
        return "given", None, None, m.running_mean
    return None


def _by_class_name(m: nn.Module):
    name = type(m).__name__.lower()
    if name.endswith("rmsnorm"):
        return "rms", None, None, None
    if name.endswith("layernorm"):
        return "center", (-1,), None, None
    return None


# ------------------------------------------------------------------------------------------ records
@dataclass
class LayerRecord:
    """What the watch saw of one norm layer: ``how`` it is watched, the ``dtype`` judged against, the
    latest and lowest headroom (powers of two; the minimum over the calls in a step), the largest
    intermediate seen, and the per-step history (the last ``maxlen`` steps)."""

    name: str
    what: str
    how: str
    dtype: str = ""
    calls: int = 0
    last: float = math.inf
    lowest: float = math.inf
    largest: float = 0.0
    warned: bool = False
    kinds: set = field(default_factory=set)  # "given" once BatchNorm ran on running statistics
    history: deque = field(default_factory=lambda: deque(maxlen=1000))


class _Spy(TorchFunctionMode):
    """Records functional norm calls under the innermost watched host module."""

    def __init__(self, watch: Watch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = FUNCTIONAL.get(func)
        if spec is not None and self.watch._hosts:
            self.watch._functional_call(func, spec(*args, **kwargs))
        return func(*args, **kwargs)


class Watch:
    """Returned by :func:`watch`. ``records``: name -> :class:`LayerRecord`; ``report()``: a text table;
    ``remove()`` (or leaving a ``with`` block) takes every hook off."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, threshold: float = 2.0, history: int = 1000,
                 every: int = 1):
        if not isinstance(model, nn.Module):
            raise TypeError(f"normkit.watch expects a torch.nn.Module, got {type(model).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"normkit.watch: dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"normkit.watch: every={every!r} must be a positive integer (measure one step in every)")
        self.model, self.dtype, self.threshold, self._maxlen, self.every = model, dtype, float(threshold), history, every
        self.records: dict[str, LayerRecord] = {}
        self._pending: list = []  # (record, kind, input dtype, (min, max) tensors) of this step
        self._handles: list = []
        self._hosts: list[str] = []  # stack of host modules whose forward is running (functional calls)
        self._discovering = True
        self._on, self._steps, self._spying = True, 0, False  # measuring this step; steps seen; mode entered
        self._seen_functional: set[str] = set()
        self._spy = _Spy(self)
        self._modules = dict(model.named_modules())
        for name, m in self._modules.items():
            if module_spec(m) is not None:
                self._record(name, type(m).__name__, "module hook")
                self._handles.append(m.register_forward_pre_hook(self._module_hook(name)))
        self._handles.append(model.register_forward_pre_hook(self._step_start))
        self._handles.append(model.register_forward_hook(self._step_end, always_call=True))

    # ------------------------------------------------------------------ hooks
    def _record(self, name, what, how) -> LayerRecord:
        if name not in self.records:
            self.records[name] = LayerRecord(name or type(self.model).__name__, what, how, history=deque(maxlen=self._maxlen))
        return self.records[name]

    def _measure(self, name, x, kind, dims, groups, mean):
        if self._on and isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            self._pending.append((self.records[name], kind, x.dtype, extremes(x, kind, dims, groups=groups, mean=mean)))

    def _module_hook(self, name):
        def hook(module, args):
            if not self._on:
                return
            spec = module_spec(module) or _by_class_name(module)
            if args and spec is not None:
                self._measure(name, args[0], *spec)
        return hook

    def _functional_call(self, func, spec):
        name = self._hosts[-1]
        m = self._modules[name]
        if module_spec(m) is not None:
            return  # a watched norm module's own functional call: its module hook measured it
        if self._discovering:
            self._seen_functional.add(name)
        self._record(name, f"{type(m).__name__} -> {func.__name__}", "functional call in its forward")
        self._measure(name, *spec)

    def _push(self, name):
        self._hosts.append(name)
        if len(self._hosts) == 1 and not self._discovering and self._on:
            self._spy.__enter__()
            self._spying = True

    def _pop(self):
        if self._hosts:
            self._hosts.pop()
            if not self._hosts and self._spying:
                self._spy.__exit__(None, None, None)
                self._spying = False

    def _push_pop_hooks(self, name, m) -> list:
        return [m.register_forward_pre_hook(lambda module, args: self._push(name)),
                m.register_forward_hook(lambda module, args, output: self._pop(), always_call=True)]

    def _step_start(self, module, args):
        if self._discovering:
            # first forward: every submodule may hold a functional norm call; the mode sees them all
            self._discovery = [h for name, m in self._modules.items() if name for h in self._push_pop_hooks(name, m)]
            self._spy.__enter__()
        if self._discovering or "" in self._seen_functional:
            self._push("")

    def _finish_discovery(self):
        self._spy.__exit__(None, None, None)
        for h in self._discovery:
            h.remove()
        self._discovery = []
        self._discovering = False
        self._hosts.clear()
        hosted = set()
        for host in self._seen_functional:  # the hosts, and the norm modules inside them (their calls are theirs)
            for sub, m in self._modules[host].named_modules(prefix=host):
                if sub and (sub == host or module_spec(m) is not None) and sub not in hosted:
                    hosted.add(sub)
                    self._handles += self._push_pop_hooks(sub, m)
        for name, m in self._modules.items():  # hand-written norms: by class name, when they called no norm function
            if name and name not in self.records and _by_class_name(m) is not None:
                self._record(name, type(m).__name__, "class name (hand-written norm)")
                self._handles.append(m.register_forward_pre_hook(self._module_hook(name)))

    def _step_end(self, module, args, output):
        if self._discovering:
            self._finish_discovery()
        elif self._hosts:
            self._hosts.clear()
            if self._spying:
                self._spy.__exit__(None, None, None)
                self._spying = False
        self.flush()
        self._steps += 1
        self._on = self._steps % self.every == 0

    # ------------------------------------------------------------------ results
    def flush(self) -> None:
        """Read this step's measurements (one host sync) into :attr:`records`; warn where a layer came within
        ``threshold`` powers of two of overflow for the first time. Called after every forward of the model."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if all(p[3][0].device.type == "cpu" for p in pending):
            values = [(lo.item(), hi.item()) for _, _, _, (lo, hi) in pending]  # no device to wait for
        else:  # one host sync for the whole step
            values = torch.stack([t.to(torch.float32) for p in pending for t in p[3]]).view(-1, 2).tolist()
        step: dict[str, float] = {}
        for (rec, kind, dtype, _), (lo, hi) in zip(pending, values):
            name = rec.name
            judged = self.dtype or dtype
            if judged not in _TOP:
                _TOP[judged] = (torch.finfo(judged).max, str(judged).replace("torch.", ""))
            rec.dtype = _TOP[judged][1]
            big = largest_intermediate(max(hi, -lo), kind)
            rec.calls += 1
            rec.largest = max(rec.largest, big)
            if kind == "given":
                rec.kinds.add(kind)
            h = headroom(big, _TOP[judged][0])
            if h < step.get(name, math.inf):
                step[name] = h
        recs = {p[0].name: p[0] for p in pending}
        for name, h in step.items():
            rec = recs[name]
            rec.last = h
            rec.lowest = min(rec.lowest, h)
            rec.history.append(h)
            if h < self.threshold and not rec.warned:
                rec.warned = True
                term = "its input's distance from the running mean" if rec.kinds else "its largest square"
                warnings.warn(f"normkit.watch: {rec.name} ({rec.what}) is {h:.1f} powers of two from {rec.dtype} "
                              f"overflow: {term} reached {rec.largest:.3g} ({rec.dtype} max "
                              f"{torch.finfo(getattr(torch, rec.dtype)).max:.3g})", HeadroomWarning, stacklevel=2)

    def report(self) -> str:
        """One line per watched layer: name, class, how it is watched, dtype, calls, latest and lowest headroom."""
        head = f"{'layer':<28} {'norm':<26} {'dtype':<8} {'calls':>6} {'headroom':>9} {'lowest':>8}  watched by"
        lines = [head, "-" * len(head)]
        for r in self.records.values():
            lines.append(f"{r.name[:28]:<28} {r.what[:26]:<26} {r.dtype:<8} {r.calls:>6} {r.last:>9.1f} {r.lowest:>8.1f}  {r.how}")
        return "\n".join(lines)

    def remove(self) -> None:
        """Take every hook off the model (the records stay)."""
        for h in self._handles + getattr(self, "_discovery", []):
            h.remove()
        self._handles, self._discovery = [], []

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def watch(model: nn.Module, *, dtype: torch.dtype | None = None, threshold: float = 2.0, history: int = 1000,
          every: int = 1) -> Watch:
    """Watch every norm layer of ``model`` during its forward calls (see the module docstring).

    ``dtype``: judge every layer against this dtype's largest value (e.g. ``torch.float16`` for a model
    trained in float32 and deployed in float16); default: each call's input dtype. ``threshold``: warn once a
    layer's headroom falls below this many powers of two (default 2). ``history``: steps kept per layer.
    ``every``: measure one forward in ``every`` (the hooks of the others return at once).
    Returns a :class:`Watch`; use it as a context manager or call ``remove()`` when done.
    """
    return Watch(model, dtype, threshold, history, every)
