"""The native kernels (ops/norm_kernel.cpp through ops/_fast.py): same answers as the eager path and the
float64 oracle on the robustness sweep and on awkward shapes, gradients included; the custom ops pass
torch.library.opcheck; a training forward keeps only the input and O(groups) statistics; the eager
fallback when disabled or when the build fails."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import normkit
import normkit.functional as nf
from normkit import _native
from normkit.ops import _fast, _normalize, batch_norm, group_norm, instance_norm, layer_norm

import oracle
from cases import OPS, OPS_BY_NAME, run_normkit, run_oracle
from conftest import REL_TOL, assert_rel_close

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", autouse=True)
def _built():
    if os.environ.get("NORMKIT_NATIVE", "1") == "0":
        pytest.skip("NORMKIT_NATIVE=0: the native kernels are switched off for this run")
    try:
        _native.build()
    except RuntimeError as exc:
        pytest.skip(f"native kernels cannot be built here: {exc}")
    yield
    _native.set_backend("auto")


@pytest.fixture
def routed(monkeypatch):
    """The functional API with the fast path in front of the eager one (as ops/_normalize.py wires it), and
    a record of which path served: returns the set of paths taken."""
    def sa(x, w, b, dims, eps, center=True):
        out = _fast.standardize_affine(x, w, b, dims, eps, center)
        return out if out is not None else _normalize.standardize_affine(x, w, b, dims, eps, center)

    def st(x, mean, var, w, b, eps):
        out = _fast.stats_affine(x, mean, var, w, b, eps)
        return out if out is not None else _normalize.stats_affine(x, mean, var, w, b, eps)

    for mod in (batch_norm, instance_norm, layer_norm, group_norm):
        monkeypatch.setattr(mod, "standardize_affine", sa)
        if hasattr(mod, "stats_affine"):
            monkeypatch.setattr(mod, "stats_affine", st)
    _native.set_backend("auto")
    _native._last_path.clear()
    yield _native._last_path
    _native.set_backend("auto")


def _paths(record) -> set:
    return {v.split(" ")[0] for v in record.values()}


# ---- the robustness sweep of test_robustness.py, through the kernels -------------------------------------

from test_robustness import SHAPE, check_case, sweep  # noqa: E402  (one sweep, shared)


@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")
def test_sweep_native_vs_oracle(routed, op, dtype):
    """Magnitudes 1e-30..3e38, offsets to 1e7, constant groups: output and every gradient vs the oracle."""
    for label, scale, make in sweep(dtype):
        x = make().to(dtype)
        p = op.params(x, scale)
        dy = torch.randn(SHAPE, dtype=torch.float64).to(dtype)
        check_case(op, x, p, dy, dtype, f"native {label}")
    assert _paths(routed) == {"native"}, routed


def _both(op, x, p, dy):
    """normkit through the kernels and through the eager path, on the same input."""
    _native.set_backend("auto")
    fast = run_normkit(op, x, p, dy)
    _native.set_backend("eager")
    eager = run_normkit(op, x, p, dy)
    _native.set_backend("auto")
    return fast, eager


AWKWARD = [
    ((1, 1, 1), "minimal"),
    ((3, 7, 5), "primes"),
    ((2, 63, 21, 19), "unaligned"),
    ((2, 6, 3000), "a group longer than one chunk"),
    ((5, 3, 2, 2), "groups of 4 spatial values"),
    ((2, 6, 1, 1), "single spatial value"),
    ((4, 6, 2), "groups of two"),
]


@pytest.mark.parametrize("shape,why", AWKWARD, ids=[a[1] for a in AWKWARD])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_awkward_shapes_vs_eager_and_oracle(routed, op, dtype, shape, why):
    if len(shape) < op.min_dim or (op.name == "group_norm" and shape[1] % 3):
        pytest.skip("shape not valid for this op")
    if op.name in ("batch_norm_train", "instance_norm") and (
            (op.name == "instance_norm" and torch.Size(shape[2:]).numel() < 2) or torch.Size(shape).numel() // shape[1] < 2):
        pytest.skip("one value per channel: an error in training")
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    p = op.params(x, 1.0)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    fast, eager = _both(op, x, p, dy)
    ref = run_oracle(op, x, p, dy)
    for key in fast:
        if key == "dx" and _group_size(op.name, shape) <= 2:
            continue  # groups of one or two: dx is pure cancellation (README, known differences)
        assert_rel_close(fast[key], eager[key].double(), dtype, f"{op.name} {why} {key}: native vs eager",
                         rel=2 * REL_TOL[dtype])
        assert_rel_close(fast[key], ref[key], dtype, f"{op.name} {why} {key}: native vs oracle")


def _group_size(name, shape):
    numel, spatial = torch.Size(shape).numel(), torch.Size(shape[2:]).numel()
    return {"batch_norm_train": numel // shape[1], "batch_norm_eval": 3, "instance_norm": spatial,
            "group_norm": shape[1] // 3 * spatial, "layer_norm": torch.Size(shape[-2:]).numel() if len(shape) >= 3 else shape[-1],
            "rms_norm": torch.Size(shape[-2:]).numel() if len(shape) >= 3 else shape[-1]}[name]


def test_large_group_at_offset(routed):
    """One batch-norm channel of 2**20 values at 1e4 over unit noise: the chunked, compensated sums hold."""
    op = OPS_BY_NAME["batch_norm_train"]
    x = (1e4 + torch.randn(16, 1, 2**16, dtype=torch.float64)).float()
    p = op.params(x, 1e4)
    dy = torch.randn(x.shape)
    check_case(op, x, p, dy, torch.float32, "2**20 values")
    assert _paths(routed) == {"native"}


def test_tiny_eps_and_zero_groups(routed):
    """eps below float32's range on zeros, and eps=1e-12 on zeros: 0 output, finite gradients."""
    for eps in (1e-12, 1e-50):
        x = torch.zeros(4, 6, 10, requires_grad=True)
        for f in (lambda t: nf.layer_norm(t, (10,), eps=eps), lambda t: nf.group_norm(t, 3, eps=eps),
                  lambda t: nf.instance_norm(t, eps=eps), lambda t: nf.rms_norm(t, (10,), eps=eps),
                  lambda t: nf.batch_norm(t, None, None, training=True, eps=eps)):
            x.grad = None
            y = f(x)
            assert torch.equal(y, torch.zeros_like(y))
            y.backward(torch.randn_like(y))
            assert not torch.isnan(x.grad).any()
    assert _paths(routed) == {"native"}


# ---- layouts the kernels do not take: the eager path serves, with the same answer ------------------------

def test_channels_last_and_views_are_copied(routed):
    """Non-contiguous inputs are copied to contiguous for the kernels; output layout and values as eager."""
    x = torch.randn(2, 6, 5, 7)
    cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(6) + 0.5, torch.rand(6)
    for f in (lambda t: nf.batch_norm(t, None, None, w, b, training=True), lambda t: nf.group_norm(t, 3, w, b),
              lambda t: nf.instance_norm(t, weight=w, bias=b)):
        _native.set_backend("eager")
        ref = f(cl)
        _native.set_backend("auto")
        _native._last_path.clear()
        got = f(cl)
        assert "native (input copied to contiguous)" in routed.values(), routed
        assert got.stride() == ref.stride()
        assert_rel_close(got, ref.double(), torch.float32, "channels_last")
    view = torch.randn(8, 12)[:, ::2]  # a non-contiguous view
    assert_rel_close(nf.layer_norm(view, (6,)), nf.layer_norm(view.contiguous(), (6,)).double(), torch.float32, "view")


def test_float64_and_empty_stay_eager(routed):
    _native._last_path.clear()
    nf.layer_norm(torch.randn(3, 4, dtype=torch.float64), (4,))
    assert any("dtype torch.float64" in v for v in routed.values())
    assert nf.layer_norm(torch.randn(0, 4), (4,)).shape == (0, 4)


# ---- autograd, custom ops, memory ---------------------------------------------------------------------

def test_double_backward_matches_eager(routed):
    x = torch.randn(3, 6, 4, 4)
    w = torch.rand(6) + 0.5

    def grads(backend):
        _native.set_backend(backend)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx,) = torch.autograd.grad(nf.group_norm(xg, 3, wg).pow(2).sum(), xg, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (xg, wg))

    for a, b in zip(grads("auto"), grads("eager")):
        assert_rel_close(a, b.double(), torch.float32, "double backward")


def test_saved_for_backward_is_input_plus_statistics(routed):
    """A training forward keeps the input (no copy) and 8 floats per group, not a full-size x_hat."""
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nf.batch_norm(x, None, None, w, b, training=True)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() == x.data_ptr() for t in big), [tuple(t.shape) for t in big]
    assert sum(t.numel() for t in saved if t.numel() < x.numel()) <= 16 * 8 + 3 * 16


def _opcheck_samples():
    f = torch.float32
    yield _fast.stats_norm, (torch.randn(5, 7), torch.rand(7) + .5, torch.randn(7), 0, 1, 1e-5, True)
    yield _fast.stats_norm, (torch.randn(3, 7).to(torch.bfloat16), torch.rand(7) + .5, torch.randn(7), 0, 1, 1e-5, False)
    yield _fast.stats_norm, (torch.randn(2, 6, 9), torch.rand(6) + .5, torch.randn(6), 1, 3, 1e-5, True)
    yield _fast.stats_norm, (torch.randn(2, 6, 9), torch.rand(6) + .5, torch.randn(6), 2, 1, 1e-5, True)
    stats = _fast.stats_norm(torch.randn(2, 6, 9), torch.ones(6), torch.zeros(6), 2, 1, 1e-5, True)[1]
    yield _fast.stats_norm_backward, (torch.randn(2, 6, 9), torch.randn(2, 6, 9), torch.ones(6), stats, 2, 1, True, True, True)
    yield _fast.affine_eval, (torch.randn(2, 6, 9), torch.randn(6), torch.rand(6) + 1, torch.randn(6), torch.randn(6), 1e-5)
    yield _fast.affine_eval_backward, (torch.randn(2, 6, 9), torch.randn(2, 6, 9), torch.randn(6), torch.rand(6, dtype=f),
                                       torch.randn(6), 1e-5, True, False)


@pytest.mark.parametrize("i", range(7))
def test_opcheck(i):
    op, args = list(_opcheck_samples())[i]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and op in (_fast.stats_norm, _fast.affine_eval)
                 and a.dtype.is_floating_point and k in (0, 1, 2) else a for k, a in enumerate(args))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_custom_op_is_one_node_in_fx(mode, grad):
    """Recorded as one op even where plain eager no-grad calls skip the dispatcher and run the kernel."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        y = _fast.standardize_affine(x, None, None, (-1,), 1e-5, True)[0]
        return y + _fast.stats_affine(x.view(2, 4, 8), torch.zeros(1, 4, 1), torch.ones(1, 4, 1), None, None, 1e-5).reshape(8, 8)
    with torch.set_grad_enabled(grad):
        gm = make_fx(f, tracing_mode=mode)(torch.randn(8, 8))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("normkit.stats_norm" in t for t in targets) and any("normkit.affine_eval" in t for t in targets), targets


def test_backward_ops_are_recorded_in_fx():
    """Backward calls the kernels directly in eager mode, but a traced backward records the backward ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        y = _fast.standardize_affine(x, w.view(1, 4, 1), None, (0, 2), 1e-5, True)[0]
        y = y + _fast.stats_affine(x, torch.zeros(1, 4, 1), torch.ones(1, 4, 1), w.view(1, 4, 1), None, 1e-5)
        return torch.autograd.grad(y.square().sum(), (x, w))
    x, w = torch.randn(2, 4, 9, requires_grad=True), torch.rand(4).add(0.5).requires_grad_()
    gm = make_fx(f)(x, w)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("normkit.stats_norm_backward" in t for t in targets) and any("normkit.affine_eval_backward" in t for t in targets), targets
    for got, ref in zip(gm(x, w), f(x, w)):
        assert torch.equal(got, ref)


def test_no_grad_calls_match_the_op():
    """The dispatcher-free no-grad route and the custom op give identical results."""
    x, w, b = torch.randn(4, 6, 9), torch.rand(6) + 0.5, torch.randn(6)
    with torch.no_grad():
        direct = _fast.standardize_affine(x, w.view(1, 6, 1), b.view(1, 6, 1), (0, 2), 1e-5, True)
    via_op = _fast.standardize_affine(x, w.view(1, 6, 1).requires_grad_(), b.view(1, 6, 1), (0, 2), 1e-5, True)
    for a, o in zip(direct, via_op):
        assert torch.equal(a, o.detach())


# ---- switching off and failing builds -----------------------------------------------------------------

def test_set_backend_eager_serves_eagerly(routed):
    _native.set_backend("eager")
    assert _fast.standardize_affine(torch.randn(4, 8), None, None, (-1,), 1e-5, True) is None
    assert _native.status()["backend"] == "eager"
    with pytest.raises(ValueError):
        _native.set_backend("fast")


def test_env_switch_disables_without_building():
    code = ("import torch, normkit._native as n, normkit.ops._fast as f; "
            "assert f.standardize_affine(torch.randn(4, 8), None, None, (-1,), 1e-5, True) is None; "
            "assert n._module is None and n.status()['backend'] == 'eager'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NORMKIT_NATIVE": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise OSError("no compiler")

    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setattr(_native, "_compile", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _fast.standardize_affine(torch.randn(4, 8), None, None, (-1,), 1e-5, True) is None
        assert _fast.standardize_affine(torch.randn(4, 8), None, None, (-1,), 1e-5, True) is None
    assert len([w for w in caught if "native kernels unavailable" in str(w.message)]) == 1
    assert "unavailable" in _native.status()["kernels"]
    _native.set_backend("native")
    try:
        with pytest.raises(RuntimeError):
            _native.build(force=True)
    finally:
        _native.set_backend("auto")


def test_lrn_kernel_shares_the_module():
    assert hasattr(_native.load("lrn_kernel"), "lrn_forward") and hasattr(_native.load("norm_kernel"), "stats_forward")
    x = torch.randn(2, 16, 40, 40)
    assert_rel_close(nf.local_response_norm(x, 5), torch.nn.functional.local_response_norm(x, 5).double(), torch.float32)
