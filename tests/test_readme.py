"""The README tells the truth: every Python block runs as written (each in a fresh interpreter, in an empty
directory, with the extras installed), and its sample ``normkit check`` output is what the command prints on
the path the README names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, re.S | re.M)


def test_every_python_block_is_found():
    assert BLOCKS and len(BLOCKS) == README.count("```python"), "a ```python block the pattern does not match"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}-{b.splitlines()[0][:30]}" for i, b in enumerate(BLOCKS)])
def test_readme_block_runs_as_written(code, tmp_path):
    if "normkit.export_onnx" in code or "normkit.verify_onnx" in code:
        pytest.importorskip("onnxscript", reason="the block needs the onnx extra (pip install 'normkit[onnx]')")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"this README block fails:\n{code}\n{proc.stderr[-3000:]}"


def _sample() -> list[str]:
    section = README[README.index("## `normkit check`"):]
    return re.search(r"```text\n(.*?)```", section, re.S).group(1).strip().splitlines()


def _stable(lines: list[str]) -> list[str]:
    """What does not depend on the CPU's rounding: the op table's labels and 'ok up to' columns, each model
    line up to normkit's error, the headline, and the paths the backend took."""
    out = []
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 9 and cells[1] in ("float32", "float16", "bfloat16"):
            out.append(" ".join(cells[:4]))
        elif "(normkit twin:" in line or "under normkit.robust():" in line:
            out.append(line.split(" max rel err")[0].strip())
        elif line.startswith(("torch fails", "normkit backend")) or line.strip().startswith("no layer fails"):
            out.append(line.split("(kernels")[0] + line.partition("Paths taken:")[2] if "Paths" in line else line)
    return out


def test_sample_check_output_is_what_the_command_prints():
    from normkit import _native

    if _native.get_backend() == "eager":
        pytest.skip("the sample is the native kernels' run; this suite runs the eager path (NORMKIT_NATIVE=0)")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "normkit", "check"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()[:-1]  # the last line is the timing
    sample = _stable(_sample())
    assert any(" float32 " in line for line in sample) and any("(normkit twin:" in line for line in sample)
    assert sample[-1].startswith("normkit backend") and sample[-2].startswith("torch fails")
    assert _stable(printed) == sample
    assert "kernels built" in _sample()[-1] and "native" in _sample()[-1], "the sample says the kernels served"


# ------------------------------------------------------------------------------------------ the Layout section
ROOT = Path(__file__).resolve().parents[1]
# the directories whose every module the Layout names (models/ is named as a whole: its files are the zoo's)
LAID_OUT = ("src/normkit", "src/normkit/ops", "src/normkit/nn", "src/normkit/check", "src/normkit/onnx", "benchmarks")


def _layout() -> str:
    section = README[README.index("## Layout\n"):]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def _laid_out_paths(layout: str) -> list[str]:
    """The paths in the Layout's first column (``a/b.py, c.py`` names ``a/b.py`` and ``a/c.py``; a ``<op>`` or
    ``*`` pattern names no single file)."""
    paths = []
    for line in layout.splitlines():
        if not line or line[0] == " ":
            continue
        head, *more = re.match(r"[^\s,]+(?:, [^\s,]+)*", line).group(0).split(", ")
        base = head.rpartition("/")[0]
        for p in [head] + [f"{base}/{m}" if base else m for m in more]:
            if "<" not in p and "*" not in p:
                paths.append(p)
    return paths


def test_layout_names_only_what_exists():
    paths = _laid_out_paths(_layout())
    assert len(paths) > 30, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's Layout names what the tree does not hold: {missing}"


def test_layout_names_every_module():
    """Every module of the package's directories and of benchmarks/, by its file name (an operator's file,
    ``ops/<op>.py``, by its name in the list of operators): the Layout section is the map of the code, kept whole."""
    layout = _layout()
    ops = re.search(r"src/normkit/ops/<op>\.py(.*?)\nsrc/", layout, re.S).group(1)
    unnamed = [f"{d}/{f.name}" for d in LAID_OUT for f in sorted((ROOT / d).iterdir())
               if f.suffix in (".py", ".cpp", ".h") and f.name != "__init__.py" and f.name not in layout
               and not (d == "src/normkit/ops" and re.search(rf"\b{f.stem}\b", ops))]
    assert not unnamed, f"modules the README's Layout does not name: {unnamed}"
