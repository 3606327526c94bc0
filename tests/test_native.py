"""The native kernels (ops/norm_kernel.cpp, ops/channels_last_kernel.cpp through ops/_kernels.py and ops/_plan.py): same answers
as the eager path and the float64 oracle on the robustness sweep and on awkward shapes, gradients included,
contiguous and channels_last; the custom ops pass torch.library.opcheck; a training forward keeps only the
input and O(groups) statistics; the eager fallback when disabled or when the build fails."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import normkit.functional as nf
from normkit import _native
from normkit.ops import _kernels, _normalize, _plan

import oracle
from cases import OPS, OPS_BY_NAME, num_groups, run_normkit, run_oracle, trailing_dims
from conftest import assert_rel_close, backend

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
def routed():
    """The functional API with the native kernels on (as ops/_normalize.py wires them: a kernel where
    ops/_plan.py finds one, else the eager path), and a record of which path served: returns the record."""
    _native.set_backend("auto")
    with _native.recording() as record:
        yield record
    _native.set_backend("auto")


def _paths(record) -> set:
    return {v.split(" ")[0] for v in record.values()}


# ---- the robustness sweep of test_robustness.py, through the kernels -------------------------------------

from test_robustness import check_case, sweep  # noqa: E402  (one sweep, shared)


def _both(op, x, p, dy):
    """normkit through the kernels and through the eager path, on the same input."""
    with backend("auto"):
        fast = run_normkit(op, x, p, dy)
    with backend("eager"):
        eager = run_normkit(op, x, p, dy)
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


def _assert_matches(fast, eager, ref, op, shape, why, dtype):
    """Native outputs and gradients against the eager path and the float64 oracle."""
    for key in fast:
        if key == "dx" and _group_size(op.name, shape) <= 2:
            continue  # groups of one or two: dx is pure cancellation (README, known differences)
        assert_rel_close(fast[key], eager[key].double(), dtype, f"{op.name} {why} {key}: native vs eager")
        assert_rel_close(fast[key], ref[key], dtype, f"{op.name} {why} {key}: native vs oracle")


@pytest.mark.parametrize("shape,why", AWKWARD, ids=[a[1] for a in AWKWARD])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_awkward_shapes_vs_eager_and_oracle(routed, op, dtype, shape, why):
    if len(shape) < op.min_dim:
        pytest.skip(f"{op.name} takes inputs of {op.min_dim} dims or more")
    if op.name in ("batch_norm", "instance_norm") and (
            (op.name == "instance_norm" and torch.Size(shape[2:]).numel() < 2) or torch.Size(shape).numel() // shape[1] < 2):
        pytest.skip("one value per channel: an error in training")
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    p = op.params(x, 1.0)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    fast, eager = _both(op, x, p, dy)
    ref = run_oracle(op, x, p, dy)
    _assert_matches(fast, eager, ref, op, shape, why, dtype)


def _group_size(name, shape):
    numel, spatial = torch.Size(shape).numel(), torch.Size(shape[2:]).numel()
    rows = torch.Size(shape[-trailing_dims(torch.empty(shape, device="meta")):]).numel()
    return {"batch_norm": numel // shape[1], "batch_norm_eval": 3, "instance_norm": spatial,
            "group_norm": shape[1] // num_groups(shape[1]) * spatial, "layer_norm": rows, "rms_norm": rows}[name]


def test_large_group_at_offset(routed):
    """One batch-norm channel of 2**20 values at 1e4 over unit noise: the chunked, compensated sums hold."""
    op = OPS_BY_NAME["batch_norm"]
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


# ---- layouts the kernels do not take: copied to contiguous first, with the same answer ---------------------

def test_strided_views_are_copied(routed):
    """Non-contiguous inputs other than channels last are copied to contiguous for the kernels; output layout
    and values as eager."""
    cl = torch.randn(2, 6, 10, 7).contiguous(memory_format=torch.channels_last)[:, :, ::2]  # channels last, rows skipped
    w, b = torch.rand(6) + 0.5, torch.rand(6)
    for f, copied in ((lambda t: nf.batch_norm(t, None, None, w, b, training=True), True),
                      (lambda t: nf.group_norm(t, 3, w, b), False),  # its grouped reshape already copies
                      (lambda t: nf.instance_norm(t, weight=w, bias=b), True)):
        with backend("eager"):
            ref = f(cl)
        _native._last_path.clear()
        got = f(cl)
        assert ("native (input copied to contiguous)" if copied else "native") in routed.values(), routed
        assert got.stride() == ref.stride()
        assert_rel_close(got, ref.double(), torch.float32, "strided channels_last view")
    view = torch.randn(8, 12)[:, ::2]  # a non-contiguous view
    assert_rel_close(nf.layer_norm(view, (6,)), nf.layer_norm(view.contiguous(), (6,)).double(), torch.float32, "view")


# ---- channels last: served in its own layout (ops/channels_last_kernel.cpp) ------------------------------

CL_OPS = [OPS_BY_NAME[name] for name in ("batch_norm", "batch_norm_eval", "instance_norm", "group_norm")]
# 99 = 64 + 32 + 3 channels: a full tile, a half tile and three scalar channels; group norm's 3 groups of 33
# channels straddle the tiles
CL_SHAPES = {"C=99": (2, 99, 3, 4)}  # (the conformance suite, test_backends.py, sweeps C = 6)
CL_NOTE = "native (channels_last)"


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("op", CL_OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("shape", list(CL_SHAPES.values()), ids=list(CL_SHAPES))
@pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")
def test_sweep_channels_last_vs_oracle(routed, op, dtype, shape):
    """The robustness sweep (1e-30 .. the dtype's top, offsets to 1e7, constants) on channels_last inputs: output
    and every gradient vs the oracle, served natively in that layout."""
    for label, scale, make in sweep(dtype, shape):
        x = _channels_last(make().to(dtype))
        p = op.params(x, scale)
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)  # contiguous: the kernel gets it transposed
        check_case(op, x, p, dy, dtype, f"channels_last {label}")
    assert set(routed.values()) == {CL_NOTE}, routed


CL_AWKWARD = [
    ((1, 65, 4, 4), "N=1, 65 channels: a tile and a scalar channel"),
    ((3, 7, 5, 3), "7 channels, scalar only"),
    ((2, 32, 3, 3), "one tile of 32 channels"),
    ((2, 96, 2, 2), "4 spatial values, below MIN_SEGMENT"),
    ((3, 48, 1, 2), "2 spatial values"),
    ((2, 16, 2, 3, 2), "channels_last_3d"),
]


@pytest.mark.parametrize("shape,why", CL_AWKWARD, ids=[a[1] for a in CL_AWKWARD])
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("op", CL_OPS, ids=lambda o: o.name)
def test_channels_last_awkward_shapes_vs_eager_and_oracle(routed, op, dtype, shape, why):
    x = _channels_last((torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype))
    p = op.params(x, 1.0)
    dy = _channels_last(torch.randn(shape, dtype=torch.float64).to(dtype))
    fast = run_normkit(op, x, p, dy)
    assert set(routed.values()) == {CL_NOTE}, routed
    with backend("eager"):
        eager = run_normkit(op, x, p, dy)
    ref = run_oracle(op, x, p, dy)
    _assert_matches(fast, eager, ref, op, shape, why, dtype)


@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 64, 5, 7), 1), ((2, 64, 5, 7), 32), ((2, 64, 5, 7), 64),
                                          ((1, 96, 3, 3), 3), ((1, 96, 3, 3), 96), ((3, 70, 2, 3), 7)])
def test_channels_last_group_counts_vs_oracle(routed, dtype, shape, groups):
    """Groups of every width: the whole row, 2 channels, 1 channel, 32 channels across tiles, 10 channels."""
    x = _channels_last((torch.randn(shape, dtype=torch.float64) * 2 - 1).to(dtype))
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(shape[1], dtype=torch.float64).to(dtype)
    dy = _channels_last(torch.randn(shape, dtype=torch.float64).to(dtype))
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = nf.group_norm(xg, groups, wg, bg)
    y.backward(dy)
    ref = oracle.group_norm(oracle.ld(x), groups, oracle.ld(w), oracle.ld(b), oracle.ld(dy), 1e-5)
    for key, got in (("y", y.detach()), ("dx", xg.grad), ("dweight", wg.grad), ("dbias", bg.grad)):
        assert_rel_close(got, ref[key], dtype, f"group_norm groups={groups} {key}")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert set(routed.values()) == {CL_NOTE}, routed


def test_channels_last_keeps_torchs_output_layout(routed):
    """The note says channels_last; outputs have torch's strides (channels_last kept by batch and group norm,
    instance norm contiguous), in 4-D and 5-D."""
    import torch.nn.functional as F

    for shape in ((2, 6, 5, 7), (2, 6, 3, 4, 2)):
        x = _channels_last(torch.randn(shape))
        c = shape[1]
        w, b, rm, rv = torch.rand(c) + 0.5, torch.rand(c), torch.randn(c), torch.rand(c) + 0.5
        for name, call in (("batch_norm train", lambda m: m.batch_norm(x, None, None, w, b, training=True)),
                           ("batch_norm eval", lambda m: m.batch_norm(x, rm, rv, w, b, training=False)),
                           ("group_norm", lambda m: m.group_norm(x, 3, w, b)),
                           ("instance_norm", lambda m: m.instance_norm(x, weight=w, bias=b)),
                           ("instance_norm no affine", lambda m: m.instance_norm(x))):
            _native._last_path.clear()
            got = call(nf)
            assert set(routed.values()) == {CL_NOTE}, (name, routed)
            assert got.stride() == call(F).stride(), name


def test_channels_last_ordinary_data_takes_the_plain_formula():
    """Ordinary data gets the one-pass plain formula (e = 0 in the saved statistics). A wrong sum sends a group
    to the robust passes, which still give the right answer, only slower: the value checks cannot see it.
    (Uniform data: a normal sample's first value, the pivot, may lie far enough out to need the robust passes.)"""
    for n, s, c, groups in [(1, 3000, 128, 128), (4, 300, 64, 16), (2, 500, 7, 7), (3, 200, 99, 33), (1, 5000, 32, 32)]:
        for dtype in NATIVE_DTYPES:
            x = (torch.rand(n, s, c) * 2 - 1).to(dtype)
            _, stats = _kernels.stats_norm(x, torch.ones(c), torch.zeros(c), _kernels.GROUPS_CL, groups, c, 1e-5, True)
            assert (stats[:, 0] == 0).all(), ((n, s, c, groups), dtype, stats[:, 0])


def test_channels_last_results_do_not_depend_on_the_thread_count():
    """Per sample on one thread, per (sample, chunk) on two: the same sums in the same order, bit for bit."""
    x = torch.randn(3, 5000, 48) * 3 + 1  # 3 samples of 2 chunks; 1 thread: per sample, 2 threads: per chunk
    dy = torch.randn(x.shape)
    w, b = torch.rand(48) + 0.5, torch.randn(48)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, stats = _kernels.stats_norm(x, w, b, _kernels.GROUPS_CL, 12, 48, 1e-5, True)
            results.append((y, stats, *_kernels.stats_norm_backward(dy, x, w, stats, _kernels.GROUPS_CL, 12, 48, True, True, True)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_channels_last_large_outputs_match_the_oracle(routed):
    """Outputs of 16 MiB and more are written with non-temporal stores (where AVX-512 is built): forward and
    backward as the oracle says, and served in the channels-last kernels."""
    x = _channels_last(torch.randn(4, 64, 128, 128) * 2 + 1)  # 16 MiB of float32
    dy = _channels_last(torch.randn(x.shape))
    p = {"weight": torch.rand(64) + 0.5, "bias": torch.randn(64), "running_mean": torch.randn(64),
         "running_var": torch.rand(64) + 0.5}
    for name in ("batch_norm", "batch_norm_eval", "group_norm"):
        op = OPS_BY_NAME[name]
        _native._last_path.clear()
        got = run_normkit(op, x, p, dy)
        assert set(routed.values()) == {CL_NOTE}, (name, routed)
        ref = run_oracle(op, x, p, dy)
        for key, value in got.items():
            assert_rel_close(value, ref[key], torch.float32, f"{name} {key}")


def test_channels_last_large_channel_at_offset(routed):
    """Batch norm over 2**20 channels_last values per channel at 1e4 over unit noise: chunked, compensated sums."""
    op = OPS_BY_NAME["batch_norm"]
    x = _channels_last((1e4 + torch.randn(64, 16, 128, 128, dtype=torch.float64)).float())
    p = op.params(x, 1e4)
    dy = torch.randn(x.shape)
    check_case(op, x, p, dy, torch.float32, "2**20 channels_last values")
    assert set(routed.values()) == {CL_NOTE}, routed


def test_float64_and_empty_stay_eager(routed):
    _native._last_path.clear()
    nf.layer_norm(torch.randn(3, 4, dtype=torch.float64), (4,))
    assert any("dtype torch.float64" in v for v in routed.values())
    assert nf.layer_norm(torch.randn(0, 4), (4,)).shape == (0, 4)


# ---- autograd, custom ops, memory ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_double_backward_matches_eager(routed, layout):
    x = torch.randn(3, 6, 4, 4).contiguous(memory_format=layout)
    w = torch.rand(6) + 0.5

    def grads(name, f):
        with backend(name):
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            (gx,) = torch.autograd.grad(f(xg, wg).pow(3).sum(), xg, create_graph=True)
            return torch.autograd.grad(gx.pow(2).sum(), (xg, wg))

    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    for f in (lambda t, w: nf.group_norm(t, 3, w), lambda t, w: nf.batch_norm(t, None, None, w, training=True),
              lambda t, w: nf.batch_norm(t, rm, rv, w, training=False)):
        for a, b in zip(grads("auto", f), grads("eager", f)):
            assert_rel_close(a, b.double(), torch.float32, "double backward")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_saved_for_backward_is_input_plus_statistics(routed, layout):
    """A training forward keeps the input (no copy) and 8 floats per group, not a full-size x_hat."""
    x = torch.randn(8, 16, 32, 32).contiguous(memory_format=layout).requires_grad_()
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
    yield _kernels.stats_norm, (torch.randn(5, 7), torch.rand(7) + .5, torch.randn(7), 0, 1, 7, 1e-5, True)
    yield _kernels.stats_norm, (torch.randn(3, 7).to(torch.bfloat16), torch.rand(7) + .5, None, 0, 1, 7, 1e-5, False)
    yield _kernels.stats_norm, (torch.randn(2, 6, 9), torch.rand(6) + .5, torch.randn(6), 1, 3, 6, 1e-5, True)
    yield _kernels.stats_norm, (torch.randn(2, 6, 3, 3), torch.rand(6) + .5, torch.randn(6), 2, 1, 6, 1e-5, True)
    stats = _kernels.stats_norm(torch.randn(2, 6, 9), torch.ones(6), torch.zeros(6), 2, 1, 6, 1e-5, True)[1]
    yield _kernels.stats_norm_backward, (torch.randn(2, 6, 9), torch.randn(2, 6, 9), torch.ones(6), stats, 2, 1, 6, True, True, True)
    yield _kernels.affine_eval, (torch.randn(2, 6, 9), torch.randn(6), torch.rand(6) + 1, torch.randn(6), torch.randn(6), 2, 1e-5)
    yield _kernels.affine_eval_backward, (torch.randn(2, 6, 9), torch.randn(2, 6, 9), torch.randn(6), torch.rand(6, dtype=f),
                                       torch.randn(6), 2, 1e-5, True, False)
    cl = _kernels.GROUPS_CL  # channels last: x (N, *, C) for the statistics op, (..., C) for the given-statistics one
    yield _kernels.stats_norm, (torch.randn(2, 9, 6), torch.rand(6) + .5, torch.randn(6), cl, 3, 6, 1e-5, True)
    yield _kernels.stats_norm, (torch.randn(1, 9, 20).to(torch.bfloat16), torch.rand(20) + .5, torch.randn(20), cl, 20, 20, 1e-5, True)
    stats = _kernels.stats_norm(torch.randn(2, 9, 6), torch.ones(6), torch.zeros(6), cl, 3, 6, 1e-5, True)[1]
    yield _kernels.stats_norm_backward, (torch.randn(2, 9, 6), torch.randn(2, 9, 6), torch.ones(6), stats, cl, 3, 6, True, True, True)
    yield _kernels.affine_eval, (torch.randn(18, 6), torch.randn(6), torch.rand(6) + 1, None, torch.randn(6), cl, 1e-5)
    yield _kernels.affine_eval_backward, (torch.randn(18, 6), torch.randn(18, 6), torch.randn(6), torch.rand(6, dtype=f),
                                       torch.randn(6), cl, 1e-5, True, True)
    # any strides (the ops are flexible_layout: Inductor hands channels_last tensors to them), outputs in x's
    chl = (lambda t: t.contiguous(memory_format=torch.channels_last))
    yield _kernels.stats_norm, (chl(torch.randn(2, 6, 3, 3)), torch.rand(6) + .5, torch.randn(6), 2, 1, 6, 1e-5, True)
    yield _kernels.stats_norm, (chl(torch.randn(2, 6, 3, 3)), torch.rand(6) + .5, None, 1, 3, 6, 1e-5, True)
    yield _kernels.stats_norm, (torch.randn(7, 5).t(), torch.rand(7) + .5, torch.randn(7), 0, 1, 7, 1e-5, True)
    stats = _kernels.stats_norm(chl(torch.randn(2, 6, 3, 3)), None, None, 2, 1, 6, 1e-5, True)[1]
    yield _kernels.stats_norm_backward, (torch.randn(2, 6, 3, 3), chl(torch.randn(2, 6, 3, 3)), torch.ones(6), stats, 2, 1, 6,
                                         True, True, True)
    yield _kernels.affine_eval, (chl(torch.randn(2, 6, 3, 3)), torch.randn(6), torch.rand(6) + 1, torch.randn(6), None, 2, 1e-5)
    yield _kernels.affine_eval_backward, (torch.randn(2, 6, 3, 3), chl(torch.randn(2, 6, 3, 3)), torch.randn(6),
                                       torch.rand(6) + 1, torch.randn(6), 2, 1e-5, True, True)
    # the constants of the forms torch.compile fuses
    yield _kernels.group_stats, (torch.randn(2, 6, 3, 3), 2, 1, 6, 1e-5, True)
    yield _kernels.group_stats, (chl(torch.randn(2, 6, 3, 3)), 1, 3, 6, 1e-5, True)
    yield _kernels.eval_constants, (torch.randn(6), torch.rand(6) + 1, torch.randn(6), 1e-5)
    # batch norm's running statistics (the routing cache's batch-norm route)
    stats = _kernels.stats_norm(torch.randn(4, 6, 3), None, None, 2, 1, 6, 1e-5, True)[1]
    yield _kernels.running_stats, (torch.randn(6), torch.rand(6) + .5, stats, 12, 0.1)
    yield _kernels.running_stats, (torch.randn(6).to(torch.bfloat16), torch.rand(6).to(torch.bfloat16), stats, 12, 0.37)


N_OPCHECK = 23  # the samples run the kernels: counted here, not at collection (where they may not be built)


def test_opcheck_covers_every_sample():
    assert len(list(_opcheck_samples())) == N_OPCHECK


@pytest.mark.parametrize("i", range(N_OPCHECK))
def test_opcheck(i):
    op, args = list(_opcheck_samples())[i]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and op in (_kernels.stats_norm, _kernels.affine_eval)
                 and a.dtype.is_floating_point and k in (0, 1, 2) else a for k, a in enumerate(args))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_custom_op_is_one_node_in_fx(mode, grad):
    """Recorded as one op even where plain eager no-grad calls skip the dispatcher and run the kernel."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        y = _normalize.standardize_affine(x, None, None, (-1,), 1e-5, True)[0]
        return y + _normalize.stats_affine(x.view(2, 4, 8), torch.zeros(1, 4, 1), torch.ones(1, 4, 1), None, None,
                                           1e-5).reshape(8, 8)
    with torch.set_grad_enabled(grad):
        gm = make_fx(f, tracing_mode=mode)(torch.randn(8, 8))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("normkit.stats_norm" in t for t in targets) and any("normkit.affine_eval" in t for t in targets), targets


def test_backward_ops_are_recorded_in_fx():
    """Backward calls the kernels directly in eager mode, but a traced backward records the backward ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        y = _normalize.standardize_affine(x, w.view(1, 4, 1), None, (0, 2), 1e-5, True)[0]
        y = y + _normalize.stats_affine(x, torch.zeros(1, 4, 1), torch.ones(1, 4, 1), w.view(1, 4, 1), None, 1e-5)
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
        direct = _normalize.standardize_affine(x, w.view(1, 6, 1), b.view(1, 6, 1), (0, 2), 1e-5, True)
    via_op = _normalize.standardize_affine(x, w.view(1, 6, 1).requires_grad_(), b.view(1, 6, 1), (0, 2), 1e-5, True)
    for a, o in zip(direct, via_op):
        assert torch.equal(a, o.detach())


# ---- switching off and failing builds -----------------------------------------------------------------

def test_set_backend_eager_serves_eagerly(routed):
    with backend("eager"):
        assert _plan.plan_standardize(torch.randn(4, 8), None, None, (-1,), True) == "backend eager"
        assert _native.status()["backend"] == "eager"
    with pytest.raises(ValueError):
        _native.set_backend("fast")


def test_first_kernel_use_inside_torch_compile():
    """A compiled function may be the first to want the kernels: the loader runs once at trace time (its lock
    is never traced) and the graph holds the custom op."""
    code = ("import torch, normkit.functional as nf; graphs = []\n"
            "def backend(gm, inputs):\n    graphs.append(gm); return gm.forward\n"
            "f = torch.compile(lambda x: nf.layer_norm(x, (8,)), fullgraph=True, backend=backend)\n"
            "x = torch.randn(4, 8)\n"
            "assert torch.allclose(f(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)\n"
            "assert any('stats_norm' in str(n.target) for n in graphs[0].graph.nodes); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_kernels_built_is_marked_as_the_public_decorator_marks():
    """normkit marks kernels_built constant for Dynamo without importing torch._dynamo: the mark must be the
    one torch.compiler.assume_constant_result sets (a torch upgrade that changes it fails here)."""
    def probe():
        return True
    torch.compiler.assume_constant_result(probe)
    mine = _kernels.assume_constant_result(lambda: True)
    assert vars(probe) == vars(mine) != {}


def test_importing_normkit_does_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", "import sys, normkit; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_env_switch_disables_without_building():
    code = ("import torch, normkit._native as n, normkit.ops._plan as f; "
            "assert f.plan_standardize(torch.randn(4, 8), None, None, (-1,), True) == 'backend eager'; "
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
        assert _plan.plan_standardize(torch.randn(4, 8), None, None, (-1,), True) == "kernels unavailable"
        assert _plan.plan_standardize(torch.randn(4, 8), None, None, (-1,), True) == "kernels unavailable"
    assert len([w for w in caught if "native kernels unavailable" in str(w.message)]) == 1
    assert "unavailable" in _native.status()["kernels"]
    with pytest.raises(RuntimeError, match="cannot run here .*no compiler.*install a C\\+\\+ compiler"):
        _native.set_backend("native")  # asked for by name: raises, naming the cause and the fix
    assert _native.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="no compiler"):
        _native.build(force=True)


def test_lrn_kernel_shares_the_module():
    assert hasattr(_native.load("lrn_kernel"), "lrn_forward") and hasattr(_native.load("norm_kernel"), "stats_norm")
    x = torch.randn(2, 16, 40, 40)
    assert_rel_close(nf.local_response_norm(x, 5), torch.nn.functional.local_response_norm(x, 5).double(), torch.float32)


# ---- the kernels' own argument checks (issue 18: an empty input used to crash the process) ----------------

_OP = "torch.ops.normkit"
BAD_CALLS = [
    ("empty rows", f"{_OP}.stats_norm(torch.empty(2, 0), torch.ones(0), torch.zeros(0), 0, 1, 0, 1e-5, True)"),
    ("empty rows, C=1", f"{_OP}.stats_norm(torch.empty(2, 0), None, None, 0, 1, 1, 1e-5, True)"),
    ("no rows", f"{_OP}.stats_norm(torch.empty(0, 4), torch.ones(4), torch.zeros(4), 0, 1, 4, 1e-5, True)"),
    ("empty channels", f"{_OP}.stats_norm(torch.empty(2, 3, 0), torch.ones(3), torch.zeros(3), 2, 1, 3, 1e-5, True)"),
    ("empty eval", f"{_OP}.affine_eval(torch.empty(2, 3, 0), torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), 2, 1e-5)"),
    ("empty eval backward", f"{_OP}.affine_eval_backward(torch.empty(2, 3, 0), torch.empty(2, 3, 0), torch.zeros(3), "
                            "torch.ones(3), None, 2, 1e-5, True, True)"),
    ("empty backward", f"{_OP}.stats_norm_backward(torch.empty(0, 4), torch.empty(0, 4), None, torch.empty(0, 8), 0, 1, 4, "
                       "True, True, True)"),
    ("weight size", f"{_OP}.stats_norm(torch.randn(2, 4), torch.ones(3), torch.zeros(4), 0, 1, 4, 1e-5, True)"),
    ("integer weight", f"{_OP}.stats_norm(torch.randn(2, 4), torch.ones(4, dtype=torch.long), None, 0, 1, 4, 1e-5, True)"),
    ("float64", f"{_OP}.stats_norm(torch.randn(2, 4).double(), torch.ones(4), torch.zeros(4), 0, 1, 4, 1e-5, True)"),
    ("layout", f"{_OP}.stats_norm(torch.randn(2, 4), torch.ones(4), torch.zeros(4), 7, 1, 4, 1e-5, True)"),
    ("C not dividing", f"{_OP}.stats_norm(torch.randn(2, 5), None, None, 0, 1, 4, 1e-5, True)"),
    ("groups not dividing", f"{_OP}.stats_norm(torch.randn(2, 6, 5), None, None, 1, 4, 6, 1e-5, True)"),
    ("statistics of another call", f"{_OP}.stats_norm_backward(torch.randn(2, 4), torch.randn(2, 4), None, torch.zeros(3, 8), "
                                   "0, 1, 4, True, True, True)"),
    ("dy of another shape", f"{_OP}.stats_norm_backward(torch.randn(2, 3), torch.randn(2, 4), None, torch.zeros(2, 8), 0, 1, 4, "
                            "True, True, True)"),
    ("eval statistics size", f"{_OP}.affine_eval(torch.randn(2, 3, 8), torch.zeros(2), torch.ones(3), None, None, 2, 1e-5)"),
    ("eval layout", f"{_OP}.affine_eval(torch.randn(2, 3, 8), torch.zeros(3), torch.ones(3), None, None, 0, 1e-5)"),
    ("empty lrn", "normkit._native.load('lrn_kernel').lrn_forward(torch.empty(2, 0, 3), 1, 1, 1e-4, 1.0, 0.75)"),
    ("empty channels last", f"{_OP}.stats_norm(torch.empty(1, 0, 4), torch.ones(4), torch.zeros(4), 3, 2, 4, 1e-5, True)"),
    ("running statistics size", f"{_OP}.running_stats(torch.zeros(3), torch.ones(4), torch.zeros(4, 8), 10, 0.1)"),
    ("running statistics of rows", f"{_OP}.running_stats(torch.zeros(4), torch.ones(4), torch.zeros(4, 7), 10, 0.1)"),
    ("one value per channel", f"{_OP}.running_stats(torch.zeros(4), torch.ones(4), torch.zeros(4, 8), 1, 0.1)"),
]


@pytest.fixture(scope="module")
def bad_call_results():
    """Every bad call in one subprocess (a crash must fail these tests, not the whole run): what each printed."""
    lines = ["import torch, normkit._native, normkit.ops._kernels", "normkit._native.load()"]
    for what, call in BAD_CALLS:
        lines += [f"try:\n    {call}\nexcept (RuntimeError, NotImplementedError) as e:",
                  f"    print({what!r}, 'refused:', str(e).splitlines()[0], flush=True)",
                  f"else:\n    print({what!r}, 'accepted', flush=True)"]
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NORMKIT_NATIVE": "1"})
    return out


@pytest.mark.parametrize("what,call", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_kernels_refuse_bad_arguments_with_an_error(bad_call_results, what, call):
    """Called directly with sizes, dtypes, devices or layouts they do not take, the operators raise an error
    naming the problem (TORCH_CHECK before any memory is read, or the dispatcher's "no kernel") instead of
    crashing."""
    out = bad_call_results
    assert out.returncode == 0, f"exit status {out.returncode} (the process crashed)\n{out.stdout}\n{out.stderr[-2000:]}"
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(f"{what} ")), None)
    assert line is not None and "refused:" in line, out.stdout


def test_kernels_take_the_plain_formula_exactly_where_the_spec_proves_it():
    """The kernels decide per group with _spec.plain_moments' conditions (their bounds compiled in from
    _spec.PLAIN): a group takes the one-pass formula (exponent 0 in the saved statistics) exactly where the
    spec's predicate, evaluated on the same group's one-pass sums, says it is safe. Rows chosen so that the
    robust recipe's exponent is never 0: unit-scale rows are 100 times larger."""
    from normkit import _spec as spec

    g = torch.Generator().manual_seed(0)
    u = lambda m: (torch.rand(64, generator=g, dtype=torch.float64) * 2 - 1) * m  # noqa: E731
    rows = {"ordinary (plain)": u(100.0), "max |x| above 2**50": u(2.0**52), "max |x| below 2**-50": u(2.0**-52),
            "offset 1e4 over unit noise (cancels)": 1e4 + u(1.0), "constant (plain, exact)": torch.full((64,), 300.0),
            "a spread of 2**-60 at 100 (variance below n * 2**-100)": 100.0 + u(2.0**-45)}
    x = torch.stack(list(rows.values())).float()
    for center in (True, False):
        _, stats = _kernels.stats_norm(x, torch.ones(64), torch.zeros(64), _kernels.ROWS, 1, 64, 1e-5, center)
        xd = x.double()
        d = xd - xd[:, :1] if center else xd
        ok, _, _ = spec.plain_moments(xd.abs().amax(1), d.sum(1), (d * d).sum(1), 64, center)
        plain = stats[:, 0] == 0
        assert plain.tolist() == ok.tolist(), (center, dict(zip(rows, zip(plain.tolist(), ok.tolist()))))
        assert 0 < int(ok.sum()) < len(rows)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_eval_dweight_where_x_hat_overflows(routed, layout):
    """Eval batch norm with ``running_var = weight = 1e-20`` at ``|x| ~ 1e30``: ``x_hat`` is 1e40 (inf in float32)
    but with ``dy ~ 1e-20`` every product ``dy * x_hat`` and ``dweight`` are finite; the kernels' fast sum is
    inf there and they sum again as _spec.eval_dweight does (rstd applied last)."""
    x = ((torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1) * 1e30).float().contiguous(memory_format=layout)
    dy = (torch.randn(x.shape) * 1e-20).contiguous(memory_format=layout)
    p = {"weight": torch.full((3,), 1e-20), "bias": torch.randn(3), "running_mean": torch.zeros(3),
         "running_var": torch.full((3,), 1e-20)}
    op = OPS_BY_NAME["batch_norm_eval"]
    got = run_normkit(op, x, p, dy, 1e-30)
    assert set(routed.values()) == {"native (channels_last)" if layout == torch.channels_last else "native"}, routed
    ref = run_oracle(op, x, p, dy, 1e-30)
    for key, value in got.items():
        assert_rel_close(value, ref[key], torch.float32, key)
