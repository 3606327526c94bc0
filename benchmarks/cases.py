"""The registry of benchmark cases: each op with its normkit, torch and ONNX forms, and the shapes to time.

A :class:`Case` is an op, a shape, a memory layout and a dtype; ``CASES`` holds the issue's suite. The op
table gives, per op, how to make its parameters, call normkit / torch, and build a one-node ONNX model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import normkit.functional as nf


@dataclass(frozen=True)
class OpSpec:
    name: str
    params: Callable  # x -> dict of tensors (dtype of x)
    normkit: Callable  # (x, p) -> y
    torch: Callable  # (x, p) -> y
    onnx: Callable | None = None  # (shape, p) -> (onnx node list, initializers, opset) for the forward
    training: bool = True  # fwd+bwd applies (eval ops are also timed fwd+bwd: backward through frozen statistics)


def _channel(x, running=False):
    c = x.shape[1]
    p = {"weight": torch.rand(c).add(0.5).to(x.dtype), "bias": torch.rand(c).sub(0.5).to(x.dtype)}
    if running:
        p["running_mean"] = torch.randn(c).to(x.dtype)
        p["running_var"] = torch.rand(c).add(0.5).to(x.dtype)
    return p


def _last(x, bias=True):
    d = x.shape[-1]
    p = {"weight": torch.rand(d).add(0.5).to(x.dtype)}
    if bias:
        p["bias"] = torch.rand(d).sub(0.5).to(x.dtype)
    return p


def _onnx_lrn(shape, p):
    from onnx import helper

    return [helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-4, beta=0.75, bias=2.0)], {}, 17


def _onnx_bn_eval(shape, p):
    from onnx import helper

    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-5)
    return [node], {"scale": p["weight"], "bias": p["bias"], "mean": p["running_mean"], "var": p["running_var"]}, 17


def _onnx_ln(shape, p):
    from onnx import helper

    return [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1, epsilon=1e-5)], \
        {"scale": p["weight"], "bias": p["bias"]}, 17


def _onnx_rms(shape, p):
    from onnx import helper

    return [helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-6)], {"scale": p["weight"]}, 23


def _onnx_gn(shape, p):
    from onnx import helper

    return [helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=32, epsilon=1e-5)], \
        {"scale": p["weight"], "bias": p["bias"]}, 21


def _onnx_in(shape, p):
    from onnx import helper

    c = shape[1]
    return [helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-5)], \
        {"scale": torch.ones(c), "bias": torch.zeros(c)}, 17


OPS = {
    "lrn": OpSpec("lrn", lambda x: {},
                  lambda x, p: nf.local_response_norm(x, 5, 1e-4, 0.75, 2.0),
                  lambda x, p: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0), _onnx_lrn),
    "batch_norm_train": OpSpec("batch_norm_train", lambda x: _channel(x, running=True),
                               lambda x, p: nf.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], True),
                               lambda x, p: F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], True)),
    "batch_norm_eval": OpSpec("batch_norm_eval", lambda x: _channel(x, running=True),
                              lambda x, p: nf.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False),
                              lambda x, p: F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False),
                              _onnx_bn_eval),
    "layer_norm": OpSpec("layer_norm", _last,
                         lambda x, p: nf.layer_norm(x, x.shape[-1:], p["weight"], p["bias"]),
                         lambda x, p: F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"]), _onnx_ln),
    "rms_norm": OpSpec("rms_norm", lambda x: _last(x, bias=False),
                       lambda x, p: nf.rms_norm(x, x.shape[-1:], p["weight"], 1e-6),
                       lambda x, p: F.rms_norm(x, x.shape[-1:], p["weight"], 1e-6), _onnx_rms),
    "group_norm": OpSpec("group_norm", _channel,
                         lambda x, p: nf.group_norm(x, 32, p["weight"], p["bias"]),
                         lambda x, p: F.group_norm(x, 32, p["weight"], p["bias"]), _onnx_gn),
    "instance_norm": OpSpec("instance_norm", lambda x: {},  # InstanceNorm2d's defaults: no affine, no running stats
                            lambda x, p: nf.instance_norm(x), lambda x, p: F.instance_norm(x), _onnx_in),
}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    layout: str = "contiguous"  # or "channels_last"
    dtype: torch.dtype = torch.float32
    modes: tuple = field(default=("fwd", "fwd+bwd"))

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        cl = " channels_last" if self.layout == "channels_last" else ""
        return f"{self.op} {tuple(self.shape)}{cl} {dt}"

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    def make_input(self) -> torch.Tensor:
        x = (torch.randn(self.shape) * 3 + 1).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.layout == "channels_last" else x


CNN = (32, 64, 56, 56)
ALEXNET_CONV1 = (32, 96, 55, 55)
ROWS = [(8192, 1024), (64, 197, 768)]


def _suite():
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        cases.append(Case("lrn", ALEXNET_CONV1, dtype=dt))
        for op in ("batch_norm_train", "batch_norm_eval", "group_norm", "instance_norm"):
            for layout in ("contiguous", "channels_last"):
                cases.append(Case(op, CNN, layout, dt))
        for op in ("layer_norm", "rms_norm"):
            for shape in ROWS:
                cases.append(Case(op, shape, dtype=dt))
    return cases


CASES = _suite()


# ---- whole models: the torch model against normkit.convert(model), eval forward and one train step ----

def _resnet18():
    from normkit.models import get

    return get("resnet18", seed=0)


def _transformer_block():
    try:
        from normkit.models import transformer_block

        return transformer_block(d_model=768, n_heads=12, norm="layer")
    except Exception:
        return torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True, norm_first=True)


@dataclass(frozen=True)
class ModelCase:
    model: str
    shape: tuple
    build: Callable
    modes: tuple = ("eval", "train step")
    dtype: torch.dtype = torch.float32
    op: str = "model"
    layout: str = "contiguous"

    @property
    def name(self) -> str:
        return f"model {self.model} {tuple(self.shape)}"


MODEL_CASES = [ModelCase("resnet18", (8, 3, 224, 224), _resnet18),
               ModelCase("transformer_block", (8, 197, 768), _transformer_block)]
