"""The core contract beyond the conformance suite's sweep (``test_backends.py``, which runs every backend on
the registry's adversarial inputs): tiny eps on zero groups, groups of one element and of 2**24 elements,
and the inputs on which torch itself was measured wrong (guarding the comparison itself)."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as nf
import oracle
from cases import OPS_BY_NAME, adversarial_inputs, run_normkit, run_oracle
from conftest import DTYPES, assert_rel_close
from conftest import backend as use_backend

pytestmark = pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")

SHAPE = (4, 6, 5, 3)  # groups: BN 60, LN/RMS 15, GN 30, IN 15 values


def sweep(dtype, shape=SHAPE, seed=0):
    """``(label, scale, make)`` for every adversarial input of the registry (``normkit.check.cases.ADVERSARIAL``:
    magnitudes across the dtype's range, offsets far above the noise, constant groups); ``make()`` draws the
    float64 data of ``shape`` (before rounding to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    for inp in adversarial_inputs(dtype):
        yield inp.label, inp.scale, (lambda inp=inp: inp.make(g, shape))


def check_case(op, x, p, dy, dtype, label):
    got = run_normkit(op, x, p, dy)
    ref = run_oracle(op, x, p, dy)
    for key, value in got.items():
        assert_rel_close(value, ref[key], dtype, f"{op.name} {label}: {key}")


@pytest.fixture(autouse=True, params=["auto", "eager"])
def backend(request):
    """Every robustness case twice: through the native kernels where they serve (the default) and through
    the pure-torch reference path, which also runs under export, compile, torch.func and on GPUs."""
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_eps_on_zeros(dtype):
    """float16 batch norm with eps=1e-12 on zeros: torch returns NaN (eps rounds to 0 in float16)."""
    x = torch.zeros(4, 3, 5, dtype=dtype)
    for training in (True, False):
        rm, rv = torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype)
        y = nf.batch_norm(x, rm, rv, training=training, eps=1e-12)
        assert torch.equal(y, torch.zeros_like(x)), f"training={training}: {y.flatten()[:4]}"
    for f in (lambda t: nf.layer_norm(t, (5,), eps=1e-12), lambda t: nf.group_norm(t, 3, eps=1e-12),
              lambda t: nf.instance_norm(t, eps=1e-12), lambda t: nf.rms_norm(t, (5,), eps=1e-12)):
        xg = x.clone().requires_grad_()
        y = f(xg)
        assert torch.equal(y, torch.zeros_like(x))
        y.backward(torch.randn_like(x))
        # d/dx of x / sqrt(var + eps) at a constant group is finite (~1e6): representable or not, never NaN
        assert not torch.isnan(xg.grad).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_element_groups(dtype):
    """A reduction over one element: the output is the bias (x - mean = 0), and so is every gradient."""
    x = (torch.randn(3, 4, dtype=torch.float64) * 1e3).to(dtype)
    dy = torch.randn(3, 4, dtype=torch.float64).to(dtype)
    cases = [("layer_norm", lambda t: nf.layer_norm(t.unsqueeze(-1), (1,)).squeeze(-1), lambda t: 0 * t),
             ("group_norm", lambda t: nf.group_norm(t, 4), lambda t: 0 * t),
             ("rms_norm", lambda t: nf.rms_norm(t.unsqueeze(-1), (1,), eps=0.0).squeeze(-1), lambda t: torch.sign(t))]
    for name, f, expected in cases:
        xg = x.clone().requires_grad_()
        y = f(xg)
        assert_rel_close(y, expected(x.double()), dtype, f"{name} output")
        y.backward(dy)
        assert torch.isfinite(xg.grad).all(), name


LARGE = 2**24


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "batch_norm"])
def test_reduction_over_2_24_elements(name):
    """One group of 2**24 float32 values at an offset: sums this long must not drift."""
    op = OPS_BY_NAME[name]
    shape = (1, LARGE) if name != "batch_norm" else (2**12, 1, 2**12)
    x = (1e4 + torch.randn(shape, dtype=torch.float64)).float()
    p = op.params(x, 1e4)
    dy = torch.randn(shape)
    check_case(op, x, p, dy, torch.float32, "2**24 elements")


# Inputs on which torch 2.13 (CPU) was measured to be wrong beyond the tolerance, with the ops it fails.
TORCH_FAILURES = [
    ("float32 magnitude 1e19", torch.float32, lambda: (torch.rand(SHAPE, dtype=torch.float64) * 2 - 1) * 1e19,
     ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]),
    ("float32 offset 1e6", torch.float32, lambda: 1e6 + torch.randn(SHAPE, dtype=torch.float64),
     ["batch_norm", "layer_norm", "group_norm", "instance_norm"]),
    ("float32 constant 1e7", torch.float32, lambda: torch.full(SHAPE, 1e7, dtype=torch.float64),
     ["batch_norm", "group_norm", "instance_norm"]),  # layer_norm fails here only without affine
    ("bfloat16 magnitude 1e30", torch.bfloat16, lambda: (torch.rand(SHAPE, dtype=torch.float64) * 2 - 1) * 1e30,
     ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]),
    ("float16 offset 3e4", torch.float16, lambda: 3e4 + 64 * torch.randn(SHAPE, dtype=torch.float64),
     ["batch_norm", "instance_norm"]),
]


@pytest.mark.parametrize("label,dtype,make,ops", TORCH_FAILURES, ids=[f[0] for f in TORCH_FAILURES])
def test_torch_fails_where_normkit_does_not(label, dtype, make, ops):
    """Guards the sweep itself: the oracle comparison does catch torch's arithmetic on these inputs, so it
    would catch normkit regressing to it; normkit passes the same comparison."""
    x = make().to(dtype)
    for name in ops:
        op = OPS_BY_NAME[name]
        p = op.params(x, 1.0)
        ref = run_oracle(op, x, p, None)["y"]
        with pytest.raises(AssertionError):
            assert_rel_close(op.torch(x, p), ref, dtype, f"torch {name}")
        assert_rel_close(run_normkit(op, x, p, None)["y"], ref, dtype, f"normkit {name}")
