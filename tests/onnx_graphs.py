"""Hand-built ONNX graphs (onnx.helper) of every native normalization node and of the decomposed
LayerNorm / RMSNorm patterns exporters emit, with float64 numpy references, for tests/test_onnx.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

NP = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16}


def _model(nodes, x_shape, inits, opset, elem=TP.FLOAT, domains=(), n_out=1):
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", elem, x_shape)],
                      [oh.make_tensor_value_info(f"y{i}" if i else "y", elem, None) for i in range(n_out)],
                      [nh.from_array(np.asarray(v, dtype=NP[elem] if v.dtype.kind == "f" else v.dtype), k) for k, v in inits.items()])
    ops = [oh.make_opsetid("", opset)] + [oh.make_opsetid(d, 1) for d in domains]
    return oh.make_model(g, opset_imports=ops, ir_version=10)


def _lin(n, lo, hi):
    return np.linspace(lo, hi, n)


# ----------------------------------------------------------------------------------------- references
def ref_standardize(x, axes, eps, center=True):
    x = x.astype(np.float64)
    m = x.mean(axis=axes, keepdims=True) if center else 0.0
    v = ((x - m) ** 2).mean(axis=axes, keepdims=True)
    return (x - m) / np.sqrt(v + eps)


def ref_lrn(x, size, alpha, beta, bias, lo, hi):
    x = x.astype(np.float64)
    c = x.shape[1]
    sq = np.zeros_like(x)
    for i in range(c):
        a, b = max(0, i - lo), min(c - 1, i + hi)
        sq[:, i] = (x[:, a:b + 1] ** 2).sum(axis=1)
    return x / (bias + alpha / size * sq) ** beta


# ----------------------------------------------------------------------------------------- native nodes
C, H = 6, 5


def native_cases(elem=TP.FLOAT):
    """name -> (model, x_shape, reference function of x)."""
    s, b = _lin(C, 0.5, 1.5), _lin(C, -1, 1)
    rm, rv = _lin(C, -2, 2), _lin(C, 0.5, 3.0)
    cases = {}
    cases["LRN"] = (_model([oh.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-3, beta=0.75, bias=2.0)], ["N", C, H, H], {}, 13, elem),
                    lambda x: ref_lrn(x, 5, 1e-3, 0.75, 2.0, 2, 2))
    cases["LRN_even"] = (_model([oh.make_node("LRN", ["x"], ["y"], size=4, alpha=1e-2, beta=0.6, bias=1.0)], ["N", C, H, H], {}, 13, elem),
                         lambda x: ref_lrn(x, 4, 1e-2, 0.6, 1.0, 1, 2))
    cases["BatchNormalization"] = (
        _model([oh.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5, momentum=0.9)],
               ["N", C, H, H], {"s": s, "b": b, "m": rm, "v": rv}, 15, elem),
        lambda x: (x.astype(np.float64) - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) * s[:, None, None] + b[:, None, None])
    cases["InstanceNormalization"] = (
        _model([oh.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)], ["N", C, H, H], {"s": s, "b": b}, 18, elem),
        lambda x: ref_standardize(x, (2, 3), 1e-5) * s[:, None, None] + b[:, None, None])
    cases["LayerNormalization"] = (
        _model([oh.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)], ["N", 3, C], {"s": s, "b": b}, 17, elem),
        lambda x: ref_standardize(x, (-1,), 1e-5) * s + b)
    cases["LayerNormalization_axis1"] = (
        _model([oh.make_node("LayerNormalization", ["x", "s"], ["y"], axis=1, epsilon=1e-3)], ["N", 3, C],
               {"s": np.ones((3, C))}, 17, elem),
        lambda x: ref_standardize(x, (1, 2), 1e-3))
    g = 2
    sg, bg = _lin(g, 0.5, 1.5), _lin(g, -1, 1)
    cases["GroupNormalization18"] = (
        _model([oh.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=g, epsilon=1e-5)], ["N", C, H, H],
               {"s": sg, "b": bg}, 18, elem),
        lambda x: (ref_standardize(x.reshape(x.shape[0], g, -1), (2,), 1e-5) * sg[:, None] + bg[:, None]).reshape(x.shape))
    cases["GroupNormalization21"] = (
        _model([oh.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=g, epsilon=1e-5)], ["N", C, H, H],
               {"s": s, "b": b}, 21, elem),
        lambda x: ref_standardize(x.reshape(x.shape[0], g, -1), (2,), 1e-5).reshape(x.shape) * s[:, None, None] + b[:, None, None])
    cases["RMSNormalization"] = (
        _model([oh.make_node("RMSNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-6)], ["N", 3, C], {"s": s}, 23, elem),
        lambda x: ref_standardize(x, (-1,), 1e-6, center=False) * s)
    return cases


def ms_cases(elem=TP.FLOAT):
    """ONNX Runtime's contrib normalization nodes (com.microsoft)."""
    s, b = _lin(C, 0.5, 1.5), _lin(C, -1, 1)
    skip = np.linspace(-1, 1, 3 * C).reshape(3, C)
    cases = {}
    cases["SimplifiedLayerNormalization"] = (
        _model([oh.make_node("SimplifiedLayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-6)], ["N", 3, C], {"s": s}, 17, elem),
        lambda x: ref_standardize(x, (-1,), 1e-6, center=False) * s)
    cases["SkipLayerNormalization"] = (
        _model([oh.make_node("SkipLayerNormalization", ["x", "skip", "s", "b"], ["y"], domain="com.microsoft", epsilon=1e-5)],
               ["N", 3, C], {"skip": skip, "s": s, "b": b}, 17, elem, ["com.microsoft"]),
        lambda x: ref_standardize(x.astype(np.float64) + skip, (-1,), 1e-5) * s + b)
    cases["SkipSimplifiedLayerNormalization"] = (
        _model([oh.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "s"], ["y"], domain="com.microsoft", epsilon=1e-5)],
               ["N", 3, C], {"skip": skip, "s": s}, 17, elem, ["com.microsoft"]),
        lambda x: ref_standardize(x.astype(np.float64) + skip, (-1,), 1e-5, center=False) * s)
    return cases


# ----------------------------------------------------------------------------------------- decomposed
def decomposed(center: bool, axes_attr: bool, square: str, normalize: str, affine: bool, elem=TP.FLOAT, cast: bool = False):
    """The decomposed LayerNorm (``center``) or RMSNorm pattern over the last axis, as exporters write it:
    ``axes`` as an attribute (opset 17) or an input (opset 18); ``square`` "pow" or "mul"; ``normalize``
    "div" or "reciprocal"; optional scale and bias; ``cast``: computed in float32 between Casts."""
    opset = 17 if axes_attr else 18
    nodes, inits = [], {}
    x = "x"
    if cast:
        nodes.append(oh.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT))
        x = "xf"
    cdt = TP.FLOAT if cast else elem
    nodes.append(oh.make_node("Constant", [], ["eps"], value=oh.make_tensor("eps", cdt, [], [1e-5])))

    def mean(inp, out):
        if axes_attr:
            nodes.append(oh.make_node("ReduceMean", [inp], [out], axes=[-1], keepdims=1))
        else:
            nodes.append(oh.make_node("ReduceMean", [inp, "axes"], [out], keepdims=1))

    if not axes_attr:
        nodes.append(oh.make_node("Constant", [], ["axes"], value=oh.make_tensor("axes", TP.INT64, [1], [-1])))
    d = x
    if center:
        mean(x, "mu")
        nodes.append(oh.make_node("Sub", [x, "mu"], ["d"]))
        d = "d"
    if square == "pow":
        nodes.append(oh.make_node("Constant", [], ["two"], value=oh.make_tensor("two", cdt, [], [2.0])))
        nodes.append(oh.make_node("Pow", [d, "two"], ["sq"]))
    else:
        nodes.append(oh.make_node("Mul", [d, d], ["sq"]))
    mean("sq", "var")
    nodes += [oh.make_node("Add", ["var", "eps"], ["ve"]), oh.make_node("Sqrt", ["ve"], ["sd"])]
    if normalize == "div":
        nodes.append(oh.make_node("Div", [d, "sd"], ["n"]))
    else:
        nodes += [oh.make_node("Reciprocal", ["sd"], ["r"]), oh.make_node("Mul", [d, "r"], ["n"])]
    out = "n"
    if cast:
        nodes.append(oh.make_node("Cast", ["n"], ["nc"], to=elem))
        out = "nc"
    s, b = _lin(C, 0.5, 1.5), _lin(C, -1, 1)
    if affine:
        inits = {"s": s, "b": b}
        nodes += [oh.make_node("Mul", [out, "s"], ["ns"]), oh.make_node("Add", ["ns", "b"], ["y"])]
    else:
        nodes.append(oh.make_node("Identity", [out], ["y"]))
    model = _model(nodes, ["N", 3, C], inits, opset, elem)

    def ref(xv):
        y = ref_standardize(xv, (-1,), 1e-5, center)
        return y * s + b if affine else y

    return model, ref


def cast_model(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """``model`` with its float32 inputs, outputs, initializers and constants in ``elem``."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for v in list(m.graph.input) + list(m.graph.output):
        if v.type.tensor_type.elem_type == TP.FLOAT:
            v.type.tensor_type.elem_type = elem
    for t in m.graph.initializer:
        if t.data_type == TP.FLOAT:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(NP[elem]), t.name))
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TP.FLOAT:
                a.t.CopyFrom(nh.from_array(nh.to_array(a.t).astype(NP[elem]), a.t.name))
    return m
