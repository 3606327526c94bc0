"""Robust statistics: the one place where normkit computes moments and inverse standard deviations.

Every normalization in normkit reduces some *groups* of elements (a channel over the batch, a row of a
layer, a group of channels, ...) to a mean and a variance (or a mean square) and then standardizes them.
Done naively in the input's precision this fails in three ways (measured in torch 2.13, see NUMERICS.md):
the sum of squares overflows (float32 |x| > ~1.8e19), ``E[x^2] - E[x]^2`` cancels catastrophically when
the mean is large against the spread, and ``eps`` or ``1/sqrt(var + eps)`` leaves the dtype's range.

Precision policy (applies to every operator):

* **Compute dtype** ``ct``: float32 for float16 / bfloat16 / float32 inputs, float64 for float64.
  No float64 arithmetic is ever used for lower-precision inputs (accelerators lack it).
* **Exact scaling.** Each group is multiplied by ``2**-e`` with ``e = floor(log2 max|x|)`` (clamped so
  that ``2**e`` and ``2**-e`` are normal numbers). Multiplying by a power of two is exact, and the scaled
  values ``y`` lie in ``(-2, 2)``, so their squares cannot overflow.
* **Shift by a pivot.** ``d = y - p`` where ``p`` is the group's first element. When the group sits at a
  large offset over a small spread, ``y`` and ``p`` are within a factor of two and the subtraction is
  exact (Sterbenz); a constant group gives exactly ``d = 0``.
* **Two-pass moments of the shifted data**: ``mean_d = sum(d) / n``, ``m2 = sum((d - mean_d)**2)``.
* **Inverse standard deviation as ``r * 2**k``** (:func:`inv_std`): the exponent ``k`` is chosen per group
  so that ``var`` and ``eps`` meet at a common scale where neither can overflow.
* **Products as mantissa and exponent** (:func:`mul_product`): with given statistics (eval mode),
  ``(x - mean) * weight * rstd`` multiplies the factors' mantissas and applies the summed exponent last, so
  no partial product (``x_hat``, ``weight * rstd``) overflows where the result is finite.

Statistics are carried as :class:`Moments` (count, exponent, pivot, shifted mean, M2). Two Moments of
disjoint parts of a group merge exactly like Chan et al.'s parallel variance (:func:`merge_moments`),
which is what SyncBatchNorm uses across ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

Dims = Sequence[int]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for ``dtype``: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# torch's autocast runs these ops in float32 on these devices (its float32 cast lists), for inputs of at
# least this many dims: (device, op) -> min dims. Measured: CUDA float16 autocast with torch 2.11 (layer and
# group norm; LRN, whose `pow` is listed), CPU bfloat16 autocast with torch 2.13 (LRN of 4 or more dims,
# whose `avg_pool3d` is listed). normkit's ops return the dtype torch's return.
AUTOCAST_FLOAT32 = {("cuda", "layer_norm"): 0, ("cuda", "group_norm"): 0,
                    ("cuda", "local_response_norm"): 0, ("cpu", "local_response_norm"): 4}


def autocast_inputs(op: str, *tensors):
    """``tensors`` as torch's autocast hands them to ``op``: float16/bfloat16 tensors cast to float32 where
    autocast is on for the first tensor's device and lists ``op`` there (:data:`AUTOCAST_FLOAT32`), the rest
    unchanged (``None`` stays ``None``; float64 is never cast, as in torch). Half inputs compute in float32
    anyway, so casting up front costs no accuracy."""
    x = tensors[0]
    if not isinstance(x, Tensor):
        return tensors
    min_dim = AUTOCAST_FLOAT32.get((x.device.type, op))
    if min_dim is None or x.dim() < min_dim or not torch.is_autocast_enabled(x.device.type):
        return tensors
    return tuple(t.float() if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)


def _max_exponent(dtype: torch.dtype) -> int:
    """Largest ``E`` such that ``2**E`` and ``2**-E`` are both normal in ``dtype`` (126 for float32)."""
    return -int(math.log2(torch.finfo(dtype).tiny))


def exponent(t: Tensor) -> Tensor:
    """``floor(log2 |t|)`` elementwise, clamped so that ``2**e`` and ``2**-e`` are normal (0 gets the minimum).

    A detached float tensor of integers: scaling by ``2**-e`` is exact and piecewise constant, so it carries
    no gradient.
    """
    bound = _max_exponent(t.dtype)
    return torch.floor(torch.log2(t.detach().abs())).clamp(-bound, bound)


def group_exponent(x: Tensor, dims: Dims) -> Tensor:
    """``e = floor(log2(max |x|))`` over ``dims`` (keepdim): :func:`exponent` of each group's largest value."""
    return exponent(x.detach().abs().amax(dim=tuple(dims), keepdim=True))


def mul_pow2(t: Tensor, k: Tensor) -> Tensor:
    """``t * 2**k`` for integer-valued ``k``, exact up to the final rounding, for every ``k``.

    The factor is applied in three parts of the same sign, each a normal power of two, so every
    intermediate lies between ``t`` and the result. ``|k|`` is clamped at three times the exponent range,
    past which ``t * 2**k`` overflows or underflows for any finite ``t`` anyway.
    """
    bound = _max_exponent(t.dtype)
    k = k.clamp(-3 * bound, 3 * bound)
    k1 = torch.trunc(k / 3)
    k2 = torch.trunc((k - k1) / 2)
    return t * torch.exp2(k1) * torch.exp2(k2) * torch.exp2(k - k1 - k2)


def first(x: Tensor, dims: Dims) -> Tensor:
    """The first element of each group (keepdim shape): the pivot of the shifted moments."""
    for d in dims:
        x = x.narrow(d, 0, 1)
    return x


def group_size(x: Tensor, dims: Dims) -> int:
    """Number of elements reduced into each group."""
    return math.prod([x.shape[d] for d in dims])


class Moments(NamedTuple):
    """Moments of groups of data, kept in scaled, shifted form so that merging stays exact.

    With ``y = x * 2**-exponent``: ``mean_y = pivot + mean``, ``sum((y - mean_y)**2) = m2``.
    All tensors have the keepdim shape of the reduction; ``count`` is a Python int or a tensor.
    """

    count: int | Tensor
    exponent: Tensor
    pivot: Tensor
    mean: Tensor
    m2: Tensor

    def mean_x(self) -> Tensor:
        """Mean in the data's units: ``(pivot + mean) * 2**exponent``."""
        return mul_pow2(self.pivot + self.mean, self.exponent)

    def var_x(self, unbiased: bool = False) -> Tensor:
        """Variance in the data's units (``inf`` only where it exceeds the dtype, as float64 would say)."""
        n = self.count - 1 if unbiased else self.count
        return mul_pow2(self.m2 / n, 2 * self.exponent)


def moments(x: Tensor, dims: Dims) -> tuple[Moments, Tensor]:
    """Robust moments of ``x`` over ``dims`` (``x`` already in the compute dtype).

    Returns the :class:`Moments` and the centred scaled data ``c = y - mean_y`` (shape of ``x``), which
    the caller normalizes with :func:`inv_std`.
    """
    e = group_exponent(x, dims)
    y = x * torch.exp2(-e)  # exact: a power-of-two scale
    pivot = first(y, dims)
    d = y - pivot  # exact when the group's values are near the pivot; a constant group gives 0
    n = group_size(x, dims)
    mean = d.sum(dim=tuple(dims), keepdim=True) / n
    c = d - mean  # two-pass: the second moment of small, centred numbers
    m2 = (c * c).sum(dim=tuple(dims), keepdim=True)
    return Moments(n, e, pivot, mean, m2), c


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint parts of the same groups (Chan et al.'s parallel update).

    Both sides are first brought to the larger exponent (an exact power-of-two rescale, except for
    values far below the group's maximum, which cannot matter). The difference of the two means is taken
    as ``(pivot_b - pivot_a) + (mean_b - mean_a)``: the pivots are exact data values, so at a large common
    offset their difference is exact and no precision is lost to the offset.
    """
    e = torch.maximum(a.exponent, b.exponent)
    sa, sb = a.exponent - e, b.exponent - e  # <= 0: scale down into the common units
    pa, ma, m2a = mul_pow2(a.pivot, sa), mul_pow2(a.mean, sa), mul_pow2(a.m2, 2 * sa)
    pb, mb, m2b = mul_pow2(b.pivot, sb), mul_pow2(b.mean, sb), mul_pow2(b.m2, 2 * sb)
    n = a.count + b.count
    delta = (pb - pa) + (mb - ma)
    fb = b.count / n
    return Moments(n, e, pa, ma + delta * fb, m2a + m2b + delta * delta * (a.count * fb))


def inv_std(a: Tensor, e: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``1 / sqrt(a * 4**e + eps)`` as ``r * 2**k``, where ``a`` is a variance (or mean square) of data
    scaled by ``2**-e``; ``r`` is in ``[1/3, 2]`` and ``k`` an integer-valued tensor.

    With ``h ~ log2(max(std, sqrt(eps)))`` per group (``std = sqrt(a) * 2**e``)::

        1 / sqrt(a * 4**e + eps) = 2**-h / sqrt(a * 4**(e - h) + eps * 4**-h)

    and both terms under the root are at most about 4, so neither can overflow; whichever underflows is
    negligible against the other. ``eps`` enters as its exact ``mantissa * 2**exponent``, so even an eps
    below the compute dtype's range is honoured. Only ``a = 0`` with ``eps = 0`` gives ``inf`` (0/0 groups).
    """
    bound = _max_exponent(a.dtype)
    eps_m, eps_q = math.frexp(eps)  # eps = eps_m * 2**eps_q exactly
    h_eps = math.floor((eps_q - 1) / 2) if eps != 0 else -math.inf
    h_a = e + torch.floor(torch.log2(a.detach()) * 0.5)  # -inf for a constant group
    h = torch.clamp(torch.clamp(h_a, min=h_eps), -3 * bound, 3 * bound)
    u = mul_pow2(a, 2 * (e - h)) + mul_pow2(torch.full_like(a, eps_m), eps_q - 2 * h)
    return torch.rsqrt(u), -h


class Standardized(NamedTuple):
    """Output of :func:`standardize`. ``x_hat`` has the input's shape, the rest the keepdim shape.

    ``rstd = r * 2**k`` is the inverse standard deviation in the data's units; ``mean`` and ``var``
    (biased; the mean square when not centred) are in the data's units too.
    """

    x_hat: Tensor
    r: Tensor
    k: Tensor
    mean: Tensor
    var: Tensor
    count: int


def standardize(x: Tensor, dims: Dims, eps: float, center: bool = True) -> Standardized:
    """``x_hat = (x - mean) / sqrt(var + eps)`` over ``dims`` (or ``x / sqrt(mean(x**2) + eps)`` when
    ``center`` is False), computed in the compute dtype of ``x`` without any overflow.

    ``x`` must already be in its compute dtype (see :func:`compute_dtype`). Written in differentiable
    torch ops: autograd through it is exact (the scale exponents are detached constants).
    """
    n = group_size(x, dims)
    if center:
        m, c = moments(x, dims)
        e, a = m.exponent, m.m2 / n
        mean, var = m.mean_x(), m.var_x()
    else:
        e = group_exponent(x, dims)
        c = x * torch.exp2(-e)  # exact scaling; no shift for a mean square
        a = (c * c).sum(dim=tuple(dims), keepdim=True) / n
        mean, var = torch.zeros_like(a), mul_pow2(a, 2 * e)
    r, k = inv_std(a, e, eps)
    x_hat = mul_pow2(c * r, k + e)  # c is in units of 2**e, r in units of 2**k
    return Standardized(x_hat, r, k, mean, var, n)


def standardize_backward(g: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, dims: Dims, center: bool = True) -> Tensor:
    """Gradient of :func:`standardize` given ``g = dL/dx_hat`` (all in the compute dtype):

    ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` (centred), ``dx = rstd * (g - x_hat * mean(g * x_hat))``
    (RMS), with means over the group. ``g`` is scaled by a power of two per group first, so the sums
    cannot overflow, and shifted by its first element, so a constant ``g`` gives exactly 0.
    """
    dims = tuple(dims)
    eg = group_exponent(g, dims)
    gs = g * torch.exp2(-eg)
    if center:
        gs = gs - first(gs, dims)
        t = gs - gs.mean(dim=dims, keepdim=True) - x_hat * (gs * x_hat).mean(dim=dims, keepdim=True)
    else:
        t = gs - x_hat * (gs * x_hat).mean(dim=dims, keepdim=True)
    return mul_pow2(t * r, k + eg)


def standardize_jvp(t: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, dims: Dims, center: bool = True) -> Tensor:
    """Tangent of :func:`standardize` for an input tangent ``t`` (forward-mode AD).

    The Jacobian of standardization, ``d x_hat_i / d x_j = rstd * (delta_ij - 1/n - x_hat_i * x_hat_j / n)``
    (without the ``1/n`` term when not centred), is symmetric, so the Jacobian-vector product is the same
    map as the vector-Jacobian product: :func:`standardize_backward` applied to ``t``.
    """
    return standardize_backward(t, x_hat, r, k, dims, center)


def split_product(*factors: Tensor) -> tuple[Tensor, Tensor]:
    """The product of ``factors`` as ``m * 2**q``: each factor is split into a mantissa in ``[1, 2)`` (for
    normal values; exact power-of-two scalings) and its exponent, the mantissas are multiplied (``m`` stays
    within ``[1, 2**len(factors))``, so it cannot overflow or underflow) and the exponents summed into ``q``.
    ``mul_pow2(m, q)`` then rounds once, at the end: the product is finite wherever its true value is."""
    m, q = None, None
    for f in factors:
        e = exponent(f)
        scaled = f * torch.exp2(-e)
        m, q = (scaled, e) if m is None else (m * scaled, q + e)
    return m, q


def centered(x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``x - mean`` as ``d * 2**h`` (``h`` 0 or 1): taken in halves where the difference itself overflows
    (opposite signs near the top of the range), exactly otherwise."""
    diff = x - mean
    overflow = torch.isinf(diff) & torch.isfinite(x) & torch.isfinite(mean)
    return torch.where(overflow, x * 0.5 - mean * 0.5, diff), overflow.to(diff.dtype)


def normalize_with_stats(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x_hat = (x - mean) * rsqrt(var + eps)`` for given (running) statistics, in the compute dtype.

    Returns ``(x_hat, rstd)``; see :func:`affine_with_stats`, which also applies a weight.
    """
    x_hat, rstd, _ = affine_with_stats(x, mean, var, eps, None)
    return x_hat, rstd


def affine_with_stats(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_hat, rstd, x_hat * weight)`` for given statistics, in the compute dtype (``weight`` too).

    ``var`` fits the dtype, so ``rstd = rsqrt(var + eps)`` is safe (``inf`` only for ``var + eps == 0``,
    where float64 divides by zero as well). ``x - mean`` is taken in halves where it overflows
    (:func:`centered`), and ``x_hat * weight`` is formed from ``x - mean`` directly, with ``weight * rstd``
    as one mantissa/exponent factor (:func:`mul_product`): ``x_hat`` itself may overflow where the
    weighted result does not (``x = 1e30, rstd = 1e10, weight = 1e-20``).
    """
    rstd = torch.rsqrt(var + eps)
    d, h = centered(x, mean)  # x - mean = d * 2**h
    x_hat = mul_pow2(d * rstd, h)
    return x_hat, rstd, x_hat if weight is None else mul_product(d, weight, rstd, h)


def mul_product(v: Tensor, a: Tensor | None, b: Tensor, h: Tensor | int = 0) -> Tensor:
    """``v * a * b * 2**h`` without forming any partial product (``a`` may be None: ``v * b * 2**h``).

    Eval-mode batch norm applies ``weight * rstd`` to ``x - mean``: ``x = 1e30, rstd = 1e10,
    weight = 1e-20`` is ``1e20``, but ``x * rstd`` overflows float32, and ``weight * rstd`` or ``v * m``
    can over- or underflow on their own. Here every factor enters as mantissa and exponent
    (:func:`split_product`) and the power of two is applied last, so nothing overflows where the result
    does not.
    """
    m, q = split_product(v, b) if a is None else split_product(v, a, b)
    return mul_pow2(m, q + h)
