"""LayerNorm, GroupNorm, RMSNorm and LocalResponseNorm: torch's classes over normkit's math.

``LayerNorm`` and ``RMSNorm`` take three keyword-only options beyond torch's, ``GroupNorm`` the first two
(the defaults are torch's behaviour, so with them repr and state dict are torch's own). They let one normkit
module stand for the hand-written norms of other libraries (``normkit.convert`` sets them from a probe of
the original):

* ``offset``: the weight applied is ``offset + weight`` (Gemma's ``1 + weight``, TransformerEngine's
  ``zero_centered_gamma``, Liger-Kernel's ``offset``); the state dict holds ``weight`` as it was trained.
* ``channels_first``: normalize dim 1 of an ``(N, C, *)`` input (``normalized_shape`` is ``(C,)``), as
  timm's ``RmsNorm2d`` and ConvNeXt's channels-first LayerNorm do; the output keeps the input's memory format.
* ``casting_mode``: where the computation changes dtype, for inputs and weights of other dtypes
  (``ct`` = the compute dtype: float32 for float16/bfloat16/float32 input, float64 for float64 input;
  ``x_hat`` = the normalized input, computed robustly in ``ct``; ``w = offset + weight``):

  ============  ==============================================================  ================================
  mode          output                                                          who computes this way
  ============  ==============================================================  ================================
  ``"torch"``   ``(x_hat * w + b)`` rounded once to the input's dtype            torch's ``F.rms_norm`` /
                (with an offset, ``w`` and ``b`` are formed in ``ct``)           ``F.layer_norm``; Gemma (offset 1)
  ``"gemma"``   the same, with ``x``, ``w`` and ``b`` all cast to ``ct`` first   Gemma-style ``(x.float() * ...
                (any parameter dtype is accepted)                                w.float()).type_as(x)``
  ``"llama"``   ``w * x_hat.to(x.dtype) + b``, torch's type promotion            Hugging Face Llama, Mistral,
                (``w`` with an offset is formed in the weight's dtype)          Qwen2/3, Phi-3; timm RmsNorm
  ``"t5"``      ``w * x_hat + b`` with ``x_hat`` in ``ct``, cast to the weight's  Hugging Face T5LayerNorm
                dtype first when that is float16/bfloat16; torch's promotion
  ============  ==============================================================  ================================

  Liger-Kernel's ``casting_mode="llama"`` / ``"gemma"`` name the same two conventions. In every mode a
  float64 input is computed in float64 (Hugging Face's ``.to(torch.float32)`` is a floor, not a cap).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.fx
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format

from .. import functional as nf
from .._spec import compute_dtype
from ..ops.local_response_norm import CONVENTIONS, REGIONS
from ._toolchain import NotScriptable

CASTING_MODES = ("torch", "gemma", "llama", "t5")
_HALF = (torch.float16, torch.bfloat16)


def _check_options(cls: str, normalized_shape, affine: str | None, casting_mode: str, offset: float, channels_first: bool) -> None:
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{cls}: unknown casting_mode {casting_mode!r}; expected one of {', '.join(map(repr, CASTING_MODES))}")
    if offset != 0 and affine:
        raise ValueError(f"{cls}: offset={offset} is added to the weight, and {affine}=False has none; "
                         f"pass {affine}=True, or offset=0.0")
    if channels_first and len(normalized_shape) != 1:
        raise ValueError(f"{cls}: channels_first=True normalizes dim 1 alone, so normalized_shape must be (C,), "
                         f"got {tuple(normalized_shape)}")


def with_casting(norm, input: Tensor, weight: Tensor | None, bias: Tensor | None, *, casting_mode: str = "torch",
                 offset: float = 0.0, channels_first: bool = False) -> Tensor:
    """``norm(x, weight, bias)`` -- a normalization over the trailing dims with torch's dtype semantics
    (``normalized_shape`` and ``eps`` bound) -- run in ``casting_mode`` with the weight ``offset + weight``,
    over dim 1 when ``channels_first`` (see the module docstring for the modes). The one place the
    options are applied: the modules and their ONNX export stubs (which pass their own ``norm``) share it."""
    x = input.movedim(1, -1) if channels_first and input.dim() > 2 else input
    ct = compute_dtype(x.dtype)
    if casting_mode == "torch":
        if weight is not None and offset != 0:  # the offset weight in ct (and the bias with it: one parameter dtype)
            weight, bias = weight.to(ct) + offset, None if bias is None else bias.to(ct)
        y = norm(x, weight, bias)
    elif casting_mode == "gemma":
        w = None if weight is None else weight.to(ct) + offset
        y = norm(x.to(ct), w, None if bias is None else bias.to(ct)).to(x.dtype)
    else:
        if casting_mode == "llama":
            y = norm(x, None, None)  # x_hat, rounded once to the input's dtype
        else:  # t5: x_hat in ct, cast to a half weight's dtype
            y = norm(x.to(ct), None, None)
            if weight is not None and weight.dtype in _HALF:
                y = y.to(weight.dtype)
        if weight is not None:
            y = (weight if offset == 0 else weight + offset) * y
        if bias is not None:
            y = y + bias
    if x is not input:
        y = y.movedim(-1, 1).contiguous(memory_format=suggest_memory_format(input))
    return y


def layer_norm_module(input: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None, eps: float, *,
                      casting_mode: str = "torch", offset: float = 0.0, channels_first: bool = False) -> Tensor:
    """:class:`LayerNorm`'s computation with its options, as one fx-wrapped function (one fx node per call)."""
    norm = partial(_layer_norm, normalized_shape=normalized_shape, eps=eps)
    return with_casting(norm, input, weight, bias, casting_mode=casting_mode, offset=offset, channels_first=channels_first)


def rms_norm_module(input: Tensor, normalized_shape, weight: Tensor | None, eps: float | None, *,
                    casting_mode: str = "torch", offset: float = 0.0, channels_first: bool = False) -> Tensor:
    """:class:`RMSNorm`'s computation with its options, as one fx-wrapped function (one fx node per call)."""
    norm = partial(_rms_norm, normalized_shape=normalized_shape, eps=eps)
    return with_casting(norm, input, weight, None, casting_mode=casting_mode, offset=offset, channels_first=channels_first)


def group_norm_module(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, *,
                      casting_mode: str = "torch", offset: float = 0.0) -> Tensor:
    """:class:`GroupNorm`'s computation with its options, as one fx-wrapped function (one fx node per call)."""
    norm = partial(channels_last_group_norm, num_groups=num_groups, eps=eps)
    return with_casting(norm, input, weight, bias, casting_mode=casting_mode, offset=offset, channels_first=True)


def _layer_norm(x, weight, bias, *, normalized_shape, eps):
    return nf.layer_norm(x, normalized_shape, weight, bias, eps)


def _rms_norm(x, weight, bias, *, normalized_shape, eps):
    return nf.rms_norm(x, normalized_shape, weight, eps)


def channels_last_group_norm(x, weight, bias, *, num_groups, eps, group_norm=nf.group_norm):
    """``group_norm`` (``torch.nn.functional``'s signature) of an input whose channels are its last dim, as
    :func:`with_casting` hands it over (``channels_first=True``)."""
    return group_norm(x.movedim(-1, 1), num_groups, weight, bias, eps).movedim(1, -1)


torch.fx.wrap("layer_norm_module")
torch.fx.wrap("rms_norm_module")
torch.fx.wrap("group_norm_module")


class _Options:
    """``casting_mode``, ``offset``, ``channels_first`` (class-level defaults: a torch module whose class
    ``normkit.convert`` swapped has torch's behaviour without them)."""

    casting_mode: str = "torch"
    offset: float = 0.0
    channels_first: bool = False

    def _set_options(self, casting_mode: str, offset: float, channels_first: bool = False) -> None:
        affine = "affine" if isinstance(self, nn.GroupNorm) else "elementwise_affine"
        _check_options(type(self).__name__, getattr(self, "normalized_shape", None),
                       None if getattr(self, affine) else affine, casting_mode, offset, channels_first)
        self.casting_mode, self.offset = casting_mode, float(offset)
        if channels_first:
            self.channels_first = True

    def _plain(self) -> bool:
        return self.casting_mode == "torch" and not self.offset and not self.channels_first

    def _options(self) -> dict:
        return {"casting_mode": self.casting_mode, "offset": self.offset, "channels_first": self.channels_first}

    def extra_repr(self) -> str:
        extra = "" if self.casting_mode == "torch" else f", casting_mode={self.casting_mode!r}"
        extra += f", offset={self.offset}" if self.offset else ""
        extra += ", channels_first=True" if self.channels_first else ""
        return super().extra_repr() + extra


class LayerNorm(_Options, NotScriptable, nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` (``elementwise_affine``, ``bias``, ``device``, ``dtype``); keyword-only
    ``casting_mode``, ``offset``, ``channels_first`` as in the module docstring (defaults: torch's)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, casting_mode: str = "torch", offset: float = 0.0,
                 channels_first: bool = False) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._set_options(casting_mode, offset, channels_first)

    def forward(self, input: Tensor) -> Tensor:
        if self._plain():
            return nf.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm_module(input, self.normalized_shape, self.weight, self.bias, self.eps, **self._options())


class GroupNorm(_Options, NotScriptable, nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm``; keyword-only ``casting_mode`` and ``offset`` as in the module
    docstring (defaults: torch's; a group norm always normalizes the channels, dim 1)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, casting_mode: str = "torch", offset: float = 0.0) -> None:
        extra = {} if bias else {"bias": False}  # torch < 2.13 has no bias argument (and raises for bias=False)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **extra)
        self._set_options(casting_mode, offset)

    def forward(self, input: Tensor) -> Tensor:
        if self._plain():
            return nf.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm_module(input, self.num_groups, self.weight, self.bias, self.eps, **self._options())

    def _options(self) -> dict:
        return {"casting_mode": self.casting_mode, "offset": self.offset}


class RMSNorm(_Options, NotScriptable, nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``. ``eps=None`` is, as in torch 2.13, the eps of the compute dtype:
    ``torch.finfo(torch.float32).eps`` for float16, bfloat16 and float32 input, float64's own for float64.
    Keyword-only ``casting_mode``, ``offset``, ``channels_first`` as in the module docstring (defaults: torch's)."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, casting_mode: str = "torch", offset: float = 0.0, channels_first: bool = False) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self._set_options(casting_mode, offset, channels_first)

    def forward(self, input: Tensor) -> Tensor:
        if self._plain():
            return nf.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return rms_norm_module(input, self.normalized_shape, self.weight, self.eps, **self._options())


class LocalResponseNorm(NotScriptable, nn.LocalResponseNorm):
    """Drop-in for ``torch.nn.LocalResponseNorm``; ``convention`` ("torch", "onnx", "caffe", "tf") and
    ``region`` ("across_channels", "within_channel") select the other frameworks' definitions (see
    :func:`normkit.functional.lrn`). With the defaults, repr and state dict are torch's."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *,
                 convention: str = "torch", region: str = "across_channels") -> None:
        super().__init__(size, alpha, beta, k)
        if convention not in CONVENTIONS:
            raise ValueError(f"LocalResponseNorm: unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
        if region not in REGIONS:
            raise ValueError(f"LocalResponseNorm: unknown region {region!r}; expected one of {', '.join(REGIONS)}")
        self.convention = convention
        self.region = region

    def forward(self, input: Tensor) -> Tensor:
        return nf.lrn(input, self.size, self.alpha, self.beta, self.k, convention=self.convention, region=self.region)

    def extra_repr(self) -> str:
        extra = "" if self.convention == "torch" else f", convention={self.convention!r}"
        extra += "" if self.region == "across_channels" else f", region={self.region!r}"
        return super().extra_repr() + extra
