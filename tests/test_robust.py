"""normkit.robust(): torch's functional norm calls run through normkit, on unconverted torch models."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit
from conftest import PARITY_TOL, assert_rel_close


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: a third-party module calling F.layer_norm in its own forward."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def bn_with_momentum_none():
    return nn.BatchNorm2d(4, momentum=None)


MODULES = {  # name -> (constructor, input shape)
    "LayerNorm": (lambda: nn.LayerNorm(8), (2, 4, 8)),
    "LayerNorm2d": (lambda: LayerNorm2d(4), (2, 4, 3, 5)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    "RMSNorm": (lambda: nn.RMSNorm(8), (2, 4, 8)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(4), (3, 4, 3, 3)),
    "BatchNorm2d-momentum-None": (bn_with_momentum_none, (3, 4, 3, 3)),
    "BatchNorm1d-eval": (lambda: nn.BatchNorm1d(4).eval(), (3, 4)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (2, 4, 3, 3)),
    "LocalResponseNorm": (lambda: nn.LocalResponseNorm(3), (2, 5, 3, 3)),
}


def randomized(make):
    torch.manual_seed(1)
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("name", MODULES)
def test_robust_hardens_torch_modules_at_1e20(name):
    """Finite and within 1e-5 of torch's float64 answer, where torch's float32 kernels fail."""
    make, shape = MODULES[name]
    module = randomized(make)
    x = torch.randn(shape) * 1e20
    ref = copy.deepcopy(module).double()(x.double())
    with normkit.robust():
        y = module(x)
    assert y.dtype == torch.float32
    assert_rel_close(y, ref, torch.float32, f"{name} under robust()")


@pytest.mark.parametrize("name", MODULES)
def test_robust_matches_torch_at_scale_1(name):
    """Same outputs, input gradients and running statistics as torch's own kernels, over three steps."""
    make, shape = MODULES[name]
    ours, theirs = randomized(make), randomized(make)
    for step in range(3):
        x = (torch.randn(shape) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        weights = torch.randn(shape)  # a loss whose gradient is not cancelled by the normalization
        with normkit.robust():
            y = ours(x)
            (y * weights).sum().backward()
        y2 = theirs(x2)
        (y2 * weights).sum().backward()
        assert_rel_close(y, y2, torch.float32, f"{name} step {step}", rel=PARITY_TOL[torch.float32])
        assert_rel_close(x.grad, x2.grad, torch.float32, f"{name} step {step} grad", rel=PARITY_TOL[torch.float32])
        for (key, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            if a.is_floating_point():
                assert_rel_close(a, b, torch.float32, f"{name} step {step} {key}", rel=PARITY_TOL[torch.float32])
            else:
                assert torch.equal(a, b), key


def torch_calls(x):
    """The torch.* functions that torch.nn.functional dispatches to, called directly, with torch's argument order."""
    c = x.shape[1]
    rm, rv, w, b = (t.to(x.dtype) for t in (torch.zeros(c), torch.ones(c), torch.rand(c) + 0.5, torch.rand(c)))
    return {
        "torch.batch_norm": torch.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, False),
        "torch.instance_norm": torch.instance_norm(x, w, b, None, None, True, 0.1, 1e-5, False),
        "torch.layer_norm": torch.layer_norm(x, x.shape[-2:], None, None, 1e-5, True),
        "torch.group_norm": torch.group_norm(x, 2, w, b, 1e-5, True),
        "torch.rms_norm": torch.rms_norm(x, x.shape[-1:], None, None),
        "F.local_response_norm": F.local_response_norm(x, 3),
    }


def test_robust_routes_the_torch_functions():
    x = torch.randn(3, 4, 5, 6) * 1e20
    torch.manual_seed(0)
    refs = torch_calls(x.double())
    with normkit.robust():
        torch.manual_seed(0)
        ours = torch_calls(x)
    for name, y in ours.items():
        assert_rel_close(y, refs[name], torch.float32, f"{name} under robust()")


def test_robust_is_a_decorator_nests_and_composes_with_no_grad():
    ln = nn.LayerNorm(8)
    x = torch.randn(2, 8) * 1e20

    @normkit.robust()
    def run(x):
        return ln(x)

    assert torch.isfinite(run(x)).all() and torch.isfinite(run(x)).all()  # re-entered per call
    with normkit.robust(), torch.no_grad():
        with normkit.robust():
            inner = ln(x)
        outer = ln(x)
        assert not inner.requires_grad
    assert torch.equal(inner, outer) and torch.isfinite(outer).all()
    assert torch.isnan(ln(x)).any()  # and torch's own kernel again once the mode is left


@pytest.mark.parametrize("after_linear", [False, True], ids=["float32-input", "bfloat16-input"])
@pytest.mark.parametrize("name", MODULES)
def test_robust_under_autocast_returns_torch_dtypes(name, after_linear):
    """Under CPU bfloat16 autocast, the same output dtype as torch's: for a float32 input, and for the
    bfloat16 output of an autocast Linear (the dtype policy itself is the ops' own)."""
    make, shape = MODULES[name]
    module = randomized(make)
    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), module) if after_linear else module
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = copy.deepcopy(model)(x)
        with normkit.robust():
            got = model(x)
    assert got.dtype == want.dtype


@pytest.mark.parametrize("mode_inside", [True, False], ids=["mode-inside", "mode-outside"])
def test_robust_under_torch_compile(mode_inside):
    """Dynamo traces through the mode, entered inside the compiled function or around the call; the result
    is normkit's (fullgraph needs the ops to be Dynamo-traceable: see the README's tool-chain table)."""
    ln = nn.LayerNorm(8)
    x = torch.randn(2, 4, 8) * 1e20

    def run(x):
        if mode_inside:
            with normkit.robust():
                return ln(x)
        return ln(x)

    compiled = torch.compile(run, backend="eager")
    with normkit.robust() if not mode_inside else contextlib.nullcontext():
        y = compiled(x)
    assert_rel_close(y, copy.deepcopy(ln).double()(x.double()), torch.float32, "compiled under robust()")


def test_export_under_robust_bakes_normkit_into_the_program():
    """torch.export of an unconverted torch model inside robust(): the program computes normkit's norms."""
    model = nn.Sequential(nn.Linear(8, 8), LayerNorm2d(4), nn.GroupNorm(2, 4)).eval()
    x = torch.randn(2, 4, 3, 8) * 1e20
    with normkit.robust():
        program = torch.export.export(model, (x,)).module()
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # no torch normalization kernel in the program (normkit's own fused op, normkit.stats_norm, may be)
    assert not any(op.startswith("aten.") and "norm" in op for op in ops), ops
    with torch.no_grad():
        assert_rel_close(program(x), copy.deepcopy(model).double()(x.double()), torch.float32, "exported under robust()")


def test_robust_handles_each_call_once_without_reentering():
    """normkit's implementation runs with the mode popped: one routed call per torch call, no recursion."""
    from normkit.robust import ROUTES, RobustMode

    seen = []

    class Recording(RobustMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in ROUTES:
                seen.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    x = torch.randn(2, 5, 4, 8)
    with Recording():
        nn.LayerNorm(8)(x)
        nn.BatchNorm2d(5)(x)
        F.local_response_norm(x, 3)
    assert seen == [F.layer_norm, F.batch_norm, F.local_response_norm]


# ------------------------------------------------------------------------------- record_norm_calls
class _PermuteLayerNorm2d(torch.nn.LayerNorm):
    """ConvNeXt's LayerNorm2d: a functional layer norm inside its own forward, over channels of NCHW."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def test_record_norm_calls_names_the_innermost_module():
    from normkit.robust import record_norm_calls

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Sequential(_PermuteLayerNorm2d(4), torch.nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 5, 5)
    with record_norm_calls(model) as rec:
        y = model(x)
    assert [(c.function, c.module, c.module_type) for c in rec.calls] == [
        ("layer_norm", "1.0", "_PermuteLayerNorm2d"), ("batch_norm", "1.1", "BatchNorm2d")]
    assert rec.calls[1].output.shape == y.shape
    torch.testing.assert_close(rec.calls[1].output, y, rtol=0, atol=0)  # recording changes nothing


def test_a_recorder_outside_sees_the_calls_a_robust_mode_inside_routes():
    """robust() entered inside record_norm_calls (as a hardened module's own forward does): each call is recorded
    once, with normkit's output; entered outside, the same; recording changes no result."""
    from normkit.robust import record_norm_calls

    model = torch.nn.Sequential(_PermuteLayerNorm2d(4), torch.nn.BatchNorm2d(4))
    x = torch.randn(2, 4, 3, 5) * 1e20
    ref = copy.deepcopy(model).double()(x.double())
    for inside in (True, False):
        m = copy.deepcopy(model)
        with (record_norm_calls(m) if inside else normkit.robust()) as outer:
            with (normkit.robust() if inside else record_norm_calls(m)) as inner:
                y = m(x)
        rec = outer if inside else inner
        assert [(c.function, c.module) for c in rec.calls] == [("layer_norm", "0"), ("batch_norm", "1")], inside
        assert torch.isfinite(rec.calls[0].output).all() and torch.equal(rec.calls[1].output, y)
        assert_rel_close(y, ref, torch.float32, f"robust inside the recorder: {inside}")
