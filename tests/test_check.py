"""normkit check's library side: the op sweep finds torch's failures and normkit passes every case; the
model probe names the layer that breaks (judged in isolation) and passes the converted twin; the report
and plots are well formed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from normkit import check
from normkit.check import cases, plots, probe, report, sweep


def test_known_failure_inputs_torch_fails_normkit_passes():
    rows = check.run(cases=check.INPUTS)
    assert len(rows) == len(check.OPS) * len(check.INPUTS)
    failing = [r for r in rows if not r.normkit_ok]
    assert not failing, failing
    torch_failing = {(r.op, r.dtype, r.input) for r in rows if not r.torch_ok}
    # the failures NUMERICS.md lists are shown (a fixed torch would make this test ask for an update)
    assert ("layer_norm", "float32", "magnitude 1e19") in torch_failing
    assert ("batch_norm", "float32", "constant 1e7") in torch_failing
    assert ("batch_norm", "float16", "offset 3e4 + N(0,64)") in torch_failing
    assert ("local_response_norm", "float32", "magnitude 1e30") in torch_failing
    assert any(r.op == "local_response_norm" and r.torch_error is None and r.torch_refusal for r in rows)
    computed = [r for r in rows if r.input == "unit normal" and r.torch_error is not None]
    assert computed and all(r.torch_ok for r in computed), "the baseline must pass for torch where it computes"


def test_reference_is_independent_of_torch_kernels():
    x = torch.full((4, 3, 2, 2), 1e7)
    assert torch.equal(check.OPS[0].reference(x), torch.zeros(x.shape, dtype=torch.float64))


def test_magnitude_grid_reaches_each_dtypes_top():
    for dtype in cases.DTYPES.values():
        grid = cases.magnitudes(dtype)
        assert grid[0] == 1e-3 and grid[-1] == torch.finfo(dtype).max and grid == sorted(grid)
    labels = [i.label for i in cases.inputs([torch.float32])]
    assert any(lab.startswith("offset 1e6") for lab in labels) and "constant 1e7" in labels


def test_sweep_summary_ok_up_to():
    rows = sweep.run(["layer_norm"], [torch.float32], fast=True)
    (s,) = sweep.summarize(rows)
    # torch's layer_norm squares in float32: fine at 1e17 (the fast grid's step is 1e5), broken from 1e19
    assert s.torch_ok_up_to == 1e17 and s.normkit_ok_up_to == torch.finfo(torch.float32).max
    assert s.torch_nonfinite > 0 and s.normkit_nonfinite == 0 and s.normkit_ok
    assert s.torch_worst == math.inf


def _breaks_at_1e20():
    # Linear (weights ~0.25) -> LayerNorm: torch's float32 layer_norm overflows its squares from ~1e19
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.LayerNorm(8))


def test_probe_names_the_breaking_layer_and_passes_the_twin():
    r = probe.probe(_breaks_at_1e20(), (4, 16), name="toy", scales=(1.0, 1e10, 1e20, 1e30))
    assert r.layers == ["0", "1", "2", "3", "4"]
    f = r.first_failure("float32", "torch")
    assert (f.layer, f.kind, f.scale) == ("2", "LayerNorm", 1e20)
    assert f.sentence().startswith("2 (LayerNorm): float32, ") and "from input scale 1e20" in f.sentence()
    assert "normkit twin: max rel err" in f.sentence()
    assert r.first_failure("float32", "normkit") is None and r.normkit_ok
    # isolated judging: the second LayerNorm gets the float64 model's input, so it is judged on its own;
    # propagated, the torch model's output is wrong from 1e20 on
    layer4 = [c for c in r.cases if c.layer == "4"]
    assert all(c.torch_status == "ok" for c in layer4), layer4
    assert [o["torch"]["status"] for o in r.outputs] == ["ok", "ok", "non-finite", "non-finite"]
    assert all(o["normkit"]["status"] == "ok" for o in r.outputs)


def test_probe_range_is_not_a_normalization_failure():
    # float16 at 1e4: the first Linear's output (~1e6) cannot be held; that is "range", not a failure
    m = _breaks_at_1e20()
    with torch.no_grad():
        m[0].weight.fill_(30.0)
    r = probe.probe(m, (4, 16), name="toy", dtypes=(torch.float16,), scales=(1.0, 1e4, 1e6))
    assert {c.scale for c in r.cases} == {1.0, 1e4}, "a scale above float16's range is skipped"
    first = r.first_out_of_range("float16")
    assert first is not None and (first.layer, first.scale) == ("0", 1e4)
    assert [c.torch_status for c in r.cases if c.scale == 1e4][:2] == ["range", "range"]  # Linear out, ReLU in
    assert r.normkit_ok


def test_probe_records_refusals_and_reused_modules():
    class Reuse(nn.Module):  # one ReLU called twice, an LRN torch refuses in bfloat16
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.lrn = nn.Conv2d(2, 6, 1), nn.ReLU(), nn.LocalResponseNorm(3)

        def forward(self, x):
            return self.relu(self.lrn(self.relu(self.conv(x))))

    r = probe.probe(Reuse(), (1, 2, 4, 4), name="reuse", dtypes=(torch.bfloat16,), scales=(1.0,))
    assert r.layers == ["conv", "relu", "lrn", "relu"]
    f = r.first_failure("bfloat16", "torch")
    assert (f.layer, f.status) == ("lrn", "raised") and r.normkit_ok
    assert r.outputs[0]["torch"] == {"status": "raised", "error": None, "layer": "lrn"}


def test_probe_rejected_input_names_the_layer():
    with pytest.raises(check.ProbeInputError, match=r"layer 0 raised RuntimeError"):
        probe.probe(_breaks_at_1e20(), (4, 15), name="toy", scales=(1.0,))


def test_probe_leaves_the_model_alone():
    m = _breaks_at_1e20()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    probe.probe(m, (4, 16), scales=(1e20,), mode="eval")
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in m.state_dict().items())
    assert type(m[2]) is nn.LayerNorm and m.training


def test_strict_json_and_plots(tmp_path):
    import matplotlib.image

    rows = sweep.run(["layer_norm", "local_response_norm"], [torch.float32, torch.bfloat16], fast=True)
    r = probe.probe(_breaks_at_1e20(), (4, 16), name="toy", dtypes=(torch.float32, torch.bfloat16), scales=(1.0, 1e20))
    text = report.dumps(rows, [r], seed=0)
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text)
    assert data["ok"] is True and data["models"][0]["first_failure"]["float32"]["torch"]["layer"] == "2"
    files = plots.op_plots(rows, tmp_path) + [plots.model_plot(r, tmp_path)]
    assert files == ["ops_float32.png", "ops_bfloat16.png", "model_toy.png"]
    for f in files:
        img = matplotlib.image.imread(tmp_path / f)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05, f
    md = report.markdown(rows, [r], files)
    assert "| layer_norm | float32 |" in md and "![model_toy.png](model_toy.png)" in md
