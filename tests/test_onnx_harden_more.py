"""harden_onnx on what it reached last: the ``E[x^2] - E[x]^2`` variance form, decomposed group and instance
norms, nodes inside If/Loop bodies and model-local functions, and ONNX Runtime's EmbedLayerNormalization --
each against a float64 numpy reference (and ONNX Runtime's own kernel where it has one)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from normkit.onnx import harden_onnx
from normkit.onnx.norms import HARDENED_KEY, NATIVE_OPS, find_norms, hardened_regions
from normkit.onnx.verify import measure, run

from onnx_graphs import (decomposed_group_norm, decomposed_instance_norm, embed_layer_norm, layer_norm_in_if,
                         layer_norm_in_loop, mean_of_squares, norms_in_local_function)

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
