"""Harden an ONNX model: replace every normalization node, and the decomposed LayerNorm / RMSNorm
patterns that exporters emit, by normkit's robust primitive-op subgraphs (:mod:`.subgraphs`), leaving
the rest of the graph untouched.

Two passes over an ``onnx_ir`` model:

1. onnxscript's pattern rewriter finds the decomposed patterns
   ``ReduceMean -> Sub -> (Pow(d, 2) | Mul(d, d)) -> ReduceMean -> Add eps -> Sqrt -> (Div | Reciprocal+Mul)``
   (LayerNorm) and ``(Pow(x, 2) | Mul(x, x)) -> ReduceMean -> Add eps -> Sqrt -> (Div | Reciprocal+Mul)``
   (RMSNorm), with ``axes`` as an attribute (opset < 18) or an input, and rewrites each into one
   placeholder node. A following scale ``Mul`` and bias ``Add`` are left where they are: they act on the
   normalized values, which the robust subgraph keeps in range.
2. Every native node (LRN, BatchNormalization in inference mode, InstanceNormalization,
   LayerNormalization, GroupNormalization, RMSNormalization, com.microsoft SimplifiedLayerNormalization,
   SkipLayerNormalization, SkipSimplifiedLayerNormalization) and every placeholder is replaced by a
   subgraph built with :class:`.subgraphs.Builder`. A node that cannot be replaced safely (a training-mode
   BatchNormalization, a LayerNormalization whose Mean/InvStdDev outputs are used, an unknown input type)
   is left and reported with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from . import subgraphs as sg
from ._errors import OnnxError

PENDING = "ai.normkit.pending"  # domain of the placeholders between the two passes
MS = "com.microsoft"
MIN_OPSET = 11
MAX_OPSET = 25
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)

NATIVE_OPS = {
    ("", "LRN"), ("", "BatchNormalization"), ("", "InstanceNormalization"), ("", "LayerNormalization"),
    ("", "GroupNormalization"), ("", "RMSNormalization"), ("", "SimplifiedLayerNormalization"),
    (MS, "SimplifiedLayerNormalization"), (MS, "SkipLayerNormalization"), (MS, "SkipSimplifiedLayerNormalization"),
}


@dataclass
class Replacement:
    """One node (or decomposed pattern) that was replaced, or left with ``reason``."""

    name: str
    op_type: str
    replaced: bool = True
    reason: str = ""


@dataclass
class HardenReport:
    replacements: list[Replacement] = field(default_factory=list)

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
        lines += [f"left {r.op_type} {r.name!r}: {r.reason}" for r in self.skipped]
        return "\n".join(lines)


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


# ------------------------------------------------------------------------------------------ pass 1
def _const(v: ir.Value | None):
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _axes_of(axes) -> list[int] | None:
    """Axes from a constant input value or from an attribute."""
    if isinstance(axes, ir.Attr):
        return [int(a) for a in axes.value]
    arr = _const(axes)
    return None if arr is None else [int(a) for a in np.atleast_1d(arr)]


def _scalar(v) -> float | None:
    arr = _const(v)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


class _Decomposed(pattern.RewriteRuleClassBase):
    """The decomposed-pattern rules: ``center`` (LayerNorm) or not (RMSNorm), axes as an input or an
    attribute, ``Div(d, std)`` or ``Mul(d, Reciprocal(std))``."""

    def __init__(self, center: bool, axes_attr: bool, div: bool):
        super().__init__(f"{'Layer' if center else 'RMS'}NormDecomposed{'Attr' if axes_attr else 'Input'}"
                         f"{'Div' if div else 'Reciprocal'}")
        self.center, self.axes_attr, self.div = center, axes_attr, div

    def _mean(self, op, t, axes):
        if self.axes_attr:
            return op.ReduceMean(t, axes=axes, _allow_other_attributes=True)
        return op.ReduceMean(t, axes, _allow_other_attributes=True)

    def pattern(self, op, x, axes1, axes2, two, eps):
        d = op.Sub(x, self._mean(op, x, axes1)) if self.center else x
        sq = pattern.OrValue([op.Pow(d, two), op.Mul(d, d)])
        std = op.Sqrt(op.Add(self._mean(op, sq, axes2), eps))
        return op.Div(d, std) if self.div else op.Mul(d, op.Reciprocal(std))

    def check(self, context, x, axes1, axes2, eps, two=None, **_):
        result = pattern.MatchResult()
        if two is not None and _scalar(two) != 2.0:
            return result.fail("Pow exponent is not 2")
        a2 = _axes_of(axes2)
        if a2 is None or (self.center and _axes_of(axes1) != a2):
            return result.fail("axes are not equal constants")
        if _scalar(eps) is None:
            return result.fail("eps is not a constant scalar")
        return result

    def rewrite(self, op, x, axes2, eps, **_):
        return op.Norm(x, _domain=PENDING, axes=_axes_of(axes2), epsilon=_scalar(eps), center=int(self.center))


def _decomposed_rules() -> pattern.RewriteRuleSet:
    rules = [_Decomposed.rule(c, a, d) for c in (True, False) for a in (False, True) for d in (True, False)]
    return pattern.RewriteRuleSet(rules, commute=True)


# ------------------------------------------------------------------------------------------ pass 2
def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


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
    x = node.inputs[0]
    dtype = x.dtype if x is not None else None
    if dtype not in FLOATS:
        return f"input type {dtype} (float32 and float16 are hardened)"
    rank = x.shape.rank() if x.shape is not None else None
    extra_used = [i for i, v in enumerate(node.outputs[1:], 1) if _used(v, graph)]
    eps = float(_attr(node, "epsilon", 1e-5))

    if dom == PENDING and op == "LRN":
        size = int(_attr(node, "size", 1))
        return [sg.lrn(g, x, size, float(_attr(node, "alpha", 1e-4)) / size, float(_attr(node, "beta", 0.75)),
                       float(_attr(node, "bias", 1.0)), int(_attr(node, "lo", 0)), int(_attr(node, "hi", 0)), dtype)]
    if dom == PENDING and op == "RMSNormalization":
        axes = _trailing_axes(int(_attr(node, "axis", -1)), rank)
        return [sg.rms_norm(g, x, _opt(node, 1), axes, eps, dtype)]
    if dom == PENDING:
        axes = list(_attr(node, "axes", [-1]))
        if any(a >= 0 for a in axes):
            if rank is None:
                return "non-negative axes on an input of unknown rank"
            axes = [a - rank for a in axes]
        if _attr(node, "center", 1):
            return [sg.layer_norm(g, x, None, None, axes, eps, dtype)]
        return [sg.rms_norm(g, x, None, axes, eps, dtype)]
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
        per_channel = g.opset >= 21
        return [sg.group_norm(g, x, node.inputs[1], node.inputs[2], groups, eps, dtype, per_channel)]
    if op == "LRN":
        size = int(_attr(node, "size", 0))
        if size < 1:
            return "size missing"
        return [sg.lrn(g, x, size, float(_attr(node, "alpha", 1e-4)) / size, float(_attr(node, "beta", 0.75)),
                       float(_attr(node, "bias", 1.0)), (size - 1) // 2, size // 2, dtype)]
    return "not a normalization"


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


def _harden_graph(graph: ir.Graph, opset: int, report: HardenReport) -> None:
    for idx, node in enumerate(list(graph)):
        key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        if key not in NATIVE_OPS and node.domain != PENDING:
            continue
        label = node.op_type
        if node.domain == PENDING and node.op_type == "Norm":
            label = "decomposed " + ("LayerNorm" if _attr(node, "center", 1) else "RMSNorm")
        g = sg.Builder(opset, prefix=f"normkit{idx}_{(node.name or node.op_type)}")
        outs = _build(node, g, graph)
        if isinstance(outs, str):
            report.replacements.append(Replacement(node.name or "", label, False, outs))
            continue
        graph.insert_before(node, g.nodes)
        _replace(graph, node, outs)
        report.replacements.append(Replacement(node.name or "", label))


def harden_ir(model: ir.Model, report: HardenReport | None = None) -> HardenReport:
    """Harden an ``onnx_ir`` model in place; returns the report."""
    report = report or HardenReport()
    opset = model.opset_imports.get("", None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxError(f"unsupported opset {opset}: normkit hardens models with opset {MIN_OPSET} to {MAX_OPSET}")
    _decomposed_rules().apply_to_model(model)
    _harden_graph(model.graph, opset, report)
    left = [n for n in model.graph if n.domain == PENDING]
    if left:  # cannot happen unless a placeholder was skipped: keep the model valid by refusing
        raise OnnxError(f"internal: {len(left)} decomposed normalization(s) could not be rebuilt: "
                        + "; ".join(r.reason for r in report.skipped))
    model.opset_imports.pop(PENDING, None)
    RemoveUnusedNodesPass()(model)  # the constants the decomposed patterns used
    return report


def harden_onnx(src, dst=None):
    """Replace every normalization in an ONNX model by normkit's robust primitive-op subgraph.

    ``src``: a path or an ``onnx.ModelProto``; ``dst``: a path to save to (optional). Returns
    ``(hardened ModelProto, HardenReport)``. Raises :class:`OnnxError` (one line) for a missing file, a
    file that is not ONNX, or an opset outside 11..25.
    """
    proto = load_model(src)
    default_opset(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # custom domains or partial models: keep the types we have
        pass
    model = ir.serde.deserialize_model(proto)
    report = harden_ir(model)
    out = finalize(ir.serde.serialize_model(model))
    if dst is not None:
        onnx.save(out, os.fspath(dst))
    return out, report
