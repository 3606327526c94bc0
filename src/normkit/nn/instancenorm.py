"""InstanceNorm1d/2d/3d: torch's classes (unbatched input, warnings, state dict) over normkit's math."""

from __future__ import annotations

from torch import nn

from .. import functional as nf


class _InstanceNormApply:
    def _apply_instance_norm(self, input):  # the hook torch's _InstanceNorm.forward calls
        return nf.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training or not self.track_running_stats,
                                self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormApply, nn.InstanceNorm1d):
    """Drop-in for ``torch.nn.InstanceNorm1d``: input ``(N, C, L)`` or ``(C, L)``."""


class InstanceNorm2d(_InstanceNormApply, nn.InstanceNorm2d):
    """Drop-in for ``torch.nn.InstanceNorm2d``: input ``(N, C, H, W)`` or ``(C, H, W)``."""


class InstanceNorm3d(_InstanceNormApply, nn.InstanceNorm3d):
    """Drop-in for ``torch.nn.InstanceNorm3d``: input ``(N, C, D, H, W)`` or ``(C, D, H, W)``."""
