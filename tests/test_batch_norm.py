"""Batch normalization's numerics (``ops/batch_norm.py``), on every backend that computes it: eval-mode
statistics at the edges of float32, through normkit in torch and through the ONNX subgraphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normkit
import normkit.nn as nnk
import oracle
from conftest import assert_rel_close


def _extreme_eval_bn():
    """``BatchNorm2d(4, eps=1e-30)`` in eval with ``running_var = 1e-20`` and ``weight = 1e-20``: at
    ``x = 1e30`` the output is 1e20, but ``(x - mean) * rstd`` alone is 1e40 (float32 overflows)."""
    model = torch.nn.Sequential(nnk.BatchNorm2d(4, eps=1e-30)).eval()
    with torch.no_grad():
        model[0].running_var.fill_(1e-20)
        model[0].weight.fill_(1e-20)
    x = torch.full((2, 4, 3, 3), 1e30)
    bn = model[0]
    ref = oracle.batch_norm(oracle.ld(x), oracle.ld(bn.weight), oracle.ld(bn.bias), None, 1e-30,
                            oracle.ld(bn.running_mean), oracle.ld(bn.running_var))["y"]
    return model, x, ref


def test_eval_with_extreme_parameters_in_torch():
    model, x, ref = _extreme_eval_bn()
    assert abs(float(ref.max()) / 1e20 - 1) < 1e-6
    assert_rel_close(model(x), ref, torch.float32, "normkit in torch")


@pytest.mark.parametrize("route", ["export_onnx", "harden_onnx"])
def test_eval_with_extreme_parameters_in_onnx_runtime(route):
    """The ONNX BatchNormalization subgraph used to form ``(x - mean) * rstd`` before the weight: inf in
    ONNX Runtime where normkit in torch gives 1e20. It applies ``weight * rstd`` as one split factor now."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model, x, ref = _extreme_eval_bn()
    if route == "export_onnx":
        proto, _ = normkit.export_onnx(model, x)
    else:
        proto, _ = normkit.harden_onnx(normkit.export_onnx(model, x, decompose=False)[0])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_rel_close(torch.from_numpy(np.asarray(y)), ref, torch.float32, route)
