"""The benchmark runner (``python -m benchmarks``): it times, writes its JSON and table, and reports the
backend. Timings themselves are never asserted (shared machines are noisy); only the runner's contract."""

from __future__ import annotations

import json
import time

from benchmarks import runner
from normkit import _native


def test_interleaved_runs_at_least_repeat_and_spends_the_budget():
    calls = {"a": 0, "b": 0}

    def tick(k):
        def f():
            calls[k] += 1
            time.sleep(0.002)
        return f

    samples = runner.interleaved({"a": tick("a"), "b": tick("b")}, repeat=3, warmup=1, budget_s=0.0)
    assert [len(v) for v in samples.values()] == [3, 3] and calls == {"a": 4, "b": 4}
    samples = runner.interleaved({"a": tick("a")}, repeat=3, warmup=0, budget_s=0.1, max_rounds=1000)
    assert 10 <= len(samples["a"]) <= 60  # about 0.1 s of 2 ms calls: more than repeat, bounded by the budget
    samples = runner.interleaved({"a": tick("a")}, repeat=2, warmup=0, budget_s=10.0, max_rounds=5)
    assert len(samples["a"]) == 5


def test_runner_writes_json_and_table(tmp_path):
    rc = runner.main(["--quick", "--only", "rms_norm", "--mode", "fwd", "--providers", "normkit,torch",
                      "--repeat", "3", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "latest.json").read_text())
    (row,) = out["rows"]
    assert row["mode"] == "fwd" and row["runs"] >= 3 and set(row["ms"]) == {"normkit", "torch"}
    assert row["normkit/torch"] > 0 and row["normkit_x_floor"] > 0
    native = _native.get_backend() != "eager"  # NORMKIT_NATIVE=0 runs of the suite: the eager path serves
    assert row["normkit_backend"].startswith("rows: rms_norm: native" if native else "layer/rms/group/instance/batch norm: eager")
    table = (tmp_path / "latest.md").read_text()
    assert "| rms_norm (8192, 1024) float32 | fwd |" in table


def test_small_group_reports_microseconds_per_call(tmp_path):
    """The small group times single calls in loops and reports microseconds per call, normkit against torch."""
    rc = runner.main(["--group", "small", "--only", "layer_norm (1, 768)", "--repeat", "3", "--budget", "0", "--no-plot",
                      "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "latest.json").read_text())
    (row,) = out["rows"]
    assert row["group"] == "small" and row["mode"] == "fwd" and row["calls_per_sample"] >= 1
    assert set(row["us"]) == {"normkit", "torch"} and all(v > 0 for v in row["us"].values())
    assert out["threads"] == "small 1"
    native = _native.get_backend() != "eager"
    assert row["normkit_backend"].startswith("rows: layer_norm: native" if native else "layer/rms/group/instance/batch norm: eager")
    assert "| layer_norm (1, 768) float32 | fwd |" in (tmp_path / "latest.md").read_text()


def test_groups_are_listed_by_name(capsys):
    assert runner.main(["--list", "--group", "batch1", "--group", "compiled"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "batch1: model resnet18 (1, 3, 224, 224)" in listed and "compiled: compiled mobilenet_v2 (8, 3, 224, 224)" in listed
