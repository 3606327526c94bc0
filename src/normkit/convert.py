"""Model surgery: make every normalization in a model normkit's, and back.

``convert`` changes modules in place of their class, never by copying, so every parameter, buffer, hook,
the training mode, device, dtype, ``requires_grad`` and every state-dict key stay exactly as they were:

* torch's norm classes (and subclasses that keep torch's computation) become their normkit twin
  (:data:`TWINS`; normkit's classes subclass torch's and differ only in the computation);
* a module whose own forward calls torch's functional norms (timm's ``LayerNorm2d``, ``BatchNormAct2d``,
  ``GroupNorm``; Hugging Face's ConvNeXt ``LayerNorm``) is *hardened*: its own forward still runs, with
  those calls routed to normkit (:func:`normkit.robust.harden`);
* a hand-written norm (Hugging Face's ``LlamaRMSNorm``, ``GemmaRMSNorm``, ``T5LayerNorm``; timm's
  ``RmsNorm``; torchvision's ``FrozenBatchNorm2d``; your own) becomes the normkit module its behaviour
  proves it is, with its dtype behaviour (:mod:`normkit.recognize`).

Everything else that looks like a norm is left, and reported with the reason. Folding BatchNorm into the
layer before it lives in :mod:`normkit.fold` (``fold_batchnorm``, re-exported here).
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from . import nn as nnk
from .nn.batchnorm import _FrozenBatchNorm
from .nn.normalization import LayerNorm, RMSNorm
from .recognize import become, norm_like, original_class, recognize, restore
from .robust import Hardened, harden, unharden

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
_OPTIONS = ("casting_mode", "offset", "channels_first")  # normkit's LayerNorm/RMSNorm options torch's classes lack


@dataclass(frozen=True)
class Swap:
    """One module that a conversion changed (or, with ``changed=False``, left alone and why; ``recipe``:
    what you can do about it)."""

    name: str
    before: str
    after: str
    changed: bool = True
    recipe: str = ""


def _own_methods(module: nn.Module, bases) -> tuple[type | None, list[str]]:
    """The nearest of ``bases`` in ``type(module)``'s MRO, and the compute methods the class overrides
    relative to it (``(None, [])`` when no base is an ancestor)."""
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in bases), None)
    if base is None:
        return None, []
    return base, [m for m in COMPUTE_METHODS if hasattr(base, m) and getattr(cls, m) is not getattr(base, m)]


def warn_left(tool: str, report: list[Swap], stacklevel: int = 3) -> None:
    """One RuntimeWarning for every module ``tool`` left, grouped by class and reason, with the recipe."""
    left = [s for s in report if not s.changed]
    if not left:
        return
    groups: dict[tuple, list[str]] = {}
    reasons: dict[tuple, str] = {}
    for s in left:  # one line per class and reason (the reason's numbers may differ: the first is shown)
        key = (s.before, re.sub(r"[-+.\de]+\d", "#", s.after), s.recipe)
        groups.setdefault(key, []).append(s.name or "the model")
        reasons.setdefault(key, s.after)
    lines = [f"{tool}: {len(left)} layer(s) left as they were:"]
    for key, names in groups.items():
        (cls, _, recipe), why = key, reasons[key]
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        lines.append(f"  {cls} x{len(names)} ({shown}): {why.removeprefix('left: ')}"
                     + (f". Recipe: {recipe}" if recipe else ""))
    warnings.warn("\n".join(lines), RuntimeWarning, stacklevel=stacklevel)


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


def _check_model(tool: str, model) -> None:
    if isinstance(model, nn.Module):
        return
    from .models import ZooEntry

    if isinstance(model, ZooEntry):
        fix = f"; build the model first: normkit.models.get({model.name!r})"
    elif isinstance(model, str):
        fix = f"; for a zoo model, build it first: normkit.models.get({model!r})"
    else:
        fix = ""
    raise TypeError(f"{tool}: expected a torch.nn.Module (a model or a single layer), got {type(model).__name__}{fix}")


def is_converted(module: nn.Module) -> bool:
    """A module that computes through normkit already: a normkit class (twin) or a hardened class."""
    return isinstance(module, (Hardened, *_TORCH_OF, _FrozenBatchNorm))


def convert(model: nn.Module, *, inplace: bool = False, include: Iterable | None = None,
            exclude: Iterable | None = None, return_report: bool = False):
    """Make every normalization in ``model`` compute through normkit: torch's norm classes become their
    normkit twins; modules whose own forward calls torch's functional norms are hardened in place; and
    hand-written norms become the normkit module a float64 probe proves them to be (see the module
    docstring and :mod:`normkit.recognize`). State-dict keys, parameters, buffers, hooks, training mode,
    dtype and device do not change; :func:`revert` gives every class back exactly.

    Every other norm-like module (a subclass of a torch norm class, a class named ``*Norm*`` with tensors
    or an eps of its own, a module with an eps attribute and a weight) is left and named in one
    RuntimeWarning per call, grouped by class, with the reason and a recipe.

    ``include`` / ``exclude``: module classes (``nn.BatchNorm2d``) or fnmatch patterns on qualified names
    (``"layer1.*"``). With ``inplace=False`` (default) the model is deep-copied first.
    Returns the model, or ``(model, report)`` with a :class:`Swap` for every norm-like module, changed or left.
    """
    _check_model("convert", model)
    include, exclude = _check_rules(include, "include"), _check_rules(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    for name, module in list(model.named_modules()):
        cls = type(module)
        if is_converted(module) or original_class(module) is not None or not norm_like(module):
            continue
        if not _selected(name, module, include, exclude):
            continue
        base, own = _own_methods(module, TWINS)
        if base is not None and not own:  # torch's class, or a subclass that keeps its computation
            lrn = base is nn.LocalResponseNorm and not hasattr(module, "convention")
            become(module, TWINS[base], (("convention", "torch"), ("region", "across_channels")) if lrn else ())
            report.append(Swap(name, cls.__name__, f"normkit.nn.{TWINS[base].__name__}"))
            continue
        found = recognize(module)
        if found.action == "harden":
            harden(module)
            report.append(Swap(name, cls.__name__, f"hardened in place: {found.reason}"))
        elif found.action == "twin":
            become(module, found.twin.cls, found.twin.attrs)
            report.append(Swap(name, cls.__name__, f"{found.twin.label}: {found.reason}"))
        else:
            report.append(Swap(name, cls.__name__, f"left: {found.reason}", False, found.recipe))
    warn_left("convert", report)
    return (model, report) if return_report else model


def revert(model: nn.Module, *, inplace: bool = False, return_report: bool = False):
    """The inverse of :func:`convert`: every module gets back the class (and attributes) it had before
    conversion -- a hardened module its own class, a twin of a hand-written norm that norm's class, a
    custom torch subclass that subclass -- and a normkit module built as such gets torch's class.
    FrozenBatchNorm built as normkit's has no torch class and stays (use ``FrozenBatchNormNd.to_batchnorm``).
    A LocalResponseNorm in another framework's convention, or a LayerNorm/RMSNorm built with normkit's
    casting options, cannot be expressed by torch's class and raises."""
    _check_model("revert", model)
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    for name, module in model.named_modules():
        if isinstance(module, Hardened):
            unharden(module)
            report.append(Swap(name, f"hardened {type(module).__name__}", type(module).__name__))
            continue
        torch_cls = _TORCH_OF.get(type(module))
        original = original_class(module)
        if torch_cls is None and original is None:
            continue
        before = f"normkit.nn.{type(module).__name__}"
        if isinstance(module, nnk.LocalResponseNorm) and (module.convention, module.region) != ("torch", "across_channels"):
            raise ValueError(f"revert: {name or 'the model'} is LocalResponseNorm(convention={module.convention!r}, "
                             f"region={module.region!r}); torch's class has only its own convention. "
                             f"Exclude it, or keep normkit's module")
        if original is not None:  # converted: its own class and attributes back
            report.append(Swap(name, before, restore(module).__name__))
            continue
        if isinstance(module, (LayerNorm, RMSNorm)) and not module._plain():
            raise ValueError(f"revert: {name or 'the model'} is {module!r}; torch's {torch_cls.__name__} has no "
                             f"{', '.join(_OPTIONS)}. Exclude it, or keep normkit's module")
        for attr in ("convention", "region", *_OPTIONS):  # built as normkit's: its own attributes go
            module.__dict__.pop(attr, None)
        report.append(Swap(name, before, torch_cls.__name__))
        module.__class__ = torch_cls
    return (model, report) if return_report else model


def ao_fuser_methods() -> dict:
    """torch.ao's eager fuser patterns with normkit's twins in place of torch's classes, for
    ``torch.ao.quantization.fuse_modules(model, names, fuse_custom_config_dict={"additional_fuser_method_mapping":
    normkit.convert.ao_fuser_methods()})`` (its own table matches torch's exact classes only). Eval mode:
    torch.ao's training-mode fused modules (``ConvBn2d``...) accept torch's exact classes only."""
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    return {tuple(TWINS.get(c, c) for c in pattern): fuser
            for pattern, fuser in _DEFAULT_OP_LIST_TO_FUSER_METHOD.items() if any(c in TWINS for c in pattern)}


from .fold import FOLD_TOLERANCE, FOLDABLE, FoldTracer, fold_batchnorm  # noqa: E402,F401  (re-exported; fold.py builds on the above)
