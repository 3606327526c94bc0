"""normkit's modules and functional ops inside torch's tool chain: torch.fx (and the fx-based fusers),
torch.export in train and eval mode, meta tensors, torch.compile, and TorchScript's refusal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

import normkit
import normkit.functional as nf
import normkit.nn as nnk
from conftest import PARITY_TOL, assert_rel_close

# (constructor, input shape): every normkit module, with the configurations whose forward differs
MODULES = {
    "BatchNorm1d": (lambda: nnk.BatchNorm1d(4), (3, 4)),
    "BatchNorm1d-3d-momentum-None": (lambda: nnk.BatchNorm1d(4, momentum=None), (3, 4, 5)),
    "BatchNorm2d": (lambda: nnk.BatchNorm2d(4), (3, 4, 5, 5)),
    "BatchNorm2d-no-stats": (lambda: nnk.BatchNorm2d(4, track_running_stats=False), (3, 4, 5, 5)),
    "BatchNorm3d": (lambda: nnk.BatchNorm3d(4, affine=False), (2, 4, 3, 3, 3)),
    "InstanceNorm1d": (lambda: nnk.InstanceNorm1d(4), (2, 4, 7)),
    "InstanceNorm2d-tracked": (lambda: nnk.InstanceNorm2d(4, affine=True, track_running_stats=True), (2, 4, 5, 5)),
    "InstanceNorm3d-unbatched": (lambda: nnk.InstanceNorm3d(4), (4, 3, 3, 3)),
    "LayerNorm": (lambda: nnk.LayerNorm((5, 6)), (3, 4, 5, 6)),
    "GroupNorm": (lambda: nnk.GroupNorm(2, 4), (3, 4, 5, 5)),
    "RMSNorm": (lambda: nnk.RMSNorm(6), (3, 4, 6)),
    "LocalResponseNorm": (lambda: nnk.LocalResponseNorm(3), (2, 5, 4, 4)),
    "LocalResponseNorm-caffe": (lambda: nnk.LocalResponseNorm(3, convention="caffe"), (2, 5, 4, 4)),
    "FrozenBatchNorm2d": (lambda: frozen(), (3, 4, 5, 5)),
    # torch.distributed not initialized in this process: SyncBatchNorm normalizes the local batch
    "SyncBatchNorm": (lambda: nnk.SyncBatchNorm(4), (3, 4, 5, 5)),
    "SyncBatchNorm-3d-momentum-None": (lambda: nnk.SyncBatchNorm(4, momentum=None), (3, 4, 5)),
}
MODES = ["train", "eval"]


def frozen():
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(6, 4, 5, 5) * 2 + 1)
    return nnk.FrozenBatchNorm2d.from_batchnorm(bn.eval())


def build(name, mode):
    make, shape = MODULES[name]
    torch.manual_seed(1)
    module = make().train(mode == "train")
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module, torch.randn(shape) * 2 + 1


def assert_same_state(got: nn.Module, want: nn.Module, what: str):
    got, want = got.state_dict(), want.state_dict()
    assert set(got) <= set(want), f"{what}: state {set(got) - set(want)}"  # fx keeps only the buffers forward reads
    for key, a in got.items():
        b = want[key]
        if a.is_floating_point():
            assert_rel_close(a, b, torch.float32, f"{what}: {key}", rel=PARITY_TOL[torch.float32])
        else:
            assert torch.equal(a, b), f"{what}: {key} {a} != {b}"


# --------------------------------------------------------------------------------------- torch.fx
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODULES)
def test_fx_symbolic_trace_every_module(name, mode):
    """One call_function node per module call (normkit's own fx-wrapped function), equal to eager, with
    the same buffer updates. Before: "expected input to be a torch.Tensor, got Proxy" / "control flow"."""
    module, x = build(name, mode)
    eager = copy.deepcopy(module)
    gm = torch.fx.symbolic_trace(module)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1 and calls[0].target.__module__.startswith("normkit"), gm.code
    for step in range(2):
        assert_rel_close(gm(x + step), eager(x + step), torch.float32, f"fx step {step}", rel=PARITY_TOL[torch.float32])
    assert_same_state(gm, eager, "fx")


class AllFunctional(nn.Module):
    """Calls every normkit.functional op through the module, as user code does."""

    def forward(self, x):
        rm, rv = torch.zeros(4), torch.ones(4)
        y = nf.batch_norm(x, rm, rv, training=True) + nf.instance_norm(x) + nf.group_norm(x, 2)
        y = y + nf.layer_norm(x, x.shape[-2:]) + nf.rms_norm(x, [5]) + nf.local_response_norm(x, 3)
        y = y + nf.lrn(x, 3, convention="onnx") + nf.batch_norm_stateless(x, rm, rv, training=True)[0]
        return y + nf.instance_norm_stateless(x)[0] + nf.tf_local_response_normalization(x, 1)


def test_fx_traces_every_functional_op():
    x = torch.randn(2, 4, 3, 5)
    gm = torch.fx.symbolic_trace(AllFunctional())
    targets = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and n.target.__module__.startswith("normkit")}
    assert targets == set(nf.__all__)
    assert_rel_close(gm(x), AllFunctional()(x), torch.float32, rel=PARITY_TOL[torch.float32])


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.GroupNorm(2, 8), nn.LocalResponseNorm(3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 16, 10), nn.LayerNorm(10))

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(x), 4))


def converted_cnn():
    torch.manual_seed(0)
    model = normkit.convert(SmallCNN()).eval()
    with torch.no_grad():
        bn = model.features[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model


def test_fx_fusers_run_on_converted_models():
    """torch.fx.experimental.optimization.fuse and torch.ao's fuse_fx run on a converted model and keep its
    outputs (they fuse torch's exact classes only, so normkit's BatchNorm stays; fold_batchnorm folds it)."""
    from torch.ao.quantization.quantize_fx import fuse_fx
    from torch.fx.experimental.optimization import fuse

    from torch.ao.quantization import fuse_modules

    from normkit.convert import ao_fuser_methods

    model, x = converted_cnn(), torch.randn(2, 3, 8, 8)
    want = model(x)
    eager_fused = fuse_modules(copy.deepcopy(model), [["features.0", "features.1", "features.2"]],
                               fuse_custom_config_dict={"additional_fuser_method_mapping": ao_fuser_methods()})
    assert isinstance(eager_fused.features[1], nn.Identity)  # torch.ao's eager fuser folds normkit's BatchNorm
    for fused in (fuse(copy.deepcopy(model)), fuse_fx(copy.deepcopy(model)), eager_fused, normkit.fold_batchnorm(model)):
        assert_rel_close(fused(x), want, torch.float32, type(fused).__name__, rel=PARITY_TOL[torch.float32])


# ----------------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODULES)
def test_export_every_module(name, mode):
    """The exported program equals eager, and in train mode updates the buffers as eager does (LRN: passes
    with the lrn branch, whose fast/robust choice no longer calls .item())."""
    module, x = build(name, mode)
    eager = copy.deepcopy(module)
    ep = torch.export.export(module, (x,))
    program = ep.module()
    for step in range(2):
        assert_rel_close(program(x + step), eager(x + step), torch.float32, f"export step {step}", rel=PARITY_TOL[torch.float32])
    assert_same_state(program, eager, "export")


@pytest.mark.parametrize("name", MODULES)
def test_meta_device_modules_and_inputs(name):
    module, x = build(name, "train")
    meta = module.to("meta")
    y = meta(x.to("meta"))
    assert y.device.type == "meta" and y.shape == x.shape


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks-allowed", "fullgraph"])
def test_compile_converted_cnn(fullgraph, mode):
    """fullgraph=True: Dynamo traces every normkit op of the converted model without a graph break; in train
    mode the running statistics move as eager's do."""
    model, x = converted_cnn(), torch.randn(2, 3, 8, 8)
    model.train(mode == "train")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=fullgraph, backend="eager")
    assert_rel_close(compiled(x), eager(x), torch.float32, rel=PARITY_TOL[torch.float32])
    assert_same_state(model, eager, "compiled")


# ------------------------------------------------------------------------------------ TorchScript
@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "FrozenBatchNorm2d", "LocalResponseNorm", "SyncBatchNorm"])
def test_torchscript_refuses_with_one_clear_error(name):
    module, _ = build(name, "eval")
    with pytest.raises(RuntimeError, match=r"cannot be compiled by TorchScript.*torch\.export\.export"):
        torch.jit.script(module)
    with pytest.raises(RuntimeError, match=f"normkit.nn.{type(module).__name__} cannot be compiled"):
        torch.jit.script(nn.Sequential(nn.Identity(), module))  # found inside a model too
    if name not in ("FrozenBatchNorm2d", "SyncBatchNorm"):  # (no torch twin; torch's SyncBatchNorm does not script)
        torch.jit.script(normkit.revert(nn.Sequential(module)))
