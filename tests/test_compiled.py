"""torch.compile keeps normkit's answers: a converted model compiled with Inductor agrees with the same model
computed in float64 at the scales where the naive formulas fail in float32 -- eval batch norm whose
``x_hat = (x - mean) * rstd`` overflows although ``y`` is finite, and training batch norm on data at 1e20
(whose sum of squares overflows float32) -- forward and the input gradient. Under compile, eval batch norm runs
the spec's decomposable split-exponent affine (Inductor fuses it with its neighbours) and the statistics ops
keep their kernel (normkit.ops._plan)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
from conftest import assert_rel_close, needs_native


def _model(eps: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(4, eps=eps), nn.ReLU(), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU())


def _check(model: nn.Module, x: torch.Tensor, train: bool):
    """The converted model compiled (Inductor) against the model itself in float64: output and input gradient."""
    ref_model = copy.deepcopy(model).double().train(train)
    twin = normkit.convert(copy.deepcopy(model)).train(train)
    compiled = torch.compile(twin, fullgraph=True)
    xr = x.double().requires_grad_()
    ref = ref_model(xr)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dy)
    xg = x.clone().requires_grad_()
    got = compiled(xg)
    got.backward(dy.float())
    assert_rel_close(got, ref, torch.float32, "compiled output vs float64")
    assert_rel_close(xg.grad, xr.grad, torch.float32, "compiled input gradient vs float64")


def test_compiled_eval_batch_norm_where_x_hat_overflows():
    """running_var = 1e-40 (rstd 1e20), weight 1e-20, input at 1e20: x_hat is 1e40 (inf in float32), y ~ 1e20."""
    model = _model(eps=0.0).eval()
    with torch.no_grad():
        bn = model[0]
        bn.running_var.fill_(1e-40)
        bn.running_mean.uniform_(-1e19, 1e19)
        bn.weight.fill_(1e-20)
    x = (torch.rand(2, 4, 5, 5, dtype=torch.float64) * 2 - 1).mul(1e20).float()
    _check(model, x, train=False)


def test_compiled_training_batch_norm_at_1e20():
    model = _model(eps=1e-5).train()
    x = (torch.randn(3, 4, 5, 5, dtype=torch.float64) * 1e20 + 3e20).float()
    _check(model, x, train=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiled_ordinary_data_matches_eager(train):
    """At ordinary scales compiled and eager normkit agree (the compiled eval path is a different formulation
    of the same spec function)."""
    model = _model(eps=1e-5).train(train)
    twin = normkit.convert(copy.deepcopy(model)).train(train)
    compiled = torch.compile(copy.deepcopy(twin), fullgraph=True)
    x = torch.randn(2, 4, 6, 6)
    assert_rel_close(compiled(x), twin(x).double(), torch.float32, "compiled vs eager")


@needs_native
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_compiled_forms_compute_the_kernels_values(layout):
    """The Functions torch.compile traces for batch norm (StandardizeAffineCompiled, StatsAffineCompiled), run
    eagerly, agree with the kernels' ops on the conformance registry's batch norm cases (magnitudes to the top
    of float32, offsets, constant channels, running_var = weight = 1e-20): the same spec functions."""
    from normkit.check.cases import conformance_cases
    from normkit.ops import _kernels
    from normkit.ops._normalize import StandardizeAffineCompiled, StatsAffineCompiled

    normkit.build()  # the operators below are called directly: their CPU kernels come with the extension
    shape = (4, 6, 5, 3)
    for name in ("batch_norm", "batch_norm_eval"):
        for i, case in enumerate(conformance_cases(torch.float32, [name])):
            x, p, _ = case.data(shape, seed=i)
            x = x.contiguous(memory_format=layout)
            eps = case.eps if case.eps is not None else 1e-5
            w, b = p.get("weight"), p.get("bias")
            if name == "batch_norm":
                got, stats = StandardizeAffineCompiled.apply(x, w, b, eps)
                ref, ref_stats = _kernels.stats_norm(x, w, b, _kernels.CHANNELS, 1, 6, eps, True)
                assert torch.equal(stats, ref_stats), case.label
            else:
                view = (lambda t: None if t is None else t.view(1, -1, 1, 1))
                got = StatsAffineCompiled.apply(x, view(p["running_mean"]), view(p["running_var"]), view(w), view(b), eps)
                ref = _kernels.affine_eval(x, p["running_mean"], p["running_var"], w, b, _kernels.CHANNELS, eps)
            assert_rel_close(got, ref.double(), torch.float32, f"{name} {case.label}")
