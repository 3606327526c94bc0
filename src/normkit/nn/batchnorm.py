"""BatchNorm1d/2d/3d and FrozenBatchNorm1d/2d/3d.

Each ``BatchNormNd`` subclasses ``torch.nn.BatchNormNd`` and replaces only the computation, so the
constructor, parameters, buffers (``num_batches_tracked`` a long), ``repr``, ``reset_parameters``,
``reset_running_stats``, input checks and the ``_version`` state-dict migration are torch's own, and
``load_state_dict(strict=True)`` works in both directions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as nf


class _BatchNormForward:
    """torch's BatchNorm semantics (momentum=None as a cumulative average, track_running_stats, eval with
    or without buffers) over :func:`normkit.functional.batch_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return nf.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                             self.weight, self.bias, use_batch_stats, momentum, self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``."""


class _FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers (no gradients, untouched by
    optimizers and ``train()``): ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``eps`` is explicit (pretrained detection weights differ on it: 1e-5 in torch, 0 in some exports).
    State dict: ``weight``, ``bias``, ``running_mean``, ``running_var``; a BatchNorm's state dict loads
    directly (its ``num_batches_tracked`` is ignored).
    """

    _batchnorm: type[nn.modules.batchnorm._BatchNorm]

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _check_input_dim(self, input: Tensor) -> None:
        self._batchnorm._check_input_dim(self, input)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return nf.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, eps: float | None = None):
        """Freeze a BatchNorm's current statistics (``affine=False`` freezes weight 1 and bias 0)."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {bn!r}: it has no running statistics (track_running_stats=False)")
        frozen = cls(bn.num_features, bn.eps if eps is None else eps, device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def to_batchnorm(self) -> nn.modules.batchnorm._BatchNorm:
        """A normkit BatchNorm (eval mode, affine, tracking statistics) that computes the same function."""
        bn = self._twin(self.num_features, eps=self.eps, device=self.running_mean.device, dtype=self.running_mean.dtype)
        bn.load_state_dict({k: v for k, v in self.state_dict().items()}, strict=False)
        return bn.eval()


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C)`` or ``(N, C, L)``."""

    _batchnorm = nn.BatchNorm1d
    _twin = BatchNorm1d


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C, H, W)`` (torchvision's FrozenBatchNorm2d, with an explicit eps)."""

    _batchnorm = nn.BatchNorm2d
    _twin = BatchNorm2d


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C, D, H, W)``."""

    _batchnorm = nn.BatchNorm3d
    _twin = BatchNorm3d
