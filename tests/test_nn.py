"""normkit.nn against torch.nn: a 6-step train/eval sequence with an optimizer (outputs, parameter updates,
running buffers after every step), state dicts both ways (strict, version-1 checkpoints), repr,
constructor signatures, FrozenBatchNorm, and torch-like errors."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
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


# ------------------------------------------------ LayerNorm / RMSNorm options: casting_mode, offset, channels_first
def _ct(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms(x, eps):  # the textbook formula, in x's dtype
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _ln(x, eps):
    c = x - x.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


def _gn(x, eps, groups=2):  # (N, C, L), two groups of channels
    return _ln(x.reshape(x.shape[0], groups, -1), eps).reshape(x.shape)


NORMS = {"rms": _rms, "layer": _ln, "group": _gn}


# Each convention written as the libraries write it (Hugging Face's Llama, Gemma, T5 norms; torch's own op),
# with ``w = offset + weight`` formed as each does; ``norm`` is _rms or _ln.
def ref_torch(norm, x, w, b, eps, offset):
    y = norm(x.to(_ct(x.dtype)), eps) * (w.to(_ct(x.dtype)) + offset)
    return (y if b is None else y + b.to(y.dtype)).to(x.dtype)


def ref_llama(norm, x, w, b, eps, offset):
    y = (w + offset) * norm(x.to(_ct(x.dtype)), eps).to(x.dtype)
    return y if b is None else y + b


def ref_t5(norm, x, w, b, eps, offset):
    y = norm(x.to(_ct(x.dtype)), eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        y = y.to(w.dtype)
    y = (w + offset) * y
    return y if b is None else y + b


REFS = {"torch": ref_torch, "gemma": ref_torch, "llama": ref_llama, "t5": ref_t5}
DTYPE_GRID = [(xd, wd) for xd in (torch.bfloat16, torch.float16, torch.float32) for wd in (torch.bfloat16, torch.float32)]


def option_module(kind, mode, offset, wd, generator):
    """(module, input shape, weight view): an RMSNorm(8), LayerNorm(8) or GroupNorm(2, 8) with random parameters."""
    if kind == "group":
        m, shape, view = nnk.GroupNorm(2, 8, eps=1e-5, casting_mode=mode, offset=offset), (3, 8, 5), (1, 8, 1)
    else:
        m = (nnk.RMSNorm if kind == "rms" else nnk.LayerNorm)(8, eps=1e-5, casting_mode=mode, offset=offset)
        shape, view = (3, 5, 8), (8,)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(8, generator=generator) - 0.5)
    return m.to(wd), shape, view


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["torch", "gemma", "llama", "t5"])
@pytest.mark.parametrize("kind", ["rms", "layer", "group"])
def test_casting_modes_reproduce_each_convention(kind, mode, offset):
    """Output dtype and values of every (input dtype, weight dtype) as the convention's own code gives them;
    where torch's own op refuses the dtypes (its mixed-dtype rule; torch mode without offset), so does the module."""
    g = torch.Generator().manual_seed(0)
    torch_op = {"layer": lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5),
                "group": lambda x, w, b: F.group_norm(x, 2, w, b, 1e-5)}.get(kind)
    for xd, wd in DTYPE_GRID:
        m, shape, view = option_module(kind, mode, offset, wd, g)
        x = (torch.randn(shape, generator=g) * 2 + 0.5).to(xd)
        w, b = m.weight.view(view), None if kind == "rms" else m.bias.view(view)
        if mode == "torch" and offset == 0 and torch_op is not None:
            try:
                torch_op(x, m.weight, m.bias)
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    m(x)
                continue
        want = REFS[mode](NORMS[kind], x, w, b, 1e-5, offset)
        got = m(x)
        assert got.dtype == want.dtype, (xd, wd, got.dtype, want.dtype)
        assert_rel_close(got, want, want.dtype, f"{kind} {mode} offset {offset} {xd}/{wd}", rel=PARITY_TOL[want.dtype])


@pytest.mark.parametrize("mode", ["torch", "gemma", "llama", "t5"])
@pytest.mark.parametrize("kind", ["rms", "layer", "group"])
def test_casting_modes_compute_float64_in_float64_and_stay_robust(kind, mode):
    """float64 input: a float64 computation (Hugging Face's upcast to float32 is a floor, not a cap); float32 and
    bfloat16 input at 1e20 and 1e30, where the conventions' own code overflows (x**2 in float32): within
    tolerance of the float64 answer."""
    g = torch.Generator().manual_seed(1)
    m, shape, view = option_module(kind, mode, 1.0, torch.float32, g)
    w, b = m.weight.double().view(view), None if kind == "rms" else m.bias.double().view(view)
    for dtype, scale in ((torch.float64, 1.0), (torch.float64, 1e200), (torch.float32, 1e20), (torch.bfloat16, 1e30)):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        oracle = NORMS[kind](x.double() / scale, 1e-5 / scale / scale) * (w + 1) + (0 if b is None else b)
        got = m.double()(x) if dtype == torch.float64 else m.float()(x)
        assert_rel_close(got, oracle, dtype, f"{kind} {mode} {dtype} {scale:g}", rel=1e-12 if dtype == torch.float64 else None)
        if dtype == torch.float32:
            naive = REFS[mode](NORMS[kind], x, m.weight.view(view), None if b is None else b.float(), 1e-5, 1.0)
            assert not torch.isfinite(naive).all() or (naive - oracle).abs().max() > 0.1  # the convention's own code fails here


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_channels_first_normalizes_dim_1_and_keeps_the_memory_format(kind):
    cls, torch_cls = (nnk.RMSNorm, nn.RMSNorm) if kind == "rms" else (nnk.LayerNorm, nn.LayerNorm)
    m, t = cls(6, eps=1e-5, channels_first=True), torch_cls(6, eps=1e-5)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    t.load_state_dict(m.state_dict(), strict=True)
    for shape in ((2, 6), (2, 6, 5), (2, 6, 3, 5), (2, 6, 2, 3, 4)):
        x = torch.randn(shape)
        want = t(x.movedim(1, -1)).movedim(-1, 1)
        assert_rel_close(m(x), want, torch.float32, f"{shape}", rel=PARITY_TOL[torch.float32])
        assert m(x).is_contiguous()
    x = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    assert m(x).is_contiguous(memory_format=torch.channels_last)


def test_options_keep_torchs_repr_and_state_dict_and_check_their_arguments():
    assert repr(nnk.RMSNorm(8)) == repr(nn.RMSNorm(8)) and repr(nnk.LayerNorm(8)) == repr(nn.LayerNorm(8))
    m = nnk.RMSNorm(8, eps=1e-6, casting_mode="llama", offset=1.0, channels_first=True)
    assert repr(m) == "RMSNorm((8,), eps=1e-06, elementwise_affine=True, casting_mode='llama', offset=1.0, channels_first=True)"
    assert list(m.state_dict()) == ["weight"]
    nn.RMSNorm(8).load_state_dict(m.state_dict(), strict=True)
    with pytest.raises(ValueError, match="unknown casting_mode 'fp8'"):
        nnk.RMSNorm(8, casting_mode="fp8")
    with pytest.raises(ValueError, match="offset=1.0 .*elementwise_affine=False"):
        nnk.LayerNorm(8, elementwise_affine=False, offset=1.0)
    with pytest.raises(ValueError, match=r"normalized_shape must be \(C,\), got \(4, 8\)"):
        nnk.RMSNorm((4, 8), channels_first=True)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_options_gradcheck(kind):
    """The options are composed of differentiable ops around normkit's op: gradients and second derivatives."""
    cls = nnk.RMSNorm if kind == "rms" else nnk.LayerNorm
    m = cls(4, eps=1e-3, casting_mode="t5", offset=1.0, channels_first=True).double()
    with torch.no_grad():
        m.weight.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(m, {"weight": w}, (x,)), (x, m.weight))
    torch.autograd.gradgradcheck(m, (x,))
