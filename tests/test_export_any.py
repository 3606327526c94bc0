"""export_onnx on any model: a bare norm layer (one op at a time, as a chip engineer tests them), a hand-written
norm, a module whose own forward calls torch's functional norms, batch norm without running statistics, and
what normkit has no form for (exported as torch's exporter writes it, named in one warning)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[dev]') is not installed")

import normkit  # noqa: E402
from conftest import REL_TOL, assert_rel_close  # noqa: E402
from normkit.onnx.verify import run  # noqa: E402
from normkit.reference import float64_call  # noqa: E402
from test_convert import LayerNorm2d, StdNorm, UpcastRMS, ZeroCentred  # noqa: E402

NATIVE = {"LayerNormalization", "BatchNormalization", "RMSNormalization", "GroupNormalization",
          "InstanceNormalization", "LRN"}


def randomized(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return module


def onnxruntime_error(proto, model, x) -> None:
    """ONNX Runtime's output on ``x`` within float32's tolerance of ``model`` computed truly in float64."""
    out, = run(proto, {proto.graph.input[0].name: x.numpy()})
    truth, lowered = float64_call(copy.deepcopy(model).double().eval(), x)
    assert lowered == []
    assert_rel_close(torch.from_numpy(out), truth, torch.float32, "ONNX Runtime vs float64")


BARE = {  # a single layer, exported by itself -> the number of robust subgraphs
    "torch LayerNorm": (lambda: nn.LayerNorm(8), (2, 5, 8)),
    "hand-written Llama RMS norm": (lambda: UpcastRMS(8), (2, 5, 8)),
    "zero-centred (Gemma) RMS norm": (lambda: ZeroCentred(8), (2, 5, 8)),
    "own forward over F.layer_norm": (lambda: LayerNorm2d(6), (2, 6, 4, 5)),
    "BatchNorm without running statistics": (lambda: nn.BatchNorm2d(6, track_running_stats=False), (3, 6, 4, 5)),
}


@pytest.mark.parametrize("name", BARE)
def test_a_bare_norm_layer_exports_hardened(name):
    """Before: "export a model that contains the normalization layer, not the layer itself", or
    "cannot export layer", or (batch statistics) refused."""
    make, shape = BARE[name]
    layer = randomized(make()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing stayed unhardened
        proto, report = normkit.export_onnx(layer, torch.randn(shape))
    assert len(report.replaced) == 1 and not report.skipped
    assert not {n.op_type for n in proto.graph.node} & NATIVE
    for scale in (1.0, 1e20):
        onnxruntime_error(proto, layer, torch.randn(shape) * scale)


def test_native_export_of_a_hardened_module():
    proto, report = normkit.export_onnx(nn.Sequential(LayerNorm2d(6)).eval(), torch.randn(2, 6, 4, 5), decompose=False)
    assert report is None and [n.op_type for n in proto.graph.node].count("LayerNormalization") == 1


def test_what_normkit_has_no_form_for_is_exported_natively_and_named_once():
    model = nn.Sequential(nn.Linear(8, 8), StdNorm(8), nn.LayerNorm(8)).eval()
    with pytest.warns(RuntimeWarning) as caught:
        proto, report = normkit.export_onnx(model, torch.randn(2, 8))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "export_onnx: 1 normalization(s) stayed as torch's exporter wrote them" in messages[0]
    assert "'1' (StdNorm)" in messages[0] and report.counts() == {"LayerNormalization": 1}
    onnxruntime_error(proto, model, torch.randn(3, 8))


def test_float16_export_of_an_offset_twin():
    """The twin's weight offset and casting arrive in the graph's dtype (ONNX's operators take one type)."""
    layer = randomized(ZeroCentred(8)).eval()
    proto, report = normkit.export_onnx(layer, torch.randn(2, 8), dtype=torch.float16)
    assert len(report.replaced) == 1
    x = torch.randn(3, 8).half()
    err, = normkit.verify_onnx(proto, layer.half(), x)
    assert err.nonfinite == 0 and err.rel_err <= REL_TOL[torch.float16], err
