"""Bad input gets a clear error naming the problem and the fix -- before any work is done. The types are
torch's (see test_contracts.py for the comparison with torch itself); they also subclass ValueError/TypeError."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as nf

x4 = torch.randn(2, 6, 3, 3)

BAD = [
    ("integer input", lambda: nf.layer_norm(torch.ones(2, 3, dtype=torch.int64), (3,)), NotImplementedError, "floating-point input.*int64.*input.float"),
    ("complex input", lambda: nf.batch_norm(torch.ones(2, 3, dtype=torch.complex64), None, None, training=True), TypeError, "complex64"),
    ("not a tensor", lambda: nf.group_norm([[1.0, 2.0]], 1), TypeError, "torch.Tensor"),
    ("running_mean size", lambda: nf.batch_norm(x4, torch.zeros(5), torch.ones(6)), RuntimeError, r"running_mean of shape \[6\].*got \[5\]"),
    ("running_var size", lambda: nf.instance_norm(x4, torch.zeros(6), torch.ones(7)), ValueError, r"running_var of shape \[6\].*got \[7\]"),
    ("weight size", lambda: nf.batch_norm(x4, None, None, torch.ones(3), training=True), RuntimeError, r"weight of shape \[6\]"),
    ("bias size", lambda: nf.group_norm(x4, 3, torch.ones(6), torch.ones(2)), ValueError, r"bias of shape \[6\]"),
    ("integer weight", lambda: nf.batch_norm(x4, None, None, torch.ones(6, dtype=torch.int64), training=True), RuntimeError, "weight to be floating point"),
    ("one value per channel", lambda: nf.batch_norm(torch.randn(1, 4), None, None, training=True), ValueError, "more than 1 value per channel when training.*eval mode"),
    ("one spatial element", lambda: nf.instance_norm(torch.randn(3, 4, 1)), ValueError, "more than 1 spatial element"),
    ("eval without running stats", lambda: nf.batch_norm(x4, None, None, training=False), RuntimeError, "running_mean and running_var must be given"),
    ("groups not dividing", lambda: nf.group_norm(torch.randn(2, 16, 3), 5), RuntimeError, "num_groups=5 must divide num_channels=16"),
    ("zero groups", lambda: nf.group_norm(x4, 0), ValueError, "positive integer"),
    ("normalized_shape mismatch", lambda: nf.layer_norm(torch.randn(2, 5), 7), RuntimeError, r"normalized_shape=\[7\], expected input with shape \[\*, 7\].*\[2, 5\]"),
    ("normalized_shape too long", lambda: nf.rms_norm(torch.randn(5), (2, 5)), ValueError, r"expected input with shape \[\*, 2, 5\]"),
    ("layer_norm weight shape", lambda: nf.layer_norm(torch.randn(2, 5), (5,), torch.ones(4)), ValueError, r"weight of shape \[5\]"),
    ("1-D batch norm", lambda: nf.batch_norm(torch.randn(5), None, None, training=True), ValueError, r"at least 2 dimensions \(N, C, \*\)"),
    ("eps not a number", lambda: nf.layer_norm(torch.randn(2, 5), (5,), eps="small"), ValueError, "eps to be a real number"),
    ("momentum None", lambda: nf.batch_norm(x4, torch.zeros(6), torch.ones(6), training=True, momentum=None), ValueError, "momentum=None.*nn module"),
    ("float64 weight, float32 input", lambda: nf.layer_norm(torch.randn(2, 5), (5,), torch.ones(5, dtype=torch.float64)), RuntimeError, r"mixed dtype.*float64.*module.to"),
    ("zero eps in training", lambda: nf.batch_norm(x4, None, None, training=True, eps=0.0), ValueError, "must be positive during training, but got 0.0.*pass a positive eps"),
    ("negative eps in eval", lambda: nf.batch_norm(x4, torch.zeros(6), torch.ones(6), eps=-1e-3), ValueError, "must be non-negative, but got -0.001"),
]


@pytest.mark.parametrize("what,call,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_clearly(what, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_running_stats_are_untouched_when_refused():
    rm, rv = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError):
        nf.batch_norm(x4, rm, rv, torch.ones(5), training=True)
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))


def test_nan_input_propagates_instead_of_crashing():
    x = torch.randn(2, 3, 4)
    x[0, 1, 2] = float("nan")
    y = nf.layer_norm(x, (4,))
    assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[1]).all() and torch.isfinite(y[0, 0]).all()
