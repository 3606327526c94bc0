"""The operator sweep: every (op, input) case through torch's op and normkit's, scored against the float64
reference, and summarized per (op, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .cases import OPS, TOLERANCE, Input, dtype_name, inputs
from .errors import nonfinite_count, relative_error


@dataclass
class Row:
    """One (op, input) case. ``*_error`` is ``max|out - ref| / max|ref|`` (``inf``: a non-finite output
    where the reference is finite); ``torch_error`` is None when torch refused the input."""

    op: str
    dtype: str
    input: str
    torch_error: float | None
    normkit_error: float
    tolerance: float
    magnitude: float | None = None
    torch_nonfinite: int = 0
    normkit_nonfinite: int = 0
    torch_refusal: str | None = None

    @property
    def torch_ok(self) -> bool:
        return self.torch_error is not None and self.torch_error <= self.tolerance

    @property
    def normkit_ok(self) -> bool:
        return self.normkit_error <= self.tolerance


@dataclass
class Summary:
    """Per (op, dtype): the largest grid magnitude up to which every magnitude passes (None: not even the
    smallest), the worst errors over every input, non-finite output counts, and failing cases."""

    op: str
    dtype: str
    torch_ok_up_to: float | None
    normkit_ok_up_to: float | None
    top: float
    torch_worst: float | None
    normkit_worst: float
    torch_nonfinite: int
    normkit_nonfinite: int
    cases: int
    torch_failures: list[str] = field(default_factory=list)
    normkit_failures: list[str] = field(default_factory=list)
    torch_refused: bool = False

    @property
    def normkit_ok(self) -> bool:
        return not self.normkit_failures


def _case(op, inp: Input, x: torch.Tensor) -> Row:
    ref = op.reference(x)
    refusal = None
    try:
        out = op.torch(x)
        torch_error, torch_nf = relative_error(out, ref), nonfinite_count(out, ref)
    except Exception as e:  # torch refuses e.g. half LRN on CPU; any exception type counts as a refusal
        torch_error, torch_nf, refusal = None, 0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out = op.normkit(x)
    return Row(op.name, dtype_name(inp.dtype), inp.label, torch_error, relative_error(out, ref), TOLERANCE[inp.dtype],
               inp.magnitude, torch_nf, nonfinite_count(out, ref), refusal)


def run(ops=None, dtypes=None, seed: int = 0, cases: list[Input] | None = None, fast: bool = False,
        progress: Callable[[int], None] | None = None) -> list[Row]:
    """Run every (op, input) case, optionally restricted to op names and dtypes. ``cases`` defaults to the
    full sweep (:func:`normkit.check.cases.inputs`); each input is drawn once from ``seed`` and fed to
    every op. ``progress(n)`` is called after each op evaluation."""
    cases = inputs(dtypes, fast) if cases is None else [c for c in cases if not dtypes or c.dtype in dtypes]
    rows = []
    g = torch.Generator().manual_seed(seed)
    for inp in cases:
        x = inp.make(g).to(inp.dtype)
        for op in OPS:
            if ops and op.name not in ops:
                continue
            rows.append(_case(op, inp, x))
            if progress:
                progress(1)
    return rows


def count(ops=None, dtypes=None, fast: bool = False) -> int:
    """How many op evaluations :func:`run` will make (for a progress bar)."""
    return len(inputs(dtypes, fast)) * len([o for o in OPS if not ops or o.name in ops])


def _ok_up_to(rows: list[Row], ok: Callable[[Row], bool]) -> float | None:
    best = None
    for r in sorted((r for r in rows if r.magnitude is not None), key=lambda r: r.magnitude):
        if not ok(r):
            break
        best = r.magnitude
    return best


def summarize(rows: list[Row]) -> list[Summary]:
    """One :class:`Summary` per (op, dtype), in the order they first appear."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.dtype), []).append(r)
    out = []
    for (op, dtype), rs in groups.items():
        computed = [r.torch_error for r in rs if r.torch_error is not None]
        out.append(Summary(
            op, dtype, _ok_up_to(rs, lambda r: r.torch_ok), _ok_up_to(rs, lambda r: r.normkit_ok),
            torch.finfo(getattr(torch, dtype)).max,
            max(computed) if computed else None, max(r.normkit_error for r in rs),
            sum(r.torch_nonfinite for r in rs), sum(r.normkit_nonfinite for r in rs), len(rs),
            [r.input for r in rs if not r.torch_ok], [r.input for r in rs if not r.normkit_ok],
            any(r.torch_error is None for r in rs)))
    return out
