"""``export_onnx``: any PyTorch model (a bare normalization layer included) -> an ONNX file, through torch's
own exporter (``torch.onnx.export(dynamo=True)``, onnxscript).

How: the model is deep-copied and converted with :func:`normkit.convert` (torch's norm classes become
normkit's, hand-written norms their proven normkit twins), put in eval mode, and

* every normkit normalization layer is swapped for a thin stub that calls one custom op
  (``normkit_onnx::*``, whose eager implementation is normkit's functional op), applying the layer's
  casting mode, weight offset and layout around it as the layer does (:func:`normkit.nn.normalization.with_casting`);
* every torch functional normalization call left in the model -- in the own forward of a class convert
  hardened (timm's ``LayerNorm2d``, ``BatchNormAct2d``), or anywhere else -- is routed to the same custom
  ops while the exporter traces (:class:`normkit.robust.RobustMode` with this module's table);
* what normkit has no form for is exported as torch's exporter writes it.

The custom ops are translated (``custom_translation_table``) into

* ``decompose=False``: the native ONNX operator with torch's parameters converted (LRN window and alpha,
  BatchNormalization momentum = 1 - torch's; GroupNormalization from opset 21, where its scale and bias
  are per channel as torch's: GroupNormalization-18 scales per group and onnx's checker rejects it as
  deprecated; RMSNormalization from opset 23). Without ``opset``, the lowest opset that has them is used.
* ``decompose=True`` (default): the same nodes (LRN, GroupNorm and RMSNorm as normkit placeholders that
  carry every convention's window, a per-channel affine and work at any opset); then the whole graph goes
  through :func:`normkit.harden_onnx`'s pass, which replaces them -- and any normalization node or
  decomposed LayerNorm/RMSNorm pattern torch's exporter wrote for the rest -- by normkit's robust
  primitive-op subgraphs (:mod:`.subgraphs`). One warning names what stayed unhardened.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Optional

import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as nf
from ..convert import convert
from ..nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                  LayerNorm, LocalResponseNorm, RMSNorm)
from ..nn.batchnorm import _FrozenBatchNorm
from ..nn.normalization import channels_last_group_norm, with_casting
from ..robust import Hardened, RobustMode, routes, unharden
from ._errors import OnnxError
from .harden import PENDING, HardenReport, finalize, harden_ir

MIN_OPSET, MAX_OPSET = 18, 23
DEFAULT_OPSET = 18
from .. import nn as _nnk

# eval-mode batch norm with running statistics (SyncBatchNorm too: in eval it is plain batch norm)
_BN = (BatchNorm1d, BatchNorm2d, BatchNorm3d, _FrozenBatchNorm) + ((_nnk.SyncBatchNorm,) if hasattr(_nnk, "SyncBatchNorm") else ())
_IN = (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
# torch classes that are normalization layers: anything of these left after convert is not exportable
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm,
                nn.CrossMapLRN2d, _FrozenBatchNorm)


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("normkit_onnx::batch_norm", mutates_args=())
def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float, momentum: float) -> Tensor:
    return nf.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


@torch.library.custom_op("normkit_onnx::instance_norm", mutates_args=())
def _instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return nf.instance_norm(x, None, None, weight, bias, True, 0.0, eps)


@torch.library.custom_op("normkit_onnx::layer_norm", mutates_args=())
def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, ndim: int, eps: float) -> Tensor:
    return nf.layer_norm(x, x.shape[x.dim() - ndim:], weight, bias, eps)


@torch.library.custom_op("normkit_onnx::group_norm", mutates_args=())
def _group_norm(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float) -> Tensor:
    return nf.group_norm(x, num_groups, weight, bias, eps)


@torch.library.custom_op("normkit_onnx::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, ndim: int, eps: float) -> Tensor:
    return nf.rms_norm(x, x.shape[x.dim() - ndim:], weight, eps)


@torch.library.custom_op("normkit_onnx::lrn", mutates_args=())
def _lrn(x: Tensor, size: int, alpha: float, beta: float, k: float, convention: str, region: str) -> Tensor:
    return nf.lrn(x, size, alpha, beta, k, convention=convention, region=region)


for _op in (_batch_norm, _instance_norm, _layer_norm, _group_norm, _rms_norm, _lrn):
    _op.register_fake(lambda x, *args: torch.empty_like(x))


# ------------------------------------------------------------------------------------------ stubs
class _Stub(nn.Module):
    """Calls one custom op with the wrapped layer's parameters (ones / zeros where it has none), with the
    layer's casting mode, weight offset and layout applied around it."""

    def __init__(self, layer: nn.Module, kind: str):
        super().__init__()
        self.layer, self.kind = layer, kind

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        if self.kind == "batch_norm":
            if getattr(m, "casting_mode", "torch") == "promote":  # torchvision's FrozenBatchNorm2d's dtype rule
                x = x.to(torch.promote_types(x.dtype, m.running_mean.dtype))
            return _onnx_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, eps=m.eps,
                                    momentum=getattr(m, "momentum", 0.1))
        if self.kind == "instance_norm":
            return _onnx_instance_norm(x, weight=m.weight, bias=m.bias, eps=m.eps)
        if self.kind == "layer_norm":
            core = partial(_onnx_layer_norm, normalized_shape=m.normalized_shape, eps=m.eps)
            return with_casting(core, x, m.weight, getattr(m, "bias", None), **_options(m), channels_first=m.channels_first)
        if self.kind == "group_norm":
            core = partial(channels_last_group_norm, num_groups=m.num_groups, eps=m.eps, group_norm=_onnx_group_norm)
            return with_casting(core, x, m.weight, m.bias, **_options(m), channels_first=True)
        if self.kind == "rms_norm":
            core = partial(_onnx_rms_norm, normalized_shape=m.normalized_shape, eps=m.eps)
            return with_casting(core, x, m.weight, None, **_options(m), channels_first=m.channels_first)
        return _lrn(x, m.size, float(m.alpha), float(m.beta), float(m.k), m.convention, m.region)


def _options(m: nn.Module) -> dict:
    """The layer's casting mode and weight offset (a torch-compatible default where it has none)."""
    return {"casting_mode": getattr(m, "casting_mode", "torch"), "offset": getattr(m, "offset", 0.0)}


# The custom ops with torch.nn.functional's signatures: what the stubs call and what the routing table sends
# torch's functional norm calls to. Parameters arrive in the input's dtype (ONNX's operators want one type).
def _param(t: Tensor | None, shape, x: Tensor, fill: float) -> Tensor:
    return torch.full(tuple(shape), fill, dtype=x.dtype) if t is None else t.to(x.dtype)


def _onnx_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    c = x.shape[1]
    w, b = _param(weight, (c,), x, 1.0), _param(bias, (c,), x, 0.0)
    if training or running_mean is None or running_var is None:  # batch statistics: instance norm of one "instance"
        flat = x.transpose(0, 1).reshape(1, c, -1)
        y = _instance_norm(flat, w, b, float(eps))
        return y.reshape(x.transpose(0, 1).shape).transpose(0, 1)
    return _batch_norm(x, w, b, running_mean.to(x.dtype), running_var.to(x.dtype), float(eps), float(momentum or 0.1))


def _onnx_instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                        momentum=0.1, eps=1e-5):
    if not use_input_stats:  # running statistics: per-channel batch norm
        return _onnx_batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    c = x.shape[1]
    return _instance_norm(x, _param(weight, (c,), x, 1.0), _param(bias, (c,), x, 0.0), float(eps))


def _onnx_layer_norm(x, weight=None, bias=None, *, normalized_shape, eps=1e-5):
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    return _layer_norm(x, _param(weight, shape, x, 1.0), _param(bias, shape, x, 0.0), len(shape), float(eps))


def _onnx_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    c = x.shape[1]
    return _group_norm(x, _param(weight, (c,), x, 1.0), _param(bias, (c,), x, 0.0), int(num_groups), float(eps))


def _onnx_rms_norm(x, weight=None, bias=None, *, normalized_shape, eps=None):
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return _rms_norm(x, _param(weight, shape, x, 1.0), len(shape), float(eps))


class _Routed:
    """torch's functional norms (``torch.nn.functional``'s signatures) -> the custom ops, for
    :func:`normkit.robust.routes`: what the exporter sees of every functional norm call left in the model.
    A call normkit has no ONNX form for at this opset is left to torch's exporter."""

    def __init__(self, decompose: bool, opset: int):
        self.decompose, self.opset = decompose, opset

    batch_norm = staticmethod(_onnx_batch_norm)
    instance_norm = staticmethod(_onnx_instance_norm)

    @staticmethod
    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return _onnx_layer_norm(input, weight, bias, normalized_shape=normalized_shape, eps=eps)

    def group_norm(self, input, num_groups, weight=None, bias=None, eps=1e-5):
        if not self.decompose and self.opset < 21:
            return F.group_norm(input, num_groups, weight, bias, eps)
        return _onnx_group_norm(input, num_groups, weight, bias, eps)

    def rms_norm(self, input, normalized_shape, weight=None, eps=None):
        if not self.decompose and self.opset < 23:
            return F.rms_norm(input, normalized_shape, weight, eps)
        return _onnx_rms_norm(input, weight, normalized_shape=normalized_shape, eps=eps)

    def local_response_norm(self, input, size, alpha=1e-4, beta=0.75, k=1.0):
        if not self.decompose and size % 2 == 0:  # ONNX centres an even window the other way
            return F.local_response_norm(input, size, alpha, beta, k)
        return _lrn(input, size, float(alpha), float(beta), float(k), "torch", "across_channels")


def _kind(name: str, m: nn.Module, decompose: bool, opset: int) -> str | None:
    """The stub kind for a normkit layer (None: normkit has no ONNX form for it), or an OnnxError naming
    a layer asked for as a native operator that would compute something else."""
    label = f"layer {name!r} ({type(m).__name__})"
    if isinstance(m, _BN) or (isinstance(m, _IN) and m.track_running_stats):
        return "batch_norm"  # without running statistics: batch statistics, as in eval mode in torch
    if isinstance(m, _IN):
        return "instance_norm"
    if isinstance(m, LayerNorm):
        return "layer_norm"
    if isinstance(m, GroupNorm):
        if not decompose and opset < 21:
            raise OnnxError(f"cannot export {label} as a native op at opset {opset}: GroupNormalization-18 scales "
                            "per group (torch per channel) and onnx's checker rejects it as deprecated; "
                            "pass opset=21 or later, or decompose=True")
        return "group_norm"
    if isinstance(m, RMSNorm):
        if not decompose and opset < 23:
            raise OnnxError(f"cannot export {label} as a native op at opset {opset}: RMSNormalization needs "
                            "opset 23 (pass opset=23, or decompose=True)")
        return "rms_norm"
    if isinstance(m, LocalResponseNorm):
        if m.region != "across_channels" and not decompose:
            raise OnnxError(f"cannot export {label} as a native LRN: region={m.region!r} (Caffe's within-channel "
                            "LRN) has no ONNX operator; use decompose=True")
        if not decompose and m.convention == "torch" and m.size % 2 == 0:
            raise OnnxError(f"cannot export {label} as a native LRN: ONNX's window for an even size "
                            f"({m.size}) differs from torch's; use decompose=True")
        return "lrn"
    return None


class _Holder(nn.Module):
    """A bare normalization layer, held so that it can be swapped for its stub like any other."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, input: Tensor) -> Tensor:
        return self.layer(input)


def _swap(model: nn.Module, decompose: bool, opset: int) -> list[str]:
    """Every normkit layer -> its stub; every hardened module -> its own class (its functional norm calls are
    routed while exporting). Returns the norm layers normkit has no ONNX form for, as ``'name' (Class)``."""
    no_form = []
    for name, m in list(model.named_modules()):
        if isinstance(m, Hardened):  # its functional norm calls go to the custom ops while exporting
            unharden(m)
            continue
        if isinstance(m, _Stub) or not name or not isinstance(m, _TORCH_NORMS):
            continue
        kind = _kind(name, m, decompose, opset)
        if kind is None:
            no_form.append(f"{name!r} ({type(m).__name__})")
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], _Stub(m, kind))
    return no_form


_STATISTICS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Pow", "Reciprocal", "LRN",
               "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
               "RMSNormalization"}


def _module_of(node: ir.Node) -> str | None:
    """The qualified name of the module whose forward made ``node`` (torch's exporter records it)."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    parts = [p.strip().strip("'\"") for p in scopes.strip("[]").split(",")]
    return ".".join(p for p in parts[1:-1] if p)


def _unhardened(graph: ir.Graph, left: dict[str, str]) -> list[str]:
    """Of the norm-like modules normkit left (``name -> description``), those whose statistics still run as
    torch's exporter wrote them after the harden pass (a statistics node made inside them survived)."""
    seen = {_module_of(n) for n in graph if n.op_type in _STATISTICS}
    return [desc for name, desc in left.items()
            if any(s is not None and (s == name or s.startswith(name + ".")) for s in seen)]


# ------------------------------------------------------------------------------------------ translations
def _register_placeholder_schemas() -> None:
    """Schemas for the two placeholders (torch's exporter builds nodes against a schema); they never
    reach a saved file."""
    S = onnx.defs.OpSchema
    spec = {"LRN": (["X"], [("size", S.AttrType.INT), ("alpha", S.AttrType.FLOAT), ("beta", S.AttrType.FLOAT),
                            ("bias", S.AttrType.FLOAT), ("lo", S.AttrType.INT), ("hi", S.AttrType.INT),
                            ("within_channel", S.AttrType.INT)]),
            "RMSNormalization": (["X", "scale"], [("axis", S.AttrType.INT), ("epsilon", S.AttrType.FLOAT)]),
            "GroupNormalization": (["X", "scale", "bias"], [("num_groups", S.AttrType.INT), ("epsilon", S.AttrType.FLOAT)])}
    for name, (inputs, attrs) in spec.items():
        if onnx.defs.has(name, PENDING):
            continue
        onnx.defs.register_schema(S(
            name, PENDING, 1, "normkit placeholder, replaced before saving",
            inputs=[S.FormalParameter(i, "T") for i in inputs], outputs=[S.FormalParameter("Y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float types")],
            attributes=[S.Attribute(a, t, "") for a, t in attrs]))


def _first(out):
    """The normalized output of an operator whose other outputs (mean, inv std dev) are optional."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _translations(decompose: bool, opset: int) -> dict:
    """ONNX translations of the custom ops (onnxscript, traced by the exporter)."""
    import onnxscript
    from onnxscript import opset18 as op
    op21 = onnxscript.opset21
    op23 = onnxscript.opset23
    pending = onnxscript.values.Opset(PENDING, 1)
    _register_placeholder_schemas()
    pending_rms, pending_lrn, pending_gn = pending.RMSNormalization, pending.LRN, pending.GroupNormalization

    def batch_norm(x, weight, bias, mean, var, eps: float, momentum: float):
        return _first(op.BatchNormalization(x, weight, bias, mean, var, epsilon=eps, momentum=1.0 - momentum))

    def instance_norm(x, weight, bias, eps: float):
        return op.InstanceNormalization(x, weight, bias, epsilon=eps)

    def layer_norm(x, weight, bias, ndim: int, eps: float):
        return _first(op.LayerNormalization(x, weight, bias, axis=-ndim, epsilon=eps))

    def group_norm(x, weight, bias, num_groups: int, eps: float):
        if decompose:  # scale and bias per channel at any opset
            return pending_gn(x, weight, bias, num_groups=num_groups, epsilon=eps)
        return op21.GroupNormalization(x, weight, bias, num_groups=num_groups, epsilon=eps)

    def rms_norm(x, weight, ndim: int, eps: float):
        if decompose:
            return pending_rms(x, weight, axis=-ndim, epsilon=eps)
        return op23.RMSNormalization(x, weight, axis=-ndim, epsilon=eps)

    def lrn(x, size: int, alpha: float, beta: float, k: float, convention: str, region: str):
        a = alpha * size if convention == "tf" else alpha  # ONNX divides alpha by size; TF does not
        if decompose:
            lo, hi = (size // 2, (size - 1) // 2) if convention == "torch" else ((size - 1) // 2, size // 2)
            if region == "within_channel":  # Caffe: c = alpha / size**2 and k = 1
                return pending_lrn(x, size=size, alpha=a, beta=beta, bias=1.0, lo=lo, hi=hi, within_channel=1)
            return pending_lrn(x, size=size, alpha=a, beta=beta, bias=k, lo=lo, hi=hi, within_channel=0)
        return op.LRN(x, size=size, alpha=a, beta=beta, bias=k)

    ops = torch.ops.normkit_onnx
    return {ops.batch_norm.default: batch_norm, ops.instance_norm.default: instance_norm,
            ops.layer_norm.default: layer_norm, ops.group_norm.default: group_norm,
            ops.rms_norm.default: rms_norm, ops.lrn.default: lrn}


# ------------------------------------------------------------------------------------------ export
def export_onnx(model: nn.Module, example_input: Tensor, path=None, *, decompose: bool = True,
                opset: Optional[int] = None, dynamic_batch: bool = True, dtype: Optional[torch.dtype] = None):
    """Export ``model`` (any module, a single normalization layer too) to ONNX with its normalization layers
    as robust primitive-op subgraphs (``decompose=True``) or as native ONNX operators (``decompose=False``);
    see the module docstring. With ``decompose=True``, one RuntimeWarning names every normalization that
    stayed as torch's exporter wrote it (a norm-like module convert left, a node the harden pass left).

    ``example_input``: one tensor (batch first). ``path``: where to save (optional). ``opset``: 18 to 23
    (default 18; 23 for a native export with an RMSNorm). ``dynamic_batch``: the first dimension is
    symbolic. ``dtype``: cast model and input first (``torch.float16`` gives a float16 graph).
    A model in training mode is exported in eval mode, with a warning (ONNX's inference operators use
    the running statistics). Returns ``(onnx.ModelProto, HardenReport | None)``: the report lists the
    robust subgraphs written (and the nodes left) when ``decompose=True``.
    """
    if not isinstance(model, nn.Module):
        raise OnnxError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise OnnxError(f"expected one example input tensor, got {type(example_input).__name__}")
    if opset is None:  # the lowest opset that has every native operator needed
        opset = DEFAULT_OPSET
        if not decompose and any(isinstance(m, nn.GroupNorm) for m in model.modules()):
            opset = 21
        if not decompose and any(isinstance(m, nn.RMSNorm) for m in model.modules()):
            opset = 23
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxError(f"unsupported opset {opset!r}: normkit exports opset {MIN_OPSET} to {MAX_OPSET}")
    if dtype is not None and dtype not in (torch.float32, torch.float16):
        raise OnnxError(f"unsupported dtype {dtype}: export float32 or float16")
    if model.training:
        warnings.warn("export_onnx: the model is in training mode; exporting it in eval mode "
                      "(normalization with running statistics)", stacklevel=2)
    with warnings.catch_warnings():  # what convert leaves is named in this function's own warning
        warnings.simplefilter("ignore")
        model, converted = convert(model, return_report=True)  # a deep copy with normkit's layers
    left = {s.name: f"{s.name!r} ({s.before}): {s.after.removeprefix('left: ')}" for s in converted if not s.changed}
    model.eval()
    if isinstance(model, _TORCH_NORMS):
        model = _Holder(model)
        left = {f"layer.{k}" if k else "layer": v for k, v in left.items()}
    if dtype is not None:
        model = model.to(dtype)
        if example_input.is_floating_point():  # token ids stay integer
            example_input = example_input.to(dtype)
    no_form = _swap(model, decompose, opset)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},)
    try:
        with warnings.catch_warnings(), RobustMode(routes(_Routed(decompose, opset))):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example_input,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
                                        custom_translation_table=_translations(decompose, opset))
    except OnnxError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        culprits = f"; normkit has no ONNX form for {', '.join(no_form)}, which torch's exporter could not export either" if no_form else ""
        raise OnnxError(f"torch.onnx.export failed: {msg}{culprits}") from exc
    irm = program.model
    report = None
    if decompose:
        report = HardenReport()
        harden_ir(irm, report)
        unhardened = [f"{d}: normkit has no ONNX form for it" for d in no_form] + _unhardened(irm.graph, left)
        unhardened += [f"node {r.name!r} ({r.op_type}): {r.reason}" for r in report.skipped]
        if unhardened:
            warnings.warn(f"export_onnx: {len(unhardened)} normalization(s) stayed as torch's exporter wrote them "
                          f"(not hardened): " + "; ".join(unhardened), RuntimeWarning, stacklevel=2)
    proto = finalize(ir.serde.serialize_model(irm))
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto, report
