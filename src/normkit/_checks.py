"""Input validation with torch-like messages: what was expected, what was got, and how to fix it.

Every public entry point validates before it allocates; nothing here uses ``assert``, and nothing looks at
tensor *values* (only shapes, dtypes and Python arguments), so validation costs no host sync and traces
under ``torch.export`` / ``torch.compile``.

Exception types (policy): each error is an instance of the type torch 2.13 raises for the same bad input,
so ``except RuntimeError`` written for torch keeps working, *and* of the type normkit raised before, so
``except ValueError`` / ``except TypeError`` written for normkit keeps working:

* :class:`NormArgumentError` (``ValueError`` and ``RuntimeError``): a shape, size or argument torch's
  kernels refuse with ``RuntimeError`` (weight of the wrong size, ``num_groups`` not dividing the channels,
  a mismatched ``normalized_shape``, eval mode without running statistics);
* :class:`UnsupportedDtypeError` (``TypeError`` and ``NotImplementedError``): integer, bool or complex input;
* :class:`MixedDtypeError` (``TypeError`` and ``RuntimeError``): parameters whose dtype torch's CPU kernels
  do not accept with this input (e.g. a float64 weight with a float32 input);
* plain ``ValueError`` where torch raises ``ValueError`` (eps, one value per channel in training).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF = (torch.float16, torch.bfloat16)


class NormArgumentError(ValueError, RuntimeError):
    """A bad shape or argument: torch raises ``RuntimeError`` here; normkit's earlier releases ``ValueError``."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """An input dtype without a normalization (torch: ``NotImplementedError``; normkit's earlier: ``TypeError``)."""


class MixedDtypeError(TypeError, RuntimeError):
    """Parameters whose dtype does not fit the input's (torch: ``RuntimeError``, "mixed dtype")."""


def check_floating(op: str, input: Tensor) -> None:
    """The input must be a real floating-point tensor of a supported dtype."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOATING:
        raise UnsupportedDtypeError(
            f"{op}: expected a floating-point input (float16, bfloat16, float32 or float64), got {input.dtype} "
            f"(not implemented for it); convert it first, e.g. input.float()"
        )


def check_min_dim(op: str, input: Tensor, ndim: int, shape_hint: str) -> None:
    if input.dim() < ndim:
        raise NormArgumentError(
            f"{op}: expected input with at least {ndim} dimensions {shape_hint}, got input of size {list(input.shape)}; "
            f"add the missing dimensions, e.g. input.unsqueeze(0)"
        )


def check_param(op: str, name: str, t: Tensor | None, shape: Sequence[int]) -> None:
    """An optional per-feature tensor (weight, bias, running statistics) must have ``shape``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise NormArgumentError(
            f"{op}: expected {name} of shape {list(shape)} to match the input, got {list(t.shape)}; "
            f"give one value per normalized feature"
        )
    if not t.is_floating_point():
        raise MixedDtypeError(f"{op}: expected {name} to be floating point, got {t.dtype}; convert it, e.g. {name}.float()")


def check_param_dtypes(op: str, input: Tensor, **params: Tensor | None) -> None:
    """torch's CPU rule for the parameters of batch, instance, layer and group norm: all given ones share
    one dtype, the input's -- or float32 for a float16/bfloat16 input (mixed precision)."""
    given = {name: t for name, t in params.items() if t is not None}
    dtypes = {t.dtype for t in given.values()}
    if not dtypes:
        return
    allowed = (input.dtype, torch.float32) if input.dtype in HALF else (input.dtype,)
    if len(dtypes) > 1 or next(iter(dtypes)) not in allowed:
        got = ", ".join(f"{name} {t.dtype}" for name, t in given.items())
        raise MixedDtypeError(
            f"{op}: mixed dtype: expected every parameter in {' or '.join(map(str, allowed))} for a {input.dtype} "
            f"input, got {got}; cast them, e.g. module.to({input.dtype}) or input.to(weight.dtype)"
        )


def check_eps(op: str, eps: float) -> None:
    """eps must be a real number (NaN is refused: it can only give NaN). Its sign is checked per op:
    torch accepts any eps except in batch norm (:func:`check_batch_norm_eps`)."""
    # eps != eps: NaN (math.isnan breaks torch.compile's graph on the symbolic float it makes of an eps that
    # changed between compiled calls)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or eps != eps:
        raise ValueError(f"{op}: expected eps to be a real number, got {eps!r}; pass e.g. eps=1e-5")


def check_batch_norm_eps(op: str, eps: float, training: bool) -> None:
    """torch 2.13's rule for ``batch_norm`` (functional and modules): eps > 0 in training (normalizing with
    batch statistics), eps >= 0 with running statistics."""
    if training and eps <= 0:
        raise ValueError(
            f"{op}: batch_norm eps must be positive during training, but got {eps}; "
            f"pass a positive eps such as 1e-5 (eps=0 is only accepted with running statistics, in eval mode)"
        )
    if not training and eps < 0:
        raise ValueError(f"{op}: batch_norm eps must be non-negative, but got {eps}; pass eps >= 0, e.g. 1e-5")


def check_momentum(op: str, momentum: float | None) -> None:
    if momentum is None:
        raise ValueError(
            f"{op}: momentum=None (a cumulative moving average) needs the step count that the nn module "
            f"keeps; pass a float, e.g. momentum=1/num_batches_tracked"
        )
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
        raise TypeError(f"{op}: expected momentum to be a float, got {momentum!r}")


def normalized_shape_tuple(op: str, normalized_shape: int | Sequence[int], input: Tensor) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple, checked against the input's trailing dimensions."""
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape):
        raise NormArgumentError(f"{op}: normalized_shape must be non-negative integers, got {normalized_shape!r}")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise NormArgumentError(
            f"{op}: Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
            f"element, but got normalized_shape = []; pass the trailing dimensions to normalize over"
        )
    if len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise NormArgumentError(
            f"{op}: Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}; pass the input's "
            f"trailing dimensions, e.g. normalized_shape=input.shape[-1:]"
        )
    return shape


def check_more_than_one(op: str, input: Tensor, count: int, what: str) -> None:
    """Training-mode statistics need at least two values per reduction group (torch's rule)."""
    if count == 1:
        raise ValueError(
            f"{op}: Expected more than 1 {what} when training, got input size {list(input.shape)}; "
            f"use a larger batch, or eval mode (running statistics)"
        )


def check_trailing(op: str, input: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None, eps: float,
                   same_dtype_params: bool = True) -> tuple[int, ...]:
    """Layer and RMS norm: a floating input, ``normalized_shape`` matching its trailing dims, parameters of that
    shape (of one dtype with the input when ``same_dtype_params``: torch's CPU rule for layer norm; torch's RMS
    norm accepts any), a real eps. Returns ``normalized_shape`` as a tuple."""
    check_floating(op, input)
    shape = normalized_shape_tuple(op, normalized_shape, input)
    check_param(op, "weight", weight, shape)
    check_param(op, "bias", bias, shape)
    if same_dtype_params:
        check_param_dtypes(op, input, weight=weight, bias=bias)
    check_eps(op, eps)
    return shape


def check_group_norm(op: str, input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> None:
    """Group norm: a floating ``(N, C, *)`` input, ``num_groups`` a positive integer dividing ``C``, ``(C,)``
    parameters of the input's dtype (or float32 for a half input), a real eps."""
    check_floating(op, input)
    check_min_dim(op, input, 2, "(N, C, *)")
    c = input.shape[1]
    if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool) or num_groups < 1:
        raise NormArgumentError(f"{op}: num_groups must be a positive integer, got {num_groups!r}")
    if c % num_groups:
        raise NormArgumentError(
            f"{op}: Expected number of channels in input to be divisible by num_groups, but got input of "
            f"shape {list(input.shape)} and num_groups={num_groups}; num_groups={num_groups} must divide num_channels={c}"
        )
    check_param(op, "weight", weight, (c,))
    check_param(op, "bias", bias, (c,))
    check_param_dtypes(op, input, weight=weight, bias=bias)
    check_eps(op, eps)
