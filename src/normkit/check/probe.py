"""The model probe: where in a model does a normalization (or any layer) break, at which dtype and input
scale, and does normkit's version hold there.

**The input.** For each input scale ``s`` the model gets ``s * x`` (``x`` a fixed standard-normal draw). A
model that takes token ids -- its input embedding found by :func:`input_embedding`: Hugging Face's
``get_input_embeddings()``, or a first module that is an ``nn.Embedding`` -- gets fixed token ids instead, and
the scale applies where it means something: the embedding's output is multiplied by ``s / RMS(its weight)``,
so its root mean square is about ``s``, as that of ``s * x`` is (:class:`_Input`).

**The float64 run.** For each input scale the float64 copy of the model runs on that input under
:func:`normkit.reference.keep_float64`, so the model's own downcasts (``.to(torch.float32)``, ``.float()``,
``dtype=`` arguments) stay float64: the reference is float64 all the way through. Whatever still computes in a lower dtype is recorded (:attr:`ModelResult.lowered`) and the
report says the reference is not trusted there.

**The layers** it records, in execution order:

* every executed *leaf* call -- a module none of whose submodules ran during its call -- with its input and
  output;
* every torch functional normalization call (``F.batch_norm``, ``torch.layer_norm``, ... the keys of
  :data:`normkit.robust.ROUTES`, seen by :func:`normkit.robust.record_norm_calls`) made by a module that is
  *not* a leaf, or by the model's own forward: timm's ``BatchNormAct2d`` normalizes in its own forward and
  then runs its ``act``/``drop`` children; such a call is a layer of its own, named by the module that made
  it (``bn1 (BatchNormAct2d, batch_norm call)``). A norm call inside a leaf is judged with the leaf.

**Judging, in isolation** (the verdict), per dtype: each layer gets the float64 run's input to it, rounded
to the dtype, and is compared with the same computation in float64 (under ``keep_float64``) on that same
rounded input -- for a module, the float64 copy of the dtype-rounded module; for a functional call, the
function on the rounded arguments made float64. Errors from upstream layers and from rounding the input
cannot leak in, so the layer that breaks is the one named. A layer whose float64 input or output lies
outside the dtype's range is marked ``range``: no layer can be right there, and no normalization fixes it.

**normkit's version** of each normalization (``normkit_by``):

* ``"convert"``: :func:`normkit.convert` swapped the layer for normkit's own (the twin's layer is judged);
* ``"robust"``: ``convert`` leaves it -- a subclass with its own forward (timm's ``LayerNorm``,
  ``BatchNormAct2d``), or a functional call in some module's forward -- and what serves it is
  :func:`normkit.robust`, which routes the torch function it calls to normkit's (judged: the module under
  ``normkit.robust()``, or the routed function on the same arguments);
* ``"none"``: a norm-typed module that calls no torch norm function: normkit has no version of it, and its
  normkit result is torch's.

Anything ``convert`` changes counts as a normalization, so a converter that learns a hand-written norm (Hugging
Face's ``LlamaRMSNorm``) makes the probe judge it with no change here; :func:`_normkit_version` is the one
place that decides how normkit serves a layer.

**The whole model** also runs in each dtype, as torch's model and as normkit's (``convert``, under
``normkit.robust()`` when ``convert`` left a norm computation), each layer's output compared with the float64
run's (``*_propagated``: errors accumulate), and the final output too. An output is *wrong* when it is
non-finite, raises, or is off by more than the dtype's tolerance and by more than :data:`WRONG_FACTOR` times
the same model's own error at input scale 1 (its rounding through every layer, which the tolerance of one
layer does not cover). A wrong output that no failing layer explains is reported as such -- never
"no layer fails" over a wrong output.

The score is ``max|out - ref| / max|ref|`` against the per-dtype tolerance of
:data:`normkit.check.cases.TOLERANCE`. ``mode="train"`` (default) runs the norm layers on batch statistics,
as in training (dropout off); ``mode="eval"`` uses running statistics.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .. import convert
from ..reference import float64_call, keep_float64
from ..robust import ROUTES, NormCall, NormCallRecorder, record_norm_calls, robust
from .cases import TOLERANCE, dtype_name
from .errors import absmax, num, num_err, relative_error

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
FAILED = ("fail", "non-finite", "raised")
WRONG_FACTOR = 10.0  # a model output this many times further off than at input scale 1 is wrong, not rounding
HARDEN_HINT = "run the model under normkit.robust()"


class ProbeInputError(ValueError):
    """The float64 model itself rejected the input (a wrong ``--input-shape``): a usage error."""


class ProbeInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`probe`; ``partial`` is the :class:`ModelResult` of every (dtype, scale) finished
    before it."""

    def __init__(self, partial: ModelResult):
        super().__init__()
        self.partial = partial


@dataclass
class LayerCase:
    """One layer call at one (dtype, scale), both variants. Status: ok, fail, non-finite, raised, range.

    ``call`` names the torch norm function of a functional layer (None: a module call); ``normkit_by`` is how
    normkit serves a normalization (``convert``, ``robust``, ``none``; None: not a normalization, the twin runs
    it unchanged); ``reference_lowered`` lists what the float64 reference of this layer computed in a lower dtype."""

    layer: str
    kind: str
    index: int
    is_norm: bool
    dtype: str
    scale: float
    torch_status: str
    torch_error: float | None
    normkit_status: str
    normkit_error: float | None
    torch_propagated: float | None = None
    normkit_propagated: float | None = None
    message: str = ""
    call: str | None = None
    normkit_by: str | None = None
    reference_lowered: list[str] = field(default_factory=list)


def where(layer: str, kind: str, call: str | None) -> str:
    """``bn1 (BatchNorm2d)``, ``bn1 (BatchNormAct2d, batch_norm call)``."""
    return f"{layer or '<model>'} ({kind}{f', {call} call' if call else ''})"


@dataclass
class Finding:
    """The first failing layer of one model variant at one dtype, and how normkit fares at that layer."""

    layer: str
    kind: str
    dtype: str
    status: str
    scale: float
    normkit_status: str
    normkit_worst: float | None
    call: str | None = None
    normkit_by: str | None = None
    left_because: str = ""  # why normkit.convert left this layer (convert's own words), when it did

    def sentence(self) -> str:
        what = {"non-finite": "non-finite", "fail": "out of tolerance", "raised": "raises"}[self.status]
        nk = (f"max rel err {num_err(self.normkit_worst)}" if self.normkit_worst is not None and
              math.isfinite(self.normkit_worst) else self.normkit_status)
        if self.normkit_status in FAILED:
            nk = f"also {self.normkit_status}"
        if self.normkit_by == "convert":
            nk = f"normkit twin: {nk}"
        elif self.normkit_by == "robust":
            nk = f"not converted by normkit.convert; under normkit.robust(): {nk}"
        elif self.normkit_by == "none":
            nk = "not hardened: normkit has no version of it (it calls no torch norm function)"
        else:
            nk = "not a normalization: normkit's model runs it unchanged"
        return f"{where(self.layer, self.kind, self.call)}: {self.dtype}, {what} from input scale {num(self.scale)} ({nk})"


@dataclass
class ModelResult:
    model: str
    input_shape: tuple[int, ...]
    mode: str
    dtypes: list[str]
    scales: list[float]
    layers: list[str]
    cases: list[LayerCase] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)  # per (dtype, scale): final output errors of both variants
    lowered: list[str] = field(default_factory=list)   # what the float64 reference computed in a lower dtype
    left: dict[str, str] = field(default_factory=dict)  # norm modules normkit.convert left: name -> its reason
    complete: bool = True                              # False: interrupted (the finished (dtype, scale) pairs only)
    embedding: str | None = None                       # token-id input: the input embedding the scale applies to
    vocab: int | None = None                           # token-id input: ids drawn from range(vocab)

    def header(self) -> str:
        """``resnet18 (2, 3, 48, 48), train mode, input scales 1, 1e4, 1e20`` -- for token ids, where the
        scale applies: ``llama.py:make (2, 7) token ids < 100, ..., input scales 1, 1e20 (the RMS of
        embed_tokens' output)``."""
        scales = ", ".join(num(s) for s in self.scales)
        if self.embedding is None:
            return f"{self.model} {tuple(self.input_shape)}, {self.mode} mode, input scales {scales}"
        return (f"{self.model} {tuple(self.input_shape)} token ids < {self.vocab}, {self.mode} mode, input scales "
                f"{scales} (the root mean square of the output of {self.embedding})")

    def first_failure(self, dtype: str, variant: str = "torch") -> Finding | None:
        """At the smallest scale where any layer of ``variant`` fails, the first such layer in execution order."""
        st = f"{variant}_status"
        bad = [c for c in self.cases if c.dtype == dtype and getattr(c, st) in FAILED]
        if not bad:
            return None
        first = min(bad, key=lambda c: (c.scale, c.index))
        same = [c for c in self.cases if c.dtype == dtype and c.index == first.index]
        nk_errors = [c.normkit_error for c in same if c.normkit_error is not None]
        nk_bad = [c.normkit_status for c in same if c.normkit_status in FAILED]
        return Finding(first.layer, first.kind, dtype, getattr(first, st), first.scale,
                       nk_bad[0] if nk_bad else "ok", max(nk_errors) if nk_errors else None,
                       first.call, first.normkit_by, self.left.get(first.layer, "") if first.normkit_by == "robust" else "")

    def first_out_of_range(self, dtype: str) -> LayerCase | None:
        rng = [c for c in self.cases if c.dtype == dtype and c.torch_status == "range"]
        return min(rng, key=lambda c: (c.scale, c.index)) if rng else None

    def _out_of_range(self, dtype: str, scale: float) -> bool:
        return any(c.dtype == dtype and c.scale == scale and c.torch_status == "range" for c in self.cases)

    def unexplained(self, dtype: str, variant: str = "torch") -> dict | None:
        """The first (smallest-scale) output of ``variant`` that is wrong while no layer of that variant fails
        and none leaves the dtype's range at that scale: something the probe does not judge broke."""
        st = f"{variant}_status"
        for o in sorted((o for o in self.outputs if o["dtype"] == dtype), key=lambda o: o["scale"]):
            if o[variant]["wrong"] and not self._out_of_range(dtype, o["scale"]) and not any(
                    c.dtype == dtype and c.scale == o["scale"] and getattr(c, st) in FAILED for c in self.cases):
                return o
        return None

    def robust_layers(self) -> list[LayerCase]:
        """One case per normalization that normkit.convert leaves and normkit.robust() serves."""
        return list({c.index: c for c in self.cases if c.normkit_by == "robust"}.values())

    @property
    def normkit_ok(self) -> bool:
        """Every normalization as normkit serves it within tolerance wherever its dtype can hold the answer."""
        return not any(c.is_norm and c.normkit_status in FAILED for c in self.cases)

    @property
    def normkit_output_ok(self) -> bool:
        """normkit's model never gives a wrong output that the dtype's range does not explain."""
        return not any(o["normkit"]["wrong"] and not self._out_of_range(o["dtype"], o["scale"]) for o in self.outputs)

    @property
    def ok(self) -> bool:
        """The verdict: normkit's norm layers and normkit's model output pass, every wrong torch output is
        explained by a named layer, and the float64 reference was float64 throughout."""
        return (self.normkit_ok and self.normkit_output_ok and not self.lowered and
                not any(self.unexplained(d, "torch") for d in self.dtypes))


# ---------------------------------------------------------------------------------------- recording
@dataclass
class _Frame:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    has_children: bool = False
    norm_calls: int = 0


@dataclass
class _Call:
    """One layer of a recorded run: a leaf module call, or (``function`` set) a torch functional norm call
    made by a non-leaf module (``module``, called ``name``)."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: object = None
    function: Callable | None = None
    norm_calls: int = 0  # for a leaf: how many torch norm function calls it made
    owner: _Frame | None = None

    @property
    def call(self) -> str | None:
        return self.function.__name__ if self.function is not None else None


def _clone(obj):
    """Detached copies of every tensor in ``obj`` (inplace layers such as ReLU(inplace=True) overwrite them)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _cast(obj, dtype):
    """A copy of ``obj`` with every floating tensor in ``dtype`` (always a new tensor: batch norm writes its
    running statistics in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype, copy=True) if obj.is_floating_point() else obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Recorder:
    """Forward hooks on every submodule and a norm-call tap: the executed layers in order (see the module
    docstring), with inputs and outputs; on an exception, the module that raised."""

    def __init__(self, model: nn.Module, keep_inputs: bool = True):
        self.model = model
        self.modules = dict(model.named_modules())
        self.calls: list[_Call] = []
        self.stack: list[_Frame] = []
        self.keep_inputs = keep_inputs
        self.handles = []
        for name, m in model.named_modules():
            if name:
                self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post(), with_kwargs=True))

    def keep(self, obj):
        """A copy of ``obj`` when inputs are kept, else an empty one of its type."""
        return _clone(obj) if self.keep_inputs else type(obj)()

    def _pre(self, name):
        def hook(module, args, kwargs):
            if self.stack:
                self.stack[-1].has_children = True
            self.stack.append(_Frame(name, module, self.keep(args), self.keep(kwargs)))
        return hook

    def _post(self):
        def hook(module, args, kwargs, output):
            frame = self.stack.pop()
            if not frame.has_children:  # a leaf: the norm calls it made are judged with it
                while self.calls and self.calls[-1].owner is frame:
                    self.calls.pop()
                self.calls.append(_Call(frame.name, frame.module, frame.args, frame.kwargs, _clone(output),
                                        norm_calls=frame.norm_calls))
        return hook

    def norm_call(self, nc: NormCall) -> None:
        """A torch functional norm call (:func:`normkit.robust.record_norm_calls`: its arguments kept before it
        ran, batch norm updating the running statistics it is given), made inside the innermost frame."""
        owner = self.stack[-1] if self.stack else None
        if owner is not None:
            owner.norm_calls += 1
        name = nc.module or ""
        self.calls.append(_Call(name, self.modules.get(name, self.model), nc.args, nc.kwargs, _clone(nc.output),
                                function=nc.torch_function, owner=owner))

    def norm_calls(self) -> NormCallRecorder:
        """The mode that hands every torch functional norm call to :meth:`norm_call`, its arguments copied at once
        (an inplace activation after a norm would overwrite them)."""
        return record_norm_calls(self.model, keep=self.keep, on_call=self.norm_call)

    def raising_layer(self) -> str | None:
        return self.stack[-1].name if self.stack else None

    def close(self):
        for h in self.handles:
            h.remove()


@dataclass
class _Run:
    calls: list[_Call]
    output: object
    error: BaseException | None
    raised_in: str | None
    lowered: list[str]


def _record(model: nn.Module, x: torch.Tensor, *, keep_inputs=True, reference=False, hardened=False) -> _Run:
    """Run ``model(x)`` recording its layers; ``reference``: as a true float64 computation; ``hardened``:
    under :func:`normkit.robust` (entered outside the tap, so the tap sees torch's calls before they are routed)."""
    rec = _Recorder(model, keep_inputs)
    lowered: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if hardened:
                stack.enter_context(robust())
            mode = stack.enter_context(keep_float64()) if reference else None
            stack.enter_context(rec.norm_calls())
            try:
                out = model(x)
            finally:
                lowered = [str(low) for low in mode.lowered] if mode is not None else []
        return _Run(rec.calls, out, None, None, lowered)
    except Exception as e:  # noqa: BLE001 -- reported, with the layer that raised
        return _Run(rec.calls, None, e, rec.raising_layer(), lowered)
    finally:
        rec.close()


# ---------------------------------------------------------------------------------------- judging
@dataclass
class _Verdict:
    status: str
    error: float | None = None
    message: str = ""
    lowered: list[str] = field(default_factory=list)


def _judge(run: Callable, ref_run: Callable, call: _Call, dtype: torch.dtype) -> _Verdict:
    """``run`` (the computation in ``dtype``) against ``ref_run`` (the same in float64) on the float64 run's
    input to this layer rounded to ``dtype``."""
    top = torch.finfo(dtype).max
    # a functional norm's input is its first argument (the others: parameters, running statistics)
    if call.function is not None:
        inputs = call.args[:1] if call.args else call.kwargs.get("input")
    else:
        inputs = (call.args, call.kwargs)
    if any(absmax(t) > top for t in _tensors(inputs)):
        return _Verdict("range", message="input outside the dtype's range")
    with torch.no_grad():
        ref, lowered = float64_call(ref_run, *_cast(call.args, dtype), **_cast(call.kwargs, dtype))
        ref = _tensors(ref)
        if any(absmax(r) > top for r in ref):
            return _Verdict("range", message="output outside the dtype's range", lowered=[str(x) for x in lowered])
        try:
            out = _tensors(run(*_cast(call.args, dtype), **_cast(call.kwargs, dtype)))
        except Exception as e:  # noqa: BLE001 -- torch refuses some dtypes (half LRN on CPU)
            return _Verdict("raised", None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    err = max((relative_error(o, r) for o, r in zip(out, ref)), default=0.0)
    status = "non-finite" if not math.isfinite(err) else ("ok" if err <= TOLERANCE[dtype] else "fail")
    return _Verdict(status, err, "", [str(x) for x in lowered])


def _under_robust(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with robust():
            return fn(*args, **kwargs)
    return run


def _normkit_version(call: _Call, model_module: nn.Module, twin_module: nn.Module) -> tuple[str | None, Callable | None]:
    """How normkit serves this layer: ``(normkit_by, the computation to judge)``; ``(None, None)`` for a
    layer that is not a normalization (the twin runs it unchanged). The one place that decides it: a converter
    that learns another class of norm (issue 16's hand-written norms) makes ``convert`` change its class,
    and the ``"convert"`` branch judges it."""
    converted = type(twin_module) is not type(model_module)
    if call.function is not None:  # a functional call inside some module's forward
        return ("convert" if converted else "robust"), ROUTES[call.function]
    if converted:
        return "convert", twin_module
    if call.norm_calls:
        return "robust", _under_robust(model_module)
    if isinstance(model_module, NORM_TYPES):
        return "none", None
    return None, None


def _prepare(model: nn.Module, mode: str) -> nn.Module:
    model.eval()
    if mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.train()
    return model


def _propagated(calls: list[_Call], ref_calls: list[_Call]) -> list[float | None]:
    out = [None] * len(ref_calls)
    for i, (c, r) in enumerate(zip(calls, ref_calls)):
        errs = [relative_error(o, t) for o, t in zip(_tensors(c.output), _tensors(r.output))]
        out[i] = max(errs, default=0.0)
    return out


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor with ``model``."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _twin(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """``normkit.convert`` of ``model`` sharing its other layers, and the norm modules it left with the reason
    (collected from its report, not warned about: the probe reports them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        twin, report = convert(_shared_copy(model), inplace=True, return_report=True)
    return twin, {s.name: s.after.removeprefix("left: ") for s in report if not s.changed}


# ---------------------------------------------------------------------------------------- the input
def input_embedding(model: nn.Module) -> str | None:
    """The qualified name of the ``nn.Embedding`` a model's input goes into, when its input is token ids:
    Hugging Face's ``get_input_embeddings()`` where the model defines one, else the model's first leaf module
    (in registration order) when that is an ``nn.Embedding``. None for any other model."""
    names = {id(m): n for n, m in model.named_modules() if n}
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except Exception:  # noqa: BLE001 -- a model that defines it without one (NotImplementedError)
            emb = None
        if isinstance(emb, nn.Embedding) and id(emb) in names:
            return names[id(emb)]
    first = next((n for n, m in model.named_modules() if n and not any(m.children())), None)
    return first if first is not None and isinstance(model.get_submodule(first), nn.Embedding) else None


@dataclass
class _Input:
    """What the probe feeds the model at input scale ``s``: ``s * x`` for a float input (``x`` standard
    normal); for token ids (``embedding`` set) the ids themselves, with the scale applied where it means
    something -- the output of the input embedding is multiplied by ``s / RMS(its weight)`` (computed in
    float64, rounded once to the model's dtype), so its root mean square is about ``s``, as that of ``s * x``
    is (a forward hook on the embedding; nothing else changes, not even a head tied to its weight)."""

    x: torch.Tensor
    embedding: str | None = None
    factor: list = field(default_factory=lambda: [1.0])  # the hook's multiplier now
    rms: float = 1.0

    def at(self, scale: float) -> torch.Tensor:
        """The model's input at ``scale`` (for token ids: the ids; the embedding hook then scales)."""
        if self.embedding is None:
            return scale * self.x
        self.factor[0] = scale / self.rms
        return self.x

    def hook(self, master: nn.Module) -> None:
        """Register the scaling hook on ``master``'s embedding (copies of ``master`` share it: a function
        is copied by reference)."""
        emb = master.get_submodule(self.embedding)
        self.rms = emb.weight.detach().double().pow(2).mean().sqrt().item() or 1.0
        factor = self.factor

        def scale_output(module, args, output):
            return (output.double() * factor[0]).to(output.dtype)

        emb.register_forward_hook(scale_output)


def _token_input(model: nn.Module, tokens: bool | None) -> tuple[str, int] | None:
    """``(embedding name, vocabulary size)`` when the probe feeds ``model`` token ids (``tokens``: None
    detects it by :func:`input_embedding`, True requires it, False never)."""
    name = input_embedding(model) if tokens is not False else None
    if name is None:
        if tokens:
            raise ProbeInputError(f"{type(model).__name__} has no input embedding to scale (an nn.Embedding that is "
                                  f"its first module, or Hugging Face's get_input_embeddings()); feed it float input")
        return None
    return name, model.get_submodule(name).num_embeddings


def draw_input(shape, seed: int, vocab: int | None = None) -> torch.Tensor:
    """The probe's seeded input of ``shape``: standard normal in float64, or token ids in ``range(vocab)``."""
    g = torch.Generator().manual_seed(seed)
    if vocab is not None:
        return torch.randint(0, vocab, tuple(shape), generator=g)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64)


def materialize(model: nn.Module, input_shape, seed: int = 0, tokens: bool | None = None) -> nn.Module:
    """``model`` itself, or -- when it holds lazy modules (``nn.LazyLinear``, ...) whose parameters do not
    exist yet -- a copy on which one forward of zeros of ``input_shape`` (float32, or token ids 0 for a
    token-id model; eval mode, seeded) created them. Raises :class:`ProbeInputError` when that forward rejects
    the shape."""
    if not any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules()):
        return model
    zeros = torch.zeros(tuple(input_shape), dtype=torch.long if _token_input(model, tokens) else torch.float32)
    model = copy.deepcopy(model)
    training = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            model.eval()(zeros)
    except Exception as e:  # noqa: BLE001 -- a shape the model rejects
        raise ProbeInputError(f"input shape {tuple(input_shape)} does not initialize the model's lazy modules: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    for m, t in training.items():
        m.training = t
    return model


def probe(model: nn.Module, input_shape, *, name: str = "model", dtypes=(torch.float32,), scales=(1.0, 1e4, 1e20),
          mode: str = "train", seed: int = 0, progress: Callable[[int], None] | None = None,
          tokens: bool | None = None) -> ModelResult:
    """Probe ``model`` (left untouched: it is copied) at each dtype and input scale; see the module docstring.
    ``tokens``: feed token ids, the scale applied to the input embedding's output (see :class:`_Input`);
    None (default) when :func:`input_embedding` finds one. Raises :class:`ProbeInputError` when the float64
    model rejects the input shape, and :class:`ProbeInterrupted` (a ``KeyboardInterrupt``, with what
    finished) on Ctrl-C."""
    embedding, vocab = _token_input(model, tokens) or (None, None)
    result = ModelResult(name, tuple(input_shape), mode, [dtype_name(d) for d in dtypes], list(scales), [],
                         embedding=embedding, vocab=vocab)
    try:
        _probe(result, model, dtypes, scales, mode, seed, progress)
    except KeyboardInterrupt:
        result.complete = False
        for d in result.dtypes:
            _mark_wrong(result, d, None)
        raise ProbeInterrupted(result) from None
    return result


def _probe(result, model, dtypes, scales, mode, seed, progress):
    tokens = result.embedding is not None
    master = _prepare(copy.deepcopy(materialize(model, result.input_shape, seed, tokens)), mode).double()
    inp = _Input(draw_input(result.input_shape, seed, result.vocab), result.embedding)
    if tokens:
        inp.hook(master)
    f32_exact = all(torch.equal(t, t.float().double()) for t in master.state_dict().values() if t.is_floating_point())
    initial = {n: b.clone() for n, b in master.named_buffers()}
    for dtype in dtypes:
        # float64 values that came from float32 round to any dtype exactly as the float32 ones would
        model_dt = copy.deepcopy(master).to(dtype)
        twin, left = _twin(model_dt)
        result.left.update(left)
        ref_dt = master if dtype == torch.float32 and f32_exact else copy.deepcopy(model_dt).double()
        baseline = None if 1.0 in scales else _baseline(master, model_dt, twin, inp.at(1.0), dtype)
        for scale in scales:
            if scale > torch.finfo(dtype).max:
                continue
            _restore(master, initial)  # every float64 run starts from the same running statistics
            ref = _record(master, inp.at(scale), reference=True)
            if ref.error is not None:
                at = f"layer {ref.raised_in}" if ref.raised_in else f"its own forward ({type(model).__name__})"
                what = f" of token ids < {result.vocab}" if result.vocab else ""
                raise ProbeInputError(f"{result.model} rejects input shape {result.input_shape}{what}: {at} raised "
                                      f"{type(ref.error).__name__}: {str(ref.error).splitlines()[0]}") from ref.error
            _note_lowered(result, ref.lowered)
            if not result.layers:
                result.layers = [c.name for c in ref.calls]
            _probe_one(result, model_dt, twin, ref_dt, dtype, scale, inp.at(scale), ref)
            del ref
            if progress:
                progress(1)
        _mark_wrong(result, dtype_name(dtype), baseline)
        del model_dt, twin, ref_dt


def _restore(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])


def _note_lowered(result: ModelResult, lowered: list[str]) -> None:
    result.lowered += [low for low in lowered if low not in result.lowered]


def _probe_one(result, model, twin, ref_model, dtype, scale, x, ref: _Run):
    """Judge every layer of ``ref`` (the float64 run on ``x``, the model's input at ``scale``) and run both
    variants whole in ``dtype``."""
    mods, twin_mods, ref_mods = dict(model.named_modules()), dict(twin.named_modules()), dict(ref_model.named_modules())
    dn = dtype_name(dtype)
    cases = []
    for i, call in enumerate(ref.calls):
        m, tm = mods[call.name], twin_mods[call.name]
        if call.function is not None:
            run, ref_run = call.function, call.function
        else:
            run, ref_run = m, ref_mods[call.name]
        v = _judge(run, ref_run, call, dtype)
        by, nk_run = _normkit_version(call, m, tm)
        case = LayerCase(call.name, type(m).__name__, i, by is not None, dn, scale, v.status, v.error, v.status,
                         v.error, message=v.message, call=call.call, normkit_by=by, reference_lowered=v.lowered)
        if nk_run is not None:  # normkit's model differs from torch's only here
            nk = _judge(nk_run, ref_run, call, dtype)
            case.normkit_status, case.normkit_error = nk.status, nk.error
            case.message = case.message or nk.message
        _note_lowered(result, v.lowered)
        cases.append(case)
    hardened = any(c.normkit_by == "robust" for c in cases)
    xd = _cast(x, dtype)
    t_run = _record(model, xd, keep_inputs=False)
    n_run = _record(twin, xd, keep_inputs=False, hardened=hardened)
    for c, e in zip(cases, _propagated(t_run.calls, ref.calls)):
        c.torch_propagated = e
    for c, e in zip(cases, _propagated(n_run.calls, ref.calls)):
        c.normkit_propagated = e
    result.cases += cases
    result.outputs.append({"dtype": dn, "scale": scale, "torch": _final(t_run, ref.output, dtype),
                           "normkit": _final(n_run, ref.output, dtype),
                           "normkit_by": "convert + robust" if hardened else "convert"})


def _final(run: _Run, ref_out, dtype) -> dict:
    if run.error is not None:
        return {"status": "raised", "error": None, "layer": run.raised_in, "wrong": True}
    e = max((relative_error(o, r) for o, r in zip(_tensors(run.output), _tensors(ref_out))), default=0.0)
    status = "non-finite" if not math.isfinite(e) else ("ok" if e <= TOLERANCE[dtype] else "fail")
    return {"status": status, "error": e if math.isfinite(e) else None, "layer": None, "wrong": status != "ok"}


def _baseline(master, model_dt, twin, x, dtype) -> dict:
    """Both variants' output errors at input scale 1, when the probe's scales leave it out (normkit's model
    under normkit.robust(), which changes nothing where convert left no norm computation)."""
    with torch.no_grad():
        ref, _ = float64_call(master, x)
        outs = {"torch": _final(_Run([], model_dt(_cast(x, dtype)), None, None, []), ref, dtype)}
        with robust():
            outs["normkit"] = _final(_Run([], twin(_cast(x, dtype)), None, None, []), ref, dtype)
    return outs


def _mark_wrong(result: ModelResult, dtype: str, baseline: dict | None) -> None:
    """Set each output's ``wrong`` flag: non-finite or raised, or beyond the tolerance and more than
    WRONG_FACTOR times the same variant's error at input scale 1."""
    outs = [o for o in result.outputs if o["dtype"] == dtype]
    if baseline is None:
        baseline = next((o for o in outs if o["scale"] == 1.0), {})
    for o in outs:
        for variant in ("torch", "normkit"):
            v, base = o[variant], baseline.get(variant, {}).get("error")
            v["baseline"] = base
            if v["status"] == "fail":
                v["wrong"] = base is None or v["error"] > WRONG_FACTOR * base
