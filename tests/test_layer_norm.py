"""Layer normalization's numerics (``ops/layer_norm.py``): several trailing dims, rows of one element,
rows far from zero, and the rows the native kernel takes as one group against the oracle. Every backend on
the registry's adversarial cases: ``test_backends.py``."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as nf
import oracle
from conftest import assert_rel_close


def _check(x, normalized_shape, eps=1e-5, affine=True):
    shape = tuple(normalized_shape)
    w = (torch.rand(shape, dtype=torch.float64) + 0.5).to(x.dtype) if affine else None
    b = torch.randn(shape, dtype=torch.float64).to(x.dtype) if affine else None
    dy = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = nf.layer_norm(leaves[0], shape, *(leaves[1:] or [None, None]), eps=eps)
    y.backward(dy)
    L = oracle.ld
    ref = oracle.layer_norm(L(x), shape, L(w), L(b), L(dy), eps)
    got = {"y": y.detach(), "dx": leaves[0].grad}
    if affine:
        got.update(dweight=leaves[1].grad, dbias=leaves[2].grad)
    for key, value in got.items():
        assert_rel_close(value, ref[key], x.dtype, f"{tuple(x.shape)} over {shape}: {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,nd", [((3, 4, 5, 6), 3), ((2, 7, 11), 2), ((5, 1000), 1), ((4, 3), 1)])
def test_trailing_dims_against_oracle(shape, nd, dtype):
    """One, two and three trailing dims; rows of 1000 (more than one vector chunk) and of 3."""
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    _check(x, shape[-nd:])


@pytest.mark.parametrize("offset,scale", [(1e6, 1.0), (-3e7, 4.0), (0.0, 1e30), (0.0, 1e-30)])
def test_rows_far_from_zero(offset, scale):
    """Rows at a large offset over unit noise (the one-pass sums would cancel: the spec's shifted moments),
    at 1e30 (squares overflow float32: the scaled moments) and at 1e-30."""
    x = (offset + scale * torch.randn(6, 64, dtype=torch.float64)).float()
    _check(x, (64,))


def test_rows_of_one_element():
    """A row of one value is its own mean: the output is the bias, the input gradient 0."""
    x = torch.randn(5, 1) * 1e3
    _check(x, (1,))
