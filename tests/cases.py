"""One registry of operator cases, shared by the parity, robustness and conformance tests.

Each case knows how to make its parameters for an input, how to call normkit and torch, and how to ask
the extended-precision oracle. Parameters are made in the input's dtype (as torch's CPU kernels want).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import normkit.functional as nf

import oracle

EPS = 1e-5


def _uniform(shape, lo, hi, dtype):
    return (torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _channel_params(x, running=False, scale=1.0):
    c = x.shape[1]
    p = {"weight": _uniform((c,), 0.5, 1.5, x.dtype), "bias": _uniform((c,), -0.5, 0.5, x.dtype)}
    if running:
        top = torch.finfo(x.dtype).max
        p["running_mean"] = _uniform((c,), -scale, scale, x.dtype)
        p["running_var"] = _uniform((c,), 0.5, 2.0, torch.float64).mul(min(scale * scale, top / 4)).to(x.dtype)
    return p


def _trailing_params(x, nd, bias=True):
    shape = tuple(x.shape[-nd:])
    p = {"weight": _uniform(shape, 0.5, 1.5, x.dtype)}
    if bias:
        p["bias"] = _uniform(shape, -0.5, 0.5, x.dtype)
    return p


@dataclass(frozen=True)
class OpCase:
    name: str
    min_dim: int
    params: Callable  # (x, scale) -> dict of tensors
    normkit: Callable  # (x, p) -> y
    torch: Callable  # (x, p) -> y
    oracle: Callable  # (x_ld, p_ld, dy_ld) -> dict(y, dx, dweight, dbias)
    grads: tuple = ("weight", "bias")  # parameters that receive gradients


def _ln_nd(x):
    return 2 if x.dim() >= 3 else 1


OPS = [
    OpCase(
        "batch_norm_train", 2,
        lambda x, s: _channel_params(x),
        lambda x, p: nf.batch_norm(x, None, None, p["weight"], p["bias"], True, 0.1, EPS),
        lambda x, p: F.batch_norm(x, None, None, p["weight"], p["bias"], True, 0.1, EPS),
        lambda x, p, dy: oracle.batch_norm(x, p["weight"], p["bias"], dy, EPS),
    ),
    OpCase(
        "batch_norm_eval", 2,
        lambda x, s: _channel_params(x, running=True, scale=s),
        lambda x, p: nf.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, 0.1, EPS),
        lambda x, p: F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, 0.1, EPS),
        lambda x, p, dy: oracle.batch_norm(x, p["weight"], p["bias"], dy, EPS, p["running_mean"], p["running_var"]),
    ),
    OpCase(
        "instance_norm", 3,
        lambda x, s: _channel_params(x),
        lambda x, p: nf.instance_norm(x, weight=p["weight"], bias=p["bias"], eps=EPS),
        lambda x, p: F.instance_norm(x, weight=p["weight"], bias=p["bias"], eps=EPS),
        lambda x, p, dy: oracle.instance_norm(x, p["weight"], p["bias"], dy, EPS),
    ),
    OpCase(
        "layer_norm", 1,
        lambda x, s: _trailing_params(x, _ln_nd(x)),
        lambda x, p: nf.layer_norm(x, p["weight"].shape, p["weight"], p["bias"], EPS),
        lambda x, p: F.layer_norm(x, p["weight"].shape, p["weight"], p["bias"], EPS),
        lambda x, p, dy: oracle.layer_norm(x, p["weight"].shape, p["weight"], p["bias"], dy, EPS),
    ),
    OpCase(
        "group_norm", 2,
        lambda x, s: _channel_params(x),
        lambda x, p: nf.group_norm(x, 3, p["weight"], p["bias"], EPS),
        lambda x, p: F.group_norm(x, 3, p["weight"], p["bias"], EPS),
        lambda x, p, dy: oracle.group_norm(x, 3, p["weight"], p["bias"], dy, EPS),
    ),
    OpCase(
        "rms_norm", 1,
        lambda x, s: _trailing_params(x, _ln_nd(x), bias=False),
        lambda x, p: nf.rms_norm(x, p["weight"].shape, p["weight"], EPS),
        lambda x, p: F.rms_norm(x, p["weight"].shape, p["weight"], EPS),
        lambda x, p, dy: oracle.rms_norm(x, p["weight"].shape, p["weight"], dy, EPS),
        grads=("weight",),
    ),
]
OPS_BY_NAME = {op.name: op for op in OPS}


def run_normkit(op: OpCase, x: torch.Tensor, p: dict, dy: torch.Tensor | None):
    """Forward and (with dy) backward through normkit: dict with y, dx, d<param>."""
    x = x.detach().clone().requires_grad_(dy is not None)
    leaves = {k: v.detach().clone().requires_grad_(dy is not None and k in op.grads) for k, v in p.items()}
    y = op.normkit(x, leaves)
    out = {"y": y.detach()}
    if dy is not None:
        y.backward(dy)
        out["dx"] = x.grad
        out.update({f"d{k}": leaves[k].grad for k in op.grads})
    return out


def run_oracle(op: OpCase, x, p, dy):
    return op.oracle(oracle.ld(x), {k: oracle.ld(v) for k, v in p.items()}, None if dy is None else oracle.ld(dy))
