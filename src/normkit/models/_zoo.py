"""The zoo's registry: a name -> :class:`ZooEntry` (factory, default input shape, description)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ._alexnet import alexnet
from ._mobilenet import mobilenet_v2
from ._resnet import resnet18
from ._transformer import transformer_block


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: ``build(**kwargs)`` calls ``factory(**defaults, **kwargs)``; ``input_shape`` is the
    default (batch-first) input shape it is checked with."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)

    def build(self, **kwargs) -> nn.Module:
        return self.factory(**{**self.defaults, **kwargs})


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("alexnet", alexnet, (1, 3, 224, 224), "AlexNet with LocalResponseNorm after the first two ReLUs"),
    ZooEntry("resnet18", resnet18, (2, 3, 224, 224), "ResNet-18, torchvision's module tree (BatchNorm2d)"),
    ZooEntry("mobilenet_v2", mobilenet_v2, (2, 3, 224, 224), "MobileNetV2, torchvision's module tree (BatchNorm2d)"),
    ZooEntry("transformer_block", transformer_block, (2, 16, 64), "pre-norm encoder block, d_model=64, LayerNorm",
             {"d_model": 64, "n_heads": 4, "norm": "layer"}),
    ZooEntry("transformer_block_rms", transformer_block, (2, 16, 64), "pre-norm encoder block, d_model=64, RMSNorm",
             {"d_model": 64, "n_heads": 4, "norm": "rms"}),
]}


def names() -> list[str]:
    """The zoo's model names, in registry order."""
    return list(ZOO)


def entry(name: str) -> ZooEntry:
    """The registry entry called ``name`` (factory, default input shape, description); an unknown name raises
    ``ValueError`` listing the known ones."""
    if not isinstance(name, str) or name not in ZOO:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(ZOO)}")
    return ZOO[name]


def get(name: str, **kwargs) -> nn.Module:
    """The zoo model called ``name``, built (``seed=0`` unless given; ``num_classes=...`` and the factory's
    other arguments pass through): ready for ``normkit.convert``. Its default input shape is
    ``entry(name).input_shape`` (the model's ``example_input_shape`` unless its factory sets one)."""
    e = entry(name)
    model = e.build(**kwargs)
    if getattr(model, "example_input_shape", None) is None:
        model.example_input_shape = e.input_shape
    return model
