"""normkit.functional against torch.nn.functional: every rank, dtype and memory layout; outputs, input and
parameter gradients, running buffers over several steps; gradcheck/gradgradcheck; torch.func; and the
guarantee that no torch normalization kernel runs inside normkit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import normkit.functional as nf
from cases import OPS, run_normkit, run_oracle
from conftest import DTYPES, assert_matches_torch_or_oracle, assert_rel_close

# Awkward shapes on purpose: minimal, primes, unaligned, every rank each op takes.
SHAPES = {
    "batch_norm": [(3, 1), (5, 3), (3, 7, 5), (2, 6, 5, 4), (2, 3, 2, 3, 4), (2, 63, 21, 19)],
    "batch_norm_eval": [(1, 1), (5, 3), (3, 7, 5), (2, 6, 5, 4), (2, 3, 2, 3, 4)],
    "instance_norm": [(1, 1, 3), (3, 7, 5), (2, 6, 5, 4), (2, 3, 2, 3, 4), (2, 63, 21, 19)],
    "layer_norm": [(1,), (7,), (3, 7, 5), (2, 6, 5, 4), (2, 63, 21, 19)],
    "group_norm": [(2, 3), (3, 6, 5), (2, 6, 5, 4), (2, 3, 2, 3, 4), (2, 63, 21, 19)],
    "rms_norm": [(2,), (7,), (3, 7, 5), (2, 6, 5, 4), (2, 63, 21, 19)],
}
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, dtype, layout):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else None
    if layout == "strided":  # a non-contiguous view: every other element of a wider tensor
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def run_torch(op, x, p, dy):
    x = x.detach().clone().requires_grad_()
    leaves = {k: v.detach().clone().requires_grad_(k in op.grads) for k, v in p.items()}
    y = op.torch(x, leaves)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, **{f"d{k}": leaves[k].grad for k in op.grads}}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_parity_with_torch(op, dtype, layout):
    for shape in SHAPES[op.name]:
        x = make_input(shape, dtype, layout)
        if x is None:
            continue
        p = op.params(x, 1.0)
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)
        got, ref, exact = run_normkit(op, x, p, dy), run_torch(op, x, p, dy), run_oracle(op, x, p, dy)
        assert got["y"].dtype == dtype and got["y"].shape == x.shape
        assert got["y"].stride() == ref["y"].stride(), "output memory format differs from torch's"
        for key in ref:
            assert_matches_torch_or_oracle(got[key], ref[key], exact[key], dtype, f"{op.name} {shape} {layout}: {key}")


def test_empty_batch():
    """An empty batch gives an empty result and leaves the running statistics untouched."""
    for shape in [(0, 3), (0, 3, 4, 4)]:
        x = torch.randn(shape, requires_grad=True)
        rm, rv = torch.randn(3), torch.rand(3) + 0.5
        before = rm.clone(), rv.clone()
        y = nf.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), training=True)
        assert y.shape == x.shape
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
        y.sum().backward()
    for f in (lambda t: nf.layer_norm(t, (4,)), lambda t: nf.group_norm(t, 3),
              lambda t: nf.instance_norm(t), lambda t: nf.rms_norm(t, (4,))):
        assert f(torch.randn(0, 3, 4)).shape == (0, 3, 4)


def test_empty_normalized_shape_is_refused_as_torch_does():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="at least 1-dimensional"):
        F.layer_norm(x, ())
    for f in (nf.layer_norm, nf.rms_norm):
        with pytest.raises(ValueError, match="at least 1-dimensional"):
            f(x, ())


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_gradcheck_and_gradgradcheck(op):
    """Closed-form backward and double backward against finite differences, in float64."""
    shape = {"layer_norm": (3, 4, 5), "rms_norm": (3, 4, 5)}.get(op.name, (3, 6, 4))
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    p = op.params(x, 1.0)
    names = list(op.grads)
    params = [p[k].requires_grad_() for k in names]

    def f(x, *ps):
        return op.normkit(x, {**p, **dict(zip(names, ps))})

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_double_backward_matches_torch():
    """The gradient of a gradient norm (as in gradient penalties) equals torch's."""
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    results = []
    for f in (nf.group_norm, F.group_norm):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx,) = torch.autograd.grad((f(xg, 2, wg) ** 3).sum(), xg, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (xg, wg)))
    for a, b in zip(*results):
        assert_rel_close(a, b, torch.float64)


class TestTorchFunc:
    """The stateless forms compose with vmap, grad and jacrev (torch's batch norm cannot with running stats)."""

    def test_vmap_batch_norm_with_running_stats_equals_loop(self):
        xs = torch.randn(5, 8, 3, 4, dtype=torch.float64)
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

        def step(x):
            return nf.batch_norm_stateless(x, rm, rv, None, None, True, 0.1, 1e-5)

        ys, means, vars_ = torch.func.vmap(step)(xs)
        for i, x in enumerate(xs):
            y, m, v = step(x)
            assert_rel_close(ys[i], y, torch.float64)
            assert_rel_close(means[i], m, torch.float64)
            assert_rel_close(vars_[i], v, torch.float64)
            assert_rel_close(y, F.batch_norm(x, rm.clone(), rv.clone(), training=True), torch.float64)

    @pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
    def test_vmap_equals_loop(self, op):
        xs = torch.randn(3, 4, 6, 5, dtype=torch.float64)
        p = op.params(xs[0], 1.0)
        ys = torch.func.vmap(lambda x: op.normkit(x, p))(xs)
        for i in range(3):
            assert_rel_close(ys[i], op.normkit(xs[i], p), torch.float64)

    @pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
    def test_grad_and_jacrev_equal_autograd(self, op):
        x = torch.randn(2, 6, 3, dtype=torch.float64)
        p = op.params(x, 1.0)

        def loss(x):
            return (op.normkit(x, p) ** 3).sum()

        g = torch.func.grad(loss)(x)
        xg = x.clone().requires_grad_()
        loss(xg).backward()
        assert_rel_close(g, xg.grad, torch.float64, "grad")
        jac = torch.func.jacrev(lambda x: op.normkit(x, p))(x)
        ref = torch.autograd.functional.jacobian(lambda x: op.torch(x, p), x)
        assert_rel_close(jac, ref, torch.float64, "jacrev vs torch's jacobian")


FORBIDDEN = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm",
             "avg_pool", "max_pool")


class RecordOps(TorchDispatchMode):
    """Records every aten op that runs, and the dtypes of every tensor it produces."""

    def __init__(self):
        super().__init__()
        self.seen = set()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name())
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_no_torch_normalization_kernel_runs(op):
    """Forward, backward and double backward use only primitive ops: torch's kernels are the reference."""
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    p = op.params(x, 1.0)
    with RecordOps() as rec:
        y = op.normkit(x, p)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.sum().backward()
    used = sorted(name for name in rec.seen if any(f in name for f in FORBIDDEN))
    assert not used, f"torch normalization kernels ran inside normkit: {used}"
    assert any("sum" in name for name in rec.seen), "the recorder saw nothing: the guard itself is broken"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_no_float64_arithmetic_below_float64(op, dtype):
    """Graphs must run on accelerators without float64: forward, backward and double backward of a
    lower-precision input never produce a float64 tensor."""
    x = (torch.randn(3, 6, 4) * 1e3 + 5).to(dtype).requires_grad_()
    p = op.params(x, 1.0)
    with RecordOps() as rec:
        y = op.normkit(x, p)
        (gx,) = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
        gx.float().sum().backward()
    assert torch.float64 not in rec.dtypes, f"float64 tensors were made: ops {sorted(rec.seen)}"
    assert rec.dtypes, "the recorder saw nothing"


def test_the_kernel_guard_catches_torch():
    x = torch.randn(3, 6, 4, requires_grad=True)
    for f in (lambda: F.batch_norm(x, None, None, training=True), lambda: F.layer_norm(x, (4,)),
              lambda: F.group_norm(x, 3)):
        with RecordOps() as rec:
            f().sum().backward()
        assert any(name for name in rec.seen if any(k in name for k in FORBIDDEN)), rec.seen
