"""Run ONNX files and measure them against float64.

* :func:`verify_onnx`: an exported file against the float64 PyTorch model.
* :func:`compare_onnx`: an original and a hardened file side by side on random inputs at several scales,
  against the original graph evaluated in float64 (every float tensor of it cast to double, run by
  ``onnx.reference``).

float32 graphs run in ONNX Runtime (CPU provider, graph optimizations off: the graph runs as written, as
on an accelerator). float16 graphs run in ``onnx.reference.ReferenceEvaluator``, which computes in the
declared dtypes (ONNX Runtime's CPU provider computes many float16 nodes in float32 and so cannot show a
float16 overflow).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ._errors import OnnxError
from .harden import load_model

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass
class OutputError:
    """Error of one output against float64: ``max|out - ref| / max|ref|`` over the elements where ``ref``
    is finite, and the count of non-finite outputs where ``ref`` is finite."""

    name: str
    rel_err: float
    max_abs_err: float
    nonfinite: int
    numel: int

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0


def measure(name: str, out, ref) -> OutputError:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    ok = np.isfinite(ref)
    bad = int((~np.isfinite(out) & ok).sum())
    diff = np.abs(np.where(ok & np.isfinite(out), out - ref, 0.0))
    scale = float(np.abs(np.where(ok, ref, 0.0)).max()) if ref.size else 0.0
    abs_err = float(diff.max()) if diff.size else 0.0
    rel = abs_err / scale if scale > 0 else abs_err
    return OutputError(name, float("inf") if bad else rel, abs_err, bad, int(out.size))


def _input_dtype(model: onnx.ModelProto) -> int:
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.input:
        if i.name not in inits:
            return i.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def run(model, feeds: dict, evaluator: str | None = None) -> list[np.ndarray]:
    """Run ``model`` (path or ModelProto) on ``feeds``; ``evaluator`` "ort" or "reference" (default:
    reference for a float16 graph, ONNX Runtime otherwise)."""
    model = load_model(model)
    if evaluator is None:
        evaluator = "reference" if _input_dtype(model) == onnx.TensorProto.FLOAT16 else "ort"
    if evaluator == "reference":
        from onnx.reference import ReferenceEvaluator

        with np.errstate(all="ignore"):
            return [np.asarray(o) for o in ReferenceEvaluator(model, new_ops=[_lrn_op()]).run(None, feeds)]
    return _session(model).run(None, feeds)


def _lrn_op():
    """LRN for onnx.reference: onnx 1.23's own loops over the batch instead of the channels."""
    from onnx.reference.op_run import OpRun

    class LRN(OpRun):
        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            lo, hi = (size - 1) // 2, size // 2
            sq = (x * x).swapaxes(0, 1)
            c = x.shape[1]
            total = np.zeros_like(sq)
            for i in range(c):
                total[i] = sq[max(0, i - lo):min(c, i + hi + 1)].sum(axis=0)
            y = x / (bias + (alpha / size) * total.swapaxes(0, 1)) ** beta
            return (y.astype(x.dtype),)

    return LRN


_SESSIONS: list = []  # (model, session): the last two, so that repeated runs of one model reuse its session


def _session(model: onnx.ModelProto):
    for m, sess in _SESSIONS:
        if m is model:
            return sess
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxError(f"ONNX Runtime cannot load the model: {str(exc).strip().splitlines()[0]}") from None
    _SESSIONS.insert(0, (model, sess))
    del _SESSIONS[2:]
    return sess


def _feeds(model: onnx.ModelProto, inputs) -> dict:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != len(inputs):
        raise OnnxError(f"the model takes {len(names)} input(s), got {len(inputs)}")
    return {n: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)) for n, t in zip(names, inputs)}


def verify_onnx(path, model: torch.nn.Module, inputs, *, evaluator: str | None = None) -> list[OutputError]:
    """Run the ONNX file ``path`` on ``inputs`` (a tensor or a tuple of tensors, in the graph's dtype)
    and compare every output with ``model`` run in float64 (after :func:`normkit.convert`, in eval mode).
    Returns one :class:`OutputError` per output."""
    from ..convert import convert

    proto = load_model(path)
    feeds = _feeds(proto, inputs)
    outs = run(proto, feeds, evaluator)
    ref_model = convert(model).double().eval()
    tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with torch.no_grad():
        ref = ref_model(*[t.double() for t in tensors])
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    names = [o.name for o in proto.graph.output]
    return [measure(n, o, r.numpy()) for n, o, r in zip(names, outs, refs)]


# ------------------------------------------------------------------------------------------ harden check
def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float32/float16 tensor, type and cast made float64 (a reference
    that cannot overflow where float32 does)."""
    m = copy.deepcopy(model)
    D = onnx.TensorProto.DOUBLE

    def fix_type(t):
        if t.HasField("tensor_type") and t.tensor_type.elem_type in _FLOAT_TYPES:
            t.tensor_type.elem_type = D

    def fix_tensor(t):
        if t.data_type in _FLOAT_TYPES:
            arr = onnx.numpy_helper.to_array(t).astype(np.float64)
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))

    def fix_graph(g):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            fix_type(v.type)
        for t in g.initializer:
            fix_tensor(t)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)
                elif a.name in ("to", "stash_type") and a.type == onnx.AttributeProto.INT and a.i in _FLOAT_TYPES:
                    a.i = D

    fix_graph(m.graph)
    del m.graph.value_info[:]
    return m


def random_inputs(model: onnx.ModelProto, scale: float, seed: int = 0, batch: int = 2) -> dict:
    """Random normal inputs times ``scale`` for every graph input (symbolic dims: ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        with np.errstate(over="ignore"):
            feeds[i.name] = (rng.standard_normal(shape) * scale).astype(dt)
    return feeds


def default_scales(model: onnx.ModelProto) -> tuple[float, ...]:
    if _input_dtype(model) == onnx.TensorProto.FLOAT16:
        return (1.0, 300.0, 3e4, 1e-3)
    return (1.0, 1e10, 1e19, 1e20, 1e-20)


@dataclass
class CompareRow:
    scale: float
    output: str
    original: OutputError
    hardened: OutputError


def compare_onnx(original, hardened, *, scales=None, seed: int = 0, batch: int = 2) -> list[CompareRow]:
    """Run ``original`` and ``hardened`` (paths or ModelProtos) on the same random inputs at each scale
    and measure both against the original graph evaluated in float64."""
    original, hardened = load_model(original), load_model(hardened)
    ref_model = to_float64(original)
    rows = []
    for scale in scales or default_scales(original):
        feeds = random_inputs(original, scale, seed, batch)
        with np.errstate(all="ignore"):
            ref = run(ref_model, {k: v.astype(np.float64) for k, v in feeds.items()}, "reference")
        a, b = run(original, feeds), run(hardened, feeds)
        for o, x, y, r in zip(original.graph.output, a, b, ref):
            rows.append(CompareRow(scale, o.name, measure(o.name, x, r), measure(o.name, y, r)))
    return rows


def format_rows(rows: list[CompareRow]) -> str:
    def cell(e: OutputError) -> str:
        return f"{e.rel_err:.1e}" if e.finite else f"{e.nonfinite}/{e.numel} non-finite"

    lines = [f"{'scale':>8}  {'output':<16} {'original':>22} {'hardened':>22}"]
    for r in rows:
        lines.append(f"{r.scale:>8.0e}  {r.output[:16]:<16} {cell(r.original):>22} {cell(r.hardened):>22}")
    return "\n".join(lines)


def format_errors(errors: list[OutputError]) -> str:
    return "\n".join(f"{e.name}: rel err {e.rel_err:.2e}, max abs err {e.max_abs_err:.2e}, "
                     f"{e.nonfinite} non-finite of {e.numel}" for e in errors)
