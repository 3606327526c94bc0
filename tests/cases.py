"""The tests' view of the one case registry (:mod:`normkit.check.cases`): its operators and inputs, plus the
independent extended-precision oracle (``oracle.py``) for each operator, gradients included.

The operators, their parameters, the adversarial inputs and the conformance conditions all live in the
package, where ``normkit check`` and the benchmarks read them too; this module only adds how to run an
operator with autograd and how to ask the oracle.
"""

from __future__ import annotations

from normkit.check.cases import (ADVERSARIAL, EPS_CASES, GRAD_SCALES, OPERATORS, Case, OpCase, adversarial_inputs,  # noqa: F401
                                 conformance_cases, num_groups, trailing_dims)

import oracle

OPS = [o for o in OPERATORS.values() if o.family == "stats"]  # the statistics-based ops (LRN has its own files)
OPS_BY_NAME = dict(OPERATORS)


def run_normkit(op: OpCase, x, p: dict, dy=None, eps=None):
    """Forward and (with dy) backward through normkit: dict with y, dx, d<param>."""
    x = x.detach().clone().requires_grad_(dy is not None)
    leaves = {k: v.detach().clone().requires_grad_(dy is not None and k in op.grads) for k, v in p.items()}
    y = op.normkit(x, leaves, eps)
    out = {"y": y.detach()}
    if dy is not None:
        y.backward(dy)
        out["dx"] = x.grad
        out.update({f"d{k}": leaves[k].grad for k in op.grads if k in leaves})
    return out


def run_oracle(op: OpCase, x, p: dict, dy=None, eps=None):
    """The oracle's y (and with dy: dx and the parameter gradients) for ``op`` on ``x``, in long double."""
    L = oracle.ld
    trailing = tuple(x.shape[-trailing_dims(x):])
    x, dy, eps = L(x), None if dy is None else L(dy), op.eps_or_default(eps)
    w, b = L(p.get("weight")), L(p.get("bias"))
    if op.name == "batch_norm":
        return oracle.batch_norm(x, w, b, dy, eps)
    if op.name == "batch_norm_eval":
        return oracle.batch_norm(x, w, b, dy, eps, L(p["running_mean"]), L(p["running_var"]))
    if op.name == "instance_norm":
        return oracle.instance_norm(x, w, b, dy, eps)
    if op.name == "layer_norm":
        return oracle.layer_norm(x, trailing, w, b, dy, eps)
    if op.name == "group_norm":
        return oracle.group_norm(x, num_groups(x.shape[1]), w, b, dy, eps)
    if op.name == "rms_norm":
        return oracle.rms_norm(x, trailing, w, dy, eps)
    if op.name == "local_response_norm":
        from normkit.check.cases import LRN

        n = LRN["size"]
        return oracle.lrn(x, (1,), n // 2, (n - 1) // 2, LRN["alpha"] / n, LRN["k"], LRN["beta"], dy)
    raise ValueError(f"no oracle for {op.name!r}")
