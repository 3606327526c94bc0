"""Instance normalization's numerics (``ops/instance_norm.py``): running statistics as the batch average of
the per-instance statistics, as torch's; normalizing with them (``use_input_stats=False``) at the edges of
float32. Every backend on the registry's adversarial cases: ``test_backends.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import normkit.functional as nf
import oracle
from conftest import assert_rel_close


def test_instance_norm_running_stats_and_eval():
    rm, rv = torch.zeros(3), torch.ones(3)
    trm, trv = rm.clone(), rv.clone()
    for _ in range(3):
        x = torch.randn(4, 3, 6, 5) * 2 + 1
        nf.instance_norm(x, rm, rv, momentum=0.2)
        F.instance_norm(x, trm, trv, momentum=0.2)
        assert_rel_close(rm, trm, torch.float32, "running_mean")
        assert_rel_close(rv, trv, torch.float32, "running_var")
    x = torch.randn(4, 3, 6, 5)
    assert_rel_close(nf.instance_norm(x, rm, rv, use_input_stats=False),
                     F.instance_norm(x, trm, trv, use_input_stats=False), torch.float32, "eval")


def test_given_statistics_with_extreme_parameters():
    """``use_input_stats=False`` takes batch norm's given-statistics path: ``running_var = weight = 1e-20``
    at ``x = 1e30`` gives 1e20 (``(x - mean) * rstd`` alone is 1e40), output and every gradient."""
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2e30 - 1e30).float()
    rm, rv, w, b = torch.zeros(3), torch.full((3,), 1e-20), torch.full((3,), 1e-20), torch.randn(3)
    dy = torch.randn(x.shape) * 1e-20  # dweight = sum(dy * x_hat) is finite only because dy is this small
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = nf.instance_norm(xg, rm, rv, wg, bg, use_input_stats=False, eps=1e-30)
    y.backward(dy)
    L = oracle.ld
    ref = oracle.batch_norm(L(x), L(w), L(b), L(dy), 1e-30, L(rm), L(rv))
    for key, got in (("y", y.detach()), ("dx", xg.grad), ("dweight", wg.grad), ("dbias", bg.grad)):
        assert_rel_close(got, ref[key], torch.float32, key)
