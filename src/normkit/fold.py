"""Folding BatchNorm into the Conv / ConvTranspose / Linear layer before it -- only where that is provably
the same function.

What counts as a BatchNorm here: torch's and normkit's classes (and subclasses that keep their computation);
a BatchNorm subclass with a forward of its own that is, proven by a float64 probe, batch norm followed by
its own submodules in order (timm's ``BatchNormAct2d``: its activation and drop stay, as modules); and a
hand-written frozen batch norm the float64 probe proves (torchvision's and timm's ``FrozenBatchNorm2d``; timm's
``FrozenBatchNormAct2d``, with its submodules after it). The rules that prove a pair foldable are in
:func:`fold_batchnorm`.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
import torch.nn.utils.parametrize
import torch.utils._pytree
from torch import nn

from . import _spec as spec
from .convert import _TORCH_OF, TWINS, Swap, _check_model, _own_methods, warn_left
from .nn.batchnorm import _FrozenBatchNorm
from .recognize import (PROOF_TOL, frozen_batchnorm_proof, norm_like, probe_input, probe_shapes, randomized_copy, rel_error,
                        seeded_call, single_threaded)
from .reference import float64_call, keep_float64

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED, nn.Linear)
# the rank of each layer's output in which dim 1 holds its output features (batched conv; Linear on 2-D input)
_FEATURE_RANK = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, nn.ConvTranspose1d: 3, nn.ConvTranspose2d: 4,
                 nn.ConvTranspose3d: 5, nn.Linear: 2}
_BN_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
# classes whose forward is plain batch norm (normkit's SyncBatchNorm joins through TWINS)
_BN_BASES = (*(c for pair in TWINS.items() for c in pair if issubclass(c, nn.modules.batchnorm._BatchNorm)),
             nn.SyncBatchNorm, _FrozenBatchNorm)
# relative difference allowed between the folded and the unfolded model on example_input, per output dtype
FOLD_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _is_batchnorm(m: nn.Module) -> bool:
    """A module that may be a batch norm to fold: a BatchNorm (subclasses included), normkit's frozen one, or
    a module holding frozen statistics (``running_mean``, ``running_var``, no BatchNorm class)."""
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm)):
        return True
    return not isinstance(m, nn.modules.batchnorm._NormBase) and all(
        isinstance(m._buffers.get(n), torch.Tensor) for n in ("running_mean", "running_var"))


@dataclass(frozen=True)
class _Form:
    """What a BatchNorm-like module computes, as far as folding is concerned: plain batch norm with running
    statistics, then ``tail`` (its own submodules, in order; None when it has none to keep)."""

    tail: nn.Module | None = None


def _tail_proof(bn: nn.Module, ranks: tuple[int, ...]) -> str | None:
    """Why ``bn`` (a BatchNorm subclass with a forward of its own, or a module applying frozen statistics by
    hand) is not provably ``tail(batch_norm(x))`` on inputs of ``ranks``, ``tail`` its submodules in order
    (None if it is): a float64 copy with random statistics runs in eval mode on probe inputs and is compared
    with torch's own ``F.batch_norm`` with its statistics, followed by the tail."""
    generator = torch.Generator().manual_seed(0)
    probe = randomized_copy(bn, generator).eval()
    tail = nn.Sequential(OrderedDict(probe.named_children()))
    worst = 0.0
    for shape in [s for s in probe_shapes(bn)["channels"] if len(s) in ranks]:
        x = probe_input(shape, generator).to(probe.running_mean.device)
        try:
            with torch.no_grad(), keep_float64(), single_threaded():
                got = seeded_call(probe, x)
                want = seeded_call(tail, F.batch_norm(x, probe.running_mean, probe.running_var, probe.weight, probe.bias, False, 0.0, probe.eps))
        except Exception as exc:
            return f"its own forward could not be probed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        worst = max(worst, rel_error(got, want))
    if worst > PROOF_TOL:
        children = ", ".join(n for n, _ in bn.named_children()) or "none"
        return (f"{type(bn).__name__} computes its own forward, and its eval output is not batch norm followed by its "
                f"submodules ({children}): off by {worst:.1e} in float64")
    return None


def _ranks_of(bn: nn.Module) -> tuple[int, ...]:
    if isinstance(bn, _FrozenBatchNorm):
        return bn._twin._ranks
    return next((r for c, r in _BN_RANKS.items() if isinstance(bn, c)), (2, 3, 4, 5))


def _form(bn: nn.Module, uses: "_Uses") -> _Form | str:
    """The module's :class:`_Form`, or why it cannot be folded whatever precedes it (probed once per call)."""
    if id(bn) not in uses.forms:
        uses.forms[id(bn)] = _find_form(bn)
    return uses.forms[id(bn)]


def _find_form(bn: nn.Module) -> _Form | str:
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "it has forward hooks, which folding would bypass"
    if bn.running_mean is None or bn.running_var is None:
        return "it normalizes with batch statistics (track_running_stats=False)"
    base, own = _own_methods(bn, _BN_BASES)
    if base is not None and not own:
        return _Form()
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) or any(bn.children()):
        # a forward of its own, or frozen statistics applied by hand with submodules after (timm's FrozenBatchNormAct2d,
        # proven on 4-D input like torchvision's FrozenBatchNorm2d)
        if not isinstance(getattr(bn, "eps", None), (int, float)):
            return f"{type(bn).__name__} holds running statistics but no numeric eps"
        why = _tail_proof(bn, _ranks_of(bn) if isinstance(bn, nn.modules.batchnorm._BatchNorm) else (4,))
        return why or _Form(nn.Sequential(OrderedDict(bn.named_children())) if any(bn.children()) else None)
    # hand-written: frozen statistics applied by its own code (torchvision's FrozenBatchNorm2d)
    why = frozen_batchnorm_proof(bn)
    return why or _Form()


def _fold_into(layer: nn.Module, bn: nn.Module) -> bool:
    """``layer`` followed by ``bn`` (eval) becomes ``layer`` alone: per output channel ``o``,
    ``W'[o] = W[o] * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``,
    computed in float64 and cast back to the layer's dtype. Output channel ``o`` is dim 0 of a Conv/Linear
    weight ``(out, in/groups, *k)``; a ConvTranspose weight is ``(in, out/groups, *k)``, so channel
    ``o = g * out/groups + j`` is ``W[g * in/groups : (g+1) * in/groups, j]``. Returns whether a folded
    value exceeds the float16 range."""
    w = layer.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    _, _, m, q = spec.eval_factor(var, gamma, float(bn.eps))  # gamma / sqrt(var + eps) = m * 2**q, as eval batch norm
    scale = spec.mul_pow2(m, q)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    if isinstance(layer, _TRANSPOSED):
        g, k = layer.groups, [1] * (w.dim() - 2)
        new_w = (w.view(g, w.shape[0] // g, *w.shape[1:]) * scale.view(g, 1, -1, *k)).view(w.shape)
    else:
        new_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + beta
    dtype = layer.weight.dtype
    with torch.no_grad():
        layer.weight.copy_(new_w.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(new_b.to(dtype))
    return max(new_w.abs().max().item(), new_b.abs().max().item()) > torch.finfo(torch.float16).max


class FoldTracer(torch.fx.Tracer):
    """The tracer ``fold_batchnorm`` uses: every Conv/ConvTranspose/Linear and every norm layer (subclasses,
    normkit's, and every module :func:`normkit.recognize.norm_like` names) stays one ``call_module`` node,
    so call sites can be counted and pairs found."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (*FOLDABLE, *TWINS, *_TORCH_OF, _FrozenBatchNorm)) or norm_like(m)
                or super().is_leaf_module(m, module_qualified_name))


@dataclass
class _Uses:
    """How the model uses its modules (keys are ``id(module)``): registrations in the module tree and of
    each parameter; call counts and direct attribute reads from the torch.fx graph (``graph`` set) or from
    running ``example_input`` (``calls`` without ``graph``); the output ranks seen in that run."""

    registrations: Counter
    parameters: Counter
    graph: torch.fx.GraphModule | None = None
    trace_error: str = ""
    calls: Counter | None = None
    reads: Counter = field(default_factory=Counter)
    output_ranks: dict[int, set[int]] | None = None
    forms: dict = field(default_factory=dict)  # id(BatchNorm-like module) -> its _Form, or why it has none


def _trace(model: nn.Module, uses: _Uses) -> None:
    """Trace with :class:`FoldTracer`; on success count call sites and attribute reads per module."""
    tracer = FoldTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any failure means: no graph; the message is reported
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        uses.trace_error = f"the model is not traceable by torch.fx ({type(exc).__name__}: {first_line})"
        return
    gm = torch.fx.GraphModule(tracer.root, graph)
    uses.graph, uses.calls = gm, Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses.calls[id(gm.get_submodule(node.target))] += 1
        elif node.op == "get_attr":
            uses.reads[id(gm.get_submodule(node.target.rpartition(".")[0]))] += 1


def _observe(model: nn.Module, args: tuple, uses: _Uses, check: "_Check"):
    """Run the unfolded model on ``args`` (as ``check`` runs it); return its output and record the rank of every
    module's output (and, without a graph, how often each module was called)."""
    calls, ranks = Counter(), {}

    def hook(module, inputs, output):
        calls[id(module)] += 1
        if isinstance(output, torch.Tensor):
            ranks.setdefault(id(module), set()).add(output.dim())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        reference = check.run(model, args)
    finally:
        handle.remove()
    uses.output_ranks = ranks
    if uses.graph is None:
        uses.calls = calls
    return reference


def _layer_problem(layer: nn.Module, layer_name: str) -> str | None:
    """Why ``layer``'s weights cannot absorb a BatchNorm, whatever follows it (None if they can)."""
    if not isinstance(layer, FOLDABLE):
        return f"its input comes from {layer_name} ({type(layer).__name__}), not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return (f"{layer_name} is parametrized ({', '.join(layer.parametrizations)}; e.g. weight_norm): its weight is "
                f"recomputed on every call, so a folded weight would be discarded")
    base, own = _own_methods(layer, FOLDABLE)
    if own:
        return f"{layer_name} ({type(layer).__name__}) overrides {', '.join(own)} of {base.__name__}: it computes its own function"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"{layer_name} has forward hooks, which may change what it computes"
    return None


def _bn_problem(layer: nn.Module, bn: nn.Module, uses: _Uses) -> str | None:
    """Why ``bn`` itself cannot be folded into ``layer`` (None if it can)."""
    form = _form(bn, uses)
    if isinstance(form, str):
        return form
    out_features = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    num_features = bn.running_mean.numel()
    if num_features != out_features:
        return f"its {num_features} features do not match the layer's {out_features} outputs"
    return None


def _use_problem(layer: nn.Module, layer_name: str, uses: _Uses) -> str | None:
    """Why ``layer`` may be used by something other than this one BatchNorm (None if it provably is not)."""
    n = uses.registrations[id(layer)]
    if n > 1:
        return f"{layer_name} is registered {n} times in the model (shared); folding would change its other uses"
    if any(uses.parameters[id(p)] > 1 for p in (layer.weight, layer.bias) if p is not None):
        return f"{layer_name}'s weight or bias is also held by another module (tied weights)"
    if uses.calls is None:
        return (f"its call sites cannot be counted: {uses.trace_error}; "
                f"pass example_input= to count them by running the model")
    if uses.calls[id(layer)] != 1:
        return f"{layer_name} is called {uses.calls[id(layer)]} times (shared or applied twice, e.g. Siamese); folding would change its other calls"
    if uses.reads[id(layer)]:
        return f"{layer_name}'s parameters are also read directly by the forward code"
    return None


def _rank_problem(layer: nn.Module, layer_name: str, bn: nn.Module, uses: _Uses) -> str | None:
    """Why ``bn``'s channel dim (dim 1) may not be ``layer``'s output-feature dim (None if it provably is)."""
    base = next(c for c in _FEATURE_RANK if isinstance(layer, c))
    rank = _FEATURE_RANK[base]
    if _ranks_of(bn) == (rank,):
        return None  # the BatchNorm accepts no other rank
    seen = None if uses.output_ranks is None else uses.output_ranks.get(id(layer))
    if seen == {rank}:
        return None
    where = "Linear's output features are its last dim" if base is nn.Linear else f"{base.__name__}'s features are dim 1 only with batched input"
    if seen:
        return f"{layer_name}'s output is {'/'.join(map(str, sorted(seen)))}-D on example_input, so {type(bn).__name__} normalizes a dim other than its features ({where})"
    return (f"{type(bn).__name__} normalizes dim 1, which is {layer_name}'s output-feature dim only for {rank}-D output "
            f"({where}); pass example_input= to prove the rank")


def _pair_problem(layer, layer_name, bn, uses) -> str | None:
    return (_layer_problem(layer, layer_name) or _bn_problem(layer, bn, uses) or _use_problem(layer, layer_name, uses)
            or _rank_problem(layer, layer_name, bn, uses))


def _sequential_slot(model: nn.Module, layer_name: str, bn: nn.Module):
    """``(sequential, key)`` of ``bn`` when it directly follows ``layer_name`` inside an nn.Sequential that
    runs torch's own forward (so the layer's output goes to the BatchNorm and nowhere else); else None."""
    parent_name, _, key = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return None
    keys = list(parent._modules)
    after = keys.index(key) + 1
    return (parent, keys[after]) if after < len(keys) and parent._modules[keys[after]] is bn else None


def _graph_pairs(uses: _Uses, report: list[Swap]):
    """``(layer_name, bn_name, bn_node)`` for every BatchNorm call in the graph whose input is a module call;
    the others are reported as left."""
    gm = uses.graph
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_batchnorm(bn := gm.get_submodule(node.target)):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
            report.append(Swap(node.target, type(bn).__name__, "left: its input is not the output of a Conv/Linear module", False))
            continue
        if len(src.users) > 1:
            report.append(Swap(node.target, type(bn).__name__, f"left: the output of {src.target} is also used elsewhere", False))
            continue
        yield src.target, node.target, node


def _sequential_pairs(model: nn.Module, uses: _Uses, report: list[Swap]):
    """Without a graph: every (layer, BatchNorm) adjacent in an nn.Sequential, as ``(layer_name, bn_name, None)``;
    BatchNorms elsewhere are reported as left. A pair counts only if the Sequential ran on example_input."""
    paired = set()
    for name, module in model.named_modules():
        for key, bn in module.named_children():
            qual = f"{name}.{key}" if name else key
            if not _is_batchnorm(bn):
                continue
            keys = list(module._modules)
            prev = keys[keys.index(key) - 1] if keys.index(key) else None
            layer_name = f"{name}.{prev}" if name and prev else prev
            if prev is None or _sequential_slot(model, layer_name, bn) is None:
                continue
            if uses.calls is not None and not uses.calls[id(module)]:
                report.append(Swap(qual, type(bn).__name__, f"left: {name or 'the model'} did not run on example_input", False))
            else:
                yield layer_name, qual, None
            paired.add(id(bn))
    report.extend(Swap(n, type(m).__name__, f"left: it does not directly follow a layer inside an nn.Sequential, and "
                                            f"{uses.trace_error}: its input is unknown", False)
                  for n, m in model.named_modules() if _is_batchnorm(m) and id(m) not in paired)


def _apply_folds(model: nn.Module, uses: _Uses, folds: list) -> nn.Module:
    """Fold each ``(layer_name, bn_name, bn_node)``: the BatchNorm becomes its tail (an nn.Sequential of the
    submodules it applied after batch norm) or nothing. Pairs adjacent in an nn.Sequential are rewritten in
    the model itself (nothing becomes an nn.Identity); if any pair is not, the graph is rewritten and returned."""
    slots = [_sequential_slot(model, layer_name, model.get_submodule(bn_name)) for layer_name, bn_name, _ in folds]
    tails = [uses.forms[id(model.get_submodule(bn_name))].tail for _, bn_name, _ in folds]
    too_big = [layer_name for layer_name, bn_name, _ in folds
               if _fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))]
    if too_big:
        warnings.warn(f"fold_batchnorm: folded weights of {', '.join(too_big)} exceed the float16 range "
                      f"({torch.finfo(torch.float16).max:g}); the folded model will overflow if cast to float16",
                      RuntimeWarning, stacklevel=3)
    if all(slots):
        for (seq, key), tail in zip(slots, tails):
            seq._modules[key] = nn.Identity() if tail is None else tail
        return model
    gm = uses.graph
    for (_, _, node), tail in zip(folds, tails):
        if tail is None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        else:
            gm.add_submodule(node.target, tail)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _example_args(example_input) -> tuple | None:
    """``example_input`` as the positional arguments of one forward call."""
    if example_input is None or isinstance(example_input, tuple):
        return example_input
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    raise TypeError(f"fold_batchnorm: example_input must be a tensor or a tuple of the model's positional arguments, "
                    f"got {type(example_input).__name__}; pass example_input=(x,) to give one argument of another type")


@dataclass
class _Check:
    """How the folded and the unfolded model are compared on ``example_input``: as the model computes
    (``float64=False``), or, for a float64 model, as a true float64 computation -- under
    :func:`normkit.reference.keep_float64`, so the model's own downcasts (``.float()``, ``.to(torch.float32)``:
    Hugging Face's RMS norms) stay float64 and cannot hide a difference (a float32 norm at 1e20 returns zeros
    for both models). ``lowered`` collects what still computed in a lower dtype."""

    float64: bool
    lowered: list = field(default_factory=list)

    @staticmethod
    def for_model(model: nn.Module) -> "_Check":
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        return _Check(bool(tensors) and all(t.dtype == torch.float64 for t in tensors))

    def run(self, model: nn.Module, args: tuple):
        with torch.no_grad():
            if not self.float64:
                return model(*args)
            out, lowered = float64_call(model, *args)
        self.lowered += [str(low) for low in lowered if str(low) not in self.lowered]
        return out


def _check_folded(folded: nn.Module, args: tuple, reference, check: _Check) -> None:
    """Raise if ``folded`` differs from the unfolded model's ``reference`` output beyond FOLD_TOLERANCE (of the
    output's dtype: float64 for a float64 model, whose comparison is a true float64 one)."""
    got = torch.utils._pytree.tree_leaves(check.run(folded, args))
    want = torch.utils._pytree.tree_leaves(reference)
    if check.lowered:
        warnings.warn(f"fold_batchnorm: the comparison on example_input is not float64 throughout although the model is "
                      f"({', '.join(check.lowered)}): the model forces a lower precision that cannot be lifted, which "
                      f"may hide a difference", RuntimeWarning, stacklevel=3)
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        scale = w.double().abs().max().item() if w.numel() else 0.0
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        tol = FOLD_TOLERANCE.get(w.dtype, 1e-4)
        if not err <= tol * scale:
            raise RuntimeError(f"fold_batchnorm: the folded model differs from the unfolded one on example_input: output "
                               f"{i} is off by {err:.3e} = {err / scale if scale else float('inf'):.2e} of max|output| "
                               f"(tolerance {tol:g}{', compared in float64 throughout' if check.float64 else ''}). Either "
                               f"the model is not deterministic (a module still in training "
                               f"mode, e.g. Dropout: call model.eval()), or its forward does something its graph does not "
                               f"show; keep the unfolded model (inplace=False leaves it untouched)")


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, return_report: bool = False, example_input=None):
    """Fold each eval-mode BatchNorm into the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear before it -- only
    where that is provably the same function; every other BatchNorm stays, named in the report with the
    reason (and in one RuntimeWarning per call).

    A BatchNorm here is torch's or normkit's class (or a subclass keeping its computation); a BatchNorm
    subclass whose own forward is, proven by a float64 probe, batch norm followed by its submodules in order
    (timm's ``BatchNormAct2d``: it becomes an nn.Sequential of those submodules, e.g. ``drop`` and ``act``,
    under the same name); or a hand-written frozen batch norm a float64 probe proves on 4-D input (torchvision's
    ``FrozenBatchNorm2d``; timm's ``FrozenBatchNormAct2d``, its submodules kept as for ``BatchNormAct2d``).

    A pair folds when: the layer is a Conv1d/2d/3d, ConvTranspose1d/2d/3d (any groups and dilation) or
    Linear (or a subclass that overrides none of their compute methods), not parametrized, without hooks;
    registered once in the model, its parameters held by no other module, called exactly once and its
    parameters read nowhere else (counted in the torch.fx graph, or by running ``example_input`` when the
    model does not trace); its output consumed by that BatchNorm alone; the BatchNorm without hooks, with
    running statistics; and the BatchNorm's channel dim (dim 1) is the layer's output-feature dim --
    guaranteed by BatchNorm2d/3d's fixed rank, and for BatchNorm1d (2-D or 3-D input) proven only on
    ``example_input``: without it, Linear/Conv1d + BatchNorm1d is left (a Linear on (N, L, F) input
    followed by BatchNorm1d(L) is not foldable).

    ``example_input``: a tensor or a tuple of positional arguments. The model runs on it before folding
    (ranks, call counts) and the folded model is compared with it after, raising RuntimeError beyond
    ``FOLD_TOLERANCE`` (with ``inplace=True`` the model is then already folded). For a float64 model both
    runs are true float64 computations (:func:`normkit.reference.keep_float64`: the model's own ``.float()``
    stays float64), and a RuntimeWarning says so if something still computed in a lower dtype.
    Folding is computed in float64 and cast back. Raises in training mode. Returns the model (a
    ``torch.fx.GraphModule`` when a folded pair is not adjacent in an nn.Sequential), or ``(model, report)``.
    """
    _check_model("fold_batchnorm", model)
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise ValueError("fold_batchnorm: the model has BatchNorm layers in training mode, whose output depends on "
                         "the batch; call model.eval() first")
    args = _example_args(example_input)
    if not inplace:
        model = copy.deepcopy(model)
    uses = _Uses(Counter(id(m) for _, m in model.named_modules(remove_duplicate=False)),
                 Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False)))
    _trace(model, uses)
    check = _Check.for_model(model)
    reference = None if args is None else _observe(model, args, uses, check)
    report: list[Swap] = []
    pairs = _graph_pairs(uses, report) if uses.graph is not None else _sequential_pairs(model, uses, report)
    folds = []
    for layer_name, bn_name, node in list(pairs):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        why = _pair_problem(layer, layer_name, bn, uses)
        report.append(Swap(bn_name, type(bn).__name__, f"left: {why}" if why else f"folded into {layer_name}", why is None))
        if why is None:
            folds.append((layer_name, bn_name, node))
    report = list(dict.fromkeys(report))  # a BatchNorm called at several sites for one reason: one entry
    folded = _apply_folds(model, uses, folds) if folds else model
    if args is not None:
        _check_folded(folded, args, reference, check)
    warn_left("fold_batchnorm", report)
    return (folded, report) if return_report else folded
