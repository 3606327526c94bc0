"""normkit.nn against torch.nn: a 6-step train/eval sequence with an optimizer (outputs, parameter updates,
running buffers after every step), state dicts both ways (strict, version-1 checkpoints), repr,
constructor signatures, FrozenBatchNorm, and torch-like errors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import normkit.nn as nnk
from conftest import PARITY_TOL, assert_rel_close

# (torch class, normkit class, args, kwargs, input shape)
CASES = [
    (nn.BatchNorm1d, nnk.BatchNorm1d, (5,), {}, (6, 5)),
    (nn.BatchNorm1d, nnk.BatchNorm1d, (5,), {"momentum": None}, (4, 5, 7)),
    (nn.BatchNorm2d, nnk.BatchNorm2d, (4,), {}, (3, 4, 5, 6)),
    (nn.BatchNorm2d, nnk.BatchNorm2d, (4,), {"momentum": None, "eps": 1e-3}, (3, 4, 5, 6)),
    (nn.BatchNorm2d, nnk.BatchNorm2d, (4,), {"affine": False}, (3, 4, 5, 6)),
    (nn.BatchNorm2d, nnk.BatchNorm2d, (4,), {"track_running_stats": False}, (3, 4, 5, 6)),
    (nn.BatchNorm3d, nnk.BatchNorm3d, (3,), {"momentum": 0.3}, (2, 3, 4, 3, 5)),
    (nn.InstanceNorm1d, nnk.InstanceNorm1d, (4,), {}, (3, 4, 9)),
    (nn.InstanceNorm2d, nnk.InstanceNorm2d, (4,), {"affine": True, "track_running_stats": True}, (3, 4, 5, 6)),
    (nn.InstanceNorm2d, nnk.InstanceNorm2d, (4,), {"track_running_stats": True, "momentum": None}, (4, 5, 6)),  # unbatched
    (nn.InstanceNorm3d, nnk.InstanceNorm3d, (3,), {"affine": True}, (2, 3, 4, 3, 5)),
    (nn.LayerNorm, nnk.LayerNorm, ((5, 6),), {}, (3, 4, 5, 6)),
    (nn.LayerNorm, nnk.LayerNorm, (6,), {"bias": False}, (3, 6)),
    (nn.LayerNorm, nnk.LayerNorm, (6,), {"elementwise_affine": False, "eps": 1e-3}, (3, 4, 6)),
    (nn.GroupNorm, nnk.GroupNorm, (2, 4), {}, (3, 4, 5, 6)),
    (nn.GroupNorm, nnk.GroupNorm, (4, 4), {"affine": False}, (3, 4, 7)),
    (nn.RMSNorm, nnk.RMSNorm, (6,), {}, (3, 4, 6)),
    (nn.RMSNorm, nnk.RMSNorm, ((5, 6),), {"eps": 1e-4, "elementwise_affine": False}, (3, 5, 6)),
    (nn.LocalResponseNorm, nnk.LocalResponseNorm, (3,), {}, (3, 6, 5, 4)),
    (nn.LocalResponseNorm, nnk.LocalResponseNorm, (4,), {"alpha": 1e-2, "beta": 0.6, "k": 2.0}, (3, 6, 5)),
]
IDS = [f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)]


def pair(case, dtype=torch.float32):
    torch_cls, nk_cls, args, kwargs, _ = case
    t = torch_cls(*args, **kwargs, dtype=dtype) if torch_cls is not nn.LocalResponseNorm else torch_cls(*args, **kwargs)
    n = nk_cls(*args, **kwargs, dtype=dtype) if nk_cls is not nnk.LocalResponseNorm else nk_cls(*args, **kwargs)
    with torch.no_grad():  # non-trivial affine parameters, identical in both
        for p in t.parameters():
            p.uniform_(0.5, 1.5)
    n.load_state_dict(t.state_dict(), strict=True)
    return t, n


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_six_step_train_eval_sequence(case):
    """Train, train, train, eval, train, eval with SGD+momentum: every output, parameter and buffer matches."""
    t, n = pair(case)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if list(m.parameters()) else None for m in (t, n)]
    shape = case[4]
    for step, training in enumerate([True, True, True, False, True, False]):
        t.train(training)
        n.train(training)
        x = torch.randn(shape) * 2 + step
        w = torch.randn(shape)
        outs = []
        for m, opt in zip((t, n), opts):
            if opt:
                opt.zero_grad()
            y = m(x)
            outs.append(y.detach())
            if opt and training:
                (y * w).sum().backward()
                opt.step()
        assert_rel_close(outs[1], outs[0], torch.float32, f"step {step} output", rel=PARITY_TOL[torch.float32])
        for (name, a), (_, b) in zip(t.state_dict().items(), n.state_dict().items()):
            assert a.dtype == b.dtype, name
            if a.is_floating_point():
                assert_rel_close(b, a, torch.float32, f"step {step} {name}", rel=PARITY_TOL[torch.float32])
            else:
                assert torch.equal(a, b), f"step {step} {name}: {a} != {b}"


def torch_part_of_signature(cls):
    """(name, kind, default) of every constructor parameter but normkit's own keyword-only options (LRN's
    convention/region; LayerNorm's and RMSNorm's casting_mode/offset/channels_first)."""
    extra = {"convention", "region", "casting_mode", "offset", "channels_first"}
    return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()
            if not (p.kind is p.KEYWORD_ONLY and p.name in extra and cls.__module__.startswith("normkit"))]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_both_ways_repr_and_signature(case):
    t, n = pair(case)
    assert repr(n) == repr(t)
    assert list(n.state_dict()) == list(t.state_dict())
    t2, _ = pair(case)
    t2.load_state_dict(n.state_dict(), strict=True)
    n.load_state_dict(t.state_dict(), strict=True)
    assert torch_part_of_signature(case[1]) == torch_part_of_signature(case[0])
    assert [name for name, _ in n.named_parameters()] == [name for name, _ in t.named_parameters()]


@pytest.mark.parametrize("cls,torch_cls", [(nnk.BatchNorm2d, nn.BatchNorm2d), (nnk.InstanceNorm2d, nn.InstanceNorm2d)])
def test_version_1_checkpoint_without_num_batches_tracked(cls, torch_cls):
    t = torch_cls(4, affine=True, track_running_stats=True)
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    n = cls(4, affine=True, track_running_stats=True)
    n.load_state_dict(sd, strict=True)
    assert n.num_batches_tracked.dtype == torch.long and int(n.num_batches_tracked) == 0


def test_device_dtype_and_resets():
    m = nnk.BatchNorm2d(3, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    m(torch.randn(4, 3, 2, 2, dtype=torch.float64) + 3)
    assert int(m.num_batches_tracked) == 1 and m.running_mean.abs().sum() > 0
    m.reset_running_stats()
    assert int(m.num_batches_tracked) == 0 and m.running_mean.abs().sum() == 0
    m.weight.data.fill_(3)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3, dtype=torch.float64))
    assert nnk.LayerNorm(4, dtype=torch.bfloat16)(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_instance_norm_warning_matches_torch():
    x = torch.randn(2, 5, 4, 4)
    with pytest.warns(UserWarning, match="does not match num_features") as torch_w:
        nn.InstanceNorm2d(3)(x)
    with pytest.warns(UserWarning, match="does not match num_features") as ours:
        nnk.InstanceNorm2d(3)(x)
    assert str(ours[0].message) == str(torch_w[0].message)


def test_normkit_modules_are_robust_where_torch_is_not():
    x = torch.randn(2, 4, 8) * 1e20
    assert torch.isnan(nn.LayerNorm(8)(x)).any()
    assert torch.isfinite(nnk.LayerNorm(8)(x)).all()


# --------------------------------------------------------------------------- FrozenBatchNorm
@pytest.mark.parametrize("frozen_cls,bn_cls,shape", [(nnk.FrozenBatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
                                                     (nnk.FrozenBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 5)),
                                                     (nnk.FrozenBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 4))])
def test_frozen_batchnorm(frozen_cls, bn_cls, shape):
    bn = bn_cls(3, eps=1e-3)
    for _ in range(3):
        bn(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    frozen = frozen_cls.from_batchnorm(bn)
    assert repr(frozen) == f"{frozen_cls.__name__}(3, eps=0.001)"
    assert list(frozen.parameters()) == [] and set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(shape, requires_grad=True)
    assert_rel_close(frozen.train()(x), bn(x), torch.float32)  # train() changes nothing
    frozen(x).sum().backward()
    assert x.grad is not None
    loaded = frozen_cls(3, eps=1e-3)
    loaded.load_state_dict(bn.state_dict(), strict=True)  # a BatchNorm checkpoint loads as is
    assert_rel_close(loaded(x), bn(x), torch.float32)
    back = frozen.to_batchnorm()
    assert type(back).__name__ == bn_cls.__name__ and not back.training
    assert_rel_close(back(x), bn(x), torch.float32)
    other_eps = frozen_cls.from_batchnorm(bn, eps=0.0)
    assert other_eps.eps == 0.0
    with pytest.raises(ValueError, match="expected"):
        frozen(torch.randn(3))
    with pytest.raises(ValueError, match="no running statistics"):
        frozen_cls.from_batchnorm(bn_cls(3, track_running_stats=False))


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("nk_cls,torch_cls,shape", [(nnk.BatchNorm1d, nn.BatchNorm1d, (2, 3, 4, 5)),
                                                    (nnk.BatchNorm3d, nn.BatchNorm3d, (2, 3, 4)),
                                                    (nnk.InstanceNorm2d, nn.InstanceNorm2d, (2, 3)),
                                                    (nnk.InstanceNorm1d, nn.InstanceNorm1d, (2, 3, 4, 4))])
def test_rank_errors_are_torchs(nk_cls, torch_cls, shape):
    """The module checks moved into normkit's fx-traceable module functions: same type and message as torch's."""
    x = torch.randn(shape)
    with pytest.raises(ValueError) as want:
        torch_cls(3)(x)
    with pytest.raises(ValueError) as got:
        nk_cls(3)(x)
    assert str(got.value) == str(want.value)


def test_affine_instance_norm_feature_mismatch_is_torchs_error():
    with pytest.raises(ValueError, match=r"expected input's size at dim=1 to match num_features \(3\), but got: 5"):
        nnk.InstanceNorm2d(3, affine=True)(torch.randn(2, 5, 4, 4))


def test_torch_like_errors():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        nnk.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"num_channels \(16\) must be divisible by num_groups \(5\)"):
        nnk.GroupNorm(5, 16)
    with pytest.raises(ValueError, match=r"normalized_shape=\[7\].*\[2, 5\]"):
        nnk.LayerNorm(7)(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="size mismatch"):
        nnk.BatchNorm2d(3).load_state_dict(nn.BatchNorm2d(4).state_dict())
    with pytest.raises(ValueError, match="unknown convention"):
        nnk.LocalResponseNorm(3, convention="mxnet")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nnk.BatchNorm1d(3)(torch.randn(1, 3))
