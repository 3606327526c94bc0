"""RMS normalization's numerics (``ops/rms_norm.py``): the mean square of scaled values at the top of each
dtype, rows of one element (``x / |x|``), the gradient without the mean term, against the oracle. Every
backend on the registry's adversarial cases: ``test_backends.py``; the eps=None rule: ``test_eps.py``."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as nf
import oracle
from conftest import assert_rel_close


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 3e38), (torch.float32, 1e-38), (torch.bfloat16, 1e38),
                                         (torch.float16, 6e4), (torch.float64, 1e300)], ids=str)
def test_mean_square_at_the_edges_of_the_range(dtype, scale):
    """Every value near the top (their squares overflow the dtype; float32's sum of squares would be inf)
    or near the bottom (their squares underflow) of the dtype's range."""
    x = ((torch.rand(4, 33, dtype=torch.float64) * 2 - 1) * scale).to(dtype)
    w = (torch.rand(33, dtype=torch.float64) + 0.5).to(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = nf.rms_norm(xg, (33,), wg, eps=0.0)
    y.backward(dy)
    L = oracle.ld
    ref = oracle.rms_norm(L(x), (33,), L(w), L(dy), 0.0)
    for key, got in (("y", y.detach()), ("dx", xg.grad), ("dweight", wg.grad)):
        assert_rel_close(got, ref[key], dtype, f"{dtype} at {scale:g}: {key}")


def test_rows_of_one_element_are_the_sign():
    x = torch.tensor([[3e38], [-2.0], [1e-40]])
    assert torch.equal(nf.rms_norm(x, (1,), eps=0.0), torch.tensor([[1.0], [-1.0], [1.0]]))
