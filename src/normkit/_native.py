"""Optional native kernels, built on first use with torch's C++ extension loader and cached.

A kernel here is only ever a faster route to an answer normkit can also compute with torch ops: when
the build is impossible (no compiler, no ninja) or disabled with ``NORMKIT_NATIVE=0``, callers fall back
to their eager path and nothing else changes. The build is attempted once per process; its outcome is
reported by :func:`status`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sysconfig
import threading
import warnings
from pathlib import Path

_lock = threading.Lock()
_cache: dict[str, object] = {}
_errors: dict[str, str] = {}


def load(name: str):
    """The compiled module for ``ops/<name>.cpp``, or None if it cannot be built here."""
    if os.environ.get("NORMKIT_NATIVE", "1") == "0":
        return None
    with _lock:
        if name in _cache or name in _errors:
            return _cache.get(name)
        try:
            from torch.utils.cpp_extension import load_inline

            if shutil.which("ninja") is None:  # the pip-installed ninja sits beside this interpreter's scripts
                os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")

            source = (Path(__file__).parent / "ops" / f"{name}.cpp").read_text()
            functions = [line.split("(")[0].split()[-1] for line in source.splitlines()
                         if line.startswith("torch::Tensor ")]
            # -march=native is safe: the build runs on the machine that uses it, and the build name
            # carries a hash of the CPU, so a cached build is never loaded on another kind of CPU.
            # -fno-math-errno lets sqrt vectorize; -fopenmp makes at::parallel_for (a pragma in a
            # header) use torch's threads.
            _cache[name] = load_inline(f"normkit_{name}_{_cpu_tag()}", cpp_sources=source, functions=functions,
                                       extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                                       extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # a missing compiler must not break a numerics library
            _errors[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"normkit: native kernel {name!r} unavailable, using the eager path ({_errors[name][:200]})",
                          RuntimeWarning, stacklevel=3)
        return _cache.get(name)


def _cpu_tag() -> str:
    """A hash of the CPU's model name *and* instruction-set flags: two machines with the same model name
    may expose different instruction sets (VMs mask some), and a -march=native build must not cross."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    described = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return hashlib.sha1(" ".join([platform.machine(), *described]).encode()).hexdigest()[:10]


def status() -> dict[str, str]:
    """Which native kernels were built in this process, and why the others were not."""
    return {**{n: "built" for n in _cache}, **_errors}
