"""A small model zoo built from torch's own ``nn`` layers -- models as a user writes them;
``normkit.convert`` gives their hardened twins. Deterministic from ``seed``; no torchvision needed.

``alexnet`` (with the paper's LocalResponseNorm), ``resnet18`` and ``mobilenet_v2`` (torchvision's exact
module trees and state-dict keys), ``transformer_block`` (pre-norm, LayerNorm or RMSNorm).

:func:`get` builds a model by name (what ``normkit check --model NAME`` and ``normkit export NAME`` use);
:func:`entry` gives its registry entry (:class:`ZooEntry`: factory, default input shape, description)::

    model = normkit.models.get("resnet18")           # seed=0; num_classes=... passes through
    x = torch.randn(model.example_input_shape)       # the zoo's default input shape
    twin = normkit.convert(model)
"""

from ._alexnet import AlexNet, alexnet
from ._mobilenet import MobileNetV2, mobilenet_v2
from ._resnet import ResNet, resnet18
from ._transformer import TransformerBlock, transformer_block
from ._zoo import ZOO, ZooEntry, entry, get, names

__all__ = ["ZOO", "ZooEntry", "get", "entry", "names", "alexnet", "resnet18", "mobilenet_v2", "transformer_block",
           "AlexNet", "ResNet", "MobileNetV2", "TransformerBlock"]
