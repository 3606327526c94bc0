"""Robust normalization subgraphs built from primitive ONNX operators: :mod:`normkit._spec` transliterated to
ONNX, step for step, in the same product order and with the same scaling. Both :func:`normkit.harden_onnx`
and :func:`normkit.export_onnx` (``decompose=True``) emit these, and the conformance suite runs them in ONNX
Runtime and in ``onnx.reference`` against the spec on the shared case registry.

Every builder takes a :class:`Builder` (which appends nodes to an ``onnx_ir`` graph) and ``onnx_ir``
values, and returns the output value. Each :class:`Builder` method named after a spec function builds that
function (:meth:`Builder.floor_log2`, :meth:`~Builder.exponent`, :meth:`~Builder.mul_pow2`,
:meth:`~Builder.frexp`, :meth:`~Builder.scaled_sum`, :meth:`~Builder.power_pair`, :meth:`~Builder.inv_std`,
:meth:`~Builder.apply_factor`); the operator builders compose them as the spec does:

* :func:`standardize` is ``moments`` then ``standardize_from_moments`` (``layer_norm``, ``rms_norm`` and
  ``group_norm`` add the spec's ``affine``);
* :func:`affine_with_stats` is ``affine_with_stats``: ``weight * rstd`` one split factor (``eval_factor``)
  applied to ``x - mean`` (``centered``) by ``apply_factor``; :func:`batch_norm_inference` (channel axis 1)
  and :func:`batch_norm_given` (statistics broadcast as the graph holds them) apply it;
* :func:`lrn` is ``local_response_norm.py``'s robust forward: ``frexp`` pairs, the squares' window sum
  aligned to its largest exponent, ``scaled_sum``, ``power_pair``.

Statistics are computed in float32 (a float16 input is cast up inside the subgraph, the output cast back);
no float64 anywhere. Exponents are exact (``floor_log2`` corrects ``Log``'s rounding at powers of two), so
the subgraphs scale by the same powers of two as the spec. No data-dependent control flow: selections are
``Where``/``Max``/``Clip``. The subgraphs need opset 11 or later (``Clip`` and ``Pad`` with inputs);
reductions take ``axes`` as an attribute below opset 18 and as an input from 18 on.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx_ir as ir

F32 = ir.DataType.FLOAT
BOUND = 126.0  # 2**126 and 2**-126 are normal float32 numbers: _spec.max_exponent(float32)
INV_LN2 = 1.0 / math.log(2.0)
INT64_MAX = np.iinfo(np.int64).max
NO_EXPONENT = -1.0e4  # local_response_norm._NO_EXPONENT: the exponent of a zero (and of padding)


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

    def clip(self, v: ir.Value, lo: float, hi: float) -> ir.Value:
        return self.op("Clip", v, self.const(lo), self.const(hi))

    def pow2(self, k: ir.Value) -> ir.Value:
        """``2**k`` (exact for integer-valued ``k`` in the float32 range)."""
        return self.op("Pow", self.const(2.0), k)

    def trunc(self, v: ir.Value) -> ir.Value:
        return self.op("Mul", self.op("Sign", v), self.op("Floor", self.op("Abs", v)))

    def mul(self, a: ir.Value, b) -> ir.Value:
        return self.op("Mul", a, b if isinstance(b, ir.Value) else self.const(b))

    def add(self, a: ir.Value, b) -> ir.Value:
        return self.op("Add", a, b if isinstance(b, ir.Value) else self.const(b))

    def sub(self, a, b) -> ir.Value:
        return self.op("Sub", a if isinstance(a, ir.Value) else self.const(a), b if isinstance(b, ir.Value) else self.const(b))

    def as_float(self, cond: ir.Value) -> ir.Value:
        return self.op("Cast", cond, to=F32)

    def to_f32(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        return x if dtype == F32 else self.op("Cast", x, to=F32)

    def from_f32(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        return x if dtype == F32 else self.op("Cast", x, to=dtype)

    # ------------------------------------------------------------------ the spec's exact powers of two
    def floor_log2(self, a: ir.Value) -> ir.Value:
        """:func:`normkit._spec.floor_log2`: ``floor(log(a) / ln 2)`` corrected by one comparison each way, so it
        is exact (``-inf`` for 0)."""
        e = self.op("Floor", self.mul(self.op("Log", a), INV_LN2))
        up = self.as_float(self.op("Not", self.op("Less", a, self.pow2(self.add(e, 1.0)))))  # a >= 2**(e + 1)
        down = self.as_float(self.op("Less", a, self.pow2(e)))  # a < 2**e
        return self.sub(self.add(e, up), down)

    def exponent(self, amax: ir.Value) -> ir.Value:
        """:func:`normkit._spec.exponent` of a non-negative value: clamped to [-126, 126] (0 gets -126)."""
        return self.clip(self.floor_log2(amax), -BOUND, BOUND)

    def mul_pow2(self, t: ir.Value, k: ir.Value) -> ir.Value:
        """:func:`normkit._spec.mul_pow2`: ``t * 2**k`` in three factors of the same sign, each a normal power of
        two, so every intermediate lies between ``t`` and the result."""
        k = self.clip(k, -3 * BOUND, 3 * BOUND)
        k1 = self.trunc(self.op("Div", k, self.const(3.0)))
        k2 = self.trunc(self.op("Div", self.sub(k, k1), self.const(2.0)))
        k3 = self.sub(self.sub(k, k1), k2)
        return self.mul(self.mul(self.mul(t, self.pow2(k1)), self.pow2(k2)), self.pow2(k3))

    def frexp(self, t: ir.Value) -> tuple[ir.Value, ir.Value]:
        """:func:`normkit._spec.frexp`: ``t = m * 2**e``, ``1/2 <= |m| < 1`` (``e = 0`` for 0, inf, NaN)."""
        a = self.op("Abs", t)
        finite = self.op("Not", self.op("Or", self.op("IsInf", a), self.op("IsNaN", a)))
        normal = self.op("And", self.op("Greater", a, self.const(0.0)), finite)
        e = self.op("Where", normal, self.add(self.floor_log2(self.op("Where", normal, a, self.const(1.0))), 1.0),
                    self.const(0.0))
        return self.mul_pow2(t, self.op("Neg", e)), e

    def apply_factor(self, v: ir.Value, m: ir.Value, q: ir.Value) -> ir.Value:
        """:func:`normkit._spec.apply_factor`: ``v * m * 2**q``, ``v`` scaled by ``2**-4`` first where ``q < 0``."""
        s = self.mul(self.as_float(self.op("Less", q, self.const(0.0))), 4.0)
        return self.mul_pow2(self.mul(self.mul(v, self.pow2(self.op("Neg", s))), m), self.add(q, s))

    # ------------------------------------------------------------------ the spec's standardization steps
    def scaled_sum(self, a: ir.Value, p: ir.Value, eps: float) -> tuple[ir.Value, ir.Value]:
        """:func:`normkit._spec.scaled_sum`: ``a * 2**p + eps = 4**h * u`` with ``h`` where the two terms meet."""
        eps_m, eps_q = math.frexp(eps)
        h = self.op("Floor", self.mul(self.add(p, self.floor_log2(a)), 0.5))  # -inf for a = 0
        if eps != 0:
            h = self.op("Max", h, self.const(float(math.floor((eps_q - 1) / 2))))
        h = self.clip(h, -3 * BOUND, 3 * BOUND)
        u = self.mul_pow2(a, self.sub(p, self.mul(h, 2.0)))
        if eps != 0:
            u = self.add(u, self.mul_pow2(self.const(eps_m), self.sub(float(eps_q), self.mul(h, 2.0))))
        return u, h

    def power_pair(self, u: ir.Value, h: ir.Value, power: float) -> tuple[ir.Value, ir.Value]:
        """:func:`normkit._spec.power_pair`: ``(4**h u) ** power`` as mantissa and integer exponent, the exponent
        ``2 h power`` split exactly (a short head of ``power`` times ``2 h`` is exact)."""
        if power == -0.5:
            return self.op("Div", self.const(1.0), self.op("Sqrt", u)), self.op("Neg", h)
        m, q = math.frexp(power)
        head = math.ldexp(round(math.ldexp(m, 10)), q - 10)
        t = self.mul(h, 2 * head)  # exact
        whole = self.op("Floor", t)
        frac = self.add(self.sub(t, whole), self.mul(h, 2 * (power - head)))
        return self.mul(self.op("Pow", u, self.const(float(power))), self.pow2(frac)), whole

    def inv_std(self, a: ir.Value, e: ir.Value, eps: float) -> tuple[ir.Value, ir.Value]:
        """:func:`normkit._spec.inv_std`: ``1 / sqrt(a * 4**e + eps) = r * 2**k``."""
        return self.power_pair(*self.scaled_sum(a, self.mul(e, 2.0), eps), -0.5)


# ---------------------------------------------------------------------------------------------- operators
def standardize(g: Builder, x: ir.Value, axes: Sequence[int], eps: float, center: bool = True,
                stats: list | None = None) -> ir.Value:
    """``(x - mean) / sqrt(var + eps)`` (or ``x / sqrt(mean(x**2) + eps)``) over ``axes``; float32 in and out:
    :func:`normkit._spec.moments` then :func:`~normkit._spec.standardize_from_moments`. When ``stats`` is a
    list (centred only), the group's mean and inverse standard deviation (keepdim shape, float32) are
    appended to it, as LayerNormalization's optional outputs."""
    e = g.exponent(g.reduce("ReduceMax", g.op("Abs", x), axes))
    y = g.mul(x, g.pow2(g.op("Neg", e)))  # exact: a power of two
    if center:
        n = len(axes)
        pivot = g.op("Slice", y, g.ints([0] * n), g.ints([1] * n), g.ints(axes))
        d = g.sub(y, pivot)  # exact near the pivot; a constant group gives 0
        mean_d = g.reduce("ReduceMean", d, axes)
        c = g.sub(d, mean_d)
    else:
        c = y
    a = g.reduce("ReduceMean", g.mul(c, c), axes)  # m2 / n
    r, k = g.inv_std(a, e, eps)
    if stats is not None:
        stats.append(g.mul_pow2(g.add(pivot, mean_d), e))  # Moments.mean_x
        stats.append(g.mul_pow2(r, k))  # rstd
    # a constant group with eps = 0 is 0/0: 0 * inf gives NaN there, as normkit's and torch's layer norm do
    return g.mul_pow2(g.mul(c, r), g.add(k, e))


def _affine(g: Builder, y: ir.Value, scale: ir.Value | None, bias: ir.Value | None, dtype) -> ir.Value:
    """:func:`normkit._spec.affine`."""
    if scale is not None:
        y = g.mul(y, g.to_f32(scale, dtype))
    if bias is not None:
        y = g.add(y, g.to_f32(bias, dtype))
    return y


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
        y = g.mul(y, _channel_view(g, g.to_f32(scale, dtype)))
    if bias is not None:
        y = g.add(y, _channel_view(g, g.to_f32(bias, dtype)))
    return g.from_f32(g.op("Reshape", y, shape), dtype)


def affine_with_stats(g: Builder, x, scale, bias, mean, var, eps: float) -> ir.Value:
    """:func:`normkit._spec.affine_with_stats` on float32 values: ``scale``, ``bias``, ``mean`` and ``var``
    broadcast against ``x`` as given (``scale``/``bias`` may be None).

    ``rstd = r * 2**k`` (``inv_std`` of ``var`` with ``e = 0``), ``scale * rstd`` split as ``m * 2**q``
    (``eval_factor``), ``x - mean`` taken in halves where it overflows (``centered``), then
    ``apply_factor`` and ``+ bias``: ``(x - mean) * rstd`` is never formed, so ``x = 1e30``,
    ``var = 1e-20``, ``scale = 1e-20`` gives 1e20 (it used to give inf: ``1e40`` before the weight)."""
    r, k = g.inv_std(var, g.const(0.0), eps)
    if scale is not None:
        ew = g.exponent(g.op("Abs", scale))
        m, q = g.mul(g.mul(scale, g.pow2(g.op("Neg", ew))), r), g.add(ew, k)
    else:
        m, q = r, k
    diff = g.sub(x, mean)
    overflow = g.op("And", g.op("IsInf", diff), g.op("Not", g.op("Or", g.op("IsInf", x), g.op("IsInf", mean))))
    d = g.op("Where", overflow, g.sub(g.mul(x, 0.5), g.mul(mean, 0.5)), diff)
    y = g.apply_factor(d, m, g.add(q, g.as_float(overflow)))
    return y if bias is None else g.add(y, bias)


def batch_norm_inference(g: Builder, x, scale, bias, mean, var, eps: float, dtype) -> ir.Value:
    """BatchNormalization with given statistics, channel axis 1: :func:`affine_with_stats` on the
    ``(N, C, -1)`` view with each per-channel vector as ``(C, 1)``."""
    shape = g.op("Shape", x)
    xr = g.op("Reshape", g.to_f32(x, dtype), g.ints([0, 0, -1]))

    def channel(v):
        return None if v is None else _channel_view(g, g.to_f32(v, dtype))

    y = affine_with_stats(g, xr, channel(scale), channel(bias), channel(mean), channel(var), eps)
    return g.from_f32(g.op("Reshape", y, shape), dtype)


def batch_norm_given(g: Builder, x, scale, bias, mean, var, eps: float, dtype) -> ir.Value:
    """A batch norm with given statistics whose ``scale``, ``bias``, ``mean`` and ``var`` broadcast against
    ``x`` as the graph holds them (TensorFlow's channels-last ``(C,)`` vectors): :func:`affine_with_stats`."""
    def f32(v):
        return None if v is None else g.to_f32(v, dtype)

    return g.from_f32(affine_with_stats(g, f32(x), f32(scale), f32(bias), f32(mean), f32(var), eps), dtype)


def _shifted(g: Builder, t: ir.Value, axis: int, offset: int, rank: int, fill: float) -> ir.Value:
    """``out[i] = t[i + offset]`` along ``axis`` of a rank-``rank`` value, ``fill`` outside (Pad + Slice)."""
    if offset == 0:
        return t
    n = abs(offset)
    pads = [0] * (2 * rank)
    pads[axis if offset < 0 else rank + axis] = n
    p = g.op("Pad", t, g.ints(pads), g.const(fill))
    start = 0 if offset < 0 else n
    end = -n if offset < 0 else INT64_MAX
    return g.op("Slice", p, g.ints([start]), g.ints([end]), g.ints([axis]))


def _pair_window_sum(g: Builder, m: ir.Value, p: ir.Value, axes, lo: int, hi: int, rank: int):
    """``local_response_norm._pair_window_sum``: ``sum_{j in W(i)} m_j * 2**p_j`` as a pair, every term aligned
    to the window's largest exponent (one dim at a time)."""
    for axis in axes:
        offsets = range(-lo, hi + 1)
        sp = [_shifted(g, p, axis, o, rank, NO_EXPONENT) for o in offsets]
        big = sp[0] if len(sp) == 1 else g.op("Max", *sp)
        terms = [g.mul(_shifted(g, m, axis, o, rank, 0.0), g.pow2(g.sub(s, big))) for o, s in zip(offsets, sp)]
        m = terms[0] if len(terms) == 1 else g.op("Sum", *terms)
        p = big
    return m, p


def lrn(g: Builder, x, size: int, alpha_over_n: float, beta: float, k: float, lo: int, hi: int, dtype,
        within_channel: bool = False) -> ir.Value:
    """Local response normalization across channels (axis 1 of ``(N, C, *)``) with the window
    ``[c - lo, c + hi]`` (zero-padded): ``y = x * (k + c * sum_W x**2) ** -beta``, ``c = alpha_over_n``;
    with ``within_channel`` (Caffe), the window is the square ``[h - lo, h + hi] x [w - lo, w + hi]`` of a
    4-D ``(N, C, H, W)`` input.

    ``local_response_norm._robust_forward`` operator for operator: ``x = xm * 2**xe`` (``frexp``), the
    squares ``xm**2 * 2**(2 xe)`` summed over the window aligned to its largest exponent, ``d = 4**h * u``
    (``scaled_sum``), ``d**-beta`` as ``power_pair`` and ``y = (xm * dm) * 2**(xe + dp)``. A zero window
    with ``k = 0`` (0/0) gives 0.
    """
    shape = g.op("Shape", x)
    if within_channel:
        xr, axes, rank = g.to_f32(x, dtype), [2, 3], 4
    else:
        xr, axes, rank = g.op("Reshape", g.to_f32(x, dtype), g.ints([0, 0, -1])), [1], 3
    xm, xe = g.frexp(xr)
    sq = g.mul(xm, xm)
    sq_p = g.op("Where", g.op("Equal", sq, g.const(0.0)), g.const(NO_EXPONENT), g.mul(xe, 2.0))  # local_response_norm._pair
    s_m, s_p = _pair_window_sum(g, sq, sq_p, axes, lo, hi, rank)
    u, h = g.scaled_sum(g.mul(s_m, alpha_over_n), s_p, k)
    dm, dp = g.power_pair(u, h, -float(beta))
    y = g.mul_pow2(g.mul(xm, dm), g.add(xe, dp))
    y = g.op("Where", g.op("Equal", u, g.const(0.0)), g.const(0.0), y)
    return g.from_f32(y if within_channel else g.op("Reshape", y, shape), dtype)
