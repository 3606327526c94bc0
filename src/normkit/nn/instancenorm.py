"""InstanceNorm1d/2d/3d: torch's classes (unbatched input, warnings, state dict) over normkit's math."""

from __future__ import annotations

import warnings

import torch.fx
from torch import Tensor, nn

from .. import functional as nf
from ._toolchain import NotScriptable, check_input_rank


def instance_norm_module(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                         bias: Tensor | None, *, no_batch_dim: int, num_features: int, affine: bool,
                         use_input_stats: bool, momentum: float | None, eps: float) -> Tensor:
    """Everything ``torch.nn.InstanceNormNd.forward`` does (rank check, the num_features error or warning,
    unbatched input), as one function of tensors and constants, so that torch.fx records one node per
    module call (this function is fx-wrapped)."""
    check_input_rank(input, (no_batch_dim, no_batch_dim + 1))
    feature_dim = input.dim() - no_batch_dim
    if input.size(feature_dim) != num_features:
        if affine:
            raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                             f" ({num_features}), but got: {input.size(feature_dim)}.")
        warnings.warn(f"input's size at dim={feature_dim} does not match num_features. "
                      "You can silence this warning by not passing in num_features, "
                      "which is not used because affine=False", stacklevel=3)
    unbatched = input.dim() == no_batch_dim
    y = nf.instance_norm(input.unsqueeze(0) if unbatched else input, running_mean, running_var, weight, bias,
                         use_input_stats, 0.0 if momentum is None else momentum, eps)
    return y.squeeze(0) if unbatched else y


torch.fx.wrap("instance_norm_module")


class _InstanceNormForward(NotScriptable):
    def forward(self, input: Tensor) -> Tensor:
        return instance_norm_module(input, self.running_mean, self.running_var, self.weight, self.bias,
                                    no_batch_dim=self._get_no_batch_dim(), num_features=self.num_features,
                                    affine=self.affine, use_input_stats=self.training or not self.track_running_stats,
                                    momentum=self.momentum, eps=self.eps)


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """Drop-in for ``torch.nn.InstanceNorm1d``: input ``(N, C, L)`` or ``(C, L)``."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """Drop-in for ``torch.nn.InstanceNorm2d``: input ``(N, C, H, W)`` or ``(C, H, W)``."""


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """Drop-in for ``torch.nn.InstanceNorm3d``: input ``(N, C, D, H, W)`` or ``(C, D, H, W)``."""
