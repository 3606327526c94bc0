"""Identical contracts with torch 2.13, measured against torch at test time: exception types for bad input,
output strides for every kind of non-contiguous input, output dtypes under autocast; the tool chain
(torch.export in train and eval mode, torch.compile(fullgraph=True), the meta device, no host syncs);
and eval-mode batch norm that never overflows in an intermediate where its result is finite."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import normkit.functional as nf
import normkit.nn as nnk
import oracle
from normkit import MixedDtypeError, NormArgumentError, UnsupportedDtypeError
from conftest import PARITY_TOL, REL_TOL, assert_rel_close

x4 = torch.randn(2, 6, 3, 3)
f64 = torch.float64

# ------------------------------------------------------------------------------------ exception types
# (what, call) with lib = torch.nn.functional or normkit.functional: the same bad input for both.
BAD = [
    ("batch_norm weight size", lambda L: L.batch_norm(x4, None, None, torch.ones(3), training=True)),
    ("batch_norm running_mean size", lambda L: L.batch_norm(x4, torch.zeros(5), torch.ones(6))),
    ("instance_norm running_var size", lambda L: L.instance_norm(x4, torch.zeros(6), torch.ones(7))),
    ("group_norm bias size", lambda L: L.group_norm(x4, 3, torch.ones(6), torch.ones(2))),
    ("group_norm indivisible num_groups", lambda L: L.group_norm(torch.randn(2, 16, 3), 5)),
    ("group_norm 1-D input", lambda L: L.group_norm(torch.randn(6), 3)),
    ("layer_norm normalized_shape mismatch", lambda L: L.layer_norm(torch.randn(2, 5), (7,))),
    ("layer_norm empty normalized_shape", lambda L: L.layer_norm(torch.randn(2, 5), ())),
    ("layer_norm weight shape", lambda L: L.layer_norm(torch.randn(2, 5), (5,), torch.ones(4))),
    ("rms_norm weight shape", lambda L: L.rms_norm(torch.randn(2, 5), (5,), torch.ones(4))),
    ("rms_norm normalized_shape longer than input", lambda L: L.rms_norm(torch.randn(5), (2, 5))),
    ("batch_norm eval without running stats", lambda L: L.batch_norm(x4, None, None, training=False)),
    ("batch_norm one value per channel", lambda L: L.batch_norm(torch.randn(1, 4), None, None, training=True)),
    ("instance_norm one spatial element", lambda L: L.instance_norm(torch.randn(3, 4, 1))),
    *[(f"{op} integer input", call) for op, call in [
        ("batch_norm", lambda L: L.batch_norm(torch.ones(2, 3, dtype=torch.int64), None, None, training=True)),
        ("instance_norm", lambda L: L.instance_norm(torch.ones(2, 3, 4, dtype=torch.int64))),
        ("layer_norm", lambda L: L.layer_norm(torch.ones(2, 3, dtype=torch.int64), (3,))),
        ("group_norm", lambda L: L.group_norm(torch.ones(2, 3, 4, dtype=torch.int64), 1)),
        ("rms_norm", lambda L: L.rms_norm(torch.ones(2, 3, dtype=torch.int64), (3,))),
        ("layer_norm complex", lambda L: L.layer_norm(torch.ones(2, 3, dtype=torch.complex64), (3,)))]],
    ("batch_norm integer weight", lambda L: L.batch_norm(x4, None, None, torch.ones(6, dtype=torch.int64), training=True)),
    ("batch_norm float64 weight, float32 input", lambda L: L.batch_norm(x4, None, None, torch.ones(6, dtype=f64), training=True)),
    ("batch_norm float64 running stats, float32 input", lambda L: L.batch_norm(x4, torch.zeros(6, dtype=f64), torch.ones(6, dtype=f64))),
    ("batch_norm float32 weight, float64 input", lambda L: L.batch_norm(x4.double(), None, None, torch.ones(6), training=True)),
    ("batch_norm float16 weight, bfloat16 input", lambda L: L.batch_norm(x4.bfloat16(), None, None, torch.ones(6, dtype=torch.float16), training=True)),
    ("batch_norm bfloat16 weight, float32 bias, bfloat16 input",
     lambda L: L.batch_norm(x4.bfloat16(), None, None, torch.ones(6, dtype=torch.bfloat16), torch.ones(6), training=True)),
    ("instance_norm float64 weight", lambda L: L.instance_norm(x4, weight=torch.ones(6, dtype=f64))),
    ("layer_norm float64 weight", lambda L: L.layer_norm(x4, (3,), torch.ones(3, dtype=f64))),
    ("layer_norm float64 bias", lambda L: L.layer_norm(x4, (3,), None, torch.ones(3, dtype=f64))),
    ("layer_norm float16 weight, float32 input", lambda L: L.layer_norm(x4, (3,), torch.ones(3, dtype=torch.float16))),
    ("group_norm float64 weight", lambda L: L.group_norm(x4, 3, torch.ones(6, dtype=f64))),
]

# Inputs where torch's exception type is an accident of its Python wrapper, not a contract; normkit
# raises its own documented type (with a fix in the message) instead.
ACCIDENTAL = {
    "not a tensor": (lambda L: L.group_norm([[1.0, 2.0]], 1), AttributeError, TypeError),  # 'list' has no .dim
    "zero groups": (lambda L: L.group_norm(x4, 0), ZeroDivisionError, NormArgumentError),  # C % 0 in Python
    "1-D batch norm": (lambda L: L.batch_norm(torch.randn(5), None, None, training=True), IndexError, NormArgumentError),  # size(1)
    "momentum None": (lambda L: L.batch_norm(x4, torch.zeros(6), torch.ones(6), training=True, momentum=None), TypeError, ValueError),
    "eps a string": (lambda L: L.layer_norm(torch.randn(2, 5), (5,), eps="small"), TypeError, ValueError),  # the arg parser
}


def _raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - recording whatever torch raises
        return e
    return None


@pytest.mark.parametrize("what,call", BAD, ids=[b[0] for b in BAD])
def test_exception_type_as_torch(what, call):
    """normkit raises an instance of torch's exception type (a subclass is fine), with a fix-it sentence."""
    theirs = _raised(lambda: call(F))
    assert theirs is not None, f"torch accepts {what}: the table is stale"
    mine = _raised(lambda: call(nf))
    assert isinstance(mine, type(theirs)), f"{what}: torch raises {type(theirs).__name__}, normkit {mine!r}"
    assert any(hint in str(mine) for hint in ("; ", "pass ", "use ", "e.g.")), f"{what}: no fix in the message: {mine}"


@pytest.mark.parametrize("what", list(ACCIDENTAL))
def test_accidental_torch_exceptions_are_documented(what):
    call, torch_type, normkit_type = ACCIDENTAL[what]
    assert isinstance(_raised(lambda: call(F)), torch_type), "torch changed: move this case to BAD"
    assert isinstance(_raised(lambda: call(nf)), normkit_type)


def test_error_classes_keep_both_catchers():
    """The policy: each class is torch's type and normkit's earlier one, so both kinds of except clause work."""
    assert issubclass(NormArgumentError, RuntimeError) and issubclass(NormArgumentError, ValueError)
    assert issubclass(UnsupportedDtypeError, NotImplementedError) and issubclass(UnsupportedDtypeError, TypeError)
    assert issubclass(MixedDtypeError, RuntimeError) and issubclass(MixedDtypeError, TypeError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_parameters_is_accepted(dtype):
    """torch's mixed precision on CPU: float32 parameters and running statistics with a half input."""
    x = x4.to(dtype)
    p = torch.ones(6), torch.zeros(6)
    for call in (lambda L: L.batch_norm(x, torch.zeros(6), torch.ones(6), *p, training=True),
                 lambda L: L.batch_norm(x, torch.zeros(6), torch.ones(6), *p),
                 lambda L: L.instance_norm(x, weight=p[0], bias=p[1]),
                 lambda L: L.group_norm(x, 3, *p),
                 lambda L: L.layer_norm(x, (3,), torch.ones(3), torch.zeros(3)),
                 lambda L: L.rms_norm(x, (3,), torch.ones(3, dtype=f64))):
        mine, theirs = call(nf), call(F)
        assert mine.dtype == theirs.dtype == dtype
        assert_rel_close(mine, theirs, dtype, rel=PARITY_TOL[dtype])


# ------------------------------------------------------------------------------------ output strides
def _layouts(ndim):
    """Non-contiguous inputs of rank ``ndim`` (channels in dim 1): transposed, sliced, expanded,
    permuted-dense (channels_last for 4-D/5-D), channels_last then sliced."""
    shape = (3, 6, 4, 5, 2)[:ndim]
    base = torch.randn(shape, dtype=f64)
    views = {"transposed": base.transpose(1, -1), "sliced": base[..., ::2] if shape[-1] > 2 else base[:, ::2],
             "expanded": base[:1].expand(4, *shape[1:]), "channels sliced": base[:, ::2]}
    if ndim >= 3:
        views["spatial transposed"] = base.transpose(-1, -2)
    if ndim == 4:
        views["channels_last"] = base.contiguous(memory_format=torch.channels_last)
        views["channels_last sliced"] = views["channels_last"][:, :, 1:]
    if ndim == 5:
        views["channels_last_3d"] = base.contiguous(memory_format=torch.channels_last_3d)
    return views


def _stride_ops(x):
    c, last = x.shape[1], x.shape[-1]
    ops = {"batch_norm train": lambda L: L.batch_norm(x, None, None, training=True),
           "batch_norm eval": lambda L: L.batch_norm(x, torch.zeros(c, dtype=f64), torch.ones(c, dtype=f64)),
           "group_norm": lambda L: L.group_norm(x, 3 if c % 3 == 0 else 1),
           "layer_norm": lambda L: L.layer_norm(x, (last,)),
           "rms_norm": lambda L: L.rms_norm(x, (last,)),
           "rms_norm two dims": lambda L: L.rms_norm(x, x.shape[-2:])}
    if x.dim() >= 3:
        ops["instance_norm"] = lambda L: L.instance_norm(x)
    return ops


STRIDE_CASES = [(nd, name) for nd in (2, 3, 4, 5) for name in _layouts(nd)]


@pytest.mark.parametrize("ndim,layout", STRIDE_CASES, ids=[f"{n}d-{l}" for n, l in STRIDE_CASES])
def test_output_strides_as_torch(ndim, layout):
    x = _layouts(ndim)[layout]
    for name, call in _stride_ops(x).items():
        mine, theirs = call(nf), call(F)
        assert mine.stride() == theirs.stride(), f"{name} on a {layout} input: strides {mine.stride()}, torch {theirs.stride()}"
        assert_rel_close(mine, theirs, f64, f"{name} {layout}")
        if theirs.is_contiguous():
            mine.view(-1)  # what failed when a transposed input's strides were kept


# ------------------------------------------------------------------------------------------- autocast
AUTOCAST_OPS = {
    "batch_norm train": lambda L, x, p: L.batch_norm(x, None, None, p(6), p(6), training=True),
    "batch_norm eval": lambda L, x, p: L.batch_norm(x, p(6) * 0, p(6), p(6), p(6)),
    "instance_norm": lambda L, x, p: L.instance_norm(x, weight=p(6), bias=p(6)),
    "layer_norm": lambda L, x, p: L.layer_norm(x, (5,), p(5), p(5)),
    "group_norm": lambda L, x, p: L.group_norm(x, 3, p(6), p(6)),
    "rms_norm": lambda L, x, p: L.rms_norm(x, (5,), p(5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", list(AUTOCAST_OPS))
def test_autocast_output_dtype_as_torch(op, dtype):
    """Under CPU bfloat16 autocast each op returns the dtype torch's returns (parameters in float32, or in
    the input's dtype), with torch's values."""
    x = torch.randn(3, 6, 4, 5, dtype=f64).to(dtype)
    for pdtype in {torch.float32, dtype}:
        def p(n):
            return torch.linspace(0.5, 1.5, n, dtype=pdtype)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            mine, theirs = AUTOCAST_OPS[op](nf, x, p), AUTOCAST_OPS[op](F, x, p)
        assert mine.dtype == theirs.dtype, f"{op} {dtype} input, {pdtype} parameters: {mine.dtype}, torch {theirs.dtype}"
        assert_rel_close(mine, theirs, theirs.dtype, op, rel=PARITY_TOL[theirs.dtype])


# -------------------------------------------------------------------------------------- tool chain
class Wrap(torch.nn.Module):
    """A module calling one functional op, with the parameters and buffers it needs."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 6))
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))

    def forward(self, x):
        L, op, w, b = nf, self.op, self.weight, self.bias
        if op == "batch_norm":
            return L.batch_norm(x, self.running_mean, self.running_var, w, b, self.training)
        if op == "instance_norm":
            return L.instance_norm(x, self.running_mean, self.running_var, w, b, self.training)
        if op == "layer_norm":
            return L.layer_norm(x, (5,), w[:5], b[:5])
        if op == "group_norm":
            return L.group_norm(x, 3, w, b)
        return L.rms_norm(x, (5,), w[:5])


TOOL_OPS = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"]
X = torch.randn(4, 6, 5)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("op", TOOL_OPS)
def test_torch_export(op, mode, strict):
    """torch.export.export of a module calling the op (traced by make_fx, or by dynamo when strict): same
    output and buffers as eager, step after step."""
    eager, exported = Wrap(op).train(mode == "train"), Wrap(op).train(mode == "train")
    program = torch.export.export(exported, (X,), strict=strict).module()
    for step in range(2):
        x = X + step
        assert_rel_close(program(x), eager(x), torch.float32, f"{op} {mode} step {step}")
        for name in ("running_mean", "running_var") if op in ("batch_norm", "instance_norm") else ():
            assert_rel_close(getattr(program, name), getattr(eager, name), torch.float32, f"{op} {mode} {name}")


def test_exported_program_is_the_portable_reference(tmp_path):
    """torch.export keeps the pure-torch decomposition (no normkit custom op, no torch norm kernel), so the
    program runs without normkit and torch.onnx.export turns it into primitive ONNX ops that ONNX Runtime
    runs finite and accurate at input scale 1e20, where torch's own float32 kernels give NaN."""
    import onnxruntime as ort

    model = torch.nn.Sequential(nnk.BatchNorm2d(6), nnk.GroupNorm(3, 6), nnk.LayerNorm(5), nnk.RMSNorm(5),
                                nnk.InstanceNorm2d(6, affine=True)).train()
    x4 = torch.randn(4, 6, 3, 5)
    program = torch.export.export(model, (x4,)).module()
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("normkit" in op or (op.startswith("aten.") and "norm" in op) for op in ops), ops
    path = tmp_path / "norms.onnx"
    torch.onnx.export(model.eval(), (x4,), str(path), dynamo=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the graph as written
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for scale in (1.0, 1e20):
        x = x4 * scale
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert_rel_close(got, copy.deepcopy(model).double()(x.double()), torch.float32, f"ONNX Runtime at scale {scale:g}")


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """One compiled function calling every op (fullgraph: no graph break, so no Python branching on tensor
    values), forward and backward through AOTAutograd, equal to eager."""
    def every_op(x, w, rm, rv):
        return (nf.batch_norm(x, rm, rv, w, None, True) + nf.batch_norm(x, rm, rv, w, None, False)
                + nf.instance_norm(x, weight=w) + nf.group_norm(x, 3, w)
                + nf.layer_norm(x, (5,), w[:5]) + nf.rms_norm(x, (5,), w[:5]))

    compiled = torch.compile(every_op, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, every_op):
        x, w = X.clone().requires_grad_(), torch.linspace(0.5, 1.5, 6).requires_grad_()
        rm, rv = torch.zeros(6), torch.ones(6)
        y = f(x, w, rm, rv)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape))
        results.append((y, x.grad, w.grad, rm, rv))
    for a, b, what in zip(*results, ("y", "dx", "dweight", "running_mean", "running_var")):
        assert_rel_close(a, b, torch.float32, what)


@pytest.mark.parametrize("op", TOOL_OPS)
def test_meta_device(op):
    """Shapes, dtypes and strides without data: forward and backward on the meta device."""
    for mode in ("train", "eval"):
        m = Wrap(op).train(mode == "train").to("meta")
        x = torch.empty(4, 6, 5, device="meta", requires_grad=True)
        y = m(x)
        assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape


class RecordSyncs(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (``.item()``, ``bool(t)``, ``.tolist()``)."""

    SYNCS = ("_local_scalar_dense", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in func.name() for s in self.SYNCS):
            self.syncs.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("op", TOOL_OPS)
def test_no_host_sync(op, mode):
    """Forward, backward and double backward read no tensor value on the host."""
    m = Wrap(op).train(mode == "train")
    x = torch.randn(4, 6, 5, requires_grad=True)
    with RecordSyncs() as rec:
        y = m(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        g.sum().backward()
    assert not rec.syncs, f"host syncs in {op}: {rec.syncs}"


# ------------------------------------------------------------------------------ eval-mode batch norm
# (x, running_mean, running_var, weight, eps): every intermediate of the textbook order overflows or
# underflows somewhere, the result does not.
EVAL_EXTREMES = {
    torch.float32: [(1e30, 0.0, 1e-20, 1e-20, 0.0),  # x * rstd = 1e40 overflows (torch is right here)
                    (1e-30, 0.0, 1e-40, 1e30, 0.0),  # weight * rstd = 1e50 overflows (torch: NaN)
                    (3e38, -3e38, 1e30, 2.0, 1e-5),  # x - mean overflows
                    (1e-30, 0.0, 1e30, 1e20, 0.0)],  # rstd * x = 1e-45 underflows before weight restores it
    torch.bfloat16: [(1e30, 0.0, 1e-20, 1e-20, 0.0), (1e-30, 0.0, 1e-38, 1e30, 0.0), (3e38, -3e38, 1e30, 2.0, 1e-5)],
    torch.float16: [(6e4, 0.0, 6e-8, 1e-3, 0.0), (1e-7, 0.0, 1e-7, 6e4, 0.0), (6e4, -6e4, 1e4, 0.5, 1e-5)],
    torch.float64: [(1e300, 0.0, 1e-300, 1e-300, 0.0), (1e-300, 0.0, 1e-300, 1e300, 0.0)],
}
EVAL_CASES = [(dt, case) for dt, cases in EVAL_EXTREMES.items() for case in cases]


@pytest.mark.parametrize("dtype,case", EVAL_CASES, ids=[f"{dt}-{c}" for dt, c in EVAL_CASES])
def test_eval_batch_norm_has_no_overflowing_intermediate(dtype, case):
    """Against the long-double oracle: output, input and weight gradients finite and accurate wherever the
    reference is (weight * rstd is applied as one mantissa/exponent factor, the power of two last)."""
    xv, mv, vv, wv, eps = case
    x = (xv * torch.linspace(0.5, 1.0, 12, dtype=f64).view(2, 2, 3)).to(dtype)
    rm, rv = torch.full((2,), mv, dtype=f64).to(dtype), torch.full((2,), vv, dtype=f64).to(dtype)
    w, b = torch.full((2,), wv, dtype=f64).to(dtype), torch.tensor([0.25, -0.5], dtype=dtype)
    dy = torch.linspace(-1, 1, 12, dtype=f64).view(2, 2, 3).to(dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = nf.batch_norm(xg, rm, rv, wg, b, False, 0.1, eps)
    y.backward(dy)
    L = oracle.ld
    ref = oracle.batch_norm(L(x), L(w), L(b), L(dy), eps, L(rm), L(rv))
    assert_rel_close(y, ref["y"], dtype, "y", rel=REL_TOL[dtype])
    assert_rel_close(xg.grad, ref["dx"], dtype, "dx")
    x_hat = (L(x) - L(rm).reshape(1, 2, 1)) / (L(rv).reshape(1, 2, 1) + eps) ** 0.5
    if abs(x_hat).min() >= torch.finfo(dtype).tiny:  # dweight = sum(dy * x_hat): subnormal x_hat has no digits to give
        assert_rel_close(wg.grad, ref["dweight"], dtype, "dweight")
