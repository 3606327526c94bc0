"""How ``normkit check`` scores an output against its float64 reference, and how it prints numbers."""

from __future__ import annotations

import math
import re

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|`` over finite references; ``inf`` if out is non-finite where ref is finite."""
    out, ref = out.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    all_finite = bool(finite.all())
    if not all_finite:  # compare only where the reference is finite (masked with where: no copies)
        if bool((finite & ~torch.isfinite(out)).any()):
            return float("inf")
        out, ref = torch.where(finite, out, 0.0), torch.where(finite, ref, 0.0)
    elif not bool(torch.isfinite(out).all()):
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    return err / scale if scale else err


def nonfinite_count(out: torch.Tensor, ref: torch.Tensor) -> int:
    """How many outputs are NaN or infinite where the reference is finite."""
    return int((torch.isfinite(ref) & ~torch.isfinite(out.detach())).sum().item())


def absmax(t: torch.Tensor) -> float:
    """The largest finite ``|t|`` (0 for none)."""
    if t.numel() == 0:
        return 0.0
    if bool(torch.isfinite(t).all()):
        return t.abs().max().item()
    return torch.where(torch.isfinite(t), t.abs(), 0).max().item()


# ------------------------------------------------------------------------------------------- printing
def _compact(text: str) -> str:
    """``2.5e-07`` -> ``2.5e-7``, ``1e+20`` -> ``1e20``, ``1.0e+00`` -> ``1.0``."""
    text = re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)
    return text[:-2] if text.endswith("e0") else text


def num(v: float) -> str:
    """A scale or magnitude: ``1``, ``100``, ``1e4``, ``65504``, ``3.4e38``."""
    if v == int(v) and (v < 1e3 or (v < 1e5 and not str(int(v)).endswith("000"))):
        return str(int(v))
    return _compact(f"{v:.1e}".replace(".0e", "e"))


def fmt_err(e: float | None) -> str:
    """An error in a table: two digits (``2.3e-7``), ``non-finite``, or ``-`` for none."""
    if e is None:
        return "-"
    return "non-finite" if not math.isfinite(e) else _compact(f"{e:.1e}")


def num_err(e: float) -> str:
    """An error in a sentence: one digit (``2e-7``)."""
    return _compact(f"{e:.0e}")
