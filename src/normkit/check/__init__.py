"""``normkit check``: where torch's normalization breaks, at which dtype and input scale, and whether
normkit holds there.

Each case feeds the same (already rounded) input to torch's operator and to normkit's, and compares both
with a float64 reference: the textbook two-pass formula evaluated in float64 on the float64 copy of the
input (float64 holds the squares of every float32 and half value and has 29 more bits). torch's own
float64 operators are not used as the reference: ``F.batch_norm`` in float64 is wrong on a constant 1e7
input too. The score is ``max|out - ref| / max|ref|``; a non-finite output where the reference is finite
is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import functional as nf

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3 + 2.0**-11, torch.bfloat16: 2e-3 + 2.0**-8}
SHAPE = (8, 16, 6, 6)


def reference(x: torch.Tensor, dims, eps: float, center: bool = True) -> torch.Tensor:
    """Two-pass ``(x - mean) / sqrt(var + eps)`` (or ``x / sqrt(mean(x**2) + eps)``) in float64."""
    x = x.double()
    c = x - x.mean(dim=dims, keepdim=True) if center else x
    return c / torch.sqrt((c * c).mean(dim=dims, keepdim=True) + eps)


def lrn_reference(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """torch's LRN convention in float64: window ``[c - size//2, c + (size-1)//2]``, ``alpha / size``."""
    x = x.double()
    sq = torch.nn.functional.pad(x * x, (0, 0) * (x.dim() - 2) + (size // 2, (size - 1) // 2))
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
    Op("batch_norm", lambda x: F.batch_norm(x, None, None, training=True), lambda x: nf.batch_norm(x, None, None, training=True),
       lambda x: reference(x, (0, 2, 3), 1e-5)),
    Op("instance_norm", F.instance_norm, nf.instance_norm, lambda x: reference(x, (2, 3), 1e-5)),
    Op("layer_norm", lambda x: F.layer_norm(x, x.shape[-2:]), lambda x: nf.layer_norm(x, x.shape[-2:]),
       lambda x: reference(x, (2, 3), 1e-5)),
    Op("group_norm", lambda x: F.group_norm(x, 4), lambda x: nf.group_norm(x, 4), lambda x: _grouped_reference(x, 4, 1e-5)),
    Op("rms_norm", lambda x: F.rms_norm(x, x.shape[-2:], eps=1e-6), lambda x: nf.rms_norm(x, x.shape[-2:], eps=1e-6),
       lambda x: reference(x, (2, 3), 1e-6, center=False)),
    Op("local_response_norm", lambda x: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0),
       lambda x: nf.local_response_norm(x, 5, 1e-4, 0.75, 2.0), lambda x: lrn_reference(x, 5, 1e-4, 0.75, 2.0)),
]

# (label, dtype, input maker): the failure modes of NUMERICS.md, plus a benign baseline per dtype
INPUTS = [
    ("unit normal", torch.float32, lambda g: torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("magnitude 1e19", torch.float32, lambda g: 1e19 * torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("magnitude 1e30", torch.float32, lambda g: 1e30 * torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("magnitude 1e-30", torch.float32, lambda g: 1e-30 * torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("offset 1e6 + N(0,1)", torch.float32, lambda g: 1e6 + torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("constant 1e7", torch.float32, lambda g: torch.full(SHAPE, 1e7, dtype=torch.float64)),
    ("unit normal", torch.float16, lambda g: torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("offset 3e4 + N(0,64)", torch.float16, lambda g: 3e4 + 64 * torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("magnitude 6e4", torch.float16, lambda g: 6e4 * (2 * torch.rand(SHAPE, generator=g, dtype=torch.float64) - 1)),
    ("magnitude 1e30", torch.bfloat16, lambda g: 1e30 * torch.randn(SHAPE, generator=g, dtype=torch.float64)),
    ("magnitude 1e38", torch.bfloat16, lambda g: 1e38 * (2 * torch.rand(SHAPE, generator=g, dtype=torch.float64) - 1)),
]


@dataclass
class Row:
    op: str
    dtype: str
    input: str
    torch_error: float | None  # None: torch refused the input
    normkit_error: float
    tolerance: float

    @property
    def torch_ok(self) -> bool:
        return self.torch_error is not None and self.torch_error <= self.tolerance

    @property
    def normkit_ok(self) -> bool:
        return self.normkit_error <= self.tolerance


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|`` over finite references; ``inf`` if out is non-finite where ref is finite."""
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.isfinite(out[finite]).all():
        return float("inf")
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    err = (out[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    return err / scale if scale else err


def run(ops=None, dtypes=None, seed: int = 0) -> list[Row]:
    """Run every (op, input) case, optionally restricted to op names and dtypes."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for label, dtype, make in INPUTS:
        if dtypes and dtype not in dtypes:
            continue
        x = make(g).to(dtype)
        for op in OPS:
            if ops and op.name not in ops:
                continue
            ref = op.reference(x)
            try:
                torch_error = relative_error(op.torch(x), ref)
            except RuntimeError:
                torch_error = None
            rows.append(Row(op.name, str(dtype).replace("torch.", ""), label, torch_error,
                            relative_error(op.normkit(x), ref), TOLERANCE[dtype]))
    return rows


def _fmt(err: float | None, ok: bool) -> str:
    if err is None:
        return "refused  FAIL"
    text = "non-finite" if err == float("inf") else f"{err:.1e}"
    return f"{text:>10}  {'ok' if ok else 'FAIL'}"


def report(rows: list[Row]) -> str:
    lines = [
        f"normkit check: torch {torch.__version__} vs normkit, forward, error = max|out - ref| / max|ref| "
        f"against a float64 reference",
        "",
        f"{'op':<20}{'dtype':<10}{'input':<22}{'torch':>16}{'normkit':>16}",
    ]
    for r in rows:
        lines.append(f"{r.op:<20}{r.dtype:<10}{r.input:<22}{_fmt(r.torch_error, r.torch_ok):>16}{_fmt(r.normkit_error, r.normkit_ok):>16}")
    torch_fail = sum(not r.torch_ok for r in rows)
    nk_fail = sum(not r.normkit_ok for r in rows)
    lines += ["", f"torch fails {torch_fail} of {len(rows)} cases; normkit fails {nk_fail}."]
    return "\n".join(lines)
