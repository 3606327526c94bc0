"""The float64 reference: run a model in float64 *all the way through*.

``model.double()(x.double())`` is not always a float64 computation. Models cast inside their own forward:
Hugging Face's ``LlamaRMSNorm`` runs ``hidden_states.to(torch.float32)`` before its statistics, Gemma's
norm calls ``x.float()``, T5's ``.to(torch.float32)``, attention code asks for ``softmax(..., dtype=torch.float32)``
and rotary embeddings build ``torch.arange(...).float()``. On a float64 model those downcasts silently turn
the "reference" into a float32 computation: ``LlamaRMSNorm(8).double()(x * 1e20)`` returns zeros, and a
checker that trusts it reports an error of 0 where the true error is 1.

:func:`keep_float64` is a :class:`torch.overrides.TorchFunctionMode` under which every conversion *to* a
lower floating dtype (float32, float16, bfloat16) becomes a conversion to float64, and torch's default
dtype is float64:

* ``Tensor.to(dtype)`` / ``.to(other)`` / ``.to(device, dtype)`` / ``.to(dtype=...)``, ``.type(dtype)``,
  ``.type_as(other)``, ``.float()``, ``.half()``, ``.bfloat16()``;
* any ``dtype=`` keyword argument (``torch.zeros(..., dtype=torch.float32)``, ``softmax(x, -1,
  dtype=torch.float32)``, ``x.sum(dtype=...)``);
* factories without a dtype (``torch.tensor(0.5)``, ``torch.ones(3)``) through the default dtype.

``Tensor.view(dtype)`` (a reinterpretation of the bits, not a conversion) is left alone. What cannot be
lifted -- a kernel that only exists in float32, a tensor that arrives in float32 from outside the mode --
shows up as a floating result of another dtype: each such call is recorded in ``mode.lowered``, so a
report can say so instead of trusting the reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

LOWER = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = {Tensor.float, Tensor.half, Tensor.bfloat16}
_KEEP_BITS = {Tensor.view}  # view(dtype) reinterprets the bits: never rewritten


def _lift(arg):
    """``arg`` with a lower floating dtype replaced by float64 (a dtype, or the dtype of a tensor target)."""
    if isinstance(arg, torch.dtype):
        return torch.float64 if arg in LOWER else arg
    return arg


@dataclass
class Lowered:
    """A call whose floating result was not float64 although the mode was on: the reference is not float64 there."""

    function: str
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.function} returned {str(self.dtype).replace('torch.', '')}"


class KeepFloat64(TorchFunctionMode):
    """The mode behind :func:`keep_float64`. ``lowered`` lists the calls that still produced a lower
    floating dtype (at most one entry per function)."""

    def __init__(self) -> None:
        super().__init__()
        self.lowered: list[Lowered] = []
        self._seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _CASTS:
            func, args = Tensor.double, args[:1]
        elif func is Tensor.type_as:
            this, other = args[0], args[1]
            if other.dtype in LOWER:
                func, args = Tensor.to, (this, torch.float64)
        elif func is Tensor.to:
            this, rest = args[0], list(args[1:])
            if rest and isinstance(rest[0], Tensor):  # to(other): other's device and dtype
                other = rest.pop(0)
                rest = [other.device, _lift(other.dtype), *rest]
            args = (this, *map(_lift, rest))
        elif func is Tensor.type and len(args) > 1 and isinstance(args[1], torch.dtype):
            args = (args[0], _lift(args[1]), *args[2:])
        if "dtype" in kwargs and func not in _KEEP_BITS:
            kwargs["dtype"] = _lift(kwargs["dtype"])
        out = func(*args, **kwargs)
        self._note(func, out)
        return out

    def _note(self, func, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.dtype in LOWER and func not in _KEEP_BITS:
                name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
                if name not in self._seen:
                    self._seen.add(name)
                    self.lowered.append(Lowered(name, t.dtype))
                return


@contextlib.contextmanager
def keep_float64():
    """``with keep_float64() as mode:`` -- a float64 computation stays float64 (see the module docstring);
    afterwards ``mode.lowered`` lists what could not be lifted (empty when the reference is float64 throughout)."""
    mode = KeepFloat64()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with mode:
            yield mode
    finally:
        torch.set_default_dtype(previous)


def to_float64(obj):
    """Every floating tensor in a nested structure (tensor, tuple, list, dict) as float64; integer tensors
    (token ids, masks) and everything else unchanged."""
    return tree_map(lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t, obj)


def float64_call(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` as a true float64 computation: ``module`` is called as it is (make it
    float64 first, e.g. a ``copy.deepcopy(m).double()``), floating inputs are cast to float64, and the call
    runs under :func:`keep_float64`. Returns ``(output, lowered)``; ``lowered`` is empty when nothing in the
    call could escape float64."""
    with keep_float64() as mode:
        out = module(*to_float64(args), **to_float64(kwargs))
    return out, list(mode.lowered)
