"""Synchronized batch normalization over a ``torch.distributed`` process group (any backend: gloo, NCCL, ...).

Shapes: every rank holds ``input (N_r, C, *)`` (``N_r`` may differ between ranks and may be 0); ``weight``,
``bias``, ``running_mean``, ``running_var`` of shape ``(C,)``, identical on every rank.

Batch norm in training (:mod:`normkit.ops.batch_norm`) over the concatenation of all ranks' batches, in rank
order: for each channel ``c``, over the ``n = sum_r N_r * prod(*)`` values of every rank::

    mean_c = sum(x) / n                var_c = sum((x - mean_c)**2) / n           (biased; sums over all ranks)
    x_hat = (x - mean_c) / sqrt(var_c + eps)          y = x_hat * weight_c + bias_c
    running_mean <- (1 - momentum) * running_mean + momentum * mean_c             (the same on every rank)
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * n / (n - 1)

    g = dy * weight      dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))      (means over all ranks' values)
    dweight = sum(dy * x_hat)        dbias = sum(dy)                              (over this rank's values)

As torch's, ``dweight``/``dbias`` are each rank's own part; ``DistributedDataParallel`` averages them.

In terms of the spec (:mod:`normkit._spec`), the same calls as single-process batch norm with the reduced
quantities exchanged between them:

* forward: local ``moments`` (count, exponent, pivot, shifted mean, M2 per channel) -> ONE ``all_gather``
  of ``4 C + 2`` numbers -> ``merge_moments`` in rank order (skipping empty ranks, so every rank computes
  bit-identical statistics) -> ``center_scaled`` (the local values in the global scaled, shifted units) ->
  ``standardize_from_moments`` -> ``affine``; ``running_stats`` for the running statistics;
* backward: ``affine_backward`` -> local ``grad_sums`` (exponent, pivot, ``sum(g_s)``, ``sum(g_s x_hat)``,
  ``sum(x_hat)``) -> ONE ``all_gather`` of ``5 C`` numbers -> ``merge_grad_sums`` in rank order ->
  ``standardize_backward_from_sums``.

A ``sum / sum of squares`` all-reduce (what textbook SyncBN does) cancels catastrophically at a float32 mean
offset of 1e7 and overflows above ~1e19; the scaled, shifted moments do neither. (An ``all_reduce`` of the
gradient sums cannot be made overflow-free without a first collective to agree on the scale; gathering the
exponents with the sums keeps backward at one collective.)

Cost per layer and training step (``W`` ranks, ``C`` channels, ``b`` bytes of the compute dtype, 4 for
float32/float16/bfloat16 inputs, 8 for float64): forward one ``all_gather`` of ``(4 C + 2) b`` bytes per
rank (each rank receives ``W (4 C + 2) b``); backward, when the input needs a gradient, one ``all_gather``
of ``5 C b`` bytes per rank. Eval mode communicates nothing.

Precision: the spec's policy: statistics, ``x_hat`` and the exchanged buffers in float32 for
float16/bfloat16/float32 inputs, float64 for float64; output in the input's dtype.

Faults: every collective runs under the process group's timeout; a failure (a peer died, stalled past the
timeout, or the group was destroyed) is re-raised as a ``RuntimeError`` naming the layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from functools import reduce

from .. import _checks
from .. import _spec as spec
from .._spec import GradSums, Moments, compute_dtype
from ._normalize import channel_view, check_norm_args, write_back

_COUNT_SPLIT = 2 ** 24  # counts travel as (hi, lo) halves, each exact in float32: counts up to 2**48


def _collective(what: str, name: str, fn, *args, **kwargs):
    """Run a collective; a failure (dead or stalled peer, timeout, destroyed group) names the layer."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # gloo raises RuntimeError / DistBackendError, NCCL DistError subclasses
        raise RuntimeError(
            f"SyncBatchNorm layer {name!r}: the {what} across the process group failed ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}). A peer process died, stalled past "
            f"the process group's timeout, or did not reach this layer (every rank must run the same layers in "
            f"training mode, each with its own batch, even an empty one)"
        ) from exc


def _all_gather(buf: Tensor, group, name: str, what: str) -> list[Tensor]:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(buf) for _ in range(world)]
    _collective(what, name, dist.all_gather, parts, buf, group=group)
    return parts


def _pack_moments(m: Moments | None, count: int, num_features: int, ct: torch.dtype, device) -> Tensor:
    """``[count_hi, count_lo, exponent(C), pivot(C), mean(C), m2(C)]`` in the compute dtype."""
    buf = torch.zeros(4 * num_features + 2, dtype=ct, device=device)
    buf[0], buf[1] = count // _COUNT_SPLIT, count % _COUNT_SPLIT
    if m is not None:
        for i, t in enumerate((m.exponent, m.pivot, m.mean, m.m2)):
            buf[2 + i * num_features: 2 + (i + 1) * num_features] = t.reshape(num_features)
    return buf


def _unpack_moments(buf: Tensor, num_features: int, shape) -> Moments:
    hi, lo = (int(v) for v in buf[:2].tolist())
    fields = buf[2:].view(4, num_features)
    return Moments(hi * _COUNT_SPLIT + lo, *(fields[i].view(shape) for i in range(4)))


def sync_batch_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group, name: str):
    """Training forward of synchronized batch norm (one collective).

    ``weight``/``bias``: ``(C,)`` or None. Returns ``(y, x_hat, r, k, mean, var, counts)``: ``y`` in the
    input's dtype; ``x_hat`` (local, input's shape), ``r``, ``k`` (``rstd = r * 2**k``, keepdim shape),
    ``mean`` and biased ``var`` (``(C,)``) in the compute dtype; ``counts`` the per-rank counts per channel.
    ``x_hat`` etc. are None when the global batch is empty.
    """
    ct = compute_dtype(x.dtype)
    num_features = x.shape[1]
    dims = (0, *range(2, x.dim()))
    keep = (1, num_features, *([1] * (x.dim() - 2)))
    xc = x.to(ct)
    n_local = x.numel() // num_features
    local = spec.moments(xc, dims)[0] if n_local > 0 else None
    parts = _all_gather(_pack_moments(local, n_local, num_features, ct, x.device), group, name, "all_gather of the batch statistics")
    parts = [_unpack_moments(p, num_features, keep) for p in parts]
    counts = [p.count for p in parts]
    n = sum(counts)
    if n == 1:  # on every rank, since every rank sees the same counts
        raise ValueError(
            f"SyncBatchNorm layer {name!r}: Expected more than 1 value per channel when training, got input size "
            f"{list(x.shape)} on this rank and 1 value per channel over the process group (counts per rank: "
            f"{counts}); use a larger batch, or eval mode (running statistics)"
        )
    if n == 0:
        return x.clone(), None, None, None, None, None, counts
    total = reduce(spec.merge_moments, parts)  # rank order, the order of the concatenated batch; empty parts skipped
    # the local values in the global scaled, shifted units: the pivot is the first rank's first value, so
    # y - pivot is exact at a large common offset
    s = spec.standardize_from_moments(spec.center_scaled(xc, total), total, eps)
    y = spec.affine(s.x_hat, channel_view(weight, x.dim()), channel_view(bias, x.dim())).to(x.dtype)
    if y is s.x_hat:
        y = y.clone()
    return y, s.x_hat, s.r, s.k, s.mean.reshape(num_features), s.var.reshape(num_features), counts


def _pack_grad_sums(sums: GradSums | None, num_features: int, ct: torch.dtype, device) -> Tensor:
    """``[exponent, pivot, sum_g, sum_gx, sum_x]`` per channel, ``(5, C)`` in the compute dtype (zeros for an empty rank)."""
    buf = torch.zeros(5, num_features, dtype=ct, device=device)
    if sums is not None:
        for i, t in enumerate((sums.exponent, sums.pivot, sums.sum_g, sums.sum_gx, sums.sum_x)):
            buf[i] = t.reshape(num_features)
    return buf


def sync_batch_norm_backward(dy: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, weight: Tensor | None, counts: list[int],
                             group, name: str, needs: tuple[bool, bool, bool]):
    """``(dx, dweight, dbias)`` of :func:`sync_batch_norm_forward`; one collective when ``needs[0]``.

    ``dweight``/``dbias`` are this rank's parts (sums over its own values), as torch's SyncBatchNorm; all
    three in the compute dtype.
    """
    ct = x_hat.dtype
    num_features = x_hat.shape[1]
    dims = (0, *range(2, x_hat.dim()))
    keep = (1, num_features, *([1] * (x_hat.dim() - 2)))
    view = (lambda t: None if t is None else t.view(keep).to(ct))  # noqa: E731
    dy = dy.to(ct)
    bias_shape = torch.empty(keep, dtype=ct, device=dy.device)  # dbias is asked for only when there is a bias
    g, dweight, dbias = spec.affine_backward(dy, x_hat, view(weight), bias_shape, needs)
    dweight = None if dweight is None else dweight.reshape(num_features)
    dbias = None if dbias is None else dbias.reshape(num_features)
    if not needs[0]:
        return None, dweight, dbias
    n_local = x_hat.numel() // num_features
    local = spec.grad_sums(g, x_hat, dims, center=True, with_sum_x=True)[0] if n_local > 0 else None
    parts = _all_gather(_pack_grad_sums(local, num_features, ct, x_hat.device), group, name, "all_gather of the gradient sums")
    total = reduce(spec.merge_grad_sums, [GradSums(c, *(p[i].view(keep) for i in range(5))) for p, c in zip(parts, counts)])
    if n_local == 0:
        return torch.zeros_like(dy), dweight, dbias
    return spec.standardize_backward_from_sums(g, x_hat, r, k, total), dweight, dbias


class SyncBatchNormFunction(torch.autograd.Function):
    """``y = sync_batch_norm(x) * weight + bias``; also returns, non-differentiable and the same on every
    rank, the global ``mean`` and biased ``var`` (``(C,)``, compute dtype; NaN for an empty global batch)
    and the global count per channel (a 0-d int64 tensor).

    Backward is once-differentiable (as torch's SyncBatchNorm): double backward raises.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, name):
        y, x_hat, r, k, mean, var, counts = sync_batch_norm_forward(x, weight, bias, eps, group, name)
        n = sum(counts)
        ctx.save_for_backward(x_hat, r, k, weight)
        ctx.counts, ctx.group, ctx.name = counts, group, name
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        if mean is None:
            mean = var = torch.full((x.shape[1],), float("nan"), dtype=compute_dtype(x.dtype), device=x.device)
        count = torch.tensor(n, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x_hat, r, k, weight = ctx.saved_tensors
        if sum(ctx.counts) == 0:  # nobody had data: nothing to exchange, zero gradients everywhere
            dx = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=dy.device) if ctx.needs_input_grad[0] else None
            dweight = torch.zeros_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
            dbias = torch.zeros(ctx.x_shape[1], dtype=ctx.bias_dtype, device=dy.device) if ctx.needs_input_grad[2] else None
            return dx, dweight, dbias, None, None, None
        dx, dweight, dbias = sync_batch_norm_backward(dy, x_hat, r, k, weight, ctx.counts, ctx.group, ctx.name,
                                                      ctx.needs_input_grad[:3])
        cast = lambda t, dtype: None if t is None else t.to(dtype)  # noqa: E731
        return cast(dx, ctx.x_dtype), cast(dweight, None if weight is None else weight.dtype), cast(dbias, ctx.bias_dtype), None, None, None


def sync_batch_norm_stateless(input, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5,
                              process_group=None, name="SyncBatchNorm"):
    """Training-mode synchronized batch norm as a function: returns ``(output, new_running_mean,
    new_running_var)``, the running statistics the same on every rank (given ones unchanged when the whole
    group's batch is empty; None where None is given).

    Every rank of ``process_group`` (None: the default world group, which must be initialized) must call
    it with ``(N_r, C, *)`` inputs of equal ``C`` and ``*``; ``N_r`` may be 0. ``name`` appears in errors.
    For eval mode, or a group of one process, use :func:`normkit.functional.batch_norm`.
    """
    op = "sync_batch_norm"
    check_norm_args(op, input, weight, bias, running_mean, running_var, momentum, eps, need_running=False)
    _checks.check_min_dim(op, input, 2, "(N, C, *)")
    if input.shape[1] == 0:
        raise ValueError(f"SyncBatchNorm layer {name!r}: number of input channels should be non-zero")
    group = dist.group.WORLD if process_group is None else process_group
    y, mean, var, count = SyncBatchNormFunction.apply(input, weight, bias, float(eps), group, name)
    n = int(count)
    if n == 0:  # the whole group's batch is empty: the running statistics stay
        return y, running_mean, running_var
    return (y, *spec.running_stats(running_mean, running_var, mean, var, n, momentum))


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5,
                    process_group=None, name="SyncBatchNorm"):
    """Training-mode synchronized batch norm; updates ``running_mean``/``running_var`` in place (identically
    on every rank: torch's momentum, unbiased global variance). See :func:`sync_batch_norm_stateless`."""
    y, new_mean, new_var = sync_batch_norm_stateless(input, running_mean, running_var, weight, bias, momentum, eps,
                                                     process_group, name)
    write_back(running_mean, new_mean)
    write_back(running_var, new_var)
    return y
