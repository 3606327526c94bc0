"""Input validation with torch-like messages: what was expected, what was got, and how to fix it.

Every public entry point validates before it allocates; nothing here uses ``assert``.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(op: str, input: Tensor) -> None:
    """The input must be a real floating-point tensor of a supported dtype."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOATING:
        raise TypeError(
            f"{op}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}; convert it first, e.g. input.float()"
        )


def check_min_dim(op: str, input: Tensor, ndim: int, shape_hint: str) -> None:
    if input.dim() < ndim:
        raise ValueError(f"{op}: expected input with at least {ndim} dimensions {shape_hint}, got input of size {list(input.shape)}")


def check_param(op: str, name: str, t: Tensor | None, shape: Sequence[int]) -> None:
    """An optional per-feature tensor (weight, bias, running statistics) must have ``shape``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{op}: expected {name} of shape {list(shape)} to match the input, got {list(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected {name} to be floating point, got {t.dtype}")


def check_eps(op: str, eps: float) -> None:
    # torch accepts any real eps (a negative one is defined wherever var + eps > 0); so does normkit
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or eps != eps:
        raise ValueError(f"{op}: expected eps to be a real number, got {eps!r}")


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
        raise ValueError(f"{op}: normalized_shape must be non-negative integers, got {normalized_shape!r}")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(
            f"{op}: Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
            f"element, but got normalized_shape = []; pass the trailing dimensions to normalize over"
        )
    if len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{op}: Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}"
        )
    return shape


def check_more_than_one(op: str, input: Tensor, count: int, what: str) -> None:
    """Training-mode statistics need at least two values per reduction group (torch's rule)."""
    if count == 1:
        raise ValueError(
            f"{op}: Expected more than 1 {what} when training, got input size {list(input.shape)}; "
            f"use a larger batch, or eval mode (running statistics)"
        )
