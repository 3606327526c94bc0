"""The model zoo: torchvision's state-dict keys, order and shapes (from a test-local spec written from the
architectures' papers and torchvision's naming scheme, not from normkit's code), a reference forward from
the state dict alone, determinism, and ``normkit.convert`` leaving every model's float64 output unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit import models

# ------------------------------------------------------------------ test-local torchvision naming scheme
# A spec is an ordered list of layers: ("conv", name, c_in, c_out, kernel, stride, groups),
# ("bn", name, channels), ("linear", name, in, out). Its keys follow torch's state-dict rules.


def resnet18_spec(num_classes=1000):
    spec = [("conv", "conv1", 3, 64, 7, 2, 1), ("bn", "bn1", 64)]
    c_in = 64
    for i, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            stride = 2 if (b == 0 and i > 1) else 1
            p = f"layer{i}.{b}"
            spec += [("conv", f"{p}.conv1", c_in, c, 3, stride, 1), ("bn", f"{p}.bn1", c),
                     ("conv", f"{p}.conv2", c, c, 3, 1, 1), ("bn", f"{p}.bn2", c)]
            if stride != 1 or c_in != c:
                spec += [("conv", f"{p}.downsample.0", c_in, c, 1, stride, 1), ("bn", f"{p}.downsample.1", c)]
            c_in = c
    return spec + [("linear", "fc", 512, num_classes)]


MBV2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2_spec(num_classes=1000):
    spec = [("conv", "features.0.0", 3, 32, 3, 2, 1), ("bn", "features.0.1", 32)]
    c_in, idx = 32, 1
    for t, c, n, s in MBV2_BLOCKS:
        for r in range(n):
            p, hidden, j = f"features.{idx}.conv", c_in * t, 0
            if t != 1:
                spec += [("conv", f"{p}.0.0", c_in, hidden, 1, 1, 1), ("bn", f"{p}.0.1", hidden)]
                j = 1
            spec += [("conv", f"{p}.{j}.0", hidden, hidden, 3, s if r == 0 else 1, hidden), ("bn", f"{p}.{j}.1", hidden),
                     ("conv", f"{p}.{j + 1}", hidden, c, 1, 1, 1), ("bn", f"{p}.{j + 2}", c)]
            c_in, idx = c, idx + 1
    spec += [("conv", f"features.{idx}.0", 320, 1280, 1, 1, 1), ("bn", f"features.{idx}.1", 1280)]
    return spec + [("linear", "classifier.1", 1280, num_classes)]


def alexnet_spec(num_classes=1000):
    convs = [("features.0", 3, 64, 11), ("features.4", 64, 192, 5), ("features.8", 192, 384, 3),
             ("features.10", 384, 256, 3), ("features.12", 256, 256, 3)]
    lin = [("classifier.1", 9216, 4096), ("classifier.4", 4096, 4096), ("classifier.6", 4096, num_classes)]
    return [("conv_b", n, i, o, k, 1, 1) for n, i, o, k in convs] + [("linear", n, i, o) for n, i, o in lin]


def keys_and_shapes(spec):
    out = []
    for kind, name, *a in spec:
        if kind in ("conv", "conv_b"):
            c_in, c_out, k, _, groups = a
            out.append((f"{name}.weight", (c_out, c_in // groups, k, k)))
            if kind == "conv_b":
                out.append((f"{name}.bias", (c_out,)))
        elif kind == "bn":
            (c,) = a
            out += [(f"{name}.{b}", (c,)) for b in ("weight", "bias", "running_mean", "running_var")]
            out.append((f"{name}.num_batches_tracked", ()))
        else:
            i, o = a
            out += [(f"{name}.weight", (o, i)), (f"{name}.bias", (o,))]
    return out


@pytest.mark.parametrize("name, spec", [("resnet18", resnet18_spec), ("mobilenet_v2", mobilenet_v2_spec),
                                        ("alexnet", alexnet_spec)])
def test_state_dict_keys_order_and_shapes_match_torchvision(name, spec):
    sd = models.get(name, num_classes=10).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == keys_and_shapes(spec(10))


def test_parameter_counts_are_torchvisions():
    # the published torchvision parameter counts (1000 classes)
    counts = {"resnet18": 11_689_512, "mobilenet_v2": 3_504_872, "alexnet": 61_100_840}
    for name, n in counts.items():
        assert sum(p.numel() for p in models.get(name).parameters()) == n, name


# ------------------------------------------------------------------ reference forwards from the state dict


def _bn(x, sd, name):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], False, 0.0, 1e-5)


def resnet18_reference(sd, x):
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i in range(1, 5):
        for b in range(2):
            p = f"layer{i}.{b}"
            stride = 2 if (b == 0 and i > 1) else 1
            idn = x
            if f"{p}.downsample.0.weight" in sd:
                idn = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            y = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
            y = _bn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            x = F.relu(y + idn)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def mobilenet_v2_reference(sd, x):
    def cbr(x, name, stride=1, groups=1):
        w = sd[f"{name}.0.weight"]
        return F.relu6(_bn(F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups), sd, f"{name}.1"))

    x = cbr(x, "features.0", stride=2)
    c_in, idx = 32, 1
    for t, c, n, s in MBV2_BLOCKS:
        for r in range(n):
            p, j, stride, y = f"features.{idx}.conv", 0, (s if r == 0 else 1), x
            if t != 1:
                y, j = cbr(y, f"{p}.0"), 1
            y = cbr(y, f"{p}.{j}", stride=stride, groups=c_in * t)
            y = _bn(F.conv2d(y, sd[f"{p}.{j + 1}.weight"]), sd, f"{p}.{j + 2}")
            x = x + y if (stride == 1 and c_in == c) else y
            c_in, idx = c, idx + 1
    x = cbr(x, f"features.{idx}").mean((2, 3))
    return F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"])


def alexnet_reference(sd, x):
    def conv(x, n, **kw):
        return F.relu(F.conv2d(x, sd[f"features.{n}.weight"], sd[f"features.{n}.bias"], **kw))

    def lrn(x):  # the paper's constants, torch's window convention
        return F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)

    x = F.max_pool2d(lrn(conv(x, 0, stride=4, padding=2)), 3, 2)
    x = F.max_pool2d(lrn(conv(x, 4, padding=2)), 3, 2)
    x = F.max_pool2d(conv(conv(conv(x, 8, padding=1), 10, padding=1), 12, padding=1), 3, 2)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 6), 1)
    x = F.relu(F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"]))
    x = F.relu(F.linear(x, sd["classifier.4.weight"], sd["classifier.4.bias"]))
    return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"])


def _randomize_bn_stats(model, g):
    # non-trivial running statistics, so the reference forward really tests the BatchNorm wiring
    for k, v in model.state_dict().items():
        if k.endswith("running_mean"):
            v.copy_(0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype))
        elif k.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))


@pytest.mark.parametrize("name, reference, shape", [("resnet18", resnet18_reference, (2, 3, 64, 64)),
                                                     ("mobilenet_v2", mobilenet_v2_reference, (2, 3, 64, 48)),
                                                     ("alexnet", alexnet_reference, (1, 3, 67, 67))])
def test_forward_matches_reference_from_state_dict(name, reference, shape):
    g = torch.Generator().manual_seed(1)
    model = models.get(name, num_classes=7).double().eval()
    _randomize_bn_stats(model, g)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model.state_dict(), x), rtol=1e-10, atol=1e-12)


def test_deterministic_from_seed_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = (models.resnet18(num_classes=5, seed=s).state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before), "building a zoo model must not move the global RNG"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_alexnet_has_lrn_after_first_two_relus():
    f = models.alexnet().features
    lrns = [i for i, m in enumerate(f) if isinstance(m, torch.nn.LocalResponseNorm)]
    assert lrns == [2, 6]
    assert all(isinstance(f[i - 1], torch.nn.ReLU) for i in lrns)
    assert (f[2].size, f[2].alpha, f[2].beta, f[2].k) == (5, 1e-4, 0.75, 2.0)


@pytest.mark.parametrize("norm, cls", [("layer", torch.nn.LayerNorm), ("rms", torch.nn.RMSNorm)])
def test_transformer_block(norm, cls):
    m = models.transformer_block(d_model=32, n_heads=4, norm=norm)
    assert isinstance(m.norm1, cls) and isinstance(m.norm2, cls)
    assert m.example_input_shape == (2, 16, 32)
    x = torch.randn(m.example_input_shape)
    assert m(x).shape == x.shape
    assert models.transformer_block(d_model=32, n_heads=4, norm=norm, num_classes=3)(x).shape == (2, 3)
    with pytest.raises(ValueError, match="norm='batch'"):
        models.transformer_block(norm="batch")


def test_registry_get_builds_a_model_ready_for_convert():
    assert {"alexnet", "resnet18", "mobilenet_v2", "transformer_block", "transformer_block_rms"} <= set(models.ZOO)
    with pytest.raises(ValueError, match="known models: alexnet"):
        models.get("resnet50")
    with pytest.raises(ValueError, match="known models: alexnet"):
        models.entry(42)
    model = models.get("resnet18")
    assert isinstance(model, torch.nn.Module) and model.example_input_shape == models.entry("resnet18").input_shape
    twin = normkit.convert(model)  # straight in, as the README says
    assert type(twin.bn1) is normkit.nn.BatchNorm2d and type(model.bn1) is torch.nn.BatchNorm2d
    rms = models.get("transformer_block_rms", d_model=32)
    assert isinstance(rms.norm1, torch.nn.RMSNorm) and rms.example_input_shape == (2, 16, 32), "the factory's own shape wins"
    e = models.entry("transformer_block_rms")
    assert e.input_shape == e.build().example_input_shape


def test_namespaces_hold_only_the_api_and_help_lists_it():
    import pydoc

    import normkit.check

    public = {n for n in dir(models) if not n.startswith("_")}
    assert public == set(models.__all__), public ^ set(models.__all__)
    helpers = {"annotations", "Any", "Callable", "dataclass", "field"}
    for module in (normkit, normkit.check):
        assert not {n for n in dir(module) if not n.startswith("_")} & helpers, module.__name__
    text = pydoc.render_doc(normkit, renderer=pydoc.plaintext)
    for name in [n for n in normkit.__all__ if n != "__version__"] + ["normkit.models", "normkit.reference", "normkit.onnx", "compare_onnx"]:
        assert name in text, f"help(normkit) does not list {name}"


SMALL = {"alexnet": (1, 3, 67, 67), "resnet18": (2, 3, 32, 32), "mobilenet_v2": (2, 3, 64, 64)}


@pytest.mark.parametrize("name", list(models.ZOO))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_convert_leaves_float64_output_unchanged(name, mode):
    entry = models.entry(name)
    model = (entry.build(num_classes=10) if "transformer" not in name else entry.build()).double()
    g = torch.Generator().manual_seed(2)
    if mode == "eval":
        _randomize_bn_stats(model, g)
        model.eval()
    else:  # batch statistics; dropout off so the two runs see the same function
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    twin, report = normkit.convert(model, return_report=True)
    assert report and all(s.changed for s in report)
    x = torch.randn(SMALL.get(name, entry.input_shape), generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-9, atol=1e-12)
