"""The benchmarks' cases, in groups (``python -m benchmarks --group NAME``):

* ``ops``: operators of the one case registry (:data:`normkit.check.cases.OPERATORS`, shared with the tests
  and ``normkit check``) on large shapes, layouts and dtypes (:data:`CASES`);
* ``models``: whole zoo models at batch 8, eager (:data:`MODEL_CASES`);
* ``small``: single calls on small tensors -- batch 1, decoding -- where the per-call cost decides
  (:data:`SMALL_CASES`, timed per call in microseconds, 1 thread);
* ``batch1``: the zoo models at batch 1 in eval (:data:`BATCH1_CASES`, 1 thread);
* ``compiled``: the zoo models under ``torch.compile``, normkit's converted model against torch's, both
  compiled (:data:`COMPILED_CASES`).

The registry gives each op its parameters, its normkit and torch calls and its one-node ONNX form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import normkit.functional as nf
import torch.nn.functional as F
from normkit.check.cases import OPERATORS, OpCase, channel_params, num_groups


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

def _zoo(name):
    def build():
        from normkit.models import get

        return get(name, seed=0)
    return build


def _transformer_block():
    from normkit.models import transformer_block

    return transformer_block(d_model=768, n_heads=12, norm="layer")


@dataclass(frozen=True)
class ModelCase:
    """A zoo model (``build()``) on an input of ``shape``: torch's model against ``normkit.convert`` of it,
    eager or (``compiled``) both under ``torch.compile``."""

    model: str
    shape: tuple
    build: Callable
    modes: tuple = ("eval", "train step")
    dtype: torch.dtype = torch.float32
    op: str = "model"
    layout: str = "contiguous"
    compiled: bool = False

    @property
    def name(self) -> str:
        return f"{'compiled' if self.compiled else 'model'} {self.model} {tuple(self.shape)}"


MODEL_CASES = [ModelCase("resnet18", (8, 3, 224, 224), _zoo("resnet18")),
               ModelCase("transformer_block", (8, 197, 768), _transformer_block)]

IMAGE1 = (1, 3, 224, 224)
BATCH1_CASES = [ModelCase(name, IMAGE1, _zoo(name), ("eval",)) for name in ("resnet18", "mobilenet_v2", "alexnet")] + [
    ModelCase("transformer_block", (1, 16, 768), _transformer_block, ("eval",))]

IMAGE8 = (8, 3, 224, 224)
COMPILED_CASES = [ModelCase(name, IMAGE8, _zoo(name), compiled=True) for name in ("resnet18", "mobilenet_v2", "alexnet")] + [
    ModelCase("transformer_block", (8, 197, 768), _transformer_block, compiled=True)]


# ---- single calls on small tensors ---------------------------------------------------------------------------

def _bound(op: str, x: torch.Tensor, p: dict):
    """``(normkit call, torch call)``: the functional op with every argument bound, so that the timed call is
    the op alone (the registry's callables work out the normalized shape or group count on each call)."""
    eps = OPERATORS[op].eps_or_default(None)
    w, b = p.get("weight"), p.get("bias")
    if op in ("layer_norm", "rms_norm"):
        shape = tuple(x.shape[-1:])
        if op == "layer_norm":
            return (lambda: nf.layer_norm(x, shape, w, b, eps)), (lambda: F.layer_norm(x, shape, w, b, eps))
        return (lambda: nf.rms_norm(x, shape, w, eps)), (lambda: F.rms_norm(x, shape, w, eps))
    if op == "group_norm":
        g = num_groups(x.shape[1])
        return (lambda: nf.group_norm(x, g, w, b, eps)), (lambda: F.group_norm(x, g, w, b, eps))
    if op in ("batch_norm", "batch_norm_eval"):
        rm, rv, training = p.get("running_mean"), p.get("running_var"), op == "batch_norm"
        return ((lambda: nf.batch_norm(x, rm, rv, w, b, training, 0.1, eps)),
                (lambda: F.batch_norm(x, rm, rv, w, b, training, 0.1, eps)))
    if op == "instance_norm":
        return (lambda: nf.instance_norm(x, weight=w, bias=b, eps=eps)), (lambda: F.instance_norm(x, weight=w, bias=b, eps=eps))
    raise ValueError(f"no bound call for {op!r}")


@dataclass(frozen=True)
class CallCase:
    """One call of an operator of the registry on a small input, normkit's functional op against torch's with
    the same bound arguments: ``fwd`` under no_grad, or ``fwd+bwd`` (forward and backward of the output)."""

    op: str
    shape: tuple
    mode: str = "fwd"
    label: str | None = None
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"

    @property
    def name(self) -> str:
        return f"{self.label or self.op} {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"

    def calls(self) -> dict:
        """``{"normkit": f, "torch": f}``: no-argument callables, one call each. Forward calls are meant to run
        under ``torch.no_grad()`` entered once around a loop of them, as a decoding loop enters it (the
        runner does so), not per call."""
        torch.manual_seed(0)
        x = (torch.randn(self.shape) * 3 + 1).to(self.dtype)
        params = OPERATORS[self.op].params(x, 1.0)
        if self.op == "batch_norm":
            params = {**params, **channel_params(x, affine=False, running=True)}
        if self.mode == "fwd":
            return dict(zip(("normkit", "torch"), _bound(self.op, x, params)))
        out = {}
        for name in ("normkit", "torch"):
            xg = x.detach().clone().requires_grad_()
            pg = {k: v.detach().clone().requires_grad_(k in ("weight", "bias")) for k, v in params.items()}
            f = _bound(self.op, xg, pg)[0 if name == "normkit" else 1]
            dy = torch.randn_like(x)
            out[name] = (lambda f=f, dy=dy: f().backward(dy))
        return out


SMALL_CASES = [
    CallCase("layer_norm", (1, 768)),
    CallCase("rms_norm", (1, 4096)),
    CallCase("layer_norm", (1, 16, 768)),
    CallCase("batch_norm_eval", (1, 64, 14, 14)),
    CallCase("group_norm", (1, 64, 14, 14)),
    CallCase("instance_norm", (1, 64, 14, 14)),
    CallCase("batch_norm", (1, 64, 14, 14), label="batch_norm_train"),
    CallCase("layer_norm", (1, 16, 768), "fwd+bwd"),
    CallCase("rms_norm", (1, 16, 4096), "fwd+bwd"),
    CallCase("batch_norm", (2, 64, 14, 14), "fwd+bwd", label="batch_norm_train"),
]
