"""Forward-mode AD on every statistics op: ``torch.func.jvp``, ``jacfwd``, ``hessian`` and
``torch.autograd.forward_ad`` dual tensors, against reverse mode (``jacrev``, double backward), in float64
on small shapes -- for each op with and without weight/bias, batch norm in training and in eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import normkit.functional as nf
from conftest import assert_rel_close

D = torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    param_shape: tuple | None  # weight/bias shape; None: no parameters
    call: Callable  # (lib, x, weight, bias) -> y
    bias: bool = True


def _running(c):
    g = torch.Generator().manual_seed(7)
    return torch.randn(c, generator=g, dtype=D) * 0.3, torch.rand(c, generator=g, dtype=D) + 0.5


RM, RV = _running(4)

CASES = []
for affine in (True, False):
    tag = "affine" if affine else "plain"
    ps = (4,) if affine else None
    CASES += [
        Case(f"batch_norm_train-{tag}", (3, 4, 2), ps, lambda L, x, w, b: L.batch_norm(x, None, None, w, b, True)),
        Case(f"batch_norm_eval-{tag}", (3, 4, 2), ps, lambda L, x, w, b: L.batch_norm(x, RM, RV, w, b, False)),
        Case(f"instance_norm-{tag}", (2, 4, 3), ps, lambda L, x, w, b: L.instance_norm(x, weight=w, bias=b)),
        Case(f"group_norm-{tag}", (2, 4, 3), ps, lambda L, x, w, b: L.group_norm(x, 2, w, b)),
        Case(f"layer_norm-{tag}", (3, 2, 4), (2, 4) if affine else None, lambda L, x, w, b: L.layer_norm(x, (2, 4), w, b)),
        Case(f"rms_norm-{tag}", (3, 2, 4), (2, 4) if affine else None, lambda L, x, w, b: L.rms_norm(x, (2, 4), w), bias=False),
    ]
CASES.append(Case("layer_norm-weight-only", (3, 5), (5,), lambda L, x, w, b: L.layer_norm(x, (5,), w, None), bias=False))


def _inputs(case):
    x = torch.randn(case.shape, dtype=D) * 1.5 + 0.3
    if case.param_shape is None:
        return (x,)
    w = torch.rand(case.param_shape, dtype=D) + 0.5
    return (x, w, torch.randn(case.param_shape, dtype=D)) if case.bias else (x, w)


def _fn(case, lib=nf):
    def f(x, w=None, b=None):
        return case.call(lib, x, w, b)

    return f


ids = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_jvp_equals_jacobian_times_tangent(case):
    """torch.func.jvp against torch's own op's Jacobian (reverse mode, float64) applied to the tangent."""
    args = _inputs(case)
    tangents = tuple(torch.randn_like(a) for a in args)
    y, ty = torch.func.jvp(_fn(case), args, tangents)
    ref_y, ref_ty = torch.func.jvp(_fn(case, F), args, tangents)
    assert_rel_close(y, ref_y, D, "output")
    assert_rel_close(ty, ref_ty, D, "tangent")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_jacfwd_equals_jacrev(case):
    args = _inputs(case)
    argnums = tuple(range(len(args)))
    fwd = torch.func.jacfwd(_fn(case), argnums=argnums)(*args)
    rev = torch.func.jacrev(_fn(case), argnums=argnums)(*args)
    for i, (a, b) in enumerate(zip(fwd, rev)):
        assert_rel_close(a, b, D, f"d y / d arg{i}")


def _double_backward_hessian(f, args):
    """The Hessian blocks ``H[i][j] = d2 f / d args[i] d args[j]`` of a scalar f, row by row from double backward."""
    leaves = [a.clone().requires_grad_() for a in args]
    grads = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    blocks = []
    for a, g in zip(args, grads):
        rows = [torch.autograd.grad(gi, leaves, retain_graph=True, allow_unused=True) for gi in g.flatten()]
        blocks.append([torch.stack([r[j] if r[j] is not None else torch.zeros_like(b) for r in rows]).reshape(*a.shape, *b.shape)
                       for j, b in enumerate(args)])
    return blocks


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_hessian_equals_double_backward(case):
    """hessian (forward over reverse) and jacrev(jacfwd) (reverse over forward) against double backward, every
    block (input, weight, bias). torch 2.13's own functorch hessian of F.batch_norm in training gets the
    d2/(dweight dx) block wrong (off by ~14 against finite differences); normkit's agrees with both."""
    args = _inputs(case)
    dy = torch.randn(case.shape, dtype=D)

    def loss(*args):
        return (_fn(case)(*args) ** 3 * dy).sum()

    ref = _double_backward_hessian(loss, args)
    argnums = tuple(range(len(args)))
    for name, hess in (("hessian (jacfwd(jacrev))", torch.func.hessian(loss, argnums=argnums)(*args)),
                       ("jacrev(jacfwd)", torch.func.jacrev(torch.func.jacfwd(loss, argnums=argnums), argnums=argnums)(*args))):
        for i, j in ((i, j) for i in argnums for j in argnums):
            assert_rel_close(hess[i][j], ref[i][j], D, f"{name} block ({i}, {j})")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_forward_ad_dual_tensors(case):
    """torch.autograd.forward_ad: dual tensors in, the tangent out, as torch's op gives it."""
    args = _inputs(case)
    tangents = [torch.randn_like(a) for a in args]
    results = []
    for lib in (nf, F):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
            unpacked = fwAD.unpack_dual(_fn(case, lib)(*duals))
            results.append((unpacked.primal.clone(), unpacked.tangent.clone()))
    (y, ty), (ref_y, ref_ty) = results
    assert_rel_close(y, ref_y, D, "primal")
    assert_rel_close(ty, ref_ty, D, "tangent")


def test_forward_ad_through_backward():
    """Reverse over forward with plain autograd: a dual tensor whose primal requires grad."""
    x = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    t = torch.randn(3, 4, 5, dtype=D)
    grads = []
    for lib in (nf, F):
        with fwAD.dual_level():
            ty = fwAD.unpack_dual(lib.group_norm(fwAD.make_dual(x, t), 2)).tangent
            grads.append(torch.autograd.grad((ty ** 2).sum(), x)[0])
    assert_rel_close(grads[0], grads[1], D, "d |J t|^2 / dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_jvp_keeps_dtypes(dtype):
    """Tangents come back in the input's dtype, computed in float32 for bfloat16."""
    x = torch.randn(3, 4, 5, dtype=dtype)
    w = torch.rand(5, dtype=dtype) + 0.5
    y, ty = torch.func.jvp(lambda x, w: nf.layer_norm(x, (5,), w), (x, w), (torch.ones_like(x), torch.ones_like(w)))
    assert y.dtype == ty.dtype == dtype
    _, ref = torch.func.jvp(lambda x, w: nf.layer_norm(x, (5,), w), (x.double(), w.double()),
                            (torch.ones_like(x, dtype=D), torch.ones_like(w, dtype=D)))
    assert_rel_close(ty, ref, dtype, "tangent")


@pytest.mark.parametrize("dual", ["input", "weight", "none"])
def test_one_dual_argument_inside_a_dual_level(dual):
    """Inside ``fwAD.dual_level()`` a call whose arguments carry no tangent takes the kernels (the routing
    cache refuses only dual tensors); one dual argument -- the input or only the weight -- gives torch's
    tangent. float32: float64 is served by the eager path."""
    from normkit import _native

    x = torch.randn(3, 4, 5, dtype=torch.float32)
    w = torch.rand(5, dtype=torch.float32) + 0.5
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    results = []
    for lib in (nf, F):
        with fwAD.dual_level(), _native.recording() as paths:
            xs = fwAD.make_dual(x, tx) if dual == "input" else x
            ws = fwAD.make_dual(w, tw) if dual == "weight" else w
            out = fwAD.unpack_dual(lib.layer_norm(xs, (5,), ws))
            results.append((out.primal.clone(), out.tangent))
            if lib is nf:
                path = " ".join(paths.values())
    (y, ty), (ref_y, ref_ty) = results
    assert_rel_close(y, ref_y, torch.float32, "primal")
    if dual == "none":
        assert ty is None and ref_ty is None
        if _native.serving:
            assert path.startswith("native"), path
    else:
        assert_rel_close(ty, ref_ty, torch.float32, "tangent")
        assert path.startswith("eager"), path
