"""Robust normalization subgraphs built from primitive ONNX operators: the one place where normkit's
formulation (:mod:`normkit._stats`) is written in ONNX. Both :func:`normkit.harden_onnx` and
:func:`normkit.export_onnx` (``decompose=True``) emit these.

Every builder takes a :class:`Builder` (which appends nodes to an ``onnx_ir`` graph) and ``onnx_ir``
values, and returns the output value. Precision policy, as in the PyTorch ops:

* Statistics are computed in float32 (a float16 input is cast up inside the subgraph, the output cast back).
* **Exact power-of-two scaling.** Each reduction group is multiplied by ``2**-e`` with
  ``e = floor(log(max|x|) / ln 2)`` clamped to [-126, 126]; ``2**-e`` comes from ``Pow(2, -e)`` with an
  integer-valued exponent (exact). The logarithm may be off by one at an exact power of two: harmless, the
  scaled values then lie in (-4, 4) instead of (-2, 2) and the scaling is still exact.
* **Pivot shift and two-pass moments**: ``d = y - y[first]``, ``mean_d = mean(d)``, ``c = d - mean_d``,
  ``var = mean(c * c)``.
* **Inverse standard deviation as ``rsqrt(u) * 2**(e - h)``** with ``h`` chosen per group where the variance
  and ``eps`` meet, so ``u`` lies in about [1/4, 5]; every ``t * 2**k`` is applied in three exact factors
  (:meth:`Builder.mul_pow2`), so no intermediate over- or underflows that the float64 answer would not.
* No data-dependent control flow: selections are ``Where``/``Max``/``Clip``.

The subgraphs need opset 11 or later (``Clip`` with inputs); reductions take ``axes`` as an attribute
below opset 18 and as an input from 18 on.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx_ir as ir

F32 = ir.DataType.FLOAT
BOUND = 126.0  # 2**126 and 2**-126 are normal float32 numbers
INV_LN2 = 1.0 / math.log(2.0)
INT64_MAX = np.iinfo(np.int64).max


class Builder:
    """Creates ONNX nodes into a list (``self.nodes``) for insertion into an ``onnx_ir`` graph.

    ``opset`` is the default-domain opset of the target model; names get ``prefix`` so that they are
    unique in the graph.
    """

    def __init__(self, opset: int, prefix: str = "normkit"):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self._count = 0
        self._consts: dict[tuple, ir.Value] = {}

    def _name(self, op_type: str) -> str:
        self._count += 1
        return f"{self.prefix}/{op_type}_{self._count}"

    def op(self, op_type: str, *inputs: ir.Value | None, _domain: str = "", _outputs: int = 1, **attrs):
        node = ir.Node(_domain, op_type, list(inputs), attributes=ir.convenience.convert_attributes(
            {k: v for k, v in attrs.items() if v is not None}), num_outputs=_outputs, name=self._name(op_type))
        for i, v in enumerate(node.outputs):
            v.name = f"{node.name}:{i}"
        self.nodes.append(node)
        return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

    def const(self, value, dtype=np.float32) -> ir.Value:
        """A constant tensor (scalars become 0-D); equal constants are shared within one builder."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.op("Constant", value=ir.tensor(arr))
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.const(list(values), np.int64)

    # ------------------------------------------------------------------ small helpers
    def reduce(self, kind: str, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        """``ReduceMax`` / ``ReduceMean`` with ``keepdims=1`` in the form the opset wants."""
        if self.opset >= 18:
            return self.op(kind, x, self.ints(axes), keepdims=1)
        return self.op(kind, x, axes=list(axes), keepdims=1)

    def floor_log2(self, v: ir.Value, half: bool = False) -> ir.Value:
        """``floor(log2(v))`` (or ``floor(log2(v) / 2)``), ``-inf`` for 0; may be one too small at a power of two."""
        return self.op("Floor", self.op("Mul", self.op("Log", v), self.const(INV_LN2 * (0.5 if half else 1.0))))

    def clip(self, v: ir.Value, lo: float, hi: float) -> ir.Value:
        return self.op("Clip", v, self.const(lo), self.const(hi))

    def pow2(self, k: ir.Value) -> ir.Value:
        return self.op("Pow", self.const(2.0), k)

    def trunc(self, v: ir.Value) -> ir.Value:
        return self.op("Mul", self.op("Sign", v), self.op("Floor", self.op("Abs", v)))

    def mul_pow2(self, t: ir.Value, k: ir.Value) -> ir.Value:
        """``t * 2**k`` in three factors of the same sign, each a normal power of two (as
        :func:`normkit._stats.mul_pow2`): every intermediate lies between ``t`` and the result."""
        k = self.clip(k, -3 * BOUND, 3 * BOUND)
        k1 = self.trunc(self.op("Mul", k, self.const(1.0 / 3.0)))
        rest = self.op("Sub", k, k1)
        k2 = self.trunc(self.op("Mul", rest, self.const(0.5)))
        k3 = self.op("Sub", rest, k2)
        out = self.op("Mul", t, self.pow2(k1))
        out = self.op("Mul", out, self.pow2(k2))
        return self.op("Mul", out, self.pow2(k3))

    def exponent(self, amax: ir.Value) -> ir.Value:
        """Scale exponent of a group from its largest magnitude (0-groups get -126)."""
        return self.clip(self.floor_log2(amax), -BOUND, BOUND)

    def to_f32(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        return x if dtype == F32 else self.op("Cast", x, to=F32)

    def from_f32(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        return x if dtype == F32 else self.op("Cast", x, to=dtype)


# ---------------------------------------------------------------------------------------------- statistics
def _eps_parts(eps: float) -> tuple[float, int, float]:
    """``eps = m * 2**q`` exactly, and the exponent ``h_eps`` where ``eps`` sits (``-inf`` for 0)."""
    m, q = math.frexp(eps)
    h = math.floor((q - 1) / 2) if eps != 0 else -math.inf
    return m, q, h


def _inv_std_scaled(g: Builder, c: ir.Value, a: ir.Value, e: ir.Value, eps: float, stats: list | None = None) -> ir.Value:
    """``x_hat = c * 2**e / sqrt(a * 4**e + eps)`` for centred scaled data ``c`` with mean square ``a``
    (both in units of ``2**e``), as ``c * rsqrt(u) * 2**(e - h)`` (see :func:`normkit._stats.inv_std`).
    When ``stats`` is a list, ``1 / sqrt(var + eps) = rsqrt(u) * 2**-h`` is appended to it."""
    eps_m, eps_q, h_eps = _eps_parts(eps)
    h = g.op("Add", e, g.floor_log2(a, half=True))  # -inf for a constant group
    if eps != 0:
        h = g.op("Max", h, g.const(float(h_eps)))
    h = g.clip(h, -3 * BOUND, 3 * BOUND)
    e_h = g.op("Sub", e, h)
    u = g.mul_pow2(a, g.op("Mul", e_h, g.const(2.0)))
    if eps != 0:
        u = g.op("Add", u, g.mul_pow2(g.const(eps_m), g.op("Sub", g.const(float(eps_q)), g.op("Mul", h, g.const(2.0)))))
    r = g.op("Div", g.const(1.0), g.op("Sqrt", u))
    if stats is not None:
        stats.append(g.mul_pow2(r, g.op("Neg", h)))
    x_hat = g.mul_pow2(g.op("Mul", c, r), e_h)
    if eps == 0:  # a constant group with eps = 0 is 0/0: normkit answers 0
        x_hat = g.op("Where", g.op("Equal", u, g.const(0.0)), g.const(0.0), x_hat)
    return x_hat


def standardize(g: Builder, x: ir.Value, axes: Sequence[int], eps: float, center: bool = True,
                stats: list | None = None) -> ir.Value:
    """``(x - mean) / sqrt(var + eps)`` (or ``x / sqrt(mean(x**2) + eps)``) over ``axes``; float32 in and out.
    When ``stats`` is a list (centred only), the group's mean and inverse standard deviation (keepdim
    shape, float32) are appended to it, as LayerNormalization's optional outputs."""
    amax = g.reduce("ReduceMax", g.op("Abs", x), axes)
    e = g.exponent(amax)
    y = g.op("Mul", x, g.pow2(g.op("Neg", e)))  # exact: a power of two
    if center:
        n = len(axes)
        pivot = g.op("Slice", y, g.ints([0] * n), g.ints([1] * n), g.ints(axes))
        d = g.op("Sub", y, pivot)  # exact near the pivot; a constant group gives 0
        mean_d = g.reduce("ReduceMean", d, axes)
        c = g.op("Sub", d, mean_d)
        if stats is not None:
            stats.append(g.mul_pow2(g.op("Add", pivot, mean_d), e))
    else:
        c = y
    a = g.reduce("ReduceMean", g.op("Mul", c, c), axes)
    return _inv_std_scaled(g, c, a, e, eps, stats)


def _affine(g: Builder, y: ir.Value, scale: ir.Value | None, bias: ir.Value | None, dtype) -> ir.Value:
    if scale is not None:
        y = g.op("Mul", y, g.to_f32(scale, dtype))
    if bias is not None:
        y = g.op("Add", y, g.to_f32(bias, dtype))
    return y


# ---------------------------------------------------------------------------------------------- operators
def layer_norm(g: Builder, x, scale, bias, axes: Sequence[int], eps: float, dtype, stats: list | None = None) -> ir.Value:
    """LayerNormalization over ``axes`` (negative, trailing): ``standardize(x) * scale + bias``
    (``stats``: see :func:`standardize`)."""
    y = standardize(g, g.to_f32(x, dtype), axes, eps, stats=stats)
    return g.from_f32(_affine(g, y, scale, bias, dtype), dtype)


def rms_norm(g: Builder, x, scale, axes: Sequence[int], eps: float, dtype) -> ir.Value:
    """RMSNormalization over ``axes``: ``x / sqrt(mean(x**2) + eps) * scale``."""
    y = standardize(g, g.to_f32(x, dtype), axes, eps, center=False)
    return g.from_f32(_affine(g, y, scale, None, dtype), dtype)


def _channel_view(g: Builder, v: ir.Value) -> ir.Value:
    """A per-channel vector ``(C,)`` as ``(C, 1)`` to broadcast against ``(N, C, S)``."""
    return g.op("Unsqueeze", v, g.ints([1])) if g.opset >= 13 else g.op("Unsqueeze", v, axes=[1])


def group_norm(g: Builder, x, scale, bias, num_groups: int, eps: float, dtype, per_channel: bool = True) -> ir.Value:
    """GroupNormalization of ``(N, C, *)``: statistics per ``(n, group)``; ``scale``/``bias`` per channel
    (opset 21, torch) or per group (opset 18) when ``per_channel`` is False. ``num_groups=0`` means one
    group per channel (InstanceNormalization)."""
    shape = g.op("Shape", x)
    xf = g.to_f32(x, dtype)
    if num_groups == 0:
        y = standardize(g, g.op("Reshape", xf, g.ints([0, 0, -1])), [2], eps)
    else:
        y = standardize(g, g.op("Reshape", xf, g.ints([0, num_groups, -1])), [2], eps)
        if scale is not None or bias is not None:
            if per_channel:
                y = g.op("Reshape", g.op("Reshape", y, shape), g.ints([0, 0, -1]))
    if scale is not None:
        y = g.op("Mul", y, _channel_view(g, g.to_f32(scale, dtype)))
    if bias is not None:
        y = g.op("Add", y, _channel_view(g, g.to_f32(bias, dtype)))
    return g.from_f32(g.op("Reshape", y, shape), dtype)


def batch_norm_inference(g: Builder, x, scale, bias, mean, var, eps: float, dtype) -> ir.Value:
    """BatchNormalization with given statistics, channel axis 1 (as
    :func:`normkit._stats.normalize_with_stats`): ``rsqrt(var + eps)`` in float32, ``x - mean`` taken in
    halves where it would overflow, then ``* scale + bias``."""
    shape = g.op("Shape", x)
    xr = g.op("Reshape", g.to_f32(x, dtype), g.ints([0, 0, -1]))
    m = _channel_view(g, g.to_f32(mean, dtype))
    rstd = g.op("Div", g.const(1.0), g.op("Sqrt", g.op("Add", _channel_view(g, g.to_f32(var, dtype)), g.const(eps))))
    diff = g.op("Sub", xr, m)
    halved = g.op("Mul", g.op("Mul", g.op("Sub", g.op("Mul", xr, g.const(0.5)), g.op("Mul", m, g.const(0.5))), rstd), g.const(2.0))
    y = g.op("Where", g.op("IsInf", diff), halved, g.op("Mul", diff, rstd))
    if scale is not None:
        y = g.op("Mul", y, _channel_view(g, g.to_f32(scale, dtype)))
    if bias is not None:
        y = g.op("Add", y, _channel_view(g, g.to_f32(bias, dtype)))
    return g.from_f32(g.op("Reshape", y, shape), dtype)


def lrn(g: Builder, x, size: int, alpha_over_n: float, beta: float, k: float, lo: int, hi: int, dtype) -> ir.Value:
    """Local response normalization across channels (axis 1 of ``(N, C, *)``) with the window
    ``[c - lo, c + hi]`` (zero-padded): ``y = x * (k + c * sum_W x**2) ** -beta``, ``c = alpha_over_n``.

    Each element's window is scaled by ``2**-e`` from the window's own largest magnitude, so the squares
    lie in [0, 4) and their sum in [1, 4 n]; ``d = 4**h * u`` with ``h`` where ``k`` and ``c * S`` meet, and
    ``y = (x 2**-e) * u**-beta * 2**(e - 2 h beta)``. A zero window with ``k = 0`` (0/0) gives 0.
    """
    n = lo + hi + 1
    shape = g.op("Shape", x)
    xr = g.op("Reshape", g.to_f32(x, dtype), g.ints([0, 0, -1]))
    pads = g.ints([0, lo, 0, 0, hi, 0])

    def windows(t):  # the n shifted copies t[c + o - lo], o = 0..n-1, zero outside
        p = g.op("Pad", t, pads) if g.opset >= 11 else g.op("Pad", t, pads=[0, lo, 0, 0, hi, 0])
        return [g.op("Slice", p, g.ints([o]), g.ints([o - (n - 1) if o < n - 1 else INT64_MAX]), g.ints([1]))
                for o in range(n)]

    ax = g.op("Abs", xr)
    wmax = windows(ax)
    wmax = wmax[0] if n == 1 else g.op("Max", *wmax)
    e = g.exponent(wmax)
    s = g.pow2(g.op("Neg", e))
    terms = []
    for t in windows(xr):
        ts = g.op("Mul", t, s)
        terms.append(g.op("Mul", ts, ts))
    S = terms[0] if n == 1 else g.op("Sum", *terms)
    cs = g.op("Mul", S, g.const(alpha_over_n))
    k_m, k_q, h_k = _eps_parts(k)
    h = g.op("Add", e, g.floor_log2(cs, half=True))
    if k != 0:
        h = g.op("Max", h, g.const(float(h_k)))
    h = g.clip(h, -3 * BOUND, 3 * BOUND)
    u = g.mul_pow2(cs, g.op("Mul", g.op("Sub", e, h), g.const(2.0)))
    if k != 0:
        u = g.op("Add", u, g.mul_pow2(g.const(k_m), g.op("Sub", g.const(float(k_q)), g.op("Mul", h, g.const(2.0)))))
    ys = g.op("Mul", xr, s)
    core = g.op("Mul", ys, g.op("Pow", u, g.const(-float(beta))))
    y = g.mul_pow2(core, g.op("Sub", e, g.op("Mul", h, g.const(2.0 * beta))))
    if k == 0:
        y = g.op("Where", g.op("Equal", u, g.const(0.0)), g.const(0.0), y)
    return g.from_f32(g.op("Reshape", y, shape), dtype)
