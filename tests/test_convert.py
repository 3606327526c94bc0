"""normkit.convert / revert / fold_batchnorm on models holding every kind of norm layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nnk
from normkit.convert import TWINS
from conftest import PARITY_TOL, assert_rel_close


class MyBatchNorm(nn.BatchNorm2d):
    """A user subclass: convert must still find it."""


class Zoo(nn.Module):
    """Every norm layer torch has, in Sequentials, a ModuleList and plain attributes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.LocalResponseNorm(3))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1), MyBatchNorm(8)),
                                     nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8)),
                                     nn.Sequential(nn.Conv2d(8, 8, 1), nn.InstanceNorm2d(8, affine=True))])
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.bn3 = nn.BatchNorm3d(2)
        self.in1 = nn.InstanceNorm1d(2)
        self.in3 = nn.InstanceNorm3d(2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        z = self.rms(self.ln(x.mean((2, 3))))
        z = self.bn1(self.head(z))
        u = self.bn3(z.view(-1, 2, 3, 1, 1).expand(-1, 2, 3, 2, 2).contiguous())
        return z.sum(1) + u.sum((1, 2, 3, 4)) + self.in1(z.view(-1, 2, 3)).sum((1, 2)) + self.in3(u).sum((1, 2, 3, 4))


def test_convert_then_revert_keeps_everything():
    torch.manual_seed(0)
    model = Zoo()
    model.blocks[1].eval()  # a mixed training state must survive
    model.ln.weight.requires_grad_(False)
    model.rms.double().float()
    x = torch.randn(4, 3, 6, 6)
    converted, report = normkit.convert(model, return_report=True)
    assert converted is not model and type(model.stem[1]) is nn.BatchNorm2d  # not in place
    swapped = {s.name for s in report if s.changed}
    expected = {n for n, m in model.named_modules() if type(m).__module__.startswith("torch.nn") and "norm" in type(m).__module__
                or isinstance(m, MyBatchNorm)}
    assert swapped == expected, swapped ^ expected
    for (name, a), (_, b) in zip(model.named_modules(), converted.named_modules()):
        assert a.training == b.training, name
        if name in swapped:
            assert type(b).__module__.startswith("normkit.nn") and isinstance(b, next(c for c in type(a).__mro__ if c in TWINS))
    assert not converted.ln.weight.requires_grad
    for (na, pa), (nb, pb) in zip(model.state_dict().items(), converted.state_dict().items()):
        assert na == nb and torch.equal(pa, pb) and pa.dtype == pb.dtype
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(converted, mode)()
        assert_rel_close(converted(x), model(x), torch.float32, f"{mode} output", rel=PARITY_TOL[torch.float32])
    back = normkit.revert(converted)
    assert all(not type(m).__module__.startswith("normkit") for m in back.modules())
    assert_rel_close(back(x), model(x), torch.float32, "reverted", rel=PARITY_TOL[torch.float32])


def test_include_exclude_and_inplace():
    model = Zoo()
    out = normkit.convert(model, include=[nn.BatchNorm2d], exclude=["blocks.*"], inplace=True)
    assert out is model
    assert isinstance(model.stem[1], nnk.BatchNorm2d)
    assert type(model.blocks[0][1]) is MyBatchNorm and type(model.ln) is nn.LayerNorm
    with pytest.raises(TypeError, match="module classes or name patterns"):
        normkit.convert(model, include=[3])


def test_sync_batchnorm_is_reported_and_left():
    model = nn.Sequential(nn.SyncBatchNorm(4))
    converted, report = normkit.convert(model, return_report=True)
    assert type(converted[0]) is nn.SyncBatchNorm and report and not report[0].changed


def test_revert_refuses_a_convention_torch_lacks():
    model = nn.Sequential(nnk.LocalResponseNorm(3, convention="onnx"))
    with pytest.raises(ValueError, match="convention='onnx'"):
        normkit.revert(model)


# ------------------------------------------------------------------------------------- folding
def check_fold(model, x, expect_left=0):
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = normkit.fold_batchnorm(model, return_report=True)
    assert sum(not s.changed for s in report) == expect_left, report
    assert len([w for w in caught if "fold_batchnorm" in str(w.message)]) == expect_left
    ref = model(x).double()
    assert_rel_close(folded(x), ref, torch.float32, "folded output")
    return folded, report


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-2, 2)
                m.running_var.uniform_(0.1, 3)
                if m.weight is not None:
                    m.weight.uniform_(-2, 2)
                    m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("conv,bn,shape", [(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 9)),
                                           (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), (2, 3, 7, 7)),
                                           (nn.Conv3d(3, 5, 1, groups=1), nn.BatchNorm3d(5, affine=False), (2, 3, 3, 4, 4)),
                                           (nn.Linear(6, 5), nn.BatchNorm1d(5), (4, 6)),
                                           (nn.Conv2d(4, 8, 3, groups=2), nnk.BatchNorm2d(8), (2, 4, 6, 6))])
def test_fold_sequential_pairs(conv, bn, shape):
    model = nn.Sequential(conv, bn, nn.ReLU())
    randomize_bn(model)
    folded, report = check_fold(model, torch.randn(shape))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert report[0].changed


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))  # foldable through fx
        z = self.conv2(y)
        return self.bn2(z) + z  # conv2's output is used twice: bn2 must stay


def test_fold_through_fx_and_leave_shared_outputs():
    model = Residual()
    randomize_bn(model)
    folded, report = check_fold(model, torch.randn(2, 3, 5, 5), expect_left=1)
    assert isinstance(folded, torch.fx.GraphModule)
    assert {s.name: s.changed for s in report} == {"bn1": True, "bn2": False}
    assert "also used elsewhere" in next(s.after for s in report if s.name == "bn2")


def test_fold_refuses_training_mode_and_warns_on_float16_overflow():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        normkit.fold_batchnorm(model)
    model.eval()
    with torch.no_grad():
        model[1].running_var.fill_(1e-12)
        model[1].eps = 1e-12
    with pytest.warns(RuntimeWarning, match="float16 range"):
        normkit.fold_batchnorm(model)


def test_fold_leaves_batch_statistics_bn():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    model.eval()
    with pytest.warns(RuntimeWarning, match="batch statistics"):
        folded = normkit.fold_batchnorm(model)
    assert isinstance(folded[1], nn.BatchNorm2d)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.bn(self.conv(y))


def test_fold_untraceable_model_folds_sequential_pairs_and_reports_the_rest():
    model = Untraceable()
    randomize_bn(model)
    folded, report = check_fold(model, torch.randn(2, 2, 4, 4), expect_left=1)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    assert "not traceable" in next(s.after for s in report if s.name == "bn")


def test_convert_keeps_dtype_device_and_hooks():
    calls = []
    bn = nn.BatchNorm2d(3).double()
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    converted = normkit.convert(nn.Sequential(bn))
    assert converted[0].weight.dtype == torch.float64 and converted[0].running_mean.device.type == "cpu"
    converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert calls == ["BatchNorm2d"] and isinstance(converted[0], nnk.BatchNorm2d)
