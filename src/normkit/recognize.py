"""Recognizing normalizations by behaviour, for :func:`normkit.convert` and :func:`normkit.fold_batchnorm`.

Models keep their norms in classes of their own (timm's ``LayerNorm2d``, ``BatchNormAct2d``; Hugging Face's
``LlamaRMSNorm``, ``T5LayerNorm``) or write them by hand. A class name proves nothing, so every module that
looks like a norm (:func:`norm_like`) is *probed*, each recognizer shaped as pattern -> check (a reason when
it fails) -> rewrite, and nothing is changed unless the probe proves it:

1. **Its own forward calls torch's functional norms** (``F.layer_norm``, ``torch.batch_norm``, ... the keys
   of :data:`normkit.robust.ROUTES`): a float64 copy runs on probe inputs under
   :func:`normkit.robust.record_norm_calls`; if calls come from the module itself, it is *hardened*
   (:func:`normkit.robust.harden`: the same instance, its own forward still running, the calls routed to
   normkit) once the hardened copy is shown to give the same float64 output (``PROOF_TOL``).
2. **A hand-written norm** (a module without submodules, with an eps attribute -- ``eps``,
   ``variance_epsilon`` or ``epsilon`` -- and a ``weight``, or frozen ``running_mean``/``running_var``):
   a float64 copy with random weights runs, under :func:`normkit.reference.keep_float64` (its own
   ``.to(torch.float32)`` stays float64), in train and eval mode on inputs of several shapes, one of them
   small enough for eps to matter. Its output is compared with the textbook formulas of RMS norm and layer
   norm over the trailing dims or over dim 1 (weight ``w`` or ``1 + w``, bias as the module has it), group
   norm (``num_groups``) and frozen batch norm; the first that matches to ``PROOF_TOL`` everywhere names
   the kind. A **dtype probe** then runs the original on bfloat16/float16/float32 inputs with
   bfloat16/float32 weights and picks the twin's casting mode (:mod:`normkit.nn.normalization`) whose
   output dtype is the original's in every case and whose values equal the original's (or, where the
   original itself is off from the float64 answer, are within ``REL_TOL`` of it). The twin (a normkit
   module, the same instance with its class swapped, see :class:`Twin`) is finally checked against the
   original in float64.

Everything else that looks like a norm is left and gets a reason (:class:`Finding`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import nn as nnk
from .nn.normalization import CASTING_MODES
from .reference import keep_float64
from .robust import harden, record_norm_calls

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
# torch's normalization classes: their subclasses are norm-like whatever their name
TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
               nn.CrossMapLRN2d)
PROOF_TOL = 1e-10  # float64 probes: max|out - ref| <= PROOF_TOL * max|ref|
# the dtype probe: relative to max|float64 answer|, the dtype's rounding plus 2e-3 (float32: 1e-5); parity with
# the original allows one more rounding of the output
REL_TOL = {torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 6e-3}
PARITY_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
PROBE_DTYPES = [(x, w) for x in (torch.bfloat16, torch.float16, torch.float32) for w in (torch.bfloat16, torch.float32)]
_ORIGINAL = "_normkit_original"  # instance attribute: (class, saved attributes, added attributes), for revert


# ------------------------------------------------------------------------------------------- twins
@dataclass(frozen=True)
class Twin:
    """The normkit class a recognized module becomes and the attributes it needs (``attrs``: name -> value;
    the module's parameters and buffers stay where they are, so state-dict keys do not change)."""

    cls: type
    attrs: tuple

    @property
    def label(self) -> str:
        opts = {k: v for k, v in self.attrs if k in ("casting_mode", "offset", "channels_first")}
        shown = [f"{k}={v!r}" for k, v in opts.items() if v != getattr(self.cls, k, None)]
        return f"normkit.nn.{self.cls.__name__}" + (f"({', '.join(shown)})" if shown else "")


def become(module: nn.Module, cls: type, attrs=()) -> None:
    """Make ``module`` an instance of ``cls`` in place, setting ``attrs`` ((name, value) pairs) and
    recording what :func:`restore` needs to give back the class and attributes it had."""
    saved, added = {}, []
    for name, value in attrs:
        if name in module.__dict__:
            saved[name] = module.__dict__[name]
        else:
            added.append(name)
        module.__dict__[name] = value
    module.__dict__[_ORIGINAL] = (type(module), saved, tuple(added))
    module.__class__ = cls


def original_class(module: nn.Module) -> type | None:
    """The class :func:`become` replaced (None if it did not)."""
    record = module.__dict__.get(_ORIGINAL)
    return None if record is None else record[0]


def restore(module: nn.Module) -> type | None:
    """Undo :func:`become`: the original class and attributes (returns that class; None if nothing to undo)."""
    record = module.__dict__.pop(_ORIGINAL, None)
    if record is None:
        return None
    cls, saved, added = record
    for name in added:
        module.__dict__.pop(name, None)
    module.__dict__.update(saved)
    module.__class__ = cls
    return cls


# ----------------------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """What probing one module found: ``action`` is ``"harden"`` (route its own functional norm calls),
    ``"twin"`` (swap for ``twin``) or ``"left"``; ``reason`` says what was proven, or why it is left, and
    ``recipe`` what the user can do about a module left."""

    action: str
    reason: str
    twin: Twin | None = None
    recipe: str = ""
    calls: tuple = ()  # the torch functional norms its own forward calls (action "harden")


_ROBUST_RECIPE = ("if its forward calls torch's functional norms on other inputs, run the model under "
                  "normkit.robust(); otherwise replace it by a normkit.nn module by hand")


def eps_of(module: nn.Module):
    """(attribute name, value) of the module's numeric eps, or (None, None)."""
    for name in EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, float(value)
    return None, None


def _own_tensor(module: nn.Module, name: str) -> Tensor | None:
    t = module._parameters.get(name, module._buffers.get(name))
    return t if isinstance(t, Tensor) and t.is_floating_point() else None


# layers with a weight that are not normalizations, whatever eps they carry (timm's weight-standardized StdConv2d)
NOT_NORMS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention)


def norm_like(module: nn.Module) -> bool:
    """A module that may hold a normalization: a subclass of one of torch's norm classes; or a class named
    ``*norm*`` with parameters, buffers, an eps or a ``normalized_shape`` of its own (OLMo's parameter-free
    LayerNorm); or one with an eps attribute and a weight --
    never a convolution, linear, embedding or attention layer (:data:`NOT_NORMS`)."""
    if isinstance(module, TORCH_NORMS):
        return True
    if isinstance(module, NOT_NORMS):
        return False
    own = any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
    has_eps = eps_of(module)[0] is not None
    if re.search("norm", type(module).__name__, re.IGNORECASE) and (own or has_eps or hasattr(module, "normalized_shape")):
        return True
    return has_eps and (_own_tensor(module, "weight") is not None or _own_tensor(module, "running_mean") is not None)


# ---------------------------------------------------------------------------------------- probe inputs
def _sizes(c: int, n: int) -> list[int]:
    """``n`` spatial sizes that differ from the channel count ``c`` (so no dim can be mistaken for it)."""
    return [s for s in (2, 3, 5, 7) if s != c][:n]


def _channels(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    for name in ("weight", "running_mean"):
        t = _own_tensor(module, name)
        if t is not None and t.dim() == 1:
            return t.numel()
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def _trailing_shape(module: nn.Module) -> tuple | None:
    t = _own_tensor(module, "weight")
    if t is not None:
        return tuple(t.shape)
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    c = _channels(module)
    return None if c is None else (c,)


def probe_shapes(module: nn.Module) -> dict[str, list[tuple]]:
    """Input shapes to probe ``module`` with, by layout: ``trailing`` (the norm's shape last) and
    ``channels`` (``(N, C, *)``, by rank)."""
    shapes = {"trailing": [], "channels": []}
    tail = _trailing_shape(module)
    if tail:
        shapes["trailing"] = [(3, *tail), (2, 3, *tail)]
    c = _channels(module)
    if c:
        h, w = _sizes(c, 2)
        shapes["channels"] = [(2, c, h, w), (3, c, w, h), (2, c, h), (4, c), (2, c, h, 2, w)]
    return shapes


def probe_input(shape: tuple, generator: torch.Generator, eps: float | None = None, channels: bool = False) -> Tensor:
    """A float64 input: unit noise around 0.7 (so centring matters); when ``eps`` is given, the first group
    (row, or sample for ``channels``) is scaled to sqrt(eps), where eps changes the output by about a third."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.7
    if eps:
        index = (0,) if channels or x.dim() < 2 else (0,) * (x.dim() - 1)
        x[index] = x[index] * math.sqrt(eps)
    return x


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


_PROBE_RNG = torch.Generator().manual_seed(0).get_state()


def seeded_call(module: nn.Module, x: Tensor):
    """``module(x)`` with the global random number generator of ``x``'s device in one fixed state (dropout
    draws the same on every run), then back in the state it had."""
    gen = _generator(x.device)
    saved = gen.get_state()
    gen.set_state(_PROBE_RNG if x.device.type == "cpu" else torch.Generator(x.device).manual_seed(0).get_state())
    try:
        return module(x)
    finally:
        gen.set_state(saved)


def rel_error(out, ref) -> float:
    """``max|out - ref| / max|ref|`` in float64 (inf for a shape mismatch or a non-tensor)."""
    if not isinstance(out, Tensor) or not isinstance(ref, Tensor) or out.shape != ref.shape:
        return math.inf
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o[torch.isfinite(r)]).all():
        return math.inf
    scale = r.abs().max().item() if r.numel() else 0.0
    err = (o - r).abs().max().item() if r.numel() else 0.0
    return err / scale if scale else (0.0 if err == 0 else math.inf)


def _float64_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


def _device(module: nn.Module) -> torch.device:
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return torch.device("cpu") if t is None else t.device


def frozen_batchnorm_proof(module: nn.Module) -> str | None:
    """Why ``module`` -- frozen ``running_mean``/``running_var`` applied by its own code, torchvision's
    ``FrozenBatchNorm2d`` -- is not provably frozen batch norm on 4-D input (None when it is): the float64
    probe of :func:`recognize` alone, without the dtype probe (for :func:`normkit.fold_batchnorm`)."""
    eps = getattr(module, "eps", None)
    if not isinstance(eps, (int, float)):
        return f"{type(module).__name__} holds running statistics but no numeric eps"
    generator = torch.Generator().manual_seed(0)
    with single_threaded():
        h, why = _match(module, randomized_copy(module, generator), float(eps), probe_shapes(module), generator)
    return None if h is not None and h.kind == "frozen_bn" else f"{type(module).__name__} is not provably a frozen batch norm: {why}"


# ----------------------------------------------------------------------------- 1: functional norm calls
def _own_calls(module: nn.Module, shapes: list[tuple], generator: torch.Generator):
    """Run a float64 copy under ``record_norm_calls`` on the first two shapes it takes: ``(ran, calls,
    error)`` with the inputs and outputs that ran, the functional norms its own forward called, the last error."""
    probe = _float64_copy(module)
    ran, calls, error = [], [], None
    for shape in shapes:
        if len(ran) == 2:
            break
        x = probe_input(shape, generator).to(_device(module))
        try:
            with torch.no_grad(), keep_float64(), record_norm_calls(probe) as rec:
                out = seeded_call(probe, x)
        except Exception as exc:  # a shape the module does not take: try the next
            error = exc
            continue
        ran.append((x, out))
        calls += [c.function for c in rec.calls if c.module == ""]
    return ran, tuple(dict.fromkeys(calls)), error


def _harden_proof(module: nn.Module, ran: list) -> float:
    """The largest relative float64 difference between ``module`` and its hardened copy on the inputs that ran
    (fresh copies from the same state, the inputs in the same order: running statistics evolve alike)."""
    original, hardened = _float64_copy(module), _float64_copy(module)
    harden(hardened)
    worst = 0.0
    for x, _ in ran:
        with torch.no_grad(), keep_float64():
            worst = max(worst, rel_error(seeded_call(hardened, x), seeded_call(original, x)))
    return worst


# ------------------------------------------------------------------------------- 2: hand-written norms
@dataclass(frozen=True)
class Hypothesis:
    """One normalization the module's output may be: ``kind`` rms / layer / group / frozen_bn, over the
    ``layout`` trailing dims or dim 1 (``channels``), with weight ``offset + w``."""

    kind: str
    layout: str
    offset: float = 0.0

    def describe(self, eps: float) -> str:
        what = {"rms": "RMS norm", "layer": "layer norm", "group": "group norm", "frozen_bn": "frozen batch norm"}[self.kind]
        where = " over dim 1" if self.layout == "channels" and self.kind in ("rms", "layer") else ""
        weight = " with weight (1 + w)" if self.offset else ""
        return f"{what}{where}{weight}, eps={eps:g}"


def _view(t: Tensor | None, x: Tensor, layout: str) -> Tensor | None:
    """A per-feature tensor shaped to broadcast against ``x``: trailing dims, or dim 1."""
    if t is None:
        return None
    t = t.double()
    return t.view(1, -1, *([1] * (x.dim() - 2))) if layout == "channels" else t


def oracle(h: Hypothesis, x: Tensor, module: nn.Module, eps: float) -> Tensor:
    """The textbook float64 formula of hypothesis ``h`` on ``x`` with ``module``'s tensors."""
    w, b = _own_tensor(module, "weight"), _own_tensor(module, "bias")
    if h.kind == "frozen_bn":
        rm, rv = (_view(module._buffers[n], x, "channels") for n in ("running_mean", "running_var"))
        y = (x - rm) / torch.sqrt(rv + eps)
    elif h.kind == "group":
        g = x.reshape(x.shape[0], module.num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(((g - mean) ** 2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    else:
        dims = (1,) if h.layout == "channels" else tuple(range(-len(_trailing_shape(module)), 0))
        c = x - x.mean(dims, keepdim=True) if h.kind == "layer" else x
        y = c / torch.sqrt((c * c).mean(dims, keepdim=True) + eps)
    if w is not None:
        y = y * (_view(w, x, h.layout) + h.offset)
    if b is not None:
        y = y + _view(b, x, h.layout)
    return y


def _hypotheses(module: nn.Module) -> list[Hypothesis]:
    if _own_tensor(module, "running_mean") is not None and _own_tensor(module, "running_var") is not None:
        return [Hypothesis("frozen_bn", "channels")]
    w = _own_tensor(module, "weight")
    offsets = (0.0, 1.0) if w is not None else (0.0,)
    if isinstance(getattr(module, "num_groups", None), int):
        return [Hypothesis("group", "channels", offset) for offset in offsets]
    layouts = ("trailing", "channels") if w is None or w.dim() == 1 else ("trailing",)
    return [Hypothesis(kind, layout, offset) for layout in layouts for kind in ("rms", "layer") for offset in offsets]


def _shapes_for(h: Hypothesis, shapes: dict) -> list[tuple]:
    if h.kind == "frozen_bn":
        return [s for s in shapes["channels"] if len(s) == 4]
    if h.kind == "group":
        return [s for s in shapes["channels"] if len(s) >= 3]
    return shapes["trailing"] if h.layout == "trailing" else [s for s in shapes["channels"] if len(s) >= 3]


def randomized_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A float64 copy whose weight, bias and running statistics are random (a weight of ones, a
    zero-centred weight of zeros and ``1 + w`` would look alike otherwise)."""
    probe = _float64_copy(module)
    with torch.no_grad():
        for name, low, high in (("weight", 0.5, 1.5), ("bias", -1.0, 1.0), ("running_mean", -1.0, 1.0), ("running_var", 0.5, 2.0)):
            t = _own_tensor(probe, name)
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low) + low)
    return probe


def _match(module: nn.Module, probe: nn.Module, eps: float, shapes: dict, generator: torch.Generator):
    """The first hypothesis the float64 probe matches on all its shapes in train and eval mode, with the
    inputs used; or ``(None, reason)``. A shape the module refuses (raises) is skipped, but two must run."""
    closest = (math.inf, None)
    for h in _hypotheses(module):
        inputs = [probe_input(s, generator, eps, channels=h.layout == "channels").to(_device(module)) for s in _shapes_for(h, shapes)]
        worst, ran = 0.0, []
        for x in inputs:
            for training in (True, False):
                probe.train(training)
                try:
                    with torch.no_grad(), keep_float64():
                        out = seeded_call(probe, x)
                except Exception:
                    break
                worst = max(worst, rel_error(out, oracle(h, x, probe, eps)))
            else:
                ran.append(x)
        probe.train(module.training)
        if len(ran) >= min(2, len(inputs)) and ran and worst <= PROOF_TOL:
            return h, ran
        closest = min(closest, (worst if len(ran) >= 2 else math.inf, h), key=lambda t: t[0])
    if closest[1] is None:
        return None, "it does not run on any probe input shaped for its weight"
    err, h = closest
    off = "does not run on inputs shaped for it" if math.isinf(err) else f"is off by {err:.1e} (relative) from the closest, {h.describe(eps)}"
    return None, f"its float64 output is no normalization of its input: it {off}"


def _twin(h: Hypothesis, module: nn.Module, eps: float, casting_mode: str = "torch") -> Twin:
    w = _own_tensor(module, "weight")
    attrs = {"eps": eps}
    if h.kind == "frozen_bn":  # probed on 4-D input only
        attrs.update(num_features=module._buffers["running_mean"].numel(), casting_mode=casting_mode)
        return Twin(nnk.FrozenBatchNorm2d, tuple(attrs.items()))
    if h.kind == "group":
        attrs.update(num_channels=_channels(module), affine=w is not None, casting_mode=casting_mode, offset=h.offset)
        if not hasattr(module, "bias"):
            attrs["bias"] = None
        return Twin(nnk.GroupNorm, tuple(attrs.items()))
    shape = (w.numel(),) if h.layout == "channels" else _trailing_shape(module)
    attrs.update(normalized_shape=tuple(shape), elementwise_affine=w is not None, casting_mode=casting_mode,
                 offset=h.offset, channels_first=h.layout == "channels")
    if h.kind == "layer" and not hasattr(module, "bias"):
        attrs["bias"] = None
    return Twin(nnk.RMSNorm if h.kind == "rms" else nnk.LayerNorm, tuple(attrs.items()))


def as_twin(module: nn.Module, twin: Twin) -> nn.Module:
    """A copy of ``module`` made into ``twin`` (for probing; :func:`become` changes the module itself)."""
    out = copy.deepcopy(module)
    become(out, twin.cls, twin.attrs)
    return out


def _call(module: nn.Module, x: Tensor):
    try:
        with torch.no_grad():
            return seeded_call(module, x)
    except Exception as exc:
        return exc


def _dtype_fits(module: nn.Module, h: Hypothesis, eps: float, modes, x64: Tensor):
    """The first casting mode whose twin reproduces ``module`` (the randomized float64 probe) in every
    (input dtype, weight dtype) of ``PROBE_DTYPES``; or ``(None, reason)``."""
    misses = []
    for mode in modes:
        twin = _twin(h, module, eps, mode)
        miss = None
        for xd, wd in PROBE_DTYPES:
            original = copy.deepcopy(module).to(wd)
            x = x64.to(xd)
            want, got = _call(original, x), _call(as_twin(original, twin), x)
            if isinstance(want, Exception):
                continue  # nothing to reproduce: the original refuses these dtypes
            if isinstance(got, Exception):
                miss = f"raises {type(got).__name__} for {_dt(xd)} input with {_dt(wd)} weights"
                break
            if got.dtype != want.dtype:
                miss = f"gives {_dt(got.dtype)} for {_dt(xd)} input with {_dt(wd)} weights, the original {_dt(want.dtype)}"
                break
            truth = oracle(h, x.double(), original.double(), eps)
            least = max((xd, wd, want.dtype), key=lambda d: torch.finfo(d).eps)  # the precision the result can have
            parity, accurate, original_off = (rel_error(got, want) <= PARITY_TOL[least],
                                              rel_error(got, truth) <= REL_TOL[least],
                                              rel_error(want, truth) > REL_TOL[least])
            if not (parity or (original_off and accurate)):
                miss = (f"is {rel_error(got, want):.1e} off the original for {_dt(xd)} input with {_dt(wd)} weights "
                        f"(the original is {rel_error(want, truth):.1e} off the float64 answer)")
                break
        if miss is None:
            return mode, None
        misses.append(f"casting_mode={mode!r} {miss}")
    return None, "no casting mode reproduces its dtype behaviour: " + "; ".join(misses)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------- recognize
@contextlib.contextmanager
def single_threaded():
    """Intra-op parallelism off while probing: the probe tensors are small, and waking a thread pool for each
    of their ops costs more than the op (100x on a loaded machine). The previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def recognize(module: nn.Module, seed: int = 0) -> Finding:
    """Probe one norm-like module (left untouched: copies are probed) and say what normkit can do with it."""
    with single_threaded():
        return _recognize(module, seed)


def _recognize(module: nn.Module, seed: int) -> Finding:
    if any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()]):
        return Finding("left", "it is on the meta device, where it cannot be probed", recipe="convert it once it holds data")
    generator = torch.Generator().manual_seed(seed)
    shapes = probe_shapes(module)
    flat = [*shapes["trailing"], *shapes["channels"]]
    ran, calls, error = _own_calls(module, flat, generator)
    if calls:
        worst = _harden_proof(module, ran)
        if worst <= PROOF_TOL:
            return Finding("harden", f"its own forward calls {', '.join(calls)}; routed to normkit (float64 output "
                                     f"unchanged: {worst:.0e})", calls=calls)
        return Finding("left", f"its forward calls {', '.join(calls)}, but routing them to normkit changes its float64 "
                               f"output by {worst:.1e}", recipe=_ROBUST_RECIPE)
    if not ran:
        why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error else "no input shape could be derived"
        return Finding("left", f"it could not be run on a probe input ({why})", recipe=_ROBUST_RECIPE)
    children = [n for n, _ in module.named_children()]
    if children:
        return Finding("left", f"its forward calls no torch normalization and it has submodules ({', '.join(children)}), "
                               f"so it is no normalization alone", recipe=_ROBUST_RECIPE)
    eps_name, eps = eps_of(module)
    if eps_name is None:
        return Finding("left", f"it has no numeric eps attribute ({', '.join(EPS_ATTRS)}) to prove a normalization with",
                       recipe=_ROBUST_RECIPE)
    probe = randomized_copy(module, generator)
    h, inputs = _match(module, probe, eps, shapes, generator)
    if h is None:  # inputs: the reason
        return Finding("left", inputs, recipe=_ROBUST_RECIPE)
    modes = ("torch", "promote") if h.kind == "frozen_bn" else CASTING_MODES
    mode, why = _dtype_fits(probe, h, eps, modes, inputs[0])
    if mode is None:
        return Finding("left", f"its float64 output is {h.describe(eps)}, but {why}",
                       recipe="replace it by the normkit.nn module by hand, accepting its dtype policy")
    twin = _twin(h, module, eps, mode)
    worst = 0.0
    swapped = as_twin(probe, twin)
    for x in inputs:
        with torch.no_grad(), keep_float64():
            worst = max(worst, rel_error(seeded_call(swapped, x), seeded_call(probe, x)))
    if worst > PROOF_TOL:  # the twin's wiring, checked end to end
        return Finding("left", f"its float64 output is {h.describe(eps)}, but {twin.label} differs from it by {worst:.1e}",
                       recipe=_ROBUST_RECIPE)
    return Finding("twin", f"its float64 output is {h.describe(eps)}", twin=twin)
