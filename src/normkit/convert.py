"""Model surgery: swap torch's norm layers for normkit's and back, and fold BatchNorm into the layer
before it.

``convert`` and ``revert`` change the class of each norm module to its twin (normkit's classes subclass
torch's and differ only in the computation), so every parameter, buffer, hook, the training mode, device,
dtype and ``requires_grad`` stay exactly as they were -- by construction, not by copying.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx
import torch.nn.utils.parametrize
import torch.utils._pytree
from torch import nn

from . import nn as nnk
from .nn.batchnorm import _FrozenBatchNorm

# torch class -> normkit twin.
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nnk.BatchNorm1d,
    nn.BatchNorm2d: nnk.BatchNorm2d,
    nn.BatchNorm3d: nnk.BatchNorm3d,
    nn.InstanceNorm1d: nnk.InstanceNorm1d,
    nn.InstanceNorm2d: nnk.InstanceNorm2d,
    nn.InstanceNorm3d: nnk.InstanceNorm3d,
    nn.LayerNorm: nnk.LayerNorm,
    nn.GroupNorm: nnk.GroupNorm,
    nn.RMSNorm: nnk.RMSNorm,
    nn.LocalResponseNorm: nnk.LocalResponseNorm,
    nn.SyncBatchNorm: nnk.SyncBatchNorm,  # revert gives torch's SyncBatchNorm; BatchNormNd: nnk.SyncBatchNorm.revert_sync_batchnorm
}
_TORCH_OF = {v: k for k, v in TWINS.items()}

# The methods through which torch's norm, conv and linear classes compute. A subclass that overrides one of
# them has a behaviour of its own, which swapping its class (convert) or its weights (fold) would lose.
COMPUTE_METHODS = ("forward", "_conv_forward", "_check_input_dim", "_apply_instance_norm", "_handle_no_batch_input",
                   "_get_no_batch_dim")
_ORIGINAL_CLASS = "_normkit_original_class"  # instance attribute: the class convert replaced, for revert


@dataclass(frozen=True)
class Swap:
    """One module that a conversion changed (or, with ``changed=False``, left alone and why)."""

    name: str
    before: str
    after: str
    changed: bool = True


def _own_methods(module: nn.Module, bases) -> tuple[type | None, list[str]]:
    """The nearest of ``bases`` in ``type(module)``'s MRO, and the compute methods the class overrides
    relative to it (``(None, [])`` when no base is an ancestor)."""
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in bases), None)
    if base is None:
        return None, []
    return base, [m for m in COMPUTE_METHODS if hasattr(base, m) and getattr(cls, m) is not getattr(base, m)]


def _warn_left(tool: str, report: list[Swap]) -> None:
    for s in report:
        if not s.changed:
            warnings.warn(f"{tool}: {s.name or 'the model'} ({s.before}) {s.after}", RuntimeWarning, stacklevel=3)


def _selected(name: str, module: nn.Module, include, exclude) -> bool:
    def match(rules) -> bool:
        return any(isinstance(module, r) if isinstance(r, type) else fnmatch.fnmatchcase(name, r) for r in rules)

    if include is not None and not match(include):
        return False
    return not (exclude is not None and match(exclude))


def _check_rules(rules, what):
    if rules is None:
        return None
    if isinstance(rules, (str, type)):
        rules = [rules]
    rules = list(rules)
    for r in rules:
        if not isinstance(r, (str, type)):
            raise TypeError(f"{what} takes module classes or name patterns (fnmatch), got {r!r}")
    return rules


def convert(model: nn.Module, *, inplace: bool = False, include: Iterable | None = None,
            exclude: Iterable | None = None, return_report: bool = False):
    """Replace every torch normalization module (its exact class, or a subclass that keeps torch's
    computation) by its normkit twin.

    A subclass that overrides ``forward`` (or another method torch's class computes through, e.g.
    torchvision's ConvNeXt ``LayerNorm2d``) computes something of its own: it is left as it is, reported and
    warned about; run it under :func:`normkit.robust` to make the torch functional calls it makes robust.
    The class each module had is recorded, so :func:`revert` gives it back exactly.

    ``include`` / ``exclude``: module classes (``nn.BatchNorm2d``) or fnmatch patterns on qualified names
    (``"layer1.*"``). With ``inplace=False`` (default) the model is deep-copied first.
    Returns the model, or ``(model, report)`` with a :class:`Swap` per module looked at.
    """
    include, exclude = _check_rules(include, "include"), _check_rules(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, (*_TORCH_OF, _FrozenBatchNorm)):
            continue  # already normkit
        base, own = _own_methods(module, TWINS)
        if base is None:
            if isinstance(module, nn.modules.batchnorm._NormBase):  # e.g. SyncBatchNorm
                report.append(Swap(name, cls.__name__, "left: normkit has no twin for this class yet", changed=False))
            continue
        if not _selected(name, module, include, exclude):
            continue
        if own:
            report.append(Swap(name, cls.__name__, f"left: it overrides {', '.join(own)} of {base.__name__}, so its "
                               f"computation is its own; run it under normkit.robust() to make the torch functional "
                               f"calls it makes robust", changed=False))
            continue
        module.__class__ = TWINS[base]
        if cls is not base:  # a custom subclass: revert gives it back
            setattr(module, _ORIGINAL_CLASS, cls)
        if isinstance(module, nnk.LocalResponseNorm) and not hasattr(module, "convention"):
            module.convention, module.region = "torch", "across_channels"
        report.append(Swap(name, cls.__name__, f"normkit.nn.{TWINS[base].__name__}"))
    _warn_left("convert", report)
    return (model, report) if return_report else model


def revert(model: nn.Module, *, inplace: bool = False, return_report: bool = False):
    """The inverse of :func:`convert`: every normkit twin becomes the class it had before conversion (a
    custom subclass comes back as that subclass), or torch's class when it was built as normkit's.
    FrozenBatchNorm has no torch class and stays (use ``FrozenBatchNormNd.to_batchnorm``). A
    LocalResponseNorm in another framework's convention cannot be expressed by torch's class and raises."""
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    for name, module in model.named_modules():
        torch_cls = _TORCH_OF.get(type(module))
        if torch_cls is None:
            continue
        if isinstance(module, nnk.LocalResponseNorm):
            if (module.convention, module.region) != ("torch", "across_channels"):
                raise ValueError(f"revert: {name or 'the model'} is LocalResponseNorm(convention={module.convention!r}, "
                                 f"region={module.region!r}); torch's class has only its own convention. "
                                 f"Exclude it, or keep normkit's module")
            del module.convention, module.region
        original = module.__dict__.pop(_ORIGINAL_CLASS, torch_cls)
        report.append(Swap(name, f"normkit.nn.{type(module).__name__}", original.__name__))
        module.__class__ = original
    return (model, report) if return_report else model


def ao_fuser_methods() -> dict:
    """torch.ao's eager fuser patterns with normkit's twins in place of torch's classes, for
    ``torch.ao.quantization.fuse_modules(model, names, fuse_custom_config_dict={"additional_fuser_method_mapping":
    normkit.convert.ao_fuser_methods()})`` (its own table matches torch's exact classes only). Eval mode:
    torch.ao's training-mode fused modules (``ConvBn2d``...) accept torch's exact classes only."""
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    return {tuple(TWINS.get(c, c) for c in pattern): fuser
            for pattern, fuser in _DEFAULT_OP_LIST_TO_FUSER_METHOD.items() if any(c in TWINS for c in pattern)}


# ------------------------------------------------------------------------------------------- folding
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# the rank of each layer's output in which dim 1 holds its output features (batched conv; Linear on 2-D input)
_FEATURE_RANK = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, nn.Linear: 2}
_BN_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
# classes whose forward is plain batch norm (normkit's SyncBatchNorm joins through TWINS)
_BN_BASES = (*(c for pair in TWINS.items() for c in pair if issubclass(c, nn.modules.batchnorm._BatchNorm)),
             nn.SyncBatchNorm, _FrozenBatchNorm)
# relative difference allowed between the folded and the unfolded model on example_input, per output dtype
FOLD_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """``layer`` followed by ``bn`` (eval) becomes ``layer`` alone: per output channel,
    ``W' = W * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``,
    computed in float64 and cast back to the layer's dtype."""
    w = layer.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    new_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + beta
    dtype = layer.weight.dtype
    top = torch.finfo(torch.float16).max
    if max(new_w.abs().max().item(), new_b.abs().max().item()) > top:
        warnings.warn(f"fold_batchnorm: a folded weight of {type(layer).__name__} exceeds the float16 range "
                      f"({top:g}); the folded model will overflow if cast to float16", RuntimeWarning, stacklevel=4)
    with torch.no_grad():
        layer.weight.copy_(new_w.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(new_b.to(dtype))


class FoldTracer(torch.fx.Tracer):
    """The tracer ``fold_batchnorm`` uses: every Conv/Linear and every norm layer (subclasses and normkit's
    included) stays one ``call_module`` node, so call sites can be counted and pairs found."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (*FOLDABLE, *TWINS, *_TORCH_OF, _FrozenBatchNorm))
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


def _observe(model: nn.Module, args: tuple, uses: _Uses):
    """Run the unfolded model on ``args``; return its output and record the rank of every module's output
    (and, without a graph, how often each module was called)."""
    calls, ranks = Counter(), {}

    def hook(module, inputs, output):
        calls[id(module)] += 1
        if isinstance(output, torch.Tensor):
            ranks.setdefault(id(module), set()).add(output.dim())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            reference = model(*args)
    finally:
        handle.remove()
    uses.output_ranks = ranks
    if uses.graph is None:
        uses.calls = calls
    return reference


def _layer_problem(layer: nn.Module, layer_name: str) -> str | None:
    """Why ``layer``'s weights cannot absorb a BatchNorm, whatever follows it (None if they can)."""
    if not isinstance(layer, FOLDABLE):
        return f"its input comes from {layer_name} ({type(layer).__name__}), not a Conv1d/2d/3d or Linear"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return (f"{layer_name} is parametrized ({', '.join(layer.parametrizations)}; e.g. weight_norm): its weight is "
                f"recomputed on every call, so a folded weight would be discarded")
    base, own = _own_methods(layer, FOLDABLE)
    if own:
        return f"{layer_name} ({type(layer).__name__}) overrides {', '.join(own)} of {base.__name__}: it computes its own function"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"{layer_name} has forward hooks, which may change what it computes"
    return None


def _bn_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` itself cannot be folded into ``layer`` (None if it can)."""
    base, own = _own_methods(bn, _BN_BASES)
    if base is None or own:
        return f"{type(bn).__name__} overrides {', '.join(own) or 'batch norm'}: it computes its own function"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "it has forward hooks, which folding would bypass"
    if bn.running_mean is None or bn.running_var is None:
        return "it normalizes with batch statistics (track_running_stats=False)"
    out_features = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    if bn.num_features != out_features:
        return f"its {bn.num_features} features do not match the layer's {out_features} outputs"
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
    bn_ranks = bn._twin._ranks if isinstance(bn, _FrozenBatchNorm) else next(
        (r for c, r in _BN_RANKS.items() if isinstance(bn, c)), None)
    if bn_ranks == (rank,):
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
    return (_layer_problem(layer, layer_name) or _bn_problem(layer, bn) or _use_problem(layer, layer_name, uses)
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
    """Fold each ``(layer_name, bn_name, bn_node)``. Pairs adjacent in an nn.Sequential become an
    nn.Identity in the model itself; if any pair is not, the graph is rewritten and returned instead."""
    slots = [_sequential_slot(model, layer_name, model.get_submodule(bn_name)) for layer_name, bn_name, _ in folds]
    for layer_name, bn_name, _ in folds:
        _fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
    if all(slots):
        for seq, key in slots:
            seq._modules[key] = nn.Identity()
        return model
    gm = uses.graph
    for layer_name, _, node in folds:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
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


def _check_folded(folded: nn.Module, args: tuple, reference) -> None:
    """Raise if ``folded`` differs from the unfolded model's ``reference`` output beyond FOLD_TOLERANCE."""
    with torch.no_grad():
        got = torch.utils._pytree.tree_leaves(folded(*args))
    want = torch.utils._pytree.tree_leaves(reference)
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        scale = w.double().abs().max().item() if w.numel() else 0.0
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        tol = FOLD_TOLERANCE.get(w.dtype, 1e-4)
        if not err <= tol * scale:
            raise RuntimeError(f"fold_batchnorm: the folded model differs from the unfolded one on example_input: output "
                               f"{i} is off by {err:.3e} = {err / scale if scale else float('inf'):.2e} of max|output| "
                               f"(tolerance {tol:g}). Either the model is not deterministic (a module still in training "
                               f"mode, e.g. Dropout: call model.eval()), or its forward does something its graph does not "
                               f"show; keep the unfolded model (inplace=False leaves it untouched)")


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, return_report: bool = False, example_input=None):
    """Fold each eval-mode BatchNorm into the Conv1d/2d/3d or Linear before it -- only where that is
    provably the same function; every other BatchNorm stays, named in the report with the reason (and a
    RuntimeWarning).

    A pair folds when: the layer is a Conv1d/2d/3d/Linear (or a subclass that overrides none of their
    compute methods), not parametrized, without hooks; registered once in the model, its parameters held
    by no other module, called exactly once and its parameters read nowhere else (counted in the torch.fx
    graph, or by running ``example_input`` when the model does not trace); its output consumed by that
    BatchNorm alone; the BatchNorm a plain one with running statistics; and the BatchNorm's channel dim
    (dim 1) is the layer's output-feature dim -- guaranteed by BatchNorm2d/3d's fixed rank, and for
    BatchNorm1d (2-D or 3-D input) proven only on ``example_input``: without it, Linear/Conv1d +
    BatchNorm1d is left (a Linear on (N, L, F) input followed by BatchNorm1d(L) is not foldable).

    ``example_input``: a tensor or a tuple of positional arguments. The model runs on it before folding
    (ranks, call counts) and the folded model is compared with it after, raising RuntimeError beyond
    ``FOLD_TOLERANCE`` (with ``inplace=True`` the model is then already folded).
    Folding is computed in float64 and cast back. Raises in training mode. Returns the model (a
    ``torch.fx.GraphModule`` when a folded pair is not adjacent in an nn.Sequential), or ``(model, report)``.
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise ValueError("fold_batchnorm: the model has BatchNorm layers in training mode, whose output depends on "
                         "the batch; call model.eval() first")
    args = _example_args(example_input)
    if not inplace:
        model = copy.deepcopy(model)
    uses = _Uses(Counter(id(m) for _, m in model.named_modules(remove_duplicate=False)),
                 Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False)))
    _trace(model, uses)
    reference = None if args is None else _observe(model, args, uses)
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
        _check_folded(folded, args, reference)
    _warn_left("fold_batchnorm", report)
    return (folded, report) if return_report else folded
