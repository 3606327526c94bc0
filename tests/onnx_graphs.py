"""Hand-built ONNX graphs (onnx.helper) of every native normalization node and of the decomposed
LayerNorm / RMSNorm patterns exporters emit, with float64 numpy references, for tests/test_onnx.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

NP = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16, TP.BFLOAT16: ml_dtypes.bfloat16, TP.DOUBLE: np.float64}


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
    "div" (``d / Sqrt(v)``) or ``d`` times an inverse std (:func:`inv_std_nodes`: "reciprocal", "pow",
    "div1"); optional scale and bias; ``cast``: computed in float32 between Casts."""
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
    nodes.append(oh.make_node("Add", ["var", "eps"], ["ve"]))
    nodes += [oh.make_node("Mul", [d, "r"], ["n"])] if normalize != "div" else [oh.make_node("Div", [d, "sd"], ["n"])]
    nodes[-1:-1] = inv_std_nodes(normalize, "ve", "sd", "r", cdt)
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


def inv_std_nodes(form: str, v: str, sd: str, out: str, elem, prefix: str = "") -> list:
    """Nodes computing ``sd = Sqrt(v)`` ("div": the caller divides by it) or ``out = 1 / sqrt(v)`` as exporters
    write it: "reciprocal" ``Reciprocal(Sqrt(v))``; "pow" ``Pow(v, -0.5)`` (tf2onnx's Rsqrt); "div1"
    ``Div(1, Sqrt(v))`` (older torch.onnx's rsqrt)."""
    if form == "pow":
        return [oh.make_node("Constant", [], [f"{prefix}mhalf"], value=oh.make_tensor(f"{prefix}mhalf", elem, [], [-0.5])),
                oh.make_node("Pow", [v, f"{prefix}mhalf"], [out], name=f"{prefix}Pow_inv")]
    nodes = [oh.make_node("Sqrt", [v], [sd], name=f"{prefix}Sqrt")]
    if form == "reciprocal":
        nodes.append(oh.make_node("Reciprocal", [sd], [out], name=f"{prefix}Reciprocal"))
    elif form == "div1":
        nodes += [oh.make_node("Constant", [], [f"{prefix}one"], value=oh.make_tensor(f"{prefix}one", elem, [], [1.0])),
                  oh.make_node("Div", [f"{prefix}one", sd], [out], name=f"{prefix}Div_inv")]
    return nodes


def tf_batch_norm(moments: bool, inv: str = "pow", gamma: bool = True, offset: bool = True, elem=TP.FLOAT16,
                  mean=None, var=None, shape=("N", 4, 4, C)):
    """TensorFlow's batch norm over channels-last ``(N, H, W, C)`` as ``tf.nn.batch_normalization`` writes
    it and tf2onnx exports it: ``y = x * scale + (offset - mean * scale)`` (``Neg(mean * scale)`` without
    ``offset``), ``scale = gamma * inv_std(var + eps)`` (:func:`inv_std_nodes`; the inverse std alone without
    ``gamma``), eps 1e-3; ``moments``: ``mean = ReduceMean(x)``, ``var = ReduceMean((x - mean)^2)`` over
    axes (0, 1, 2) (``tf.nn.moments``), else the constants ``mean`` and ``var`` (per channel). Returns the
    model and a float64 reference of x."""
    g_, b_ = _lin(C, 0.5, 2.0), _lin(C, -1, 1)
    nodes, inits = [], {}
    if moments:
        nodes += [oh.make_node("ReduceMean", ["x"], ["mean"], axes=[0, 1, 2], keepdims=1, name="bn/moments/mean"),
                  oh.make_node("Sub", ["x", "mean"], ["d"], name="bn/moments/Sub"),
                  oh.make_node("Mul", ["d", "d"], ["sq"], name="bn/moments/SquaredDifference"),
                  oh.make_node("ReduceMean", ["sq"], ["var"], axes=[0, 1, 2], keepdims=1, name="bn/moments/variance")]
    else:
        inits.update(mean=np.asarray(mean, np.float64), var=np.asarray(var, np.float64))
    nodes.append(oh.make_node("Constant", [], ["eps"], value=oh.make_tensor("eps", elem, [], [1e-3]), name="bn/eps"))
    nodes.append(oh.make_node("Add", ["var", "eps"], ["ve"], name="bn/add"))
    nodes += inv_std_nodes(inv, "ve", "sd", "inv", elem, "bn/")
    if gamma:
        inits["gamma"] = g_
        nodes.append(oh.make_node("Mul", ["gamma", "inv"], ["scale"], name="bn/mul"))
    scale = "scale" if gamma else "inv"
    nodes += [oh.make_node("Mul", ["x", scale], ["xs"], name="bn/mul_1"), oh.make_node("Mul", ["mean", scale], ["ms"], name="bn/mul_2")]
    if offset:
        inits["offset"] = b_
        nodes.append(oh.make_node("Sub", ["offset", "ms"], ["shift"], name="bn/sub"))
    else:
        nodes.append(oh.make_node("Neg", ["ms"], ["shift"], name="bn/neg"))
    nodes.append(oh.make_node("Add", ["xs", "shift"], ["y"], name="bn/add_1"))
    model = _model(nodes, list(shape), inits, 13 if moments else 17, elem)

    def held(v):  # a constant as the graph holds it: rounded to its dtype
        return np.asarray(v, np.float64).astype(NP[elem]).astype(np.float64)

    def ref(x):
        x = x.astype(np.float64)
        m = x.mean(axis=(0, 1, 2)) if moments else held(mean)
        v = ((x - m) ** 2).mean(axis=(0, 1, 2)) if moments else held(var)
        return (x - m) / np.sqrt(v + held(1e-3)) * (held(g_) if gamma else 1.0) + (held(b_) if offset else 0.0)

    return model, ref


def cast_model(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """``model`` with its float32 inputs, outputs, initializers, constants and casts in ``elem`` (what a
    float16 converter such as onnxconverter-common's does to an exported float32 graph)."""
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
            elif a.name == "to" and a.i == TP.FLOAT:  # as a float16 converter does
                a.i = elem
    del m.graph.value_info[:]
    return m


# ----------------------------------------------------------------------------------------- the ONNX check, harden more
def rms_after_matmul(n: int = 64, elem=TP.FLOAT16, features="fixed") -> onnx.ModelProto:
    """An exporter's RMSNorm after a projection, ``MatMul -> Pow -> ReduceMean -> Add -> Sqrt ->
    Reciprocal -> Mul -> Mul`` (weights ~ N(0, 1/n), so the projection keeps the input's scale): in float16
    the squares overflow once ``max|x W|`` passes ``sqrt(65504) ~ 256``. ``features="symbolic"`` declares
    the input ``(N, K)``, so only running the graph finds that K must be ``n``."""
    rng = np.random.default_rng(0)
    dt = NP[elem]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"], name="proj/MatMul"),
             oh.make_node("Constant", [], ["two"], value=nh.from_array(np.array(2.0, dt)), name="norm/two"),
             oh.make_node("Pow", ["h", "two"], ["sq"], name="norm/Pow"),
             oh.make_node("Constant", [], ["axes"], value=nh.from_array(np.array([-1], np.int64)), name="norm/axes"),
             oh.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="norm/ReduceMean", keepdims=1),
             oh.make_node("Constant", [], ["eps"], value=nh.from_array(np.array(1e-6, dt)), name="norm/eps"),
             oh.make_node("Add", ["ms", "eps"], ["mse"], name="norm/Add"),
             oh.make_node("Sqrt", ["mse"], ["rms"], name="norm/Sqrt"),
             oh.make_node("Reciprocal", ["rms"], ["inv"], name="norm/Reciprocal"),
             oh.make_node("Mul", ["h", "inv"], ["hn"], name="norm/Mul"),
             oh.make_node("Mul", ["hn", "w"], ["y"], name="norm/Mul_1")]
    inits = [nh.from_array((rng.standard_normal((n, n)) / np.sqrt(n)).astype(dt), "W"),
             nh.from_array(np.linspace(0.5, 1.5, n).astype(dt), "w")]
    g = oh.make_graph(nodes, "rms", [oh.make_tensor_value_info("x", elem, ["N", n if features == "fixed" else "K"])],
                      [oh.make_tensor_value_info("y", elem, ["N", n])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=9)


def mean_of_squares(axes_attr: bool, normalize: str, elem=TP.FLOAT):
    """LayerNorm with the ``E[x^2] - E[x]^2`` variance over the last axis of ``(N, 3, C)``, no affine."""
    opset = 17 if axes_attr else 18
    nodes = [oh.make_node("Constant", [], ["eps"], value=oh.make_tensor("eps", elem, [], [1e-5])),
             oh.make_node("Constant", [], ["two"], value=oh.make_tensor("two", elem, [], [2.0]))]
    if not axes_attr:
        nodes.append(oh.make_node("Constant", [], ["axes"], value=oh.make_tensor("axes", TP.INT64, [1], [-1])))

    def mean(inp, out):
        extra = {"axes": [-1]} if axes_attr else {}
        nodes.append(oh.make_node("ReduceMean", [inp] + ([] if axes_attr else ["axes"]), [out], keepdims=1, **extra))

    mean("x", "mu")
    nodes.append(oh.make_node("Mul", ["x", "x"], ["xx"]))
    mean("xx", "m2")
    nodes += [oh.make_node("Pow", ["mu", "two"], ["mu2"]), oh.make_node("Sub", ["m2", "mu2"], ["var"]),
              oh.make_node("Add", ["var", "eps"], ["ve"]), oh.make_node("Sqrt", ["ve"], ["sd"]),
              oh.make_node("Sub", ["x", "mu"], ["d"])]
    if normalize == "div":
        nodes.append(oh.make_node("Div", ["d", "sd"], ["y"]))
    else:
        nodes += [oh.make_node("Reciprocal", ["sd"], ["r"]), oh.make_node("Mul", ["d", "r"], ["y"])]
    return _model(nodes, ["N", 3, C], {}, opset, elem), lambda x: ref_standardize(x, (-1,), 1e-5)


def decomposed_group_norm(groups: int = 2, elem=TP.FLOAT):
    """GroupNorm as other frameworks' exporters write it: ``Reshape (N, G, -1)`` -> the decomposed
    standardization over axis 2 -> ``Reshape`` back -> per-channel ``Mul``/``Add``; ``(N, C, H, H)``."""
    s, b = _lin(C, 0.5, 1.5), _lin(C, -1, 1)
    nodes = [oh.make_node("Shape", ["x"], ["shape"]),
             oh.make_node("Constant", [], ["gshape"], value=oh.make_tensor("gshape", TP.INT64, [3], [0, groups, -1])),
             oh.make_node("Reshape", ["x", "gshape"], ["xg"]),
             oh.make_node("Constant", [], ["axes"], value=oh.make_tensor("axes", TP.INT64, [1], [2])),
             oh.make_node("ReduceMean", ["xg", "axes"], ["mu"], keepdims=1), oh.make_node("Sub", ["xg", "mu"], ["d"]),
             oh.make_node("Mul", ["d", "d"], ["sq"]), oh.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
             oh.make_node("Constant", [], ["eps"], value=oh.make_tensor("eps", elem, [], [1e-5])),
             oh.make_node("Add", ["var", "eps"], ["ve"]), oh.make_node("Sqrt", ["ve"], ["sd"]),
             oh.make_node("Div", ["d", "sd"], ["ng"]), oh.make_node("Reshape", ["ng", "shape"], ["n"]),
             oh.make_node("Mul", ["n", "s"], ["ns"]), oh.make_node("Add", ["ns", "b"], ["y"])]
    model = _model(nodes, ["N", C, H, H], {"s": s.reshape(C, 1, 1), "b": b.reshape(C, 1, 1)}, 18, elem)

    def ref(x):
        n = ref_standardize(x.reshape(x.shape[0], groups, -1), (2,), 1e-5).reshape(x.shape)
        return n * s[:, None, None] + b[:, None, None]

    return model, ref


def decomposed_instance_norm(elem=TP.FLOAT):
    """InstanceNorm written out: the decomposed standardization over the spatial axes ``(2, 3)`` of ``(N, C, H, H)``."""
    nodes = [oh.make_node("ReduceMean", ["x"], ["mu"], axes=[2, 3], keepdims=1), oh.make_node("Sub", ["x", "mu"], ["d"]),
             oh.make_node("Constant", [], ["two"], value=oh.make_tensor("two", elem, [], [2.0])),
             oh.make_node("Pow", ["d", "two"], ["sq"]), oh.make_node("ReduceMean", ["sq"], ["var"], axes=[2, 3], keepdims=1),
             oh.make_node("Constant", [], ["eps"], value=oh.make_tensor("eps", elem, [], [1e-5])),
             oh.make_node("Add", ["var", "eps"], ["ve"]), oh.make_node("Sqrt", ["ve"], ["sd"]),
             oh.make_node("Reciprocal", ["sd"], ["r"]), oh.make_node("Mul", ["d", "r"], ["y"])]
    return _model(nodes, ["N", C, H, H], {}, 17, elem), lambda x: ref_standardize(x, (2, 3), 1e-5)


def _layer_norm_body(name: str, x: str, out: str, elem) -> onnx.GraphProto:
    """A graph body (no inputs of its own) applying LayerNormalization to the outer value ``x``."""
    s = nh.from_array(np.linspace(0.5, 1.5, C).astype(NP[elem]), f"{name}_s")
    node = oh.make_node("LayerNormalization", [x, f"{name}_s"], [out], axis=-1, epsilon=1e-5, name=f"{name}/LayerNorm")
    return oh.make_graph([node], name, [], [oh.make_tensor_value_info(out, elem, None)], [s])


def layer_norm_in_if(elem=TP.FLOAT, else_norm: bool = True):
    """``If(cond)`` whose both branches normalize the outer ``x`` with LayerNormalization (scale linspace(0.5, 1.5));
    without ``else_norm`` the else branch passes ``x`` through (the only norm is in the then branch)."""
    other = _layer_norm_body("else", "x", "ye", elem) if else_norm else oh.make_graph(
        [oh.make_node("Identity", ["x"], ["ye"], name="else/Identity")], "else", [], [oh.make_tensor_value_info("ye", elem, None)])
    node = oh.make_node("If", ["cond"], ["y"], then_branch=_layer_norm_body("then", "x", "yt", elem), else_branch=other, name="if")
    g = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", elem, ["N", 3, C]),
                                    oh.make_tensor_value_info("cond", TP.BOOL, [])],
                      [oh.make_tensor_value_info("y", elem, ["N", 3, C])])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    return model, lambda x: ref_standardize(x, (-1,), 1e-5) * np.linspace(0.5, 1.5, C)


def layer_norm_in_loop(elem=TP.FLOAT):
    """A one-iteration ``Loop`` whose body normalizes its loop-carried value with LayerNormalization."""
    s = nh.from_array(np.linspace(0.5, 1.5, C).astype(NP[elem]), "body_s")
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("LayerNormalization", ["v_in", "body_s"], ["v_out"], axis=-1, epsilon=1e-5, name="body/LayerNorm")],
        "body", [oh.make_tensor_value_info("i", TP.INT64, []), oh.make_tensor_value_info("cond_in", TP.BOOL, []),
                 oh.make_tensor_value_info("v_in", elem, ["N", 3, C])],
        [oh.make_tensor_value_info("cond_out", TP.BOOL, []), oh.make_tensor_value_info("v_out", elem, ["N", 3, C])], [s])
    nodes = [oh.make_node("Constant", [], ["trip"], value=oh.make_tensor("trip", TP.INT64, [], [1])),
             oh.make_node("Constant", [], ["true"], value=oh.make_tensor("true", TP.BOOL, [], [True])),
             oh.make_node("Loop", ["trip", "true", "x"], ["y"], body=body, name="loop")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", elem, ["N", 3, C])],
                      [oh.make_tensor_value_info("y", elem, ["N", 3, C])])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    return model, lambda x: ref_standardize(x, (-1,), 1e-5) * np.linspace(0.5, 1.5, C)


def rms_in_loop(trips: int = 3, growth: float = 4.0, elem=TP.FLOAT16):
    """A ``Loop`` of ``trips`` iterations over ``(N, 3, C)``: each multiplies its carried value by ``growth``
    and normalizes the product with the decomposed RMSNorm pattern (``Mul -> ReduceMean -> Add -> Sqrt ->
    Div``), a scan output; iteration ``i`` normalizes ``x * growth**(i + 1)``."""
    dt = NP[elem]
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("Constant", [], ["g"], value=nh.from_array(np.array(growth, dt)), name="loop/g"),
         oh.make_node("Mul", ["v_in", "g"], ["v_out"], name="loop/grow"),
         oh.make_node("Mul", ["v_out", "v_out"], ["sq"], name="loop/rms/Mul"),
         oh.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1, name="loop/rms/ReduceMean"),
         oh.make_node("Constant", [], ["eps"], value=nh.from_array(np.array(1e-6, dt)), name="loop/rms/eps"),
         oh.make_node("Add", ["ms", "eps"], ["mse"], name="loop/rms/Add"),
         oh.make_node("Sqrt", ["mse"], ["rms"], name="loop/rms/Sqrt"),
         oh.make_node("Div", ["v_out", "rms"], ["n"], name="loop/rms/Div")],
        "body", [oh.make_tensor_value_info("i", TP.INT64, []), oh.make_tensor_value_info("cond_in", TP.BOOL, []),
                 oh.make_tensor_value_info("v_in", elem, ["N", 3, C])],
        [oh.make_tensor_value_info("cond_out", TP.BOOL, []), oh.make_tensor_value_info("v_out", elem, ["N", 3, C]),
         oh.make_tensor_value_info("n", elem, ["N", 3, C])])
    nodes = [oh.make_node("Constant", [], ["trip"], value=oh.make_tensor("trip", TP.INT64, [], [trips])),
             oh.make_node("Constant", [], ["true"], value=oh.make_tensor("true", TP.BOOL, [], [True])),
             oh.make_node("Loop", ["trip", "true", "x"], ["last", "y"], body=body, name="loop")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", elem, ["N", 3, C])],
                      [oh.make_tensor_value_info("y", elem, [trips, "N", 3, C])])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def layer_norm_in_scan(elem=TP.FLOAT16):
    """A ``Scan`` over the first axis of ``(T, N, C)`` whose body normalizes each slice ``(N, C)`` with
    LayerNormalization (scale linspace(0.5, 1.5)), a scan output; a running sum as its state."""
    s = nh.from_array(np.linspace(0.5, 1.5, C).astype(NP[elem]), "scan_s")
    body = oh.make_graph(
        [oh.make_node("Add", ["acc_in", "x_t"], ["acc_out"], name="scan/sum"),
         oh.make_node("LayerNormalization", ["x_t", "scan_s"], ["y_t"], axis=-1, epsilon=1e-5, name="scan/LayerNorm")],
        "body", [oh.make_tensor_value_info("acc_in", elem, ["N", C]), oh.make_tensor_value_info("x_t", elem, ["N", C])],
        [oh.make_tensor_value_info("acc_out", elem, ["N", C]), oh.make_tensor_value_info("y_t", elem, ["N", C])], [s])
    nodes = [oh.make_node("ConstantOfShape", ["zshape"], ["zero"], value=oh.make_tensor("v", elem, [1], [0.0])),
             oh.make_node("Scan", ["zero", "x"], ["total", "y"], body=body, num_scan_inputs=1, name="scan")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", elem, ["T", 2, C])],
                      [oh.make_tensor_value_info("y", elem, ["T", 2, C])],
                      [nh.from_array(np.array([2, C], np.int64), "zshape")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def norms_in_local_function(elem=TP.FLOAT):
    """A model-local function ``block(x, s) = LayerNormalization(RMS-pattern(x), s)``, called once."""
    dom = "local"
    fn_nodes = [oh.make_node("Mul", ["x", "x"], ["sq"]),
                oh.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
                oh.make_node("Constant", [], ["eps"], value=oh.make_tensor("eps", elem, [], [1e-6])),
                oh.make_node("Add", ["ms", "eps"], ["mse"]), oh.make_node("Sqrt", ["mse"], ["rms"]),
                oh.make_node("Div", ["x", "rms"], ["r"]),
                oh.make_node("LayerNormalization", ["r", "s"], ["y"], axis=-1, epsilon=1e-5)]
    fn = oh.make_function(dom, "block", ["x", "s"], ["y"], fn_nodes, [oh.make_opsetid("", 17)])
    s = np.linspace(0.5, 1.5, C)
    g = oh.make_graph([oh.make_node("block", ["x", "s"], ["y"], domain=dom, name="call")], "g",
                      [oh.make_tensor_value_info("x", elem, ["N", 3, C])], [oh.make_tensor_value_info("y", elem, ["N", 3, C])],
                      [nh.from_array(s.astype(NP[elem]), "s")])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(dom, 1)], ir_version=9, functions=[fn])
    return model, lambda x: ref_standardize(ref_standardize(x, (-1,), 1e-6, center=False), (-1,), 1e-5) * s


def embed_layer_norm(vocab: int = 11, positions: int = 8, hidden: int = C, elem=TP.FLOAT, mask: bool = True, scale: float = 1.0):
    """com.microsoft EmbedLayerNormalization over int32 ``ids`` and ``segment_ids`` ``(N, S)``, tables
    ``linspace`` patterns times ``scale``; outputs ``y``, ``mask_index`` (with ``mask``) and the embedding sum."""
    rng = np.random.default_rng(0)
    word = rng.standard_normal((vocab, hidden)) * scale
    pos = rng.standard_normal((positions, hidden)) * scale
    seg = rng.standard_normal((2, hidden)) * scale
    gamma, beta = _lin(hidden, 0.5, 1.5), _lin(hidden, -1, 1)
    names = ["ids", "seg_ids", "word", "pos", "seg", "gamma", "beta"] + (["mask"] if mask else [])
    outs = ["y", "mask_index", "emb"] if mask else ["y", "", "emb"]
    node = oh.make_node("EmbedLayerNormalization", names, outs, domain=MS, epsilon=1e-12, name="embed")
    inputs = [oh.make_tensor_value_info(n, TP.INT32, ["N", "S"]) for n in ("ids", "seg_ids")]
    if mask:
        inputs.append(oh.make_tensor_value_info("mask", TP.INT32, ["N", "S"]))
    outputs = [oh.make_tensor_value_info("y", elem, ["N", "S", hidden]), oh.make_tensor_value_info("emb", elem, ["N", "S", hidden])]
    if mask:
        outputs.insert(1, oh.make_tensor_value_info("mask_index", TP.INT32, ["N"]))
    inits = [nh.from_array(v.astype(NP[elem]), n) for n, v in
             (("word", word), ("pos", pos), ("seg", seg), ("gamma", gamma), ("beta", beta))]
    g = oh.make_graph([node], "g", inputs, outputs, inits)
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(MS, 1)], ir_version=9)

    def ref(ids, seg_ids):
        w, p, sg = (nh.to_array(t).astype(np.float64) for t in inits[:3])
        emb = w[ids] + p[np.arange(ids.shape[1])] + sg[seg_ids]
        return ref_standardize(emb, (-1,), 1e-12) * gamma + beta, emb

    return model, ref


MS = "com.microsoft"
