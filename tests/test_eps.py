"""eps: the default of rms_norm, and which eps values each op and module accepts -- both as torch 2.13 does.

The eps table below was measured by calling torch 2.13 itself; ``test_torch_still_behaves_as_the_table_says``
re-measures every cell at test time, so the table cannot drift from torch unnoticed, and every
normkit test (one per op/module, mode and eps) is generated from it."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import normkit.functional as nf
import normkit.nn as nnk
import oracle
from conftest import DTYPES, PARITY_TOL, assert_matches_torch_or_oracle, assert_rel_close

# ----------------------------------------------------------------------------------- rms_norm eps=None
# torch 2.13 computes float16/bfloat16 in float32 and takes float32's eps for them (float64 keeps its own).
DEFAULT_RMS_EPS = {torch.float16: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.float32).eps,
                   torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def _small_activations(dtype, shape=(3, 5, 16)):
    """Magnitude 0.05: a mean square (2.5e-3) below bfloat16's eps (7.8e-3), so the eps used decides the output."""
    return (0.05 * torch.randn(shape, dtype=torch.float64)).to(dtype)


def _forward_backward(f, x, w, dy):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = f(xg, wg)
    y.backward(dy)
    return {"y": y.detach(), "dx": xg.grad, "dweight": wg.grad}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_matches_torch_functional(dtype):
    """eps=None: output, input and weight gradients as torch's, and as the oracle's with float32's eps."""
    x = _small_activations(dtype)
    w = (torch.rand(16, dtype=torch.float64) + 0.5).to(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    got = _forward_backward(lambda t, v: nf.rms_norm(t, (16,), v), x, w, dy)
    ref = _forward_backward(lambda t, v: F.rms_norm(t, (16,), v), x, w, dy)
    exact = oracle.rms_norm(oracle.ld(x), (16,), oracle.ld(w), oracle.ld(dy), DEFAULT_RMS_EPS[dtype])
    for key in got:
        assert_matches_torch_or_oracle(got[key], ref[key], exact[key], dtype, f"rms_norm eps=None {dtype}: {key}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_matches_torch_module(dtype):
    """``normkit.nn.RMSNorm(d)`` (eps=None) against ``torch.nn.RMSNorm(d)``: output and every gradient."""
    x = _small_activations(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    theirs = torch.nn.RMSNorm(16, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(16, dtype=torch.float64) + 0.5)
    mine = nnk.RMSNorm(16, dtype=dtype)
    mine.load_state_dict(theirs.state_dict(), strict=True)
    assert mine.eps is None and theirs.eps is None
    results = []
    for m in (mine, theirs):
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.backward(dy)
        results.append({"y": y.detach(), "dx": xg.grad, "dweight": m.weight.grad})
    exact = oracle.rms_norm(oracle.ld(x), (16,), oracle.ld(theirs.weight), oracle.ld(dy), DEFAULT_RMS_EPS[dtype])
    for key in results[0]:
        assert_matches_torch_or_oracle(results[0][key], results[1][key], exact[key], dtype, f"nn.RMSNorm {dtype}: {key}")


def test_rms_norm_default_eps_is_not_the_input_dtypes():
    """The regression itself: with bfloat16's own eps the output differs from torch's by up to ~1."""
    x = _small_activations(torch.bfloat16)
    wrong = nf.rms_norm(x, (16,), eps=torch.finfo(torch.bfloat16).eps)
    assert (wrong.double() - F.rms_norm(x, (16,)).double()).abs().max() > 0.1
    assert_rel_close(nf.rms_norm(x, (16,)), F.rms_norm(x, (16,)), torch.bfloat16, rel=PARITY_TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------- eps validation
# The eps values tried, by class.
EPS_VALUES = {"zero": 0.0, "negative zero": -0.0, "small negative": -1e-5, "negative": -2.0,
              "nan": math.nan, "inf": math.inf, "-inf": -math.inf}

POSITIVE = (ValueError, r"batch_norm eps must be positive during training, but got {eps}")
NON_NEGATIVE = (ValueError, r"batch_norm eps must be non-negative, but got {eps}")
FINITE, NAN = "finite", "nan"  # torch accepts the eps and returns a finite output / NaN somewhere

# torch 2.13, measured: what each op and mode does with each eps (input: randn (2, 4, 3, 3), variance ~1).
# Only batch norm checks eps, in its functional form (so every BatchNorm module too); NaN passes its
# checks (NaN <= 0 is false). Instance norm, even with running statistics, checks nothing.
TORCH_EPS_TABLE = {
    "batch_norm train": {"zero": POSITIVE, "negative zero": POSITIVE, "small negative": POSITIVE, "negative": POSITIVE,
                         "nan": NAN, "inf": FINITE, "-inf": POSITIVE},
    "batch_norm eval": {"zero": FINITE, "negative zero": FINITE, "small negative": NON_NEGATIVE, "negative": NON_NEGATIVE,
                        "nan": NAN, "inf": FINITE, "-inf": NON_NEGATIVE},
    **{name: {"zero": FINITE, "negative zero": FINITE, "small negative": FINITE, "negative": NAN,
              "nan": NAN, "inf": FINITE, "-inf": NAN}
       for name in ("instance_norm", "instance_norm running", "layer_norm", "group_norm", "rms_norm")},
}

X = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
RM, RV = torch.randn(4, generator=torch.Generator().manual_seed(2)) * 0.1, torch.rand(4, generator=torch.Generator().manual_seed(3)) + 0.5
W, B = torch.rand(4) + 0.5, torch.rand(4)


def _functional(lib, row, eps):
    """The call for one row of the table, in torch.nn.functional (``lib=F``) or normkit.functional."""
    rm, rv = RM.clone(), RV.clone()
    return {
        "batch_norm train": lambda: lib.batch_norm(X, rm, rv, W, B, True, 0.1, eps),
        "batch_norm eval": lambda: lib.batch_norm(X, rm, rv, W, B, False, 0.1, eps),
        "instance_norm": lambda: lib.instance_norm(X, None, None, W, B, True, 0.1, eps),
        "instance_norm running": lambda: lib.instance_norm(X, rm, rv, W, B, False, 0.1, eps),
        "layer_norm": lambda: lib.layer_norm(X, (3, 3), None, None, eps),
        "group_norm": lambda: lib.group_norm(X, 2, W, B, eps),
        "rms_norm": lambda: lib.rms_norm(X, (3, 3), None, eps),
    }[row]


# module: (row of the table, constructor, mode, input)
MODULES = {
    "BatchNorm1d train": ("batch_norm train", lambda ns, eps: ns.BatchNorm1d(4, eps=eps), "train", X.flatten(2)),
    "BatchNorm2d train": ("batch_norm train", lambda ns, eps: ns.BatchNorm2d(4, eps=eps), "train", X),
    "BatchNorm3d train": ("batch_norm train", lambda ns, eps: ns.BatchNorm3d(4, eps=eps), "train", X.unsqueeze(2)),
    "BatchNorm2d train, no running stats": ("batch_norm train", lambda ns, eps: ns.BatchNorm2d(4, eps=eps, track_running_stats=False), "eval", X),
    "BatchNorm2d eval": ("batch_norm eval", lambda ns, eps: ns.BatchNorm2d(4, eps=eps), "eval", X),
    "InstanceNorm2d": ("instance_norm", lambda ns, eps: ns.InstanceNorm2d(4, eps=eps, affine=True), "train", X),
    "InstanceNorm2d tracking, train": ("instance_norm", lambda ns, eps: ns.InstanceNorm2d(4, eps=eps, track_running_stats=True), "train", X),
    "InstanceNorm2d tracking, eval": ("instance_norm running", lambda ns, eps: ns.InstanceNorm2d(4, eps=eps, track_running_stats=True), "eval", X),
    "LayerNorm": ("layer_norm", lambda ns, eps: ns.LayerNorm((3, 3), eps=eps), "train", X),
    "GroupNorm": ("group_norm", lambda ns, eps: ns.GroupNorm(2, 4, eps=eps), "train", X),
    "RMSNorm": ("rms_norm", lambda ns, eps: ns.RMSNorm((3, 3), eps=eps), "train", X),
}


def _module(ns, name, eps):
    _, make, mode, x = MODULES[name]
    m = make(ns, eps)
    m.train(mode == "train")
    return lambda: m(x)


def _outcome(call):
    """What a call does: the exception it raised, or its output."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - recording torch's behaviour, whatever it is
        return e


def _assert_torch_cell(result, expected, eps):
    if isinstance(expected, tuple):
        exc, pattern = expected
        assert isinstance(result, exc), f"torch no longer raises {exc.__name__}: {result!r}"
        assert re.search(pattern.format(eps=re.escape(str(eps))), str(result)), f"torch's message changed: {result}"
    else:
        assert isinstance(result, torch.Tensor), f"torch now raises: {result!r}"
        assert bool(torch.isnan(result).any()) == (expected == NAN), f"torch's output is no longer {expected}"


CELLS = [(row, label) for row in TORCH_EPS_TABLE for label in EPS_VALUES]
MODULE_CELLS = [(name, label) for name in MODULES for label in EPS_VALUES]


@pytest.mark.parametrize("row,label", CELLS, ids=[f"{r}-{e}" for r, e in CELLS])
def test_torch_still_behaves_as_the_table_says(row, label):
    eps = EPS_VALUES[label]
    _assert_torch_cell(_outcome(_functional(F, row, eps)), TORCH_EPS_TABLE[row][label], eps)


def _assert_normkit_like_torch(mine, theirs, expected, eps, what):
    if isinstance(expected, tuple):
        exc, pattern = expected
        assert isinstance(mine, exc), f"{what}: expected {exc.__name__} as torch raises, got {mine!r}"
        assert str(eps) in str(mine) and "pass " in str(mine), f"{what}: the message names neither the value nor the fix: {mine}"
        return
    if math.isnan(eps):  # normkit's documented difference: a NaN eps is refused (it can only give NaN)
        assert isinstance(mine, ValueError) and "eps to be a real number" in str(mine), f"{what}: {mine!r}"
        return
    assert isinstance(mine, torch.Tensor), f"{what}: torch accepts eps={eps}, normkit raised {mine!r}"
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(mine), nan), f"{what}: NaN where torch has none, or the other way round"
    assert_rel_close(torch.where(nan, 0, mine), torch.where(nan, 0, theirs), torch.float32, what, rel=PARITY_TOL[torch.float32])


@pytest.mark.parametrize("row,label", CELLS, ids=[f"{r}-{e}" for r, e in CELLS])
def test_functional_eps_like_torch(row, label):
    """Same exception type (with the value and a fix in the message), or the same output, NaN included."""
    eps = EPS_VALUES[label]
    expected = TORCH_EPS_TABLE[row][label]
    _assert_normkit_like_torch(_outcome(_functional(nf, row, eps)), _outcome(_functional(F, row, eps)), expected, eps, f"{row} eps={eps}")


@pytest.mark.parametrize("name,label", MODULE_CELLS, ids=[f"{m}-{e}" for m, e in MODULE_CELLS])
def test_module_eps_like_torch(name, label):
    """Every module follows its functional row of the table (torch's modules check eps in forward, too)."""
    eps = EPS_VALUES[label]
    row = MODULES[name][0]
    theirs = _outcome(_module(torch.nn, name, eps))
    _assert_torch_cell(theirs, TORCH_EPS_TABLE[row][label], eps)
    _assert_normkit_like_torch(_outcome(_module(nnk, name, eps)), theirs, TORCH_EPS_TABLE[row][label], eps, f"{name} eps={eps}")


def test_refused_eps_leaves_running_stats_untouched():
    rm, rv = RM.clone(), RV.clone()
    with pytest.raises(ValueError, match="must be positive during training"):
        nf.batch_norm(X, rm, rv, training=True, eps=0.0)
    assert torch.equal(rm, RM) and torch.equal(rv, RV)


# ----------------------------------------------------------------------- constant groups with eps = 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_constant_group_with_zero_eps_is_nan(dtype):
    """0/0: float64 itself has no answer, so normkit returns NaN for that group, as torch's layer, group and
    RMS norm do; the other groups are unaffected. torch's instance norm returns 0 there (its batch-norm
    kernel special-cases var == eps == 0): a documented difference."""
    x = torch.randn(2, 4, 6, dtype=torch.float64).to(dtype)
    x[1, 2] = 3.0  # one constant row / instance / group
    rms_x = x.clone()
    rms_x[1, 2] = 0.0  # a zero row: RMS 0/0
    calls = {"layer_norm": (lambda lib: lib.layer_norm(x, (6,), eps=0.0), True),
             "rms_norm": (lambda lib: lib.rms_norm(rms_x, (6,), eps=0.0), True),
             "group_norm": (lambda lib: lib.group_norm(x.view(2, 8, 3), 4, eps=0.0), True),
             "instance_norm": (lambda lib: lib.instance_norm(x, eps=0.0), False)}
    for name, (call, torch_agrees) in calls.items():
        mine, theirs = call(nf), call(F)
        nan = torch.isnan(mine)
        expected = torch.zeros(2, 4, dtype=torch.bool)
        expected[1, 2] = True
        assert torch.equal(nan.view(2, 4, 6).all(-1), expected) and torch.equal(nan.view(2, 4, 6).any(-1), expected), name
        if torch_agrees:
            assert torch.equal(torch.isnan(theirs), nan), f"{name}: NaN where torch has none, or the other way round"
        else:
            assert not torch.isnan(theirs).any(), f"{name}: torch now returns NaN too: update the README"
        assert_rel_close(torch.where(nan, 0, mine), torch.where(nan, 0, theirs), dtype, name, rel=PARITY_TOL[dtype])
