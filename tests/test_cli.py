"""The ``normkit`` command end to end: through subprocess (console script and ``python -m normkit``),
the report directory, strict JSON, exit statuses, and every bad-input case as one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import normkit
from normkit import _native
from normkit.cli import COMMANDS, main

NORMKIT = [sys.executable, "-m", "normkit"]


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(NORMKIT + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_fast_check_end_to_end_with_report(tmp_path):
    import matplotlib.image

    proc = _run("check", "--fast", "--report", str(tmp_path / "rep"), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # strict: json.loads would take Infinity, so look for it too
    assert "Infinity" not in proc.stdout and "NaN" not in proc.stdout
    assert data["ok"] is True and data["ops"]["rows"] and data["ops"]["summary"]
    (alexnet,) = data["models"]
    f = alexnet["first_failure"]["float32"]["torch"]
    assert (f["layer"], f["kind"], f["scale"]) == ("features.2", "LocalResponseNorm", 1e20)
    assert alexnet["first_failure"]["float32"]["normkit"] is None
    backend = data["backend"]  # which path served each op family in this run (NORMKIT_NATIVE=0: eager)
    native = _native.get_backend() != "eager"
    rms_key, rms_path = ("rows: rms_norm", "native") if native else ("layer/rms/group/instance/batch norm", "eager (backend eager)")
    assert backend["selected"] == ("auto" if native else "eager")
    assert backend["paths"]["local_response_norm"] and rms_path in backend["paths"][rms_key]
    assert all(p == "native" or p.startswith("eager (") for paths in backend["paths"].values() for p in paths)
    rep = tmp_path / "rep"
    assert json.loads((rep / "results.json").read_text()) == data
    md = (rep / "report.md").read_text()
    assert md.startswith("# normkit check") and "features.2 (LocalResponseNorm)" in md
    assert "## Backend" in md and f"- {rms_key}: " in md
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == ["model_alexnet.png", "ops_bfloat16.png", "ops_float16.png", "ops_float32.png"]
    for p in pngs:
        assert f"]({p})" in md
        img = matplotlib.image.imread(rep / p)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05, p


def test_table_output_and_module_entry_point(tmp_path):
    model = tmp_path / "toy.py"
    model.write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.LayerNorm(16))\n"
        "    m.example_input_shape = (4, 16)\n"
        "    return m\n")
    proc = _run("check", "--model", f"{model}:make", "--dtype", "float32", "--scales", "1,1e10,1e20")
    assert proc.returncode == 0, proc.stderr
    assert "toy.py:make (4, 16), train mode, input scales 1, 1e10, 1e20" in proc.stdout
    assert "2 (LayerNorm): float32, non-finite from input scale 1e20 (normkit twin: max rel err" in proc.stdout
    assert proc.stderr == ""  # no progress bar off a terminal


def test_in_process_filters_and_exit_status(capsys):
    assert main(["check", "--op", "layer_norm", "--dtype", "float16", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm" in out and "normkit fails 0" in out and "alexnet" not in out
    assert main(["check", "--op", "rms_norm", "--fast", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in data["ops"]["rows"]} == {"rms_norm"} and data["models"] == []
    assert len(data["backend"]["paths"]) == 1  # only this run's ops (rms_norm's family), nothing before it
    normkit.set_backend("eager")
    try:
        assert main(["check", "--op", "rms_norm", "--fast"]) == 0
    finally:
        normkit.set_backend("auto")
    assert "normkit backend eager" in capsys.readouterr().out
    assert main(["check", "--op", "rms_norm", "--fast", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_exit_1_when_normkit_fails(monkeypatch, capsys):
    from normkit.check import cases

    ln = next(o for o in cases.OPS if o.name == "layer_norm")
    broken = cases.Op("layer_norm", ln.torch, lambda x: ln.normkit(x) * 1.01, ln.reference)
    monkeypatch.setattr(cases, "OPS", [broken])
    monkeypatch.setattr("normkit.check.sweep.OPS", [broken])
    assert main(["check", "--op", "layer_norm", "--dtype", "float32", "--fast", "--quiet"]) == 1


def _bad(capsys, *args):
    code = main(["check", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "syntax.py").write_text("def make(:\n")
    (tmp_path / "raises.py").write_text("def make():\n    raise RuntimeError('no weights here')\n")
    (tmp_path / "notmodule.py").write_text("def make():\n    return 42\n")
    (tmp_path / "noshape.py").write_text("from torch import nn\ndef make():\n    return nn.Linear(4, 2)\n")
    return tmp_path


def test_bad_input_one_line_exit_2(capsys, files):
    assert "use one of alexnet, resnet18, mobilenet_v2" in _bad(capsys, "--model", "resnet50")
    assert "does not exist" in _bad(capsys, "--model", "nowhere/model.py:make")
    assert "name the factory" in _bad(capsys, "--model", str(files / "raises.py"))
    err = _bad(capsys, "--model", f"{files / 'syntax.py'}:make")
    assert "importing" in err and "SyntaxError" in err
    err = _bad(capsys, "--model", f"{files / 'raises.py'}:build")
    assert "has no function 'build'; it defines make" in err
    assert "make() raised RuntimeError: no weights here" in _bad(capsys, "--model", f"{files / 'raises.py'}:make")
    assert "returned int, not a torch.nn.Module" in _bad(capsys, "--model", f"{files / 'notmodule.py'}:make")
    assert "give --input-shape" in _bad(capsys, "--model", f"{files / 'noshape.py'}:make")
    err = _bad(capsys, "--model", f"{files / 'noshape.py'}:make", "--input-shape", "2,5", "--dtype", "float32")
    assert "rejects input shape (2, 5): its own forward (Linear) raised RuntimeError" in err
    err = _bad(capsys, "--model", "resnet18", "--input-shape", "1,4,32,32", "--dtype", "float32")
    assert "resnet18 rejects input shape (1, 4, 32, 32): layer conv1 raised RuntimeError" in err
    assert "--input-shape that the model accepts" in err
    assert "use one or the other" in _bad(capsys, "--model", "alexnet", "--op", "layer_norm")
    assert "not a shape" in _bad(capsys, "--model", "alexnet", "--input-shape", "1,3,a")
    for bad in ("0", "-1", "abc", "inf", "nan", "1,,2"):
        assert "is not a positive number" in _bad(capsys, "--model", "alexnet", f"--scales={bad}")
    assert "invalid choice: 'float8'" in _bad(capsys, "--dtype", "float8")
    assert "out of range" in _bad(capsys, "--seed", str(2**70))
    assert "not an integer" in _bad(capsys, "--seed", "2**70")
    assert "cannot create" in _bad(capsys, "--fast", "--op", "rms_norm", "--report", str(files / "syntax.py" / "x"))


def test_usage_error_through_subprocess_and_debug(files):
    proc = _run("check", "--model", f"{files / 'raises.py'}:make")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("normkit check: --model ")
    proc = _run("check", "--debug", "--model", f"{files / 'raises.py'}:make")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "no weights here" in proc.stderr
    proc = _run()
    assert proc.returncode == 2 and "check" in proc.stderr


def test_subcommand_table():
    assert [c.name for c in COMMANDS][0] == "check"
    assert all(c.module.startswith("normkit.") for c in COMMANDS)


def test_console_script_exists():
    # installed by `pip install -e .` (pyproject's [project.scripts])
    script = Path(sys.executable).parent / "normkit"
    assert script.exists()
