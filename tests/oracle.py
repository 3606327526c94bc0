"""An independent reference for every operator: the textbook formulas, in numpy extended precision.

On x86-64, ``np.longdouble`` has a 64-bit mantissa and a 15-bit exponent: the naive formulas
(two-pass mean and variance, no rescaling) neither lose precision nor overflow for any float64 input,
which makes it a float64 oracle for the float16/bfloat16/float32 inputs and an oracle for float64 itself.
Nothing here calls torch or normkit.
"""

from __future__ import annotations

import numpy as np

LD = np.longdouble
EXTENDED = np.finfo(LD).nmant >= 63  # x86-64 80-bit; elsewhere longdouble may be plain float64


def ld(t) -> np.ndarray:
    import torch

    if isinstance(t, torch.Tensor):
        return t.detach().double().cpu().numpy().astype(LD)
    return None if t is None else np.asarray(t, dtype=LD)


def standardize(x, axes, eps, center=True):
    """(x_hat, rstd) over ``axes``: rstd = 1/sqrt(var + eps) (or of the mean square without centring)."""
    if center:
        # Subtracting one of the group's own values first is exact in long double for float64 data, and
        # keeps the offset from eating the 64-bit mantissa (offset 1e15 over unit noise leaves 14 bits).
        d = x - x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
        c = d - d.mean(axis=axes, keepdims=True)
    else:
        c = x
    with np.errstate(divide="ignore", invalid="ignore"):  # eps=0 on a constant group: 0/0, no answer
        rstd = 1 / np.sqrt((c * c).mean(axis=axes, keepdims=True) + LD(eps))
        return c * rstd, rstd


def standardize_grad(dy_w, x_hat, rstd, axes, center=True):
    """dx of standardize given g = dL/dx_hat: rstd * (g - mean(g) - x_hat * mean(g * x_hat))."""
    t = dy_w - x_hat * (dy_w * x_hat).mean(axis=axes, keepdims=True)
    if center:
        t = t - dy_w.mean(axis=axes, keepdims=True)
    return rstd * t


def _reduce_to(t, shape):
    """Sum ``t`` over the axes that ``shape`` broadcasts (numpy's sum_to_size)."""
    lead = t.ndim - len(shape)
    t = t.sum(axis=tuple(range(lead))) if lead else t
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(axis=axes, keepdims=True).reshape(shape)


def affine_norm(x, axes, eps, weight, bias, dy, center=True, wshape=None):
    """Forward and gradients of ``standardize(x) * weight + bias``: dict with y, dx, dweight, dbias."""
    x_hat, rstd = standardize(x, axes, eps, center)
    w = 1 if weight is None else weight.reshape(wshape)
    b = 0 if bias is None else bias.reshape(wshape)
    out = {"y": x_hat * w + b}
    if dy is not None:
        out["dx"] = standardize_grad(dy * w, x_hat, rstd, axes, center)
        if weight is not None:
            out["dweight"] = _reduce_to(dy * x_hat, wshape).reshape(weight.shape)
        if bias is not None:
            out["dbias"] = _reduce_to(dy, wshape).reshape(bias.shape)
    return out


def batch_norm(x, weight, bias, dy, eps, running_mean=None, running_var=None):
    """Training mode when no running statistics are given, eval mode otherwise."""
    wshape = (1, -1) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    if running_mean is None:
        return affine_norm(x, axes, eps, weight, bias, dy, True, wshape)
    rstd = 1 / np.sqrt(running_var.reshape(wshape) + LD(eps))
    x_hat = (x - running_mean.reshape(wshape)) * rstd
    w = 1 if weight is None else weight.reshape(wshape)
    out = {"y": x_hat * w + (0 if bias is None else bias.reshape(wshape))}
    if dy is not None:
        out["dx"] = dy * w * rstd
        if weight is not None:
            out["dweight"] = _reduce_to(dy * x_hat, wshape).reshape(weight.shape)
        if bias is not None:
            out["dbias"] = _reduce_to(dy, wshape).reshape(bias.shape)
    return out


def instance_norm(x, weight, bias, dy, eps):
    wshape = (1, -1) + (1,) * (x.ndim - 2)
    return affine_norm(x, tuple(range(2, x.ndim)), eps, weight, bias, dy, True, wshape)


def layer_norm(x, normalized_shape, weight, bias, dy, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    return affine_norm(x, axes, eps, weight, bias, dy, True, tuple(normalized_shape))


def rms_norm(x, normalized_shape, weight, dy, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    return affine_norm(x, axes, eps, weight, None, dy, False, tuple(normalized_shape))


def group_norm(x, num_groups, weight, bias, dy, eps):
    n, c = x.shape[:2]
    xs = x.reshape(n, num_groups, c // num_groups, -1)
    dys = None if dy is None else dy.reshape(xs.shape)
    out = affine_norm(xs, (2, 3), eps, weight, bias, dys, True, (1, num_groups, c // num_groups, 1))
    for key in ("y", "dx"):
        if key in out:
            out[key] = out[key].reshape(x.shape)
    return out


def _shift(a, axis, offset):
    """out[i] = a[i + offset] along axis, zero outside."""
    out = np.zeros_like(a)
    n = a.shape[axis]
    if abs(offset) >= n:
        return out
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis] = slice(max(0, offset), n + min(0, offset))
    dst[axis] = slice(max(0, -offset), n - max(0, offset))
    out[tuple(dst)] = a[tuple(src)]
    return out


def lrn(x, axes, lo, hi, c, k, beta, dy=None, terms=False):
    """Local response normalization with an explicit window [i - lo, i + hi] along each of ``axes``:
    y = x * (k + c * sum x**2)**-beta, and (with dy) the closed-form dx written with explicit loops; with
    ``terms``, also ``dx_terms``: the sum of the magnitudes of dx's two terms (the scale its rounding is judged on)."""
    import itertools

    offsets = list(itertools.product(range(-lo, hi + 1), repeat=len(axes)))

    def window(a, sign):
        total = np.zeros_like(a)
        for off in offsets:
            t = a
            for axis, o in zip(axes, off):
                t = _shift(t, axis, sign * o)
            total = total + t
        return total

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = LD(k) + LD(c) * window(x * x, 1)
        y = x * d ** LD(-beta)
        out = {"y": y}
        if dy is not None:
            q = dy * x * d ** LD(-beta - 1)
            out["dx"] = dy * d ** LD(-beta) - LD(2 * c * beta) * x * window(q, -1)
            if terms:  # |first term| + |second term|: where they nearly cancel (c x**2 >> k), no float evaluation
                # of the formula is more accurate than its rounding of these
                out["dx_terms"] = np.abs(dy * d ** LD(-beta)) + np.abs(LD(2 * c * beta) * x) * window(np.abs(q), -1)
    return out
