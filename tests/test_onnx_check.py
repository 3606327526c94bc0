"""``normkit check MODEL.onnx``: hand-built float16 graphs (decomposed LayerNorm / RMSNorm, native and
ONNX Runtime contrib nodes) that break at a scale computed here from the input, torch-exported zoo models,
``--fix`` output checking clean, the table / JSON / report, and every bad input through a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP

from normkit.check.onnx_probe import FAILED, probe_onnx, random_feeds
from normkit.cli import main

from onnx_graphs import (cast_model, decomposed, layer_norm_in_if, ms_cases, native_cases, norms_in_local_function,
                         rms_after_matmul, rms_in_loop)

F16_MAX = 65504.0
pytestmark = pytest.mark.filterwarnings("ignore")


def _square_headroom(x: np.ndarray, axes, center: bool) -> float:
    """log2(65504 / max (x - mean)^2) in float64: the independent oracle of the headroom."""
    x = x.astype(np.float64)
    d = x - x.mean(axis=axes, keepdims=True) if center else x
    return math.log2(F16_MAX) - 2 * math.log2(np.abs(d).max())


def _break_scale(x: np.ndarray, axes, center: bool) -> float:
    """The input scale at which the largest square reaches float16's largest value."""
    return 2.0 ** (_square_headroom(x, axes, center) / 2)


# ----------------------------------------------------------------------------------------- hand-built graphs
PATTERNS = {"layernorm": True, "rmsnorm": False}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_decomposed_pattern_breaks_at_the_known_scale(name):
    center = PATTERNS[name]
    model = cast_model(decomposed(center, False, "pow", "div", True)[0], TP.FLOAT16)
    feeds = random_feeds(model, {"x": (2, 3, 6)}, seed=3)
    s_break = _break_scale(feeds["x"], (-1,), center)
    below, above = s_break / 1.5, s_break * 1.5
    result = probe_onnx(model, feeds, [1.0, below, above])
    assert len(result.norms) == 1 and result.norms[0].op == f"decomposed {'LayerNorm' if center else 'RMSNorm'}"
    assert len(result.norms[0].nodes) == (7 if center else 5), result.norms[0].nodes  # the pattern's nodes, named
    by_scale = {c.scale: c for c in result.cases}
    for s in (1.0, below, above):  # the headroom is the oracle's on the float16-rounded input to the norm
        expect = _square_headroom((feeds["x"] * s).astype(np.float16), (-1,), center)
        assert by_scale[s].headroom == pytest.approx(expect, abs=0.05), (s, by_scale[s])
    assert by_scale[1.0].status == "ok" and by_scale[below].status == "ok", by_scale
    assert by_scale[above].status in FAILED and by_scale[above].headroom < 0
    assert result.fails_from(0) == above and result.first_failure().scale == above
    assert not result.ok


NATIVE16 = {"LayerNormalization": ((2, 3, 6), (-1,), True), "RMSNormalization": ((2, 3, 6), (-1,), False),
            "InstanceNormalization": ((2, 6, 5, 5), (2, 3), True)}


@pytest.mark.parametrize("name", list(NATIVE16))
def test_native_float16_node_breaks_at_the_known_scale(name):
    model, _ = native_cases(TP.FLOAT16)[name]
    shape, axes, center = NATIVE16[name]
    feeds = random_feeds(model, {"x": shape}, seed=1)
    s_break = _break_scale(feeds["x"], axes, center)
    result = probe_onnx(model, feeds, [s_break / 2, s_break * 2])
    low, high = result.cases
    assert low.status == "ok" and low.headroom == pytest.approx(2.0, abs=0.05)
    assert high.status in FAILED and high.headroom == pytest.approx(-2.0, abs=0.05), high


@pytest.mark.parametrize("name", list(ms_cases()))
def test_contrib_nodes_reference_shows_what_onnxruntime_hides(name):
    """onnx.reference (textbook kernels in float16) breaks at 1e3; ONNX Runtime's CPU kernels compute in
    float32 and pass -- the check still marks the node: an intermediate beyond float16 ('overflow')."""
    model, _ = ms_cases(TP.FLOAT16)[name]
    feeds = random_feeds(model, {"x": (2, 3, 6)})
    ref = probe_onnx(model, feeds, [1.0, 1e3])
    assert ref.evaluator == "reference" and [c.status for c in ref.cases][0] == "ok"
    assert ref.cases[1].status in ("fail", "non-finite")
    ort = probe_onnx(model, feeds, [1.0, 1e3], evaluator="ort")
    assert ort.cases[1].status == "overflow" and ort.cases[1].error < 1e-2 and ort.cases[1].headroom < 0


def test_float32_graph_in_onnxruntime_and_first_failure_in_topological_order():
    """Two decomposed LayerNorms of the same input (float32, ONNX Runtime), the second one's nodes written
    first: both break at 1e20, and the one first in the graph's order is named."""
    model, _ = decomposed(True, False, "pow", "div", False)
    other, _ = decomposed(True, False, "mul", "reciprocal", False)
    for k, n in enumerate(other.graph.node):
        n.name = f"other/{n.op_type}_{k}"
        n.input[:] = [i if i == "x" else f"o_{i}" for i in n.input]
        n.output[:] = [f"o_{o}" for o in n.output]
    nodes = list(other.graph.node) + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.output.append(onnx.helper.make_tensor_value_info("o_y", TP.FLOAT, None))
    feeds = random_feeds(model, {"x": (2, 3, 6)})
    result = probe_onnx(model, feeds, [1.0, 1e20])
    assert result.evaluator == "ort" and len(result.norms) == 2
    assert all(c.status == "ok" for c in result.cases if c.scale == 1.0)
    assert all(c.status in FAILED for c in result.cases if c.scale == 1e20)
    first = result.norms[result.first_failure().index]
    assert first.name.startswith("other/") and result.first_failure().scale == 1e20


# ----------------------------------------------------------------------------------------- bodies and functions
def test_norm_inside_an_if_branch_breaks_at_the_known_scale(tmp_path, capsys):
    """The graph's only norm is a float16 LayerNormalization in an If's then branch (the else branch passes x
    through): measured through the If node, it breaks where the oracle says; with the branch not taken it is
    listed as not measured, never silently absent; --fix hardens it inside the body and the check holds."""
    model, _ = layer_norm_in_if(TP.FLOAT16, else_norm=False)
    feeds = random_feeds(model, {"x": (2, 3, 6), "cond": ()}, seed=2)
    feeds["cond"] = np.array(True)
    s_break = _break_scale(feeds["x"], (-1,), True)
    result = probe_onnx(model, feeds, [1.0, s_break / 2, s_break * 2])
    assert [(s.name, s.where) for s in result.norms] == [("then/LayerNorm", "If 'if' then_branch")] and not result.unmeasured
    one, low, high = result.cases
    assert one.status == "ok" and one.headroom == pytest.approx(_square_headroom(feeds["x"], (-1,), True), abs=0.05)
    assert low.status == "ok" and low.headroom == pytest.approx(2.0, abs=0.05)
    assert high.status in FAILED and high.headroom == pytest.approx(-2.0, abs=0.05)
    assert result.first_failure() is high and not result.ok

    feeds["cond"] = np.array(False)
    skipped = probe_onnx(model, feeds, [1.0, s_break * 2])
    assert [c.status for c in skipped.cases] == ["not taken", "not taken"] and skipped.ok
    from normkit.check import onnx_report
    assert "not measured: then/LayerNorm (LayerNormalization) inside If 'if' then_branch: its If branch was not taken" \
        in onnx_report.text(skipped)

    g, calib = tmp_path / "if.onnx", tmp_path / "calib.npz"
    onnx.save(model, g)
    np.savez(calib, x=feeds["x"], cond=np.array(True))
    fixed = tmp_path / "fixed.onnx"
    assert main(["check", str(g), "--inputs", str(calib), "--scales", f"1,{s_break * 2}", "--json", "--fix", str(fixed)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["norms"][0]["fails_from"] == s_break * 2 and d["fixed"]["ok"]
    (hard,) = d["fixed"]["norms"]
    assert hard["op"] == "normkit (LayerNormalization)" and hard["where"] == "If 'if' then_branch"
    assert all(c["status"] == "ok" for c in hard["cases"])


@pytest.mark.parametrize("evaluator", ["reference", "ort"])
def test_norm_inside_a_loop_judged_at_its_worst_iteration(evaluator):
    """A decomposed RMSNorm in a Loop body normalizes x * 4**(i + 1) at iteration i: the check judges every
    iteration and keeps the worst, the last one, whose headroom the oracle gives. ONNX Runtime computes the
    float16 squares wider: its output passes and the check marks the overflow from the float64 run."""
    model = rms_in_loop(trips=3, growth=4.0)
    feeds = random_feeds(model, {"x": (2, 3, 6)}, seed=4)
    last = (feeds["x"].astype(np.float64) * 64).astype(np.float16)
    s_break = _break_scale(last, (-1,), False)
    result = probe_onnx(model, feeds, [s_break / 2, s_break * 2], evaluator=evaluator)
    (site,) = result.norms
    assert site.where == "Loop 'loop' body" and site.nodes[0] == "loop/rms/Mul" and len(site.nodes) == 5
    low, high = result.cases
    assert low.status == "ok" and low.headroom == pytest.approx(2.0, abs=0.05) and "(index 2)" in low.message
    assert high.headroom == pytest.approx(-2.0, abs=0.05) and "the worst of 3 iterations (index 2)" in high.message
    assert high.status == ("overflow" if evaluator == "ort" else "fail") or high.status == "non-finite"


def test_norms_inside_a_model_local_function_are_measured():
    """A model-local function holding a decomposed RMSNorm followed by LayerNormalization (float32, ONNX
    Runtime): inlined on a copy, both are measured; the RMS pattern's squares overflow float32 by 1e20, the
    LayerNorm after it sees normalized values and holds."""
    model, _ = norms_in_local_function()
    feeds = random_feeds(model, {"x": (2, 3, 6)})
    result = probe_onnx(model, feeds, [1.0, 1e20])
    ops = [s.op for s in result.norms]
    assert ops == ["decomposed RMSNorm", "LayerNormalization"] and not result.unmeasured
    rms, ln = (result.cases_of(i) for i in range(2))
    assert rms[0].status == "ok" and rms[1].status in FAILED and rms[1].headroom < 0
    assert all(c.status == "ok" for c in ln)


# ----------------------------------------------------------------------------------------- the example
def test_exporter_rmsnorm_exits_1_and_fix_checks_clean(tmp_path, capsys):
    g = tmp_path / "g.onnx"
    onnx.save(rms_after_matmul(), g)
    assert main(["check", str(g), "--input-shape", "4,64", "--scales", "1,1e3"]) == 1
    out = capsys.readouterr().out
    assert "first failing node: norm/" in out and "decomposed RMSNorm" in out and "from input scale 1e3" in out
    fixed = tmp_path / "out.onnx"
    assert main(["check", str(g), "--input-shape", "4,64", "--scales", "1,1e3", "--fix", str(fixed)]) == 0
    assert "fixed: headroom" in capsys.readouterr().out
    assert main(["check", str(fixed), "--input-shape", "4,64", "--scales", "1,1e3"]) == 0
    out = capsys.readouterr().out
    assert "normkit (decomposed RMSNorm)" in out and "PASS" in out


def test_json_and_report(tmp_path, capsys):
    g = tmp_path / "g.onnx"
    onnx.save(rms_after_matmul(), g)
    rep = tmp_path / "rep"
    code = main(["check", str(g), "--input-shape", "4,64", "--scales", "1,1e3", "--json", "--report", str(rep),
                 "--fix", str(tmp_path / "f.onnx")])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and d["ok"] is False and d["fixed"]["ok"] is True
    norm = d["norms"][0]
    assert norm["fails_from"] == 1e3 and norm["op"] == "decomposed RMSNorm" and "norm/Pow" in norm["nodes"]
    assert d["first_failure"]["node"] in norm["nodes"] and d["evaluator"] == "reference"
    case = norm["cases"][1]
    assert case["headroom"] < 0 and case["largest"] > F16_MAX and case["status"] == "fail"
    assert {"report.md", "results.json", "headroom.png", "error.png"} <= set(os.listdir(rep))
    assert json.loads((rep / "results.json").read_text())["norms"][0]["fails_from"] == 1e3
    assert "![headroom.png](headroom.png)" in (rep / "report.md").read_text()


# ----------------------------------------------------------------------------------------- zoo models
def _torchscript(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=16, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return path


def test_zoo_transformer_torchscript_export_converted_to_float16(tmp_path, capsys):
    """torch's TorchScript exporter at opset 16 writes LayerNorm as the decomposed pattern; ``--dtype float16``
    converts the file with onnxconverter-common; the squares of ``x - mean`` overflow from 1e3 on."""
    from normkit import models

    path = _torchscript(models.get("transformer_block").eval(), torch.randn(2, 8, 64), tmp_path / "tb.onnx")
    fixed = tmp_path / "tb_fixed.onnx"
    code = main(["check", str(path), "--dtype", "float16", "--input-shape", "2,8,64", "--scales", "1,1e3", "--json",
                 "--fix", str(fixed)])
    d = json.loads(capsys.readouterr().out)
    assert d["dtype"] == "float16" and d["converted"] and len(d["norms"]) == 2
    assert all(n["op"] == "decomposed LayerNorm" for n in d["norms"])
    assert [n["name"].split("/")[1] for n in d["norms"]] == ["norm1", "norm2"]
    assert d["norms"][0]["fails_from"] == 1e3 and d["first_failure"]["node"].startswith("/norm1/")
    assert code == 0 and d["fixed"]["ok"] and all(n["fails_from"] is None for n in d["fixed"]["norms"])


@pytest.mark.parametrize("zoo", ["transformer_block", "transformer_block_rms"])
def test_zoo_native_export_float32(tmp_path, capsys, zoo):
    """normkit's exporter with native nodes (LayerNormalization / RMSNormalization, opset 23): in float32
    ONNX Runtime the sums of squares overflow at input scale 1e20; hardened, they hold."""
    from normkit import export_onnx, models

    path = tmp_path / "native.onnx"
    export_onnx(models.get(zoo).eval(), torch.randn(2, 8, 64), path, decompose=False, opset=23)
    code = main(["check", str(path), "--input-shape", "2,8,64", "--scales", "1,1e20", "--json", "--fix", str(tmp_path / "f.onnx")])
    d = json.loads(capsys.readouterr().out)
    op = "LayerNormalization" if zoo == "transformer_block" else "RMSNormalization"
    assert [n["op"] for n in d["norms"]] == [op, op] and d["evaluator"] == "ort"
    assert all(n["fails_from"] == 1e20 for n in d["norms"]) and not d["ok"]
    assert code == 0 and d["fixed"]["ok"]


# ----------------------------------------------------------------------------------------- bad input
def _cli(args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "normkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


BAD = {
    "missing": (["check", "missing.onnx"], "no such file"),
    "not_onnx": (["check", "BAD.onnx"], "not an ONNX model"),
    "declared_shape": (["check", "g.onnx", "--input-shape", "4,32"], "does not fit"),
    "rejected_shape": (["check", "sym.onnx", "--input-shape", "4,32"], "the graph rejects inputs"),
    "symbolic_dims": (["check", "g.onnx"], "symbolic dims"),
    "unknown_name": (["check", "g.onnx", "--input-shape", "y=4,64"], "has no input 'y'"),
    "npz_unknown_name": (["check", "g.onnx", "--inputs", "other.npz"], "has no input 'z'"),
    "npz_not_npz": (["check", "g.onnx", "--inputs", "BAD.onnx"], "not an .npz file"),
    "dtype_down": (["check", "g.onnx", "--input-shape", "4,64", "--dtype", "float32"], "float32 files to float16 only"),
    "scales": (["check", "g.onnx", "--input-shape", "4,64", "--scales", "1,x"], "not a positive number"),
    "report_in_a_file": (["check", "g.onnx", "--input-shape", "4,64", "--report", "g.onnx/rep"], "cannot create"),
    "report_empty": (["check", "g.onnx", "--input-shape", "4,64", "--report", ""], "give the directory"),
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    onnx.save(rms_after_matmul(), d / "g.onnx")
    onnx.save(rms_after_matmul(features="symbolic"), d / "sym.onnx")
    (d / "BAD.onnx").write_text("not onnx \x00\xff")
    np.savez(d / "other.npz", z=np.zeros((4, 64)))
    return d


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(bad_dir, case):
    args, message = BAD[case]
    r = _cli(args, bad_dir)
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], err)
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_debug_shows_the_traceback(bad_dir):
    r = _cli(["check", "BAD.onnx", "--debug"], bad_dir)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_npz_inputs_by_name(bad_dir, capsys):
    x = np.random.default_rng(0).standard_normal((4, 64)) * 1e3
    np.savez(bad_dir / "calib.npz", x=x)
    assert main(["check", str(bad_dir / "g.onnx"), "--inputs", str(bad_dir / "calib.npz"), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["scales"] == [1.0] and d["inputs"] == {"x": [4, 64]} and d["norms"][0]["fails_from"] == 1.0


def test_timing_line_counts_start_up(bad_dir):
    r = _cli(["check", "g.onnx", "--input-shape", "4,64", "--scales", "1"], bad_dir)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.endswith("s CPU since start-up)"), last
    wall, cpu = (float(p.split()[0]) for p in last.strip("()").split(", ")[:2])
    assert cpu > 0.5 and wall > 0, "importing torch and onnx alone takes more CPU than this: start-up is counted"
