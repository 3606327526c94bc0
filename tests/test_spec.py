"""normkit._spec, the spec every backend implements: exact powers of two, robust moments and their merge, the
inverse std and LRN's power as one construction, the eval product order, backward's reduced sums and their
merge, and the proof conditions of the plain formulas (checked against the oracle wherever they hold)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import oracle
from normkit import _spec as spec
from normkit._spec import inv_std, merge_moments, moments, mul_pow2
from conftest import REL_TOL, _subnormal_spacing, assert_rel_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mul_pow2_is_exact_over_the_whole_range(dtype):
    """t * 2**k for k far beyond what one power of two can hold, against Python's exact ldexp."""
    fi = torch.finfo(dtype)
    t = torch.tensor([fi.tiny * fi.eps, fi.tiny, 1.5, fi.max / 4, 3.0], dtype=dtype)
    lo, hi = int(math.log2(fi.tiny)) + int(math.log2(fi.eps)) - 2, int(math.log2(fi.max)) + 2
    for k in range(-2 * hi, 2 * hi, 7 if dtype == torch.float32 else 53):
        got = mul_pow2(t, torch.full_like(t, k))
        for g, v in zip(got.tolist(), t.tolist()):
            try:
                exact = math.ldexp(v, k)
            except OverflowError:
                exact = math.inf
            exact = torch.tensor(exact, dtype=torch.float64).to(dtype).item()  # the one final rounding
            assert g == exact, f"{v} * 2**{k}: got {g}, expected {exact}"


def test_moments_of_a_constant_group_are_exact():
    x = torch.full((3, 1000), 1e7)
    m, c = moments(x, (1,))
    assert torch.equal(c, torch.zeros_like(c)) and torch.equal(m.m2, torch.zeros_like(m.m2))
    assert torch.equal(m.mean_x(), x[:, :1])


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e7])
def test_merge_equals_moments_of_the_union(offset):
    """SyncBatchNorm's building block: parts with different sizes and very different scales merge exactly
    as if the union had been reduced at once (float32 data at an offset far above its spread)."""
    parts = [offset + torch.randn(4, 7, dtype=torch.float64), offset + 1e-3 * torch.randn(4, 1, dtype=torch.float64),
             offset + 50 * torch.randn(4, 30, dtype=torch.float64)]
    parts = [p.float() for p in parts]
    merged = moments(parts[0], (1,))[0]
    for p in parts[1:]:
        merged = merge_moments(merged, moments(p, (1,))[0])
    whole = torch.cat(parts, 1).double()
    assert merged.count == whole.shape[1]
    assert_rel_close(merged.mean_x().squeeze(1), whole.mean(1), torch.float32, "mean")
    assert_rel_close(merged.var_x().squeeze(1), whole.var(1, unbiased=False), torch.float32, "var")
    assert_rel_close(merged.var_x(unbiased=True).squeeze(1), whole.var(1), torch.float32, "unbiased var")


def test_merge_across_exponents_without_overflow():
    a = torch.tensor([[3e38, -3e38]])
    b = torch.tensor([[1e-30, 2e-30, 0.0]])
    merged = merge_moments(moments(a, (1,))[0], moments(b, (1,))[0])
    whole = torch.cat([a, b], 1).double()
    # the mean of this group is only defined to within the data's scale (3e38), not its own (6e-31)
    assert (merged.mean_x().double() - whole.mean(1, keepdim=True)).abs().max() <= 1e-5 * 3e38
    assert torch.isinf(merged.var_x())  # the variance itself (9e76) does not fit float32: inf, as float64 cast says
    assert torch.isfinite(merged.m2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-50, 1e-12, 1e-5, 1.0, 1e6])
def test_inv_std_matches_exact_formula(dtype, eps):
    """r * 2**k == 1/sqrt(a * 4**e + eps) for variances and scales spanning the whole range."""
    a = torch.tensor([0.0, 2.0**-79, 1e-3, 0.25, 1.0, 4.0], dtype=dtype)
    bound = -int(math.log2(torch.finfo(dtype).tiny))
    for e in range(-bound, bound + 1, 11 if dtype == torch.float32 else 97):
        r, k = inv_std(a, torch.full_like(a, e), eps)
        for ai, ri, ki in zip(a.tolist(), r.tolist(), k.tolist()):
            if ai == 0 and eps == 0:
                continue  # 0/0: no answer to check
            exact = 1 / mpmath.sqrt(mpmath.mpf(ai) * mpmath.mpf(4) ** e + mpmath.mpf(eps))
            got = mpmath.mpf(ri) * mpmath.mpf(2) ** int(ki)
            assert math.isfinite(ri) and 1 / 3 <= ri <= 2.5, (ai, e, eps, ri)
            assert abs(got / exact - 1) <= 4 * torch.finfo(dtype).eps, (ai, e, eps, float(got / exact - 1))


# ---- the exact powers of two -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_floor_log2_and_frexp_are_exact(dtype):
    """Against math.frexp, on powers of two, the values just below them (where log2 rounds up), subnormals
    and the top of the range."""
    fi = torch.finfo(dtype)
    vals = [fi.tiny * fi.eps, fi.tiny * 3, fi.tiny, 0.75, 1.0, 2.0**20 * (1 - fi.eps / 2), 2.0**20, 3.0, fi.max]
    vals += [2.0**k * (1 - fi.eps / 2) for k in range(-100, 101, 7)]
    t = torch.tensor(vals, dtype=dtype)
    m, e = spec.frexp(t)
    for v, mi, ei, fl in zip(t.tolist(), m.tolist(), e.tolist(), spec.floor_log2(t).tolist()):
        em, ee = math.frexp(v)
        assert (mi, ei) == (em, ee), (v, mi, ei, em, ee)
        assert fl == ee - 1, (v, fl, ee)
    assert spec.floor_log2(torch.tensor([0.0])).item() == -math.inf
    assert spec.frexp(torch.tensor([0.0, math.inf]))[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("power", [-0.5, -0.75, -1.75, 0.6])
def test_scaled_sum_and_power_pair_match_the_exact_value(power):
    """``(a * 2**p + eps) ** power`` as mantissa and exponent, for sums whose value or power leaves float32."""
    a = torch.tensor([0.3, 1.0, 3.9, 1e-3, 2.5])
    p = torch.tensor([250.0, -250.0, 0.0, -300.0, 120.0])
    for eps in (0.0, 1e-50, 1e-5, 1e30):
        u, h = spec.scaled_sum(a, p, eps)
        m, q = spec.power_pair(u, h, power)
        for ai, pi, mi, qi in zip(a.tolist(), p.tolist(), m.tolist(), q.tolist()):
            exact = (mpmath.mpf(ai) * mpmath.mpf(2) ** int(pi) + mpmath.mpf(eps)) ** mpmath.mpf(power)
            got = mpmath.mpf(mi) * mpmath.mpf(2) ** int(qi)
            assert math.isfinite(mi) and abs(got / exact - 1) <= 1e-6, (ai, pi, eps, float(got / exact - 1))


def test_apply_factor_has_no_intermediate_overflow():
    """``v * m * 2**q`` where ``v * m`` or ``m * 2**q`` alone leaves float32 but the product does not."""
    v = torch.tensor([3e38, -3e38, 1e30, 1e-30, 2.0])
    m, q = torch.tensor(1.9), torch.tensor(-100.0)
    got = spec.apply_factor(v, m, q)
    ref = v.double() * 1.9 * 2.0**-100
    assert_rel_close(got, ref, torch.float32, "apply_factor")


def test_affine_with_stats_keeps_the_product_order():
    """Eval batch norm's issue-18 case: ``x = 1e30``, ``var = weight = 1e-20``, eps 1e-30 gives 1e20."""
    x = torch.tensor([1e30, -1e30, 3e38])
    y, x_hat, (r, k) = spec.affine_with_stats(x, torch.tensor(0.0), torch.tensor(1e-20), 1e-30, torch.tensor(1e-20), None)
    assert_rel_close(y, x.double() * 1e-20 / math.sqrt(1e-20 + 1e-30), torch.float32, "y")
    assert torch.isinf(x_hat).all()  # x_hat alone (1e40) is out of float32's range: no product order saves it


def test_merged_grad_sums_equal_the_sums_of_the_union():
    """SyncBatchNorm's backward building block: per-part sums at very different scales and pivots, merged,
    give the dx of the whole (against standardize_backward on the concatenation)."""
    x = torch.randn(10, 3, 4, dtype=torch.float64) * 5 + 1e6
    g = torch.cat([torch.randn(3, 3, 4, dtype=torch.float64) * 1e-20, torch.randn(7, 3, 4, dtype=torch.float64) * 1e20])
    dims = (0, 2)
    s = spec.standardize(x, dims, 1e-5)
    whole = spec.standardize_backward(g, s.x_hat, s.r, s.k, dims)
    parts = [spec.grad_sums(g[a:b], s.x_hat[a:b], dims, with_sum_x=True)[0] for a, b in ((0, 3), (3, 4), (4, 10))]
    merged = parts[0]
    for q in parts[1:]:
        merged = spec.merge_grad_sums(merged, q)
    for a, b in ((0, 3), (3, 4), (4, 10)):
        part = spec.standardize_backward_from_sums(g[a:b], s.x_hat[a:b], s.r, s.k, merged)
        assert_rel_close(part, whole[a:b], torch.float64, f"rows {a}:{b}")


# ---- the plain formulas' proof conditions --------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(amax_e=st.integers(-60, 60), gmax_e=st.integers(-130, 60), k_e=st.integers(-45, 100),
       c_e=st.integers(-130, 20), beta=st.sampled_from([0.0, 0.5, 0.75, 1.0, 1.25]), size=st.sampled_from([1, 3, 5]))
@example(amax_e=11, gmax_e=1, k_e=0, c_e=0, beta=0.5, size=1)  # a cancelling gradient (below)
def test_lrn_plain_formula_is_right_wherever_the_spec_says_it_is_safe(amax_e, gmax_e, k_e, c_e, beta, size):
    """Whenever lrn_plain_forward_ok / lrn_plain_backward_ok hold, LRN's plain float32 formula (forward and
    backward, the product order the kernel uses too) is finite and as accurate as the robust decomposition:
    forward within float32's tolerance of the oracle; backward within it wherever the robust path is, and
    everywhere within float32's tolerance of the size of the gradient's two terms.

    (The gradient ``dx = g d**-beta - 2 c beta x sum(g x d**(-beta-1))`` cancels where ``c x**2 >> k``: at
    ``x`` up to 2**11, ``k = c = 1``, ``beta = 0.5``, ``size = 1`` the terms are 315 times ``max|dx|``, and the
    robust path, torch's float32 and the plain formula are all 2e-5 of ``max|dx|`` off -- float32's rounding of
    the terms. What the spec's conditions promise is the plain formula's safety, not a better conditioned
    gradient.)"""
    from normkit.ops import local_response_norm as L

    torch.manual_seed(amax_e * 7919 + gmax_e)
    x = (torch.rand(2, 6, 3, 3, dtype=torch.float64) * 2 - 1) * 2.0**amax_e
    x[0, 0, 0, 0] = 2.0**amax_e  # the max is attained
    g = torch.randn(2, 6, 3, 3, dtype=torch.float64) * 2.0**gmax_e
    x, g = x.float(), g.float()
    c, k = 2.0**c_e, 2.0**k_e
    win = L.make_window("t", x, size, c * size, beta, k, "torch", "across_channels", 1)
    amax, gmax = x.abs().max().item(), g.abs().max().item()
    lo, hi = size // 2, (size - 1) // 2
    ref = oracle.lrn(oracle.ld(x), (1,), lo, hi, c, k, beta, oracle.ld(g), terms=True)
    if spec.lrn_plain_forward_ok(amax, size, c, k, beta, torch.float32):
        assert_rel_close(L._fast_forward(x, win), ref["y"], torch.float32, "plain forward")
    if spec.lrn_plain_backward_ok(amax, gmax, size, c, k, beta, torch.float32):
        plain, robust = L._fast_backward(g, x, win), L._robust_backward(g, x, win)
        tol, floor = REL_TOL[torch.float32], _subnormal_spacing(torch.float32)
        err = {name: np.abs(oracle.ld(dx) - ref["dx"]).max() for name, dx in (("plain", plain), ("robust", robust))}
        for name, dx in (("plain", plain), ("robust", robust)):
            assert torch.isfinite(dx).all(), name
            assert err[name] <= tol * ref["dx_terms"].max() + floor, (name, float(err[name]), float(ref["dx_terms"].max()))
        if err["robust"] <= tol / 2 * np.abs(ref["dx"]).max():  # a gradient well within reach of float32
            assert_rel_close(plain, ref["dx"], torch.float32, "plain backward")
