"""Optional native kernels: every ``ops/*.cpp`` compiled together into one extension, once per build setup.

A kernel here is only ever a faster route to an answer normkit can also compute with torch ops: when the
build is impossible (no compiler, no ninja), disabled with ``NORMKIT_NATIVE=0``, or switched off with
:func:`set_backend` ``("eager")``, callers fall back to their eager path and nothing else changes.

Backends (:func:`set_backend`, :func:`backend` for a block, :func:`get_backend`): ``"auto"`` (default: the
kernels where they apply, the eager path after one warning where they cannot be built), ``"native"`` (the
same, but selecting it builds the kernels now and raises, naming the cause and the fix, when they cannot
run) and ``"eager"`` (torch ops only). ``NORMKIT_NATIVE=0`` in the environment forces ``"eager"``; it is read
at import and by :func:`set_backend`, never per call. The selection is process-wide (not per thread).

The build (:func:`build`, ``normkit build``, or the first call that wants a kernel):

* The build directory is named by a hash of everything the build depends on -- the sources, headers and flags
  (the spec's bounds :func:`spec_defines` among them), the torch version *and* install location, the
  compiler and ninja executables (path, size, modification time), the Python version and the CPU -- so two
  checkouts, venvs or toolchains never rewrite each other's build (:func:`build_key`).
* A finished build leaves a stamp beside its library; a later process imports that library directly
  (about 0.1 s) without running ninja, so nothing can recompile silently.
* Every compile says so on stderr before it starts ("compiling native kernels (first use, ~1-2 min)") and
  how long it took after; :func:`status` and ``normkit build`` say whether the kernels were compiled or
  loaded and how long that took.
* Concurrent processes take turns through a lock file (``flock``: released by the kernel when its owner
  dies); a torch build lock found while holding it was left by a killed build and is removed, with a message,
  instead of being waited on forever.
* A failed build is attempted once per process: one warning, then the eager path (``"auto"``).

Which path each op took is recorded only inside :func:`recording` (``normkit check`` and the benchmarks use
it); :func:`status` reports the last recorded path of each op.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
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
_build_info: dict | None = None  # {"action": "compiled" | "loaded", "seconds": float, "directory": str}
_backend = "auto"
_env_eager = os.environ.get("NORMKIT_NATIVE", "1") == "0"  # read at import and by set_backend, never per call
serving = not _env_eager  # whether a kernel may serve a call at all: the hot paths read this one global
_recording = 0  # > 0 inside recording(): paths are noted
_last_path: dict[str, str] = {}  # op -> "native" | "eager (<reason>)" on its last recorded call
_seen: dict[str, set[str]] = {}  # op -> every path it took while recording

KERNELS = ("lrn_kernel", "norm_kernel", "channels_last_kernel", "norm_ops")  # compiled into one extension module
HEADERS = ("norm_common.h",)  # included by the kernels (ops/ is on the include path)
FUNCTIONS = ("lrn_forward", "lrn_backward", "stats_norm", "stats_norm_backward", "affine_eval",
             "affine_eval_backward", "running_stats", "signature")  # the Python entry points of the extension
BACKENDS = ("auto", "native", "eager")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)
STALE_LOCK_S = 900  # a torch build lock older than this, where flock is unavailable, was left by a dead build
_OPS = Path(__file__).parent / "ops"


# ---- backend selection ----------------------------------------------------------------------------------

def set_backend(name: str) -> None:
    """Select the backend for every op: ``"auto"`` (default: the native kernels where they apply),
    ``"native"`` (as auto, but build the kernels now and raise ``RuntimeError`` with the cause and the fix if
    they cannot run) or ``"eager"`` (torch ops only). Re-reads ``NORMKIT_NATIVE``."""
    global _backend, _env_eager, serving
    if name not in BACKENDS:
        raise ValueError(f"normkit.set_backend: expected one of {BACKENDS}, got {name!r}")
    _env_eager = os.environ.get("NORMKIT_NATIVE", "1") == "0"
    if name == "native":
        if _env_eager:
            raise RuntimeError("normkit.set_backend('native'): NORMKIT_NATIVE=0 is set in the environment, which "
                               "switches the native kernels off; unset it (or set NORMKIT_NATIVE=1) to use them")
        if _get(force=_module is None) is None:
            raise RuntimeError(f"normkit.set_backend('native'): the native kernels cannot run here ({_error}); "
                               f"install a C++ compiler and ninja (pip install ninja) and run `normkit build` to "
                               f"see the build, or select 'auto' to fall back to the eager path")
    _backend = name
    serving = name != "eager" and not _env_eager


def get_backend() -> str:
    """The selected backend; ``"eager"`` whenever ``NORMKIT_NATIVE=0`` was set (at import or at the last
    :func:`set_backend`)."""
    return "eager" if _env_eager else _backend


@contextlib.contextmanager
def backend(name: str):
    """``with normkit.backend("eager"): ...``: :func:`set_backend` ``(name)`` for the block, the previous
    backend restored however the block ends. Process-wide, like :func:`set_backend`."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# ---- which path served ------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording(reset: bool = True):
    """Record, inside the block, which path each op takes (:func:`note`); ``reset`` first forgets earlier
    records. Outside any such block nothing is recorded (the hot path pays one test of a global)."""
    global _recording
    if reset:
        _last_path.clear()
        _seen.clear()
    _recording += 1
    try:
        yield _last_path
    finally:
        _recording -= 1


def note(op: str, path: str) -> None:
    """Record which path ``op`` took (inside :func:`recording` only; not while a graph is compiled, where the
    write would be a side effect Dynamo has to replay)."""
    if _recording:
        import torch

        if not torch.compiler.is_compiling():
            _last_path[op] = path
            _seen.setdefault(op, set()).add(path)


def paths_seen(reset: bool = False) -> dict[str, list[str]]:
    """Every path each op took while recording (``normkit check`` reports them); ``reset=True`` returns
    them and starts afresh."""
    seen = {op: sorted(paths) for op, paths in sorted(_seen.items())}
    if reset:
        _seen.clear()
    return seen


# ---- the build ---------------------------------------------------------------------------------------------

def _texts(names, suffix="") -> list[str]:
    return [(_OPS / f"{n}{suffix}").read_text() for n in names]


def spec_defines() -> list[str]:
    """The compiler flags that give the kernels the spec's plain-formula bounds (``norm_common.h``), as exact
    hexadecimal float literals."""
    from ._spec import PLAIN

    return [f"-DNK_PLAIN_LO={PLAIN.lo.hex()}f", f"-DNK_PLAIN_HI={PLAIN.hi.hex()}f",
            f"-DNK_PLAIN_TINY_VAR={PLAIN.tiny_var.hex()}f", f"-DNK_PLAIN_KEEP={PLAIN.keep.hex()}f",
            f"-DNK_PLAIN_MAX_COUNT={PLAIN.max_count}"]


def _executable(name: str, path: str | None = None) -> str:
    """``name`` as found on ``path`` (default: the build's PATH), described by its real path, size and
    modification time -- an upgrade of the tool changes the description -- or ``"<name>: not found"``."""
    found = shutil.which(name, path=path or _build_path())
    if found is None:
        return f"{name}: not found"
    real = os.path.realpath(found)
    st = os.stat(real)
    return f"{real} {st.st_size} {st.st_mtime_ns}"


def _build_path() -> str:
    """The PATH the build runs with: this interpreter's scripts directory first, so the ninja installed with
    normkit (pip's) builds, whatever ninja an activated environment or the system puts first."""
    return sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")


def build_key() -> dict:
    """Everything the build depends on: a different value of any entry gives another build directory."""
    import torch

    return {"sources": hashlib.sha1("\0".join(_texts(KERNELS, ".cpp") + _texts(HEADERS)).encode()).hexdigest(),
            "flags": [*CFLAGS, *spec_defines(), "|", *LDFLAGS], "functions": list(FUNCTIONS),
            "torch": f"{torch.__version__} {Path(torch.__file__).resolve().parent}",
            "compiler": _executable(os.environ.get("CXX", "c++")), "ninja": _executable("ninja"),
            # the Python the extension compiles against (its headers), not the name it was started by:
            # `python`, `python3` and the `normkit` script of one venv share a build
            "python": f"{sys.version} {sysconfig.get_path('include')}", "cpu": _cpu_tag()}


def build_directory(key: dict | None = None) -> Path:
    """Where the build for ``key`` (default: this process's :func:`build_key`) lives: a directory of its
    own under ``TORCH_EXTENSIONS_DIR`` (torch's default root when unset)."""
    from torch.utils.cpp_extension import get_default_build_root

    key = build_key() if key is None else key
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"normkit_kernels_{digest}"


def _say(message: str) -> None:
    print(f"normkit: {message}", file=sys.stderr, flush=True)


def _import(name: str, directory: Path):
    """The built extension module ``name`` in ``directory``, imported directly (no ninja run)."""
    from torch.utils.cpp_extension import LIB_EXT

    spec = importlib.util.spec_from_file_location(name, directory / f"{name}{LIB_EXT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _exclusive(directory: Path):
    """Hold the build directory's lock file for the block: one process builds, the others wait (saying for
    whom). ``flock`` is released by the kernel when its holder dies, so a lock of a killed process never
    blocks. Where ``flock`` is unavailable, the block runs unlocked."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "normkit.lock"
    with open(path, "a+") as f:
        try:
            import fcntl

            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "another process"
                _say(f"waiting for {owner}, which is compiling the native kernels in {directory} ...")
                fcntl.flock(f, fcntl.LOCK_EX)
            locked = True
        except (ImportError, OSError):
            locked = False
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        yield locked


def _clear_stale_torch_lock(directory: Path, locked: bool) -> None:
    """torch's build lock (``lock``) in ``directory``: torch waits for it to vanish, forever. Held by a live
    normkit build only while that build holds our lock too; so when we hold ours, any torch lock there was
    left by a build that was killed. Without flock: one older than any build could take is stale."""
    torch_lock = directory / "lock"
    try:
        age = time.time() - torch_lock.stat().st_mtime
    except FileNotFoundError:
        return
    if locked or age > STALE_LOCK_S:
        torch_lock.unlink(missing_ok=True)
        _say(f"removed a stale build lock {torch_lock} ({age:.0f} s old), left by a build that was stopped "
             f"before it finished")


def _compile():
    """Load the finished build for this setup, or compile it (announced, timed); raises on failure."""
    global _build_info
    t0 = time.perf_counter()  # "loaded in" counts the key (hashing the sources, probing the toolchain) too
    key = build_key()
    directory = build_directory(key)
    name = directory.name
    stamp = directory / "normkit.stamp"
    if stamp.exists():  # a finished build: import it, no ninja run
        module = _import(name, directory)
        _build_info = {"action": "loaded", "seconds": time.perf_counter() - t0, "directory": str(directory)}
        return module
    with _exclusive(directory) as locked:
        if stamp.exists():  # another process finished it while we waited
            module = _import(name, directory)
            _build_info = {"action": "loaded", "seconds": time.perf_counter() - t0, "directory": str(directory)}
            return module
        _clear_stale_torch_lock(directory, locked)
        from torch.utils import cpp_extension

        _say(f"compiling native kernels (first use, ~1-2 min) in {directory} ...")
        t1 = time.perf_counter()
        path = os.environ.get("PATH")
        os.environ["PATH"] = _build_path()  # the ninja the key names
        try:
            # -march=native is safe: the build runs on the machine that uses it, and the key holds a hash of
            # the CPU. -fno-math-errno lets sqrt vectorize; -fopenmp makes at::parallel_for use torch's
            # threads and enables the `omp simd` reductions.
            module = cpp_extension.load_inline(name, cpp_sources=_texts(KERNELS, ".cpp"), functions=list(FUNCTIONS),
                                               extra_include_paths=[str(_OPS)],
                                               extra_cflags=[*CFLAGS, *spec_defines()], extra_ldflags=list(LDFLAGS),
                                               build_directory=str(directory), verbose=False)
        finally:
            if path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path
        seconds = time.perf_counter() - t1
        stamp.write_text(json.dumps(key, indent=1))
        _say(f"native kernels compiled in {seconds:.0f} s")
        _build_info = {"action": "compiled", "seconds": seconds, "directory": str(directory)}
        return module


def _get(force: bool = False):
    """The compiled module, building it on first use; None when disabled or impossible here."""
    global _module, _error
    if not force and not serving:
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
                if not force:  # an explicit build (build(), set_backend('native')) raises instead
                    warnings.warn(f"normkit: native kernels unavailable, using the eager path ({_error[:300]})",
                                  RuntimeWarning, stacklevel=3)
    return _module


def load(name: str = "norm_kernel"):
    """The compiled module holding ``ops/<name>.cpp`` (all kernels share one module), or None."""
    if name not in KERNELS:
        raise ValueError(f"normkit: no native kernel named {name!r} (known: {KERNELS})")
    return _get()


def build(force: bool = False) -> dict:
    """Compile (or load the finished build of) the native kernels now (``normkit build``); returns
    :func:`status`. Raises if they cannot be built, so an ahead-of-time build says why. ``NORMKIT_NATIVE=0``
    does not stop an explicit build."""
    global _error
    if force:
        _error = None
    module = _get(force=True)
    if module is None:
        raise RuntimeError(f"normkit: native kernels could not be built: {_error}")
    return status()


def status() -> dict:
    """Build state (compiled or loaded, how long it took, where), selected backend, and the path each op took
    on its last recorded call (:func:`recording`)."""
    if _module is not None:
        info = _build_info or {}
        build_state = (f"{info.get('action', 'built')} in {info.get('seconds', 0.0):.2f} s"
                       f" ({info.get('directory', '?')})")
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
