"""normkit.onnx: harden_onnx on hand-built graphs of every native normalization node and decomposed
pattern (and ONNX's shipped node test cases), export_onnx of single layers and of the model zoo, verified
in ONNX Runtime (graph optimizations off) or, for float16 graphs, onnx.reference, against float64."""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from torch import nn

import normkit
from normkit.onnx import OnnxError, export_onnx, harden_onnx, verify_onnx
from normkit.onnx.harden import NATIVE_OPS
from normkit.onnx.verify import compare_onnx, measure, run

from onnx_graphs import cast_model, decomposed, ms_cases, native_cases

# Acceptance tolerances of the ONNX issue (relative to max|ref|, float64 reference)
ORDINARY = 1e-4  # scale 1, float32, whole models
LAYER = 1e-5  # scale 1, float32, one normalization node
EXTREME = 1e-3  # scales where float32 native ops fail
HALF = 4e-3  # float16 graphs

NATIVE_TYPES = {op for _, op in NATIVE_OPS}
LARGE = 1e20
pytestmark = pytest.mark.filterwarnings("ignore")


def _x(shape, scale, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + 0.3 * scale).astype(dtype)


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _check_err(err, tol, what):
    assert err.nonfinite == 0, f"{what}: {err.nonfinite}/{err.numel} non-finite outputs"
    assert err.rel_err < tol, f"{what}: rel err {err.rel_err:.3e} >= {tol:g}"


# ----------------------------------------------------------------------------------------- harden: native
@pytest.mark.parametrize("name", list(native_cases()))
def test_harden_native_node_float32(name):
    model, ref = native_cases()[name]
    hard, report = harden_onnx(model)
    assert len(report.replaced) == 1 and not report.skipped, str(report)
    assert not _ops(hard) & NATIVE_TYPES, _ops(hard)
    onnx.checker.check_model(hard)
    shape = (2, 6, 5, 5) if "LRN" in name or "Batch" in name or "Group" in name or "Instance" in name else (2, 3, 6)
    x = _x(shape, 1.0)
    # ONNX Runtime's LRN takes odd sizes only; normkit.onnx.verify gives onnx.reference a correct LRN
    native_runner = "reference" if name == "LRN_even" else "ort"
    orig = run(model, {"x": x}, native_runner)[0]
    _check_err(measure("y", run(hard, {"x": x})[0], ref(x)), LAYER, f"{name} scale 1")
    _check_err(measure("y", run(hard, {"x": x})[0], orig), LAYER, f"{name} vs original at scale 1")
    for scale in (1e-20, 1e19, LARGE, 1e30):
        x = _x(shape, scale)
        _check_err(measure("y", run(hard, {"x": x})[0], ref(x)), EXTREME, f"{name} scale {scale:g}")
    if name != "BatchNormalization":  # given statistics: the native op is fine at large scales
        x = _x(shape, LARGE)
        with np.errstate(all="ignore"):
            assert not measure("y", run(model, {"x": x}, native_runner)[0], ref(x)).rel_err < EXTREME, "the native op should fail here"


@pytest.mark.parametrize("name", list(ms_cases()))
def test_harden_onnxruntime_contrib_node(name):
    model, ref = ms_cases()[name]
    hard, report = harden_onnx(model)
    assert len(report.replaced) == 1, str(report)
    assert not _ops(hard) & NATIVE_TYPES
    for scale in (1.0, LARGE):
        x = _x((2, 3, 6), scale)
        _check_err(measure("y", run(hard, {"x": x})[0], ref(x)), LAYER if scale == 1 else EXTREME, f"{name} {scale:g}")
    x = _x((2, 3, 6), 1.0)
    _check_err(measure("y", run(hard, {"x": x})[0], run(model, {"x": x})[0]), LAYER, "vs ORT's kernel")


@pytest.mark.parametrize("name", ["LRN", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
                                  "GroupNormalization21", "RMSNormalization"])
def test_harden_native_node_float16(name):
    """Judged in onnx.reference (float16 computed in float16): finite and within 4e-3 where the native node
    overflows."""
    model, ref = native_cases(TP.FLOAT16)[name]
    hard, report = harden_onnx(model)
    assert len(report.replaced) == 1 and not _ops(hard) & NATIVE_TYPES
    shape = (2, 6, 5, 5) if name in ("LRN", "BatchNormalization", "InstanceNormalization", "GroupNormalization21") else (2, 3, 6)
    for scale in (1.0, 300.0, 1e4):
        x = _x(shape, scale, np.float16)
        out = run(hard, {"x": x}, "reference")[0]
        assert out.dtype == np.float16
        _check_err(measure("y", out, ref(x)), HALF, f"{name} float16 scale {scale:g}")


def test_harden_float16_native_layernorm_fails_where_hardened_does_not():
    model, ref = native_cases(TP.FLOAT16)["LayerNormalization"]
    hard, _ = harden_onnx(model)
    x = _x((2, 3, 6), 1e4, np.float16)
    assert not measure("y", run(model, {"x": x}, "reference")[0], ref(x)).rel_err < HALF  # the bias alone
    _check_err(measure("y", run(hard, {"x": x}, "reference")[0], ref(x)), HALF, "hardened")


# ----------------------------------------------------------------------------------------- harden: patterns
@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("axes_attr", [True, False], ids=["axes_attr", "axes_input"])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("normalize", ["div", "reciprocal"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_harden_decomposed_pattern(center, axes_attr, square, normalize, affine):
    model, ref = decomposed(center, axes_attr, square, normalize, affine)
    hard, report = harden_onnx(model)
    kind = "decomposed LayerNorm" if center else "decomposed RMSNorm"
    assert report.counts() == {kind: 1}, str(report)
    assert "Sqrt" in _ops(hard)  # the robust subgraph's own; the pattern is gone:
    assert not harden_onnx(hard)[1].replaced, "a decomposed pattern is left"
    x = _x((2, 3, 6), 1.0)
    _check_err(measure("y", run(hard, {"x": x})[0], run(model, {"x": x})[0]), LAYER, "unchanged at scale 1")
    for scale in (1e-20, 1e19, LARGE):
        x = _x((2, 3, 6), scale)
        _check_err(measure("y", run(hard, {"x": x})[0], ref(x)), EXTREME, f"scale {scale:g}")
    x = _x((2, 3, 6), LARGE)
    assert not measure("y", run(model, {"x": x})[0], ref(x)).rel_err < EXTREME


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("cast", [False, True], ids=["in_float16", "float32_between_casts"])
def test_harden_decomposed_pattern_float16(center, cast):
    model, ref = decomposed(center, False, "pow", "div", True, TP.FLOAT16, cast=cast)
    if not cast:
        model = cast_model(model, TP.FLOAT16)
    hard, report = harden_onnx(model)
    assert len(report.replaced) == 1, str(report)
    for scale in (1.0, 300.0, 1e4):
        x = _x((2, 3, 6), scale, np.float16)
        _check_err(measure("y", run(hard, {"x": x}, "reference")[0], ref(x)), HALF, f"scale {scale:g}")
    if not cast:  # squares of (x - mean) in float16 overflow from |x| ~ 256 on
        x = _x((2, 3, 6), 1e4, np.float16)
        assert not measure("y", run(model, {"x": x}, "reference")[0], ref(x)).rel_err < HALF


def test_compare_onnx_table():
    model, _ = decomposed(True, False, "pow", "div", True)
    hard, _ = harden_onnx(model)
    rows = compare_onnx(model, hard, scales=(1.0, LARGE))
    assert [r.scale for r in rows] == [1.0, LARGE]
    assert rows[0].original.rel_err < LAYER and rows[0].hardened.rel_err < LAYER
    assert not rows[1].original.rel_err < EXTREME and rows[1].hardened.rel_err < EXTREME


def test_harden_leaves_the_rest_and_keeps_names(tmp_path):
    model, _ = native_cases()["LayerNormalization"]
    g = model.graph
    g.node.append(onnx.helper.make_node("Relu", ["y"], ["z"]))
    g.output[0].name = "z"
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    hard, report = harden_onnx(src, dst)
    assert dst.exists() and [o.name for o in hard.graph.output] == ["z"] and [i.name for i in hard.graph.input] == ["x"]
    assert "Relu" in _ops(hard)
    assert hard.ir_version <= 10


def test_harden_reports_training_batchnorm_and_used_stats():
    nodes = [onnx.helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1)]
    c = np.ones(6, np.float32)
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", TP.FLOAT, [2, 6, 3, 3])],
                               [onnx.helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("y", "rm", "rv")],
                               [onnx.numpy_helper.from_array(c, n) for n in "sbmv"])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 15)], ir_version=8)
    hard, report = harden_onnx(model)
    assert not report.replaced and "training" in report.skipped[0].reason
    assert "BatchNormalization" in _ops(hard)


# ----------------------------------------------------------------------------------------- ONNX's own cases
_SHIPPED = [("LRN", "lrn"), ("LayerNormalization", "layernormalization"), ("BatchNormalization", "batch_normalization"),
            ("InstanceNormalization", "instance_normalization"), ("GroupNormalization", "groupnormalization"),
            ("RMSNormalization", "rmsnormalization")]


def _shipped_cases(op_type, module):
    """ONNX's node test cases for ``op_type`` (the generators behind onnx/backend/test/data/node/test_*,
    which this onnx wheel does not ship as files), without the ``_expanded`` function bodies."""
    import onnx.backend.test.case.node as N
    from onnx.backend.test.case.base import Base

    mod = importlib.import_module(f"onnx.backend.test.case.node.{module}")
    old = N._TargetOpType
    N._TargetOpType = op_type
    del N._NodeTestCases[:]
    N._existing_names.clear()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for cls in vars(mod).values():
                if inspect.isclass(cls) and issubclass(cls, Base) and cls is not Base:
                    for k in dir(cls):
                        if k.startswith("export"):
                            getattr(cls, k)()
        return [c for c in N._NodeTestCases if "expanded" not in c.name]
    finally:
        del N._NodeTestCases[:]
        N._existing_names.clear()
        N._TargetOpType = old


@pytest.mark.parametrize("op_type,module", _SHIPPED, ids=[s[0] for s in _SHIPPED])
def test_onnx_shipped_node_cases(op_type, module):
    cases = _shipped_cases(op_type, module)
    assert cases
    for case in cases:
        hard, report = harden_onnx(case.model)
        if "training_mode" in case.name:
            assert not report.replaced
            continue
        assert len(report.replaced) == 1 and not _ops(hard) & NATIVE_TYPES, f"{case.name}: {report}"
        (inputs, outputs), = case.data_sets
        names = [i.name for i in hard.graph.input]
        outs = run(hard, dict(zip(names, inputs)))
        for o, ref in zip(outs, outputs):
            np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-6, err_msg=case.name)


# ----------------------------------------------------------------------------------------- export: layers
class _Layer(nn.Module):
    """A convolution (so that the norm layer sees ordinary activations) followed by one norm layer."""

    def __init__(self, norm: nn.Module, channels_last_dim: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = norm
        self.last = channels_last_dim

    def forward(self, x):
        return self.norm(self.conv(x))


def _randomize(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.dtype.is_floating_point and "conv" not in name:
                lo, hi = (0.5, 2.0) if name.endswith(("running_var", "weight")) else (-1.0, 1.0)
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return m.eval()


LAYERS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6, momentum=0.3),
    "FrozenBatchNorm2d": lambda: normkit.nn.FrozenBatchNorm2d(6, eps=1e-3),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(6, momentum=0.2),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(6, affine=True),
    "InstanceNorm2d_running": lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "GroupNorm": lambda: nn.GroupNorm(3, 6),
    "LayerNorm": lambda: nn.LayerNorm([5, 5]),
    "RMSNorm": lambda: nn.RMSNorm([5]),
    "LRN5": lambda: nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0),
    "LRN4_torch": lambda: nn.LocalResponseNorm(4, 1e-2, 0.6, 1.0),
    "LRN4_onnx": lambda: normkit.nn.LocalResponseNorm(4, 1e-2, 0.6, 1.0, convention="onnx"),
    "LRN3_tf": lambda: normkit.nn.LocalResponseNorm(3, 1e-3, 0.5, 1.0, convention="tf"),
    "LRN5_caffe": lambda: normkit.nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0, convention="caffe"),
    "LRN3_caffe_within_channel": lambda: normkit.nn.LocalResponseNorm(3, 1e-2, 0.75, 1.0, convention="caffe",
                                                                      region="within_channel"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_export_decomposed_layer(name):
    model = _randomize(_Layer(LAYERS[name]()))
    proto, report = export_onnx(model, torch.randn(2, 3, 5, 5))
    assert len(report.replaced) == 1
    assert not _ops(proto) & NATIVE_TYPES, _ops(proto)
    assert proto.ir_version <= 10
    onnx.checker.check_model(proto, full_check=True)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value"), "batch must be dynamic"
    for batch, scale in ((1, 1.0), (2, 1.0), (2, 1e19), (3, LARGE)):
        x = torch.randn(batch, 3, 5, 5) * scale
        err, = verify_onnx(proto, model, x)
        _check_err(err, LAYER * 10 if scale == 1 else EXTREME, f"{name} batch {batch} scale {scale:g}")


@pytest.mark.parametrize("name", [n for n in LAYERS if n not in ("LRN4_torch", "LRN3_caffe_within_channel")])
def test_export_native_layer(name):
    model = _randomize(_Layer(LAYERS[name]()))
    proto, report = export_onnx(model, torch.randn(2, 3, 5, 5), decompose=False)
    assert report is None
    natives = [n for n in proto.graph.node if n.op_type in NATIVE_TYPES]
    assert len(natives) == 1
    node = natives[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    norm = model.norm
    if node.op_type == "BatchNormalization":
        assert attrs["momentum"] == pytest.approx(1 - (norm.momentum if hasattr(norm, "momentum") else 0.1))
        assert attrs["epsilon"] == pytest.approx(norm.eps)
    if node.op_type == "LRN":
        alpha = norm.alpha * norm.size if getattr(norm, "convention", "torch") == "tf" else norm.alpha
        assert (attrs["size"], attrs["alpha"], attrs["beta"], attrs["bias"]) == pytest.approx((norm.size, alpha, norm.beta, norm.k))
    runner = "reference" if name == "LRN4_onnx" else "ort"  # ONNX Runtime's LRN takes odd sizes only
    for batch in (1, 2):  # checked against ONNX Runtime's own kernels on ordinary inputs
        err, = verify_onnx(proto, model, torch.randn(batch, 3, 5, 5), evaluator=runner)
        _check_err(err, LAYER * 10, f"{name} native batch {batch}")


def test_export_native_groupnorm_needs_opset_21():
    """GroupNormalization-21 scales per channel, as torch does; 18 per group (and is deprecated)."""
    model = _randomize(_Layer(nn.GroupNorm(2, 6)))
    proto, _ = export_onnx(model, torch.randn(2, 3, 5, 5), decompose=False)
    assert proto.opset_import[0].version >= 21 or any(o.domain == "" and o.version >= 21 for o in proto.opset_import)
    with pytest.raises(OnnxError, match="GroupNormalization-18"):
        export_onnx(model, torch.randn(2, 3, 5, 5), decompose=False, opset=18)


def test_export_float16_graph_stays_finite():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.RMSNorm(16), nn.Linear(16, 4)).eval()
    proto, _ = export_onnx(model, torch.randn(2, 3, 8), dtype=torch.float16)
    assert proto.graph.input[0].type.tensor_type.elem_type == TP.FLOAT16
    m16 = model.half()
    for scale in (1.0, 300.0, 1e4):
        x = (torch.randn(2, 3, 8) * scale).half()
        err, = verify_onnx(proto, m16, x)  # float16 graphs run in onnx.reference
        _check_err(err, HALF, f"float16 scale {scale:g}")


# ----------------------------------------------------------------------------------------- export: zoo
def _zoo(name):
    from normkit import models

    return models.get(name).eval()


ZOO_CASES = {
    "alexnet_to_lrn1": (lambda: _zoo("alexnet").features[:3], (2, 3, 64, 64)),
    "alexnet_to_lrn2": (lambda: _zoo("alexnet").features[:7], (2, 3, 64, 64)),
    "resnet18": (lambda: _zoo("resnet18"), (2, 3, 16, 16)),
    "mobilenet_v2": (lambda: _zoo("mobilenet_v2"), (2, 3, 16, 16)),
    "transformer_block": (lambda: _zoo("transformer_block"), (2, 8, 64)),
    "transformer_block_rms": (lambda: _zoo("transformer_block_rms"), (2, 8, 64)),
}


@pytest.mark.parametrize("name", list(ZOO_CASES))
def test_export_zoo_model(name):
    build, shape = ZOO_CASES[name]
    model = build()
    torch.manual_seed(0)
    proto, _ = export_onnx(model, torch.randn(shape))
    assert not _ops(proto) & NATIVE_TYPES
    cases = ((1, 1.0), (shape[0], 1.0), (1, 1e19), (shape[0], LARGE))
    if name in ("resnet18", "mobilenet_v2"):  # the float64 reference is slow (float64 convolutions)
        cases = ((1, 1.0), (shape[0], LARGE))
    for batch, scale in cases:
        x = torch.randn((batch,) + shape[1:]) * scale
        err, = verify_onnx(proto, model, x)
        _check_err(err, ORDINARY if scale == 1 else EXTREME, f"{name} batch {batch} scale {scale:g}")


def test_export_whole_alexnet():
    model = _zoo("alexnet")
    torch.manual_seed(0)
    proto, report = export_onnx(model, torch.randn(2, 3, 64, 64))
    assert report.counts() == {"LRN": 2} and not _ops(proto) & NATIVE_TYPES
    for batch, scale in ((1, 1.0), (2, LARGE)):
        err, = verify_onnx(proto, model, torch.randn(batch, 3, 64, 64) * scale)
        _check_err(err, ORDINARY if scale == 1 else EXTREME, f"alexnet batch {batch} scale {scale:g}")


def test_export_static_batch_and_batch_one_example():
    model = _randomize(_Layer(nn.LayerNorm([5, 5])))
    proto, _ = export_onnx(model, torch.randn(1, 3, 5, 5))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    err, = verify_onnx(proto, model, torch.randn(3, 3, 5, 5))
    _check_err(err, LAYER * 10, "batch 3 from a batch-1 example")
    proto, _ = export_onnx(model, torch.randn(2, 3, 5, 5), dynamic_batch=False)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_export_zoo_native_fails_where_decomposed_does_not():
    build, shape = ZOO_CASES["alexnet_to_lrn1"]
    model = build()
    native, _ = export_onnx(model, torch.randn(shape), decompose=False)
    assert "LRN" in _ops(native)
    x = torch.randn(shape) * LARGE
    assert verify_onnx(native, model, x)[0].nonfinite > 0


# ----------------------------------------------------------------------------------------- bad input
def test_export_refuses_bad_opset_and_dtype():
    model = _Layer(nn.LayerNorm([5, 5])).eval()
    for opset in (17, 24):
        with pytest.raises(OnnxError, match="unsupported opset"):
            export_onnx(model, torch.randn(1, 3, 5, 5), opset=opset)
    with pytest.raises(OnnxError, match="unsupported dtype"):
        export_onnx(model, torch.randn(1, 3, 5, 5), dtype=torch.bfloat16)


def test_export_names_the_layer_it_cannot_export():
    model = _Layer(nn.CrossMapLRN2d(3)).eval()
    with pytest.raises(OnnxError, match=r"'norm' \(CrossMapLRN2d\)"):
        export_onnx(model, torch.randn(1, 3, 5, 5))
    model = _Layer(normkit.nn.LocalResponseNorm(3, convention="caffe", region="within_channel")).eval()
    with pytest.raises(OnnxError, match="'norm'.*within_channel"):
        export_onnx(model, torch.randn(1, 3, 5, 5), decompose=False)
    with pytest.raises(OnnxError, match="even size"):
        export_onnx(_Layer(nn.LocalResponseNorm(4)).eval(), torch.randn(1, 3, 5, 5), decompose=False)
    with pytest.raises(OnnxError, match="opset 23"):
        export_onnx(_Layer(nn.RMSNorm([5])).eval(), torch.randn(1, 3, 5, 5), decompose=False, opset=18)
    # (BatchNorm without running statistics exports since issue 16: tests/test_third_party.py)


def test_export_training_model_warns_and_uses_eval():
    model = _randomize(_Layer(nn.BatchNorm2d(6))).train()
    with pytest.warns(UserWarning, match="training mode"):
        proto, _ = export_onnx(model, torch.randn(2, 3, 5, 5))
    assert model.training  # the caller's model is untouched
    err, = verify_onnx(proto, model.eval(), torch.randn(2, 3, 5, 5))
    _check_err(err, LAYER * 10, "eval-mode export")


def test_harden_bad_files(tmp_path):
    with pytest.raises(OnnxError, match="no such file"):
        harden_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf \x00\xff")
    with pytest.raises(OnnxError, match="not an ONNX model"):
        harden_onnx(bad)
    model, _ = native_cases()["LRN"]
    model.opset_import[0].version = 9
    with pytest.raises(OnnxError, match="unsupported opset 9"):
        harden_onnx(model)


# ----------------------------------------------------------------------------------------- other exporters
def _torchscript_export(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=16, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return onnx.load(str(path))


def test_harden_torchscript_exported_transformer_converted_to_float16(tmp_path):
    """The case from ONNX Runtime's tracker: torch's TorchScript exporter writes LayerNorm as the decomposed
    pattern; a float16 conversion of that graph squares ``x - mean`` in float16."""
    from onnx_graphs import cast_model

    model = _zoo("transformer_block")
    fp32 = _torchscript_export(model, torch.randn(2, 4, 64), tmp_path / "tb.onnx")
    assert "LayerNormalization" not in _ops(fp32) and "ReduceMean" in _ops(fp32)
    hard32, report = harden_onnx(fp32)
    assert report.counts() == {"decomposed LayerNorm": 2}, str(report)
    rows = compare_onnx(fp32, hard32, scales=(1.0, LARGE), batch=2)
    assert rows[0].hardened.rel_err < LAYER and rows[1].hardened.finite and rows[1].hardened.rel_err < EXTREME
    # the block's output is dominated by its residual stream: also expose norm1's output (after its affine)
    ln_out = [n.output[0] for n in fp32.graph.node if n.op_type == "Add" and n.name.startswith("/norm1/")][-1]
    fp32.graph.output.append(onnx.helper.make_tensor_value_info(ln_out, TP.FLOAT, None))
    fp16 = cast_model(fp32, TP.FLOAT16)
    hard16, report = harden_onnx(fp16)
    assert report.counts() == {"decomposed LayerNorm": 2}, str(report)
    rows = compare_onnx(fp16, hard16, scales=(1.0, 1e3), batch=2)
    for r in rows:
        _check_err(r.hardened, HALF, f"float16 scale {r.scale:g} output {r.output}")
    norm1 = [r for r in rows if r.output == ln_out]
    assert not norm1[1].original.rel_err < HALF  # the float16 pattern fails at 1e3: (x - mean)**2 overflows


def test_harden_torchscript_float16_layernorm_with_double_cast(tmp_path):
    """torch's TorchScript exporter casts float16 ``x - mean`` to double before squaring: the pattern with
    a Cast is matched too, and the hardened graph has no float64 arithmetic."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)).eval().half()
    proto = _torchscript_export(model, torch.randn(2, 8).half(), tmp_path / "ln16.onnx")
    hard, report = harden_onnx(proto)
    assert report.counts() == {"decomposed LayerNorm": 1}, str(report)
    for scale in (1.0, 1e3):
        x = _x((2, 8), scale, np.float16)
        err, = verify_onnx(hard, model, torch.from_numpy(x))
        _check_err(err, HALF, f"scale {scale:g}")


# ----------------------------------------------------------------------------------------- CLI
def test_cli_export_and_harden(tmp_path, capsys):
    from normkit.cli import main

    out = tmp_path / "tb.onnx"
    assert main(["export", "transformer_block", "-o", str(out), "--input-shape", "2,4,64", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "robust normalization subgraph" in text
    assert text.strip().splitlines()[-1].startswith("verify: PASS -- every output within tolerance")
    native = tmp_path / "native.onnx"
    assert main(["export", "transformer_block", "-o", str(native), "--input-shape", "2,4,64", "--native"]) == 0
    assert "LayerNormalization" in _ops(onnx.load(str(native)))
    hard = tmp_path / "hard.onnx"
    assert main(["harden", str(native), "-o", str(hard), "--verify", "--scales", "1,1e20"]) == 0
    text = capsys.readouterr().out
    assert "LayerNormalization x2" in text and "1e+20" in text
    assert text.strip().splitlines()[-1].startswith("verify: PASS -- the hardened model is within")
    # the native file fails where the hardened one holds: the verdict says which output, at which scale
    assert main(["export", "alexnet", "-o", str(tmp_path / "lrn.onnx"), "--input-shape", "1,3,64,64", "--native",
                 "--verify"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verify: FAIL -- ") and "at scale 1e+20" in last
    assert not _ops(onnx.load(str(hard))) & NATIVE_TYPES


def test_cli_export_of_a_token_id_model(tmp_path, capsys):
    """A model whose input is token ids (a tiny Hugging Face Llama) exports with token ids, as normkit check feeds
    them, its 5 RMS norms hardened; --verify runs it at input scale 1 and says why only there."""
    from pathlib import Path

    from third_party import transformers

    from normkit.cli import main

    transformers()
    factory = tmp_path / "llama.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport third_party\n"
                       "def make():\n    return third_party.hf_model('llama')\n")
    out = tmp_path / "llama.onnx"
    assert main(["export", f"{factory}:make", "-o", str(out), "--input-shape", "2,7", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "5 robust normalization subgraph(s)" in text and "token ids < 100 in: verified at input scale 1 only" in text
    assert text.strip().splitlines()[-1] == "verify: PASS -- every output within tolerance at input scales 1 and batch 1, 2"
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == TP.INT64


@pytest.mark.parametrize("argv,message", [
    (["harden", "missing.onnx", "-o", "x.onnx"], "no such file"),
    (["harden", "BAD", "-o", "x.onnx"], "not an ONNX model"),
    (["export", "transformer_block", "-o", "x.onnx", "--opset", "12"], "unsupported opset 12"),
    (["export", "no_such_model", "-o", "x.onnx"], "unknown model"),
    (["export", "transformer_block_rms", "-o", "x.onnx", "--native", "--opset", "18"], "opset 23"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    from normkit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_text("not onnx")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_harden_skip_layernorm_keeps_its_sum_output():
    """SkipLayerNormalization's 4th output (input + skip) feeds the next residual: it is kept."""
    from onnx_graphs import C

    skip = np.linspace(-1, 1, 3 * C).reshape(3, C).astype(np.float32)
    node = onnx.helper.make_node("SkipLayerNormalization", ["x", "skip", "s", "b"], ["y", "", "", "sum"],
                                 domain="com.microsoft", epsilon=1e-5)
    g = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, C])],
                               [onnx.helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("y", "sum")],
                               [onnx.numpy_helper.from_array(skip, "skip"),
                                onnx.numpy_helper.from_array(np.ones(C, np.float32), "s"),
                                onnx.numpy_helper.from_array(np.zeros(C, np.float32), "b")])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    hard, report = harden_onnx(model)
    assert len(report.replaced) == 1 and [o.name for o in hard.graph.output] == ["y", "sum"]
    x = _x((2, 3, C), 1.0)
    for a, b in zip(run(hard, {"x": x}), run(model, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- verify_onnx
def _torch_export(model, args, path, kwargs=None):
    """torch's own exporter (not normkit's): a file normkit did not write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, verbose=False)
    return onnx.load(str(path))


def _rms_oracle(x, weight, eps):
    """RMSNorm written here in float64 from its formula: y = w * x / sqrt(mean(x^2) + eps)."""
    x, w = x.double(), weight.detach().double()
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.fixture(scope="module")
def llama_rmsnorm(tmp_path_factory):
    from third_party import transformers

    transformers()
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama", reason="transformers' Llama")
    torch.manual_seed(0)
    norm = modeling.LlamaRMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("rms") / "llama_rmsnorm.onnx"
    _torch_export(norm, (torch.randn(3, 8),), path)
    return norm, path


def test_verify_onnx_reference_keeps_the_models_downcasts_in_float64(llama_rmsnorm):
    """LlamaRMSNorm upcasts to float32 inside: torch's own export squares in float32 and returns zeros at 1e20.
    A .double() reference computes the same zeros (error 0); the true error is 1."""
    norm, path = llama_rmsnorm
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for scale in (1.0, 1e20):
        (err,) = verify_onnx(path, norm, x * scale)
        proto = onnx.load(str(path))
        (out,) = run(proto, {proto.graph.input[0].name: (x * scale).numpy()})
        truth = measure("y", out, _rms_oracle(x * scale, norm.weight, norm.variance_epsilon).numpy())
        assert err.rel_err == pytest.approx(truth.rel_err, rel=1e-6, abs=1e-12) and err.reference_lowered == ()
    assert err.rel_err == pytest.approx(1.0) and not np.abs(out).any(), "the float32 graph returns zeros at 1e20"
    with torch.no_grad():
        stale = norm.double()(x.double() * 1e20)
    assert not stale.abs().any(), "the trap this guards against: .double() alone is float32 inside"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from third_party import hf_config, transformers

    tf, cfg = transformers(), hf_config("llama")
    torch.manual_seed(0)
    causal, base = tf.LlamaForCausalLM(cfg).eval(), tf.LlamaModel(cfg).eval()
    d = tmp_path_factory.mktemp("llama")
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    emb = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ids_file = _torch_export(causal, (ids,), d / "llama_ids.onnx")
    emb_file = _torch_export(base, (), d / "llama_embeds.onnx", kwargs={"inputs_embeds": emb})
    return causal, base, ids, emb, ids_file, emb_file


def test_verify_onnx_token_ids_stay_integer_and_model_outputs_flatten(tiny_llama):
    causal, _, ids, _, ids_file, _ = tiny_llama
    assert ids_file.graph.input[0].type.tensor_type.elem_type == TP.INT64
    for inputs in (ids, (ids,), {"input_ids": ids}):  # a tensor, positional, keyword
        (err,) = verify_onnx(ids_file, causal, inputs)  # CausalLMOutputWithPast: logits (past_key_values None)
        _check_err(err, ORDINARY, f"tiny Llama from {type(inputs).__name__}")
    with pytest.raises(OnnxError, match=r"'input_ids' are not among the keyword inputs \('ids'\)"):
        verify_onnx(ids_file, causal, {"ids": ids})
    with pytest.raises(OnnxError, match=r"input 'input_ids' is int32, the graph takes int64"):
        verify_onnx(ids_file, causal, ids.int())


def test_verify_onnx_torch_llama_export_at_1e20_reports_the_true_error(tiny_llama):
    _, base, _, emb, _, emb_file = tiny_llama
    (ok,) = verify_onnx(emb_file, base, {"inputs_embeds": emb})
    _check_err(ok, ORDINARY, "scale 1")
    (err,) = verify_onnx(emb_file, base, {"inputs_embeds": emb * 1e20})
    assert err.rel_err == pytest.approx(1.0, abs=1e-3) and err.finite  # every RMSNorm returns zeros in float32
    from normkit.reference import float64_call

    with torch.no_grad():  # the reference is right: the float64 model's output is not zero (plain .double()'s is)
        ref, lowered = float64_call(copy.deepcopy(base).double(), inputs_embeds=emb * 1e20)
        stale = copy.deepcopy(base).double()(inputs_embeds=emb.double() * 1e20)
    assert ref.last_hidden_state.abs().max() > 0.1 and not lowered
    assert not stale.last_hidden_state.abs().any()


class _TwoInTwoOut(nn.Module):
    """Token ids and a float input in, a dict of two outputs out."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(10, 8), nn.LayerNorm(8)

    def forward(self, ids, x):
        h = self.norm(self.emb(ids) + x)
        return {"h": h, "energy": (h * h).sum(-1)}


def test_verify_onnx_several_inputs_and_dict_outputs(tmp_path):
    torch.manual_seed(0)
    model = _TwoInTwoOut().eval()
    ids, x = torch.randint(0, 10, (2, 5)), torch.randn(2, 5, 8)
    proto = _torch_export(model, (ids, x), tmp_path / "two.onnx")
    names = [i.name for i in proto.graph.input]
    for inputs in ((ids, x), dict(zip(names, (ids, x)))):
        errs = verify_onnx(proto, model, inputs)
        assert [e.name for e in errs] == [o.name for o in proto.graph.output] and len(errs) == 2
        for e in errs:
            _check_err(e, ORDINARY, e.name)
    with pytest.raises(OnnxError, match=r"takes 2 input\(s\) .*got 1"):
        verify_onnx(proto, model, (ids,))
    class OneOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, x):
            return self.inner(ids, x)["h"]

    with pytest.raises(OnnxError, match="the model returns 1 tensor"):
        verify_onnx(proto, OneOut(), (ids, x))
