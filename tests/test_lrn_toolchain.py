"""Local response normalization inside torch's tool chain: torch.func (vmap, grad, jacrev, jvp, jacfwd,
hessian), torch.export, torch.compile, fx, meta tensors, ONNX export run by ONNX Runtime, and autocast.

Every entry point is tested in the fast path (``k = 1``: the eager check proves the plain formula safe) and
in the robust path (``k = 0``, or ``beta > 1.25`` for Caffe's within-channel form, which ignores ``k``).
While traced, the op must not read values back to the host; the robust branch-free path then runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

import normkit.functional as nf
import normkit.nn as nnk
from conftest import REL_TOL, assert_rel_close, needs_native
from normkit.ops import local_response_norm as L


def _entries(robust: bool) -> dict:
    k = 0.0 if robust else 1.0
    return {
        "local_response_norm": lambda t: nf.local_response_norm(t, 3, 0.5, 0.75, k),
        "lrn torch even": lambda t: nf.lrn(t, 4, 0.5, 0.75, k),
        "lrn onnx even": lambda t: nf.lrn(t, 4, 0.5, 0.6, k, convention="onnx"),
        "lrn caffe": lambda t: nf.lrn(t, 3, 0.5, 0.75, k, convention="caffe"),
        "lrn tf channels last": lambda t: nf.lrn(t, 3, 0.5, 0.5, k, convention="tf", channel_dim=-1),
        "lrn caffe within_channel": lambda t: nf.lrn(t, 3, 0.5, 1.5 if robust else 0.75, convention="caffe",
                                                     region="within_channel"),
        "tf_local_response_normalization": lambda t: nf.tf_local_response_normalization(t, 1, k, 0.5, 0.75),
        "nn.LocalResponseNorm onnx": nnk.LocalResponseNorm(3, 0.5, 0.75, k, convention="onnx"),
    }


NAMES = list(_entries(False))
PATHS = [False, True]
PATH_IDS = ["fast", "robust"]


def entry(name: str, robust: bool):
    return _entries(robust)[name]


class AllEntries(torch.nn.Module):
    """A model calling every entry point on its input (the nn module registered as a submodule)."""

    def __init__(self, robust: bool = False, names=NAMES):
        super().__init__()
        self.fs = [_entries(robust)[name] for name in names]
        self.modules_ = torch.nn.ModuleList(f for f in self.fs if isinstance(f, torch.nn.Module))

    def forward(self, x):
        return tuple(f(x) for f in self.fs)


def jacobian_by_autograd(f, x):
    """The Jacobian row by row with plain reverse-mode autograd: the reference for torch.func."""
    xg = x.detach().clone().requires_grad_()
    y = f(xg)
    rows = [torch.autograd.grad(yi, xg, retain_graph=True)[0] for yi in y.flatten()]
    return torch.stack(rows).view(*y.shape, *x.shape)


# ----------------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("robust", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_vmap_matches_a_loop(name, robust):
    f = entry(name, robust)
    xb = torch.randn(3, 2, 5, 3, 4) * 2
    loop = torch.stack([f(xi) for xi in xb])
    assert_rel_close(vmap(f)(xb), loop, torch.float32, "vmap")
    assert_rel_close(vmap(f, in_dims=2, out_dims=1)(xb.movedim(0, 2)), loop.movedim(0, 1), torch.float32, "in_dims=2")
    nested = vmap(vmap(f))(xb.view(3, 1, 2, 5, 3, 4))
    assert_rel_close(nested.view_as(loop), loop, torch.float32, "nested vmap")


@pytest.mark.parametrize("robust", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_grad_and_jacrev_match_autograd(name, robust):
    f = entry(name, robust)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64) * 2
    w = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad((f(xg) * w).sum(), xg)
    assert_rel_close(torch.func.grad(lambda t: (f(t) * w).sum())(x), ref, torch.float64, "grad")
    assert_rel_close(jacrev(f)(x), jacobian_by_autograd(f, x), torch.float64, "jacrev")
    per_sample = vmap(torch.func.grad(lambda t, wi: (f(t[None]) * wi).sum()))(x.expand(2, 4, 3, 3), w.expand(2, 4, 3, 3))
    assert_rel_close(per_sample, ref.expand(2, 4, 3, 3), torch.float64, "per-sample grad (vmap of grad)")


@pytest.mark.parametrize("robust", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_ad(name, robust):
    """jvp against the autograd Jacobian, jacfwd == jacrev, hessian == double backward (float64)."""
    f = entry(name, robust)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64) * 2
    v = torch.randn_like(x)
    w = torch.randn_like(x)
    jac = jacobian_by_autograd(f, x)
    y, dy = jvp(f, (x,), (v,))
    assert_rel_close(y, f(x), torch.float64, "jvp primal")
    assert_rel_close(dy, (jac.view(x.numel(), x.numel()) @ v.flatten()).view_as(x), torch.float64, "jvp tangent")
    assert_rel_close(jacfwd(f)(x), jacrev(f)(x), torch.float64, "jacfwd vs jacrev")
    loss = lambda t: (f(t) * w).sum()  # noqa: E731
    assert_rel_close(hessian(loss)(x), torch.autograd.functional.hessian(loss, x), torch.float64, "hessian")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # plain forward-mode AD, outside torch.func
        dual_dy = fwAD.unpack_dual(f(fwAD.make_dual(x, v))).tangent
    assert_rel_close(dual_dy, dy, torch.float64, "forward_ad dual")


@pytest.mark.parametrize("mag", [1e-30, 1e20, 1e30, 1e38])
def test_jvp_robust_at_extreme_magnitudes(mag):
    """float32 jvp where x**2 over- or underflows, against the float64 jvp of the same rounded input."""
    for name in ("local_response_norm", "lrn caffe within_channel"):
        f = entry(name, robust=False)
        x = ((torch.rand(2, 6, 3, 3, dtype=torch.float64) * 2 - 1) * mag).float()
        v = ((torch.rand_like(x, dtype=torch.float64) * 2 - 1) * mag).float()
        _, dy = jvp(f, (x,), (v,))
        _, ref = jvp(f, (x.double(),), (v.double(),))
        assert_rel_close(dy, ref, torch.float32, f"{name} jvp at {mag:g}")


@needs_native
def test_vmap_hands_the_native_kernel_plain_tensors(monkeypatch):
    """A vmapped call runs the whole batch as one plain call: the fused kernel sees an ordinary tensor."""
    from normkit import _native

    kernel = _native.load("lrn_kernel")
    assert kernel is not None, _native.status()
    seen = []

    class Recording:
        def lrn_forward(self, x, *args):
            seen.append(torch._C._functorch.is_functorch_wrapped_tensor(x))
            return kernel.lrn_forward(x, *args)

    monkeypatch.setattr(_native, "load", lambda name: Recording())
    xb = torch.randn(2, 2, 20, 40, 41)
    assert xb[0].numel() >= L.NATIVE_MIN_NUMEL
    f = lambda t: nf.local_response_norm(t, 5, 1e-2, 0.75, 1.0)  # noqa: E731
    got = vmap(f)(xb)
    assert seen == [False], seen
    loop = torch.stack([f(xi) for xi in xb])
    assert_rel_close(got, loop, torch.float32, "vmap through the native kernel")
    assert_rel_close(got, F.local_response_norm(xb.flatten(0, 1), 5, 1e-2, 0.75, 1.0).view_as(xb), torch.float32,
                     "vs torch", rel=REL_TOL[torch.float32])


# ------------------------------------------------------------------------- export, compile, fx, meta
def _no_host_sync(graph: torch.fx.Graph):
    names = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    synced = [n for n in names if "local_scalar_dense" in n or "aminmax" in n or "item" in n]
    assert not synced, synced


def test_torch_export_every_entry_point():
    """One exported program for every entry point, the branch-free robust graph: exact at scale 1 and at
    1e20, where the plain formula would overflow. (Train and eval mode are the same for LRN: the module
    is exported in both, with dynamic batch and spatial sizes.)"""
    model = AllEntries().eval()
    x = torch.randn(2, 5, 3, 4)
    ep = torch.export.export(model, (x,))
    _no_host_sync(ep.graph)
    for scale in (1.0, 1e20):
        xs = x * scale
        for name, got, ref in zip(NAMES, ep.module()(xs), model(xs.double())):
            assert_rel_close(got, ref, torch.float32, f"exported {name} at {scale:g}")
    module = nnk.LocalResponseNorm(3, 0.5, 0.75, 0.0, convention="caffe")
    dims = ({0: torch.export.Dim("batch"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")},)
    other = torch.randn(3, 5, 7, 2)  # another batch and spatial size: the shapes are symbolic
    for training in (True, False):
        ep = torch.export.export(module.train(training), (x,), dynamic_shapes=dims)
        _no_host_sync(ep.graph)
        assert_rel_close(ep.module()(other * 1e30), module(other.double() * 1e30), torch.float32, f"training={training}")


def test_make_fx_and_fake_tensors_do_not_sync():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 5, 3, 4)
    f = entry("local_response_norm", robust=False)
    gm = make_fx(f)(x)  # real tensors under a tracing mode: no .item() baked in
    _no_host_sync(gm.graph)
    assert_rel_close(gm(x * 1e20), f(x.double() * 1e20), torch.float32, "make_fx graph at 1e20")
    with FakeTensorMode() as mode:
        outs = AllEntries()(mode.from_tensor(x))
    assert all(o.shape == x.shape for o in outs)


def test_torch_compile_fullgraph():
    """fullgraph=True (no graph break, no host sync): every entry point forward, one forward and backward
    through AOTAutograd."""
    model = AllEntries()
    x = torch.randn(2, 5, 3, 4)
    for scale in (1.0, 1e20):
        for name, got, ref in zip(NAMES, torch.compile(model, fullgraph=True, backend="eager")(x * scale),
                                  model(x.double() * scale)):
            assert_rel_close(got, ref, torch.float32, f"compiled {name} at {scale:g}")
    f = entry("lrn tf channels last", robust=False)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    w = torch.randn(2, 5, 3, 4)
    for scale in (1.0, 1e20):
        xs = (x * scale).requires_grad_()
        (dx,) = torch.autograd.grad((compiled(xs) * w).sum(), xs)
        xd = xs.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad((f(xd) * w).sum(), xd)
        assert_rel_close(dx, ref, torch.float32, f"compiled backward at {scale:g}")


def test_torch_compile_graph_holds_one_op_per_call():
    """Dynamo records each entry point as one ``normkit::local_response_norm`` node (run at call time by the
    eager code: the cheap check and the native kernel), not the traced robust decomposition."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = AllEntries()
    x = torch.randn(2, 5, 3, 4)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.normkit.local_response_norm.default) == len(NAMES)
    assert not {torch.where, torch.frexp, torch.log2} & set(targets)
    for name, got, ref in zip(NAMES, out, model(x)):
        assert torch.equal(got, ref), name


@pytest.mark.parametrize("robust", PATHS, ids=["fast", "robust"])
def test_custom_op_registration(robust):
    """torch.library.opcheck: schema, fake kernel, autograd registration and dispatch of both ops."""
    k = 0.0 if robust else 1.0
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    torch.library.opcheck(L.lrn_op, (x, [1], 1, 1, 0.5, k, 0.75))
    torch.library.opcheck(L.lrn_backward_op, (torch.randn(2, 5, 3, 4), x.detach(), [1], 1, 1, 0.5, k, 0.75))


def test_torch_compile_vmap():
    """vmap inside a compiled function reaches the op's vmap rule: the batch joins the op's leading dims."""
    f = entry("local_response_norm", robust=False)
    xs = torch.randn(3, 2, 5, 3, 4)
    got = torch.compile(vmap(f), fullgraph=True, backend="eager")(xs * 1e20)
    assert_rel_close(got, vmap(f)(xs.double() * 1e20), torch.float32, "compiled vmap")


def test_torch_compile_inductor():
    """The default backend (inductor) compiles a model around the op, and it runs."""
    compiled = torch.compile(nnk.LocalResponseNorm(3, 1e-4, 0.75, 2.0), fullgraph=True)
    x = torch.randn(2, 6, 3, 4)
    with torch.no_grad():
        assert_rel_close(compiled(x * 1e20), nf.local_response_norm(x.double() * 1e20, 3, 1e-4, 0.75, 2.0), torch.float32)


def test_fx_symbolic_trace():
    """Each entry point is one call_function node (dispatched through __torch_function__ from the Proxy)."""
    model = AllEntries()
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {nf.local_response_norm, nf.lrn, nf.tf_local_response_normalization} <= targets
    x = torch.randn(2, 5, 3, 4)
    for name, got, ref in zip(NAMES, gm(x), model(x)):
        assert torch.equal(got, ref), name
    nn_gm = torch.fx.symbolic_trace(nnk.LocalResponseNorm(3, convention="caffe"))
    assert torch.equal(nn_gm(x), nf.lrn(x, 3, convention="caffe"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_meta_tensors(dtype):
    x = torch.randn(2, 5, 3, 4, device="meta", dtype=dtype, requires_grad=True)
    for name, y in zip(NAMES, AllEntries()(x)):
        assert (y.shape, y.dtype, y.device.type) == (x.shape, dtype, "meta"), name
        (dx,) = torch.autograd.grad(y.sum(), x)
        assert dx.shape == x.shape and dx.device.type == "meta", name


# ---------------------------------------------------------------------------------------- ONNX
ONNX_NAMES = ["local_response_norm", "lrn caffe within_channel", "tf_local_response_normalization"]


def test_onnx_export_runs_in_onnxruntime():
    """``torch.onnx.export(dynamo=True)``: no control flow, no float64 anywhere, and ONNX Runtime's float32
    results finite and within 1e-5 of float64 from subnormal inputs (1e-40) to the top of float32 (3e38). The entry points that differ in
    the graph (one window dimension, two, channels last); the others differ only in constants."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    x = torch.randn(2, 5, 3, 4)
    model = AllEntries(names=ONNX_NAMES).eval()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    graph = program.model_proto.graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"If", "Loop", "Scan"}, ops
    elem_types = {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    elem_types |= {t.data_type for t in graph.initializer}
    elem_types |= {a.t.data_type for n in graph.node for a in n.attribute if a.name == "value"}
    elem_types |= {a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert TensorProto.DOUBLE not in elem_types
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for scale in (1.0, 1e20, 1e-30, 1e-40, 3e38):
        xs = x / x.abs().max() * scale
        outs = session.run(None, {session.get_inputs()[0].name: xs.numpy()})
        for name, got, ref in zip(ONNX_NAMES, outs, model(xs.double())):
            assert np.isfinite(got).all(), name
            assert_rel_close(got.astype(np.float64), ref, torch.float32, f"ONNX Runtime {name} at {scale:g}")


# -------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 5, 4), (2, 6, 3, 4, 5)], ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_autocast_dtype_is_torchs(shape, dtype):
    """Under CPU autocast, every entry point returns the dtype torch's F.local_response_norm returns (for
    half input of 4 or more dims that is float32), with the float32-computed values."""
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.local_response_norm(x, 3).dtype
        outs = {name: f(x) for name, f in _entries(False).items() if len(shape) == 4 or "within" not in name}
    for name, y in outs.items():
        assert y.dtype == expected, (name, y.dtype, expected)
    ref = nf.local_response_norm(x.to(expected), 3, 0.5, 0.75, 1.0)
    assert_rel_close(outs["local_response_norm"], ref, expected, "autocast values")


def test_autocast_backward_gives_the_input_dtype():
    x = torch.randn(2, 6, 5, 4, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf.local_response_norm(x, 3)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert math.isfinite(dx.float().abs().max().item())
