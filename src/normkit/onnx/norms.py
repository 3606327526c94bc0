"""Where the normalizations of an ONNX graph are: the one set of recognizers that :func:`.harden.harden_onnx`
rewrites and ``normkit check model.onnx`` measures.

* **Native nodes** (:data:`NATIVE_OPS`): LRN, BatchNormalization, InstanceNormalization, LayerNormalization,
  GroupNormalization, RMSNormalization, and ONNX Runtime's contrib SimplifiedLayerNormalization,
  SkipLayerNormalization, SkipSimplifiedLayerNormalization, EmbedLayerNormalization.
* **Decomposed patterns** (onnxscript rewrite rules, :func:`rewrite_decomposed`, one rule class per pattern),
  each rewritten into one placeholder node ``ai.normkit.pending::Norm(x)`` that carries ``axes``, ``epsilon``
  and ``center``:

  - centred (LayerNorm, and GroupNorm / InstanceNorm when written over a reshaped or spatial axis)
    ``ReduceMean -> Sub -> (Pow(d, 2) | Mul(d, d)) -> ReduceMean -> Add eps -> Sqrt -> (Div | Reciprocal+Mul)``,
    optionally with a Cast of ``x - mean`` (torch's TorchScript exporter, float16 -> double);
  - RMSNorm ``(Pow(x, 2) | Mul(x, x)) -> ReduceMean -> Add eps -> Sqrt -> (Div | Reciprocal+Mul)``;
  - the ``E[x^2] - E[x]^2`` variance form: ``var = ReduceMean(x^2) - ReduceMean(x)^2``, then
    ``(x - mean) / Sqrt(var + eps)``;
  - TensorFlow's batch norm, ``x * scale + (offset - mean * scale)`` with ``scale = gamma * Rsqrt(var + eps)``,
    ``mean``/``var`` constants (placeholder ``BatchNormGiven``) or the batch moments of ``x`` (``Norm`` with
    ``gamma`` and ``offset`` as inputs);

  with ``axes`` as an attribute (opset < 18) or an input, and the inverse standard deviation as
  ``Div(d, Sqrt(v))``, ``Mul(d, Reciprocal(Sqrt(v)))``, ``Mul(d, Pow(v, -0.5))`` or ``Mul(d, Div(1, Sqrt(v)))``.
  The placeholder carries ``form``, the label, and ``nodes``, the names of the nodes it replaced. The
  rules match float32, float16 and bfloat16 inputs (:data:`FLOATS`, what harden rewrites) and, for the
  check, float64 too (:data:`MEASURED`).
* **Hardened regions**: the robust subgraphs :func:`.harden.harden_onnx` wrote, listed in the model's
  ``metadata_props`` under :data:`HARDENED_KEY` (what each replaced, its input and output value names).

:func:`find_norms` returns every one of them as a :class:`NormSite`, in topological order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern

PENDING = "ai.normkit.pending"  # domain of the placeholders between rewriting and rebuilding
MS = "com.microsoft"
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)  # hardened: float32 inside the subgraph
MEASURED = FLOATS + (ir.DataType.DOUBLE,)  # found by the check (a float64 graph is left as it is by harden)
HARDENED_KEY = "normkit.hardened"  # metadata_props entry: JSON list of the regions harden_onnx wrote

NATIVE_OPS = {
    ("", "LRN"), ("", "BatchNormalization"), ("", "InstanceNormalization"), ("", "LayerNormalization"),
    ("", "GroupNormalization"), ("", "RMSNormalization"), ("", "SimplifiedLayerNormalization"),
    (MS, "SimplifiedLayerNormalization"), (MS, "SkipLayerNormalization"), (MS, "SkipSimplifiedLayerNormalization"),
    (MS, "EmbedLayerNormalization"),
}


# ------------------------------------------------------------------------------------------ helpers
def const_array(v: ir.Value | None):
    """The constant behind ``v`` as a numpy array, or None."""
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def axes_of(axes) -> list[int] | None:
    """Axes from a constant input value or from an attribute."""
    if isinstance(axes, ir.Attr):
        return [int(a) for a in axes.value]
    arr = const_array(axes)
    return None if arr is None else [int(a) for a in np.atleast_1d(arr)]


def scalar_of(v) -> float | None:
    arr = const_array(v)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


# ------------------------------------------------------------------------------------------ patterns
class _NormRule(pattern.RewriteRuleClassBase):
    """Shared pieces, ``check`` and ``rewrite`` of the decomposed-pattern rules. ``check`` keeps the matched
    nodes' names, which ``rewrite`` (called next, for the same match) stores on the placeholder. ``dtypes``:
    the input types matched (:data:`FLOATS` when hardening; :data:`MEASURED` when the check looks)."""

    center = True
    axes_attr = False
    form = "LayerNorm"
    dtypes = FLOATS

    def _mean(self, op, t, axes):
        if self.axes_attr:
            return op.ReduceMean(t, axes=axes, _allow_other_attributes=True)
        return op.ReduceMean(t, axes, _allow_other_attributes=True)

    @staticmethod
    def _square(op, t, two):
        return pattern.OrValue([op.Pow(t, two), op.Mul(t, t)])

    @staticmethod
    def _inv_std(op, ve, half, one):
        """``1 / sqrt(ve)`` as exporters write it: ``Reciprocal(Sqrt(ve))``, ``Pow(ve, -0.5)`` (tf2onnx's
        Rsqrt) or ``Div(1, Sqrt(ve))`` (older torch.onnx's rsqrt)."""
        return pattern.OrValue([op.Reciprocal(op.Sqrt(ve)), op.Pow(ve, half), op.Div(one, op.Sqrt(ve))])

    def _normalize(self, op, d, var, eps, div, half, one):
        ve = op.Add(var, eps)
        return op.Div(d, op.Sqrt(ve)) if div else op.Mul(d, self._inv_std(op, ve, half, one))

    def _constants(self, result, x, eps, two=None, two2=None, half=None, one=None):
        """The checks every rule shares: the input type, the constants' values, eps a constant scalar."""
        if x.dtype not in self.dtypes:
            return result.fail(f"input type {x.dtype} is not matched")
        if any(t is not None and scalar_of(t) != 2.0 for t in (two, two2)):
            return result.fail("Pow exponent is not 2")
        if half is not None and scalar_of(half) != -0.5:
            return result.fail("Pow exponent is not -0.5")
        if one is not None and scalar_of(one) != 1.0:
            return result.fail("Div numerator is not 1")
        if scalar_of(eps) is None:
            return result.fail("eps is not a constant scalar")
        return result

    def _axes(self, result, axes1, axes2):
        a2 = axes_of(axes2)
        if a2 is None or (self.center and axes_of(axes1) != a2):
            return result.fail("axes are not equal constants")
        return result

    def _keep_names(self, context, result):
        self._matched = [n.name or n.op_type for n in reversed(context.nodes)]  # the matcher lists the root first
        return result

    def check(self, context, x, axes1, axes2, eps, two=None, two2=None, half=None, one=None, **_):
        result = self._constants(pattern.MatchResult(), x, eps, two, two2, half, one)
        return result if not result else self._keep_names(context, self._axes(result, axes1, axes2))

    def rewrite(self, op, x, axes2, eps, to=None, **_):
        out_type = int(to.value) if getattr(self, "cast", False) and to is not None else int(x.dtype)
        return op.Norm(x, _domain=PENDING, axes=axes_of(axes2), epsilon=scalar_of(eps), center=int(self.center),
                       out_type=out_type, form=self.form, nodes=list(getattr(self, "_matched", [])))


class _Decomposed(_NormRule):
    """``center`` (LayerNorm) or not (RMSNorm), axes as an input or an attribute, ``Div(d, std)`` or ``d``
    times the inverse std (:meth:`_NormRule._inv_std`), with or without a Cast of ``x - mean``."""

    def __init__(self, center: bool, axes_attr: bool, div: bool, cast: bool = False, dtypes=FLOATS):
        super().__init__(f"{'Layer' if center else 'RMS'}NormDecomposed{'Attr' if axes_attr else 'Input'}"
                         f"{'Div' if div else 'InvStd'}{'Cast' if cast else ''}")
        self.center, self.axes_attr, self.div, self.cast, self.dtypes = center, axes_attr, div, cast, dtypes
        self.form = "LayerNorm" if center else "RMSNorm"

    def pattern(self, op, x, axes1, axes2, two, eps, to, half, one):
        d = op.Sub(x, self._mean(op, x, axes1)) if self.center else x
        if self.cast:  # torch's TorchScript exporter: (x - mean) cast up (float16 -> double) before squaring
            d = op.Cast(d, to=to)
        return self._normalize(op, d, self._mean(op, self._square(op, d, two), axes2), eps, self.div, half, one)


class _MeanOfSquares(_NormRule):
    """The ``E[x^2] - E[x]^2`` variance form: ``var = mean(x^2) - mean(x)^2``, ``(x - mean) / sqrt(var + eps)``
    (the variance cancels catastrophically at large offsets and overflows with ``x^2``)."""

    form = "LayerNorm, E[x^2] - E[x]^2 variance"

    def __init__(self, axes_attr: bool, div: bool, dtypes=FLOATS):
        super().__init__(f"LayerNormMeanOfSquares{'Attr' if axes_attr else 'Input'}{'Div' if div else 'InvStd'}")
        self.axes_attr, self.div, self.dtypes = axes_attr, div, dtypes

    def pattern(self, op, x, axes1, axes2, two, two2, eps, half, one):
        mean = self._mean(op, x, axes1)
        var = op.Sub(self._mean(op, self._square(op, x, two), axes2), self._square(op, mean, two2))
        return self._normalize(op, op.Sub(x, mean), var, eps, self.div, half, one)


class _TFBatchNorm(_NormRule):
    """TensorFlow's batch norm as ``tf.nn.batch_normalization`` writes it and tf2onnx exports it:
    ``y = x * scale + (offset - mean * scale)`` with ``scale = gamma * inv_std(var + eps)`` (or the inverse
    std alone without ``gamma``; :meth:`_NormRule._inv_std`: Rsqrt as ``Pow(v, -0.5)`` or
    ``Reciprocal(Sqrt)`` or ``Div(1, Sqrt)``), the shift ``Neg(mean * scale)`` without ``offset``.
    ``moments``: ``mean = ReduceMean(x, axes)`` and ``var = ReduceMean((x - mean)^2, axes)`` (``tf.nn.moments``,
    training) -- placeholder ``Norm`` with ``gamma`` and ``offset`` as inputs; else ``mean`` and ``var`` are
    constants (inference) -- placeholder ``BatchNormGiven(x, mean, var, gamma, offset)``. ``x * scale``
    overflows where ``(x - mean) * scale`` would not, and cancels against ``mean * scale`` at offsets."""

    def __init__(self, moments: bool, gamma: bool, offset: bool, axes_attr: bool = False, dtypes=FLOATS):
        super().__init__(f"TFBatchNorm{'Moments' if moments else 'Given'}{'Gamma' if gamma else ''}"
                         f"{'Offset' if offset else 'Neg'}{'Attr' if axes_attr and moments else ''}")
        self.moments, self.gamma, self.offset, self.axes_attr, self.dtypes = moments, gamma, offset, axes_attr, dtypes
        self.form = "TF batch norm, batch moments" if moments else "TF batch norm, given statistics"

    def _tail(self, op, x, mean, var, gamma, offset, eps, half, one):
        inv = self._inv_std(op, op.Add(var, eps), half, one)
        scale = op.Mul(gamma, inv) if self.gamma else inv
        shift = op.Sub(offset, op.Mul(mean, scale)) if self.offset else op.Neg(op.Mul(mean, scale))
        return op.Add(op.Mul(x, scale), shift)

    def pattern(self, op, x, mean, var, gamma, offset, eps, half, one, axes1, axes2, two):
        if self.moments:
            mean = self._mean(op, x, axes1)
            var = self._mean(op, self._square(op, op.Sub(x, mean), two), axes2)
        return self._tail(op, x, mean, var, gamma, offset, eps, half, one)

    def check(self, context, x, eps, mean=None, var=None, axes1=None, axes2=None, two=None, half=None, one=None, **_):
        result = self._constants(pattern.MatchResult(), x, eps, two, None, half, one)
        if not result:
            return result
        if self.moments:
            result = self._axes(result, axes1, axes2)
        elif const_array(mean) is None or const_array(var) is None:
            return result.fail("mean and var are not constants")
        return result if not result else self._keep_names(context, result)

    def rewrite(self, op, x, eps, mean=None, var=None, gamma=None, offset=None, axes2=None, **_):
        names = list(getattr(self, "_matched", []))
        if self.moments:
            return op.Norm(x, gamma, offset, _domain=PENDING, axes=axes_of(axes2), epsilon=scalar_of(eps), center=1,
                           out_type=int(x.dtype), form=self.form, nodes=names)
        return op.BatchNormGiven(x, mean, var, gamma, offset, _domain=PENDING, epsilon=scalar_of(eps), form=self.form,
                                 nodes=names)


def _tf_rules(dtypes) -> list:
    return [_TFBatchNorm.rule(m, g, o, a, dtypes) for m in (True, False) for g in (True, False) for o in (True, False)
            for a in ((False, True) if m else (False,))]


def _may_hold_tf_batch_norm(model: ir.Model) -> bool:
    """Whether some ``Add`` takes a ``Sub(_, Mul)`` or ``Neg(Mul)``: what TensorFlow's batch norm needs, checked
    before its rules run (their commuted variants are most of the matching time on a graph without one)."""
    def from_mul(v):
        return v is not None and v.producer() is not None and v.producer().op_type == "Mul"

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Add":
            for v in node.inputs:
                p = v.producer() if v is not None else None
                if p is not None and ((p.op_type == "Sub" and from_mul(p.inputs[1])) or (p.op_type == "Neg" and from_mul(p.inputs[0]))):
                    return True
    return False


def rewrite_decomposed(model: ir.Model, dtypes=FLOATS) -> None:
    """Apply every decomposed-pattern rule to ``model`` and its bodies (commutative matching of Add/Mul
    operands), matching inputs of ``dtypes``: each pattern becomes one placeholder node. TensorFlow's batch
    norm goes first (only where :func:`_may_hold_tf_batch_norm`): its ``x * inv_std`` is no RMS norm's."""
    if _may_hold_tf_batch_norm(model):
        pattern.RewriteRuleSet(_tf_rules(dtypes), commute=True).apply_to_model(model)
    rules = [_Decomposed.rule(c, a, d, t, dtypes) for c, t in ((True, True), (True, False), (False, False))
             for a in (False, True) for d in (True, False)]
    rules += [_MeanOfSquares.rule(a, d, dtypes) for a in (False, True) for d in (True, False)]
    pattern.RewriteRuleSet(rules, commute=True).apply_to_model(model)


# ------------------------------------------------------------------------------------------ sites
@dataclass
class NormSite:
    """One normalization in a graph.

    ``name``: the node's name (a pattern: its last node's); ``op``: the op type or ``decomposed <form>``
    (``normkit <what it replaced>`` for a hardened region); ``kind``: how its statistics are formed
    (``center``/``rms`` over ``axes``, ``given`` for inference BatchNormalization, ``group``, ``lrn``,
    ``skip``/``skip_rms``, ``embed``); ``nodes``: the node names it spans; ``inputs``/``outputs``: value
    names (data input first, constants left out; the outputs measured); ``where``: empty in the main graph,
    else the If/Loop/Scan body holding it, in words (``If 'if' then_branch``; nested bodies joined by
    `` > ``); ``path``: the same as ``(first output of the node holding the body, attribute name)`` pairs,
    outermost first (see :func:`body_of`)."""

    name: str
    op: str
    kind: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    where: str = ""
    hardened: bool = False
    path: tuple = ()

    def label(self) -> str:
        extra = f" (+{len(self.nodes) - 1} nodes)" if len(self.nodes) > 1 else ""
        return f"{self.name}{extra}"


def _is_const(v: ir.Value) -> bool:
    if v.is_initializer() or v.const_value is not None:
        return True
    p = v.producer()
    return p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx")


def _kind(op: str, center: bool = True) -> str:
    return {"LayerNormalization": "center", "RMSNormalization": "rms", "SimplifiedLayerNormalization": "rms",
            "SkipLayerNormalization": "skip", "SkipSimplifiedLayerNormalization": "skip_rms",
            "BatchNormalization": "given", "InstanceNormalization": "instance", "GroupNormalization": "group",
            "LRN": "lrn", "EmbedLayerNormalization": "embed"}.get(op, "center" if center else "rms")


def site_of(node: ir.Node, where: str = "", path: tuple = ()) -> NormSite | None:
    """The :class:`NormSite` of a native node or a pattern placeholder, or None."""
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    outputs = [v.name for v in node.outputs[:1]]
    if node.domain == PENDING and node.op_type in ("Norm", "BatchNormGiven"):
        names = list(attr(node, "nodes", [])) or [node.name]
        center = bool(attr(node, "center", 1))
        given = node.op_type == "BatchNormGiven"
        attrs = {"epsilon": float(attr(node, "epsilon", 0.0))}
        if not given:
            attrs["axes"] = list(attr(node, "axes", [-1]))
        inputs = [node.inputs[0].name] + [v.name for v in node.inputs[1:] if v is not None and not _is_const(v)]
        return NormSite(names[-1], f"decomposed {attr(node, 'form', 'LayerNorm' if center else 'RMSNorm')}",
                        "given" if given else _kind("", center), names, inputs, outputs, attrs, where, path=path)
    if key not in NATIVE_OPS:
        return None
    inputs = [v.name for v in node.inputs if v is not None and not _is_const(v)]
    attrs = {k: a.value for k, a in node.attributes.items() if a.type in (ir.AttributeType.INT, ir.AttributeType.FLOAT)}
    return NormSite(node.name or node.op_type, node.op_type, _kind(node.op_type), [node.name or node.op_type],
                    inputs, outputs, attrs, where, path=path)


def bodies(node: ir.Node, where: str = "", path: tuple = ()):
    """``(body graph, where, path)`` of each If/Loop/Scan body (graph attribute) of ``node``, ``where`` and
    ``path`` being those of the graph holding ``node`` (see :class:`NormSite`)."""
    for a in node.attributes.values():
        graphs = [a.value] if a.type == ir.AttributeType.GRAPH else a.value if a.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            here = f"{node.op_type} {node.name!r} {a.name}"
            yield g, f"{where} > {here}" if where else here, path + ((node.outputs[0].name, a.name),)


def body_of(graph: onnx.GraphProto, path) -> onnx.GraphProto | None:
    """The body graph at ``path`` (:attr:`NormSite.path`) inside ``graph``, or None."""
    for out, name in path:
        node = next((n for n in graph.node if n.output and n.output[0] == out), None)
        a = next((a for a in node.attribute if a.name == name and a.type == onnx.AttributeProto.GRAPH), None) if node else None
        if a is None:
            return None
        graph = a.g
    return graph


def _walk(graph: ir.Graph, where: str, path: tuple, out: list[NormSite]) -> None:
    for node in graph:
        site = site_of(node, where, path)
        if site is not None:
            out.append(site)
        for g, w, p in bodies(node, where, path):
            _walk(g, w, p, out)


def hardened_regions(proto: onnx.ModelProto) -> list[dict]:
    """The regions :func:`.harden.harden_onnx` recorded in ``proto``'s metadata (empty for other files)."""
    for p in proto.metadata_props:
        if p.key == HARDENED_KEY:
            try:
                return list(json.loads(p.value))
            except ValueError:
                return []
    return []


def find_norms(proto: onnx.ModelProto) -> list[NormSite]:
    """Every normalization in ``proto`` (see the module docstring): native nodes and decomposed patterns
    in topological order (model-local functions inlined first: the value names are then the inlined
    model's; those inside If/Loop/Scan bodies carry ``where`` and ``path`` and come after the main graph's),
    then the regions a previous ``harden_onnx`` wrote, by the values they connect."""
    from onnx.inliner import inline_local_functions

    if proto.functions:
        proto = inline_local_functions(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # custom domains or partial models: keep the types we have
        pass
    model = ir.serde.deserialize_model(proto)
    rewrite_decomposed(model, MEASURED)
    sites: list[NormSite] = []
    _walk(model.graph, "", (), sites)
    position = {i.name: -1 for i in proto.graph.input}
    position.update({o: k for k, n in enumerate(proto.graph.node) for o in n.output})
    for r in hardened_regions(proto):
        path = tuple(tuple(p) for p in r.get("path", ()))
        body = body_of(proto.graph, path)
        known = position if not path else {o for n in body.node for o in n.output} if body is not None else set()
        if body is not None and all(v in known for v in r["outputs"]) and (path or all(v in known for v in r["inputs"])):
            sites.append(NormSite(r["name"], f"normkit ({r['op']})", r["kind"], r["nodes"], r["inputs"], r["outputs"],
                                  r.get("attrs", {}), r.get("where", ""), hardened=True, path=path))
    # topological order: by the position of the node that produces the first output; a norm inside a body at
    # the node holding the body (its outermost one), after the norms before it, in the body's own order
    def order(s):
        if not s.path:
            return position.get(s.outputs[0], len(position)) if s.outputs else 0, 0, 0
        body = body_of(proto.graph, s.path)
        inner = {o: k for k, n in enumerate(body.node) for o in n.output} if body is not None else {}
        return position.get(s.path[0][0], len(position)), 1, inner.get(s.outputs[0], 0) if s.outputs else 0
    return sorted(sites, key=order)
