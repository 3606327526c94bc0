"""Shared test set-up: the one tolerance table, and comparisons that say where they fail."""

from __future__ import annotations

import contextlib
import math
import os
import shutil

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

# One tolerance per dtype, relative to max|ref| (the core issue's contract): float32/float64 to 1e-5;
# float16/bfloat16 to the dtype's own output rounding (half an ulp) plus 2e-3.
REL_TOL = {
    torch.float64: 1e-5,
    torch.float32: 1e-5,
    torch.float16: torch.finfo(torch.float16).eps / 2 + 2e-3,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2 + 2e-3,
}

# Parity with torch compares two results that were each rounded to the dtype once: one extra rounding.
PARITY_TOL = {dt: tol + (torch.finfo(dt).eps / 2 if dt in (torch.float16, torch.bfloat16) else 0.0) for dt, tol in REL_TOL.items()}

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_np(t) -> np.ndarray:
    """A tensor (or array) as a float64-or-wider numpy array (longdouble stays longdouble)."""
    if isinstance(t, torch.Tensor):
        return t.detach().double().cpu().numpy()
    return np.asarray(t)


def _subnormal_spacing(dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def assert_rel_close(out, ref, dtype, what="output", rel=None):
    """``max|out - ref| <= rel * max|ref|`` over the elements whose reference is representable in ``dtype``,
    and ``out`` finite wherever that reference is finite. The message says how many elements differ,
    the worst index, both values and the NaN/inf counts."""
    rel = REL_TOL[dtype] if rel is None else rel
    o, r = as_np(out).astype(np.longdouble), as_np(ref).astype(np.longdouble)
    assert o.shape == r.shape, f"{what}: shape {o.shape} != reference shape {r.shape}"
    top = torch.finfo(dtype).max
    representable = np.isfinite(r) & (np.abs(r) <= top)
    bad_finite = representable & ~np.isfinite(o)
    assert not bad_finite.any(), (
        f"{what}: {int(bad_finite.sum())} non-finite values where the reference is finite "
        f"(NaN {int(np.isnan(o).sum())}, inf {int(np.isinf(o).sum())}); first at "
        f"{np.unravel_index(np.argmax(bad_finite), o.shape)}: ref {r[bad_finite][0]!r}"
    )
    if not representable.any():
        return
    scale = np.abs(r[representable]).max()
    err = np.where(representable, np.abs(o - r), 0)
    worst = np.unravel_index(np.argmax(err), err.shape)
    tol = rel * scale + _subnormal_spacing(dtype)  # plus the dtype's own rounding at the bottom of its range
    n_bad = int((err > tol).sum())
    assert n_bad == 0, (
        f"{what} ({dtype}): {n_bad} of {err.size} elements off by more than {rel:.1e} * max|ref| = {float(tol):.3e}; "
        f"worst at {worst}: got {float(o[worst])!r}, ref {float(r[worst])!r} (max|err|/max|ref| = {float(err[worst] / scale) if scale else math.inf:.3e})"
    )


def assert_matches_torch_or_oracle(out, torch_out, oracle_out, dtype, what):
    """Parity with torch; where torch's own result is off (ill-conditioned gradients, cancellation), the
    float64 oracle decides, and normkit must meet the contract tolerance against it."""
    try:
        assert_rel_close(out, torch_out, dtype, what, rel=PARITY_TOL[dtype])
    except AssertionError as parity_failure:
        try:
            assert_rel_close(torch_out, oracle_out, dtype, what)
        except AssertionError:  # torch is wrong here: hold normkit to the oracle instead
            assert_rel_close(out, oracle_out, dtype, f"{what} (torch is off; vs oracle)")
        else:
            raise parity_failure


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# Tests of a native kernel itself: skipped where none can run (the eager path is tested everywhere else).
needs_native = pytest.mark.skipif(
    shutil.which("c++") is None or os.environ.get("NORMKIT_NATIVE", "1") == "0",
    reason="native kernels unavailable here (no C++ compiler) or switched off (NORMKIT_NATIVE=0)")


@contextlib.contextmanager
def backend(name: str):
    """``normkit.set_backend(name)`` for the block, the previous backend restored however it ends."""
    import normkit

    previous = normkit.get_backend() if os.environ.get("NORMKIT_NATIVE", "1") != "0" else "auto"
    normkit.set_backend(name)
    try:
        yield
    finally:
        normkit.set_backend(previous)
