"""``normkit.watch(model)``: how far each norm layer is from overflow, recorded during real training steps.

A textbook normalization in a dtype forms the squares of its centred input, ``(x - mean)**2`` (LayerNorm,
GroupNorm, InstanceNorm, BatchNorm on batch statistics) or of its input, ``x**2`` (RMSNorm, LRN), and their
mean ``sum(x**2) / N`` (the variance), which is never larger than the largest square. A norm layer's
**headroom** is ``log2(finfo(dtype).max / largest intermediate)``: how many powers of two the input may still
grow before the squares overflow. BatchNorm on running statistics forms ``x - running_mean`` (no squares).
The largest square is ``max |x - mean|**2`` over the reduction groups (:func:`max_deviation`).

What is watched: the normalizations :func:`normkit.convert` recognizes -- by behaviour
(:mod:`normkit.recognize`), never by class name:

* torch's norm modules and normkit's (``nn.LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm``, ``InstanceNorm1d/2d/3d``, ``LocalResponseNorm``, ``FrozenBatchNorm*d``, and the twins
  ``convert`` makes): a forward pre-hook on each;
* hand-written norms the float64 probe of :func:`normkit.recognize.recognize` proves (Hugging Face's
  ``LlamaRMSNorm``, ``T5LayerNorm``, Gemma's; a user's RMS, layer, group or frozen batch norm): a forward
  pre-hook, measuring the norm each is proven to be;
* torch functional norm calls (``F.layer_norm``, ``torch.batch_norm``, ... the keys of
  :data:`normkit.robust.ROUTES`) in the forward of any other module -- the modules ``recognize`` proves to make
  them (timm's ``LayerNorm2d``, ``BatchNormAct2d``), the ones ``convert`` hardened (their calls routed to
  normkit), and every module :func:`normkit.robust.record_norm_calls` sees make one during the first watched
  forward (the root model's own forward, a block with an inline ``F.layer_norm``): each call is measured by a
  ``record_norm_calls`` recorder that is active only while those modules run;
* every other norm-like module is left, with ``recognize``'s reason (:attr:`Watch.left`, and in
  :meth:`Watch.report`).

Each hook only notes its input; when the forward of ``model`` ends, the inputs noted are measured together --
those of one kind, shape and dtype stacked, so a model's LayerNorms cost the same few kernels as one
(:func:`deviations`; larger inputs one by one, :func:`extremes`) -- and read back once (one host sync per step), when a warning
(:class:`HeadroomWarning`) is issued the first time a layer comes within ``threshold`` powers of two of
overflow. The inputs are held until then: in training autograd holds them anyway (the norms save their
input); an input changed in place before the forward ends (possible only where autograd does not save it)
is not measured and is counted in :attr:`LayerRecord.stale`.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .convert import _TORCH_OF, TWINS, _own_methods
from .nn.batchnorm import _FrozenBatchNorm
from .recognize import norm_like, recognize
from .robust import Hardened, NormCall, NormCallRecorder, record_norm_calls


class HeadroomWarning(UserWarning):
    """A norm layer came within the watch's threshold of overflow (issued once per layer)."""


def reduction(x: torch.Tensor, kind: str, dims=None, groups: int | None = None):
    """``(x, kind, dims)`` with ``"group"``, ``"instance"`` and ``"batch"`` written as what they centre over:
    ``"center"`` over explicit dims (``x`` reshaped to ``(N, groups, -1)`` for a group norm); ``"rms"``,
    ``"center"`` and ``"given"`` unchanged. The one place a norm's kind becomes its reduction dims."""
    if kind == "group":
        return x.reshape(x.shape[0], groups, -1), "center", (2,)
    if kind == "instance":
        return x, "center", tuple(range(2, x.dim()))
    if kind == "batch":
        return x, "center", tuple(d for d in range(x.dim()) if d != 1)
    return x, kind, dims


def _terms(xs: list[torch.Tensor], kind: str, dims, groups, mean, acc) -> torch.Tensor:
    """What a textbook norm squares (``x - mean`` per reduction group, ``x`` for ``"rms"``) or subtracts
    (``"given"``), for inputs of one shape stacked along a new first dim (no copy for one input)."""
    k = len(xs)
    t = torch.stack(xs) if k > 1 else xs[0].unsqueeze(0)  # (k, *shape)
    if kind == "group":  # the inputs as one larger batch: each group lies inside one input
        y, kind, dims = reduction(t.flatten(0, 1), kind, dims, groups)
    else:  # the dims of one input, shifted past the stack's
        y, (_, kind, dims) = t, reduction(xs[0], kind, dims, groups)
        dims = tuple(d + 1 if d >= 0 else d for d in dims) if dims is not None else None
    if kind == "rms":
        return y
    if kind == "given":  # x - mean per channel: dim 1 of each input
        return y - mean.detach().to(device=y.device, dtype=acc).reshape([1, 1, -1] + [1] * (y.dim() - 3))
    dims = tuple(d if d >= 0 else d + y.dim() for d in dims) if dims else tuple(range(1, y.dim()))
    n = math.prod(y.shape[d] for d in dims)
    # x - sum/n in one kernel (cheaper than mean, then subtract), in the accumulation dtype
    return torch.sub(y, y.sum(dims, keepdim=True, dtype=acc), alpha=1.0 / n)


class _NoGrad:
    """Grad mode off, switched as a function: a tenth of what the ``no_grad()`` context costs inside a hook."""

    def __enter__(self):
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)


def extremes(x: torch.Tensor, kind: str, dims=None, *, groups: int | None = None,
             mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of what a textbook norm squares (or, for ``kind="given"``, subtracts): ``x - mean``
    per reduction group, or ``x`` itself for ``kind="rms"``; 0-D tensors in float32 (float64 for float64
    input), no autograd graph. One kernel for ``"rms"`` (aminmax, no temporary), three for the others (a sum,
    the subtraction of ``sum / n`` in one kernel, aminmax).

    ``kind``: ``"center"`` over the groups of ``dims``; ``"rms"``; ``"group"`` centred over
    ``(N, groups, -1)``; ``"instance"`` centred over dims 2..; ``"batch"`` centred over every dim but 1;
    ``"given"`` ``x - mean`` with ``mean`` per channel (dim 1).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        zero = torch.zeros((), dtype=acc, device=x.device)
        return zero, zero
    with _NoGrad():
        lo, hi = torch.aminmax(_terms([x], kind, dims, groups, mean, acc))
    return (lo, hi) if lo.dtype == acc else (lo.to(acc), hi.to(acc))


def deviations(xs: list[torch.Tensor], kind: str, dims=None, *, groups: int | None = None,
               mean: torch.Tensor | None = None) -> torch.Tensor:
    """``max |d|`` of :func:`extremes`' values for each of several inputs of one shape, dtype and device, as
    a 1-D tensor: the inputs stacked, so the kernels are the same few whatever their number (a stack,
    :func:`extremes`' sum and subtraction, ``abs``, ``amax`` per input -- ``aminmax`` along a dim is five times
    slower on CPU). Worth it for small inputs, where each kernel costs its call more than its work."""
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    if xs[0].numel() == 0:
        return torch.zeros(len(xs), dtype=acc, device=xs[0].device)
    with _NoGrad():
        d = _terms(xs, kind, dims, groups, mean, acc).reshape(len(xs), -1).abs().amax(1)
    return d if d.dtype == acc else d.to(acc)


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
STACKED = 1 << 14  # elements per input up to which same-shaped inputs are measured stacked (deviations)
# (from 3 centred inputs or 5 RMS ones: below that, one by one takes fewer calls)
_NORM_CLASSES = (*TWINS, *_TORCH_OF, _FrozenBatchNorm)  # torch's norm classes and normkit's


def _top(dtype: torch.dtype) -> tuple[float, str]:
    _TOP[dtype] = (torch.finfo(dtype).max, str(dtype).replace("torch.", ""))
    return _TOP[dtype]


# ------------------------------------------------------------------------------------------ what a call is
def _trailing(shape) -> tuple[int, ...]:
    n = 1 if isinstance(shape, int) else len(shape)
    return tuple(range(-n, 0))


def _batch_spec(running_mean, training):
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
        (input, *_batch_spec(running_mean, training)),
    torch.batch_norm: lambda input, weight, bias, running_mean, running_var, training, *a, **k:
        (input, *_batch_spec(running_mean, training)),
    F.instance_norm: lambda input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, *a, **k:
        (input, "instance", None, None, None) if use_input_stats else (input, "given", None, None, running_mean),
    torch.instance_norm: lambda input, weight, bias, running_mean, running_var, use_input_stats, *a, **k:
        (input, "instance", None, None, None) if use_input_stats else (input, "given", None, None, running_mean),
    F.local_response_norm: lambda input, *a, **k: (input, "rms", None, None, None),
}


def module_spec(m: nn.Module, cls: type | None = None, attrs: dict | None = None) -> Callable[[], tuple] | None:
    """A function giving ``(kind, dims, groups, mean)`` of module ``m``'s current call -- computed as an
    instance of ``cls`` with the attributes ``attrs`` where given (a hand-written norm that
    :func:`normkit.recognize.recognize` proves to compute as that normkit class), else as its own class; None
    when that is no norm class. Constant for layer, RMS, group norm and LRN; batch and instance norm depend on
    the module's mode at the call."""
    cls, attrs = cls or type(m), attrs or {}

    def get(name, default=None):
        return attrs[name] if name in attrs else getattr(m, name, default)

    if issubclass(cls, nn.LayerNorm):
        spec = ("center", (1,) if get("channels_first", False) else _trailing(get("normalized_shape")), None, None)
    elif issubclass(cls, (nn.RMSNorm, nn.LocalResponseNorm)):
        spec = ("rms", None, None, None)
    elif issubclass(cls, nn.GroupNorm):
        spec = ("group", None, get("num_groups"), None)
    elif issubclass(cls, nn.modules.instancenorm._InstanceNorm):
        return lambda: (("instance", None, None, None) if m.training or not m.track_running_stats
                        else ("given", None, None, m.running_mean))
    elif issubclass(cls, nn.modules.batchnorm._NormBase):
        return lambda: _batch_spec(m.running_mean, m.training or m.running_mean is None)
    elif issubclass(cls, _FrozenBatchNorm):
        return lambda: ("given", None, None, m.running_mean)
    else:
        return None
    return lambda: spec


# ------------------------------------------------------------------------------------------ records
@dataclass(eq=False)
class LayerRecord:
    """What the watch saw of one norm layer: ``how`` it is watched, the ``dtype`` judged against, the
    latest and lowest headroom (powers of two; the minimum over the calls in a step), the largest
    intermediate seen, the per-step history (the last ``maxlen`` steps), and the calls not measured because
    their input was changed in place before the forward ended (``stale``)."""

    name: str
    what: str
    how: str
    dtype: str = ""
    calls: int = 0
    last: float = math.inf
    lowest: float = math.inf
    largest: float = 0.0
    warned: bool = False
    stale: int = 0  # calls whose input was changed in place before the step's measurement (not measured)
    kinds: set = field(default_factory=set)  # "given" once BatchNorm ran on running statistics
    history: deque = field(default_factory=lambda: deque(maxlen=1000))


class Watch:
    """Returned by :func:`watch`. ``records``: name -> :class:`LayerRecord` of every watched layer; ``left``:
    name -> why a norm-like module is not watched; ``report()``: a text table; ``remove()`` (or leaving a
    ``with`` block) takes every hook off."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, threshold: float = 2.0, history: int = 1000,
                 every: int = 8):
        if not isinstance(model, nn.Module):
            raise TypeError(f"normkit.watch expects a torch.nn.Module, got {type(model).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"normkit.watch: dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"normkit.watch: every={every!r} must be a positive integer (measure one step in every)")
        self.model, self.dtype, self.threshold, self._maxlen, self.every = model, dtype, float(threshold), history, every
        self.records: dict[str, LayerRecord] = {}
        self.left: dict[str, str] = {}
        self._pending: list = []  # (record, input, (kind, dims, groups, mean), input's version) of this step
        self._handles: list = []
        self._modules = dict(model.named_modules())
        self._hooked: set[str] = set()   # measured by a module hook
        self._hosts: set[str] = set()    # measured through their functional norm calls
        self._running: list[str] = []    # hosts (and hooked norms inside them) whose forward is running, innermost last
        self._discovery: NormCallRecorder | None = None  # the first forward's recorder
        self._spy = record_norm_calls(on_call=self._host_call, track_modules=False)  # active while a host runs
        self._spying, self._on, self._steps = False, True, 0
        for name, m in self._modules.items():
            self._classify(name, m)
        self._start = model.register_forward_pre_hook(self._step_start)  # the first forward only
        self._handles += [self._start, model.register_forward_hook(self._step_end, always_call=True)]

    # ------------------------------------------------------------------ what each module is
    def _classify(self, name: str, m: nn.Module) -> None:
        # as normkit.convert decides: a class that computes as torch's or normkit's norm class (overriding none
        # of its compute methods: not timm's LayerNorm2d, whose forward permutes) is that norm
        base, own = _own_methods(m, _NORM_CLASSES)
        if base is not None and not own:
            self._hook(name, m, module_spec(m, base), type(m).__name__, "module hook")
        elif isinstance(m, Hardened):
            self._hosts.add(name)
        elif norm_like(m):
            found = recognize(m)
            if found.action == "twin":
                self._hook(name, m, module_spec(m, found.twin.cls, dict(found.twin.attrs)), type(m).__name__,
                           f"proven {found.twin.label.removeprefix('normkit.nn.')} (hand-written)")
            elif found.action == "harden":
                self._hosts.add(name)
            else:
                self.left[name or type(m).__name__] = f"{type(m).__name__}: {found.reason}"

    def _hook(self, name: str, m: nn.Module, spec: Callable, what: str, how: str) -> None:
        record = self._record(name, what, how)
        self._hooked.add(name)
        note = self._pending.append

        def hook(module, args):  # the hot path: note the input (flush measures it)
            if self._on and args:
                x = args[0]
                note((record, x, spec(), getattr(x, "_version", 0)))

        self._handles.append(m.register_forward_pre_hook(hook))

    def _record(self, name, what, how) -> LayerRecord:
        if name not in self.records:
            self.records[name] = LayerRecord(name or type(self.model).__name__, what, how, history=deque(maxlen=self._maxlen))
        return self.records[name]

    def _measure(self, record, x, kind, dims, groups, mean):
        # only noted here: the step's inputs are measured together when the forward ends (flush)
        self._pending.append((record, x, (kind, dims, groups, mean), getattr(x, "_version", 0)))

    def _measure_call(self, name: str, call: NormCall, how: str) -> None:
        """A torch functional norm call made by module ``name`` (not by a norm module hooked for it)."""
        if name in self._hooked:
            return  # a hooked norm module's own functional call: its hook measured it
        m = self._modules[name]
        if isinstance(m, Hardened):
            how += " (hardened by normkit.convert)"
        record = self._record(name, f"{type(m).__name__} -> {call.function}", how)
        self._measure(record, *FUNCTIONAL[call.torch_function](*call.args, **call.kwargs))

    # ------------------------------------------------------------------ the first forward: what calls norms
    def _discovered(self, call: NormCall) -> None:
        # the recorder is entered inside the model's call, which it does not see start: a call made by no
        # submodule is the model's own forward's
        name = call.module or ""
        if name not in self._hooked:
            self._hosts.add(name)
        self._measure_call(name, call, "functional call in its forward")

    def _finish_discovery(self) -> None:
        """Push/pop hooks on every host, and on the hooked norms inside a host (their own calls are theirs)."""
        hosted = set()
        for host in sorted(self._hosts):
            for sub, m in self._modules[host].named_modules(prefix=host):
                if (sub == host or sub in self._hooked) and sub not in hosted:
                    hosted.add(sub)
                    self._handles += [m.register_forward_pre_hook(lambda module, args, sub=sub: self._push(sub)),
                                      m.register_forward_hook(lambda module, args, out: self._pop(), always_call=True)]

    # ------------------------------------------------------------------ every later forward
    def _host_call(self, call: NormCall) -> None:
        if self._running:
            self._measure_call(self._running[-1], call, "functional call in its forward")

    def _push(self, name: str) -> None:
        if not self._on:
            return
        self._running.append(name)
        if not self._spying:
            self._spy.__enter__()
            self._spying = True

    def _pop(self) -> None:
        if self._running:
            self._running.pop()
            if not self._running:
                self._stop_spying()

    def _stop_spying(self) -> None:
        self._running.clear()
        if self._spying:
            self._spying = False
            self._spy.__exit__(None, None, None)

    def _step_start(self, module, args) -> None:
        if self._steps == 0 and self._discovery is None:
            self._discovery = record_norm_calls(self.model, on_call=self._discovered)
            self._discovery.__enter__()

    def _step_end(self, module, args, output) -> None:
        if self._discovery is not None:
            self._discovery.__exit__(None, None, None)
            self._discovery = None
            self._start.remove()
            self._finish_discovery()
        if self._spying or self._running:
            self._stop_spying()
        if self._pending:
            self.flush()
        self._steps += 1
        self._on = self._steps % self.every == 0

    # ------------------------------------------------------------------ results
    def flush(self) -> None:
        """Measure this step's norm inputs and read the values (one host sync) into :attr:`records`; warn where
        a layer came within ``threshold`` powers of two of overflow for the first time. Called after every
        forward of the model. Inputs of one kind, shape and dtype are measured together
        (:func:`deviations`; larger inputs one by one, :func:`extremes`); an input changed in place since its norm read it cannot be measured any more
        and is counted in the layer's ``stale`` (autograd forbids that for inputs it saves, as in training)."""
        if not self._pending:
            return
        pending = self._pending[:]
        self._pending.clear()  # the same list: the hooks hold its append
        batches: dict[tuple, list] = {}
        for rec, x, spec, version in pending:
            if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
                continue
            if getattr(x, "_version", 0) != version:
                rec.stale += 1
                continue
            kind, dims, groups, mean = spec
            key = (kind, dims, groups, id(mean), x.shape, x.dtype, x.device)
            batches.setdefault(key, []).append((rec, x, spec))
        if not batches:
            return
        parts, pairs, order, paired = [], [], [], []
        for items in batches.values():
            kind, dims, groups, mean = items[0][2]
            if len(items) >= (5 if kind == "rms" else 3) and items[0][1].numel() <= STACKED:
                # stacked: 4 calls for RMS inputs (stack, reshape, abs, amax), 6 for centred ones; one by one: 1
                # (aminmax) and 3 (sum, subtraction, aminmax) per input
                parts.append(deviations([x for _, x, _ in items], kind, dims, groups=groups, mean=mean))
                order += [(rec, kind, x.dtype) for rec, x, _ in items]
            else:  # one input, or inputs large enough that a stack's copy costs more than the calls it saves
                for rec, x, _ in items:
                    pairs += extremes(x, kind, dims, groups=groups, mean=mean)
                    paired.append((rec, kind, x.dtype))
        if pairs:
            parts.append(torch.stack(pairs) if len({(p.dtype, p.device) for p in pairs}) == 1 else
                         torch.stack([p.to(device=pairs[0].device, dtype=torch.float64) for p in pairs]))
        if len({(p.dtype, p.device) for p in parts}) > 1:
            parts = [p.to(device=parts[0].device, dtype=torch.float64) for p in parts]
        flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()  # one host sync
        values = flat[:len(order)] + [max(hi, -lo) for lo, hi in zip(flat[len(order)::2], flat[len(order) + 1::2])]
        order += paired
        step: dict[LayerRecord, float] = {}  # each layer's lowest headroom in this step
        for (rec, kind, dtype), dev in zip(order, values):
            top, rec.dtype = _TOP.get(self.dtype or dtype) or _top(self.dtype or dtype)
            big = largest_intermediate(dev, kind)
            rec.calls += 1
            if big > rec.largest:
                rec.largest = big
            if kind == "given":
                rec.kinds.add(kind)
            h = headroom(big, top)
            if h < step.get(rec, math.inf):
                step[rec] = h
        for rec, h in step.items():
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
        """One line per watched layer: name, class, dtype, calls, latest and lowest headroom, how it is watched;
        then the norm-like modules left unwatched, with the reason."""
        head = f"{'layer':<28} {'norm':<26} {'dtype':<8} {'calls':>6} {'headroom':>9} {'lowest':>8}  watched by"
        lines = [head, "-" * len(head)]
        for r in self.records.values():
            stale = f" ({r.stale} call(s) not measured: input changed in place first)" if r.stale else ""
            lines.append(f"{r.name[:28]:<28} {r.what[:26]:<26} {r.dtype:<8} {r.calls:>6} {r.last:>9.1f} {r.lowest:>8.1f}  "
                         f"{r.how}{stale}")
        lines += [f"not watched: {name} ({why})" for name, why in self.left.items()]
        return "\n".join(lines)

    def remove(self) -> None:
        """Take every hook off the model (the records stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._discovery is not None:  # removed during the first forward
            self._discovery.__exit__(None, None, None)
            self._discovery = None
        self._stop_spying()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def watch(model: nn.Module, *, dtype: torch.dtype | None = None, threshold: float = 2.0, history: int = 1000,
          every: int = 8) -> Watch:
    """Watch every norm layer of ``model`` during its forward calls (see the module docstring).

    ``dtype``: judge every layer against this dtype's largest value (e.g. ``torch.float16`` for a model
    trained in float32 and deployed in float16); default: each call's input dtype. ``threshold``: warn once a
    layer's headroom falls below this many powers of two (default 2). ``history``: steps kept per layer.
    ``every``: measure one forward in ``every``, the first included (the hooks of the others return at once).
    The default, 8, keeps the watch within 3% of a 1.6 ms train step of the zoo's transformer block (about
    2%; every step measured costs 7-12% there: a handful of torch calls at about 10 us each in a hook);
    ``every=1`` measures each forward.
    Returns a :class:`Watch`; use it as a context manager or call ``remove()`` when done.
    """
    return Watch(model, dtype, threshold, history, every)
