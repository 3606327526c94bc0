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
from conftest import assert_rel_close


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
