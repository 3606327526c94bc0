"""The model probe: where in a model do the norm layers (or any layer) break, at which dtype and input
scale, and does the ``normkit.convert``-ed twin hold there.

For each input scale ``s`` the float64 model runs on ``s * x`` (``x`` a fixed standard-normal draw) with
forward hooks recording every executed leaf call -- a module none of whose submodules ran during its
call -- with its input and output. Then, per dtype, each layer is judged twice:

* **isolated** (the verdict): the layer in the dtype gets the float64 model's input to that layer, rounded
  to the dtype, and is compared with the float64 copy of the same (dtype-rounded) layer on that same rounded
  input. Errors from upstream layers and from rounding the input cannot leak in, so the layer that breaks is
  the one named. A layer whose float64 input or output lies outside the dtype's range is marked ``range``:
  no layer can be right there, and no normalization fixes it.
* **propagated** (what a user sees): the whole model in the dtype, each layer's output compared with the
  float64 model's; errors accumulate, and after the first non-finite layer everything downstream is too.

The torch model and its twin share every non-normalization layer, so those are computed once. The score is
``max|out - ref| / max|ref|`` against the per-dtype tolerance of :data:`normkit.check.cases.TOLERANCE`.
``mode="train"`` (default) runs the norm layers on batch statistics, as in training (dropout off);
``mode="eval"`` uses running statistics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import convert
from .. import nn as nnk
from .cases import TOLERANCE, dtype_name
from .errors import absmax, relative_error

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
FAILED = ("fail", "non-finite", "raised")


def num(v: float) -> str:
    return f"{v:g}" if 1e-2 <= v < 1e4 and v == int(v) else f"{v:.0e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def num_err(e: float) -> str:
    return f"{e:.0e}".replace("e+0", "e").replace("e-0", "e-")


class ProbeInputError(ValueError):
    """The float64 model itself rejected the input (a wrong ``--input-shape``): a usage error."""


@dataclass
class LayerCase:
    """One layer call at one (dtype, scale), both variants. Status: ok, fail, non-finite, raised, range."""

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


@dataclass
class Finding:
    """The first failing layer of one model variant at one dtype."""

    layer: str
    kind: str
    dtype: str
    status: str
    scale: float
    normkit_status: str
    normkit_worst: float | None

    def sentence(self) -> str:
        what = {"non-finite": "non-finite", "fail": "out of tolerance", "raised": "raises"}[self.status]
        nk = (f"max rel err {num_err(self.normkit_worst)}" if self.normkit_worst is not None and
              math.isfinite(self.normkit_worst) else self.normkit_status)
        if self.normkit_status in FAILED:
            nk = f"also {self.normkit_status}"
        return f"{self.layer} ({self.kind}): {self.dtype}, {what} from input scale {num(self.scale)} (normkit twin: {nk})"


@dataclass
class ModelResult:
    model: str
    input_shape: tuple[int, ...]
    mode: str
    dtypes: list[str]
    scales: list[float]
    layers: list[str]
    cases: list[LayerCase] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)  # per (dtype, scale): final output errors

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
                       nk_bad[0] if nk_bad else "ok", max(nk_errors) if nk_errors else None)

    def first_out_of_range(self, dtype: str) -> LayerCase | None:
        rng = [c for c in self.cases if c.dtype == dtype and c.torch_status == "range"]
        return min(rng, key=lambda c: (c.scale, c.index)) if rng else None

    @property
    def normkit_ok(self) -> bool:
        """Every normalization layer of the twin within tolerance wherever its dtype can hold the answer."""
        return not any(c.is_norm and c.normkit_status in FAILED for c in self.cases)


# ---------------------------------------------------------------------------------------- recording
@dataclass
class _Call:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: object = None


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
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj.clone()
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
    """Forward hooks on every submodule: the executed leaf calls in order, with inputs and outputs; on an
    exception, the leaf that raised."""

    def __init__(self, model: nn.Module, keep_inputs: bool = True):
        self.calls: list[_Call] = []
        self.stack: list[list] = []  # [name, module, args, kwargs, has_children]
        self.keep_inputs = keep_inputs
        self.handles = []
        for name, m in model.named_modules():
            if name:
                self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post(), with_kwargs=True))

    def _pre(self, name):
        def hook(module, args, kwargs):
            if self.stack:
                self.stack[-1][4] = True
            self.stack.append([name, module, _clone(args) if self.keep_inputs else (), 
                               _clone(kwargs) if self.keep_inputs else {}, False])
        return hook

    def _post(self):
        def hook(module, args, kwargs, output):
            name, m, a, kw, has_children = self.stack.pop()
            if not has_children:
                self.calls.append(_Call(name, m, a, kw, _clone(output)))
        return hook

    def raising_layer(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def close(self):
        for h in self.handles:
            h.remove()


def _record(model: nn.Module, x: torch.Tensor, keep_inputs=True) -> tuple[list[_Call], object, BaseException | None, str | None]:
    rec = _Recorder(model, keep_inputs)
    try:
        with torch.no_grad():
            out = model(x)
        return rec.calls, out, None, None
    except Exception as e:  # noqa: BLE001 -- reported, with the layer that raised
        return rec.calls, None, e, rec.raising_layer()
    finally:
        rec.close()


# ---------------------------------------------------------------------------------------- judging
def _judge(module: nn.Module, ref_module: nn.Module, call: _Call, dtype: torch.dtype) -> tuple[str, float | None, str]:
    top = torch.finfo(dtype).max
    ins = _tensors((call.args, call.kwargs))
    if any(absmax(t) > top for t in ins):
        return "range", None, "input outside the dtype's range"
    args, kwargs = _cast(call.args, dtype), _cast(call.kwargs, dtype)
    with torch.no_grad():
        ref = _tensors(ref_module(*_cast(args, torch.float64), **_cast(kwargs, torch.float64)))
        if any(absmax(r) > top for r in ref):
            return "range", None, "output outside the dtype's range"
        try:
            out = _tensors(module(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 -- torch refuses some dtypes (half LRN on CPU)
            return "raised", None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    err = max((relative_error(o, r) for o, r in zip(out, ref)), default=0.0)
    if not math.isfinite(err):
        return "non-finite", err, ""
    return ("ok" if err <= TOLERANCE[dtype] else "fail"), err, ""


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


def probe(model: nn.Module, input_shape, *, name: str = "model", dtypes=(torch.float32,), scales=(1.0, 1e4, 1e20),
          mode: str = "train", seed: int = 0, progress: Callable[[int], None] | None = None) -> ModelResult:
    """Probe ``model`` (left untouched: it is copied) at each dtype and input scale; see the module docstring.
    Raises :class:`ProbeInputError` when the float64 model rejects the input shape."""
    master = _prepare(copy.deepcopy(model), mode).double()
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    result = ModelResult(name, tuple(input_shape), mode, [dtype_name(d) for d in dtypes], list(scales), [])
    f32_exact = all(torch.equal(t, t.float().double()) for t in master.state_dict().values() if t.is_floating_point())
    for dtype in dtypes:
        # float64 values that came from float32 round to any dtype exactly as the float32 ones would
        model_dt = copy.deepcopy(master).to(dtype)
        twin = convert(_shared_copy(model_dt), inplace=True)
        ref_dt = master if dtype == torch.float32 and f32_exact else copy.deepcopy(model_dt).double()
        for scale in scales:
            if scale > torch.finfo(dtype).max:
                continue
            ref_calls, ref_out, err, where = _record(master, scale * x)
            if err is not None:
                raise ProbeInputError(f"{name} rejects input shape {tuple(input_shape)}: layer {where or '(top level)'} "
                                      f"raised {type(err).__name__}: {str(err).splitlines()[0]}") from err
            if not result.layers:
                result.layers = [c.name for c in ref_calls]
            _probe_one(result, model_dt, twin, ref_dt, dtype, scale, x, ref_calls, ref_out)
            del ref_calls
            if progress:
                progress(1)
        del model_dt, twin, ref_dt
    return result


def _probe_one(result, model, twin, ref_model, dtype, scale, x, ref_calls, ref_out):
    mods, twin_mods, ref_mods = dict(model.named_modules()), dict(twin.named_modules()), dict(ref_model.named_modules())
    dn = dtype_name(dtype)
    cases = []
    for i, call in enumerate(ref_calls):
        m = mods[call.name]
        status, error, msg = _judge(m, ref_mods[call.name], call, dtype)
        is_norm = isinstance(m, NORM_TYPES)
        case = LayerCase(call.name, type(m).__name__, i, is_norm, dn, scale, status, error, status, error, message=msg)
        if is_norm:  # the twin differs from the model only here
            case.normkit_status, case.normkit_error, _ = _judge(twin_mods[call.name], ref_mods[call.name], call, dtype)
        cases.append(case)
    xd = (scale * x).to(dtype)
    t_calls, t_out, t_err, t_where = _record(model, xd, keep_inputs=False)
    n_calls, n_out, n_err, n_where = _record(twin, xd, keep_inputs=False)
    for c, e in zip(cases, _propagated(t_calls, ref_calls)):
        c.torch_propagated = e
    for c, e in zip(cases, _propagated(n_calls, ref_calls)):
        c.normkit_propagated = e
    result.cases += cases

    def final(out, err, where):
        if err is not None:
            return {"status": "raised", "error": None, "layer": where}
        e = relative_error(out, ref_out)
        return {"status": "non-finite" if not math.isfinite(e) else ("ok" if e <= TOLERANCE[dtype] else "fail"),
                "error": e if math.isfinite(e) else None, "layer": None}

    result.outputs.append({"dtype": dn, "scale": scale, "torch": final(t_out, t_err, t_where),
                           "normkit": final(n_out, n_err, n_where)})
