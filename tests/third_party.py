"""Real models from timm and Hugging Face transformers, for the tests: how to import them, and tiny builders and
inputs of the twelve models tests/test_third_party.py runs.

Random init and tiny configs only (no hub, no network, no pretrained weights); every builder is seeded.

Both libraries import torchvision when it is installed (timm depends on it), and torchvision's compiled
operators do not load beside torch's CPU build: its ``_meta_registrations`` raises "operator torchvision::nms
does not exist". Nothing here needs those operators, so empty modules stand in for the two registration
modules before the first import (:func:`stub_torchvision_ops`); when timm or transformers is missing the test
is skipped with that reason.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

_STUBS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def stub_torchvision_ops() -> None:
    """Empty stand-ins for torchvision's operator registrations (see the module docstring)."""
    for name in _STUBS:
        sys.modules.setdefault(name, types.ModuleType(name))


def timm():
    """The timm package, or a skip saying it is not installed."""
    stub_torchvision_ops()
    return pytest.importorskip("timm", reason="timm is not installed (pip install timm; the dev extra has it)")


def transformers():
    """The transformers package, or a skip saying it is not installed."""
    stub_torchvision_ops()
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers; "
                                                      "the dev extra has it)")


# ------------------------------------------------------------------------------------------------ timm
TIMM_MODELS = ("resnet18", "convnext_atto", "efficientnet_b0", "regnety_002", "resnet50_gn", "vit_tiny_patch16_224")
IMAGE = (2, 3, 64, 64)  # batch 2 at 64 px


def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with weights drawn from ``seed``, in eval mode;
    ViTs built for 64-px images unless ``img_size`` is given."""
    tm = timm()
    if name.startswith("vit"):
        kwargs.setdefault("img_size", IMAGE[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tm.create_model(name, pretrained=False, **kwargs).eval()


def image(scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A float32 batch of images, standard normal times ``scale``."""
    return torch.randn(IMAGE, generator=torch.Generator().manual_seed(seed)) * scale


# -------------------------------------------------------------------------------------------- transformers
_TINY_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
HF_CONFIGS = {  # name -> (config class, model class, tiny config)
    "llama": ("LlamaConfig", "LlamaModel", _TINY_DECODER),
    "qwen2": ("Qwen2Config", "Qwen2Model", _TINY_DECODER),
    "gemma": ("GemmaConfig", "GemmaModel", {**_TINY_DECODER, "head_dim": 8}),
    "t5": ("T5Config", "T5EncoderModel", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100)),
    "gpt2": ("GPT2Config", "GPT2Model", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                             bos_token_id=0, eos_token_id=0)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=100, max_position_embeddings=64)),
}
HF_MODELS = tuple(HF_CONFIGS)
TOKENS = (2, 7)  # batch 2, 7 tokens


class LastHiddenState(nn.Module):
    """A Hugging Face model called on token ids, returning ``last_hidden_state`` (one tensor: what ONNX
    export, fold and the comparisons want)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def hf_config(name: str):
    """The tiny config of ``name`` (eager attention, no cache)."""
    config_cls, _, kwargs = HF_CONFIGS[name]
    config = getattr(transformers(), config_cls)(**kwargs, use_cache=False)
    config._attn_implementation = "eager"
    return config


def hf_model(name: str) -> nn.Module:
    """The tiny ``name`` model (random init, seed 0, eager attention, no cache, no dropout) in eval mode,
    wrapped in :class:`LastHiddenState`."""
    config = hf_config(name)
    torch.manual_seed(0)
    return LastHiddenState(getattr(transformers(), HF_CONFIGS[name][1])(config)).eval()


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, TOKENS, generator=torch.Generator().manual_seed(seed))


def scale_embeddings(model: LastHiddenState, scale: float) -> LastHiddenState:
    """``model`` with its word-embedding weights rescaled to a root mean square of ``scale`` (in place;
    returned): the language-model counterpart of an image ``scale`` times a standard-normal draw."""
    with torch.no_grad():
        w = model.model.get_input_embeddings().weight
        w.mul_(scale / w.double().pow(2).mean().sqrt().item())
    return model


def build(name: str) -> nn.Module:
    """Any model of :data:`TIMM_MODELS` or :data:`HF_MODELS`."""
    return hf_model(name) if name in HF_CONFIGS else timm_model(name)


def example(name: str, scale: float = 1.0) -> torch.Tensor:
    """The model's input: token ids (``scale`` goes into the embeddings instead) or an image batch."""
    return token_ids() if name in HF_CONFIGS else image(scale)
