"""harden_onnx on what it reached last: the ``E[x^2] - E[x]^2`` variance form, decomposed group and instance
norms, nodes inside If/Loop bodies and model-local functions, ONNX Runtime's EmbedLayerNormalization, the
``Pow(v, -0.5)`` / ``Div(1, Sqrt(v))`` inverse std, TensorFlow's batch norm, and bfloat16 graphs -- each
against a float64 numpy reference (and ONNX Runtime's own kernel where it has one)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP

from normkit.onnx import harden_onnx
from normkit.onnx.norms import HARDENED_KEY, NATIVE_OPS, find_norms, hardened_regions
from normkit.onnx.verify import measure, run

from conftest import REL_TOL
from onnx_graphs import (C, NP, cast_model, decomposed, decomposed_group_norm, decomposed_instance_norm, embed_layer_norm,
                         layer_norm_in_if, layer_norm_in_loop, mean_of_squares, norms_in_local_function, tf_batch_norm)

LAYER = 1e-5  # scale 1, float32, one normalization (as tests/test_onnx.py)
EXTREME = 1e-3  # where the original fails
pytestmark = pytest.mark.filterwarnings("ignore")
NATIVE = {op for _, op in NATIVE_OPS}


def _x(shape, scale, offset=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset * scale).astype(np.float32)


def _ok(err, tol, what):
    assert err.nonfinite == 0, f"{what}: {err.nonfinite}/{err.numel} non-finite"
    assert err.rel_err < tol, f"{what}: rel err {err.rel_err:.3e} >= {tol:g}"


def _all_ops(model) -> set[str]:
    out = set()

    def walk(g):
        for n in g.node:
            out.add(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(model.graph)
    return out


@pytest.mark.parametrize("axes_attr", [True, False], ids=["axes_attr", "axes_input"])
@pytest.mark.parametrize("normalize", ["div", "reciprocal"])
def test_mean_of_squares_variance_form(axes_attr, normalize):
    """``var = E[x^2] - E[x]^2`` cancels at an offset (float32 1e4 with unit noise: the variance is lost) and
    overflows with ``x^2``; the hardened graph holds both."""
    model, ref = mean_of_squares(axes_attr, normalize)
    hard, report = harden_onnx(model)
    assert report.counts() == {"decomposed LayerNorm, E[x^2] - E[x]^2 variance": 1}, str(report)
    x = _x((2, 3, 6), 1.0)
    _ok(measure("y", run(hard, {"x": x})[0], ref(x)), LAYER, "scale 1")
    offset = (np.float32(1e4) + np.random.default_rng(1).standard_normal((2, 3, 6))).astype(np.float32)
    _ok(measure("y", run(hard, {"x": offset})[0], ref(offset)), EXTREME, "offset 1e4")
    assert not measure("y", run(model, {"x": offset})[0], ref(offset)).rel_err < EXTREME, "the E[x^2] form should fail here"
    big = _x((2, 3, 6), 1e20)
    _ok(measure("y", run(hard, {"x": big})[0], ref(big)), EXTREME, "scale 1e20")


@pytest.mark.parametrize("build", [decomposed_group_norm, decomposed_instance_norm], ids=["group", "instance"])
def test_decomposed_group_and_instance_norm(build):
    model, ref = build()
    hard, report = harden_onnx(model)
    assert len(report.replaced) == 1 and not report.skipped, str(report)
    x = _x((2, 6, 5, 5), 1.0)
    _ok(measure("y", run(hard, {"x": x})[0], ref(x)), LAYER, "scale 1")
    x = _x((2, 6, 5, 5), 1e20)
    _ok(measure("y", run(hard, {"x": x})[0], ref(x)), EXTREME, "scale 1e20")
    assert not measure("y", run(model, {"x": x})[0], ref(x)).rel_err < EXTREME


@pytest.mark.parametrize("build", [layer_norm_in_if, layer_norm_in_loop], ids=["If", "Loop"])
def test_norms_inside_control_flow_bodies(build):
    model, ref = build()
    hard, report = harden_onnx(model)
    assert report.replaced and all(r.where for r in report.replaced), str(report)
    assert "LayerNormalization" not in _all_ops(hard)
    feeds = {"x": _x((2, 3, 6), 1e20)}
    if "cond" in [i.name for i in model.graph.input]:
        feeds["cond"] = np.array(True)
    _ok(measure("y", run(hard, feeds)[0], ref(feeds["x"])), EXTREME, "scale 1e20")
    assert not measure("y", run(model, feeds)[0], ref(feeds["x"])).rel_err < EXTREME
    feeds["x"] = _x((2, 3, 6), 1.0)
    np.testing.assert_allclose(run(hard, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert all(s.where for s in find_norms(model)), "norms in bodies are reported with where they are"


def test_norms_inside_a_model_local_function():
    model, ref = norms_in_local_function()
    hard, report = harden_onnx(model)
    assert report.counts() == {"LayerNormalization": 1, "decomposed RMSNorm": 1}, str(report)
    assert any("inlined" in n for n in report.notes)
    assert not hard.functions and "LayerNormalization" not in _all_ops(hard)
    x = _x((2, 3, 6), 1e20)
    _ok(measure("y", run(hard, {"x": x})[0], ref(x)), EXTREME, "scale 1e20")
    x = _x((2, 3, 6), 1.0)
    _ok(measure("y", run(hard, {"x": x})[0], ref(x)), LAYER, "scale 1")


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no_mask"])
def test_embed_layer_normalization(mask):
    """Against ONNX Runtime's EmbedLayerNormalization kernel at ordinary scale (all three outputs), and
    against float64 where its float32 kernel fails (tables of magnitude 1e20)."""
    model, ref = embed_layer_norm(mask=mask)
    hard, report = harden_onnx(model)
    assert report.counts() == {"EmbedLayerNormalization": 1} and "EmbedLayerNormalization" not in _all_ops(hard)
    rng = np.random.default_rng(1)
    feeds = {"ids": rng.integers(0, 11, (3, 5)).astype(np.int32), "seg_ids": rng.integers(0, 2, (3, 5)).astype(np.int32)}
    if mask:
        feeds["mask"] = (rng.random((3, 5)) > 0.3).astype(np.int32)
    for got, want in zip(run(hard, feeds), run(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    y_ref, emb_ref = ref(feeds["ids"], feeds["seg_ids"])
    _ok(measure("y", run(hard, feeds)[0], y_ref), LAYER, "vs float64")
    big, big_ref = embed_layer_norm(mask=mask, scale=1e20)
    y_ref, _ = big_ref(feeds["ids"], feeds["seg_ids"])
    _ok(measure("y", run(harden_onnx(big)[0], feeds)[0], y_ref), EXTREME, "tables at 1e20")
    assert not measure("y", run(big, feeds)[0], y_ref).rel_err < EXTREME


def test_regions_are_recorded_and_found_again():
    model, _ = mean_of_squares(False, "div")
    hard, _ = harden_onnx(model)
    regions = hardened_regions(hard)
    assert len(regions) == 1 and regions[0]["inputs"] == ["x"] and regions[0]["outputs"] == ["y"]
    assert any(p.key == HARDENED_KEY for p in hard.metadata_props)
    sites = find_norms(hard)
    assert len(sites) == 1 and sites[0].hardened and sites[0].op.startswith("normkit (decomposed LayerNorm")
    assert len(sites[0].nodes) >= 8, "the pattern's node names are kept"
    assert not harden_onnx(hard)[1].replaced, "nothing left to harden"


# ----------------------------------------------------------------------------------------- inverse std, TensorFlow's batch norm
F16_TOL = REL_TOL[torch.float16]


def _break(x: np.ndarray, axes, center: bool) -> float:
    """The input scale at which a float16 ReduceMean of the squares of (x - mean) (or x) overflows: onnx.reference
    (numpy) sums in float16, so the largest group sum reaches 65504 there, before any one square does."""
    x = x.astype(np.float64)
    d = x - x.mean(axis=axes, keepdims=True) if center else x
    return math.sqrt(65504.0 / (d * d).sum(axis=axes).max())


def _breaks_then_holds(model, hard, ref, x0, s_break):
    """Below ``s_break`` the float16 original passes (onnx.reference, in float16); above it fails; the hardened
    graph passes at both, in onnx.reference and in ONNX Runtime."""
    for s, breaks in ((s_break / 1.5, False), (s_break * 1.5, True)):
        x = (x0 * s).astype(np.float16)
        orig = measure("y", run(model, {"x": x}, "reference")[0], ref(x))
        assert (orig.nonfinite > 0 or orig.rel_err > F16_TOL) == breaks, (s / s_break, orig)
        for evaluator in ("reference", "ort"):
            _ok(measure("y", run(hard, {"x": x}, evaluator)[0], ref(x)), F16_TOL, f"hardened, {evaluator}, scale {s:.3g}")


@pytest.mark.parametrize("inv", ["pow", "div1"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_inverse_std_as_pow_or_div(center, inv):
    """``d * Pow(v + eps, -0.5)`` (tf2onnx's Rsqrt) and ``d * Div(1, Sqrt(v + eps))`` (older torch.onnx's rsqrt)
    in the decomposed layer / RMS norms, float16: break where the sum of squares passes 65504, hardened hold."""
    model, ref = decomposed(center, False, "pow", inv, True, TP.FLOAT16)
    hard, report = harden_onnx(model)
    assert report.counts() == {f"decomposed {'LayerNorm' if center else 'RMSNorm'}": 1}, str(report)
    x0 = np.random.default_rng(5).standard_normal((2, 3, C))
    _breaks_then_holds(model, hard, ref, x0, _break(x0.astype(np.float16), (-1,), center))


@pytest.mark.parametrize("inv", ["pow", "reciprocal", "div1"])
@pytest.mark.parametrize("affine", ["gamma_offset", "gamma", "offset", "neither"])
def test_tensorflow_batch_norm_batch_moments(inv, affine):
    """``tf.nn.moments`` then ``x * scale + (offset - mean * scale)``, channels last, float16: the sum of the
    squares of ``x - mean`` passes 65504 at the known scale; the hardened graph holds."""
    model, ref = tf_batch_norm(True, inv, "gamma" in affine, "offset" in affine)
    hard, report = harden_onnx(model)
    assert report.counts() == {"decomposed TF batch norm, batch moments": 1}, str(report)
    assert not {"ReduceMean", "Neg"} & {n.op_type for n in hard.graph.node if not n.name.startswith("normkit")}
    x0 = np.random.default_rng(6).standard_normal((2, 4, 4, C))
    _breaks_then_holds(model, hard, ref, x0, _break(x0.astype(np.float16), (0, 1, 2), True))


@pytest.mark.parametrize("inv", ["pow", "reciprocal"])
@pytest.mark.parametrize("offset", [True, False], ids=["offset", "neg"])
def test_tensorflow_batch_norm_given_statistics(inv, offset):
    """Inference with constant statistics: ``x * scale`` overflows float16 once ``mean * scale`` passes 65504
    (scale 8 here), although ``(x - mean) * scale`` is small: data at the mean ``t`` breaks from
    ``t = 65504 / 8``; the hardened graph (``x - mean`` first) holds in onnx.reference and ONNX Runtime."""
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((2, 4, 4, C))
    t_break = 65504.0 / (2.0 * 8.0)  # gamma up to 2, scale = gamma / sqrt(1/64 - 1e-3 + 1e-3)
    for t, breaks in ((t_break / 1.5, False), (t_break * 1.5, True)):
        mean = np.full(C, t)
        model, ref = tf_batch_norm(False, inv, True, offset, mean=mean, var=np.full(C, 1 / 64 - 1e-3))
        hard, report = harden_onnx(model)
        assert report.counts() == {"decomposed TF batch norm, given statistics": 1}, str(report)
        x = (mean + noise).astype(np.float16)
        orig = measure("y", run(model, {"x": x}, "reference")[0], ref(x))
        assert (orig.nonfinite > 0) == breaks, (t, orig)
        for evaluator in ("reference", "ort"):
            _ok(measure("y", run(hard, {"x": x}, evaluator)[0], ref(x)), F16_TOL, f"hardened, {evaluator}, t={t:.4g}")


def test_bfloat16_graph_is_hardened():
    """A bfloat16 decomposed LayerNorm: computed in bfloat16 (onnx.reference), its squares overflow from
    about 1.8e19; hardened (float32 inside the subgraph, bfloat16 out) it holds at 1e20."""
    model, ref = decomposed(True, False, "pow", "div", True)
    model = cast_model(model, TP.BFLOAT16)
    hard, report = harden_onnx(model)
    assert report.counts() == {"decomposed LayerNorm": 1}, str(report)
    x = (np.random.default_rng(8).standard_normal((2, 3, C)) * 1e20).astype(NP[TP.BFLOAT16])
    tol = REL_TOL[torch.bfloat16]
    assert not measure("y", run(model, {"x": x}, "reference")[0], ref(x)).rel_err < tol
    _ok(measure("y", run(hard, {"x": x}, "reference")[0], ref(x)), tol, "hardened bfloat16 at 1e20")
