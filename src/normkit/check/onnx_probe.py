"""The ONNX model check: for every normalization of an ONNX graph (:func:`normkit.onnx.norms.find_norms`),
how far it is from overflow in the graph's dtype, whether it breaks, from which input scale, and which
node breaks first.

For each input scale ``s`` the graph runs on ``s * x`` (``x``: seeded standard-normal inputs of the given
shapes, or the arrays of an ``.npz``; integer inputs are not scaled) with each norm's inputs and outputs
exposed as graph outputs -- only those, so the rest of the graph runs as written -- and its float64 copy
(every float tensor, type and Cast made float64, run by ``onnx.reference``) runs on the same inputs. Then
each norm is judged **in isolation**, as the model probe judges a layer: its own nodes (the native node,
the decomposed pattern, or the region ``harden_onnx`` wrote) are extracted into a small graph, fed the
float64 graph's input to the norm rounded to the dtype, and compared with the float64 copy of the same
nodes on the same rounded input, so an upstream error cannot make a later norm look broken. Model-local
functions are inlined on a copy first; a norm inside an If/Loop/Scan body is measured through the node
holding the body (:func:`expose`), at every Loop iteration (the worst kept), ``not taken`` where its If branch
did not run; a body whose values cannot be brought out is listed in :attr:`OnnxResult.unmeasured` with the
reason. Per norm and scale:

* ``max_input``: the largest ``|x|`` the norm receives (float64 graph);
* ``variance``: the largest ``sum((x - mean)**2) / N`` over its groups (``sum(x**2) / N`` for RMS norms);
* ``largest``: the largest intermediate it forms -- for a native node what a textbook kernel in the
  dtype forms (:func:`normkit.watch.max_deviation`: the largest square), for a pattern or a hardened
  region the largest magnitude any of its nodes produces in the float64 run, each against the largest
  value of that node's declared dtype;
* ``headroom``: ``log2(dtype max / largest)``, in powers of two (negative: it overflows);
* ``error``: ``max|out - ref| / max|ref|`` of the isolated norm, ``propagated``: of the whole graph's
  value there (errors from upstream included).

Status: ``ok``; ``fail`` (error above :data:`normkit.check.cases.TOLERANCE`); ``non-finite`` (NaN/inf
where float64 is finite); ``overflow`` (an intermediate beyond the dtype's range although the evaluator's
output passed: ONNX Runtime's CPU provider computes float16 nodes in float32); ``raised`` (the evaluator
refused the nodes); ``range`` (the norm's input itself lies beyond the dtype: no normalization can fix
that, reported apart); ``not taken`` (inside an If branch the inputs do not take; not a failure). The first
failing node is the first in topological order at the smallest failing scale.

Evaluators: ``reference`` (``onnx.reference``, computing every node in its declared dtype, as a float16
accelerator does -- bfloat16 through ml_dtypes; ONNX Runtime's contrib norms are given textbook
implementations here) and ``ort`` (ONNX Runtime's CPU provider, graph optimizations off; it cannot run
bfloat16 graphs: refused). Default: ``reference`` for float16 and bfloat16 graphs, ``ort`` for float32 and
float64 graphs. A float64 graph is its own reference: its norms pass by construction, its headroom is
against float64's largest value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto as TP
from onnx import helper as oh

from ..onnx import OnnxError
from ..onnx.norms import NormSite, body_of, find_norms
from ..onnx.verify import _lrn_op, _session, measure, to_float64
from ..watch import headroom, largest_intermediate, max_deviation, reduction
from .cases import TOLERANCE

FLOAT_ELEMS = {TP.FLOAT: "float32", TP.FLOAT16: "float16", TP.BFLOAT16: "bfloat16", TP.DOUBLE: "float64"}
TORCH_OF = {TP.FLOAT: torch.float32, TP.FLOAT16: torch.float16, TP.BFLOAT16: torch.bfloat16, TP.DOUBLE: torch.float64}
NP_OF = {e: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(e)) for e in FLOAT_ELEMS}  # bfloat16: ml_dtypes' (onnx's own)
FAILED = ("fail", "non-finite", "overflow", "raised")
NOT_TAKEN = "not taken"  # a norm inside an If branch that did not run
EVALUATORS = ("reference", "ort")


def top_of(elem: int) -> float:
    """The largest finite value of an ONNX float element type (float32's for any other type)."""
    return float(torch.finfo(TORCH_OF.get(elem, torch.float32)).max)


def tolerance(elem: int) -> float:
    """The check's tolerance (:data:`normkit.check.cases.TOLERANCE`) for an ONNX float element type."""
    return TOLERANCE[TORCH_OF.get(elem, torch.float32)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ results
@dataclass
class NormCase:
    """One norm (``index`` into :attr:`OnnxResult.norms`) at one input scale."""

    index: int
    scale: float
    status: str
    max_input: float | None = None
    variance: float | None = None
    largest: float | None = None
    largest_what: str = ""
    top: float | None = None
    headroom: float | None = None
    error: float | None = None
    propagated: float | None = None
    message: str = ""


@dataclass
class OnnxResult:
    """The check of one file: its norms, one :class:`NormCase` per (norm, scale), and the graph outputs'
    errors per scale (``{"scale", "output", "status", "error", "nonfinite", "numel"}``)."""

    file: str
    dtype: str
    evaluator: str
    scales: list[float]
    inputs: dict[str, list[int]]
    norms: list[NormSite]
    cases: list[NormCase] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    unmeasured: list[tuple[NormSite, str]] = field(default_factory=list)  # (norm, why its values cannot be had)
    converted: str = ""  # how the file was converted to the dtype, if it was

    def cases_of(self, index: int) -> list[NormCase]:
        return [c for c in self.cases if c.index == index]

    def fails_from(self, index: int) -> float | None:
        """The smallest scale where norm ``index`` fails (None: it never does)."""
        bad = [c.scale for c in self.cases_of(index) if c.status in FAILED]
        return min(bad) if bad else None

    def first_failure(self) -> NormCase | None:
        """The first failing norm in topological order at the smallest scale where any norm fails."""
        bad = [c for c in self.cases if c.status in FAILED]
        return min(bad, key=lambda c: (c.scale, c.index)) if bad else None

    def lowest_headroom(self, index: int) -> float | None:
        hs = [c.headroom for c in self.cases_of(index) if c.headroom is not None]
        return min(hs) if hs else None

    @property
    def ok(self) -> bool:
        """No norm fails and no graph output is non-finite where float64 is finite."""
        return self.first_failure() is None and not any(o["status"] == "non-finite" for o in self.outputs)


# ------------------------------------------------------------------------------------------ evaluators
def contrib_ops() -> list:
    """Textbook ``onnx.reference`` kernels, in the input's dtype, for the normalizations ONNX Runtime
    adds (onnx.reference has none): SimplifiedLayerNormalization (both domains), SkipLayerNormalization,
    SkipSimplifiedLayerNormalization, EmbedLayerNormalization."""
    from onnx.reference.op_run import OpRun

    def norm(x, axis, eps, center):
        axes = tuple(range(axis % x.ndim, x.ndim))
        d = x - x.mean(axis=axes, keepdims=True).astype(x.dtype) if center else x
        return d / np.sqrt((d * d).mean(axis=axes, keepdims=True).astype(x.dtype) + x.dtype.type(eps))

    def outs(node, *values):
        return tuple(values[:len(node.output)]) + (None,) * max(0, len(node.output) - len(values))

    def simplified(self, x, scale, axis=-1, epsilon=1e-5, stash_type=1):
        return outs(self.onnx_node, (norm(x, axis, epsilon, False) * scale).astype(x.dtype))

    def skip(center):
        def _run(self, x, skip_, gamma, beta=None, bias=None, epsilon=1e-12):
            if not center:  # SkipSimplifiedLayerNormalization(input, skip, gamma, bias)
                beta, bias = None, beta
            s = x + skip_ + (bias if bias is not None else 0)
            y = norm(s, -1, epsilon, center) * gamma + (beta if beta is not None else 0)
            return outs(self.onnx_node, y.astype(x.dtype), None, None, s.astype(x.dtype))
        return _run

    def embed(self, ids, seg_ids, word, pos, seg=None, gamma=None, beta=None, mask=None, pos_ids=None,
              epsilon=1e-12, mask_index_type=1):
        emb = word[ids] + pos[np.arange(ids.shape[1]) if pos_ids is None else pos_ids]
        if seg_ids is not None and seg is not None:
            emb = emb + seg[seg_ids]
        y = norm(emb, -1, epsilon, True) * gamma + (beta if beta is not None else 0)
        mask_index = (mask.sum(axis=1) if mask is not None else np.zeros(ids.shape[0])).astype(np.int32)
        return outs(self.onnx_node, y.astype(word.dtype), mask_index, emb.astype(word.dtype))

    def op(name, domain, run):
        return type(name, (OpRun,), {"op_domain": domain, "_run": run})

    ms = "com.microsoft"
    return [op("SimplifiedLayerNormalization", "", simplified), op("SimplifiedLayerNormalization", ms, simplified),
            op("SkipLayerNormalization", ms, skip(True)), op("SkipSimplifiedLayerNormalization", ms, skip(False)),
            op("EmbedLayerNormalization", ms, embed)]


_EVALUATORS: dict[int, tuple] = {}


def run_graph(model: onnx.ModelProto, feeds: dict, evaluator: str, outputs: list[str] | None = None) -> dict:
    """``{name: array}`` of ``outputs`` (default: the graph outputs). ``reference`` may return any value
    of the graph; ``ort`` only graph outputs."""
    if evaluator == "ort":
        sess = _session(model)
        names = outputs or [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
    key = id(model)
    if key not in _EVALUATORS or _EVALUATORS[key][0] is not model:
        from onnx.reference import ReferenceEvaluator

        _EVALUATORS.clear()  # one model at a time: the evaluators hold their graphs
        _EVALUATORS[key] = (model, ReferenceEvaluator(model, new_ops=[_lrn_op(), *contrib_ops()]))
    ev = _EVALUATORS[key][1]
    names = outputs or list(ev.output_names)
    with np.errstate(all="ignore"):
        return dict(zip(names, (np.asarray(a) for a in ev.run(names, feeds))))


# ------------------------------------------------------------------------------------------ graph surgery
def graph_dtype(model: onnx.ModelProto) -> int:
    """The float element type of the graph: its first float input's, else its first float initializer's."""
    for v in model.graph.input:
        if v.type.tensor_type.elem_type in (TP.FLOAT, TP.FLOAT16, TP.BFLOAT16, TP.DOUBLE):
            return v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        if t.data_type in (TP.FLOAT, TP.FLOAT16, TP.BFLOAT16, TP.DOUBLE):
            return t.data_type
    return TP.FLOAT


def graphs_of(graph: onnx.GraphProto):
    """``graph`` and every If/Loop/Scan body inside it, recursively."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from graphs_of(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from graphs_of(g)


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value shape inference can type (plus inputs, outputs, initializers, Constants),
    in the main graph and in every body (value names are unique across them)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    types = {}
    for g in graphs_of(inferred.graph):
        types.update({v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)
                      if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type})
        types.update({t.name: t.data_type for t in g.initializer})
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        types[n.output[0]] = a.t.data_type
    return types


BODY_OPS = ("If", "Loop", "Scan")


@dataclass
class Exposed:
    """A copy of a model whose graph outputs include the values asked for. ``where[(path, value)]`` says
    where a value comes out (:func:`fetch` reads it): a graph output's name; for a value inside a body, the
    value comes out through the node holding the body, as an extra output of every enclosing body and node;
    an If branch not holding it gives an empty tensor there (the branch was not taken); a Loop or Scan
    stacks it over its iterations, flattened, beside its shape (``(flat, shape)``: the entries of the two in
    the enclosing graph; flat values stack alike in ONNX Runtime and in onnx.reference, whose Loop
    concatenates what it should stack). ``refused[path]``: why the values of a body cannot come out."""

    model: onnx.ModelProto
    where: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)


def fetch(values: dict, entry, index: tuple = ()) -> np.ndarray:
    """The value at ``entry`` (of :attr:`Exposed.where`) from a run's ``values``, at ``index``: one iteration
    number per enclosing Loop/Scan, outermost first (:func:`levels` of them)."""
    if isinstance(entry, str):
        return np.asarray(values[entry])
    flat, shape = entry
    return fetch(values, flat, index[:-1])[index[-1]].reshape(fetch(values, shape, index[:-1])[index[-1]])


def levels(entry) -> int:
    """How many Loops/Scans an :attr:`Exposed.where` entry comes out of."""
    return 0 if isinstance(entry, str) else 1 + levels(entry[0])


def iterations(values: dict, entry):
    """Every iteration index of ``entry`` in a run (one empty index for a value outside any Loop/Scan)."""
    if isinstance(entry, str):
        yield ()
        return
    for outer in iterations(values, entry[1]):
        for i in range(fetch(values, entry[1], outer).shape[0]):
            yield outer + (i,)


def _holder(graph: onnx.GraphProto, path: tuple):
    """The node (in the graph at ``path[:-1]``) holding the body at ``path``."""
    outer = body_of(graph, path[:-1])
    return next(n for n in outer.node if n.output and n.output[0] == path[-1][0])


def expose(model: onnx.ModelProto, wanted: list[tuple[tuple, list[str]]], types: dict[str, int], default: int) -> Exposed:
    """:class:`Exposed` for ``wanted``: ``(path, value names)`` pairs, ``path`` as :attr:`NormSite.path`
    (empty: the main graph; those values are simply added to the graph outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    res = Exposed(m)
    have = {o.name for o in m.graph.output}
    types, count = dict(types), [0]  # with the values made here

    def out_of(path: tuple, body: onnx.GraphProto, node, v: str, elem: int):
        """``v`` (made in ``body``) as a new output of ``node``, the node holding ``body``."""
        count[0] += 1
        outer = f"{v}__normkit_exposed{count[0]}"
        body.output.append(oh.make_tensor_value_info(v, elem, None))
        if node.op_type == "If":  # the other branch gives an empty tensor of the same type
            other = next(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH and a.name != path[-1][1])
            other.node.append(oh.make_node("Constant", [], [f"{outer}__not_taken"],
                                           value=oh.make_tensor(f"{outer}__not_taken", elem, [0], [])))
            other.output.append(oh.make_tensor_value_info(f"{outer}__not_taken", elem, None))
        else:  # Loop, Scan: a new scan output
            for a in node.attribute:
                if a.name in ("scan_output_axes", "scan_output_directions"):
                    a.ints.append(0)
        node.output.append(outer)
        types[outer] = elem
        return outer

    def lift(path: tuple, v: str):
        if (path, v) in res.where:
            return res.where[(path, v)]
        if not path:
            if v not in have:
                m.graph.output.append(oh.make_tensor_value_info(v, types.get(v, default), None))
                have.add(v)
            res.where[(path, v)] = v
            return v
        body = body_of(m.graph, path)
        made = {o for n in body.node for o in n.output}
        if v not in made | {i.name for i in body.input} | {t.name for t in body.initializer}:
            res.where[(path, v)] = lift(path[:-1], v)  # an outer value, seen from the body
            return res.where[(path, v)]
        node, elem = _holder(m.graph, path), types.get(v, default)
        if node.op_type == "If":
            inner = v
            if v not in made:  # a body input or initializer cannot be a body output itself
                inner = f"{v}__normkit_seen{count[0]}"
                body.node.append(oh.make_node("Identity", [v], [inner]))
            res.where[(path, v)] = lift(path[:-1], out_of(path, body, node, inner, elem))
        else:  # flattened, beside its shape
            flat, shape = f"{v}__normkit_flat{count[0]}", f"{v}__normkit_shape{count[0]}"
            body.node.append(oh.make_node("Constant", [], [f"{flat}__minus1"],
                                          value=oh.make_tensor(f"{flat}__minus1", TP.INT64, [1], [-1])))
            body.node.extend([oh.make_node("Reshape", [v, f"{flat}__minus1"], [flat]), oh.make_node("Shape", [v], [shape])])
            res.where[(path, v)] = (lift(path[:-1], out_of(path, body, node, flat, elem)),
                                    lift(path[:-1], out_of(path, body, node, shape, TP.INT64)))
        return res.where[(path, v)]

    for path, names in wanted:
        for k in range(1, len(path) + 1):  # every enclosing node must be one whose body values can come out
            node = _holder(m.graph, path[:k])
            if node.op_type not in BODY_OPS or node.domain not in ("", "ai.onnx"):
                res.refused[path] = f"inside {node.op_type} {node.name!r} (only If, Loop and Scan bodies are measured)"
        if path not in res.refused:
            for v in names:
                lift(path, v)
    return res


def extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str], types: dict[str, int],
            default: int, path: tuple = ()) -> tuple[onnx.ModelProto, list[str]]:
    """The nodes that compute ``outputs`` from ``inputs`` (and constants) as a model of their own; also
    returns the values they need beyond ``inputs`` (a graph input through a Shape, a Loop's iteration
    number). ``path``: the body holding the outputs (:attr:`NormSite.path`); its enclosing graphs'
    constants and nodes are reached too."""
    chain = [body_of(model.graph, path[:k]) for k in range(len(path) + 1)]  # outermost first
    producer = {o: n for g in chain for n in g.node for o in n.output}
    inits = {t.name: t for g in chain for t in g.initializer}
    keep, seen, extra, used = set(), set(inputs) | {""}, [], []
    stack = list(outputs)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in inits:
            used.append(inits[v])
        elif v in producer:
            n = producer[v]
            if id(n) not in keep:
                keep.add(id(n))
                stack.extend(n.input)
        else:
            extra.append(v)
    nodes = [n for g in chain for n in g.node if id(n) in keep]  # an outer node precedes the bodies it feeds
    g = oh.make_graph(nodes, "norm", [oh.make_tensor_value_info(n, types.get(n, default), None) for n in inputs + extra],
                      [oh.make_tensor_value_info(n, types.get(n, default), None) for n in outputs], used)
    sub = oh.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub, extra


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph converted to float16 by onnxconverter-common (inputs and outputs too; it clamps
    constants to [1e-7, 1e4] in magnitude, as it does for deployment). The converter keeps the graph's
    own ``Cast(to=float)`` nodes, which then feed float32 into float16 nodes (an exporter's attention
    scale ``Sqrt(Cast(Shape))``): those are retargeted to float16, as ONNX Runtime's own converter does."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise OnnxError("--dtype float16 converts with onnxconverter-common: pip install 'normkit[onnx]'") from None
    import warnings

    own_casts = {n.name for n in model.graph.node if n.op_type == "Cast" and n.name and
                 any(a.name == "to" and a.i == TP.FLOAT for a in n.attribute)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = float16.convert_float_to_float16(model, keep_io_types=False)
        except Exception as exc:
            raise OnnxError(f"onnxconverter-common cannot convert the graph to float16: {_one_line(exc)}") from None
    for n in out.graph.node:
        if n.op_type == "Cast" and n.name in own_casts:
            for a in n.attribute:
                if a.name == "to" and a.i == TP.FLOAT:
                    a.i = TP.FLOAT16
    return out


# ------------------------------------------------------------------------------------------ one norm
def _const(model: onnx.ModelProto, name: str):
    for g in graphs_of(model.graph):
        for t in g.initializer:
            if t.name == name:
                return onnx.numpy_helper.to_array(t).astype(np.float64)
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] == name:
                return onnx.numpy_helper.to_array(n.attribute[0].t).astype(np.float64)
    return None


def _node_inputs(model: onnx.ModelProto, site: NormSite) -> list[str]:
    for n in body_of(model.graph, site.path).node:
        if site.outputs and site.outputs[0] in n.output:
            return list(n.input)
    return []


def _spec(site: NormSite, rank: int):
    """``(kind, dims, groups)`` of a norm whose statistics depend on its data input alone, else None."""
    if "axes" in site.attrs:  # a decomposed pattern
        return ("rms" if site.kind == "rms" else "center"), tuple(sorted(a % rank for a in site.attrs["axes"])), None
    axis = int(site.attrs.get("axis", -1))
    trailing = tuple(range(axis % rank, rank)) if rank else ()
    if site.kind in ("center", "rms"):
        return site.kind, trailing, None
    if site.kind == "lrn":
        return "rms", trailing, None
    if site.kind == "group":
        return "group", None, int(site.attrs.get("num_groups", 1))
    if site.kind == "instance":
        return "instance", None, None
    return None


WHAT = {"center": "(x - mean)^2", "rms": "x^2", "group": "(x - mean)^2", "instance": "(x - mean)^2"}


def _native_terms(model, site: NormSite, xs: dict) -> tuple[torch.Tensor, str, tuple]:
    """The float64 data a native node normalizes, what it squares, and ``(kind, dims, groups, mean)`` for
    :func:`max_deviation`."""
    args = _node_inputs(model, site)
    x = np.asarray(xs[site.inputs[0]])

    def arg(i):
        if len(args) <= i or not args[i]:
            return None
        return xs[args[i]] if args[i] in xs else _const(model, args[i])

    if site.kind in ("skip", "skip_rms"):
        bias = arg(4 if site.kind == "skip" else 3)
        s = x + arg(1) + (bias if bias is not None else 0)
        center = site.kind == "skip"
        return torch.from_numpy(s), "(x + skip - mean)^2" if center else "(x + skip)^2", \
            ("center" if center else "rms", (s.ndim - 1,), None, None)
    if site.kind == "embed":
        ids = x.astype(np.int64)
        word, pos, pos_ids = arg(2), arg(3), arg(8)
        emb = word[ids] + pos[np.arange(ids.shape[1]) if pos_ids is None else pos_ids.astype(np.int64)]
        if arg(1) is not None and arg(4) is not None:
            emb = emb + arg(4)[arg(1).astype(np.int64)]
        return torch.from_numpy(emb), "(embedding sum - mean)^2", ("center", (emb.ndim - 1,), None, None)
    t = torch.from_numpy(x.astype(np.float64))
    if site.kind == "given":
        return t, "x - mean", ("given", None, None, torch.from_numpy(arg(3)))
    kind, dims, groups = _spec(site, x.ndim)
    return t, WHAT[kind], (kind, dims, groups, None)


def _variance(t: torch.Tensor, kind: str, dims, groups) -> float | None:
    """The largest ``sum((x - mean)**2) / N`` over the groups (``sum(x**2) / N`` for ``rms``)."""
    if kind == "given" or t.numel() == 0:
        return None
    t, kind, dims = reduction(t, kind, dims, groups)
    if kind == "rms":
        return float(t.square().mean(dims).max()) if dims else float(t.square().mean())
    return float(torch.var(t, dim=dims, correction=0).max())


@dataclass
class _Isolated:
    model: onnx.ModelProto
    model64: onnx.ModelProto
    extra: list[str]
    inner: dict[str, str]  # float value the norm's own nodes produce (pattern / hardened region) -> its op


def _isolate(model, site, types, default) -> _Isolated:
    sub, extra = extract(model, site.inputs, site.outputs, types, default, site.path)
    inner = {}
    if site.op.startswith(("decomposed", "normkit")):
        inner = {o: n.op_type for n in sub.graph.node if n.op_type != "Constant" for o in n.output
                 if o and types.get(o, default) in FLOAT_ELEMS}
    return _Isolated(sub, to_float64(sub), extra, inner)


def _judge(model, site: NormSite, iso: _Isolated | OnnxError, index: int, scale: float, ref: dict, out: dict,
           types: dict, default: int, evaluator: str) -> NormCase:
    """One norm at one scale (one iteration of the Loops holding it): ``ref`` and ``out`` hold the values
    of the float64 graph and of the graph in its dtype (the norm's inputs, outputs and extra inputs)."""
    x_elem = types.get(site.inputs[0], default)
    case = NormCase(index, scale, "ok")
    o = site.outputs[0]
    if o in out and o in ref:
        case.propagated = measure(o, out[o], ref[o]).rel_err
    # the float64 graph's inputs to the norm, rounded to their declared dtypes
    rounded, rounded64 = {}, {}
    for name in site.inputs + (iso.extra if isinstance(iso, _Isolated) else []):
        v64 = np.asarray(ref[name])
        elem = types.get(name, default)
        if elem in NP_OF:
            finite = np.abs(v64[np.isfinite(v64)]) if v64.size else np.zeros(1)
            if name == site.inputs[0]:
                case.max_input = float(finite.max()) if finite.size else 0.0
            if not np.isfinite(v64).all() or (finite.size and finite.max() > top_of(elem)):
                case.status, case.message = "range", f"input {name!r} lies beyond {FLOAT_ELEMS[elem]}'s range"
                return case
            rounded[name] = v64.astype(NP_OF[elem])
            rounded64[name] = rounded[name].astype(np.float64)
        else:
            rounded[name] = v64.astype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else v64
            rounded64[name] = rounded[name]
    if isinstance(iso, OnnxError):
        case.status, case.message = "raised", str(iso)
        return case
    case.top = top_of(x_elem if x_elem in NP_OF else default)
    # the reference: the float64 copy of the norm's own nodes on the rounded input
    try:
        ref_sub = run_graph(iso.model64, rounded64, "reference", site.outputs + list(iso.inner))
    except Exception as exc:
        case.status, case.message = "raised", f"float64 reference: {_one_line(exc)}"
        return case
    # what it forms: measured (pattern, hardened region) or what a textbook kernel forms (native node)
    if iso.inner:
        worst = None
        for name in iso.inner:
            v = np.abs(ref_sub[name][np.isfinite(ref_sub[name])]) if ref_sub[name].size else np.zeros(0)
            if not v.size:
                continue
            top = top_of(types.get(name, default))
            h = math.log2(top) - math.log2(v.max()) if v.max() > 0 else math.inf
            if worst is None or h < worst[0]:
                worst = (h, float(v.max()), name)
        if worst is not None:
            case.headroom, case.largest, case.largest_what = worst[0], worst[1], f"{worst[2]} ({iso.inner[worst[2]]})"
        t = torch.from_numpy(np.asarray(rounded64[site.inputs[0]], dtype=np.float64))
        spec = _spec(site, t.dim())
        case.variance = _variance(t, *spec) if spec else None
    else:
        t, what, (kind, dims, groups, mean) = _native_terms(model, site, rounded64)
        dev = float(max_deviation(t, kind, dims, groups=groups, mean=mean))
        case.largest, case.largest_what = largest_intermediate(dev, kind), what
        case.headroom = headroom(case.largest, case.top)
        case.variance = _variance(t, kind, dims, groups)
    # the norm in the dtype, by the evaluator
    try:
        got = run_graph(iso.model, rounded, evaluator, site.outputs)
    except Exception as exc:
        case.status, case.message = "raised", f"{evaluator}: {_one_line(exc)}"
        return case
    errs = [measure(n, got[n], ref_sub[n]) for n in site.outputs]
    case.error = max(e.rel_err for e in errs)
    if not all(e.finite for e in errs):
        case.status = "non-finite"
    elif case.error > tolerance(x_elem if x_elem in NP_OF else default):
        case.status = "fail"
    elif case.headroom is not None and case.headroom < 0:
        case.status, case.message = "overflow", f"{case.largest_what} exceeds the dtype's range; {evaluator} computed it wider"
    return case


def _judge_body(model, site: NormSite, iso, index: int, scale: float, ref: dict, out: dict, exp: Exposed,
                types: dict, default: int, evaluator: str) -> NormCase:
    """:func:`_judge` on the values :func:`expose` brought out for ``site``: once per iteration of the Loops
    and Scans holding it (the worst iteration is kept: failing first, then the lowest headroom); ``not
    taken`` where the If branch holding it did not run."""
    names = site.inputs + site.outputs + (iso.extra if isinstance(iso, _Isolated) else [])
    loc = {v: exp.where[(site.path, v)] for v in dict.fromkeys(names)}
    cases, skipped = [], 0
    for idx in iterations(ref, loc[site.outputs[0]]):
        r = {v: fetch(ref, e, idx[:levels(e)]) for v, e in loc.items()}
        o = {v: fetch(out, e, idx[:levels(e)]) for v, e in loc.items()}
        if site.path and any(a.size == 0 for a in r.values()):
            skipped += 1
            continue
        cases.append((idx, _judge(model, site, iso, index, scale, r, o, types, default, evaluator)))
    if not cases:
        why = "its If branch was not taken" if skipped else "its Loop ran no iteration"
        return NormCase(index, scale, NOT_TAKEN, message=f"{why} on these inputs")
    idx, case = max(cases, key=lambda ic: (ic[1].status in FAILED, ic[1].status != "range",
                                           -(ic[1].headroom if ic[1].headroom is not None else math.inf), ic[1].error or 0.0))
    if len(cases) + skipped > 1:
        case.message = "; ".join(filter(None, [case.message, f"the worst of {len(cases)} iterations (index "
                                               f"{', '.join(map(str, idx))}){f', {skipped} not taken' if skipped else ''}"]))
    return case


# ------------------------------------------------------------------------------------------ the check
def is_float(a: np.ndarray) -> bool:
    """A floating array: numpy's float kinds or ml_dtypes' bfloat16 (numpy kind ``V``)."""
    return a.dtype.kind == "f" or a.dtype == NP_OF[TP.BFLOAT16]


def _scaled(base_feeds: dict, scale: float) -> tuple[dict, dict]:
    """The feeds at ``scale`` (float inputs multiplied, in their dtype) and their float64 copies."""
    feeds = {}
    with np.errstate(over="ignore"):
        for k, v in base_feeds.items():
            feeds[k] = (v * scale).astype(v.dtype) if is_float(v) else v
    return feeds, {k: v.astype(np.float64) if is_float(v) else v for k, v in feeds.items()}


def _run_exposed(exp: Exposed, base_feeds: dict, scales, evaluator: str, name: str) -> list[tuple]:
    """``(scale, float64 values, values in the dtype)`` per scale, the float64 copy run by onnx.reference."""
    exposed64 = to_float64(exp.model)
    runs = []
    for scale in scales:
        feeds, feeds64 = _scaled(base_feeds, scale)
        try:
            ref = run_graph(exposed64, feeds64, "reference")
        except Exception as exc:
            raise OnnxError(f"{name}: the graph rejects inputs {_shapes(base_feeds)}: {_one_line(exc)}") from None
        try:
            out = run_graph(exp.model, feeds, evaluator)
        except OnnxError as exc:
            raise OnnxError(f"{name}: {exc}; try --evaluator reference") from None
        except Exception as exc:
            raise OnnxError(f"{name}: {evaluator} cannot run the graph on inputs {_shapes(base_feeds)}: "
                            f"{_one_line(exc)}" + ("; try --evaluator reference" if evaluator == "ort" else "")) from None
        runs.append((scale, ref, out))
    return runs


def default_evaluator(elem: int) -> str:
    """``reference`` for float16 and bfloat16 graphs (computed in their dtype), ``ort`` for float32 and float64."""
    return "reference" if elem in (TP.FLOAT16, TP.BFLOAT16) else "ort"


def probe_onnx(model: onnx.ModelProto, base_feeds: dict[str, np.ndarray], scales, *, name: str = "model",
               evaluator: str | None = None, progress: Callable[[int], None] | None = None) -> OnnxResult:
    """Check ``model`` on ``s * base_feeds`` for each scale ``s`` (see the module docstring). Raises
    :class:`normkit.onnx.OnnxError` (one line) when the graph rejects the inputs or the evaluator cannot
    run a graph of this dtype. ``progress(n)`` is called as the work advances: once per scale for the
    graph's runs, then once per (norm, scale); the total (:func:`work`) is passed as ``progress(0, total=n)``
    once the norms are found (:func:`normkit.check.command.progress_bar`'s ``advance`` takes it)."""
    from onnx.inliner import inline_local_functions

    elem = graph_dtype(model)
    if elem not in FLOAT_ELEMS:
        raise OnnxError(f"{name}: a {onnx.helper.tensor_dtype_to_string(elem)} graph; the check handles float32, "
                        f"float16, bfloat16 and float64 graphs")
    evaluator = evaluator or default_evaluator(elem)
    if evaluator == "ort" and elem == TP.BFLOAT16:
        raise OnnxError(f"{name}: a bfloat16 graph cannot run in ONNX Runtime (its CPU provider has no bfloat16 kernels "
                        f"for most nodes, and its Python API takes no bfloat16 arrays); use --evaluator reference, "
                        f"which computes every node in bfloat16")
    if model.functions:  # the values find_norms names are the inlined model's
        model = inline_local_functions(model)
    progress = progress or (lambda n=1, total=None: None)
    sites = find_norms(model)
    progress(0, total=work(len(sites), len(scales)))
    types = value_types(model)
    isolated = []
    for site in sites:
        try:
            isolated.append(_isolate(model, site, types, elem))
        except Exception as exc:  # noqa: BLE001 -- reported per case
            isolated.append(OnnxError(f"cannot extract its nodes: {_one_line(exc)}"))
    wanted = [(s.path, s.inputs + s.outputs + (i.extra if isinstance(i, _Isolated) else [])) for s, i in zip(sites, isolated)]
    exp = expose(model, wanted, types, elem)
    try:
        runs = _run_exposed(exp, base_feeds, scales, evaluator, name)
    except OnnxError as exc:
        if not any(p for p, _ in wanted if p not in exp.refused):
            raise
        # the graph itself may run: measure the main graph's norms, list the bodies' as not measured
        exp = expose(model, [(p, v) for p, v in wanted if not p], types, elem)
        runs = _run_exposed(exp, base_feeds, scales, evaluator, name)
        for p, _ in wanted:
            if p:
                exp.refused[p] = f"its values could not be brought out of the body ({exc})"
    progress(len(scales))
    keep = [k for k, s in enumerate(sites) if s.path not in exp.refused]
    progress(0, total=work(len(keep), len(scales)))
    result = OnnxResult(name, FLOAT_ELEMS[elem], evaluator, list(scales), {k: list(v.shape) for k, v in base_feeds.items()},
                        [sites[k] for k in keep],
                        unmeasured=[(s, exp.refused[s.path]) for s in sites if s.path in exp.refused])
    graph_outputs = [o.name for o in model.graph.output]
    for scale, ref, out in runs:
        for o in graph_outputs:
            r = np.asarray(ref[o])
            if r.shape != np.shape(out[o]) and r.size == np.size(out[o]):
                r = r.reshape(np.shape(out[o]))  # onnx.reference's Loop concatenates the scan outputs ONNX Runtime stacks
            e = measure(o, out[o], r)
            status = "non-finite" if not e.finite else ("ok" if e.rel_err <= tolerance(elem) else "fail")
            result.outputs.append({"scale": scale, "output": o, "status": status, "error": e.rel_err,
                                   "nonfinite": e.nonfinite, "numel": e.numel})
    for i, k in enumerate(keep):
        for scale, ref, out in runs:
            result.cases.append(_judge_body(model, sites[k], isolated[k], i, scale, ref, out, exp, types, elem, evaluator))
            progress(1)
    return result


def work(n_norms: int, n_scales: int) -> int:
    """The total :func:`probe_onnx` reports to its ``progress``: the graph's runs, then each (norm, scale)."""
    return n_scales * (1 + n_norms)


def _shapes(feeds: dict) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal arrays (float inputs, in their dtype) and zeros (integer inputs) of ``shapes``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph_inputs(model):
        elem = v.type.tensor_type.elem_type
        dt = onnx.helper.tensor_dtype_to_np_dtype(elem)
        shape = shapes[v.name]
        draw = rng.standard_normal(shape).astype(dt)
        feeds[v.name] = draw if is_float(draw) else np.zeros(shape, dt)
    return feeds


def graph_inputs(model: onnx.ModelProto) -> list:
    """The graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]
