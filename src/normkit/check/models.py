"""Which model ``--model`` names: a zoo name or ``path/to/file.py:factory``; every way that can go wrong is
a :class:`normkit.cli.UsageError` naming the problem and the fix."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

from .. import models as zoo
from ..models._seed import seeded
from ..cli import UsageError


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def load(spec: str, seed: int = 0) -> tuple[str, nn.Module, tuple[int, ...] | None]:
    """``(display name, model, default input shape or None)`` for a zoo name or ``file.py:factory``; either is
    built with torch's generator seeded to ``seed`` (the caller's RNG state restored after)."""
    path, sep, factory = spec.rpartition(":")
    if not sep and not spec.endswith(".py"):
        if spec not in zoo.ZOO:
            raise UsageError(f"unknown model {spec!r}; use one of {', '.join(zoo.ZOO)}, or path/to/file.py:factory")
        model = zoo.get(spec, seed=seed)
        return spec, model, tuple(model.example_input_shape)
    if not sep:
        raise UsageError(f"--model {spec}: name the factory to call, as {spec}:make_model")
    if not factory.isidentifier():
        raise UsageError(f"--model {spec}: {factory!r} is not a Python name; use path/to/file.py:factory")
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--model {spec}: file {path!r} does not exist; give the path of a .py file, "
                         f"or a zoo name ({', '.join(zoo.ZOO)})")
    mod_name = f"_normkit_user_model_{abs(hash(str(file.resolve())))}"
    try:
        loader_spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"--model {spec}: importing {path} failed with {_one_line(e)}; fix the file "
                         f"(--debug shows the traceback)") from e
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and
                 getattr(v, "__module__", None) == mod_name]
        raise UsageError(f"--model {spec}: {path} has no function {factory!r}"
                         + (f"; it defines {', '.join(found)}" if found else ""))
    try:
        with seeded(seed):  # random initialization as reproducible as a zoo model's: the same --seed, the same weights
            model = fn()
    except Exception as e:
        raise UsageError(f"--model {spec}: {factory}() raised {_one_line(e)}; it must build the model with no "
                         f"arguments (--debug shows the traceback)") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec}: {factory}() returned {type(model).__name__}, not a torch.nn.Module; "
                         f"return the model")
    shape = getattr(model, "example_input_shape", None)
    return f"{file.name}:{factory}", model, tuple(shape) if shape is not None else None
