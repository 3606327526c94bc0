"""normkit._spec: exact power-of-two scaling, robust moments, their merge, and the inverse std."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from normkit._spec import inv_std, merge_moments, moments, mul_pow2
from conftest import assert_rel_close


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
