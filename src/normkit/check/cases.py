"""The one registry of operator cases: the tests, the benchmarks and ``normkit check`` all draw from it.

* :data:`OPERATORS`: every operator configuration (:class:`OpCase`) -- how to make its parameters for an
  input, how to call normkit and torch on it, a float64 two-pass reference, its default eps and whether it
  takes ``eps = 0``, and its one-node ONNX form (the benchmarks' ONNX Runtime provider).
* The adversarial inputs: :func:`magnitudes` (1e-3 up to each dtype's top), :func:`special_inputs` (mean
  offsets with noise just above the dtype's spacing, constant groups, magnitude 1e-30), :data:`ADVERSARIAL`
  (the curated magnitudes, offsets and constants per dtype the test suites sweep), and the conditions
  beyond the input (:func:`conformance_cases`): tiny and zero eps, extreme eval-BN parameters
  (``running_var = weight = 1e-20``), extreme output gradients for backward.
* ``normkit check`` sweeps :data:`OPS` (each :class:`OpCase` without affine parameters, as one-argument
  callables) over :func:`inputs`; the tests run :func:`conformance_cases` through every backend; the
  benchmarks time :data:`OPERATORS` on their shapes (``benchmarks/cases.py``).

The reference is the textbook two-pass formula evaluated in float64 on the float64 copy of the (already
rounded) input: float64 holds the squares of every float32 and half value and has 29 more bits. torch's
own float64 operators are not used: ``F.batch_norm`` in float64 is wrong on a constant 1e7 input too.
(The tests add an independent extended-precision oracle with gradients, ``tests/oracle.py``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import functional as nf

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# relative to max|ref|: 1e-5 for float32; half types: their output rounding (half an ulp) plus 2e-3
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3 + 2.0**-11, torch.bfloat16: 2e-3 + 2.0**-8,
             torch.float64: 1e-9}
SHAPE = (8, 16, 6, 6)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------- references
def reference(x: torch.Tensor, dims, eps: float, center: bool = True) -> torch.Tensor:
    """Two-pass ``(x - mean) / sqrt(var + eps)`` (or ``x / sqrt(mean(x**2) + eps)``) in float64."""
    x = x.double()
    c = x - x.mean(dim=dims, keepdim=True) if center else x
    return c / torch.sqrt((c * c).mean(dim=dims, keepdim=True) + eps)


def lrn_reference(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """torch's LRN convention in float64: window ``[c - size//2, c + (size-1)//2]``, ``alpha / size``."""
    x = x.double()
    sq = F.pad(x * x, (0, 0) * (x.dim() - 2) + (size // 2, (size - 1) // 2))
    window = sum(sq.narrow(1, o, x.shape[1]) for o in range(size))
    return x / (k + alpha / size * window) ** beta


def _affine64(y: torch.Tensor, p: dict, view) -> torch.Tensor:
    if p.get("weight") is not None:
        y = y * view(p["weight"].double())
    if p.get("bias") is not None:
        y = y + view(p["bias"].double())
    return y


def _channel(x: torch.Tensor):
    return lambda t: t.view(1, -1, *([1] * (x.dim() - 2)))


# ---------------------------------------------------------------------------------------------- operators
def num_groups(channels: int) -> int:
    """Group norm's group count for ``channels``: 32, 4, 3 or 2 where one divides (and leaves more than one
    channel per group where it can), else 1 -- 32 for CNN widths, 4 for check's 16, 3 for the tests' 6."""
    return next((g for g in (32, 4, 3, 2) if channels % g == 0 and channels > g), 1)


def trailing_dims(x: torch.Tensor) -> int:
    """Layer / RMS norm's normalized dims: the last two of an image-like 4-D (or more) input, else the last."""
    return 2 if x.dim() >= 4 else 1


def _uniform(shape, lo, hi, dtype, generator=None):
    return (torch.rand(shape, dtype=torch.float64, generator=generator) * (hi - lo) + lo).to(dtype)


def channel_params(x, scale=1.0, affine=True, running=False, generator=None):
    """``weight ~ U(0.5, 1.5)``, ``bias ~ U(-0.5, 0.5)`` per channel (when ``affine``); with ``running``, a
    running mean within ``+-scale`` and a running variance of ``scale**2`` (capped to fit the dtype)."""
    c = x.shape[1]
    p = {}
    if affine:
        p = {"weight": _uniform((c,), 0.5, 1.5, x.dtype, generator), "bias": _uniform((c,), -0.5, 0.5, x.dtype, generator)}
    if running:
        top = torch.finfo(x.dtype).max
        p["running_mean"] = _uniform((c,), -scale, scale, x.dtype, generator)
        p["running_var"] = _uniform((c,), 0.5, 2.0, torch.float64, generator).mul(min(scale * scale, top / 4)).to(x.dtype)
    return p


def trailing_params(x, scale=1.0, affine=True, bias=True, generator=None):
    shape = tuple(x.shape[-trailing_dims(x):])
    if not affine:
        return {}
    p = {"weight": _uniform(shape, 0.5, 1.5, x.dtype, generator)}
    if bias:
        p["bias"] = _uniform(shape, -0.5, 0.5, x.dtype, generator)
    return p


def extreme_eval_params(x, scale=1.0, affine=True, generator=None):
    """Eval batch norm at the edge: ``running_var = weight = 1e-20`` (``rstd = 1e10``: ``(x - mean) * rstd``
    overflows float32 from ``|x| ~ 3e28`` while ``y`` stays below 1e20 there)."""
    c = x.shape[1]
    return {"weight": torch.full((c,), 1e-20, dtype=x.dtype), "bias": _uniform((c,), -0.5, 0.5, x.dtype, generator),
            "running_mean": torch.zeros(c, dtype=x.dtype), "running_var": torch.full((c,), 1e-20, dtype=x.dtype)}


def _onnx_model(op_type, attrs, inputs, opset):
    def build(shape, p, eps):
        from onnx import helper

        names = ["x"] + [k for k, _ in inputs]
        node = helper.make_node(op_type, names, ["y"], **attrs(shape, eps))
        return [node], {k: f(shape, p) for k, f in inputs}, opset
    return build


@dataclass(frozen=True)
class OpCase:
    """One operator configuration of the registry. Callables take ``(x, p, eps=None)`` (``None``: the
    default ``eps``): ``normkit`` and ``torch`` return ``y`` in ``x``'s dtype, ``reference`` the float64
    two-pass answer; ``params(x, scale=1.0, affine=True, generator=None)`` makes the parameters in ``x``'s
    dtype (``scale``: the magnitude of the data, for running statistics). ``onnx(shape, p, eps)`` builds the
    op's one-node ONNX model ``(nodes, initializers, opset)`` with input ``x`` and output ``y``."""

    name: str
    family: str  # "stats" (a statistics-based normalization) or "lrn"
    min_dim: int
    params: Callable
    normkit: Callable
    torch: Callable
    reference: Callable
    eps: float | None = 1e-5
    zero_eps: bool = True  # eps = 0 is accepted (torch refuses it for batch norm in training)
    grads: tuple = ("weight", "bias")  # parameters that receive gradients
    onnx: Callable | None = None

    def eps_or_default(self, eps):
        return self.eps if eps is None else eps


def _bn_train(x, p, eps, f):  # running statistics, when given, are updated in place (the tests pass copies)
    return f(x, p.get("running_mean"), p.get("running_var"), p.get("weight"), p.get("bias"), True, 0.1, eps)


def _bn_eval(x, p, eps, f):
    return f(x, p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.1, eps)


def _eval_reference(x, p, eps):
    view = _channel(x)
    y = (x.double() - view(p["running_mean"].double())) / torch.sqrt(view(p["running_var"].double()) + eps)
    return _affine64(y, p, view)


def _ln_shape(x):
    return tuple(x.shape[-trailing_dims(x):])


def _gn_reference(x, p, eps):
    g = num_groups(x.shape[1])
    y = reference(x.reshape(x.shape[0], g, -1), (2,), eps).reshape(x.shape)
    return _affine64(y, p, _channel(x))


LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)  # AlexNet's (Krizhevsky et al.'s k = 2)

_OPERATORS = [
    OpCase("batch_norm", "stats", 2, channel_params,
           lambda x, p, eps=None: _bn_train(x, p, 1e-5 if eps is None else eps, nf.batch_norm),
           lambda x, p, eps=None: _bn_train(x, p, 1e-5 if eps is None else eps, F.batch_norm),
           lambda x, p, eps=None: _affine64(reference(x, (0, *range(2, x.dim())), 1e-5 if eps is None else eps), p, _channel(x)),
           zero_eps=False),
    OpCase("batch_norm_eval", "stats", 2, lambda x, scale=1.0, affine=True, generator=None:
           channel_params(x, scale, affine, running=True, generator=generator),
           lambda x, p, eps=None: _bn_eval(x, p, 1e-5 if eps is None else eps, nf.batch_norm),
           lambda x, p, eps=None: _bn_eval(x, p, 1e-5 if eps is None else eps, F.batch_norm),
           lambda x, p, eps=None: _eval_reference(x, p, 1e-5 if eps is None else eps),
           onnx=_onnx_model("BatchNormalization", lambda shape, eps: {"epsilon": eps},
                            [("scale", lambda s, p: p["weight"]), ("bias", lambda s, p: p["bias"]),
                             ("mean", lambda s, p: p["running_mean"]), ("var", lambda s, p: p["running_var"])], 17)),
    OpCase("instance_norm", "stats", 3, channel_params,
           lambda x, p, eps=None: nf.instance_norm(x, weight=p.get("weight"), bias=p.get("bias"), eps=1e-5 if eps is None else eps),
           lambda x, p, eps=None: F.instance_norm(x, weight=p.get("weight"), bias=p.get("bias"), eps=1e-5 if eps is None else eps),
           lambda x, p, eps=None: _affine64(reference(x, tuple(range(2, x.dim())), 1e-5 if eps is None else eps), p, _channel(x)),
           onnx=_onnx_model("InstanceNormalization", lambda shape, eps: {"epsilon": eps},
                            [("scale", lambda s, p: p.get("weight", torch.ones(s[1]))),
                             ("bias", lambda s, p: p.get("bias", torch.zeros(s[1])))], 17)),
    OpCase("layer_norm", "stats", 1, trailing_params,
           lambda x, p, eps=None: nf.layer_norm(x, _ln_shape(x), p.get("weight"), p.get("bias"), 1e-5 if eps is None else eps),
           lambda x, p, eps=None: F.layer_norm(x, _ln_shape(x), p.get("weight"), p.get("bias"), 1e-5 if eps is None else eps),
           lambda x, p, eps=None: _affine64(reference(x, tuple(range(-trailing_dims(x), 0)), 1e-5 if eps is None else eps), p, lambda t: t),
           onnx=_onnx_model("LayerNormalization", lambda shape, eps: {"axis": -(2 if len(shape) >= 4 else 1), "epsilon": eps},
                            [("scale", lambda s, p: p["weight"]), ("bias", lambda s, p: p["bias"])], 17)),
    OpCase("group_norm", "stats", 2, channel_params,
           lambda x, p, eps=None: nf.group_norm(x, num_groups(x.shape[1]), p.get("weight"), p.get("bias"), 1e-5 if eps is None else eps),
           lambda x, p, eps=None: F.group_norm(x, num_groups(x.shape[1]), p.get("weight"), p.get("bias"), 1e-5 if eps is None else eps),
           lambda x, p, eps=None: _gn_reference(x, p, 1e-5 if eps is None else eps),
           onnx=_onnx_model("GroupNormalization", lambda shape, eps: {"num_groups": num_groups(shape[1]), "epsilon": eps},
                            [("scale", lambda s, p: p["weight"]), ("bias", lambda s, p: p["bias"])], 21)),
    OpCase("rms_norm", "stats", 1, lambda x, scale=1.0, affine=True, generator=None:
           trailing_params(x, scale, affine, bias=False, generator=generator),
           lambda x, p, eps=None: nf.rms_norm(x, _ln_shape(x), p.get("weight"), 1e-6 if eps is None else eps),
           lambda x, p, eps=None: F.rms_norm(x, _ln_shape(x), p.get("weight"), 1e-6 if eps is None else eps),
           lambda x, p, eps=None: _affine64(reference(x, tuple(range(-trailing_dims(x), 0)), 1e-6 if eps is None else eps,
                                                      center=False), p, lambda t: t),
           eps=1e-6, grads=("weight",),
           onnx=_onnx_model("RMSNormalization", lambda shape, eps: {"axis": -(2 if len(shape) >= 4 else 1), "epsilon": eps},
                            [("scale", lambda s, p: p["weight"])], 23)),
    OpCase("local_response_norm", "lrn", 3, lambda x, scale=1.0, affine=True, generator=None: {},
           lambda x, p, eps=None: nf.local_response_norm(x, **LRN),
           lambda x, p, eps=None: F.local_response_norm(x, **LRN),
           lambda x, p, eps=None: lrn_reference(x, **LRN),
           eps=None, grads=(),
           onnx=_onnx_model("LRN", lambda shape, eps: {"size": LRN["size"], "alpha": LRN["alpha"], "beta": LRN["beta"],
                                                       "bias": LRN["k"]}, [], 17)),
]
OPERATORS: dict[str, OpCase] = {o.name: o for o in _OPERATORS}


# ---------------------------------------------------------------------------------------------- normkit check's ops
@dataclass(frozen=True)
class Op:
    """An op as ``normkit check`` sweeps it: one-argument callables (no affine parameters: the sweep
    measures the normalization itself), each op's default eps."""

    name: str
    torch: Callable
    normkit: Callable
    reference: Callable


def sweep_op(case: OpCase) -> Op:
    """``case`` without affine parameters, as :class:`Op`."""
    def bind(f):
        return lambda x: f(x, case.params(x, 1.0, affine=False))
    return Op(case.name, bind(case.torch), bind(case.normkit), bind(case.reference))


SWEEP = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "local_response_norm")
OPS = [sweep_op(OPERATORS[name]) for name in SWEEP]
OP_NAMES = [o.name for o in OPS]


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Input:
    """One input: ``make(generator, shape=SHAPE)`` returns float64 data, rounded to ``dtype`` before use.
    ``magnitude`` is set for the magnitude grid (``max|x| <= magnitude``), None for the special inputs;
    ``scale`` is the data's size (for running statistics and parameters made to match)."""

    label: str
    dtype: torch.dtype
    make: Callable
    magnitude: float | None = None
    scale: float = 1.0


def _uniform_data(m):  # |x| <= m, so the top of the grid is exactly the dtype's largest value
    return lambda g, shape=SHAPE: m * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)


def _normal(m, offset=0.0):
    return lambda g, shape=SHAPE: offset + m * torch.randn(shape, generator=g, dtype=torch.float64)


def _constant(c):
    return lambda g, shape=SHAPE: torch.full(shape, c, dtype=torch.float64)


def magnitudes(dtype: torch.dtype, fast: bool = False) -> list[float]:
    """``1e-3, 1e-2, ...`` up to the dtype's largest finite value (which ends the grid)."""
    top = torch.finfo(dtype).max
    step = 5 if fast else 1
    grid = [10.0**e for e in range(-3, math.floor(math.log10(top)) + 1, step)]
    return grid + [top] if grid[-1] < top else grid


def _fmt_num(v: float) -> str:
    return f"{v:.0e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def special_inputs(dtype: torch.dtype) -> list[Input]:
    """Mean offsets with noise just above the dtype's spacing there, constant inputs, tiny magnitudes."""
    top, eps = torch.finfo(dtype).max, torch.finfo(dtype).eps
    out = []
    for o in (1e3, 1e4, 1e5, 1e6, 1e7):
        if o < top / 4:
            spread = max(1.0, 2.0 ** math.ceil(math.log2(16 * o * eps)))
            out.append(Input(f"offset {_fmt_num(o)} + N(0,{spread:g})", dtype, _normal(spread, o), scale=o))
    for c in (0.0, 1.0, 1e4, 1e7, 1e30):
        if c < top / 4:
            out.append(Input(f"constant {_fmt_num(c) if c > 1 else f'{c:g}'}", dtype, _constant(c), scale=abs(c) or 1.0))
    if dtype != torch.float16:
        out.append(Input("magnitude 1e-30", dtype, _normal(1e-30), scale=1e-30))
    return out


def inputs(dtypes=None, fast: bool = False) -> list[Input]:
    """Every input of ``normkit check``'s sweep for ``dtypes`` (all of :data:`DTYPES` when None)."""
    out = []
    for dtype in dtypes or DTYPES.values():
        out += [Input(f"magnitude {_fmt_num(m)}", dtype, _uniform_data(m), m, m) for m in magnitudes(dtype, fast)]
        out += special_inputs(dtype)[: 3 if fast else None]
    return out


# the inputs on which torch 2.13 was measured to fail -- float32 sums of squares overflowing (1e19, 1e30), cancelling
# at an offset or a constant, float16 squares -- and their controls (the fixed table ``normkit check`` showed
# before the sweep)
INPUTS = [
    Input("unit normal", torch.float32, _normal(1.0)),
    Input("magnitude 1e19", torch.float32, _normal(1e19), scale=1e19),
    Input("magnitude 1e30", torch.float32, _normal(1e30), scale=1e30),
    Input("magnitude 1e-30", torch.float32, _normal(1e-30), scale=1e-30),
    Input("offset 1e6 + N(0,1)", torch.float32, _normal(1.0, 1e6), scale=1e6),
    Input("constant 1e7", torch.float32, _constant(1e7), scale=1e7),
    Input("unit normal", torch.float16, _normal(1.0)),
    Input("offset 3e4 + N(0,64)", torch.float16, _normal(64.0, 3e4), scale=3e4),
    Input("magnitude 6e4", torch.float16, _uniform_data(6e4), scale=6e4),
    Input("magnitude 1e30", torch.bfloat16, _normal(1e30), scale=1e30),
    Input("magnitude 1e38", torch.bfloat16, _uniform_data(1e38), scale=1e38),
]


# ---------------------------------------------------------------------------------------------- the test suites' sweep
# Per dtype: magnitudes from the bottom to the top of its range, (offset, noise) pairs with the offset a
# factor 2**(mantissa - 2) above the noise, constant groups.
ADVERSARIAL = {
    torch.float32: dict(magnitudes=[1e-30, 1e-20, 1e-3, 1.0, 1e3, 1e19, 1e20, 1e30, 1e38],
                        offsets=[(1e3, 1.0), (1e5, 1.0), (1e6, 1.0), (1e7, 1.0)], constants=[0.0, 1e7, 1e30, -3e38]),
    torch.float64: dict(magnitudes=[1e-300, 1e-30, 1.0, 1e30, 1e150, 1e300],
                        offsets=[(1e7, 1.0), (1e12, 1.0), (1e15, 1.0)], constants=[0.0, 1e15, 1e300]),
    torch.float16: dict(magnitudes=[1e-4, 1e-2, 1.0, 300.0, 3e4, 6e4],
                        offsets=[(1e3, 8.0), (3e4, 64.0)], constants=[0.0, 1e3, 6e4]),
    torch.bfloat16: dict(magnitudes=[1e-30, 1e-3, 1.0, 1e19, 1e30, 1e38],
                         offsets=[(1e3, 32.0), (1e7, 2.0**18)], constants=[0.0, 1e30, 3e38]),
}


def adversarial_inputs(dtype: torch.dtype) -> list[Input]:
    """:data:`ADVERSARIAL`'s inputs for ``dtype``: uniform in ``+-magnitude``, offset plus normal noise, constants."""
    a = ADVERSARIAL[dtype]
    out = [Input(f"magnitude {m:g}", dtype, _uniform_data(m), m, m) for m in a["magnitudes"]]
    out += [Input(f"offset {o:g} noise {s:g}", dtype, _normal(s, o), scale=o) for o, s in a["offsets"]]
    out += [Input(f"constant {c:g}", dtype, _constant(c), scale=abs(c) or 1.0) for c in a["constants"]]
    return out


# eps below the compute dtype's range (float32's smallest subnormal is 1.4e-45), tiny, and zero
EPS_CASES = (1e-50, 1e-12, 0.0)
# |dy| at the bottom and the top of each dtype (backward's sums are scaled as the data's are)
GRAD_SCALES = {torch.float32: (1e-30, 1e30), torch.float64: (1e-300, 1e300), torch.float16: (1e-4, 1e4),
               torch.bfloat16: (1e-30, 1e30)}


@dataclass(frozen=True)
class Case:
    """One conformance case: an op on an input, with an eps (None: the op's default), the parameters (the
    op's own, or the extreme eval-BN ones) and the size of the output gradient for backward."""

    op: OpCase
    input: Input
    eps: float | None = None
    extreme_params: bool = False
    grad_scale: float = 1.0
    label: str = field(default="")

    def params(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        if self.extreme_params:
            return extreme_eval_params(x, generator=generator)
        return self.op.params(x, self.input.scale, generator=generator)

    def data(self, shape, seed: int = 0):
        """``(x, p, dy)``, drawn deterministically from ``seed``: the input rounded to its dtype, the
        parameters, and an output gradient of normal entries times :attr:`grad_scale` (in the dtype)."""
        g = torch.Generator().manual_seed(seed)
        x = self.input.make(g, shape).to(self.input.dtype)
        p = self.params(x, g)
        dy = (torch.randn(shape, generator=g, dtype=torch.float64) * self.grad_scale).to(self.input.dtype)
        return x, p, dy


def conformance_cases(dtype: torch.dtype, ops=None) -> list[Case]:
    """Every case of the conformance suite for ``dtype`` and ``ops`` (names; all of :data:`OPERATORS` when
    None): each op on every :func:`adversarial_inputs` input; then, on unit data, every eps of
    :data:`EPS_CASES` the op accepts and both :data:`GRAD_SCALES`; and for eval batch norm the extreme
    parameters on magnitudes up to 1e30 (where the dtype holds them)."""
    top = torch.finfo(dtype).max
    unit = Input("magnitude 1", dtype, _uniform_data(1.0), 1.0)
    out = []
    for op in (OPERATORS[n] for n in (ops or OPERATORS)):
        out += [Case(op, i, label=i.label) for i in adversarial_inputs(dtype)]
        if op.eps is not None:
            out += [Case(op, unit, eps=e, label=f"eps {e:g}") for e in EPS_CASES if e > 0 or op.zero_eps]
        out += [Case(op, unit, grad_scale=s, label=f"dy scale {s:g}") for s in GRAD_SCALES[dtype]]
        if op.name == "batch_norm_eval":
            out += [Case(op, Input(f"magnitude {m:g}", dtype, _uniform_data(m), m, m), eps=1e-30, extreme_params=True,
                         label=f"var = weight = 1e-20, eps 1e-30, magnitude {m:g}")
                    for m in (1.0, 1e20, 1e30) if m < top and 1e-20 > torch.finfo(dtype).tiny]
    return out
