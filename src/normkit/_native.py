"""Optional native kernels: every ``ops/*_kernel.cpp`` compiled together, once per machine and torch version.

A kernel here is only ever a faster route to an answer normkit can also compute with torch ops: when the
build is impossible (no compiler, no ninja), disabled with ``NORMKIT_NATIVE=0``, or switched off with
:func:`set_backend` ``("eager")``, callers fall back to their eager path and nothing else changes.

* :func:`build` compiles ahead of time (``normkit build``); otherwise the first call that wants a kernel
  builds it, printing one line to stderr while it does (about a minute; a cached build loads in ~0.1 s).
* The build is attempted once per process; a failure gives one warning and the eager path.
* :func:`status` says whether the kernels are built, which backend is selected, and which path each op took
  on its last call.
* The bounds under which the kernels take the one-pass plain formulas are :data:`normkit._spec.PLAIN`,
  compiled in as ``NK_PLAIN_*`` (:func:`spec_defines`): the conditions are written once, in the spec.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

_lock = threading.Lock()
_module = None
_error: str | None = None
_build_seconds: float | None = None
_backend = "auto"  # "auto": native where it applies and builds; "native": the same, but a failed build raises; "eager"
_last_path: dict[str, str] = {}  # op -> "native" | "eager (<reason>)" on its last call
_seen: dict[str, set[str]] = {}  # op -> every path it took since paths_seen(reset=True)

KERNELS = ("lrn_kernel", "norm_kernel", "channels_last_kernel")  # compiled into one extension module
HEADERS = ("norm_common.h",)  # included by the kernels (ops/ is on the include path)
BACKENDS = ("auto", "native", "eager")
_DECL = re.compile(r"^(?:torch::Tensor|std::vector<torch::Tensor>) (\w+)\(", re.M)


def set_backend(name: str) -> None:
    """Select the backend for every op: ``"auto"`` (default: the native kernels where they apply),
    ``"native"`` (as auto, but raise if the kernels cannot be built) or ``"eager"`` (torch ops only)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"normkit.set_backend: expected one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The selected backend; ``"eager"`` whenever ``NORMKIT_NATIVE=0`` is set."""
    return "eager" if os.environ.get("NORMKIT_NATIVE", "1") == "0" else _backend


def _sources() -> list[str]:
    return [(Path(__file__).parent / "ops" / f"{k}.cpp").read_text() for k in KERNELS]


def _header_texts() -> list[str]:
    return [(Path(__file__).parent / "ops" / h).read_text() for h in HEADERS]


def spec_defines() -> list[str]:
    """The compiler flags that give the kernels the spec's plain-formula bounds (``norm_common.h``), as exact
    hexadecimal float literals."""
    from ._spec import PLAIN

    return [f"-DNK_PLAIN_LO={PLAIN.lo.hex()}f", f"-DNK_PLAIN_HI={PLAIN.hi.hex()}f",
            f"-DNK_PLAIN_TINY_VAR={PLAIN.tiny_var.hex()}f", f"-DNK_PLAIN_KEEP={PLAIN.keep.hex()}f",
            f"-DNK_PLAIN_MAX_COUNT={PLAIN.max_count}"]


def _build_name(sources: list[str]) -> str:
    """Extension name: changes with the sources, the torch version and the CPU (a -march=native build)."""
    import torch

    h = hashlib.sha1("\0".join([torch.__version__, _cpu_tag(), *sources]).encode()).hexdigest()[:12]
    return f"normkit_kernels_{h}"


def _compile():
    """Build (or load the cached build of) the extension; raises on failure."""
    global _build_seconds
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip-installed ninja sits beside this interpreter's scripts
        os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")
    sources = _sources()
    defines = spec_defines()
    name = _build_name(sources + _header_texts() + defines)  # a header edit, or a new bound in the spec, rebuilds too
    functions = [f for s in sources for f in _DECL.findall(s)]
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    cached = any(build_dir.glob(f"{name}*.so"))
    t0 = time.perf_counter()
    if not cached:
        print(f"normkit: compiling native kernels (once per machine and torch version, about a minute) in {build_dir}",
              file=sys.stderr, flush=True)
    # -march=native is safe: the build runs on the machine that uses it, and the name carries a hash of
    # the CPU. -fno-math-errno lets sqrt vectorize; -fopenmp makes at::parallel_for use torch's threads and
    # enables the `omp simd` reductions.
    module = cpp_extension.load_inline(name, cpp_sources=sources, functions=functions,
                                       extra_include_paths=[str(Path(__file__).parent / "ops")],
                                       extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp", *defines],
                                       extra_ldflags=["-fopenmp"], verbose=False)
    _build_seconds = time.perf_counter() - t0
    if not cached:
        print(f"normkit: native kernels built in {_build_seconds:.0f} s", file=sys.stderr, flush=True)
    return module


def _get(force: bool = False):
    """The compiled module, building it on first use; None when disabled or impossible here."""
    global _module, _error
    if not force and get_backend() == "eager":
        return None
    if _module is not None or (_error is not None and not force):
        return _module
    with _lock:
        if _module is None and (_error is None or force):
            try:
                _module = _compile()
                _error = None
            except Exception as exc:  # a missing compiler must not break a numerics library
                _error = f"{type(exc).__name__}: {exc}"
                if _backend == "native":
                    raise RuntimeError(f"normkit: native kernels unavailable ({_error[:400]})") from exc
                warnings.warn(f"normkit: native kernels unavailable, using the eager path ({_error[:300]})",
                              RuntimeWarning, stacklevel=3)
    return _module


def load(name: str = "norm_kernel"):
    """The compiled module holding ``ops/<name>.cpp`` (all kernels share one module), or None."""
    if name not in KERNELS:
        raise ValueError(f"normkit: no native kernel named {name!r} (known: {KERNELS})")
    return _get()


def build(force: bool = False) -> dict:
    """Compile the native kernels now (``normkit build``); returns :func:`status`. Raises if they cannot be
    built, so an ahead-of-time build says why. ``NORMKIT_NATIVE=0`` does not stop an explicit build."""
    global _error
    if force:
        _error = None
    module = _get(force=True)
    if module is None:
        raise RuntimeError(f"normkit: native kernels could not be built: {_error}")
    return status()


def note(op: str, path: str) -> None:
    """Record which path ``op`` took on its last call (for :func:`status` and the benchmarks); not while
    a graph is compiled, where the write would be a side effect Dynamo has to replay."""
    import torch

    if not torch.compiler.is_compiling():
        _last_path[op] = path
        _seen.setdefault(op, set()).add(path)


def paths_seen(reset: bool = False) -> dict[str, list[str]]:
    """Every path each op took since the last reset (``normkit check`` reports them); ``reset=True``
    returns them and starts afresh."""
    seen = {op: sorted(paths) for op, paths in sorted(_seen.items())}
    if reset:
        _seen.clear()
    return seen


def status() -> dict:
    """Build state, selected backend, and the path each op took on its last call in this process."""
    if _module is not None:
        build_state = "built" + (f" (loaded in {_build_seconds:.1f} s)" if _build_seconds is not None else "")
    elif _error is not None:
        build_state = f"unavailable: {_error[:300]}"
    else:
        build_state = "not built yet in this process"
    return {"kernels": build_state, "backend": get_backend(), "ops": dict(_last_path)}


def _cpu_tag() -> str:
    """A hash of the CPU's model name *and* instruction-set flags: two machines with the same model name
    may expose different instruction sets (VMs mask some), and a -march=native build must not cross."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    described = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return hashlib.sha1(" ".join([platform.machine(), *described]).encode()).hexdigest()[:10]
