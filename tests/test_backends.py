"""The conformance suite: every backend against the spec and the oracle, on the one case registry.

Backends: the eager path (which *is* the spec, :mod:`normkit._spec`); the native kernels on contiguous and
on channels-last input; SyncBatchNorm on 1 and 2 gloo ranks; the ONNX subgraphs (``harden_onnx`` of each
op's one-node model) in ONNX Runtime (float32) and in ``onnx.reference`` (the graph's declared dtype:
float32 and float16); and each path of LRN (the plain formula in eager ops, the plain formula in the native
kernel, the robust decomposition). Cases: ``normkit.check.cases.conformance_cases`` -- magnitudes to the
top of each dtype, mean offsets, constant groups, tiny and zero eps, extreme eval-BN parameters
(``running_var = weight = 1e-20``), extreme output gradients. Every output and gradient is held to the
one tolerance of its dtype (``conftest.REL_TOL``) against the extended-precision two-pass oracle and
against the spec's own answer. A backend that does not take a case (an op it lacks, a dtype it does not
serve) says so, and every test asserts that it ran cases and that the path it names served them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _dist
import normkit
import oracle
from cases import OPERATORS, conformance_cases, run_normkit, run_oracle
from conftest import DTYPES, assert_rel_close, backend, needs_native
from normkit import _native
from normkit.ops import local_response_norm as L

pytestmark = pytest.mark.skipif(not oracle.EXTENDED, reason="the oracle needs x86-64 80-bit long double")

SHAPE = _dist.CONFORMANCE_SHAPE  # (4, 6, 5, 3): groups of 60 (BN), 15 (LN, RMS, IN), 30 (GN) values
ALL = list(OPERATORS)
CHANNELS_LAST_OPS = ["batch_norm", "batch_norm_eval", "instance_norm", "group_norm"]
NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _with_backend(name, f, *args):
    with backend(name):
        return f(*args)


def _judge(got: dict, ref: dict, spec: dict | None, dtype, label: str):
    """Every output and gradient of ``got`` against the oracle and (where given) the spec's answer."""
    assert got, f"{label}: nothing computed"
    for key, value in got.items():
        assert_rel_close(value, ref[key], dtype, f"{label}: {key} vs oracle")
        if spec is not None:
            assert_rel_close(value, spec[key].double(), dtype, f"{label}: {key} vs spec")


def _run(op, case, x, p, dy):
    return run_normkit(op, x, p, dy, case.eps)


def _cases(dtype, ops):
    return [(i, c) for i, c in enumerate(conformance_cases(dtype, ops))]


# ------------------------------------------------------------------------------------------ eager = the spec
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_eager_is_the_spec_and_meets_the_oracle(name, dtype):
    op = OPERATORS[name]
    for i, case in _cases(dtype, [name]):
        x, p, dy = case.data(SHAPE, seed=i)
        got = _with_backend("eager", _run, op, case, x, p, dy)
        _judge(got, run_oracle(op, x, p, dy, case.eps), None, dtype, f"eager {name} {case.label}")


# ------------------------------------------------------------------------------------------ native kernels
def _native_vs_spec(name, dtype, layout):
    op = OPERATORS[name]
    served = set()
    for i, case in _cases(dtype, [name]):
        x, p, dy = case.data(SHAPE, seed=i)
        spec = _with_backend("eager", _run, op, case, x, p, dy)
        if layout == "channels_last":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        with _native.recording() as record:
            got = _with_backend("auto", _run, op, case, x, p, dy)
        served |= set(record.values())
        _judge(got, run_oracle(op, x, p, dy, case.eps), spec, dtype, f"native {layout} {name} {case.label}")
    return served


@needs_native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in ALL if OPERATORS[n].family == "stats"])
def test_native_contiguous(name, dtype):
    assert _native_vs_spec(name, dtype, "contiguous") == {"native"}


@needs_native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("name", CHANNELS_LAST_OPS)
def test_native_channels_last(name, dtype):
    assert _native_vs_spec(name, dtype, "channels_last") == {"native (channels_last)"}


# ------------------------------------------------------------------------------------------ LRN's paths
LRN_SHAPE = (2, 6, 80, 80)  # 76800 elements in rows of 6400: large enough for the native kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lrn_paths(dtype, monkeypatch):
    """Every LRN path on the registry's cases: the plain formula in eager ops (small input) and in the native
    kernel (large input) where the spec proves it safe, the robust decomposition where it does not, and the
    robust decomposition forced on every case. Each path must have served, and all meet oracle and spec."""
    op = OPERATORS["local_response_norm"]
    seen = set()
    for i, case in _cases(dtype, ["local_response_norm"]):
        for shape in (SHAPE, LRN_SHAPE) if dtype in (torch.float32, torch.float64) else (SHAPE,):
            x, p, dy = case.data(shape, seed=i)
            spec = _with_backend("eager", _run, op, case, x, p, dy)
            with _native.recording() as record:
                got = _with_backend("auto", _run, op, case, x, p, dy)
            seen.add(record.get("local_response_norm"))
            ref = run_oracle(op, x, p, dy)
            _judge(got, ref, spec, dtype, f"lrn auto {tuple(shape)} {case.label}")
            if shape == SHAPE:
                with monkeypatch.context() as m:  # the robust decomposition on every case
                    m.setattr(L, "_fast_ok", lambda *a, **k: False)
                    _judge(_run(op, case, x, p, dy), ref, spec, dtype, f"lrn robust {case.label}")
    if dtype != torch.float16:  # float16's whole range (6.5e4) is within the plain formula's bounds at k = 2
        assert "eager (robust path)" in seen, seen
    assert any(s and s.startswith("eager (plain formula") for s in seen), seen
    if dtype in (torch.float32, torch.float64) and _native.load("lrn_kernel") is not None:
        assert "native" in seen, seen


# ------------------------------------------------------------------------------------------ SyncBatchNorm
@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    """Both worlds, launched once: every synchronized-batch-norm case on 1 and on 2 gloo ranks."""
    tmp = tmp_path_factory.mktemp("conformance")
    return {w: _dist.ok(_dist.launch(w, _dist.conformance_worker, tmp_path=tmp, deadline_s=600.0)) for w in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sync_batch_norm(sync_results, world, dtype):
    """Each rank's share of the output and input gradient, and the parameter gradients summed over the ranks
    (what DDP reduces), against the oracle and the spec on the whole batch."""
    op = OPERATORS["batch_norm"]
    ranks = sync_results[world]
    for i, case in _cases(dtype, ["batch_norm"]):
        x, p, dy = case.data(SHAPE, seed=i)
        parts = [r[(str(dtype), i)] for r in ranks]
        got = {"y": torch.cat([q["y"] for q in parts]), "dx": torch.cat([q["dx"] for q in parts]),
               "dweight": sum(q["dweight"].double() for q in parts), "dbias": sum(q["dbias"].double() for q in parts)}
        spec = _with_backend("eager", _run, op, case, x, p, dy)
        _judge(got, run_oracle(op, x, p, dy, case.eps), spec, dtype, f"sync {world} ranks {case.label}")


# ------------------------------------------------------------------------------------------ ONNX subgraphs
ONNX_OPS = [n for n in ALL if OPERATORS[n].onnx is not None]
_MODELS: dict = {}


def _hardened(name, dtype, eps, shape):
    """``harden_onnx`` of the op's one-node model, its parameters graph inputs of the declared dtype."""
    key = (name, dtype, eps, shape)
    if key not in _MODELS:
        from onnx import TensorProto, helper

        op = OPERATORS[name]
        elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
        x = torch.zeros(shape, dtype=dtype)
        p = op.params(x)
        nodes, inits, opset = op.onnx(shape, p, op.eps_or_default(eps))
        inputs = [helper.make_tensor_value_info("x", elem, list(shape))]
        inputs += [helper.make_tensor_value_info(k, elem, list(v.shape)) for k, v in inits.items()]
        graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("y", elem, list(shape))])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 10)
        hardened, report = normkit.harden_onnx(model)
        assert [r.replaced for r in report.replacements] == [True], report
        _MODELS[key] = (hardened, list(inits))
    return _MODELS[key]


def _onnx_feed(name, x, p, names):
    op = OPERATORS[name]
    _, inits, _ = op.onnx(tuple(x.shape), p, 0.0)
    np_dtype = np.float32 if x.dtype == torch.float32 else np.float16
    feed = {"x": x.numpy().astype(np_dtype)}
    feed.update({k: inits[k].to(x.dtype).numpy().astype(np_dtype) for k in names})
    return feed


@pytest.mark.parametrize("runtime,dtype", [("onnxruntime", torch.float32), ("reference", torch.float32),
                                           ("reference", torch.float16)], ids=["ort-float32", "ref-float32", "ref-float16"])
@pytest.mark.parametrize("name", ONNX_OPS)
def test_onnx_subgraph(name, runtime, dtype):
    """The robust subgraph of each op, in ONNX Runtime (float32; its CPU provider computes float16 nodes in
    float32, so float16 is judged in onnx.reference, which computes in the declared dtype): forward only (ONNX
    inference ops), on every case of the registry that has no output gradient of its own."""
    pytest.importorskip("onnxruntime")
    op = OPERATORS[name]
    ran = 0
    for i, case in _cases(dtype, [name]):
        if case.grad_scale != 1.0:
            continue  # forward only: the gradient cases repeat a forward case
        x, p, dy = case.data(SHAPE, seed=i)
        model, names = _hardened(name, dtype, case.eps, SHAPE)
        feed = _onnx_feed(name, x, p, names)
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
            (y,) = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)
        else:
            from onnx.reference import ReferenceEvaluator

            (y,) = ReferenceEvaluator(model).run(None, feed)
        assert y.dtype == feed["x"].dtype
        spec = _with_backend("eager", _run, op, case, x, p, None)
        _judge({"y": torch.from_numpy(np.asarray(y).astype(np.float64))}, run_oracle(op, x, p, None, case.eps), spec,
               dtype, f"onnx {runtime} {name} {case.label}")
        ran += 1
    assert ran > 10
