"""normkit.convert / revert / fold_batchnorm on models holding every kind of norm layer."""

from __future__ import annotations

import re
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
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]  # MyBatchNorm stays MyBatchNorm
    assert_rel_close(back(x), model(x), torch.float32, "reverted", rel=PARITY_TOL[torch.float32])


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: normalizes the channels of an NCHW input through channels-last."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class StrictBatchNorm(nn.BatchNorm1d):
    """Overrides only the rank check: its computation path differs too (normkit's modules check ranks themselves)."""

    def _check_input_dim(self, input):
        if input.dim() != 3:
            raise ValueError("3-D only")


def test_convert_leaves_subclasses_with_their_own_forward():
    """Before: LayerNorm2d became normkit's LayerNorm, wrong when C == W and a shape error otherwise."""
    model = nn.Sequential(LayerNorm2d(4), StrictBatchNorm(4), MyBatchNorm(4))
    with pytest.warns(RuntimeWarning, match=r"overrides forward of LayerNorm.*normkit.robust\(\)"):
        converted, report = normkit.convert(model, return_report=True)
    assert [type(m) for m in converted] == [LayerNorm2d, StrictBatchNorm, nnk.BatchNorm2d]
    assert [(s.name, s.changed) for s in report] == [("0", False), ("1", False), ("2", True)]
    assert "_check_input_dim" in report[1].after
    x = torch.randn(2, 4, 3, 4)
    assert_rel_close(converted[0](x), model[0](x), torch.float32, rel=PARITY_TOL[torch.float32])
    back = normkit.revert(converted)
    assert [type(m) for m in back] == [LayerNorm2d, StrictBatchNorm, MyBatchNorm]


def test_include_exclude_and_inplace():
    model = Zoo()
    out = normkit.convert(model, include=[nn.BatchNorm2d], exclude=["blocks.*"], inplace=True)
    assert out is model
    assert isinstance(model.stem[1], nnk.BatchNorm2d)
    assert type(model.blocks[0][1]) is MyBatchNorm and type(model.ln) is nn.LayerNorm
    with pytest.raises(TypeError, match="module classes or name patterns"):
        normkit.convert(model, include=[3])


class OwnBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A norm class of torch's family that no normkit twin stands for."""

    def _check_input_dim(self, input):
        pass


def test_sync_batchnorm_converts_and_a_class_without_twin_is_reported():
    model = nn.Sequential(nn.SyncBatchNorm(4), OwnBatchNorm(4))
    with pytest.warns(RuntimeWarning, match="no twin"):
        converted, report = normkit.convert(model, return_report=True)
    assert type(converted[0]) is nnk.SyncBatchNorm and type(converted[1]) is OwnBatchNorm
    assert [(s.name, s.changed) for s in report] == [("0", True), ("1", False)]
    assert [type(m) for m in normkit.revert(converted)] == [nn.SyncBatchNorm, OwnBatchNorm]


def test_revert_refuses_a_convention_torch_lacks():
    model = nn.Sequential(nnk.LocalResponseNorm(3, convention="onnx"))
    with pytest.raises(ValueError, match="convention='onnx'"):
        normkit.revert(model)


# ------------------------------------------------------------------------------------- folding
FOLD_REL = 1e-6  # folded vs unfolded eval model, float64: exact up to the rounding of the folded weights


def check_fold(model, x, left=(), example=True):
    """Fold ``model`` (float64, eval) and check the contract: the folded model equals the unfolded one within
    FOLD_REL, and exactly the BatchNorms named in ``left`` (name -> regex of the reason) are left, each warned."""
    model = model.double().eval()
    x = x.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = normkit.fold_batchnorm(model, return_report=True, example_input=x if example else None)
    left = dict(left)
    assert {s.name for s in report if not s.changed} == set(left), report
    for s in report:
        if not s.changed:
            assert re.search(left[s.name], s.after), (s.name, s.after)
    assert len([w for w in caught if "fold_batchnorm" in str(w.message)]) == len(left)
    with torch.no_grad():
        assert_rel_close(folded(x), model(x), torch.float64, "folded output", rel=FOLD_REL)
    return folded, report


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nnk.FrozenBatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-2, 2)
                m.running_var.uniform_(0.1, 3)
                if m.weight is not None:
                    m.weight.uniform_(-2, 2)
                    m.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("conv,bn,shape", [(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 9)),
                                           (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), (2, 3, 7, 7)),
                                           (nn.Conv3d(3, 5, 1, groups=1), nn.BatchNorm3d(5, affine=False), (2, 3, 3, 4, 4)),
                                           (nn.Linear(6, 5), nn.BatchNorm1d(5), (4, 6)),
                                           (nn.Conv2d(4, 8, 3, groups=2), nnk.BatchNorm2d(8), (2, 4, 6, 6)),
                                           (nn.Conv2d(4, 8, 1), nnk.FrozenBatchNorm2d(8), (2, 4, 3, 3)),
                                           (nn.Conv2d(3, 5, 3), nnk.SyncBatchNorm(5), (2, 3, 6, 6))])
def test_fold_sequential_pairs(conv, bn, shape):
    model = randomize_bn(nn.Sequential(conv, bn, nn.ReLU()))
    folded, report = check_fold(model, torch.randn(shape))
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.Identity)
    assert report[0].changed and report[0].after == "folded into 0"


def test_fold_without_example_input_needs_a_fixed_rank():
    """BatchNorm2d takes 4-D input only, so Conv2d+BatchNorm2d folds without an example; BatchNorm1d takes 2-D
    or 3-D, so Linear+BatchNorm1d (and Conv1d+BatchNorm1d) need example_input to prove the rank."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)))
    check_fold(model, torch.randn(3, 2, 2, 2), left={"4": r"only for 2-D output.*pass example_input="}, example=False)


class LinearOnSequence(nn.Module):
    """Linear on (N, L, F) then BatchNorm1d(L): the BN normalizes L, not the Linear's features (here L == 5 == out)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("example", [True, False])
def test_fold_leaves_linear_on_3d_input(example):
    reason = r"3-D on example_input" if example else r"pass example_input="
    check_fold(randomize_bn(LinearOnSequence()), torch.randn(4, 5, 6), left={"body.1": reason}, example=example)


class ConvAlsoCalledAlone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)  # the second call has no BatchNorm


class Siamese(nn.Module):
    def __init__(self, sequential):
        super().__init__()
        if sequential:
            self.seq = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
        else:
            self.conv, self.bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)

    def branch(self, x):
        return self.seq(x) if hasattr(self, "seq") else self.bn(self.conv(x))

    def forward(self, x):
        return self.branch(x) - self.branch(x.flip(-1))  # the same pair applied twice


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(2, 3, 1)
        self.a = nn.Sequential(conv, nn.BatchNorm2d(3))
        self.b = nn.Sequential(conv, nn.ReLU())  # the same conv, without BatchNorm

    def forward(self, x):
        return self.a(x) + self.b(x)


class TwoNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)
        self.alias = self.conv  # registered twice, called once

    def forward(self, x):
        return self.bn(self.conv(x))


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)
        self.other.weight = self.conv.weight

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardization: a Conv2d subclass with its own forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class PlainConvSubclass(nn.Conv2d):
    """A subclass that keeps Conv2d's computation: foldable."""


X4 = (2, 2, 5, 5)
UNSAFE = {  # model, input shape, the BatchNorm left -> the reason
    "called-alone-too": (ConvAlsoCalledAlone, X4, {"bn": r"conv is called 2 times"}),
    "siamese-modules": (lambda: Siamese(False), X4, {"bn": r"conv is called 2 times"}),
    "siamese-sequential": (lambda: Siamese(True), X4, {"seq.1": r"seq.0 is called 2 times"}),
    "shared-by-second-sequential": (SharedConv, X4, {"a.1": r"a.0 is registered 2 times"}),
    "registered-under-two-names": (TwoNames, X4, {"bn": r"conv is registered 2 times"}),
    "tied-weights": (TiedWeights, (2, 3, 4, 4), {"bn": r"also held by another module"}),
    "weight-read-directly": (ReadsWeight, (2, 3, 4, 4), {"bn": r"read directly"}),
    "weight-norm": (lambda: nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3)), nn.BatchNorm2d(3)),
                    X4, {"1": r"parametrized \(weight;"}),
    "own-forward": (lambda: nn.Sequential(StandardizedConv2d(2, 3, 3), nn.BatchNorm2d(3)), X4, {"1": r"overrides forward"}),
    "plain-subclass": (lambda: nn.Sequential(PlainConvSubclass(2, 3, 3), nn.BatchNorm2d(3)), X4, {}),
    "hooked-layer": (lambda: nn.Sequential(hooked(nn.Conv2d(2, 3, 3)), nn.BatchNorm2d(3)), X4, {"1": r"forward hooks"}),
}


def hooked(module):
    module.register_forward_hook(lambda m, i, o: o * 2)
    return module


@pytest.mark.parametrize("example", [True, False], ids=["example", "no-example"])
@pytest.mark.parametrize("case", UNSAFE, ids=list(UNSAFE))
def test_fold_leaves_what_it_cannot_prove(case, example):
    """Each of these folded silently wrong before (relative errors 0.27-1.0): now exact or left, with the reason."""
    make, shape, left = UNSAFE[case]
    check_fold(randomize_bn(make()), torch.randn(shape), left=left, example=example)


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
    folded, report = check_fold(randomize_bn(Residual()), torch.randn(2, 3, 5, 5), left={"bn2": "also used elsewhere"})
    assert isinstance(folded, torch.fx.GraphModule)
    assert {s.name: s.changed for s in report} == {"bn1": True, "bn2": False}


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with a downsampling shortcut; ``norm`` builds each BatchNorm."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), norm(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), norm(8))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


@pytest.mark.parametrize("make", [lambda: normkit.convert(randomize_bn(BasicBlock())),
                                  lambda: randomize_bn(BasicBlock(nnk.FrozenBatchNorm2d))], ids=["converted", "frozen"])
def test_fold_through_fx_on_normkit_basic_block(make):
    """Before: "not traceable", 0 of 3 folded. normkit's modules are leaves of fold_batchnorm's tracer."""
    folded, report = check_fold(make(), torch.randn(2, 4, 6, 6), example=False)
    assert isinstance(folded, torch.fx.GraphModule) and sum(s.changed for s in report) == 3
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nnk.FrozenBatchNorm2d)) for m in folded.modules())


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
    def __init__(self, call_forward_directly=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.direct = call_forward_directly

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        if self.direct:  # a call that no hook sees
            y = y + self.body[0].forward(x)
        return self.bn(self.conv(y))


def test_fold_untraceable_model():
    """Without a graph, call sites are counted by running example_input; without one, nothing is proven."""
    model = randomize_bn(Untraceable())
    folded, _ = check_fold(model, torch.randn(2, 2, 4, 4), left={"bn": "not directly follow.*not traceable"})
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    check_fold(model, torch.randn(2, 2, 4, 4), example=False,
               left={"bn": "not traceable", "body.1": r"cannot be counted.*pass example_input="})


def test_fold_example_input_must_be_a_tensor_or_a_tuple():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    with pytest.raises(TypeError, match=r"tensor or a tuple.*example_input=\(x,\)"):
        normkit.fold_batchnorm(model, example_input=[torch.randn(1, 2, 3, 3)])


def test_fold_example_input_check_raises_when_the_rules_are_fooled():
    model = randomize_bn(Untraceable(call_forward_directly=True)).double().eval()
    with pytest.raises(RuntimeError, match="differs from the unfolded one on example_input"):
        normkit.fold_batchnorm(model, example_input=torch.randn(2, 2, 4, 4, dtype=torch.float64))


def test_convert_keeps_dtype_device_and_hooks():
    calls = []
    bn = nn.BatchNorm2d(3).double()
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    converted = normkit.convert(nn.Sequential(bn))
    assert converted[0].weight.dtype == torch.float64 and converted[0].running_mean.device.type == "cpu"
    converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert calls == ["BatchNorm2d"] and isinstance(converted[0], nnk.BatchNorm2d)
