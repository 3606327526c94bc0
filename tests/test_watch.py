"""normkit.watch: each watched layer's headroom against a float64 numpy oracle computed from the input the
layer received, for torch's norm modules, normkit's, functional norm calls inside other classes (and inside the
classes normkit.convert hardened), and hand-written norms -- found by behaviour (what normkit.convert proves),
never by class name; the warning (once, naming the layer); no effect on outputs and gradients; hooks and the
function mode gone afterwards."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit
from normkit.watch import HeadroomWarning, watch

F16_MAX = 65504.0


def oracle(x: torch.Tensor, groups_of, center: bool = True, dtype=torch.float16) -> float:
    """log2(max / largest square), with the reduction groups as ``groups_of(x) -> (G, n)`` float64 rows."""
    rows = groups_of(x.detach().double().numpy())
    d = rows - rows.mean(axis=1, keepdims=True) if center else rows
    return math.log2(torch.finfo(dtype).max) - 2 * math.log2(np.abs(d).max())


def last_dims(k):
    return lambda a: a.reshape(-1, int(np.prod(a.shape[-k:])))


def channels(a):  # every dim but 1 (BatchNorm on batch statistics)
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def per_instance(a):
    return a.reshape(a.shape[0] * a.shape[1], -1)


def per_group(g):
    return lambda a: a.reshape(a.shape[0] * g, -1)


class LayerNorm2d(nn.Module):
    """timm/torchvision-style: permutes to channels-last and calls F.layer_norm in its own forward."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias).permute(0, 3, 1, 2)


class LayerNorm2dSubclass(nn.LayerNorm):
    """timm's LayerNorm2d: a subclass of torch's LayerNorm whose own forward permutes, so it normalizes dim 1,
    not the trailing dims its class would."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class HandRMS(nn.Module):
    """A hand-written RMS norm as Hugging Face writes it (no norm function is called), under a name that says
    nothing: the watch finds it by what it computes."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(c)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class HandChannelsLayerNorm(nn.Module):
    """A ConvNeXt-style hand-written layer norm over dim 1 of (N, C, H, W)."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), 1e-6

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class FakeRMSNorm(nn.Module):
    """Named like a norm, with an eps and a weight, but no normalization: not watched, with the reason."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(c)), 1e-6

    def forward(self, x):
        return x * self.weight


def _layers():
    """name -> (module, input shape, rows of its groups, centred)"""
    return {
        "LayerNorm": (nn.LayerNorm([5, 6]), (3, 4, 5, 6), last_dims(2), True),
        "normkit.LayerNorm": (normkit.nn.LayerNorm(6), (3, 4, 5, 6), last_dims(1), True),
        "RMSNorm": (nn.RMSNorm(6), (3, 4, 6), lambda a: a.reshape(1, -1), False),
        "GroupNorm": (nn.GroupNorm(2, 4), (3, 4, 5, 6), per_group(2), True),
        "BatchNorm2d": (nn.BatchNorm2d(4), (3, 4, 5, 6), channels, True),
        "normkit.BatchNorm2d": (normkit.nn.BatchNorm2d(4), (3, 4, 5, 6), channels, True),
        "InstanceNorm2d": (nn.InstanceNorm2d(4), (3, 4, 5, 6), per_instance, True),
        "LocalResponseNorm": (nn.LocalResponseNorm(3), (3, 4, 5, 6), lambda a: a.reshape(1, -1), False),
        "LayerNorm2d (F.layer_norm inside)": (LayerNorm2d(4), (3, 4, 5, 6), lambda a: np.moveaxis(a, 1, -1).reshape(-1, 4), True),
        "LayerNorm subclass with a forward of its own": (LayerNorm2dSubclass(4), (3, 4, 5, 6),
                                                         lambda a: np.moveaxis(a, 1, -1).reshape(-1, 4), True),
        "LayerNorm2d, hardened by normkit.convert": (normkit.convert(LayerNorm2d(4)), (3, 4, 5, 6),
                                                     lambda a: np.moveaxis(a, 1, -1).reshape(-1, 4), True),
        "hand-written RMS norm": (HandRMS(6), (3, 4, 6), lambda a: a.reshape(1, -1), False),
        "hand-written layer norm over dim 1": (HandChannelsLayerNorm(4), (3, 4, 5, 6),
                                               lambda a: np.moveaxis(a, 1, -1).reshape(-1, 4), True),
        "normkit twin of it (channels_first)": (normkit.convert(HandChannelsLayerNorm(4)), (3, 4, 5, 6),
                                                lambda a: np.moveaxis(a, 1, -1).reshape(-1, 4), True),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_headroom_matches_the_oracle(name):
    layer, shape, groups_of, center = _layers()[name]
    model = nn.Sequential(nn.Identity(), layer)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    w = watch(model, dtype=torch.float16, every=1)
    model(torch.randn(shape))  # the first forward finds the functional calls of modules no probe names
    calls = w.records["1"].calls
    assert calls == 1 and not w.left
    for step, scale in enumerate((1.0, 37.0)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * scale + 0.5 * scale
        model(x)
        rec = w.records["1"]
        assert rec.calls == calls + step + 1 and rec.dtype == "float16"
        assert rec.last == pytest.approx(oracle(seen[-1], groups_of, center), abs=1e-6), rec
    assert rec.lowest == min(rec.history) and rec.last == rec.history[-1]
    w.remove()


class Scaled(nn.Module):
    """Multiplies by a fixed factor: each norm of a stack below sees inputs of another scale."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "BatchNorm2d", "RMSNorm"])
def test_norms_of_one_shape_are_measured_together_each_against_its_own_oracle(name):
    """Five norms of one kind and shape are measured in one stacked batch at the end of the forward: each
    record still gets its own input's oracle (and BatchNorm on running statistics, each its own mean)."""
    layer, shape, groups_of, center = _layers()[name]
    norms = [type(layer)(*([2, 4] if name == "GroupNorm" else [4] if name == "BatchNorm2d" else [layer.normalized_shape]))
             for _ in range(5)]
    model = nn.Sequential(*[m for k, n in enumerate(norms) for m in (Scaled(10.0 ** k), n)])
    seen = {}
    for k, n in enumerate(norms):
        n.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0].detach().clone()))
    w = watch(model, dtype=torch.float16, every=1)
    model(torch.randn(shape) + 0.5)
    for k in range(5):
        rec = w.records[str(2 * k + 1)]
        assert rec.calls == 1 and rec.last == pytest.approx(oracle(seen[k], groups_of, center), abs=1e-6), (k, rec)
    if name == "BatchNorm2d":  # on running statistics: x - running_mean, a different mean per layer
        for k, n in enumerate(norms):
            with torch.no_grad():
                n.running_mean.fill_(float(k) * 100)
        model.eval()
        model(torch.randn(shape))
        for k, n in enumerate(norms):
            dev = (seen[k] - n.running_mean.view(1, -1, 1, 1)).abs().max().item()
            assert w.records[str(2 * k + 1)].last == pytest.approx(math.log2(F16_MAX) - math.log2(dev), abs=1e-6)


def test_large_inputs_one_by_one_and_small_ones_stacked_in_one_forward():
    """Same-shaped inputs above normkit.watch.STACKED elements are measured one by one (a stack would copy
    them), small ones stacked; in one forward, each record gets its own input's oracle."""
    from normkit.watch import STACKED

    big = nn.Sequential(*[m for k in range(3) for m in (Scaled(10.0 ** k), nn.LayerNorm(128))])
    small = nn.Sequential(*[m for k in range(2) for m in (Scaled(3.0 ** k), nn.RMSNorm(8))])

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.big, self.small = big, small

        def forward(self, x, y):
            return self.big(x).sum() + self.small(y).sum()

    model = Both()
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
    x = torch.randn(2, STACKED // 128 + 2, 128)
    assert x.numel() > STACKED
    w = watch(model, every=1)
    model(x, torch.randn(4, 8))
    assert len(w.records) == 5
    for name, rec in w.records.items():
        center = name.startswith("big")
        assert rec.calls == 1 and rec.last == pytest.approx(
            oracle(seen[name], last_dims(1), center, dtype=torch.float32), abs=1e-6), (name, rec)


class ChangesItsNormInput(nn.Module):
    """Normalizes x, then (with ``change``) changes x in place: fine under no_grad; in training the backward
    would refuse it (the norm saved x)."""

    def __init__(self):
        super().__init__()
        self.norm, self.change = nn.LayerNorm(4), True

    def forward(self, x):
        x = x.clone()
        y = self.norm(x)
        if self.change:
            x.mul_(1e6)
        return y


def test_an_input_changed_in_place_before_the_forward_ends_is_counted_not_mismeasured():
    model = ChangesItsNormInput()
    w = watch(model, every=1)
    with torch.no_grad():
        model(torch.randn(2, 4))
    rec = w.records["norm"]
    assert rec.stale == 1 and rec.calls == 0 and rec.last == math.inf
    model.change = False
    x = torch.randn(2, 4)
    model(x)
    expect = math.log2(torch.finfo(torch.float32).max) - 2 * math.log2((x - x.mean(-1, keepdim=True)).abs().max().item())
    assert rec.stale == 1 and rec.calls == 1 and rec.last == pytest.approx(expect, abs=1e-5)


def test_batchnorm_eval_measures_the_distance_from_the_running_mean():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 100.0, -3.0, 7.0]))
    model = nn.Sequential(bn)
    w = watch(model, every=1)
    x = torch.randn(2, 4, 3, 3)
    model(x)
    dev = (x - bn.running_mean.view(1, -1, 1, 1)).abs().max().item()
    assert w.records["0"].last == pytest.approx(math.log2(torch.finfo(torch.float32).max) - math.log2(dev), abs=1e-6)


def test_default_dtype_is_the_input_dtype_and_frozen_batchnorm():
    frozen = normkit.nn.FrozenBatchNorm2d(4)
    model = nn.Sequential(frozen, nn.LayerNorm(3)).to(torch.bfloat16)
    w = watch(model, every=1)
    model(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert {r.dtype for r in w.records.values()} == {"bfloat16"} and set(w.records) == {"0", "1"}


def test_warns_once_naming_the_layer_that_comes_close():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8))
    w = watch(model, dtype=torch.float16, every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 8))  # far from overflow: no warning
        assert not [c for c in caught if issubclass(c.category, HeadroomWarning)]
        big = torch.randn(4, 8)
        big[0, 0] = 200.0  # norm 1's input (the identity Linear's output): (x - mean)^2 ~ 3e4, within 2 powers of two
        with torch.no_grad():
            model[0].weight.copy_(torch.eye(8))
            model[0].bias.zero_()
        model(big)
        model(big)
    mine = [str(c.message) for c in caught if issubclass(c.category, HeadroomWarning)]
    assert len(mine) == 1 and "normkit.watch: 1 (LayerNorm)" in mine[0] and "float16" in mine[0], mine
    assert w.records["1"].warned and not w.records["2"].warned and w.records["1"].lowest < 2


def test_outputs_and_gradients_unchanged_and_hooks_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LayerNorm2d(4), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    x = torch.randn(2, 3, 8, 8)

    def step(m):
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters()]

    y0, g0 = step(model)
    stats0 = model[2].running_mean.clone()
    w = watch(model, every=1)
    y1, g1 = step(model)
    y2, g2 = step(model)  # after discovery: the functional call is watched through the mode, inside its host only
    assert torch.equal(y0, y1) and torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g0, g2))
    assert w.records["1"].how == "functional call in its forward" and w.records["1"].calls == 2
    assert not torch.overrides._get_current_function_mode_stack(), "the mode stays inside the host's forward"
    w.remove()
    model(x)
    assert w.records["1"].calls == 2 and w.records["2"].calls == 2, "no hook after remove()"
    assert not torch.equal(stats0, model[2].running_mean)


def test_an_exception_inside_a_host_leaves_no_mode_behind():
    class Failing(nn.Module):
        def forward(self, x):
            y = F.layer_norm(x, x.shape[-1:])
            if x.shape[0] == 3:
                raise ValueError("boom")
            return y

    model = nn.Sequential(Failing())
    w = watch(model, every=1)
    model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="boom"):
        model(torch.randn(3, 4))
    assert not torch.overrides._get_current_function_mode_stack()
    model(torch.randn(2, 4))
    assert w.records["0"].calls == 3  # the raising step's measurement is read with the next step


def test_root_module_calling_a_functional_norm():
    class Root(nn.Module):
        def forward(self, x):
            return F.group_norm(x, 2)

    root = Root()
    w = watch(root, dtype=torch.float16, every=1)
    x = torch.randn(2, 4, 5)
    root(x)
    root(x * 10)
    rec = w.records[""]
    assert rec.name == "Root" and rec.calls == 2
    assert rec.last == pytest.approx(oracle(x * 10, per_group(2)), abs=1e-6)


def test_default_measures_one_forward_in_eight():
    """The default keeps the watch cheap (see benchmarks/watch.py): forwards 0 and 8 of 10 are measured."""
    model = nn.Sequential(nn.LayerNorm(5))
    w = watch(model)
    for _ in range(10):
        model(torch.randn(2, 5))
    assert w.every == 8 and w.records["0"].calls == 2 and len(w.records["0"].history) == 2


def test_every_measures_one_step_in_n():
    model = nn.Sequential(LayerNorm2d(4), nn.LayerNorm(5))
    w = watch(model, every=3)
    for _ in range(7):
        model(torch.randn(2, 4, 5, 5))
    assert w.records["0"].calls == 3 and w.records["1"].calls == 3  # steps 0, 3, 6
    assert not torch.overrides._get_current_function_mode_stack()


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        watch(lambda x: x)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        watch(nn.LayerNorm(3), dtype=torch.int32)
    with pytest.raises(ValueError, match="every=0 must be a positive integer"):
        watch(nn.LayerNorm(3), every=0)


def test_report_lists_every_layer_and_what_is_not_watched():
    model = nn.Sequential(nn.LayerNorm(4), HandRMS(4), FakeRMSNorm(4))
    with watch(model, every=1) as w:
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
    assert set(w.records) == {"0", "1"} and w.records["1"].calls == 2
    assert w.records["1"].how == "proven RMSNorm(casting_mode='llama') (hand-written)"
    assert list(w.left) == ["2"] and "FakeRMSNorm: its float64 output is no normalization of its input" in w.left["2"]
    text = w.report()
    assert "LayerNorm" in text and "HandRMS" in text and len(text.splitlines()) == 5
    assert text.splitlines()[-1].startswith("not watched: 2 (FakeRMSNorm: its float64 output is no normalization")


def test_hugging_face_hand_written_norms_are_watched_by_what_they_compute():
    third_party = pytest.importorskip("third_party")
    third_party.transformers()
    llama = pytest.importorskip("transformers.models.llama.modeling_llama", reason="transformers' Llama")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5", reason="transformers' T5")
    model = nn.Sequential(nn.Linear(8, 8), llama.LlamaRMSNorm(8), t5.T5LayerNorm(8))
    w = watch(model, dtype=torch.float16, every=1)
    seen = {}
    for i in (1, 2):
        model[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
    model(torch.randn(3, 8) * 40)
    assert set(w.records) == {"1", "2"} and not w.left
    for i in (1, 2):
        assert w.records[str(i)].last == pytest.approx(oracle(seen[i], lambda a: a.reshape(1, -1), center=False), abs=1e-6)
    assert {r.how for r in w.records.values()} == {"proven RMSNorm(casting_mode='llama') (hand-written)",
                                                   "proven RMSNorm(casting_mode='t5') (hand-written)"}
