"""Harden an ONNX model: replace every normalization node, and the decomposed LayerNorm / RMSNorm /
group / instance norm patterns that exporters emit, by normkit's robust primitive-op subgraphs
(:mod:`.subgraphs`), leaving the rest of the graph untouched.

Model-local functions that hold a normalization are inlined first (their bodies are untyped). Then two
passes over an ``onnx_ir`` model, the main graph and every If/Loop/Scan body in it:

1. onnxscript's pattern rewriter applies the recognizers of :mod:`.norms` (the same ones
   ``normkit check model.onnx`` uses): each decomposed pattern -- centred or RMS, the ``E[x^2] - E[x]^2``
   variance form, axes as an attribute or an input -- becomes one placeholder node. A following scale
   ``Mul`` and bias ``Add`` are left where they are: they act on the normalized values, which the robust
   subgraph keeps in range.
2. Every native node (LRN, BatchNormalization in inference mode, InstanceNormalization,
   LayerNormalization, GroupNormalization, RMSNormalization, com.microsoft SimplifiedLayerNormalization,
   SkipLayerNormalization, SkipSimplifiedLayerNormalization, EmbedLayerNormalization) and every
   placeholder is replaced by a subgraph built with :class:`.subgraphs.Builder`. A node that cannot be
   replaced safely (a training-mode BatchNormalization, a LayerNormalization whose Mean/InvStdDev outputs
   are used, an unknown input type) is left and reported with the reason.

Each replacement is recorded in the model's ``metadata_props`` (:data:`.norms.HARDENED_KEY`: what it
replaced, the value names its subgraph connects), so that ``normkit check`` measures the hardened file
norm by norm.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from . import subgraphs as sg
from ._errors import OnnxError
from .norms import FLOATS, HARDENED_KEY, NATIVE_OPS, PENDING, attr as _attr, bodies, rewrite_decomposed, site_of

MIN_OPSET = 11
MAX_OPSET = 25


@dataclass
class Replacement:
    """One node (or decomposed pattern) that was replaced, or left with ``reason``."""

    name: str
    op_type: str
    replaced: bool = True
    reason: str = ""
    where: str = ""  # empty in the main graph, else the If/Loop body that holds it


@dataclass
class HardenReport:
    replacements: list[Replacement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which model-local functions were inlined

    @property
    def replaced(self) -> list[Replacement]:
        return [r for r in self.replacements if r.replaced]

    @property
    def skipped(self) -> list[Replacement]:
        return [r for r in self.replacements if not r.replaced]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.replaced:
            out[r.op_type] = out.get(r.op_type, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} normalization(s): "
                 + (", ".join(f"{k} x{v}" for k, v in sorted(self.counts().items())) or "none")]
        inside = sum(1 for r in self.replaced if r.where)
        if inside:
            lines[0] += f" ({inside} inside If/Loop bodies)"
        lines += [f"left {r.op_type} {r.name!r}: {r.reason}" for r in self.skipped]
        return "\n".join(lines + self.notes)


# ------------------------------------------------------------------------------------------ loading
def load_model(src) -> onnx.ModelProto:
    """A ModelProto from a path or a ModelProto, with a one-line :class:`OnnxError` for anything else."""
    if isinstance(src, onnx.ModelProto):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise OnnxError(f"expected a path or an onnx.ModelProto, got {type(src).__name__}")
    if not os.path.isfile(src):
        raise OnnxError(f"{os.fspath(src)}: no such file")
    try:
        model = onnx.load(os.fspath(src))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxError(f"{os.fspath(src)}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxError(f"{os.fspath(src)}: not an ONNX model (no graph)")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise OnnxError("the model imports no default-domain opset")


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Set the IR version to the lowest one the opsets need (ONNX Runtime 1.31 reads at most 13; onnx
    1.23 writes 14) and check the model."""
    opsets = [(o.domain or "", o.version) for o in model.opset_import if o.domain in ("", "ai.onnx", "ai.onnx.ml")]
    model.ir_version = max(8, min(onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid(d, v) for d, v in opsets], ignore_unknown=True), 13))
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        try:  # the checker wants a shape on every graph output: infer the ones the source lacked
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:
            pass
    keep = [v for v in model.graph.value_info if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)  # the checker wants a shape on every value_info entry
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------------------ pass 2
def _used(v: ir.Value | None, graph: ir.Graph) -> bool:
    return v is not None and (bool(v.uses()) or v in graph.outputs)


def _opt(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _trailing_axes(axis: int, rank: int | None) -> list[int] | None:
    if axis < 0:
        return list(range(axis, 0))
    return None if rank is None else list(range(axis - rank, 0))


def _build(node: ir.Node, g: sg.Builder, graph: ir.Graph):
    """Outputs (list, one per replaced output) for ``node``, or a string saying why it is left."""
    op, dom = node.op_type, node.domain
    if op == "EmbedLayerNormalization":
        return _embed_layer_norm(node, g, graph)
    x = node.inputs[0]
    dtype = x.dtype if x is not None else None
    if dtype not in FLOATS:
        return f"input type {dtype} (float32, float16 and bfloat16 are hardened)"
    rank = x.shape.rank() if x.shape is not None else None
    extra_used = [i for i, v in enumerate(node.outputs[1:], 1) if _used(v, graph)]
    eps = float(_attr(node, "epsilon", 1e-5))

    if dom == PENDING and op == "LRN":
        size = int(_attr(node, "size", 1))
        within = bool(_attr(node, "within_channel", 0))
        return [sg.lrn(g, x, size, float(_attr(node, "alpha", 1e-4)) / (size * size if within else size),
                       float(_attr(node, "beta", 0.75)), float(_attr(node, "bias", 1.0)), int(_attr(node, "lo", 0)),
                       int(_attr(node, "hi", 0)), dtype, within)]
    if dom == PENDING and op == "RMSNormalization":
        axes = _trailing_axes(int(_attr(node, "axis", -1)), rank)
        return [sg.rms_norm(g, x, _opt(node, 1), axes, eps, dtype)]
    if dom == PENDING and op == "BatchNormGiven":  # TensorFlow's, statistics broadcast as the graph holds them
        return [sg.batch_norm_given(g, x, _opt(node, 3), _opt(node, 4), node.inputs[1], node.inputs[2], eps, dtype)]
    if dom == PENDING and op == "Norm":
        axes = list(_attr(node, "axes", [-1]))
        if any(a >= 0 for a in axes):
            if rank is None:
                return "non-negative axes on an input of unknown rank"
            axes = [a - rank for a in axes]
        out_type = ir.DataType(int(_attr(node, "out_type", int(dtype))))
        if _opt(node, 1) is not None or _opt(node, 2) is not None:  # TensorFlow's batch moments: scale, offset inside
            return [sg.layer_norm(g, x, _opt(node, 1), _opt(node, 2), axes, eps, dtype)]
        if _attr(node, "center", 1):
            y = sg.standardize(g, g.to_f32(x, dtype), axes, eps)
        else:
            y = sg.standardize(g, g.to_f32(x, dtype), axes, eps, center=False)
        return [g.from_f32(y, out_type)]
    if op == "LayerNormalization":
        axes = _trailing_axes(int(_attr(node, "axis", -1)), rank)
        if axes is None:
            return "non-negative axis on an input of unknown rank"
        if int(_attr(node, "stash_type", 1)) != ir.DataType.FLOAT and extra_used:
            return "Mean/InvStdDev outputs in a stash_type other than float32"
        stats = [] if extra_used else None
        y = sg.layer_norm(g, x, _opt(node, 1), _opt(node, 2), axes, eps, dtype, stats)
        return [y] + (stats or [])
    if op in ("RMSNormalization", "SimplifiedLayerNormalization"):
        if extra_used:
            return "its InvStdDev output is used"
        axes = _trailing_axes(int(_attr(node, "axis", -1)), rank)
        if axes is None:
            return "non-negative axis on an input of unknown rank"
        return [sg.rms_norm(g, x, _opt(node, 1), axes, eps, dtype)]
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        if any(i in (1, 2) for i in extra_used):
            return "its Mean/InvStdDev outputs are used"
        skip_bias = _opt(node, 4) if op == "SkipLayerNormalization" else _opt(node, 3)
        s = g.op("Add", x, node.inputs[1])
        if skip_bias is not None:
            s = g.op("Add", s, skip_bias)
        if op == "SkipLayerNormalization":
            y = sg.layer_norm(g, s, _opt(node, 2), _opt(node, 3), [-1], eps, dtype)
        else:
            y = sg.rms_norm(g, s, _opt(node, 2), [-1], eps, dtype)
        outs = [y, None, None, s] if 3 in extra_used else [y]
        return outs
    if op == "BatchNormalization":
        if int(_attr(node, "training_mode", 0)) or extra_used:
            return "training mode (running statistics are updated)"
        return [sg.batch_norm_inference(g, x, node.inputs[1], node.inputs[2], node.inputs[3], node.inputs[4], eps, dtype)]
    if op == "InstanceNormalization":
        return [sg.group_norm(g, x, node.inputs[1], node.inputs[2], 0, eps, dtype)]
    if op == "GroupNormalization":
        groups = int(_attr(node, "num_groups", 0))
        if groups < 1:
            return "num_groups missing"
        per_channel = g.opset >= 21 or dom == PENDING  # GroupNormalization-18: scale and bias per group
        return [sg.group_norm(g, x, node.inputs[1], node.inputs[2], groups, eps, dtype, per_channel)]
    if op == "LRN":
        size = int(_attr(node, "size", 0))
        if size < 1:
            return "size missing"
        return [sg.lrn(g, x, size, float(_attr(node, "alpha", 1e-4)) / size, float(_attr(node, "beta", 0.75)),
                       float(_attr(node, "bias", 1.0)), (size - 1) // 2, size // 2, dtype)]
    return "not a normalization"


def _embed_layer_norm(node: ir.Node, g: sg.Builder, graph: ir.Graph):
    """com.microsoft EmbedLayerNormalization: ``emb = word[ids] + position[position_ids or 0..S-1]
    (+ segment[segment_ids])``, then LayerNorm over the hidden axis with ``gamma``/``beta``; outputs
    ``(y, mask_index, emb)`` with ``mask_index`` the per-row sum of ``mask`` (int32)."""
    ids, seg_ids, word, pos, seg, gamma, beta, mask, pos_ids = (_opt(node, i) for i in range(9))
    dtype = word.dtype if word is not None else None
    if dtype not in FLOATS:
        return f"embedding type {dtype} (float32, float16 and bfloat16 are hardened)"
    if _used(_opt_out(node, 1), graph) and mask is None:
        return "its mask_index output is used without a mask input"
    if pos_ids is None:  # positions 0..S-1, broadcast over the batch
        length = g.op("Gather", g.op("Shape", ids), g.const(1, np.int64))
        pos_ids = g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64))
    emb = g.op("Add", g.op("Gather", word, ids), g.op("Gather", pos, pos_ids))
    if seg_ids is not None and seg is not None:
        emb = g.op("Add", emb, g.op("Gather", seg, seg_ids))
    y = sg.layer_norm(g, emb, gamma, beta, [-1], float(_attr(node, "epsilon", 1e-12)), dtype)
    mask_index = None
    if mask is not None and _used(_opt_out(node, 1), graph):
        m = g.op("Cast", mask, to=ir.DataType.INT64)  # ReduceSum takes axes as an input from opset 13
        total = g.op("ReduceSum", m, g.ints([1]), keepdims=0) if g.opset >= 13 else g.op("ReduceSum", m, axes=[1], keepdims=0)
        mask_index = g.op("Cast", total, to=ir.DataType.INT32)
    return [y, mask_index, emb if _used(_opt_out(node, 2), graph) else None]


def _opt_out(node: ir.Node, i: int) -> ir.Value | None:
    return node.outputs[i] if len(node.outputs) > i else None


def _replace(graph: ir.Graph, node: ir.Node, outs: list) -> None:
    for old, new in zip(node.outputs, outs):
        if new is None or old is None:
            continue
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = f"{name}__replaced"
        new.name = name
        if old.type is not None and new.type is None:
            new.type, new.shape = old.type, old.shape
    graph.remove(node, safe=True)


def _region(node: ir.Node, outs: list, label: str, where: str, path: tuple) -> dict:
    """What :data:`.norms.HARDENED_KEY` records of one replacement: the node's label, how its statistics
    are formed, the nodes it replaced, the value names its subgraph connects, and the body holding it
    (:attr:`.norms.NormSite.where` and ``path``)."""
    site = site_of(node)
    return {"name": site.name if site else node.name or node.op_type, "op": label, "kind": site.kind if site else "center",
            "nodes": site.nodes if site else [node.name or node.op_type], "attrs": site.attrs if site else {},
            "inputs": [v.name for v in node.inputs if v is not None and not v.is_initializer()
                       and v.const_value is None and (v.producer() is None or v.producer().op_type != "Constant")],
            "outputs": [o.name for o, n in zip(node.outputs, outs) if n is not None], "where": where,
            "path": [list(p) for p in path]}


def _harden_graph(graph: ir.Graph, opset: int, report: HardenReport, where: str = "", regions: list | None = None,
                  path: tuple = ()) -> None:
    """Replace every normalization node of ``graph`` and of the If/Loop/Scan bodies inside it."""
    for idx, node in enumerate(list(graph)):
        for body, w, p in bodies(node, where, path):
            _harden_graph(body, opset, report, w, regions, p)
        key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        if key not in NATIVE_OPS and node.domain != PENDING:
            continue
        label = node.op_type
        if node.domain == PENDING and node.op_type in ("Norm", "BatchNormGiven"):
            label = "decomposed " + _attr(node, "form", "LayerNorm" if _attr(node, "center", 1) else "RMSNorm")
        prefix = f"normkit{idx}_{(node.name or node.op_type)}" if not where else f"normkit_{id(graph):x}_{idx}_{node.name or node.op_type}"
        g = sg.Builder(opset, prefix=prefix)
        outs = _build(node, g, graph)
        if isinstance(outs, str):
            report.replacements.append(Replacement(node.name or "", label, False, outs, where))
            continue
        if regions is not None:
            regions.append(_region(node, outs, label, where, path))
        graph.insert_before(node, g.nodes)
        _replace(graph, node, outs)
        report.replacements.append(Replacement(node.name or "", label, where=where))


def _inline_functions(proto: onnx.ModelProto, report: HardenReport) -> onnx.ModelProto:
    """Inline the model-local functions when any holds a normalization (a native node, or a ReduceMean
    that may start a decomposed pattern): their bodies are untyped, so they are hardened in place."""
    from onnx.inliner import inline_local_functions

    def holds_norm(f):
        return any((n.domain if n.domain != "ai.onnx" else "", n.op_type) in NATIVE_OPS or n.op_type == "ReduceMean"
                   for n in f.node)

    names = [f.name for f in proto.functions if holds_norm(f)]
    if not names:
        return proto
    report.notes.append(f"inlined {len(proto.functions)} model-local function(s) to reach the norms in "
                        + ", ".join(sorted(set(names))))
    return inline_local_functions(proto)


def harden_ir(model: ir.Model, report: HardenReport | None = None) -> HardenReport:
    """Harden an ``onnx_ir`` model in place; returns the report."""
    report = report or HardenReport()
    opset = model.opset_imports.get("", None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxError(f"unsupported opset {opset}: normkit hardens models with opset {MIN_OPSET} to {MAX_OPSET}")
    rewrite_decomposed(model)
    regions: list[dict] = []
    _harden_graph(model.graph, opset, report, regions=regions)
    left = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == PENDING]
    if left:  # cannot happen unless a placeholder was skipped: keep the model valid by refusing
        raise OnnxError(f"internal: {len(left)} decomposed normalization(s) could not be rebuilt: "
                        + "; ".join(r.reason for r in report.skipped))
    model.opset_imports.pop(PENDING, None)
    RemoveUnusedNodesPass()(model)  # the constants the decomposed patterns used
    old = [r for r in json.loads(model.metadata_props.get(HARDENED_KEY, "[]"))]
    model.metadata_props[HARDENED_KEY] = json.dumps(old + regions)
    return report


def harden_onnx(src, dst=None):
    """Replace every normalization in an ONNX model by normkit's robust primitive-op subgraph.

    ``src``: a path or an ``onnx.ModelProto``; ``dst``: a path to save to (optional). Returns
    ``(hardened ModelProto, HardenReport)``. Raises :class:`OnnxError` (one line) for a missing file, a
    file that is not ONNX, or an opset outside 11..25.
    """
    proto = load_model(src)
    default_opset(proto)
    report = HardenReport()
    proto = _inline_functions(proto, report)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # custom domains or partial models: keep the types we have
        pass
    model = ir.serde.deserialize_model(proto)
    harden_ir(model, report)
    out = finalize(ir.serde.serialize_model(model))
    if dst is not None:
        onnx.save(out, os.fspath(dst))
    return out, report
