"""Local response normalization: torch parity, every convention against an explicit-loop long-double
oracle, ONNX's node cases, ONNX Runtime, gradients, robustness at every magnitude, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit.functional as nf
import oracle
from conftest import DTYPES, PARITY_TOL, assert_rel_close, needs_native
from normkit.ops import local_response_norm as L

SIZES = range(1, 10)


def run(f, x, dy):
    xg = x.detach().clone().requires_grad_()
    y = f(xg)
    (dx,) = torch.autograd.grad(y, xg, dy)
    return {"y": y.detach(), "dx": dx}


def windows(convention, size):
    lo, hi = {"torch": (size // 2, (size - 1) // 2), "onnx": ((size - 1) // 2, size // 2)}.get(
        convention, ((size - 1) // 2, (size - 1) // 2))
    return lo, hi


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 5), (2, 7, 4, 3), (1, 3, 2, 3, 2), (2, 96, 5, 5)])
def test_parity_with_torch(shape, dtype):
    """Every size, including even sizes and sizes larger than the channel count, every rank."""
    for size in list(SIZES) + [12]:
        x = torch.randn(shape, dtype=dtype) * 3
        dy = torch.randn(shape, dtype=dtype)
        got = run(lambda t: nf.local_response_norm(t, size, 1e-2, 0.75, 1.0), x, dy)
        ref = run(lambda t: F.local_response_norm(t, size, 1e-2, 0.75, 1.0), x, dy)
        for key in ref:
            assert_rel_close(got[key], ref[key], dtype, f"size {size} {shape}: {key}", rel=PARITY_TOL[dtype])


def test_parity_channels_last_and_strided():
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    assert_rel_close(nf.local_response_norm(x, 3), F.local_response_norm(x, 3), torch.float32)
    xs = torch.randn(2, 8, 5, 12)[..., ::2]
    assert_rel_close(nf.local_response_norm(xs, 4), F.local_response_norm(xs, 4), torch.float32)


CONVENTIONS = [("torch", s) for s in SIZES] + [("onnx", s) for s in SIZES] + [("caffe", s) for s in (1, 3, 5, 7, 9)] + [("tf", s) for s in (1, 3, 5, 11)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("convention,size", CONVENTIONS)
def test_conventions_against_oracle(convention, size, dtype):
    x = (torch.randn(2, 7, 4, 3, dtype=torch.float64) * 4).to(dtype)
    dy = torch.randn(2, 7, 4, 3, dtype=torch.float64).to(dtype)
    alpha, beta, k = 0.3, 0.65, 0.7
    lo, hi = windows(convention, size)
    c = alpha if convention == "tf" else alpha / size
    ref = oracle.lrn(oracle.ld(x), (1,), lo, hi, c, k, beta, oracle.ld(dy))
    got = run(lambda t: nf.lrn(t, size, alpha, beta, k, convention=convention), x, dy)
    for key in ref:
        assert_rel_close(got[key], ref[key], dtype, f"{convention} size {size}: {key}")


@pytest.mark.parametrize("size", [1, 3, 5])
def test_caffe_within_channel_against_oracle(size):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64) * 2
    dy = torch.randn_like(x)
    ref = oracle.lrn(oracle.ld(x), (2, 3), (size - 1) // 2, (size - 1) // 2, 0.4 / size**2, 1.0, 0.75, oracle.ld(dy))
    # k is ignored by Caffe's within-channel form: any k gives the same answer
    got = run(lambda t: nf.lrn(t, size, 0.4, 0.75, k=5.0, convention="caffe", region="within_channel"), x, dy)
    for key in ref:
        assert_rel_close(got[key], ref[key], torch.float64, key)


def test_tf_form_is_channels_last_with_undivided_alpha():
    x = torch.randn(2, 4, 5, 9, dtype=torch.float64)
    dy = torch.randn_like(x)
    ref = oracle.lrn(oracle.ld(x), (3,), 2, 2, 0.3, 1.5, 0.5, oracle.ld(dy))
    got = run(lambda t: nf.tf_local_response_normalization(t, depth_radius=2, bias=1.5, alpha=0.3, beta=0.5), x, dy)
    for key in ref:
        assert_rel_close(got[key], ref[key], torch.float64, key)
    same = nf.tf_local_response_normalization(x, size=5, bias=1.5, alpha=0.3, beta=0.5)
    assert torch.equal(same, got["y"])
    defaults = oracle.lrn(oracle.ld(x), (3,), 5, 5, 1.0, 1.0, 0.5)  # TF's defaults: r=5, bias=1, alpha=1, beta=0.5
    assert_rel_close(nf.tf_local_response_normalization(x), defaults["y"], torch.float64)


@pytest.mark.parametrize("convention", ["torch", "onnx", "caffe", "tf"])
def test_gradcheck_and_gradgradcheck(convention):
    x = torch.randn(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    for size, k in ((3, 0.5), (5, 0.0)):  # k = 0 takes the robust path
        f = lambda t: nf.lrn(t, size, 0.8, 0.6, k, convention=convention)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))
    f = lambda t: nf.lrn(t, 3, 0.8, 0.75, convention="caffe", region="within_channel")  # noqa: E731
    if convention == "caffe":
        assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))


def test_fast_and_robust_paths_agree():
    """The plain formula (taken when nothing can overflow) and the robust decomposition are one function."""
    x = torch.randn(2, 9, 4, 4, dtype=torch.float64) * 5
    g = torch.randn_like(x)
    for size in SIZES:
        win = L.make_window("t", x, size, 0.3, 0.75, 1.2, "onnx", "across_channels", 1)
        assert L._fast_ok(x, win)
        assert_rel_close(L._robust_forward(x, win), L._fast_forward(x, win), torch.float64, "forward")
        assert_rel_close(L._robust_backward(g, x, win), L._fast_backward(g, x, win), torch.float64, "backward")


# ----------------------------------------------------------------------------------- robustness
TOPS = {torch.float32: [1e-30, 1.0, 1e19, 1e20, 1e30, 3e38], torch.float64: [1e-300, 1.0, 1e150, 1e300],
        torch.float16: [1e-4, 1.0, 300.0, 6.5e4], torch.bfloat16: [1e-30, 1.0, 1e20, 1e38]}


@pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_robust_at_every_magnitude(dtype):
    """Finite and within tolerance for every magnitude the dtype holds, sizes 1..9, k = 0 included, and
    a tensor mixing 1e-30-scale and top-of-range channels (each window scaled on its own)."""
    for mag in TOPS[dtype]:
        for size in (1, 2, 5, 9):
            for k in (0.0, 1.0):
                x = ((torch.rand(2, 6, 3, 3, dtype=torch.float64) * 2 - 1) * mag).to(dtype)
                dy = torch.randn(2, 6, 3, 3, dtype=torch.float64).to(dtype)
                lo, hi = windows("torch", size)
                ref = oracle.lrn(oracle.ld(x), (1,), lo, hi, 1e-4 / size, k, 0.75, oracle.ld(dy))
                got = run(lambda t: nf.local_response_norm(t, size, 1e-4, 0.75, k), x, dy)
                for key in ref:
                    assert_rel_close(got[key], ref[key], dtype, f"magnitude {mag:g} size {size} k {k}: {key}")
    lo_mag, hi_mag = TOPS[dtype][0], TOPS[dtype][-1]
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    x[:, :3] *= hi_mag / 4
    x[:, 5:] *= lo_mag
    x = x.to(dtype)
    ref = oracle.lrn(oracle.ld(x), (1,), 1, 1, 1e-4 / 3, 0.0, 0.75)
    assert_rel_close(nf.local_response_norm(x, 3, 1e-4, 0.75, 0.0), ref["y"], dtype, "mixed magnitudes, k=0")


def test_torch_is_wrong_where_normkit_is_not():
    """Measured torch 2.13 failures: float32 at 1e20, and half precision refused for 4-D input."""
    x = torch.randn(2, 6, 3, 3) * 1e20
    ref = oracle.lrn(oracle.ld(x), (1,), 2, 2, 1e-4 / 5, 1.0, 0.75)["y"]
    with pytest.raises(AssertionError):
        assert_rel_close(F.local_response_norm(x, 5), ref, torch.float32)
    assert_rel_close(nf.local_response_norm(x, 5), ref, torch.float32)
    with pytest.raises(RuntimeError, match="not implemented for 'Half'"):
        F.local_response_norm(x.half(), 5)
    assert nf.local_response_norm(torch.randn(2, 6, 3, 3).half(), 5).dtype == torch.float16


# ------------------------------------------------------------------------------------- ONNX
def test_onnx_lrn_node_cases():
    from test_conformance import _all_onnx_cases, _attrs

    cases = [c for c in _all_onnx_cases() if c.model.graph.node[0].op_type == "LRN" and not c.name.endswith("_expanded")]
    assert cases, "onnx ships no LRN node cases"
    for case in cases:
        a = _attrs(case)
        for inputs, outputs in case.data_sets:
            x = torch.from_numpy(np.asarray(inputs[0], dtype=np.float64))
            y = nf.lrn(x, a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0), convention="onnx")
            assert_rel_close(y, outputs[0].astype(np.float64), torch.float32, case.name)


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_onnx_runtime_lrn(size):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=0.02, beta=0.7, bias=1.3)
    graph = helper.make_graph([node], "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 9, 4, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # ORT reads <= 13
    onnx.checker.check_model(model)
    x = (np.random.randn(2, 9, 4, 5) * 3).astype(np.float32)
    (y_ort,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    y = nf.lrn(torch.from_numpy(x), size, 0.02, 0.7, 1.3, convention="onnx")
    assert_rel_close(y, y_ort.astype(np.float64), torch.float32, f"size {size}", rel=PARITY_TOL[torch.float32])


# ------------------------------------------------------------------------------------- errors
x4 = torch.randn(2, 6, 3, 3)
BAD = [
    ("size 0", lambda: nf.local_response_norm(x4, 0), ValueError, "size must be a positive integer"),
    ("non-integer size", lambda: nf.local_response_norm(x4, 2.5), TypeError, "size must be a positive integer"),
    ("2-D input", lambda: nf.local_response_norm(torch.randn(2, 6), 3), ValueError, r"3D or higher.*got 2"),
    ("even caffe", lambda: nf.lrn(x4, 4, convention="caffe"), ValueError, "odd size"),
    ("even tf", lambda: nf.lrn(x4, 4, convention="tf"), ValueError, "odd size"),
    ("negative k", lambda: nf.local_response_norm(x4, 3, k=-1.0), ValueError, "k must be >= 0"),
    ("unknown convention", lambda: nf.lrn(x4, 3, convention="mxnet"), ValueError, "torch, onnx, caffe, tf"),
    ("unknown region", lambda: nf.lrn(x4, 3, convention="caffe", region="spatial"), ValueError, "across_channels, within_channel"),
    ("within_channel not caffe", lambda: nf.lrn(x4, 3, region="within_channel"), ValueError, "convention='caffe'"),
    ("within_channel 3-D", lambda: nf.lrn(torch.randn(2, 3, 4), 3, convention="caffe", region="within_channel"), ValueError, "4D input"),
    ("both size and depth_radius", lambda: nf.tf_local_response_normalization(x4, depth_radius=2, size=5), ValueError, "not both"),
    ("integer input", lambda: nf.local_response_norm(torch.ones(2, 3, 4, dtype=torch.int32), 3), TypeError, "floating-point"),
    ("nan alpha", lambda: nf.local_response_norm(x4, 3, alpha=float("nan")), ValueError, "alpha must be a finite"),
]


@pytest.mark.parametrize("what,call,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_empty_input():
    assert nf.local_response_norm(torch.randn(0, 4, 3), 3).shape == (0, 4, 3)


@pytest.mark.parametrize("k", [1.0, 0.0], ids=["fast path", "robust path"])
def test_no_pooling_kernel_and_no_float64(k):
    """No torch pooling/LRN kernel runs, and a float32 input never makes a float64 tensor."""
    from test_functional import FORBIDDEN, RecordOps

    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    with RecordOps() as rec:
        y = nf.local_response_norm(x, 3, 1e-2, 0.75, k)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.sum().backward()
    used = sorted(n for n in rec.seen if any(f in n for f in FORBIDDEN))
    assert not used, used
    assert torch.float64 not in rec.dtypes


# ------------------------------------------------------------------------------ native kernel


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.6])
def test_native_kernel_matches_torch_and_eager(dtype, beta):
    """The fused CPU kernel (large contiguous inputs) is built here, and agrees with torch and with both
    eager paths, forward and backward, for every specialised beta and odd, even and oversized windows."""
    from normkit import _native

    assert _native.load("lrn_kernel") is not None, _native.status()
    x = (torch.randn(3, 17, 40, 41, dtype=torch.float64) * 3).to(dtype)
    assert x.numel() >= L.NATIVE_MIN_NUMEL
    g = torch.randn_like(x)
    for size in (1, 4, 5, 20):
        win = L.make_window("t", x, size, 0.02, beta, 1.5, "torch", "across_channels", 1)
        got = run(lambda t: nf.local_response_norm(t, size, 0.02, beta, 1.5), x, g)
        ref = run(lambda t: F.local_response_norm(t, size, 0.02, beta, 1.5), x, g)
        for key in ref:
            assert_rel_close(got[key], ref[key], dtype, f"size {size}: {key}", rel=PARITY_TOL[dtype])
        with torch.no_grad():
            assert_rel_close(got["y"], L._fast_forward(x, win), dtype, "vs eager forward")
            assert_rel_close(got["dx"], L._robust_backward(g, x, win), dtype, "vs robust backward")


def test_native_kernel_can_be_disabled():
    import normkit
    from normkit import _native

    x = torch.randn(3, 17, 40, 41)
    with normkit.backend("eager"), _native.recording() as record:
        assert _native.load("lrn_kernel") is None
        assert_rel_close(nf.local_response_norm(x, 5), F.local_response_norm(x, 5), torch.float32, rel=PARITY_TOL[torch.float32])
    assert record["local_response_norm"] == "eager (plain formula: backend eager)"


@needs_native
def test_path_taken_is_reported():
    """normkit.status() names the path of the last call: the kernel, the plain eager formula (and why the
    kernel did not apply), or the robust path (the check could not prove the plain formula safe)."""
    from normkit import _native

    def path(x, k=1.0):
        with _native.recording():
            nf.local_response_norm(x, 5, 1e-4, 0.75, k)
            return _native.status()["ops"]["local_response_norm"]
    x = torch.randn(3, 17, 40, 41)
    assert path(x) == "native"
    assert path(x[:, :, :2, :2]) == f"eager (plain formula: fewer than {L.NATIVE_MIN_NUMEL} elements)"
    assert path(x.transpose(2, 3)) == "eager (plain formula: not contiguous)"
    assert path(x, k=0.0) == "eager (robust path)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_parity_with_torch_in_half_precision_on_3d_input(dtype):
    """torch supports half LRN for 3-D input on CPU (not 4-D and up): where it does, normkit agrees."""
    x = (torch.randn(2, 9, 7, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(2, 9, 7, dtype=torch.float64).to(dtype)
    for size in SIZES:
        got = run(lambda t: nf.local_response_norm(t, size, 1e-1, 0.75, 1.0), x, dy)
        ref = run(lambda t: F.local_response_norm(t, size, 1e-1, 0.75, 1.0), x, dy)
        for key in ref:
            assert got[key].dtype == dtype
            assert_rel_close(got[key], ref[key], dtype, f"size {size}: {key}", rel=PARITY_TOL[dtype])


@pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")
@pytest.mark.parametrize("dtype,mag", [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.bfloat16, 1e38)], ids=str)
def test_caffe_within_channel_robust_path(dtype, mag):
    """The robust path with a two-dimensional window (two separable exponent-aligned sums)."""
    x = ((torch.rand(2, 3, 6, 5, dtype=torch.float64) * 2 - 1) * mag).to(dtype)
    dy = torch.randn(2, 3, 6, 5, dtype=torch.float64).to(dtype)
    win = L.make_window("t", x, 3, 0.4, 0.75, 1.0, "caffe", "within_channel", 1)
    assert mag < 1 or not L._fast_ok(x.float(), win)
    ref = oracle.lrn(oracle.ld(x), (2, 3), 1, 1, 0.4 / 9, 1.0, 0.75, oracle.ld(dy))
    got = run(lambda t: nf.lrn(t, 3, 0.4, 0.75, convention="caffe", region="within_channel"), x, dy)
    for key in ref:
        assert_rel_close(got[key], ref[key], dtype, key)


@pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")
@pytest.mark.parametrize("dtype,mag", [(torch.float32, 1e-40), (torch.float64, 1e-310), (torch.bfloat16, 1e-40),
                                       (torch.float16, 1e-6)], ids=str)
def test_robust_path_on_subnormal_input(dtype, mag):
    """Subnormal inputs, k = 0: the mantissa split must not form 2**-e (which overflows for e < -126)."""
    x = ((torch.rand(2, 6, 3, 3, dtype=torch.float64) * 2 - 1) * mag).to(dtype)
    dy = torch.randn(2, 6, 3, 3, dtype=torch.float64).to(dtype)
    ref = oracle.lrn(oracle.ld(x), (1,), 1, 1, 1e-4 / 3, 0.0, 0.75, oracle.ld(dy))
    got = run(lambda t: nf.local_response_norm(t, 3, 1e-4, 0.75, 0.0), x, dy)
    for key in ref:
        assert_rel_close(got[key], ref[key], dtype, f"magnitude {mag:g}: {key}")


# ------------------------------------------------------------------------- regressions (issue 18)
@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("alpha", [0.0, 1e-30])
def test_plain_backward_cannot_overflow_where_float64_is_finite(backend, alpha):
    """The plain formula's backward forms ``g x d**(-beta-1)`` before ``c x``: at ``x = 2**10``,
    ``g = 2**30``, ``k = 2**-40``, ``beta = 1.25`` that is ``2**130``, past float32, while ``dx`` itself
    is 1.2e24. It used to give NaN (``alpha = 0``: inf * 0) and -inf, through the eager formula and the
    native kernel alike; the safety check of the plain formula must cover backward too."""
    from normkit import _native

    if backend == "native" and _native.load("lrn_kernel") is None:
        pytest.skip("native kernels unavailable here (no compiler, or NORMKIT_NATIVE=0)")
    shape = (2, 6, 5, 5) if backend == "eager" else (2, 6, 80, 80)  # the kernel takes inputs of 2**16 elements up
    x = torch.full(shape, 2.0**10)
    dy = torch.full(shape, 2.0**30)
    previous = _native.get_backend()
    _native.set_backend("eager" if backend == "eager" else "auto")
    try:
        got = run(lambda t: nf.local_response_norm(t, 3, alpha, 1.25, 2.0**-40), x, dy)
    finally:
        _native.set_backend(previous)
    ref = oracle.lrn(oracle.ld(x), (1,), 1, 1, alpha / 3, 2.0**-40, 1.25, oracle.ld(dy))
    assert abs(float(ref["dx"].max()) / 1.2089258e24 - 1) < 1e-6  # the float64 answer of the issue
    for key in ref:
        assert_rel_close(got[key], ref[key], torch.float32, f"alpha {alpha}: {key}")
