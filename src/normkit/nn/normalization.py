"""LayerNorm, GroupNorm, RMSNorm and LocalResponseNorm: torch's classes over normkit's math."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as nf
from ..ops.local_response_norm import CONVENTIONS, REGIONS
from ._toolchain import NotScriptable


class LayerNorm(NotScriptable, nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` (``elementwise_affine``, ``bias``, ``device``, ``dtype``)."""

    def forward(self, input: Tensor) -> Tensor:
        return nf.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(NotScriptable, nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm``."""

    def forward(self, input: Tensor) -> Tensor:
        return nf.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(NotScriptable, nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``. ``eps=None`` is, as in torch 2.13, the eps of the compute dtype:
    ``torch.finfo(torch.float32).eps`` for float16, bfloat16 and float32 input, float64's own for float64."""

    def forward(self, input: Tensor) -> Tensor:
        return nf.rms_norm(input, self.normalized_shape, self.weight, self.eps)


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
