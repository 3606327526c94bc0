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

from onnx_graphs import (NP, cast_model, decomposed, layer_norm_in_if, layer_norm_in_scan, ms_cases, native_cases,
                         norms_in_local_function, rms_after_matmul, rms_in_loop, tf_batch_norm)

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


def test_norm_inside_a_scan_body_judged_per_slice():
    """A LayerNormalization in a Scan body normalizes one (N, C) slice per iteration: every slice is judged, the
    worst (the slice holding the largest deviation) kept, so the headroom is the oracle's over the whole input."""
    model = layer_norm_in_scan()
    feeds = random_feeds(model, {"x": (4, 2, 6)}, seed=9)
    s_break = _break_scale(feeds["x"], (-1,), True)
    result = probe_onnx(model, feeds, [1.0, s_break * 2])
    (site,) = result.norms
    assert site.where == "Scan 'scan' body" and not result.unmeasured
    one, high = result.cases
    assert one.status == "ok" and one.headroom == pytest.approx(_square_headroom(feeds["x"], (-1,), True), abs=0.05)
    assert "the worst of 4 iterations" in one.message
    assert high.status in FAILED and high.headroom == pytest.approx(-2.0, abs=0.05)


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


# ----------------------------------------------------------------------------------------- TensorFlow's batch norm
def test_tensorflow_batch_norm_moments_breaks_at_the_known_scale():
    """tf.nn.moments + batch_normalization (channels last, Rsqrt as Pow(v, -0.5)), float16: found as one
    pattern with its nodes; its headroom is the oracle's largest square of x - mean (per channel, over N, H,
    W); it fails once the float16 sum of those squares passes 65504, before the headroom reaches 0."""
    model, _ = tf_batch_norm(True, "pow")
    feeds = random_feeds(model, {"x": (2, 4, 4, 6)}, seed=5)
    x = feeds["x"].astype(np.float64)
    s_break = _break_scale(feeds["x"], (0, 1, 2), True)
    # onnx.reference's float16 ReduceMean sums in float16: the 32 squares' sum overflows before any one square
    s_sum = math.sqrt(F16_MAX / ((x - x.mean(axis=(0, 1, 2))) ** 2).sum(axis=(0, 1, 2)).max())
    low_s = s_sum / 1.5
    result = probe_onnx(model, feeds, [low_s, s_break * 2])
    (site,) = result.norms
    assert site.op == "decomposed TF batch norm, batch moments" and "bn/moments/SquaredDifference" in site.nodes
    assert site.name == "bn/add_1" and site.attrs["axes"] == [0, 1, 2]
    low, high = result.cases
    expect = _square_headroom((feeds["x"] * low_s).astype(np.float16), (0, 1, 2), True)
    assert low.status == "ok" and low.headroom == pytest.approx(expect, abs=0.05), low
    assert high.status in FAILED and high.headroom == pytest.approx(-2.0, abs=0.05), high


def test_tensorflow_batch_norm_given_statistics_headroom():
    """With constant statistics the largest intermediate is x * scale (or mean * scale): the check's headroom
    is log2(65504 / that), computed here in float64; the form fails by cancellation before it overflows."""
    mean, var = np.linspace(100.0, 600.0, 6), np.full(6, 1 / 64 - 1e-3)
    model, _ = tf_batch_norm(False, "reciprocal", mean=mean, var=var)
    x0 = mean + np.random.default_rng(6).standard_normal((2, 4, 4, 6))
    gamma = np.linspace(0.5, 2.0, 6)
    result = probe_onnx(model, {"x": x0.astype(np.float16)}, [1.0, 16.0])
    (site,) = result.norms
    assert site.op == "decomposed TF batch norm, given statistics" and site.kind == "given"
    for case, s in zip(result.cases, (1.0, 16.0)):
        x = (x0.astype(np.float16) * s).astype(np.float16).astype(np.float64)
        scale = gamma / np.sqrt(var.astype(np.float16).astype(np.float64) + np.float64(np.float16(1e-3)))
        largest = max(np.abs(x * scale).max(), np.abs(mean * scale).max())
        assert case.headroom == pytest.approx(math.log2(F16_MAX / largest), abs=0.02), (s, case)
    # at scale 1 nothing overflows, but x * scale (up to ~1e4, float16 spacing 8) cancels against mean * scale
    first, second = result.cases
    assert first.status == "fail" and first.headroom > 0 and math.isfinite(first.error) and first.error > 1e-2
    assert second.status in FAILED and second.headroom < 0


# ----------------------------------------------------------------------------------------- bfloat16, float64
def test_bfloat16_graph_in_bfloat16(tmp_path, capsys):
    """A bfloat16 decomposed LayerNorm, computed in bfloat16 by onnx.reference: its squares pass bfloat16's
    largest value at the oracle's scale (about 1.8e19 for unit data), and the hardened file holds. Below that
    it carries a few bfloat16 roundings (each node rounds to 8 bits): errors of 3e-3 to 9e-3, around the
    check's bfloat16 tolerance (5.9e-3), so the test bounds the error there instead of naming a status."""
    model = cast_model(decomposed(True, False, "pow", "div", True)[0], TP.BFLOAT16)
    feeds = random_feeds(model, {"x": (2, 3, 6)}, seed=7)
    x64 = feeds["x"].astype(np.float64)
    d = x64 - x64.mean(axis=-1, keepdims=True)
    top = float(torch.finfo(torch.bfloat16).max)
    s_break = math.sqrt(top) / np.abs(d).max()
    result = probe_onnx(model, feeds, [1.0, s_break / 2, s_break * 2])
    assert result.dtype == "bfloat16" and result.evaluator == "reference"
    one, low, high = result.cases
    assert one.error < 1e-2 and low.error < 1e-2 and one.status != "overflow" and low.status != "overflow"
    assert low.headroom == pytest.approx(2.0, abs=0.1) and high.headroom == pytest.approx(-2.0, abs=0.1)
    assert high.status in FAILED and (high.status == "non-finite" or high.error > 0.5)
    g = tmp_path / "bf16.onnx"
    onnx.save(model, g)
    code = main(["check", str(g), "--input-shape", "2,3,6", "--json", "--fix", str(tmp_path / "f.onnx")])
    d = json.loads(capsys.readouterr().out)
    cases = d["norms"][0]["cases"]
    assert d["scales"] == [1.0, 1e10, 1e20] and cases[2]["headroom"] < 0 and cases[2]["status"] in FAILED
    assert code == 0 and d["fixed"]["ok"] and d["fixed"]["norms"][0]["op"].startswith("normkit")


def test_float64_graph_passes_against_itself(tmp_path, capsys):
    """A float64 graph is its own reference: every norm passes (error about 0) and the headroom is against
    float64's largest value -- at 1e100 the squares (1e200) are still far below it."""
    model = cast_model(native_cases()["LayerNormalization"][0], TP.DOUBLE)
    g = tmp_path / "f64.onnx"
    onnx.save(model, g)
    assert main(["check", str(g), "--input-shape", "2,3,6", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cases = d["norms"][0]["cases"]
    assert d["dtype"] == "float64" and [c["scale"] for c in cases] == [1.0, 1e50, 1e100]
    assert all(c["status"] == "ok" and c["error"] < 1e-12 for c in cases)
    x = random_feeds(model, {"x": (2, 3, 6)})["x"] * 1e100
    expect = math.log2(torch.finfo(torch.float64).max) - 2 * math.log2(np.abs(x - x.mean(-1, keepdims=True)).max())
    assert cases[2]["headroom"] == pytest.approx(expect, abs=0.01)
    assert main(["check", str(g), "--input-shape", "2,3,6"]) == 0
    assert "a float64 graph is its own float64 reference" in capsys.readouterr().out


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


# ----------------------------------------------------------------------------------------- progress bar
def test_progress_reaches_its_total():
    """probe_onnx announces its total once the norms are known (the graph's runs, then each norm at each
    scale) and advances to it exactly, the branch not taken included."""
    model, _ = layer_norm_in_if(TP.FLOAT16)
    feeds = random_feeds(model, {"x": (2, 3, 6), "cond": ()})
    totals, done = [], []

    def progress(n=1, total=None):
        done.append(n)
        if total is not None:
            totals.append(total)

    result = probe_onnx(model, feeds, [1.0, 1e3], progress=progress)
    assert len(result.norms) == 2 and totals[-1] == 2 * (1 + 2) == sum(done)


def _stderr_on_a_terminal(args, cwd) -> tuple[int, str]:
    """Run ``normkit ARGS`` with stderr on a pseudo-terminal (stdout piped); returns the exit status and what
    reached the terminal."""
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="120")
    proc = subprocess.run([sys.executable, "-m", "normkit", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=slave,
                          timeout=300, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the terminal's other end is closed: all is read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminals via the pty module: Linux only")
def test_progress_bar_on_a_terminal_only(bad_dir):
    """As the model check: a rich bar on stderr when it is a terminal (one for the file, one for --fix's),
    counting to the total; none with --json or --quiet."""
    code, err = _stderr_on_a_terminal(["check", "g.onnx", "--input-shape", "4,64", "--scales", "1,1e3", "--fix",
                                       "fixed.onnx"], bad_dir)
    assert code == 0 and "check g.onnx" in err and "check fixed.onnx" in err and "4/4" in err, err
    for quiet in ("--json", "--quiet"):
        code, err = _stderr_on_a_terminal(["check", "g.onnx", "--input-shape", "4,64", "--scales", "1,1e3", quiet], bad_dir)
        assert code == 1 and err == "", (quiet, err)


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
    "dtype_bfloat16": (["check", "g32.onnx", "--input-shape", "4,64", "--dtype", "bfloat16"], "no well-kept converter"),
    "bfloat16_in_ort": (["check", "bf16.onnx", "--input-shape", "4,64", "--evaluator", "ort"], "use --evaluator reference"),
    "scales": (["check", "g.onnx", "--input-shape", "4,64", "--scales", "1,x"], "not a positive number"),
    "report_in_a_file": (["check", "g.onnx", "--input-shape", "4,64", "--report", "g.onnx/rep"], "cannot create"),
    "report_empty": (["check", "g.onnx", "--input-shape", "4,64", "--report", ""], "give the directory"),
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    onnx.save(rms_after_matmul(), d / "g.onnx")
    onnx.save(rms_after_matmul(features="symbolic"), d / "sym.onnx")
    onnx.save(rms_after_matmul(elem=TP.FLOAT), d / "g32.onnx")
    onnx.save(rms_after_matmul(elem=TP.BFLOAT16), d / "bf16.onnx")
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
