"""normkit: hand-written, numerically robust normalization operators for PyTorch.

Finite, accurate batch, instance, layer, group, RMS and local-response normalization in float16, bfloat16,
float32 and float64, with torch's exact signatures. The public API:

Operators and modules
    normkit.functional           torch.nn.functional-style ops: batch_norm, instance_norm, layer_norm,
                                 group_norm, rms_norm, local_response_norm, lrn, tf_local_response_normalization,
                                 batch_norm_stateless, instance_norm_stateless
    normkit.nn                   drop-in modules: BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm,
                                 RMSNorm, LocalResponseNorm, SyncBatchNorm, FrozenBatchNorm1d/2d/3d
    Moments, moments, merge_moments   the robust statistics every op is built from (and SyncBatchNorm merges)
    NormArgumentError, UnsupportedDtypeError, MixedDtypeError   the errors bad input raises

Models
    convert(model)               every torch norm layer -> its normkit twin (revert(model): and back)
    fold_batchnorm(model)        Conv/Linear + BatchNorm -> Conv/Linear where provably the same function
    robust()                     context manager / decorator: torch's functional norm calls run normkit's
    normkit.models               a small zoo: get("resnet18"), alexnet, mobilenet_v2, transformer_block
    normkit.reference            keep_float64(), float64_call(): a model run in float64 all the way through

Backends
    build(), status(), get_backend(), set_backend("auto" | "native" | "eager")   the native CPU kernels
    with backend("eager"): ...   a backend for one block (the previous one restored after)

ONNX (the "onnx" extra: pip install 'normkit[onnx]'; imported on first use)
    export_onnx(model, x, path)  export with every normalization as a robust primitive-op subgraph
    harden_onnx(src, dst)        rewrite the normalization nodes of an existing ONNX file
    verify_onnx(path, model, x)  run the file in ONNX Runtime against the model computed in float64
    normkit.onnx                 the same, with compare_onnx (original vs hardened file against float64)

Checking
    watch(model)                 each norm layer's headroom during training (HeadroomWarning near overflow)
    normkit.check.probe_model(model, shape)   where a model's norm layers break (dtype, scale, layer)
    the ``normkit`` command: check [MODEL.onnx] | export | harden | build (``normkit --help``)
"""

from . import functional, models, nn
from ._checks import MixedDtypeError, NormArgumentError, UnsupportedDtypeError
from ._spec import Moments, merge_moments, moments
from .convert import convert, revert
from .fold import fold_batchnorm
from ._native import backend, build, get_backend, set_backend, status
from .robust import robust
from .watch import watch

__version__ = "0.1.0"

__all__ = ["functional", "nn", "models", "convert", "revert", "fold_batchnorm", "robust", "Moments", "merge_moments", "moments", "__version__",
           "NormArgumentError", "UnsupportedDtypeError", "MixedDtypeError", "backend", "build", "get_backend", "set_backend", "status",
           "export_onnx", "harden_onnx", "verify_onnx", "watch"]

_ONNX_NAMES = ("export_onnx", "harden_onnx", "verify_onnx")


def __getattr__(name):  # the ONNX tools import onnx/onnxscript only when asked for (the "onnx" extra)
    if name in _ONNX_NAMES:
        from . import onnx as _onnx

        return getattr(_onnx, name)
    raise AttributeError(f"module 'normkit' has no attribute {name!r}")
