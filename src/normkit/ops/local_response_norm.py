"""Local response normalization (Krizhevsky et al., 2012), in every convention users port from.

For each element ``x_i`` with a window ``W(i)`` of neighbours (across channels, or a spatial square within
its channel)::

    d_i = k + c * sum_{j in W(i)} x_j**2          y_i = x_i * d_i**(-beta)

Conventions (``size`` = window length ``n``; windows are zero-padded at the borders):

=================  =====================================  =================  ============
convention         window W(c) along the channels          c                  notes
=================  =====================================  =================  ============
``"torch"``        ``[c - n//2, c + (n-1)//2]``            ``alpha / n``      any n
``"onnx"``         ``[c - (n-1)//2, c + n//2]``            ``alpha / n``      differs from torch for even n
``"caffe"``        ``[c - (n-1)/2, c + (n-1)/2]``          ``alpha / n``      odd n only
``"tf"``           ``[c - r, c + r]``, ``n = 2r + 1``      ``alpha``          odd n only
=================  =====================================  =================  ============

``region="within_channel"`` (Caffe): an ``n x n`` spatial window over the last two dims, centred, with
``c = alpha / n**2`` and ``k = 1`` (Caffe ignores k there).

Gradient (closed form; ``W'(i) = {j : i in W(j)}`` is the reflected window)::

    dx_i = g_i * d_i**(-beta) - 2 * c * beta * x_i * sum_{j in W'(i)} g_j * x_j * d_j**(-beta - 1)

Precision policy: computed in float32 for half inputs (float64 for float64), output in the input's dtype.
Where the spec's proof conditions hold (:func:`normkit._spec.lrn_plain_forward_ok` for forward,
:func:`normkit._spec.lrn_plain_backward_ok` for backward: ``k``, ``beta``, ``c * n * max|x|**2`` and, for
backward, every partial product of ``g x d**(-beta-1)`` bounded) the plain formula runs, on large contiguous
CPU inputs as the fused kernel (``lrn_kernel.cpp``, same product order). Otherwise the robust path runs,
written with the spec's steps: every value is a (mantissa, exponent) pair (:func:`normkit._spec.frexp`);
squares are summed in a window after aligning them to the window's largest exponent; ``d = 4**h * u`` with
``h`` where ``k`` and ``c * S`` meet (:func:`normkit._spec.scaled_sum`, as ``inv_std`` does for ``var`` and
``eps``); and ``d**-beta`` takes its exponent ``-2 h beta`` apart into an exact integer part and a small
fraction (:func:`normkit._spec.power_pair`). The ONNX subgraph (:func:`normkit.onnx.subgraphs.lrn`) is the
same forward, operator for operator. Nothing overflows that the float64 answer would not. A zero window with
``k = 0`` (0/0) gives 0.

Forward-mode AD (closed form, the same pairs as backward)::

    dy_i = dx_i * d_i**(-beta) - 2 * c * beta * x_i * d_i**(-beta - 1) * sum_{j in W(i)} x_j * dx_j

Tool chain: the check reads ``max|x|`` back to the host only in plain eager mode on CPU. torch.compile
records one ``normkit::local_response_norm`` custom op (with its backward op), which runs this eager code
at call time, check and native kernel included. While a graph is traced otherwise (torch.export,
``jit.trace``, ``make_fx``), for fake, meta and functorch-wrapped tensors and on accelerators, the robust
path runs unconditionally: branch-free (``torch.where`` per element), no host sync, no ``frexp`` (ONNX
lacks it), no float64 for lower-precision input. ``vmap`` moves the batch dimension in front and runs one
plain call on the whole batch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.overrides import handle_torch_function, has_torch_function_unary

from .. import _checks, _native
from .. import _spec as spec
from .._spec import autocast_inputs, compute_dtype

CONVENTIONS = ("torch", "onnx", "caffe", "tf")
REGIONS = ("across_channels", "within_channel")
_NO_EXPONENT = -1.0e4  # exponent of a zero (and of padding): far below any real value


@dataclass(frozen=True)
class Window:
    """Where the window slides (``dims``), how far below/above the centre it reaches, and the constants."""

    dims: tuple[int, ...]
    lo: int
    hi: int
    c: float
    k: float
    beta: float

    @property
    def count(self) -> int:
        return (self.lo + self.hi + 1) ** len(self.dims)

    def reflected(self) -> "Window":
        """``W'(i) = {j : i in W(j)}``: the window mirrored about its centre."""
        return Window(self.dims, self.hi, self.lo, self.c, self.k, self.beta)

    def batched(self) -> "Window":
        """The same window on a tensor with one more dimension in front (a vmap batch)."""
        return Window(tuple(d + 1 for d in self.dims), self.lo, self.hi, self.c, self.k, self.beta)


def make_window(op, input, size, alpha, beta, k, convention, region, channel_dim) -> Window:
    """Validate the arguments of every LRN entry point and describe the window."""
    _checks.check_floating(op, input)
    if not isinstance(size, numbers.Integral) or isinstance(size, bool):
        raise TypeError(f"{op}: size must be a positive integer, got {size!r}")
    if size < 1:
        raise ValueError(f"{op}: size must be a positive integer, got {size}")
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite real number, got {v!r}")
    if k < 0:
        raise ValueError(f"{op}: k must be >= 0 (k + alpha * sum(x**2) must stay positive), got k={k}")
    if convention not in CONVENTIONS:
        raise ValueError(f"{op}: unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    if region not in REGIONS:
        raise ValueError(f"{op}: unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    if convention in ("caffe", "tf") and size % 2 == 0:
        raise ValueError(f"{op}: convention={convention!r} needs an odd size (a window centred on each element), got size={size}")
    if region == "within_channel":
        if convention != "caffe":
            raise ValueError(f"{op}: region='within_channel' is Caffe's; pass convention='caffe'")
        if input.dim() != 4:
            raise ValueError(f"{op}: region='within_channel' expects 4D input (N, C, H, W), got {input.dim()}D input")
        return Window((2, 3), (size - 1) // 2, (size - 1) // 2, alpha / size**2, 1.0, beta)
    if input.dim() < 3 and convention != "tf":
        raise ValueError(f"{op}: Expected 3D or higher dimensionality input (got {input.dim()} dimensions)")
    if input.dim() < 1:
        raise ValueError(f"{op}: expected an input with a channel dimension, got a 0-D tensor")
    if not -input.dim() <= channel_dim < input.dim():
        raise ValueError(f"{op}: channel_dim={channel_dim} is out of range for {input.dim()}D input")
    lo, hi = {"torch": (size // 2, (size - 1) // 2), "onnx": ((size - 1) // 2, size // 2)}.get(
        convention, ((size - 1) // 2, (size - 1) // 2))
    c = alpha if convention == "tf" else alpha / size
    return Window((channel_dim % input.dim(),), lo, hi, c, k, beta)


# ------------------------------------------------------------------------------------ window helpers
def _shift(t: Tensor, dim: int, offset: int, fill: float = 0.0) -> Tensor:
    """``out[i] = t[i + offset]`` along ``dim``, ``fill`` where ``i + offset`` is outside."""
    n = t.shape[dim]
    if offset == 0:
        return t
    if abs(offset) >= n:
        return torch.full_like(t, fill)
    pad_shape = list(t.shape)
    pad_shape[dim] = abs(offset)
    pad = t.new_full(pad_shape, fill)
    if offset > 0:
        return torch.cat([t.narrow(dim, offset, n - offset), pad], dim)
    return torch.cat([pad, t.narrow(dim, 0, n + offset)], dim)


def _align(m, k: Tensor) -> Tensor:
    """``m * 2**k`` for ``k <= 2``: a term brought down to a larger exponent. One ``exp2`` (``mul_pow2``
    takes three): ``2**k`` is exact down to the smallest subnormal and 0 below, where the term is
    negligible against the one that set the exponent (its mantissa is at least about 1/4)."""
    return m * torch.exp2(k)


def _pair_window_sum(m: Tensor, p: Tensor, win: Window) -> tuple[Tensor, Tensor]:
    """``sum_{j in W(i)} m_j * 2**p_j`` as a pair ``(M, P)``: each term is aligned to the window's largest
    exponent ``P`` before adding, so nothing over- or underflows that matters."""
    for dim in win.dims:
        offsets = range(-win.lo, win.hi + 1)
        shifted_p = [_shift(p, dim, o, _NO_EXPONENT) for o in offsets]
        big = shifted_p[0]
        for sp in shifted_p[1:]:
            big = torch.maximum(big, sp)
        m = sum(_align(_shift(m, dim, o), sp - big) for o, sp in zip(offsets, shifted_p))
        p = big
    return m, p


def _pair(m: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """The pair ``m * 2**p`` with the exponent of a zero mantissa pushed far down, so that aligning a
    window to its largest exponent ignores zeros."""
    return m, torch.where(m == 0, torch.full_like(p, _NO_EXPONENT), p)


# ------------------------------------------------------------------------------------ choosing a path
def _values_on_hand(*ts: Tensor) -> bool:
    """True in plain eager mode on CPU, where reading a value back (``.item()``) is cheap and legal. False
    while a graph is traced (torch.compile, torch.export, ``jit.trace``, ``make_fx``), for fake, meta and
    functorch-wrapped (vmap / grad / jvp) tensors, and on accelerators (no host sync): there the
    branch-free robust path runs, which gives the same answer as the eager choice."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or get_proxy_mode() is not None:
        return False
    return all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu"
               and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts)


def _max_abs(t: Tensor) -> float:
    lo, hi = torch.aminmax(t.detach())  # one pass, no temporary (unlike t.abs().amax())
    return max(-lo.item(), hi.item())


def _fast_ok(x: Tensor, win: Window, g: Tensor | None = None) -> bool:
    """True when the values are on hand and the spec proves the plain formula safe for them: forward
    (:func:`normkit._spec.lrn_plain_forward_ok`), or with ``g`` backward too
    (:func:`normkit._spec.lrn_plain_backward_ok`)."""
    on_hand = _values_on_hand(x) if g is None else _values_on_hand(x, g)
    if not (x.numel() and on_hand):
        return False
    amax, ct = _max_abs(x), compute_dtype(x.dtype)
    if g is None:
        return spec.lrn_plain_forward_ok(amax, win.count, win.c, win.k, win.beta, ct)
    return spec.lrn_plain_backward_ok(amax, _max_abs(g), win.count, win.c, win.k, win.beta, ct)


# ------------------------------------------------------------------------------------ the plain formula
def _window_sum_into(out: Tensor, t: Tensor, win: Window) -> Tensor:
    """``out = sum_{j in W(i)} t_j`` by adding shifted views in place: no temporaries (on this kind of
    machine each fresh large allocation costs page faults worth several passes over the data)."""
    dims = win.dims
    src = t
    for i, dim in enumerate(dims):
        dst = out if i == len(dims) - 1 else torch.empty_like(t)
        dst.copy_(src)
        n = t.shape[dim]
        for o in range(-win.lo, win.hi + 1):
            if o == 0 or abs(o) >= n:
                continue
            dst.narrow(dim, max(0, -o), n - abs(o)).add_(src.narrow(dim, max(0, o), n - abs(o)))
        src = dst
    return out


def _denominator_fast(x: Tensor, win: Window) -> tuple[Tensor, Tensor]:
    """``(d, scratch)``: ``d = k + c * sum_W x**2`` and a free buffer of the same shape."""
    scratch = x * x
    d = _window_sum_into(torch.empty_like(x), scratch, win)
    return d.mul_(win.c).add_(win.k), scratch


def _neg_power_(d: Tensor, beta: float, scratch: Tensor) -> Tensor:
    """``d ** -beta`` in place (``scratch`` is clobbered), with the common exponents specialised."""
    if beta == 0.75:  # d**-0.75 = rsqrt(d) * sqrt(rsqrt(d))
        d.rsqrt_()
        return d.mul_(torch.sqrt(d, out=scratch))
    if beta == 0.5:
        return d.rsqrt_()
    if beta == 1.0:
        return d.reciprocal_()
    return d.pow_(-beta)


def _fast_forward(x: Tensor, win: Window) -> Tensor:
    d, scratch = _denominator_fast(x, win)
    return _neg_power_(d, win.beta, scratch).mul_(x)


def _fast_backward(g: Tensor, x: Tensor, win: Window) -> Tensor:
    d, scratch = _denominator_fast(x, win)
    z = torch.mul(g, x, out=scratch).div_(d)  # g x / d ...
    p = _neg_power_(d, win.beta, torch.empty_like(x))  # d ** -beta (d is consumed)
    z.mul_(p)  # ... * d ** -beta
    zsum = _window_sum_into(torch.empty_like(x), z, win.reflected())
    return p.mul_(g).add_(zsum.mul_(x), alpha=-2 * win.c * win.beta)


# ------------------------------------------------------------------------------------ the robust path
def _robust_denominator(x: Tensor, win: Window):
    """``d = k + c * sum_W x**2`` as ``4**h * u`` (``u`` in about [1/4, 4 n c + 4]), plus ``x``'s pair: every
    ``x`` split (:func:`normkit._spec.frexp`), the squares' window sum aligned to its largest exponent,
    then :func:`normkit._spec.scaled_sum` (``h`` where ``k`` and ``c * S`` meet)."""
    xm, xe = spec.frexp(x)
    s_m, s_p = _pair_window_sum(*_pair(xm * xm, 2 * xe), win)  # sum x**2 = s_m * 2**s_p, s_m in [1/4, n]
    u, h = spec.scaled_sum(s_m * win.c, s_p, win.k)
    return u, h, xm, xe


def _robust_forward(x: Tensor, win: Window) -> Tensor:
    u, h, xm, xe = _robust_denominator(x, win)
    dm, dp = spec.power_pair(u, h, -win.beta)
    y = spec.mul_pow2(xm * dm, xe + dp)
    return torch.where(u == 0, torch.zeros_like(y), y)


def _robust_linear(v: Tensor, x: Tensor, win: Window, adjoint: bool) -> Tensor:
    """The derivative of ``y = x * d**-beta`` applied to ``v``, both directions in one form:

        jvp (``v = dx``):          dy = v d**-beta - 2 c beta x d**(-beta-1) sum_{W}  x v
        vjp (``v = g = dL/dy``):   dx = v d**-beta - 2 c beta x sum_{W'} v x d**(-beta-1)

    Every factor is a (mantissa, exponent) pair; the window sum aligns its terms to the largest exponent
    and the two terms are brought to the larger of their exponents before subtracting."""
    u, h, xm, xe = _robust_denominator(x, win)
    vm, ve = spec.frexp(v)
    dm, dp = spec.power_pair(u, h, -win.beta)  # d**-beta
    em, ep = spec.power_pair(u, h, -win.beta - 1)  # d**(-beta-1)
    if adjoint:
        sm, sp = _pair_window_sum(*_pair(vm * xm * em, ve + xe + ep), win.reflected())
    else:
        sm, sp = _pair_window_sum(*_pair(xm * vm, xe + ve), win)
        sm, sp = sm * em, sp + ep
    am, ap = _pair(vm * dm, ve + dp)
    bm, bp = _pair((2 * win.c * win.beta) * xm * sm, xe + sp)
    top = torch.maximum(ap, bp)
    out = spec.mul_pow2(_align(am, ap - top) - _align(bm, bp - top), top)
    return torch.where(u == 0, v * 0, out)


def _robust_backward(g: Tensor, x: Tensor, win: Window) -> Tensor:
    return _robust_linear(g, x, win, adjoint=True)


# ------------------------------------------------------------------------------------ entry points
NATIVE_MIN_NUMEL = 1 << 16  # below this the eager path is as fast and needs no build
NATIVE_MIN_ROW = 16  # elements after the window's dimension: shorter rows do not vectorize


def _native_layout(x: Tensor, win: Window):
    """``(kernel, x as a contiguous (N, C, S) view)`` when the fused CPU kernel applies, else the reason it
    does not. Only reached with values on hand (plain CPU tensors, never fake or vmap-batched ones)."""
    d = win.dims[0]
    why = ("a spatial window" if len(win.dims) != 1 else f"fewer than {NATIVE_MIN_NUMEL} elements"
           if x.numel() < NATIVE_MIN_NUMEL else "not contiguous" if not x.is_contiguous()
           else f"rows shorter than {NATIVE_MIN_ROW}" if math.prod(x.shape[d + 1:]) < NATIVE_MIN_ROW else None)
    kernel = None if why is not None else _native.load("lrn_kernel")
    if kernel is None:
        return why or ("backend eager" if _native.get_backend() == "eager" else "kernels unavailable")
    return kernel, x.view(math.prod(x.shape[:d]), x.shape[d], -1)


def lrn_forward(x: Tensor, win: Window) -> Tensor:
    """``y = x * (k + c * sum_W x**2) ** -beta`` in the compute dtype of ``x`` (which it must already be)."""
    if not _fast_ok(x, win):
        _native.note("local_response_norm", "eager (robust path)")
        return _robust_forward(x, win)
    native = _native_layout(x, win)
    if isinstance(native, str):
        _native.note("local_response_norm", f"eager (plain formula: {native})")
        return _fast_forward(x, win)
    _native.note("local_response_norm", "native")
    kernel, x3 = native
    return kernel.lrn_forward(x3, win.lo, win.hi, win.c, win.k, win.beta).view(x.shape)


def lrn_backward(g: Tensor, x: Tensor, win: Window) -> Tensor:
    """``dx`` given ``g = dL/dy`` (compute dtype). While a graph is being built (double backward) the
    robust path runs: it is written out of place, in differentiable ops."""
    if torch.is_grad_enabled() or not _fast_ok(x, win, g):
        return _robust_backward(g, x, win)
    native = _native_layout(x, win)
    if not isinstance(native, str):
        kernel, x3 = native
        return kernel.lrn_backward(g.contiguous().view(x3.shape), x3, win.lo, win.hi, win.c, win.k, win.beta).view(x.shape)
    return _fast_backward(g, x, win)


def lrn_jvp(dx: Tensor, x: Tensor, win: Window) -> Tensor:
    """``dy`` given the tangent ``dx`` (compute dtype): forward-mode AD, always the robust form (written in
    differentiable ops, so ``jacfwd(jacrev(f))``, i.e. ``hessian``, differentiates through it)."""
    return _robust_linear(dx, x, win, adjoint=False)


def lrn_backward_as(dy: Tensor, x: Tensor, win: Window) -> Tensor:
    """:func:`lrn_backward` for ``x`` in its own dtype: computed in the compute dtype, ``dx`` in ``x``'s."""
    ct = compute_dtype(x.dtype)
    return lrn_backward(dy.to(ct), x.to(ct), win).to(x.dtype)


class LocalResponseNormReverse(torch.autograd.Function):
    """``y = lrn(x)`` with the hand-written backward above. When a graph is being built, backward runs in
    differentiable ops (the exponents are detached constants), so double backward is exact. This is the
    class torch.compile traces (dynamo cannot trace a custom ``jvp``)."""

    @staticmethod
    def forward(x: Tensor, win: Window) -> Tensor:
        return lrn_forward(x.to(compute_dtype(x.dtype)), win).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.win = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return lrn_backward_as(dy, x, ctx.win), None


class LocalResponseNormFunction(LocalResponseNormReverse):
    """:class:`LocalResponseNormReverse` plus forward-mode AD (``jvp``) and a ``vmap`` rule, for
    ``torch.func``: ``vmap`` moves the batch dimension in front and runs the whole batch as one call with
    the window one dimension further (fast path and native kernel included)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        LocalResponseNormReverse.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, dx, _):
        (x,) = ctx.saved_tensors
        ct = compute_dtype(x.dtype)
        return lrn_jvp(dx.to(ct), x.to(ct), ctx.win).to(x.dtype)

    @staticmethod
    def vmap(info, in_dims, x, win):
        return LocalResponseNormFunction.apply(x.movedim(in_dims[0], 0), win.batched()), 0


# ------------------------------------------------------------------------------------ one op for compile
# Under torch.compile the graph holds one ``normkit::local_response_norm`` node, run at call time by the
# same eager code as above: the cheap check and the native kernel serve compiled models too, where tracing
# the Function would inline the branch-free robust path (several times slower). torch.export keeps the
# decomposition instead, so exported programs and ONNX graphs carry no custom op.

@torch.library.custom_op("normkit::local_response_norm", mutates_args=())
def lrn_op(x: Tensor, dims: list[int], lo: int, hi: int, c: float, k: float, beta: float) -> Tensor:
    """``y = lrn(x)`` for the window ``Window(dims, lo, hi, c, k, beta)``, in ``x``'s dtype."""
    return LocalResponseNormReverse.forward(x, Window(tuple(dims), lo, hi, c, k, beta))


@lrn_op.register_fake
def _(x, dims, lo, hi, c, k, beta):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("normkit::local_response_norm_backward", mutates_args=())
def lrn_backward_op(dy: Tensor, x: Tensor, dims: list[int], lo: int, hi: int, c: float, k: float, beta: float) -> Tensor:
    """``dx`` of :func:`lrn_op` given ``dy``, in ``x``'s dtype."""
    return lrn_backward_as(dy, x, Window(tuple(dims), lo, hi, c, k, beta))


@lrn_backward_op.register_fake
def _(dy, x, dims, lo, hi, c, k, beta):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lrn_op_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _lrn_op_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: lrn_backward takes its differentiable robust form
        dx = lrn_backward_as(dy, x, Window(tuple(ctx.args[0]), *ctx.args[1:]))
    else:
        dx = lrn_backward_op(dy, x, *ctx.args)
    return (dx,) + (None,) * 6


lrn_op.register_autograd(_lrn_op_backward, setup_context=_lrn_op_setup)


@lrn_op.register_vmap
def _(info, in_dims, x, dims, lo, hi, c, k, beta):
    moved = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
    return lrn_op(moved, [d + 1 for d in dims], lo, hi, c, k, beta), 0


def _apply(input: Tensor, win: Window) -> Tensor:
    (input,) = autocast_inputs("local_response_norm", input)  # torch's autocast dtype
    if input.numel() == 0:
        return input.clone()
    if torch.compiler.is_exporting():
        return LocalResponseNormReverse.apply(input, win)
    if torch.compiler.is_compiling():
        return lrn_op(input, list(win.dims), win.lo, win.hi, win.c, win.k, win.beta)
    return LocalResponseNormFunction.apply(input, win)


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """``torch.nn.functional.local_response_norm``: same signature and semantics (channels on dim 1)."""
    if has_torch_function_unary(input):  # fx Proxy, torch function modes: recorded as one call
        return handle_torch_function(local_response_norm, (input,), input, size, alpha, beta, k)
    win = make_window("local_response_norm", input, size, alpha, beta, k, "torch", "across_channels", 1)
    return _apply(input, win)


def lrn(input, size, alpha=1e-4, beta=0.75, k=1.0, *, convention="torch", region="across_channels", channel_dim=1):
    """Local response normalization in the ``convention`` of torch, ONNX, Caffe or TensorFlow (see the
    module docstring for the windows and constants); ``region="within_channel"`` is Caffe's spatial form."""
    if has_torch_function_unary(input):
        return handle_torch_function(lrn, (input,), input, size, alpha, beta, k, convention=convention,
                                     region=region, channel_dim=channel_dim)
    win = make_window("lrn", input, size, alpha, beta, k, convention, region, channel_dim)
    return _apply(input, win)


def tf_local_response_normalization(input, depth_radius=None, bias=1.0, alpha=1.0, beta=0.5, *, size=None):
    """TensorFlow's ``tf.nn.local_response_normalization``: channels last, window ``2 * depth_radius + 1``,
    ``alpha`` not divided by the window size. ``size=2r+1`` may be given instead of ``depth_radius``."""
    op = "tf_local_response_normalization"
    if has_torch_function_unary(input):
        return handle_torch_function(tf_local_response_normalization, (input,), input, depth_radius, bias, alpha,
                                     beta, size=size)
    if depth_radius is not None and size is not None:
        raise ValueError(f"{op}: pass depth_radius or size (= 2 * depth_radius + 1), not both")
    if size is None:
        r = 5 if depth_radius is None else depth_radius
        if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0:
            raise ValueError(f"{op}: depth_radius must be a non-negative integer, got {r!r}")
        size = 2 * r + 1
    win = make_window(op, input, size, alpha, beta, bias, "tf", "across_channels", -1)
    return _apply(input, win)
