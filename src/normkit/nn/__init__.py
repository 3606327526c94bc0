"""Drop-in normalization modules: each subclasses its torch twin and replaces only the computation with
normkit's, so constructors, parameters, buffers, repr and state dicts are torch's own."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .normalization import GroupNorm, LayerNorm, LocalResponseNorm, RMSNorm
from .syncbatchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GroupNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm",
    "SyncBatchNorm",
]
