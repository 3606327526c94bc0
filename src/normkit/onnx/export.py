"""``export_onnx``: a PyTorch model with normalization layers -> an ONNX file, through torch's own
exporter (``torch.onnx.export(dynamo=True)``, onnxscript).

How: the model is deep-copied, converted with :func:`normkit.convert`, put in eval mode, and every
normalization layer is swapped for a thin stub that calls one custom op (``normkit_onnx::*``, whose eager
implementation is normkit's functional op). ``torch.export`` traces the rest of the model as usual; the
custom ops are translated (``custom_translation_table``) into

* ``decompose=False``: the native ONNX operator with torch's parameters converted (LRN window and alpha,
  BatchNormalization momentum = 1 - torch's; GroupNormalization from opset 21, where its scale and bias
  are per channel as torch's: GroupNormalization-18 scales per group and onnx's checker rejects it as
  deprecated; RMSNormalization from opset 23). Without ``opset``, the lowest opset that has them is used.
* ``decompose=True`` (default): the same nodes (LRN, GroupNorm and RMSNorm as normkit placeholders that
  carry every convention's window, a per-channel affine and work at any opset), which :func:`normkit.harden_onnx`'s pass then replaces by normkit's robust
  primitive-op subgraphs (:mod:`.subgraphs`): the formulation is written once, in ONNX, for export and
  harden alike, and has no data-dependent control flow.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Optional

import onnx
import onnx_ir as ir
import torch
from torch import Tensor, nn

from .. import functional as nf
from ..convert import convert
from ..nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                  LayerNorm, LocalResponseNorm, RMSNorm)
from ..nn.batchnorm import _FrozenBatchNorm
from ._errors import OnnxError
from .harden import PENDING, HardenReport, _harden_graph, finalize

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
    """Calls one custom op with the wrapped layer's parameters (ones / zeros where it has none)."""

    def __init__(self, layer: nn.Module, kind: str):
        super().__init__()
        self.layer, self.kind = layer, kind

    def _affine(self, shape, dtype, weight, bias):
        w = weight if weight is not None else torch.ones(shape, dtype=dtype)
        b = bias if bias is not None else torch.zeros(shape, dtype=dtype)
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        if self.kind == "batch_norm":
            w, b = self._affine(m.running_mean.shape, x.dtype, m.weight, m.bias)
            return _batch_norm(x, w, b, m.running_mean, m.running_var, float(m.eps), float(getattr(m, "momentum", 0.1) or 0.1))
        if self.kind == "instance_norm":
            w, b = self._affine((x.shape[1],), x.dtype, m.weight, m.bias)
            return _instance_norm(x, w, b, float(m.eps))
        if self.kind == "layer_norm":
            w, b = self._affine(tuple(m.normalized_shape), x.dtype, m.weight, getattr(m, "bias", None))
            return _layer_norm(x, w, b, len(m.normalized_shape), float(m.eps))
        if self.kind == "group_norm":
            w, b = self._affine((m.num_channels,), x.dtype, m.weight, m.bias)
            return _group_norm(x, w, b, m.num_groups, float(m.eps))
        if self.kind == "rms_norm":
            w, _ = self._affine(tuple(m.normalized_shape), x.dtype, m.weight, None)
            eps = m.eps if m.eps is not None else torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
            return _rms_norm(x, w, len(m.normalized_shape), float(eps))
        return _lrn(x, m.size, float(m.alpha), float(m.beta), float(m.k), m.convention, m.region)


def _kind(name: str, m: nn.Module, decompose: bool, opset: int) -> str:
    """The stub kind for a normkit layer, or an OnnxError naming the layer."""
    label = f"layer {name!r} ({type(m).__name__})"
    if isinstance(m, _BN) or (isinstance(m, _IN) and m.track_running_stats):
        if getattr(m, "running_mean", None) is None:
            raise OnnxError(f"cannot export {label}: it has no running statistics (track_running_stats=False) "
                            "and so normalizes with batch statistics even in eval mode")
        return "batch_norm"
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
    raise OnnxError(f"cannot export {label}: normkit has no ONNX form for this normalization layer")


def _swap(model: nn.Module, decompose: bool, opset: int) -> list[tuple[str, str]]:
    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, _Stub) or not name:
            continue
        if isinstance(m, _TORCH_NORMS):
            kind = _kind(name, m, decompose, opset)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], _Stub(m, kind))
            done.append((name, kind))
    if isinstance(model, _TORCH_NORMS):
        raise OnnxError("export a model that contains the normalization layer, not the layer itself")
    return done


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
    """Export ``model`` to ONNX with its normalization layers as robust primitive-op subgraphs
    (``decompose=True``) or as native ONNX operators (``decompose=False``).

    ``example_input``: one tensor (batch first). ``path``: where to save (optional). ``opset``: 18 to 23
    (default 18; 23 for a native export with an RMSNorm). ``dynamic_batch``: the first dimension is
    symbolic. ``dtype``: cast model and input first (``torch.float16`` gives a float16 graph).
    A model in training mode is exported in eval mode, with a warning (ONNX's inference operators use
    the running statistics). Returns ``(onnx.ModelProto, HardenReport | None)``: the report lists the
    robust subgraphs written when ``decompose=True``.
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
    model = convert(model)  # a deep copy with normkit's layers
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
        example_input = example_input.to(dtype)
    _swap(model, decompose, opset)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example_input,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
                                        custom_translation_table=_translations(decompose, opset))
    except OnnxError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxError(f"torch.onnx.export failed: {msg}") from exc
    irm = program.model
    report = None
    if decompose:
        report = HardenReport()
        _harden_graph(irm.graph, opset, report)
        if report.skipped:
            raise OnnxError("could not decompose: " + "; ".join(f"{r.op_type} {r.name}: {r.reason}" for r in report.skipped))
        irm.opset_imports.pop(PENDING, None)
    proto = finalize(ir.serde.serialize_model(irm))
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto, report
