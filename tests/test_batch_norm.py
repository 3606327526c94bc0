"""Batch normalization's numerics (``ops/batch_norm.py``): running statistics over steps as torch's,
two-element groups, eval with given statistics at the edges of float32 (through normkit in torch, with an
eps below float32's range, and through the ONNX subgraphs). Every backend on the registry's adversarial
cases: ``test_backends.py``; SyncBatchNorm: ``test_sync_batchnorm.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.functional as nf
import normkit.nn as nnk
import oracle
from conftest import PARITY_TOL, assert_rel_close


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_running_stats_over_steps(dtype, momentum):
    """Four training steps then eval: running buffers and outputs follow torch's exactly."""
    shape = (6, 4, 5, 3)
    mine = [torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)]
    theirs = [t.clone() for t in mine]
    w, b = torch.rand(4, dtype=dtype) + 0.5, torch.rand(4, dtype=dtype)
    for step in range(4):
        x = (3 * torch.randn(shape, dtype=torch.float64) + step).to(dtype)
        nf.batch_norm(x, *mine, w, b, training=True, momentum=momentum)
        F.batch_norm(x, *theirs, w, b, training=True, momentum=momentum)
        for a, t, name in zip(mine, theirs, ("running_mean", "running_var")):
            assert_rel_close(a, t, dtype, f"step {step} {name}", rel=PARITY_TOL[dtype])
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    assert_rel_close(nf.batch_norm(x, *mine, w, b), F.batch_norm(x, *theirs, w, b), dtype, "eval", rel=PARITY_TOL[dtype])


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_running_stats_the_kernels_give_are_the_specs(dtype, momentum):
    """The routing cache's batch-norm route updates the running statistics in one native call
    (``normkit::running_stats``); the eager path by :func:`normkit._spec.running_stats`. Both, step after step
    from the same buffers, agree to float32 rounding (the products rounded alike, no fused multiply-add), and
    the module's buffers (``momentum=None``: the cumulative average) agree as well."""
    from normkit import _native

    shape = (3, 5, 4, 4)
    start = [torch.randn(5).to(dtype), (torch.rand(5) + 0.5).to(dtype)]
    results = {}
    for backend in ("auto", "eager"):
        bufs = [t.clone() for t in start]
        with normkit.backend(backend), _native.recording() as paths:
            for step in range(3):
                x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(step)) + step).to(dtype)
                nf.batch_norm(x, *bufs, training=True, momentum=momentum)
        results[backend] = bufs
        if backend == "auto" and _native.serving:
            assert all(p.startswith("native") for p in paths.values()), paths
    for a, b, name in zip(results["auto"], results["eager"], ("running_mean", "running_var")):
        assert a.dtype == b.dtype == dtype
        assert_rel_close(a, b.double(), dtype, name, rel=1e-6 if dtype == torch.float32 else None)


def test_running_stats_of_modules_through_the_kernels():
    """BatchNorm2d in training, momentum 0.1 and None (the cumulative average), on either backend: the buffers
    and ``num_batches_tracked`` as torch's module keeps them."""
    for momentum in (0.1, None):
        theirs = torch.nn.BatchNorm2d(4, momentum=momentum)
        mine = nnk.BatchNorm2d(4, momentum=momentum)
        for step in range(3):
            x = torch.randn(2, 4, 3, 3) * 3 + step
            mine(x), theirs(x)
        for name in ("running_mean", "running_var"):
            assert_rel_close(getattr(mine, name), getattr(theirs, name).double(), torch.float32, f"{momentum} {name}",
                             rel=PARITY_TOL[torch.float32])
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


def test_two_element_groups_are_backward_stable():
    """In a group of two, dx is pure cancellation: its size is eps/var times that of its terms
    rstd * (g - mean(g)), so no float32 formula gets it to a relative 1e-5 of itself (torch 2.13 is off by
    2.6e-2). normkit's error stays within float32 rounding of the terms: |dx - ref| <= 1e-5 * rstd * max|g|."""
    x = torch.tensor([[0.40334684], [0.83802634]])
    g = torch.tensor([[0.3], [-1.1]])
    xg = x.clone().requires_grad_()
    nf.batch_norm(xg, None, None, training=True).backward(g)
    xd = x.double()
    var = xd.var(0, unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    x_hat = (xd - xd.mean(0)) * rstd
    gc = g.double() - g.double().mean(0)
    ref = rstd * (gc - x_hat * (gc * x_hat).mean(0))
    assert ((xg.grad.double() - ref).abs().max() <= 1e-5 * rstd * g.abs().max()).all()
    assert torch.sign(xg.grad).tolist() == torch.sign(ref).tolist()


def test_running_stats_untouched_in_eval_and_without_buffers():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    nf.batch_norm(x, rm, rv, training=False)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert_rel_close(nf.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True), torch.float32)



def test_eval_eps_below_float32s_range_counts():
    """Given statistics with ``running_var = 0`` and ``eps = 1e-60``: ``1/sqrt(eps)`` is 1e30, within float32,
    though eps itself rounds to 0 there (``rsqrt(var + eps)`` would be inf, and the output inf or NaN)."""
    x = torch.tensor([[1e-31, -2e-31, 0.0]]).view(1, 3, 1)
    y = nf.batch_norm(x, torch.zeros(3), torch.zeros(3), training=False, eps=1e-60)
    ref = oracle.batch_norm(oracle.ld(x), None, None, None, 1e-60, oracle.ld(torch.zeros(3)), oracle.ld(torch.zeros(3)))["y"]
    assert_rel_close(y, ref, torch.float32, "eval, var 0, eps 1e-60")



def _extreme_eval_bn():
    """``BatchNorm2d(4, eps=1e-30)`` in eval with ``running_var = 1e-20`` and ``weight = 1e-20``: at
    ``x = 1e30`` the output is 1e20, but ``(x - mean) * rstd`` alone is 1e40 (float32 overflows)."""
    model = torch.nn.Sequential(nnk.BatchNorm2d(4, eps=1e-30)).eval()
    with torch.no_grad():
        model[0].running_var.fill_(1e-20)
        model[0].weight.fill_(1e-20)
    x = torch.full((2, 4, 3, 3), 1e30)
    bn = model[0]
    ref = oracle.batch_norm(oracle.ld(x), oracle.ld(bn.weight), oracle.ld(bn.bias), None, 1e-30,
                            oracle.ld(bn.running_mean), oracle.ld(bn.running_var))["y"]
    return model, x, ref


def test_eval_with_extreme_parameters_in_torch():
    model, x, ref = _extreme_eval_bn()
    assert abs(float(ref.max()) / 1e20 - 1) < 1e-6
    assert_rel_close(model(x), ref, torch.float32, "normkit in torch")


@pytest.mark.parametrize("route", ["export_onnx", "harden_onnx"])
def test_eval_with_extreme_parameters_in_onnx_runtime(route):
    """The ONNX BatchNormalization subgraph used to form ``(x - mean) * rstd`` before the weight: inf in
    ONNX Runtime where normkit in torch gives 1e20. It applies ``weight * rstd`` as one split factor now."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model, x, ref = _extreme_eval_bn()
    if route == "export_onnx":
        proto, _ = normkit.export_onnx(model, x)
    else:
        proto, _ = normkit.harden_onnx(normkit.export_onnx(model, x, decompose=False)[0])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_rel_close(torch.from_numpy(np.asarray(y)), ref, torch.float32, route)
