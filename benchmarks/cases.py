"""The benchmarks' cases: which operators of the one case registry (:data:`normkit.check.cases.OPERATORS`,
shared with the tests and ``normkit check``) are timed on which shapes, layouts and dtypes, plus whole
models. The registry gives each op its parameters, its normkit and torch calls and its one-node ONNX form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from normkit.check.cases import OPERATORS, OpCase, channel_params


@dataclass(frozen=True)
class Case:
    """An operator of the registry (``op``: its name there) timed on a shape, a memory layout and a dtype.
    ``label`` names it in the results (the names the results have always used); ``affine``: with the
    registry's parameters (weight, bias, running statistics) or without (instance norm: InstanceNorm2d's
    defaults); ``running``: running statistics added (batch norm in training)."""

    op: str
    shape: tuple
    layout: str = "contiguous"  # or "channels_last"
    dtype: torch.dtype = torch.float32
    modes: tuple = field(default=("fwd", "fwd+bwd"))
    label: str | None = None
    affine: bool = True
    running: bool = False  # batch norm in training: with running statistics to update, as a model has

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        cl = " channels_last" if self.layout == "channels_last" else ""
        return f"{self.label or self.op} {tuple(self.shape)}{cl} {dt}"

    @property
    def spec(self) -> OpCase:
        return OPERATORS[self.op]

    def params(self, x: torch.Tensor) -> dict:
        p = self.spec.params(x, 1.0, affine=self.affine)
        return {**p, **channel_params(x, affine=False, running=True)} if self.running else p

    def make_input(self) -> torch.Tensor:
        x = (torch.randn(self.shape) * 3 + 1).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.layout == "channels_last" else x


CNN = (32, 64, 56, 56)
ALEXNET_CONV1 = (32, 96, 55, 55)
ROWS = [(8192, 1024), (64, 197, 768)]


def _suite():
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        cases.append(Case("local_response_norm", ALEXNET_CONV1, dtype=dt, label="lrn"))
        for op, label, affine in (("batch_norm", "batch_norm_train", True), ("batch_norm_eval", None, True),
                                  ("group_norm", None, True), ("instance_norm", None, False)):
            for layout in ("contiguous", "channels_last"):
                cases.append(Case(op, CNN, layout, dt, label=label, affine=affine, running=op == "batch_norm"))
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
