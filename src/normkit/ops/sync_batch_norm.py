"""Synchronized batch normalization over a ``torch.distributed`` process group (any backend: gloo, NCCL, ...).

Shapes: every rank holds ``input (N_r, C, *)`` (``N_r`` may differ between ranks and may be 0); ``weight``,
``bias``, ``running_mean``, ``running_var`` of shape ``(C,)``, identical on every rank.

Training forward: the statistics are those of single-process batch norm over the concatenation of all
ranks' batches, in rank order (``n = sum_r N_r * prod(*)`` values per channel)::

    mean_c, var_c (biased) over all ranks          y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c
    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * n / (n - 1)      (on every rank)

How: each rank computes its local robust :class:`normkit.Moments` per channel (count, exponent, pivot,
shifted mean, M2: see :mod:`normkit._stats`), packs them into one buffer of ``4 C + 2`` numbers, and ONE
``all_gather`` exchanges the buffers. Every rank then merges the parts with :func:`normkit.merge_moments`
in rank order (skipping empty ranks), so every rank computes bit-identical statistics and running
buffers. A ``sum / sum of squares`` all-reduce (what textbook SyncBN does) cancels catastrophically at a
float32 mean offset of 1e7 and overflows above ~1e19; the scaled, shifted moments do neither.

Backward (closed form, ``g = dy * weight``, sums over all ranks' values of the channel, ``rstd = r * 2**k``)::

    dx = rstd * (g - sum(g) / n - x_hat * sum(g * x_hat) / n)       dweight = sum_local(dy * x_hat)
                                                                    dbias   = sum_local(dy)

The two global sums per channel come from ONE collective, an ``all_gather`` of 5 numbers per channel:
each rank scales its ``g`` by a power of two ``2**-e_r`` (the largest per channel, as the core does) and
shifts it by its first element ``p_r``, and sends ``(e_r, p_r, sum(g_s - p_r), sum((g_s - p_r) * x_hat),
sum(x_hat))``. Every rank brings the parts to the largest exponent and to rank 0's pivot (exactly, with
powers of two) and adds them in rank order. (An ``all_reduce`` of ``(sum g, sum g * x_hat)`` cannot be
made overflow-free without a first collective to agree on the scale; gathering the exponents with the
sums keeps it at one collective, ``5 C`` numbers per rank.) As in torch, ``dweight``/``dbias`` are each
rank's own part; ``DistributedDataParallel`` averages them.

Cost per layer and training step (``W`` ranks, ``C`` channels, ``b`` bytes of the compute dtype, 4 for
float32/float16/bfloat16 inputs, 8 for float64): forward one ``all_gather`` of ``(4 C + 2) b`` bytes per
rank (each rank receives ``W (4 C + 2) b``); backward, when the input needs a gradient, one ``all_gather``
of ``5 C b`` bytes per rank. Eval mode communicates nothing.

Precision: the core's policy (:mod:`normkit._stats`): statistics, ``x_hat`` and the exchanged buffers in
float32 for float16/bfloat16/float32 inputs, float64 for float64; output in the input's dtype.

Faults: every collective runs under the process group's timeout; a failure (a peer died, stalled past the
timeout, or the group was destroyed) is re-raised as a ``RuntimeError`` naming the layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _checks
from .._stats import Moments, compute_dtype, first, group_exponent, inv_std, merge_moments, moments, mul_pow2
from .batch_norm import channel_view, check_norm_args, momentum_update, write_back

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
    local = moments(xc, dims)[0] if n_local > 0 else None
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
    total = None
    for p in parts:  # rank order, the order of the concatenated batch
        if p.count > 0:
            total = p if total is None else merge_moments(total, p)
    # Normalize the local values with the global statistics, in the global scaled, shifted units: the
    # pivot is rank 0's first value, so y - pivot is exact at a large common offset.
    c = (xc * torch.exp2(-total.exponent) - total.pivot) - total.mean
    r, k = inv_std(total.m2 / n, total.exponent, eps)
    x_hat = mul_pow2(c * r, k + total.exponent)
    y = x_hat
    if weight is not None:
        y = y * channel_view(weight, x.dim()).to(ct)
    if bias is not None:
        y = y + channel_view(bias, x.dim()).to(ct)
    y = y.to(x.dtype)
    if y is x_hat:
        y = y.clone()
    return y, x_hat, r, k, total.mean_x().reshape(num_features), total.var_x().reshape(num_features), counts


def sync_batch_norm_backward(dy: Tensor, x_hat: Tensor, r: Tensor, k: Tensor, weight: Tensor | None, counts: list[int],
                             group, name: str, needs: tuple[bool, bool, bool]):
    """``(dx, dweight, dbias)`` of :func:`sync_batch_norm_forward`; one collective when ``needs[0]``.

    ``dweight``/``dbias`` are this rank's parts (sums over its own values), as torch's SyncBatchNorm; all
    three in the compute dtype.
    """
    ct = x_hat.dtype
    num_features = x_hat.shape[1]
    dims = (0, *range(2, x_hat.dim()))
    dy = dy.to(ct)
    w = channel_view(weight, x_hat.dim())
    dweight = (dy * x_hat).sum(dim=dims) if weight is not None and needs[1] else None
    dbias = dy.sum(dim=dims) if needs[2] else None
    if not needs[0]:
        return None, dweight, dbias
    g = dy if w is None else dy * w.to(ct)
    n_local = x_hat.numel() // num_features
    buf = torch.zeros(5, num_features, dtype=ct, device=x_hat.device)
    if n_local > 0:
        eg = group_exponent(g, dims)
        gs = g * torch.exp2(-eg)  # exact scaling: the sums below cannot overflow
        pivot = first(gs, dims)
        gd = gs - pivot  # a constant gradient gives exactly 0
        for i, t in enumerate((eg, pivot, gd.sum(dim=dims, keepdim=True), (gd * x_hat).sum(dim=dims, keepdim=True),
                               x_hat.sum(dim=dims, keepdim=True))):
            buf[i] = t.reshape(num_features)
    parts = _all_gather(buf, group, name, "all_gather of the gradient sums")
    live = [p for p, c in zip(parts, counts) if c > 0]
    e = torch.stack([p[0] for p in live]).amax(dim=0)  # common exponent: the largest
    p0 = mul_pow2(live[0][1], live[0][0] - e)  # common pivot: rank 0's (first nonempty rank's) first value
    sum_g = torch.zeros_like(e)
    sum_gx = torch.zeros_like(e)
    for p, c in zip(parts, counts):
        if c == 0:
            continue
        s = p[0] - e  # <= 0
        shift = mul_pow2(p[1], s) - p0  # this rank's pivot relative to the common one, in common units
        sum_g = sum_g + (mul_pow2(p[2], s) + shift * c)
        sum_gx = sum_gx + (mul_pow2(p[3], s) + shift * p[4])
    n = sum(counts)
    if n_local == 0:
        return torch.zeros_like(dy), dweight, dbias
    view = lambda t: t.view(1, num_features, *([1] * (x_hat.dim() - 2)))  # noqa: E731
    e, p0 = view(e), view(p0)
    t = (g * torch.exp2(-e) - p0) - view(sum_g) / n - x_hat * (view(sum_gx) / n)
    dx = mul_pow2(t * r, k + e)
    return dx, dweight, dbias


class SyncBatchNormFunction(torch.autograd.Function):
    """``y = sync_batch_norm(x) * weight + bias``; also returns, non-differentiable and the same on every
    rank, the global ``mean`` and unbiased ``var`` (``(C,)``, compute dtype; NaN for an empty global batch)
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
        else:
            var = var * (n / (n - 1))  # unbiased, for the running statistics (as single-process batch norm)
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
    if int(count) == 0:  # the whole group's batch is empty: the running statistics stay
        return y, running_mean, running_var
    return y, momentum_update(running_mean, mean, momentum), momentum_update(running_var, var, momentum)


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5,
                    process_group=None, name="SyncBatchNorm"):
    """Training-mode synchronized batch norm; updates ``running_mean``/``running_var`` in place (identically
    on every rank: torch's momentum, unbiased global variance). See :func:`sync_batch_norm_stateless`."""
    y, new_mean, new_var = sync_batch_norm_stateless(input, running_mean, running_var, weight, bias, momentum, eps,
                                                     process_group, name)
    write_back(running_mean, new_mean)
    write_back(running_var, new_var)
    return y
