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
from dataclasses import dataclass
from typing import Iterable

import torch
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


@dataclass(frozen=True)
class Swap:
    """One module that a conversion changed (or, with ``changed=False``, left alone and why)."""

    name: str
    before: str
    after: str
    changed: bool = True


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
    """Replace every torch normalization module (its exact class or a subclass) by its normkit twin.

    ``include`` / ``exclude``: module classes (``nn.BatchNorm2d``) or fnmatch patterns on qualified names
    (``"layer1.*"``). With ``inplace=False`` (default) the model is deep-copied first. A subclass of a
    torch norm class becomes the normkit twin of that torch class (its own overrides are dropped).
    Returns the model, or ``(model, report)`` with a :class:`Swap` per module looked at.
    """
    include, exclude = _check_rules(include, "include"), _check_rules(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _TORCH_OF or isinstance(module, _FrozenBatchNorm):
            continue  # already normkit
        base = next((c for c in cls.__mro__ if c in TWINS), None)
        if base is None:
            if isinstance(module, nn.modules.batchnorm._NormBase):
                report.append(Swap(name, cls.__name__, cls.__name__, changed=False))  # e.g. SyncBatchNorm
            continue
        if _selected(name, module, include, exclude):
            module.__class__ = TWINS[base]
            if isinstance(module, nnk.LocalResponseNorm) and not hasattr(module, "convention"):
                module.convention, module.region = "torch", "across_channels"
            report.append(Swap(name, cls.__name__, f"normkit.nn.{TWINS[base].__name__}"))
    return (model, report) if return_report else model


def revert(model: nn.Module, *, inplace: bool = False, return_report: bool = False):
    """The inverse of :func:`convert`: every normkit twin becomes its torch class again (FrozenBatchNorm
    has no torch class and stays; use ``FrozenBatchNormNd.to_batchnorm``). A LocalResponseNorm in another
    framework's convention cannot be expressed by torch's class and raises."""
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
        report.append(Swap(name, f"normkit.nn.{type(module).__name__}", torch_cls.__name__))
        module.__class__ = torch_cls
    return (model, report) if return_report else model


# ------------------------------------------------------------------------------------------- folding
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


def _foldable_pair(layer: nn.Module, bn: nn.Module) -> str | None:
    """None if ``bn`` can fold into ``layer``; otherwise why not."""
    if not isinstance(layer, FOLDABLE):
        return "the previous layer is not a Conv1d/2d/3d or Linear"
    if bn.running_mean is None or bn.running_var is None:
        return "it normalizes with batch statistics (track_running_stats=False)"
    out_features = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    if bn.num_features != out_features:
        return f"its {bn.num_features} features do not match the layer's {out_features} outputs"
    return None


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, return_report: bool = False):
    """Fold every eval-mode BatchNorm that directly follows a Conv1d/2d/3d or Linear into that layer.

    Pairs inside ``nn.Sequential`` are folded directly; for any other data flow the model is traced
    with ``torch.fx`` (a BatchNorm whose input layer's output is also used elsewhere is left in place, and
    the report says so). Folding is computed in float64 and cast back; the result equals the unfolded eval
    model up to the rounding of one multiplication. Raises in training mode.
    Returns the model (a ``torch.fx.GraphModule`` where tracing was needed), or ``(model, report)``.
    """
    bns = [m for m in model.modules() if _is_batchnorm(m)]
    if any(m.training for m in bns if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise ValueError("fold_batchnorm: the model has BatchNorm layers in training mode, whose output depends on "
                         "the batch; call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    report: list[Swap] = []
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for prev, key in zip(keys, keys[1:]):
            layer, bn = seq._modules[prev], seq._modules[key]
            if _is_batchnorm(bn) and isinstance(layer, FOLDABLE):
                why = _foldable_pair(layer, bn)
                qual = f"{name}.{key}" if name else key
                if why is None:
                    _fold_into(layer, bn)
                    seq._modules[key] = nn.Identity()
                    report.append(Swap(qual, type(bn).__name__, f"folded into {prev}"))
                else:
                    report.append(Swap(qual, type(bn).__name__, f"left: {why}", changed=False))
    handled = {s.name for s in report}
    if any(_is_batchnorm(m) and n not in handled for n, m in model.named_modules()):
        model = _fold_traced(model, report, handled)
    for s in report:
        if not s.changed:
            warnings.warn(f"fold_batchnorm: {s.name} ({s.before}) {s.after}", RuntimeWarning, stacklevel=2)
    return (model, report) if return_report else model


def _fold_traced(model: nn.Module, report: list[Swap], handled: set[str]) -> nn.Module:
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # not traceable: what Sequential folding did is all we can do
        report.extend(Swap(n, type(m).__name__, f"left: the model is not traceable by torch.fx ({type(exc).__name__})", False)
                      for n, m in model.named_modules() if _is_batchnorm(m) and n not in handled)
        return model
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_batchnorm(modules[node.target]) or node.target in handled:
            continue
        src = node.args[0] if node.args else None
        bn = modules[node.target]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
            report.append(Swap(node.target, type(bn).__name__, "left: its input is not a Conv/Linear module", False))
            continue
        layer = modules[src.target]
        why = _foldable_pair(layer, bn)
        if why is None and len(src.users) > 1:
            why = f"the output of {src.target} is also used elsewhere"
        if why is not None:
            report.append(Swap(node.target, type(bn).__name__, f"left: {why}", False))
            continue
        _fold_into(layer, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        report.append(Swap(node.target, type(bn).__name__, f"folded into {src.target}"))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
