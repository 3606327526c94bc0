"""The operator cases of ``normkit check``: each normkit op beside torch's native op and an independent
float64 reference, the dtypes and their tolerances, and the inputs -- a magnitude grid from 1e-3 to the
top of each dtype's range, mean offsets, constant inputs and the known failure inputs of NUMERICS.md.

The reference is the textbook two-pass formula evaluated in float64 on the float64 copy of the (already
rounded) input: float64 holds the squares of every float32 and half value and has 29 more bits. torch's
own float64 operators are not used: ``F.batch_norm`` in float64 is wrong on a constant 1e7 input too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import functional as nf

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# relative to max|ref|: 1e-5 for float32; half types: their output rounding (half an ulp) plus 2e-3
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3 + 2.0**-11, torch.bfloat16: 2e-3 + 2.0**-8,
             torch.float64: 1e-9}
SHAPE = (8, 16, 6, 6)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def reference(x: torch.Tensor, dims, eps: float, center: bool = True) -> torch.Tensor:
    """Two-pass ``(x - mean) / sqrt(var + eps)`` (or ``x / sqrt(mean(x**2) + eps)``) in float64."""
    x = x.double()
    c = x - x.mean(dim=dims, keepdim=True) if center else x
    return c / torch.sqrt((c * c).mean(dim=dims, keepdim=True) + eps)


def lrn_reference(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """torch's LRN convention in float64: window ``[c - size//2, c + (size-1)//2]``, ``alpha / size``."""
    x = x.double()
    sq = F.pad(x * x, (0, 0) * (x.dim() - 2) + (size // 2, (size - 1) // 2))
    window = sum(sq.narrow(1, o, x.shape[1]) for o in range(size))
    return x / (k + alpha / size * window) ** beta


def _grouped_reference(x, groups, eps):
    return reference(x.reshape(x.shape[0], groups, -1), (2,), eps).reshape(x.shape)


@dataclass(frozen=True)
class Op:
    name: str
    torch: Callable
    normkit: Callable
    reference: Callable


OPS = [
    Op("batch_norm", lambda x: F.batch_norm(x, None, None, training=True),
       lambda x: nf.batch_norm(x, None, None, training=True), lambda x: reference(x, (0, 2, 3), 1e-5)),
    Op("instance_norm", F.instance_norm, nf.instance_norm, lambda x: reference(x, (2, 3), 1e-5)),
    Op("layer_norm", lambda x: F.layer_norm(x, x.shape[-2:]), lambda x: nf.layer_norm(x, x.shape[-2:]),
       lambda x: reference(x, (2, 3), 1e-5)),
    Op("group_norm", lambda x: F.group_norm(x, 4), lambda x: nf.group_norm(x, 4),
       lambda x: _grouped_reference(x, 4, 1e-5)),
    Op("rms_norm", lambda x: F.rms_norm(x, x.shape[-2:], eps=1e-6), lambda x: nf.rms_norm(x, x.shape[-2:], eps=1e-6),
       lambda x: reference(x, (2, 3), 1e-6, center=False)),
    Op("local_response_norm", lambda x: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0),
       lambda x: nf.local_response_norm(x, 5, 1e-4, 0.75, 2.0), lambda x: lrn_reference(x, 5, 1e-4, 0.75, 2.0)),
]
OP_NAMES = [o.name for o in OPS]


@dataclass(frozen=True)
class Input:
    """One input of the sweep: ``make(generator)`` returns float64 data, rounded to ``dtype`` before use.
    ``magnitude`` is set for the magnitude grid (``max|x| <= magnitude``), None for the special inputs."""

    label: str
    dtype: torch.dtype
    make: Callable[[torch.Generator], torch.Tensor]
    magnitude: float | None = None


def _uniform(m):  # |x| <= m, so the top of the grid is exactly the dtype's largest value
    return lambda g: m * (2 * torch.rand(SHAPE, generator=g, dtype=torch.float64) - 1)


def _normal(m, offset=0.0):
    return lambda g: offset + m * torch.randn(SHAPE, generator=g, dtype=torch.float64)


def _constant(c):
    return lambda g: torch.full(SHAPE, c, dtype=torch.float64)


def magnitudes(dtype: torch.dtype, fast: bool = False) -> list[float]:
    """``1e-3, 1e-2, ...`` up to the dtype's largest finite value (which ends the grid)."""
    top = torch.finfo(dtype).max
    step = 5 if fast else 1
    grid = [10.0**e for e in range(-3, math.floor(math.log10(top)) + 1, step)]
    return grid + [top] if grid[-1] < top else grid


def _fmt_num(v: float) -> str:
    return f"{v:.0e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def special_inputs(dtype: torch.dtype) -> list[Input]:
    """Mean offsets with noise just above the dtype's spacing there, constant inputs, tiny magnitudes."""
    top, eps = torch.finfo(dtype).max, torch.finfo(dtype).eps
    out = []
    for o in (1e3, 1e4, 1e5, 1e6, 1e7):
        if o < top / 4:
            spread = max(1.0, 2.0 ** math.ceil(math.log2(16 * o * eps)))
            out.append(Input(f"offset {_fmt_num(o)} + N(0,{spread:g})", dtype, _normal(spread, o)))
    for c in (0.0, 1.0, 1e4, 1e7, 1e30):
        if c < top / 4:
            out.append(Input(f"constant {_fmt_num(c) if c > 1 else f'{c:g}'}", dtype, _constant(c)))
    if dtype != torch.float16:
        out.append(Input("magnitude 1e-30", dtype, _normal(1e-30)))
    return out


def inputs(dtypes=None, fast: bool = False) -> list[Input]:
    """Every input of the sweep for ``dtypes`` (all of :data:`DTYPES` when None)."""
    out = []
    for dtype in dtypes or DTYPES.values():
        out += [Input(f"magnitude {_fmt_num(m)}", dtype, _uniform(m), m) for m in magnitudes(dtype, fast)]
        out += special_inputs(dtype)[: 3 if fast else None]
    return out


# the known failure inputs of NUMERICS.md (the fixed table ``normkit check`` showed before the sweep)
INPUTS = [
    Input("unit normal", torch.float32, _normal(1.0)),
    Input("magnitude 1e19", torch.float32, _normal(1e19)),
    Input("magnitude 1e30", torch.float32, _normal(1e30)),
    Input("magnitude 1e-30", torch.float32, _normal(1e-30)),
    Input("offset 1e6 + N(0,1)", torch.float32, _normal(1.0, 1e6)),
    Input("constant 1e7", torch.float32, _constant(1e7)),
    Input("unit normal", torch.float16, _normal(1.0)),
    Input("offset 3e4 + N(0,64)", torch.float16, _normal(64.0, 3e4)),
    Input("magnitude 6e4", torch.float16, _uniform(6e4)),
    Input("magnitude 1e30", torch.bfloat16, _normal(1e30)),
    Input("magnitude 1e38", torch.bfloat16, _uniform(1e38)),
]
