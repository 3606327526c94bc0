"""Real third-party models for the tests: timm and Hugging Face transformers, tiny configurations, random
initialization, nothing from the hub.

Both import torchvision when it is installed (timm depends on it), and torchvision's compiled operators do
not load beside torch's CPU build: its ``_meta_registrations`` raises "operator torchvision::nms does not
exist". Nothing here needs those operators, so empty modules stand in for the two registration modules
before the first import; when timm or transformers is missing the test is skipped with that reason.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

_STUBS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")

# the module of a file factory for ``normkit check --model FILE.py:FACTORY`` (a subprocess): the same stubs
FACTORY_PRELUDE = "import sys, types\n" + "".join(
    f"sys.modules.setdefault({name!r}, types.ModuleType({name!r}))\n" for name in _STUBS)


def _stub_torchvision_ops() -> None:
    for name in _STUBS:
        sys.modules.setdefault(name, types.ModuleType(name))


def timm():
    """The timm package, or a skip saying it is not installed."""
    _stub_torchvision_ops()
    return pytest.importorskip("timm", reason="timm is not installed (pip install timm; the dev extra has it)")


def transformers():
    """The transformers package, or a skip saying it is not installed."""
    _stub_torchvision_ops()
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers; "
                                                      "the dev extra has it)")


def tiny_llama_config():
    """A two-layer Llama: hidden size 16, 2 heads (1 key/value head), vocabulary 64, no cache."""
    tf = transformers()
    return tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, use_cache=False)


def timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with weights drawn from ``seed``."""
    tm = timm()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tm.create_model(name, pretrained=False, **kwargs)
