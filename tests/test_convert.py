"""normkit.convert / revert / fold_batchnorm on models holding every kind of norm layer."""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import normkit
import normkit.nn as nnk
from normkit.convert import TWINS
from normkit.reference import float64_call
from normkit.robust import Hardened
from conftest import PARITY_TOL, assert_matches_torch_or_oracle, assert_rel_close


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


def test_convert_hardens_subclasses_with_their_own_forward():
    """Before: left as they were (LayerNorm2d had become normkit's LayerNorm earlier still, wrong when C == W).
    Now their own forward runs, with its functional norm calls routed to normkit: exact in float64, finite and
    accurate at 1e20, their own checks kept, and revert gives every class back."""
    model = nn.Sequential(LayerNorm2d(4), StrictBatchNorm(4), MyBatchNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left, so nothing is warned about
        converted, report = normkit.convert(model, return_report=True)
    assert [(s.name, s.changed) for s in report] == [("0", True), ("1", True), ("2", True)]
    assert "hardened in place: its own forward calls layer_norm" in report[0].after
    assert "calls batch_norm" in report[1].after and report[2].after == "normkit.nn.BatchNorm2d"
    assert [type(m).__name__ for m in converted] == ["LayerNorm2d", "StrictBatchNorm", "BatchNorm2d"]
    assert isinstance(converted[0], (LayerNorm2d, Hardened)) and isinstance(converted[1], Hardened)
    x = torch.randn(2, 4, 3, 5)
    assert_rel_close(converted[0](x), model[0](x), torch.float32, rel=PARITY_TOL[torch.float32])
    x3 = torch.randn(3, 4, 5) * 1e20
    ref, _ = float64_call(copy.deepcopy(model[1]).double(), x3)
    assert_rel_close(converted[1](x3), ref, torch.float32, "hardened BatchNorm at 1e20")
    with pytest.raises(ValueError, match="3-D only"):  # its own _check_input_dim still runs
        converted[1](torch.randn(2, 4))
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
    """A norm class of torch's family that no normkit twin stands for: its forward (torch's) is hardened."""

    def _check_input_dim(self, input):
        pass


class StdNorm(nn.Module):
    """x / std(x) * weight: norm-like (a weight and an eps), but no normalization normkit has."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        return x / (x.std(-1, keepdim=True) + self.eps) * self.weight


def test_sync_batchnorm_and_a_class_without_twin_convert_and_what_normkit_lacks_is_reported():
    model = nn.Sequential(nn.SyncBatchNorm(4), OwnBatchNorm(4), StdNorm(4), StdNorm(4))
    with pytest.warns(RuntimeWarning) as caught:
        converted, report = normkit.convert(model, return_report=True)
    assert type(converted[0]) is nnk.SyncBatchNorm and isinstance(converted[1], Hardened)
    assert type(converted[2]) is StdNorm and type(converted[3]) is StdNorm
    assert [(s.name, s.changed) for s in report] == [("0", True), ("1", True), ("2", False), ("3", False)]
    assert len(caught) == 1  # one warning per call, the left layers grouped by class
    message = str(caught[0].message)
    assert re.search(r"convert: 2 layer\(s\) left.*StdNorm x2 \(2, 3\): its float64 output is no normalization.*Recipe: ", message, re.S)
    assert [type(m) for m in normkit.revert(converted)] == [nn.SyncBatchNorm, OwnBatchNorm, StdNorm, StdNorm]


def test_convert_revert_and_fold_take_modules_only():
    for tool in (normkit.convert, normkit.revert, normkit.fold_batchnorm):
        with pytest.raises(TypeError, match=r"expected a torch.nn.Module \(a model or a single layer\), got int$"):
            tool(42)
        with pytest.raises(TypeError, match=r"got ZooEntry; build the model first: normkit.models.get\('resnet18'\)"):
            tool(normkit.models.entry("resnet18"))
        with pytest.raises(TypeError, match=r"got str; for a zoo model, build it first: normkit.models.get\('alexnet'\)"):
            tool("alexnet")


def test_convert_takes_a_zoo_model_as_built():
    """normkit.models.get builds the model: straight into convert (issue 17: a ZooEntry used to reach it)."""
    converted, report = normkit.convert(normkit.models.get("resnet18"), return_report=True)
    assert len(report) == 20 and all(s.changed for s in report) and isinstance(converted.bn1, nnk.BatchNorm2d)


def test_revert_refuses_options_torch_lacks():
    model = nn.Sequential(nnk.RMSNorm(8, casting_mode="llama"))
    with pytest.raises(ValueError, match="casting_mode='llama'.*torch's RMSNorm has no"):
        normkit.revert(model)
    assert type(normkit.revert(nn.Sequential(nnk.RMSNorm(8)))[0]) is nn.RMSNorm


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
    warned = [str(w.message) for w in caught if "fold_batchnorm" in str(w.message)]
    assert len(warned) == (1 if left else 0)  # one warning per call, naming every BatchNorm left
    assert all(f"{name}" in warned[0] for name in left)
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


class Float32Inside(nn.Module):
    """As Hugging Face's LlamaRMSNorm: normalizes (over dim 1) in float32 whatever the model's dtype."""

    def forward(self, x):
        dtype, x = x.dtype, x.to(torch.float32)
        return (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)).to(dtype)


def test_fold_example_input_check_is_float64_through_the_models_own_downcast():
    """A float64 model is compared in float64 throughout: computed as written, the float32 norm at the end returns
    zeros at 1e25 for the folded and the unfolded model alike (its squares overflow), which would hide the
    wrong fold."""
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64) * 1e25
    torch.manual_seed(0)
    fooled = nn.Sequential(randomize_bn(Untraceable(call_forward_directly=True)), Float32Inside()).double().eval()
    with torch.no_grad():
        assert not fooled(x).abs().any(), "the trap: as written, the output is all zeros at 1e25"
    with pytest.raises(RuntimeError, match="differs from the unfolded one on example_input.*compared in float64 throughout"):
        normkit.fold_batchnorm(fooled, example_input=x)
    # a fold that is right passes the same check (no false alarm), and is right in float64 indeed
    torch.manual_seed(0)
    right = nn.Sequential(randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))), Float32Inside()).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left, nothing lowered: no warning
        folded = normkit.fold_batchnorm(right, example_input=x)
    assert isinstance(folded[0][1], nn.Identity)
    (want, lowered), (got, _) = float64_call(right, x), float64_call(folded, x)
    assert not lowered and want.abs().max() > 0.1
    assert_rel_close(got, want, torch.float64, "folded, in float64 throughout", rel=1e-12)


class LeavesThroughNumpy(nn.Module):
    """Computes in float32 through numpy: no torch function mode can lift that."""

    def forward(self, x):
        y = torch.from_numpy(x.detach().numpy().astype("float32"))
        return (y * 2.0).to(x.dtype)


def test_fold_example_input_check_says_when_it_is_not_float64_throughout():
    torch.manual_seed(0)
    model = nn.Sequential(randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))), LeavesThroughNumpy())
    with pytest.warns(RuntimeWarning, match="not float64 throughout although the model is .*float32"):
        normkit.fold_batchnorm(model.double().eval(), example_input=torch.randn(2, 2, 4, 4, dtype=torch.float64))


def test_convert_keeps_dtype_device_and_hooks():
    calls = []
    bn = nn.BatchNorm2d(3).double()
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    converted = normkit.convert(nn.Sequential(bn))
    assert converted[0].weight.dtype == torch.float64 and converted[0].running_mean.device.type == "cpu"
    converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert calls == ["BatchNorm2d"] and isinstance(converted[0], nnk.BatchNorm2d)


# ------------------------------------------------------------------------- hand-written norms, by behaviour
# Each written as the library writes it (our own code, the same computation): Hugging Face's Llama / Gemma /
# T5 norms, timm's RmsNorm2d, a user's one-liner, a ConvNeXt-style channels-first LayerNorm, a group norm,
# torchvision's FrozenBatchNorm2d. The class names say nothing: recognition is by behaviour.
class UpcastRMS(nn.Module):  # Llama, Mistral, Qwen2/3, Phi-3
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class ZeroCentred(nn.Module):  # Gemma 1/2/3: weight initialized to zeros, applied as (1 + weight)
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.zeros(d))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class ScaleOnly(nn.Module):  # T5LayerNorm
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, h):
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


class OneLiner(nn.Module):  # a user's own, in the input's dtype throughout
    def __init__(self, d):
        super().__init__()
        self.w, self.eps = nn.Parameter(torch.ones(d)), 1e-5
        self.weight = self.w

    def forward(self, x):
        return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class RMSOverChannels(nn.Module):  # timm RmsNorm2d: NCHW, reduced over dim 1
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(c)), eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1)


class ChannelsFirstLN(nn.Module):  # ConvNeXt's channels-first LayerNorm, written out, statistics in float32
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        dtype, x = x.dtype, x.float()
        u = x.mean(1, keepdim=True)
        x = (x - u) / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x.to(dtype) + self.bias[:, None, None]


class Groups(nn.Module):  # group norm, written out in float32, cast back (torch's dtype rule for the output)
    def __init__(self, groups, c, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = groups, eps
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        g = x.float().reshape(x.shape[0], self.num_groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + self.eps)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (g.reshape(x.shape) * self.weight.float().view(view) + self.bias.float().view(view)).to(x.dtype)


class Frozen(nn.Module):  # torchvision's FrozenBatchNorm2d
    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), value))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


HAND_WRITTEN = {  # name -> (module, input shape, the twin convert must make of it)
    "llama": (lambda: UpcastRMS(8), (2, 5, 8), "normkit.nn.RMSNorm(casting_mode='llama')"),
    "gemma": (lambda: ZeroCentred(8), (2, 5, 8), "normkit.nn.RMSNorm(offset=1.0)"),
    "t5": (lambda: ScaleOnly(8), (2, 5, 8), "normkit.nn.RMSNorm(casting_mode='t5')"),
    "one-liner": (lambda: OneLiner(8), (2, 5, 8), "normkit.nn.RMSNorm(casting_mode='llama')"),
    "rms-over-channels": (lambda: RMSOverChannels(6), (2, 6, 4, 5), "normkit.nn.RMSNorm(casting_mode='llama', channels_first=True)"),
    "channels-first-ln": (lambda: ChannelsFirstLN(6), (2, 6, 4, 5), "normkit.nn.LayerNorm(casting_mode='llama', channels_first=True)"),
    "groups": (lambda: Groups(2, 6), (2, 6, 4, 5), "normkit.nn.GroupNorm(casting_mode='gemma')"),
    "frozen": (lambda: Frozen(6), (2, 6, 4, 5), "normkit.nn.FrozenBatchNorm2d(casting_mode='promote')"),
}


def randomized(module, generator):
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            low, high = (0.5, 2.0) if name in ("running_var", "weight") else (-1.0, 1.0)
            t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)
    return module


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_hand_written_norm_becomes_its_twin(name):
    """The probe names the twin; float64 output unchanged; every (input, weight) dtype pair gives the original's
    output dtype and values (or, where the original itself is off from the float64 answer, the float64 answer);
    at 1e20 finite and accurate where the original is not; same state-dict keys; revert is exact."""
    make, shape, label = HAND_WRITTEN[name]
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(randomized(make(), g))
    converted, report = normkit.convert(model, return_report=True)
    assert len(report) == 1 and report[0].changed and report[0].after.startswith(label + ":"), report
    assert list(converted.state_dict()) == list(model.state_dict())
    assert_twin(model, converted, torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5, name)


def assert_twin(model, converted, x, what):
    """``converted`` (a twin, or hardened) against ``model`` (float32): float64 output unchanged; every (input,
    weight) dtype pair gives the original's output dtype and values (where the original itself is off from the
    float64 answer, that answer); at 1e20 within tolerance of float64; revert exact."""
    want, lowered = float64_call(copy.deepcopy(model).double(), x)
    got, _ = float64_call(copy.deepcopy(converted).double(), x)
    assert lowered == [] and (got - want).abs().max() <= 1e-10 * want.abs().max()
    for xd in (torch.bfloat16, torch.float16, torch.float32):
        for wd in (torch.bfloat16, torch.float32):
            original, twin, xx = copy.deepcopy(model).to(wd), copy.deepcopy(converted).to(wd), x.to(xd)
            try:
                expected = original(xx)
            except RuntimeError:
                continue
            out = twin(xx)
            assert out.dtype == expected.dtype, (xd, wd)
            truth, _ = float64_call(original.double(), xx.double())
            least = max((xd, wd, expected.dtype), key=lambda d: torch.finfo(d).eps)  # the precision it can have
            assert_matches_torch_or_oracle(out, expected, truth, least, f"{what} {xd}/{wd}")
    big = x.float() * 1e20
    truth, _ = float64_call(copy.deepcopy(model).double(), big.double())
    assert_rel_close(converted(big), truth, torch.float32, f"{what} at 1e20")
    back = normkit.revert(converted)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert [m.__dict__.keys() for m in back.modules()] == [m.__dict__.keys() for m in model.modules()]
    assert torch.equal(back(x.float()), model(x.float()))


class WrongEps(UpcastRMS):
    def forward(self, h):  # ignores its own eps attribute
        h = h.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-2))


class NormThenAct(nn.Module):  # a norm with a submodule after it (timm's RmsNormAct2d)
    def __init__(self, c):
        super().__init__()
        self.weight, self.eps, self.act = nn.Parameter(torch.ones(c)), 1e-6, nn.GELU()

    def forward(self, x):
        return self.act(self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class WithResidual(UpcastRMS):
    def forward(self, h, residual):
        return super().forward(h + residual)


class ScaleNorm(nn.Module):  # named like a norm, a weight but no eps attribute
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x / x.norm(dim=-1, keepdim=True)


LEFT = {  # name -> (module, the reason it is left)
    "wrong-eps": (lambda: WrongEps(8), r"no normalization of its input: it is off by .* from the closest, .* eps=1e-06"),
    "std": (lambda: StdNorm(8), r"no normalization of its input"),
    "norm-then-act": (lambda: NormThenAct(8), r"calls no torch normalization and it has submodules \(act\)"),
    "two-inputs": (lambda: WithResidual(8), r"could not be run on a probe input \(TypeError"),
    "no-eps": (lambda: ScaleNorm(8), r"no numeric eps attribute"),
    "meta": (lambda: UpcastRMS(8).to("meta"), r"meta device"),
}


@pytest.mark.parametrize("name", LEFT)
def test_what_no_probe_proves_is_left_and_reported(name):
    make, reason = LEFT[name]
    model = nn.Sequential(make())
    with pytest.warns(RuntimeWarning, match="convert: 1 layer") as caught:
        converted, report = normkit.convert(model, return_report=True)
    assert type(converted[0]) is type(model[0]) and len(caught) == 1
    assert len(report) == 1 and not report[0].changed and re.search(reason, report[0].after), report[0].after
    assert report[0].recipe and report[0].recipe in str(caught[0].message)


# --------------------------------------------------------------------- hardened modules and twins: tool chain
class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: batch norm through F.batch_norm in its own forward, then drop and act modules."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x):
        use_batch = self.training or self.running_mean is None
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, 0.1, self.eps)
        return self.act(self.drop(y))


class Net(nn.Module):
    """A conv, a hardened BatchNormAct, a hardened LayerNorm2d and a Llama-style twin."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.ln, self.rms = nn.Conv2d(3, 4, 3, padding=1), BatchNormAct(4), LayerNorm2d(4), UpcastRMS(5)

    def forward(self, x):
        return self.rms(self.ln(self.bn(self.conv(x))))


def converted_net():
    torch.manual_seed(0)
    return normkit.convert(Net())


def test_hardened_and_twins_trace_with_fx_as_normkit_ops():
    """torch.fx records each routed functional norm and each twin as one normkit node, as for normkit's modules."""
    model = converted_net().eval()
    gm = torch.fx.symbolic_trace(model)
    normkit_nodes = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and n.target.__module__.startswith("normkit")]
    assert normkit_nodes == ["batch_norm", "layer_norm", "rms_norm_module"], gm.code
    x = torch.randn(2, 3, 4, 5) * 1e20
    assert_rel_close(gm(x), model(x), torch.float32, rel=PARITY_TOL[torch.float32])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hardened_and_twins_export_and_compile(mode):
    """torch.export: the program computes normkit's norms (no aten norm kernel) and, in train mode, updates the
    running statistics as eager does; torch.compile(fullgraph=True) traces the routed calls without a break."""
    model = converted_net().train(mode == "train")
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 5) * 1e20
    program = torch.export.export(copy.deepcopy(model), (x,)).module()
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(op.startswith("aten.") and "norm" in op for op in ops), ops
    want = eager(x)
    assert_rel_close(program(x), want, torch.float32, "export", rel=PARITY_TOL[torch.float32])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert_rel_close(compiled(x), want, torch.float32, "compile", rel=PARITY_TOL[torch.float32])
    for got in (program.state_dict(), model.state_dict()):
        for key in ("bn.running_mean", "bn.running_var"):
            assert_rel_close(got[key], eager.state_dict()[key], torch.float32, key, rel=PARITY_TOL[torch.float32])
    torch.manual_seed(0)
    ref, _ = float64_call(Net().train(mode == "train").double(), x)  # the unconverted model, truly in float64
    assert_rel_close(want, ref, torch.float32, "at 1e20 vs float64")


def test_hardened_and_twins_pickle_deepcopy_and_refuse_torchscript(tmp_path):
    model = converted_net().eval()
    x = torch.randn(2, 3, 4, 5)
    clone = copy.deepcopy(model)
    assert type(clone.bn) is type(model.bn) and torch.equal(clone(x), model(x))
    assert type(pickle.loads(pickle.dumps(model)).ln) is type(model.ln)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x), tmp_path / "y.pt")
    code = (f"import sys, torch; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r}); "
            f"import test_convert; from normkit.robust import Hardened; "
            f"m = torch.load({str(path)!r}, weights_only=False); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"assert isinstance(m.bn, Hardened) and type(m.rms).__name__ == 'RMSNorm'; "
            f"assert torch.equal(m(x), torch.load({str(tmp_path / 'y.pt')!r})); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    with pytest.raises(RuntimeError, match="cannot be compiled by TorchScript"):
        torch.jit.script(model)
    back = normkit.revert(model)
    assert [type(m) for m in back.children()] == [nn.Conv2d, BatchNormAct, LayerNorm2d, UpcastRMS]


# ------------------------------------------------------------------------------------- folding: new forms
@pytest.mark.parametrize("dim,groups,dilation,stride", [(1, 1, 1, 2), (2, 2, 2, 1), (2, 4, 1, 2), (3, 2, 1, 1)])
def test_fold_conv_transpose_with_groups_and_dilation(dim, groups, dilation, stride):
    """ConvTranspose weights are (in, out/groups, *k): output channel g*out/groups + j is W[g*in/groups:(g+1)*in/groups, j]."""
    conv = getattr(nn, f"ConvTranspose{dim}d")(4, 8, 3, stride=stride, dilation=dilation, groups=groups, padding=1)
    bn = getattr(nn, f"BatchNorm{dim}d")(8)
    model = randomize_bn(nn.Sequential(conv, bn, nn.ReLU()))
    folded, report = check_fold(model, torch.randn((2, 4) + (5,) * dim))
    assert report[0].changed and isinstance(folded[1], nn.Identity)


class BatchNormThenScale(nn.BatchNorm2d):
    def forward(self, x):  # not batch norm followed by its submodules: must stay
        return super().forward(x) * 2


def test_fold_batchnorm_act_keeps_the_act_and_leaves_an_own_computation():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 1), BatchNormThenScale(4)))
    folded, report = check_fold(model, torch.randn(2, 3, 6, 6), left={"3": r"computes its own forward, and its eval output is not batch norm followed by its submodules"})
    assert isinstance(folded[1], nn.Sequential) and [type(m) for m in folded[1]] == [nn.Identity, nn.SiLU]
    assert isinstance(folded[3], BatchNormThenScale)
    converted = normkit.convert(model)  # hardened first: folds the same
    folded, _ = check_fold(converted, torch.randn(2, 3, 6, 6), left={"3": r"not batch norm followed by"})
    assert [type(m) for m in folded[1]] == [nn.Identity, nn.SiLU]


def test_fold_hand_written_frozen_batchnorm():
    """torchvision's FrozenBatchNorm2d (not a BatchNorm class): folded once the probe proves it frozen batch norm
    (on 4-D input: example_input proves the conv's output is 4-D); a module with frozen statistics that computes
    something else is left."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), randomized(Frozen(6), g), nn.ReLU())
    folded, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert report[0].changed and isinstance(folded[1], nn.Identity)
    check_fold(model, torch.randn(2, 3, 6, 6), example=False, left={"1": r"only for 4-D output.*pass example_input="})
    odd = nn.Sequential(nn.Conv2d(3, 6, 3), randomized(FrozenPlusOne(6), g))
    check_fold(odd, torch.randn(2, 3, 6, 6), left={"1": r"FrozenPlusOne is not provably a frozen batch norm"})
    with_act = nn.Sequential(nn.Conv2d(3, 6, 3), randomized(FrozenAct(6), g))  # timm's FrozenBatchNormAct2d
    folded, _ = check_fold(with_act, torch.randn(2, 3, 6, 6))
    assert [type(m) for m in folded[1]] == [nn.Identity, nn.GELU]


class FrozenAct(Frozen):
    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.GELU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenPlusOne(Frozen):
    def forward(self, x):
        return super().forward(x) + 1
