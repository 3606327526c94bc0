"""The native build never surprises (normkit/_native.py): its directory is named by everything the build depends
on, a finished build is imported without running ninja, every compile says so and how long it took, a torch
lock left by a killed build is cleared with a message, a live builder is waited for by name, and ``normkit
build`` says whether it compiled or loaded. The compiler itself is replaced by a stand-in here (a real build
takes minutes; test_native.py runs the real one)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from normkit import _native


@pytest.fixture
def build_root(tmp_path, monkeypatch):
    """An empty TORCH_EXTENSIONS_DIR, and this process's kernels state restored afterwards."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name in ("_module", "_error", "_build_info"):
        monkeypatch.setattr(_native, name, getattr(_native, name))
    return tmp_path


@pytest.fixture
def fake_compiler(monkeypatch):
    """``load_inline`` replaced by a stand-in that records its call (and the PATH it ran with) and returns a
    module; ``_import`` likewise, so that a stamped build 'loads' without a library."""
    from torch.utils import cpp_extension

    calls = {"load_inline": [], "import": []}

    def load_inline(name, **kwargs):
        calls["load_inline"].append({"name": name, "PATH": os.environ.get("PATH", ""), **kwargs})
        return types.SimpleNamespace(name=name)

    def fake_import(name, directory):
        calls["import"].append((name, directory))
        return types.SimpleNamespace(name=name)
    monkeypatch.setattr(cpp_extension, "load_inline", load_inline)
    monkeypatch.setattr(_native, "_import", fake_import)
    return calls


def test_build_key_covers_torch_location_compiler_ninja_and_python(build_root, monkeypatch, tmp_path):
    """Two venvs (torch installed in two places), another compiler, another ninja or another Python each get a
    build directory of their own; the same setup always the same one."""
    base = _native.build_directory()
    assert base == _native.build_directory() and base.parent == build_root
    changed = {}
    with monkeypatch.context() as m:
        m.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
        changed["torch location"] = _native.build_directory()
    with monkeypatch.context() as m:
        m.setenv("CXX", sys.executable)  # any other executable stands for another compiler
        changed["compiler"] = _native.build_directory()
    with monkeypatch.context() as m:
        tools = tmp_path / "tools"
        tools.mkdir()
        (tools / "ninja").write_text("#!/bin/sh\n")
        (tools / "ninja").chmod(0o755)
        m.setattr(_native, "_build_path", lambda: str(tools) + os.pathsep + os.environ.get("PATH", ""))
        changed["ninja"] = _native.build_directory()
    with monkeypatch.context() as m:
        m.setattr(sys, "version", sys.version + " (another build)")
        changed["python"] = _native.build_directory()
    with monkeypatch.context() as m:
        other = tmp_path / "other-python" / "include"
        get_path = sysconfig.get_path
        m.setattr(sysconfig, "get_path", lambda name, *a, **k: str(other) if name == "include" else get_path(name, *a, **k))
        changed["python headers"] = _native.build_directory()
    for what, directory in changed.items():
        assert directory != base, what
    assert len(set(changed.values())) == len(changed)


def test_one_venv_shares_one_build_whatever_name_starts_its_python(tmp_path):
    """`python`, `python3` and the `normkit` script of one venv are one build setup (sys.executable differs)."""
    scripts = Path(sysconfig.get_path("scripts"))
    names = [scripts / n for n in ("python", "python3") if (scripts / n).exists()]
    dirs = {subprocess.run([str(exe), "-c", "from normkit import _native; print(_native.build_directory())"],
                           capture_output=True, text=True, check=True, timeout=120).stdout.strip() for exe in names}
    assert len(names) >= 1 and dirs == {str(_native.build_directory())}


def test_the_build_runs_with_the_ninja_beside_this_interpreter():
    assert _native._build_path().split(os.pathsep)[0] == sysconfig.get_path("scripts")
    key = _native.build_key()
    assert key["ninja"].split()[0] == os.path.realpath(
        __import__("shutil").which("ninja", path=_native._build_path()) or "ninja: not found")


def test_a_compile_announces_itself_and_its_time(build_root, fake_compiler, capsys):
    module = _native._compile()
    err = capsys.readouterr().err
    assert "normkit: compiling native kernels (first use, ~1-2 min)" in err
    assert "normkit: native kernels compiled in" in err
    (call,) = fake_compiler["load_inline"]
    directory = _native.build_directory()
    assert call["build_directory"] == str(directory) and module.name == directory.name
    assert call["PATH"].split(os.pathsep)[0] == _native._build_path().split(os.pathsep)[0]  # the venv's ninja first
    assert (directory / "normkit.stamp").exists()
    assert _native._build_info["action"] == "compiled"


def test_a_finished_build_is_imported_without_running_ninja(build_root, fake_compiler, capsys):
    _native._compile()
    capsys.readouterr()
    _native._compile()  # a second process: the stamp is there
    assert len(fake_compiler["load_inline"]) == 1 and len(fake_compiler["import"]) == 1
    assert capsys.readouterr().err == ""
    assert _native._build_info["action"] == "loaded" and _native._build_info["seconds"] < 1.0


def test_a_stale_torch_lock_is_cleared_with_a_message(build_root, fake_compiler, capsys):
    """torch waits forever for its lock file; one left by a killed build is removed (we hold the flock, so
    no live normkit build owns it) and the build goes on."""
    directory = _native.build_directory()
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")
    t0 = time.perf_counter()
    _native._compile()
    assert time.perf_counter() - t0 < 5
    assert not (directory / "lock").exists()
    assert "removed a stale build lock" in capsys.readouterr().err
    assert len(fake_compiler["load_inline"]) == 1


def test_a_live_builder_is_waited_for_by_name(build_root, fake_compiler, capsys):
    """Another process holding the build lock: this one says for whom it waits, then loads what it built."""
    directory = _native.build_directory()
    directory.mkdir(parents=True)
    holder = textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(directory / "normkit.lock")!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0); f.truncate(); f.write(f"process {{os.getpid()}}"); f.flush()
        print("locked", flush=True)
        time.sleep(1.5)
        open({str(directory / "normkit.stamp")!r}, "w").write("{{}}")
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        _native._compile()
    finally:
        proc.wait(timeout=30)
    err = capsys.readouterr().err
    assert f"waiting for process {proc.pid}, which is compiling the native kernels" in err
    assert fake_compiler["load_inline"] == [] and len(fake_compiler["import"]) == 1  # it built; we loaded


def test_build_command_says_compiled_or_loaded():
    out = subprocess.run([sys.executable, "-m", "normkit", "build"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NORMKIT_NATIVE": "1"})
    if out.returncode == 1 and "could not be built" in out.stderr:
        pytest.skip("no C++ compiler here: the build command's failure is tested in test_cli")
    assert out.returncode == 0, out.stderr
    kernels = next(line for line in out.stdout.splitlines() if line.startswith("kernels:"))
    assert kernels.startswith(("kernels: loaded in ", "kernels: compiled in ")) and " s (" in kernels, kernels


def test_backend_context_manager_restores_the_previous_backend():
    import normkit

    before = normkit.get_backend()
    with normkit.backend("eager"):
        assert normkit.get_backend() == "eager" and not _native.serving
        with pytest.raises(ValueError, match="expected one of"):
            with normkit.backend("fast"):
                pass
        assert normkit.get_backend() == "eager"
    assert normkit.get_backend() == before
    with pytest.raises(KeyError):
        with normkit.backend("eager"):
            raise KeyError("inside")
    assert normkit.get_backend() == before


def test_native_backend_refuses_when_the_environment_switches_kernels_off(monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("NORMKIT_NATIVE", "0")
        with pytest.raises(RuntimeError, match="NORMKIT_NATIVE=0 .* unset it"):
            _native.set_backend("native")
    _native.set_backend("auto")  # re-reads the environment as it was
