"""BatchNorm1d/2d/3d and FrozenBatchNorm1d/2d/3d.

Each ``BatchNormNd`` subclasses ``torch.nn.BatchNormNd`` and replaces only the computation, so the
constructor, parameters, buffers (``num_batches_tracked`` a long), ``repr``, ``reset_parameters``,
``reset_running_stats`` and the ``_version`` state-dict migration are torch's own, and
``load_state_dict(strict=True)`` works in both directions. ``forward`` is one call of
:func:`batch_norm_module`, which also holds torch's rank check (same error), so torch.fx sees one node.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from .. import _spec as spec
from .. import functional as nf
from ..ops._normalize import write_back
from ._toolchain import NotScriptable, check_input_rank


def update_running_stats(stateless, stats: tuple[Tensor | None, Tensor | None], num_batches_tracked: Tensor | None,
                        momentum: float | None, counting: bool) -> Tensor:
    """The step count and running-statistics update of torch's BatchNorm modules, for normkit's BatchNorm and
    SyncBatchNorm alike: ``stateless(momentum) -> (y, new_mean, new_var)`` computes one step (the functional
    core, single-process or synchronized); this counts the step when ``counting`` and writes the running
    statistics. ``momentum=None`` is the cumulative moving average ``running + (batch - running) / steps``:
    the batch statistics (``stateless(1.0)``) moved by :func:`normkit._spec.momentum_update` with momentum
    ``1 / num_batches_tracked`` as a tensor, on the device -- no host sync, so torch.export and torch.compile
    see no data-dependent Python value."""
    if counting:
        num_batches_tracked.add_(1)
    if momentum is not None or not counting:
        y, new_mean, new_var = stateless(0.0 if momentum is None else momentum)
        for running, new in zip(stats, (new_mean, new_var)):
            write_back(running, new)
        return y
    y, batch_mean, batch_var = stateless(1.0)
    for running, batch in zip(stats, (batch_mean, batch_var)):
        if running is not None and batch is not running:  # (an empty batch returns the running statistics)
            step = num_batches_tracked.to(spec.compute_dtype(running.dtype)).reciprocal()
            write_back(running, spec.momentum_update(running, batch, step))
    return y


def batch_norm_module(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                      bias: Tensor | None, num_batches_tracked: Tensor | None, *, ranks: tuple[int, ...], training: bool,
                      track_running_stats: bool, momentum: float | None, eps: float) -> Tensor:
    """Everything ``torch.nn.BatchNormNd.forward`` does (rank check, step count, momentum=None as a cumulative
    average, eval with or without buffers), as one function of tensors and constants: torch.fx records a
    module call as one node (this function is fx-wrapped), and it reads no tensor value on the host
    (:func:`update_running_stats`)."""
    check_input_rank(input, ranks)
    use_batch_stats = training or (running_mean is None and running_var is None)
    stats = (running_mean, running_var) if not training or track_running_stats else (None, None)
    counting = training and track_running_stats and num_batches_tracked is not None

    def stateless(m):
        return nf.batch_norm_stateless(input, *stats, weight, bias, use_batch_stats, m, eps)
    return update_running_stats(stateless, stats, num_batches_tracked, momentum, counting)


torch.fx.wrap("batch_norm_module")


def promoted_batch_norm(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor, *,
                        ranks: tuple[int, ...], eps: float) -> Tensor:
    """Frozen batch norm computed in ``torch.promote_types`` of the input's and the buffers' dtypes, the output
    in that dtype: torchvision's ``FrozenBatchNorm2d`` (``x * scale + shift`` with buffers of their own dtype),
    for :func:`normkit.convert`'s twin of it. fx-wrapped: one node, its dtypes decided when it runs."""
    dtype = torch.promote_types(input.dtype, running_mean.dtype)
    rm, rv, w, b = (t.to(dtype) for t in (running_mean, running_var, weight, bias))
    return batch_norm_module(input.to(dtype), rm, rv, w, b, None, ranks=ranks, training=False, track_running_stats=True,
                             momentum=0.0, eps=eps)


torch.fx.wrap("promoted_batch_norm")


class _BatchNormForward(NotScriptable):
    """torch's BatchNorm semantics over :func:`normkit.functional.batch_norm` (see :func:`batch_norm_module`)."""

    _ranks: tuple[int, ...]

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_module(input, self.running_mean, self.running_var, self.weight, self.bias,
                                 self.num_batches_tracked, ranks=self._ranks, training=self.training,
                                 track_running_stats=self.track_running_stats, momentum=self.momentum, eps=self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``."""

    _ranks = (4,)


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``."""

    _ranks = (5,)


class _FrozenBatchNorm(NotScriptable, nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers (no gradients, untouched by
    optimizers and ``train()``): ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``eps`` is explicit (pretrained detection weights differ on it: 1e-5 in torch, 0 in some exports).
    State dict: ``weight``, ``bias``, ``running_mean``, ``running_var``; a BatchNorm's state dict loads
    directly (its ``num_batches_tracked`` is ignored).
    """

    _twin: type[_BatchNormForward]
    casting_mode = "torch"  # "promote": torchvision's dtype rule (see promoted_batch_norm), set by normkit.convert

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        if self.casting_mode == "promote":
            return promoted_batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                       ranks=self._twin._ranks, eps=self.eps)
        return batch_norm_module(input, self.running_mean, self.running_var, self.weight, self.bias, None,
                                 ranks=self._twin._ranks, training=False, track_running_stats=True, momentum=0.0,
                                 eps=self.eps)

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

    _twin = BatchNorm1d


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C, H, W)`` (torchvision's FrozenBatchNorm2d, with an explicit eps)."""

    _twin = BatchNorm2d


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C, D, H, W)``."""

    _twin = BatchNorm3d
