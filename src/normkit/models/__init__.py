"""A small model zoo built from torch's own ``nn`` layers -- models as a user writes them;
``normkit.convert`` gives their hardened twins. Deterministic from ``seed``; no torchvision needed.

``alexnet`` (with the paper's LocalResponseNorm), ``resnet18`` and ``mobilenet_v2`` (torchvision's exact
module trees and state-dict keys), ``transformer_block`` (pre-norm, LayerNorm or RMSNorm).

The registry :data:`ZOO` maps a name to a :class:`ZooEntry` (factory and default input shape); the CLI
(``normkit check --model NAME``) and the ONNX exporter look models up with :func:`get`::

    entry = normkit.models.get("resnet18")
    model = entry.build(seed=0)                 # num_classes=... passes through
    x = torch.randn(entry.input_shape)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .alexnet import AlexNet, alexnet
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18
from .transformer import TransformerBlock, transformer_block


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


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(ZOO)}") from None


__all__ = ["ZOO", "ZooEntry", "get", "names", "alexnet", "resnet18", "mobilenet_v2", "transformer_block",
           "AlexNet", "ResNet", "MobileNetV2", "TransformerBlock"]
