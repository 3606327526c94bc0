"""How ``normkit check`` scores an output against its float64 reference."""

from __future__ import annotations

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
