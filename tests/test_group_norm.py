"""Group normalization's numerics (``ops/group_norm.py``): every group count from one channel per group
(instance norm) to one group (layer norm over channels and space), equal to those ops where they coincide,
against the oracle. Every backend on the registry's adversarial cases: ``test_backends.py``."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as nf
import oracle
from conftest import assert_rel_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_counts_against_oracle(groups, dtype):
    x = (torch.randn(3, 6, 4, 5, dtype=torch.float64) * 2 + 3).to(dtype)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(6, dtype=torch.float64).to(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = nf.group_norm(xg, groups, wg, bg)
    y.backward(dy)
    L = oracle.ld
    ref = oracle.group_norm(L(x), groups, L(w), L(b), L(dy), 1e-5)
    for key, got in (("y", y.detach()), ("dx", xg.grad), ("dweight", wg.grad), ("dbias", bg.grad)):
        assert_rel_close(got, ref[key], dtype, f"{groups} groups: {key}")


def test_one_channel_per_group_is_instance_norm_and_one_group_is_layer_norm():
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64) * 1e20
    assert_rel_close(nf.group_norm(x, 6), nf.instance_norm(x).double(), torch.float64, "groups = channels")
    assert_rel_close(nf.group_norm(x, 1), nf.layer_norm(x, x.shape[1:]).double(), torch.float64, "one group")
