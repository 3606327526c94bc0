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
import dataclasses
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
    is finite, and the count of non-finite outputs where ``ref`` is finite. ``reference_lowered`` (from
    :func:`verify_onnx`) lists what the reference computed below float64: the error is not trusted then."""

    name: str
    rel_err: float
    max_abs_err: float
    nonfinite: int
    numel: int
    reference_lowered: tuple[str, ...] = ()  # what the float64 reference computed in a lower dtype

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
    """The graph's float type: its first floating input's (token ids are not it), else its first output's."""
    for v in _graph_inputs(model) + list(model.graph.output):
        if v.type.tensor_type.elem_type in _FLOAT_TYPES + (onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            return v.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def _graph_inputs(model: onnx.ModelProto) -> list:
    """The graph inputs that are not initializers: what a caller feeds."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


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


def _split(inputs) -> tuple[tuple, dict]:
    """``inputs`` as the model's ``(args, kwargs)``: a tensor, a tuple/list of positional inputs, or a dict of
    keyword inputs."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise OnnxError(f"inputs must be a tensor, a tuple of tensors or a dict of keyword inputs, not "
                    f"{type(inputs).__name__}")


def _feeds(model: onnx.ModelProto, args: tuple, kwargs: dict) -> dict:
    """The graph's feeds: positional inputs in the graph's input order, keyword inputs by name (None values
    are left out, as the exporter leaves them out); each in its own dtype, which must be the graph's."""
    graph_inputs = _graph_inputs(model)
    names = [i.name for i in graph_inputs]
    if kwargs:
        given = {k: v for k, v in kwargs.items() if v is not None}
        positional = [a for a in args if a is not None]
        missing = [n for n in names[len(positional):] if n not in given]
        if missing:
            raise OnnxError(f"the graph's input(s) {', '.join(map(repr, missing))} are not among the keyword inputs "
                            f"({', '.join(map(repr, given)) or 'none'}); pass them by those names")
        values = dict(zip(names, positional)) | {n: given[n] for n in names[len(positional):]}
    else:
        positional = [a for a in args if a is not None]
        if len(positional) != len(names):
            raise OnnxError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(positional)}")
        values = dict(zip(names, positional))
    feeds = {}
    for i in graph_inputs:
        v = values[i.name]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        want = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        if arr.dtype != want:
            raise OnnxError(f"input {i.name!r} is {arr.dtype}, the graph takes {np.dtype(want)}; convert it first "
                            f"(e.g. x.to(torch.{np.dtype(want)}))")
        feeds[i.name] = arr
    return feeds


def _flat_outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output in the exporter's order (a tensor, tuple, list, dict, or a Hugging Face
    ``ModelOutput``: pytree leaves; None and other non-tensors left out, as the exporter leaves them out)."""
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def verify_onnx(path, model: torch.nn.Module, inputs, *, evaluator: str | None = None) -> list[OutputError]:
    """Run the ONNX file ``path`` on ``inputs`` and compare every output with ``model`` computed in float64.

    ``inputs`` is what the model takes: a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (by the graph's input names). Each is fed to the graph in its own dtype (the graph's: a float16 graph
    takes float16 tensors); integer tensors (token ids, masks) stay integer. The model's output may be a
    tensor, a tuple, a dict or a Hugging Face ``ModelOutput``; its tensors are matched to the graph's outputs
    in order.

    The reference is ``normkit.convert(model)`` in eval mode, made float64 and run under
    :func:`normkit.reference.keep_float64`: the model's own downcasts (``LlamaRMSNorm``'s
    ``.to(torch.float32)``) stay float64. Whatever still computes in a lower dtype is listed in each
    :class:`OutputError`'s ``reference_lowered`` (empty: float64 throughout); where it is not empty the error
    is not measured against float64 and cannot be trusted. Returns one :class:`OutputError` per output."""
    import warnings

    from ..convert import convert
    from ..reference import float64_call

    proto = load_model(path)
    args, kwargs = _split(inputs)
    feeds = _feeds(proto, args, kwargs)
    outs = run(proto, feeds, evaluator)
    with warnings.catch_warnings():  # the layers convert leaves are computed by torch in float64: fine here
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_model = convert(model).double().eval()
    with torch.no_grad():
        ref, lowered = float64_call(ref_model, *args, **kwargs)
    refs = _flat_outputs(ref)
    names = [o.name for o in proto.graph.output]
    if len(refs) != len(names):
        raise OnnxError(f"the model returns {len(refs)} tensor(s), the graph has {len(names)} output(s) "
                        f"({', '.join(names)}); verify the model the file was exported from")
    lowered = tuple(str(low) for low in lowered)
    return [dataclasses.replace(measure(n, o, r.numpy()), reference_lowered=lowered) for n, o, r in zip(names, outs, refs)]


# ------------------------------------------------------------------------------------------ harden check
def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float32/float16/bfloat16 tensor, type and cast made float64 (a reference
    that cannot overflow where float32 does)."""
    m = copy.deepcopy(model)
    D = onnx.TensorProto.DOUBLE
    lower = _FLOAT_TYPES + (onnx.TensorProto.BFLOAT16,)

    def fix_type(t):
        if t.HasField("tensor_type") and t.tensor_type.elem_type in lower:
            t.tensor_type.elem_type = D

    def fix_tensor(t):
        if t.data_type in lower:
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
                elif a.name == "to" and a.type == onnx.AttributeProto.INT and a.i in lower:
                    a.i = D

    fix_graph(m.graph)
    del m.graph.value_info[:]
    return m


def random_inputs(model: onnx.ModelProto, scale: float, seed: int = 0, batch: int = 2) -> dict:
    """Random normal inputs times ``scale`` for every graph input (symbolic dims: ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in _graph_inputs(model):
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        with np.errstate(over="ignore"):
            feeds[i.name] = (rng.standard_normal(shape) * scale).astype(dt)
    return feeds


def default_scales(model: onnx.ModelProto) -> tuple[float, ...]:
    if _input_dtype(model) == onnx.TensorProto.FLOAT16:
        return (1.0, 300.0, 1e4, 1e-3)
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
        try:
            ref = run(ref_model, {k: v.astype(np.float64) for k, v in feeds.items()}, "reference")
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxError(f"the float64 reference (onnx.reference) cannot run the original model: {msg}") from None
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
                     f"{e.nonfinite} non-finite of {e.numel}"
                     + (f" (NOT TRUSTED: the float64 reference is not float64 throughout: "
                        f"{', '.join(e.reference_lowered)})" if e.reference_lowered else "") for e in errors)
