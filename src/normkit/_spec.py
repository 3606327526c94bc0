"""The spec: normkit's numerics, each step written once, in plain torch.

Every backend implements these functions and is tested against them on one case registry
(:mod:`normkit.check.cases`): the eager path *is* this module; the native kernels (``ops/*.cpp``) say in a
comment above each loop which function here it implements; SyncBatchNorm computes local :func:`moments`,
exchanges them in one ``all_gather`` and calls :func:`merge_moments` and the same functions; the ONNX
subgraphs (:mod:`normkit.onnx.subgraphs`) are these functions transliterated to ONNX operators, in the
same product order and with the same scaling. Each operator's own file (``ops/<op>.py``) opens with its
formula and gradient and says which of these steps it composes.

Why the steps look the way they do (failures measured in torch 2.13): done naively in the input's
precision, a normalization fails in three ways -- the sum of squares overflows (float32 ``|x| > ~1.8e19``),
``E[x**2] - E[x]**2`` cancels catastrophically when the mean is large against the spread, and ``eps`` or
``1/sqrt(var + eps)`` leaves the dtype's range. The steps:

1. **Precision policy** (:func:`compute_dtype`): float32 for float16 / bfloat16 / float32 input, float64
   for float64; never float64 arithmetic for the lower precisions.
2. **Exact powers of two** (:func:`exponent`, :func:`mul_pow2`, :func:`split_product`): multiplying by
   ``2**k`` is exact, so data is scaled into ``(-2, 2)`` before squaring, and products of factors that may
   over- or underflow on their own are taken as mantissas times one summed exponent.
3. **Moments** (:func:`moments`): per reduction group, ``e = floor(log2 max|x|)``, ``y = x * 2**-e``,
   shifted by the group's first element (exact at large offsets -- Sterbenz -- and 0 for a constant
   group), then two-pass: ``mean_d = sum(d) / n``, ``m2 = sum((d - mean_d)**2)``. Carried as
   :class:`Moments` ``(count, exponent, pivot, mean, m2)``. Running statistics move by
   :func:`running_stats` (the variance made unbiased, then :func:`momentum_update`).
4. **Merge** (:func:`merge_moments`): Chan et al.'s parallel update of two disjoint parts, in the scaled,
   shifted form.
5. **Standardize from moments** (:func:`standardize_from_moments`): ``rstd = r * 2**k`` from
   :func:`inv_std`, which never forms ``var * 4**e`` or ``eps / 4**e`` where it would leave the range
   (:func:`scaled_sum`, :func:`power_pair`: the same two steps give LRN's ``d**-beta``).
6. **Affine, in an overflow-safe product order**: with statistics of the data, ``x_hat`` is bounded by
   ``sqrt(n)`` and ``y = x_hat * weight + bias`` is safe (:func:`affine`); with given statistics (eval),
   ``weight * rstd`` is one split factor applied to ``x - mean`` (:func:`affine_with_stats`), so no
   partial product overflows where ``y`` is finite.
7. **Backward from the reduced sums** (:func:`grad_sums`, :func:`merge_grad_sums`,
   :func:`standardize_backward_from_sums`): ``dx = rstd * (g - sum(g)/n - x_hat * sum(g * x_hat)/n)``
   with ``g`` scaled by a power of two and shifted like the data.
8. **When the one-pass plain formula is safe** (:data:`PLAIN`, :func:`plain_moments`,
   :func:`plain_grad_ok`, :func:`lrn_plain_forward_ok`, :func:`lrn_plain_backward_ok`): the proof
   conditions under which a fast path may skip the scaling, forward and backward. The native kernels
   receive :data:`PLAIN`'s bounds at build time (:mod:`normkit._native`), the eager LRN checks them on
   the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

Dims = Sequence[int]


# =========================================================================== 1. precision policy
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


# =========================================================================== 2. exact powers of two
def max_exponent(dtype: torch.dtype) -> int:
    """Largest ``E`` such that ``2**E`` and ``2**-E`` are both normal in ``dtype`` (126 for float32)."""
    return -int(math.log2(torch.finfo(dtype).tiny))


def floor_log2(a: Tensor) -> Tensor:
    """``floor(log2(a))`` for ``a >= 0``, exact for every positive finite value (subnormals included);
    ``-inf`` for 0, ``inf`` for inf. ``log2`` may round across a power of two (``2**k * (1 - 2**-24)`` gives
    ``k``); one comparison each way corrects it, so the ONNX form (``Log``, which rounds differently)
    finds the same exponent."""
    e = torch.floor(torch.log2(a))
    return e + (a >= torch.exp2(e + 1)).to(e.dtype) - (a < torch.exp2(e)).to(e.dtype)


def exponent(t: Tensor) -> Tensor:
    """``floor(log2 |t|)`` elementwise, clamped so that ``2**e`` and ``2**-e`` are normal (0 gets the minimum).

    A detached float tensor of integers: scaling by ``2**-e`` is exact and piecewise constant, so it carries
    no gradient.
    """
    bound = max_exponent(t.dtype)
    return floor_log2(t.detach().abs()).clamp(-bound, bound)


def group_exponent(x: Tensor, dims: Dims) -> Tensor:
    """``e = floor(log2(max |x|))`` over ``dims`` (keepdim): :func:`exponent` of each group's largest value."""
    return exponent(x.detach().abs().amax(dim=tuple(dims), keepdim=True))


def frexp(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t = m * 2**e`` as ``math.frexp`` splits it (``1/2 <= |m| < 1``; ``e = 0`` for 0, inf and NaN), with
    ``e`` detached (float) and ``m`` differentiable; subnormal ``t`` included (``2**-e`` itself would
    overflow there, so ``m`` comes from :func:`mul_pow2`). Built from :func:`floor_log2`: ONNX has no frexp."""
    a = t.detach().abs()
    normal = (a > 0) & torch.isfinite(a)
    e = torch.where(normal, floor_log2(torch.where(normal, a, 1.0)) + 1, 0.0)
    return mul_pow2(t, -e), e


def mul_pow2(t: Tensor, k: Tensor) -> Tensor:
    """``t * 2**k`` for integer-valued ``k``, exact up to the final rounding, for every ``k``.

    The factor is applied in three parts of the same sign, each a normal power of two, so every
    intermediate lies between ``t`` and the result. ``|k|`` is clamped at three times the exponent range,
    past which ``t * 2**k`` overflows or underflows for any finite ``t`` anyway.
    """
    bound = max_exponent(t.dtype)
    k = k.clamp(-3 * bound, 3 * bound)
    k1 = torch.trunc(k / 3)
    k2 = torch.trunc((k - k1) / 2)
    return t * torch.exp2(k1) * torch.exp2(k2) * torch.exp2(k - k1 - k2)


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


def apply_factor(v: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """``v * m * 2**q`` for a split factor (``1/4 <= |m| < 8``, from :func:`split_product` or :func:`inv_std`)
    with no intermediate overflow where the result is finite: for ``q < 0``, ``v`` is first scaled down by
    ``2**-4`` (exact for the large values where it matters; values that small give a negligible result
    either way), so ``v * m`` cannot overflow; for ``q >= 0`` the result is at least ``|v * m| / 4``.
    Where ``m * 2**q`` is itself a normal number, this is the one rounding of ``v * (m * 2**q)``."""
    s = (q < 0).to(q.dtype) * 4
    return mul_pow2((v * torch.exp2(-s)) * m, q + s)


def first(x: Tensor, dims: Dims) -> Tensor:
    """The first element of each group (keepdim shape): the pivot of the shifted moments."""
    for d in dims:
        x = x.narrow(d, 0, 1)
    return x


def group_size(x: Tensor, dims: Dims) -> int:
    """Number of elements reduced into each group."""
    return math.prod([x.shape[d] for d in dims])


# =========================================================================== 3. moments
class Moments(NamedTuple):
    """Moments of groups of data, kept in scaled, shifted form so that merging stays exact.

    With ``y = x * 2**-exponent``: ``mean_y = pivot + mean``, ``sum((y - mean_y)**2) = m2``. Not centred
    (RMS): ``pivot = mean = 0`` and ``m2 = sum(y**2)``. All tensors have the keepdim shape of the reduction;
    ``count`` is a Python int.
    """

    count: int
    exponent: Tensor
    pivot: Tensor
    mean: Tensor
    m2: Tensor

    def mean_x(self) -> Tensor:
        """Mean in the data's units: ``(pivot + mean) * 2**exponent``."""
        return mul_pow2(self.pivot + self.mean, self.exponent)

    def var_x(self, unbiased: bool = False) -> Tensor:
        """Variance (the mean square when not centred) in the data's units (``inf`` only where it exceeds the
        dtype, as float64 cast to the dtype would say)."""
        n = self.count - 1 if unbiased else self.count
        return mul_pow2(self.m2 / n, 2 * self.exponent)


def moments(x: Tensor, dims: Dims, center: bool = True) -> tuple[Moments, Tensor]:
    """Robust moments of ``x`` over ``dims`` (``x`` already in the compute dtype).

    Returns the :class:`Moments` and the centred scaled data ``c = y - mean_y`` (``y`` itself when not
    centred; shape of ``x``), which :func:`standardize_from_moments` normalizes.
    """
    dims = tuple(dims)
    e = group_exponent(x, dims)
    y = x * torch.exp2(-e)  # exact: a power-of-two scale; |y| < 2, so y**2 cannot overflow
    n = group_size(x, dims)
    if center:
        pivot = first(y, dims)
        d = y - pivot  # exact when the group's values are near the pivot; a constant group gives 0
        mean = d.sum(dim=dims, keepdim=True) / n
        c = d - mean  # two-pass: the second moment of small, centred numbers
    else:
        c = y
    m2 = (c * c).sum(dim=dims, keepdim=True)
    if not center:
        pivot = mean = torch.zeros_like(m2)
    return Moments(n, e, pivot, mean, m2), c


def center_scaled(x: Tensor, m: Moments, center: bool = True) -> Tensor:
    """``c = (x * 2**-exponent - pivot) - mean`` for moments ``m`` of groups that ``x`` belongs to (``x``
    scaled only when not centred): the centred scaled data of :func:`moments`, bit for bit when ``m`` are
    ``x``'s own moments, and the local part of the whole when ``m`` were merged across ranks."""
    y = x * torch.exp2(-m.exponent)
    return (y - m.pivot) - m.mean if center else y


def momentum_update(running: Tensor | None, stat: Tensor, momentum: float | Tensor) -> Tensor | None:
    """Running statistics: ``(1 - momentum) * running + momentum * stat`` (torch's convention: ``momentum``
    weights the new batch) in the compute dtype, returned in ``running``'s dtype; None for None.
    ``momentum`` may be a 0-d tensor (the cumulative average's ``1 / steps``, kept on the device)."""
    if running is None:
        return None
    ct = compute_dtype(running.dtype)
    return (running.to(ct) * (1.0 - momentum) + stat.to(ct) * momentum).to(running.dtype)


def running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, count: int,
                  momentum: float | Tensor) -> tuple[Tensor | None, Tensor | None]:
    """torch's running statistics after a batch whose groups of ``count`` values have ``mean`` and biased ``var``:
    each moved by :func:`momentum_update`, the variance first made unbiased (Bessel: ``var * count / (count - 1)``,
    ``count > 1``). None stays None."""
    return (momentum_update(running_mean, mean, momentum),
            momentum_update(running_var, var * (count / (count - 1)), momentum))


# =========================================================================== 4. merge
def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint parts of the same groups (Chan et al.'s parallel update).

    Both sides are first brought to the larger exponent (an exact power-of-two rescale, except for
    values far below the group's maximum, which cannot matter). The difference of the two means is taken
    as ``(pivot_b - pivot_a) + (mean_b - mean_a)``: the pivots are exact data values, so at a large common
    offset their difference is exact and no precision is lost to the offset. A part of count 0 is the
    identity (its tensors are not read).
    """
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    e = torch.maximum(a.exponent, b.exponent)
    sa, sb = a.exponent - e, b.exponent - e  # <= 0: scale down into the common units
    pa, ma, m2a = mul_pow2(a.pivot, sa), mul_pow2(a.mean, sa), mul_pow2(a.m2, 2 * sa)
    pb, mb, m2b = mul_pow2(b.pivot, sb), mul_pow2(b.mean, sb), mul_pow2(b.m2, 2 * sb)
    n = a.count + b.count
    delta = (pb - pa) + (mb - ma)
    fb = b.count / n
    return Moments(n, e, pa, ma + delta * fb, m2a + m2b + delta * delta * (a.count * fb))


# =========================================================================== 5. standardize from moments
def scaled_sum(a: Tensor, p: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``a * 2**p + eps = 4**h * u`` for ``a >= 0`` and integer-valued ``p``, with ``u`` in about
    ``[1/4, 4 + 4]`` and ``h`` an integer-valued tensor, without forming ``a * 2**p`` or ``eps / 4**h``
    where they would leave the range.

    ``h ~ log2(max(sqrt(a * 2**p), sqrt(eps)))`` per element: both terms of ``u = a * 2**(p - 2h) +
    eps * 4**-h`` are then at most about 4, and whichever underflows is negligible against the other.
    ``eps`` enters as its exact ``frexp`` parts, so an ``eps`` below the compute dtype's range is honoured.
    Only ``a = 0`` with ``eps = 0`` gives ``u = 0``.
    """
    bound = max_exponent(a.dtype)
    eps_m, eps_q = math.frexp(eps)  # eps = eps_m * 2**eps_q exactly
    h_eps = math.floor((eps_q - 1) / 2) if eps != 0 else -math.inf
    h_a = torch.floor((p + floor_log2(a.detach())) / 2)  # -inf for a = 0
    h = torch.clamp(torch.clamp(h_a, min=h_eps), -3 * bound, 3 * bound)
    u = mul_pow2(a, p - 2 * h)
    if eps != 0:
        u = u + mul_pow2(torch.full_like(a, eps_m), eps_q - 2 * h)
    return u, h


def power_pair(u: Tensor, h: Tensor, power: float) -> tuple[Tensor, Tensor]:
    """``(4**h * u) ** power`` as ``(mantissa, integer exponent)``, ``u`` from :func:`scaled_sum`.

    The exponent ``2 h power`` is split exactly into an integer and a small fraction: ``power`` into a
    short head (``2 h * head`` is exact) and a tail whose product with ``2 h`` is small, so no exponent is
    rounded. ``power = -1/2`` is :func:`inv_std`'s ``rsqrt(u) * 2**-h``.
    """
    if power == -0.5:
        return torch.rsqrt(u), -h
    bits = 10 if u.dtype == torch.float32 else 30
    m, q = math.frexp(power)
    head = math.ldexp(round(math.ldexp(m, bits)), q - bits)
    t = 2 * h * head  # exact: a 10-bit head times an exponent of at most 11 bits
    whole = torch.floor(t)
    frac = (t - whole) + 2 * h * (power - head)
    return torch.pow(u, power) * torch.exp2(frac), whole


def inv_std(a: Tensor, e: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``1 / sqrt(a * 4**e + eps)`` as ``r * 2**k``, where ``a`` is a variance (or mean square) of data
    scaled by ``2**-e``; ``r`` is in ``[1/3, 2]`` and ``k`` an integer-valued tensor. Given (running)
    statistics in the data's units are ``e = 0``. Only ``a = 0`` with ``eps = 0`` gives ``r = inf`` (0/0
    groups). :func:`scaled_sum` then :func:`power_pair` with power -1/2."""
    return power_pair(*scaled_sum(a, 2 * e, eps), -0.5)


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


def standardize_from_moments(c: Tensor, m: Moments, eps: float) -> Standardized:
    """``x_hat = c * 2**e / sqrt(var + eps)`` for centred scaled data ``c`` (:func:`moments`,
    :func:`center_scaled`) and the moments ``m`` of its groups: ``rstd = r * 2**k`` from
    :func:`inv_std` of ``a = m2 / n``, and ``x_hat = (c * r) * 2**(k + e)`` (``c`` is in units of ``2**e``,
    ``r`` in units of ``2**k``; ``|c * r| <= sqrt(n)``)."""
    a = m.m2 / m.count
    r, k = inv_std(a, m.exponent, eps)
    x_hat = mul_pow2(c * r, k + m.exponent)
    return Standardized(x_hat, r, k, m.mean_x(), m.var_x(), m.count)


def standardize(x: Tensor, dims: Dims, eps: float, center: bool = True) -> Standardized:
    """``x_hat = (x - mean) / sqrt(var + eps)`` over ``dims`` (or ``x / sqrt(mean(x**2) + eps)`` when
    ``center`` is False): :func:`moments` then :func:`standardize_from_moments`, in the compute dtype of
    ``x`` (which it must already be), without any overflow.

    Written in differentiable torch ops: autograd through it is exact (the scale exponents are detached
    constants).
    """
    m, c = moments(x, dims, center)
    return standardize_from_moments(c, m, eps)


# =========================================================================== 6. affine
def affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``y = x_hat * weight + bias`` (either may be None), in ``x_hat``'s dtype, for ``x_hat`` standardized
    with its own statistics: ``|x_hat| <= sqrt(n)``, so the product cannot overflow where ``y`` is finite."""
    y = x_hat if weight is None else x_hat * weight.to(x_hat.dtype)
    return y if bias is None else y + bias.to(x_hat.dtype)


def centered(x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``x - mean`` as ``d * 2**h`` (``h`` 0 or 1): taken in halves where the difference itself overflows
    (opposite signs near the top of the range), exactly otherwise."""
    diff = x - mean
    overflow = torch.isinf(diff) & torch.isfinite(x) & torch.isfinite(mean)
    return torch.where(overflow, x * 0.5 - mean * 0.5, diff), overflow.to(diff.dtype)


def eval_factor(var: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For given statistics: ``rstd = r * 2**k = 1 / sqrt(var + eps)`` (:func:`inv_std` with ``e = 0``:
    ``var + eps`` is never formed, so an eps below the dtype's range counts) and the split factor
    ``weight * rstd = m * 2**q`` (``weight``'s mantissa times ``r``, the exponents summed; ``m = r``,
    ``q = k`` without a weight). Returns ``(r, k, m, q)``; per channel, so cheap."""
    r, k = inv_std(var, torch.zeros_like(var), eps)
    if weight is None:
        return r, k, r, k
    ew = exponent(weight)
    return r, k, weight * torch.exp2(-ew) * r, ew + k


def affine_with_stats(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                      bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Given (running) statistics: ``y = (x - mean) * rsqrt(var + eps) * weight + bias``, returned as
    ``(y, x_hat, (r, k))`` with ``rstd = r * 2**k``.

    The product order is the point: ``(x - mean) * rstd`` may overflow where ``y`` does not (``x = 1e30``,
    ``var = 1e-20``, ``weight = 1e-20``: ``x_hat = 1e40`` but ``y = 1e20``), so ``y`` applies the split
    factor ``weight * rstd`` (:func:`eval_factor`) to ``x - mean`` (:func:`centered`, halves where the
    difference overflows) with :func:`apply_factor`. ``x_hat`` (for ``dweight``) is ``inf`` only where it
    is out of range itself. All in the compute dtype.
    """
    r, k, m, q = eval_factor(var, weight, eps)
    d, h = centered(x, mean)
    y = apply_factor(d, m, q + h)
    return (y if bias is None else y + bias.to(y.dtype)), apply_factor(d, r, k + h), (r, k)


# =========================================================================== 7. backward
class GradSums(NamedTuple):
    """The reduced sums standardization's backward needs, per group, in scaled, shifted form.

    With ``gs = g * 2**-exponent - pivot`` (``pivot`` 0 when not centred): ``sum_g = sum(gs)``,
    ``sum_gx = sum(gs * x_hat)``, and ``sum_x = sum(x_hat)`` (kept only for merging: moving the pivot
    changes ``sum_gx`` by ``shift * sum_x``; None when not asked for). Keepdim shapes.
    """

    count: int
    exponent: Tensor
    pivot: Tensor
    sum_g: Tensor
    sum_gx: Tensor
    sum_x: Tensor | None


def grad_sums(g: Tensor, x_hat: Tensor, dims: Dims, center: bool = True, with_sum_x: bool = False):
    """:class:`GradSums` of ``g = dL/dx_hat`` over ``dims``: ``g`` scaled by a power of two per group (the
    sums cannot overflow) and shifted by its first element when centred (a constant ``g`` gives exactly 0).
    Returns ``(sums, gd)``, ``gd`` the scaled, shifted ``g`` itself (which
    :func:`standardize_backward_from_sums` then need not form again)."""
    dims = tuple(dims)
    eg = group_exponent(g, dims)
    gs = g * torch.exp2(-eg)
    pivot = first(gs, dims) if center else torch.zeros_like(eg)
    gd = gs - pivot if center else gs
    sum_x = x_hat.sum(dim=dims, keepdim=True) if with_sum_x else None
    return GradSums(group_size(g, dims), eg, pivot, gd.sum(dim=dims, keepdim=True),
                    (gd * x_hat).sum(dim=dims, keepdim=True), sum_x), gd


def merge_grad_sums(a: GradSums, b: GradSums) -> GradSums:
    """The sums of the union of two disjoint parts (both with ``sum_x``): brought to the larger exponent and
    to ``a``'s pivot exactly (powers of two; the pivot shift ``p_b - p_a`` times ``count_b`` and ``sum_x_b``).
    A part of count 0 is the identity."""
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    e = torch.maximum(a.exponent, b.exponent)
    sa, sb = a.exponent - e, b.exponent - e
    pa = mul_pow2(a.pivot, sa)
    shift = mul_pow2(b.pivot, sb) - pa  # b's pivot relative to a's, in common units
    sum_g = mul_pow2(a.sum_g, sa) + (mul_pow2(b.sum_g, sb) + shift * b.count)
    sum_gx = mul_pow2(a.sum_gx, sa) + (mul_pow2(b.sum_gx, sb) + shift * b.sum_x)
    return GradSums(a.count + b.count, e, pa, sum_g, sum_gx, a.sum_x + b.sum_x)


def standardize_backward_from_sums(g: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, sums: GradSums,
                                   center: bool = True, gd: Tensor | None = None) -> Tensor:
    """``dx = rstd * (g - sum(g)/n - x_hat * sum(g * x_hat)/n)`` (without the ``sum(g)`` term when not
    centred), given the group's :class:`GradSums` (possibly merged across ranks; ``g`` and ``x_hat`` are
    this part's): ``g`` is brought to the sums' scale and pivot (``gd``, when :func:`grad_sums` of this
    same ``g`` gave the sums, is that already), the bracket formed there, and
    ``rstd * 2**exponent = r * 2**(k + exponent)`` applied last."""
    n = sums.count
    if gd is None:
        gd = g * torch.exp2(-sums.exponent)
        if center:
            gd = gd - sums.pivot
    if center:
        gd = gd - sums.sum_g / n
    t = gd - x_hat * (sums.sum_gx / n)
    return mul_pow2(t * r, k + sums.exponent)


def standardize_backward(g: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, dims: Dims, center: bool = True) -> Tensor:
    """Gradient of :func:`standardize` given ``g = dL/dx_hat`` (all in the compute dtype): :func:`grad_sums`
    over ``dims`` then :func:`standardize_backward_from_sums`."""
    sums, gd = grad_sums(g, x_hat, dims, center)
    return standardize_backward_from_sums(g, x_hat, r, k, sums, center, gd)


def standardize_jvp(t: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, dims: Dims, center: bool = True) -> Tensor:
    """Tangent of :func:`standardize` for an input tangent ``t`` (forward-mode AD).

    The Jacobian of standardization, ``d x_hat_i / d x_j = rstd * (delta_ij - 1/n - x_hat_i * x_hat_j / n)``
    (without the ``1/n`` term when not centred), is symmetric, so the Jacobian-vector product is the same
    map as the vector-Jacobian product: :func:`standardize_backward` applied to ``t``.
    """
    return standardize_backward(t, x_hat, r, k, dims, center)


def affine_backward(dy: Tensor, x_hat: Tensor, weight: Tensor | None, bias: Tensor | None,
                    needs: Sequence[bool] = (True, True, True)) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(g, dweight, dbias)`` of ``y = x_hat * weight + bias`` (``dy`` in the compute dtype):
    ``g = dy * weight = dL/dx_hat``, ``dweight = sum(dy * x_hat)`` and ``dbias = sum(dy)`` over every
    broadcast dimension, each in its parameter's dtype (None where absent or not in ``needs[1:]``)."""
    g = dy if weight is None else dy * weight.to(dy.dtype)
    dweight = (dy * x_hat).sum_to_size(weight.shape).to(weight.dtype) if weight is not None and needs[1] else None
    dbias = dy.sum_to_size(bias.shape).to(bias.dtype) if bias is not None and needs[2] else None
    return g, dweight, dbias


def normalize_backward(dy: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, weight: Tensor | None, bias: Tensor | None,
                       dims: Dims, center: bool = True, needs: Sequence[bool] = (True, True, True)):
    """``(dx, dweight, dbias)`` of ``y = standardize(x over dims) * weight + bias``: :func:`affine_backward`
    then :func:`standardize_backward` (``dx`` None where ``needs[0]`` is False)."""
    g, dweight, dbias = affine_backward(dy, x_hat, weight, bias, needs)
    return (standardize_backward(g, x_hat, r, k, dims, center) if needs[0] else None), dweight, dbias


def eval_dweight(dy: Tensor, x: Tensor, mean: Tensor, r: Tensor, k: Tensor, dims: Dims) -> Tensor:
    """``dweight = sum over dims of dy * x_hat`` for given statistics, ``x_hat = (x - mean) * r * 2**k``
    (keepdim). ``x_hat`` alone may overflow (``x = 1e30``, ``rstd = 1e10``) where the sum does not, so
    ``rstd`` is applied last, to the sum of the products of ``dy`` and ``x - mean``, each scaled by a power of
    two per group as :func:`moments` scales data (``x - mean`` in halves where it overflows:
    :func:`centered`): the products lie in ``(-4, 4)`` and their sum cannot overflow."""
    dims = tuple(dims)
    d, h = centered(x, mean)
    ed = group_exponent(d, dims) + h.amax(dim=dims, keepdim=True)  # d * 2**h <= 2**(ed + 1)
    eg = group_exponent(dy, dims)
    s = ((dy * torch.exp2(-eg)) * (d * torch.exp2(h - ed))).sum(dim=dims, keepdim=True)
    return apply_factor(s, r, k + eg + ed)


def affine_with_stats_backward(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                               dims: Dims, need_dx: bool = True, need_dweight: bool = True):
    """``(dx, dweight)`` of :func:`affine_with_stats` (no gradient to the statistics): ``dx = dy *
    (weight * rstd)`` applied as the split factor of :func:`eval_factor`, and ``dweight`` summed over
    ``dims`` (keepdim: the broadcast dims of the per-channel parameters) by :func:`eval_dweight`; None
    where not needed. ``dbias`` is ``sum(dy)``."""
    r, k, m, q = eval_factor(var, weight, eps)
    return (apply_factor(dy, m, q) if need_dx else None), (eval_dweight(dy, x, mean, r, k, dims) if need_dweight else None)


# =========================================================================== 8. when the plain formula is safe
class PlainBounds(NamedTuple):
    """The bounds of the one-pass plain formulas (the native kernels get them at build time)."""

    lo: float  # every |x| (statistics ops: max |x| and max |g|) at least this ...
    hi: float  # ... and at most this
    tiny_var: float  # a group's m2 / n at least this (so a rounded-off square cannot matter)
    keep: float  # the one-pass m2 keeps at least this fraction of sum(d**2) (at most 4 bits cancel)
    max_count: int  # groups of at most this many values (the sums' rounding stays below float32's eps * n)
    lrn_k_min: float  # LRN: k at least this ...
    lrn_d_max: float  # ... and k, c * n * max|x|**2 at most this
    lrn_beta_max: float  # 0 <= beta <= this
    product_max: float  # every partial product of LRN's plain backward at most this


PLAIN = PlainBounds(lo=2.0**-50, hi=2.0**50, tiny_var=2.0**-100, keep=1 / 16, max_count=2**24,
                    lrn_k_min=2.0**-40, lrn_d_max=2.0**95, lrn_beta_max=1.25, product_max=2.0**100)


def plain_moments(amax: Tensor, s1: Tensor, s2: Tensor, count: int, center: bool = True):
    """The one-pass moments of a group and whether they may replace :func:`moments`: ``(ok, mean_d, m2)``.

    ``s1 = sum(d)``, ``s2 = sum(d**2)`` of ``d = x - x[first]`` (``d = x`` when not centred), unscaled, taken
    in the same pass as ``amax = max |x|``; then ``mean_d = s1 / n`` and ``m2 = s2 - s1 * mean_d``. Safe
    (``ok``) when -- the proof, in float32:

    * ``count <= 2**24`` and ``2**-50 <= amax <= 2**50``: ``|d| <= 2**51``, so ``d**2 <= 2**102`` and
      ``s2 <= 2**126`` is finite; squares that underflow (``|d| < 2**-63``) are off by at most the smallest
      subnormal, negligible against ``m2 >= n * 2**-100`` (below);
    * ``m2 >= s2 / 16``: the subtraction loses at most 4 bits to cancellation (the robust recipe's
      two-pass ``m2`` loses none; ``s2`` is itself a sum of rounded squares, so 4 bits is within the
      tolerance the tests hold every backend to);
    * ``m2 >= n * 2**-100``, or ``m2 = s2 = 0`` (a constant group: exact).

    Elementwise over groups (tensors of one value per group); the native kernels decide per group with
    exactly these comparisons (``norm_common.h``: ``plain_moments``)."""
    n = float(count)
    ok = (count <= PLAIN.max_count) & (amax >= PLAIN.lo) & (amax <= PLAIN.hi) & torch.isfinite(s2)
    if not center:
        return ok & (s2 >= n * PLAIN.tiny_var), torch.zeros_like(s2), s2
    mean_d = s1 / n
    m2 = s2 - s1 * mean_d
    kept = (m2 >= s2 * PLAIN.keep) & torch.where(m2 == 0, s2 == 0, m2 >= n * PLAIN.tiny_var)
    return ok & kept, mean_d, m2


def plain_grad_ok(gmax: Tensor) -> Tensor:
    """Whether backward's sums may be taken of ``g = dy * weight`` unscaled (``eg = 0`` in
    :func:`grad_sums`): ``2**-50 <= max |g| <= 2**50`` per group, so ``|g - g0| <= 2**51`` and
    ``|(g - g0) * x_hat| <= 2**51 * sqrt(n)`` and their sums stay finite and normal where they matter."""
    return (gmax >= PLAIN.lo) & (gmax <= PLAIN.hi)


def lrn_plain_forward_ok(amax: float, count: int, c: float, k: float, beta: float, dtype: torch.dtype) -> bool:
    """Whether LRN's plain forward ``y = x * (k + c * sum_W x**2) ** -beta`` is safe for data with
    ``max |x| = amax``, windows of ``count`` values, in the compute dtype ``dtype``. The proof:

    * ``2**-40 <= k <= 2**95`` and ``c * count * amax**2 <= 2**95``: ``d`` lies in ``[2**-40, 2**96]``, so
      with ``0 <= beta <= 1.25``, ``d**-beta`` lies in ``[2**-120, 2**50]``: normal, and ``y`` is one
      rounding of ``x`` times it;
    * ``c * count * tiny <= k``: a square that underflows is off by at most ``tiny * eps / 2``; ``count`` of
      them, times ``c``, stay below ``eps * k / 2 <= eps * d / 2``.
    """
    tiny = torch.finfo(dtype).tiny
    return (0.0 <= beta <= PLAIN.lrn_beta_max and PLAIN.lrn_k_min <= k <= PLAIN.lrn_d_max
            and c * count * amax * amax <= PLAIN.lrn_d_max and c * count * tiny <= k)


def lrn_plain_backward_ok(amax: float, gmax: float, count: int, c: float, k: float, beta: float,
                          dtype: torch.dtype) -> bool:
    """Whether LRN's plain backward is safe, in the product order both the eager formula and the kernel use:

        p = d**-beta     z_j = ((g_j * x_j) / d_j) * p_j     dx_i = g_i * p_i - 2 c beta * (x_i * sum_{W'(i)} z_j)

    On top of :func:`lrn_plain_forward_ok` (which bounds ``d`` and ``p``), with ``B = max(1, k**(-beta-1))``:

    * ``gmax * amax * B <= 2**100``: ``|g x|``, ``|g x / d|`` and ``|z|`` are at most that (``d >= k``);
    * ``count * amax * gmax * amax * B * max(1, 2 c beta) <= 2**100``: the window sum times ``x``, and that
      times ``2 c beta``;
    * ``gmax * k**-beta <= 2**100``: ``g * p``;
    * underflow: each of the three roundings of ``z`` is off by at most ``tiny * eps`` times what follows
      it (at most ``B``), and is multiplied by ``2 c beta x`` over ``count`` terms; the total,
      ``2 c beta * count * amax * (B + k**-beta + 1) * tiny * eps``, must stay below ``eps`` times the
      gradient's natural scale ``gmax * (k + c * count * amax**2) ** -beta``.

    The plain formula used to form ``g x d**(-beta-1)`` with only forward's bounds checked: ``x = 2**10``,
    ``g = 2**30``, ``k = 2**-40``, ``beta = 1.25`` overflows float32 (``2**130``) where ``dx`` is 1.2e24.
    """
    if not lrn_plain_forward_ok(amax, count, c, k, beta, dtype):
        return False
    fi = torch.finfo(dtype)
    b = max(1.0, k ** (-beta - 1))
    cb = 2 * c * beta
    z = gmax * amax * b
    scale = gmax * (k + c * count * amax * amax) ** -beta
    underflow = cb * count * amax * (b + k ** -beta + 1) * fi.tiny * fi.eps
    return (z <= PLAIN.product_max and count * amax * z * max(1.0, cb) <= PLAIN.product_max
            and gmax * k ** -beta <= PLAIN.product_max and (gmax == 0 or underflow <= fi.eps * scale))
