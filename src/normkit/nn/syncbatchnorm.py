"""SyncBatchNorm: batch statistics synchronized across the processes of a ``torch.distributed`` group.

Same constructor, parameters, buffers, ``repr``, ``_version`` migration and state dict as
``torch.nn.SyncBatchNorm`` (``load_state_dict(strict=True)`` works both ways, and with BatchNormNd's state
dicts), but -- unlike the other normkit modules -- **not a subclass** of torch's class: PyTorch's
``DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm`` instance in a CPU model ("SyncBatchNorm
layers only work with GPU modules"), which would defeat the point. It subclasses torch's common
``_BatchNorm`` base instead (as torch's SyncBatchNorm does). Differences in behaviour, all where torch's
cannot run or is not robust:

* it runs wherever ``torch.distributed``'s ``all_gather`` runs: CPU tensors on gloo as well as CUDA
  tensors (checked over gloo; NCCL untested) -- torch's raises "SyncBatchNorm expected input tensor to be
  on GPU" for CPU input;
* the statistics are normkit's robust moments, merged exactly across ranks
  (:mod:`normkit.ops.sync_batch_norm`);
* when synchronization does not apply -- eval mode, ``torch.distributed`` not available or not
  initialized, or a process group of one -- it is exactly normkit's ``BatchNorm`` on the local batch
  (torch's does the same, but on CPU only in those cases).
"""

from __future__ import annotations

import torch.distributed as dist
import torch.fx
from torch import Tensor, nn

from ..ops.sync_batch_norm import sync_batch_norm_stateless
from ._toolchain import NotScriptable
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm_module, update_running_stats

_BY_INPUT_DIM = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
_BY_DIM = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _check_input_dim(input: Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _check_non_zero_input_channels(input: Tensor) -> None:
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")


def _sync_group(process_group):
    """The process group to synchronize over, or None when there is nothing to synchronize with."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def sync_batch_norm_module(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                           weight: Tensor | None, bias: Tensor | None, num_batches_tracked: Tensor | None, *,
                           training: bool, track_running_stats: bool, momentum: float | None, eps: float,
                           process_group=None, name: str = "SyncBatchNorm") -> Tensor:
    """Everything ``SyncBatchNorm.forward`` does (input checks, choosing the group, step count, momentum=None),
    as one function, fx-wrapped like :func:`batch_norm_module`: torch.fx records a SyncBatchNorm call as one
    node, and whether to synchronize is decided when the node runs (the ``torch.distributed`` state then).
    Without a group of two or more ranks in training mode it is :func:`batch_norm_module` on the local batch.
    (A ``process_group`` object, when given, is kept in the fx graph as an opaque constant.)"""
    _check_input_dim(input)
    _check_non_zero_input_channels(input)
    group = _sync_group(process_group) if training else None
    if group is None:  # eval, no torch.distributed, or a group of one: exactly normkit's BatchNorm
        return batch_norm_module(input, running_mean, running_var, weight, bias, num_batches_tracked,
                                 ranks=(input.dim(),), training=training, track_running_stats=track_running_stats,
                                 momentum=momentum, eps=eps)
    stats = (running_mean, running_var) if track_running_stats else (None, None)
    counting = track_running_stats and num_batches_tracked is not None

    def stateless(m):
        return sync_batch_norm_stateless(input, *stats, weight, bias, m, eps, group, name)
    return update_running_stats(stateless, stats, num_batches_tracked, momentum, counting)


torch.fx.wrap("sync_batch_norm_module")


class SyncBatchNorm(NotScriptable, nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None, *, bias=True)``; input
    ``(N, C, *)``. ``isinstance(m, torch.nn.SyncBatchNorm)`` is False on purpose (see the module docstring);
    ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` is True.

    In training mode with a process group of two or more ranks, every rank of the group must call each
    SyncBatchNorm layer once per step (a rank with an empty batch too). Per layer and step: one
    ``all_gather`` of ``4C + 2`` numbers per rank forward, one of ``5C`` backward (numbers in the compute
    dtype: float32, or float64 for float64 input). Nothing is communicated in eval mode.

    ``layer_name`` (set by :meth:`convert_sync_batchnorm` to the module's qualified name, or by hand)
    names the layer in errors: a peer that dies or stalls past the group's timeout raises a
    ``RuntimeError`` naming it on the surviving ranks.
    """

    layer_name: str | None = None  # qualified name, for error messages
    reverts_to: int | None = None  # 1, 2 or 3: the BatchNorm{1,2,3}d this layer was converted from
    last_input_dim: int | None = None  # rank of the last input seen

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *, bias: bool = True) -> None:
        extra = {} if bias else {"bias": False}  # torch < 2.13 has no bias argument (and raises for bias=False)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **extra)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        _check_input_dim(input)

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        _check_non_zero_input_channels(input)

    def _name(self) -> str:
        return self.layer_name or f"SyncBatchNorm({self.num_features})"

    def forward(self, input: Tensor) -> Tensor:
        y = sync_batch_norm_module(input, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.num_batches_tracked, training=self.training,
                                   track_running_stats=self.track_running_stats, momentum=self.momentum, eps=self.eps,
                                   process_group=self.process_group, name=self._name())
        if isinstance(input, Tensor):  # not under torch.fx (a Proxy): lets revert_sync_batchnorm pick BatchNorm1d/2d/3d
            self.last_input_dim = input.dim()
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every ``BatchNorm*d`` (torch's or normkit's, or a subclass, or a SyncBatchNorm) in ``module`` becomes a
        normkit ``SyncBatchNorm`` sharing its parameters and buffers (torch's semantics: the module is
        changed in place; a BatchNorm passed itself is returned as a new module). Training mode,
        ``qconfig`` and the BatchNorm class (used by :meth:`revert_sync_batchnorm`) are kept; each converted
        layer's ``layer_name`` is its qualified name in ``module``."""
        return cls._convert(module, process_group, "")

    @classmethod
    def _convert(cls, module, process_group, prefix):
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, **({} if module.bias is not None or not module.affine else {"bias": False}))
            _adopt_state(out, module)
            out.layer_name = prefix or None
            if isinstance(module, SyncBatchNorm):
                out.layer_name = module.layer_name or out.layer_name
                out.reverts_to = getattr(module, "reverts_to", None)
            elif not isinstance(module, nn.SyncBatchNorm):  # a BatchNormNd: remember N for the way back
                out.reverts_to = next(dim for dim, bn in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d), (None, nn.Module))
                                      if isinstance(module, bn))
        for name, child in module.named_children():
            out.add_module(name, cls._convert(child, process_group, f"{prefix}.{name}" if prefix else name))
        return out

    @staticmethod
    def revert_sync_batchnorm(module: nn.Module, dim: int | None = None) -> nn.Module:
        """The inverse of :meth:`convert_sync_batchnorm`: every SyncBatchNorm (normkit's or torch's) becomes a
        normkit ``BatchNorm{dim}d`` sharing its parameters and buffers (``normkit.revert`` then gives torch's
        classes). The spatial rank is, in this order: ``dim`` (1, 2 or 3) if given; the BatchNorm class the
        layer was converted from; the rank of the last input it saw; otherwise a ``ValueError``. In place,
        like the conversion; a SyncBatchNorm passed itself is returned as a new module."""
        if dim not in (None, 1, 2, 3):
            raise ValueError(f"revert_sync_batchnorm: dim must be 1, 2, 3 or None, got {dim!r}")
        return SyncBatchNorm._revert(module, dim, "")

    @staticmethod
    def _revert(module, dim, prefix):
        out = module
        if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
            cls = _BY_DIM.get(dim) or _BY_DIM.get(getattr(module, "reverts_to", None)) \
                or _BY_INPUT_DIM.get(getattr(module, "last_input_dim", None))
            if cls is None:
                raise ValueError(
                    f"revert_sync_batchnorm: cannot tell whether {prefix or 'the module'} ({module!r}) should become "
                    f"BatchNorm1d, 2d or 3d: it was not converted from a BatchNorm and has seen no input; pass "
                    f"dim=1, 2 or 3, or run one forward first")
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      device=_device_of(module), dtype=_dtype_of(module),
                      **({} if module.bias is not None or not module.affine else {"bias": False}))
            _adopt_state(out, module)
        for name, child in module.named_children():
            out.add_module(name, SyncBatchNorm._revert(child, dim, f"{prefix}.{name}" if prefix else name))
        return out


def _adopt_state(out: nn.Module, module: nn.Module) -> None:
    """``out`` takes over ``module``'s parameters and buffers (shared, not copied), its training mode and
    its ``qconfig``: the two directions of the SyncBatchNorm conversion move state the same way."""
    if module.affine:
        out.weight = module.weight
        out.bias = module.bias
    out.running_mean = module.running_mean
    out.running_var = module.running_var
    out.num_batches_tracked = module.num_batches_tracked
    out.training = module.training
    if hasattr(module, "qconfig"):
        out.qconfig = module.qconfig


def _device_of(m: nn.Module):
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return None if t is None else t.device


def _dtype_of(m: nn.Module):
    t = next((t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()), None)
    return None if t is None else t.dtype
