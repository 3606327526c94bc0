"""The eager path on CUDA tensors: every operator, forward and backward, in every dtype, at ordinary and at
extreme magnitudes, against the extended-precision oracle (the same contract as on the CPU).

CI and the development machines have no GPU, so these tests are skipped there; they run on a GPU machine
(`python -m pytest tests/test_cuda.py`)."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as nf
import oracle
from cases import OPS, run_normkit, run_oracle
from conftest import DTYPES, assert_rel_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

SHAPE = (4, 6, 5, 7)  # |randn| < 5, so float16 at scale 1e4 stays below its 65504 top
SCALES = {torch.float16: (1.0, 1e4), torch.bfloat16: (1.0, 1e30), torch.float32: (1.0, 1e20, 1e-30),
          torch.float64: (1.0, 1e200)}


def _cuda(d: dict) -> dict:
    return {k: v.cuda() for k, v in d.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_statistics_ops_on_cuda(op, dtype):
    for scale in SCALES[dtype]:
        x = (scale * torch.randn(SHAPE, dtype=torch.float64)).to(dtype)
        p = op.params(x, scale)
        dy = torch.randn(SHAPE, dtype=torch.float64).to(dtype)
        got = run_normkit(op, x.cuda(), _cuda(p), dy.cuda())
        ref = run_oracle(op, x, p, dy)
        assert got["y"].device.type == "cuda"
        for key in ref:
            if key in got:
                assert_rel_close(got[key].cpu(), ref[key], dtype, f"{op.name} {key} at scale {scale:g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_local_response_norm_on_cuda(dtype):
    for scale in SCALES[dtype]:
        x = (scale * torch.randn(SHAPE, dtype=torch.float64)).to(dtype)
        dy = torch.randn(SHAPE, dtype=torch.float64).to(dtype)
        xc = x.cuda().requires_grad_()
        y = nf.local_response_norm(xc, 5, 1e-4, 0.75, 2.0)
        y.backward(dy.cuda())
        ref = oracle.lrn(oracle.ld(x), (1,), 2, 2, 1e-4 / 5, 2.0, 0.75, oracle.ld(dy))  # torch window, size 5
        assert_rel_close(y.detach().cpu(), ref["y"], dtype, f"lrn y at scale {scale:g}")
        assert_rel_close(xc.grad.cpu(), ref["dx"], dtype, f"lrn dx at scale {scale:g}")


AUTOCAST_CALLS = {
    "batch_norm": lambda L, x, w: L.batch_norm(x, None, None, w, w, True),
    "instance_norm": lambda L, x, w: L.instance_norm(x, weight=w, bias=w),
    "layer_norm": lambda L, x, w: L.layer_norm(x, x.shape[-1:], None, None),
    "group_norm": lambda L, x, w: L.group_norm(x, 3, w, w),
    "rms_norm": lambda L, x, w: L.rms_norm(x, x.shape[-1:]),
    "local_response_norm": lambda L, x, w: L.local_response_norm(x, 3),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", list(AUTOCAST_CALLS))
def test_cuda_autocast_dtype_as_torch(op, dtype):
    """Under CUDA float16 autocast each op returns the dtype torch's returns (torch runs layer and group norm
    in float32 there), within that dtype's tolerance of the float64 answer (torch's own autocast LRN rounds
    its intermediates to float16 and is off by 3e-4 in float32 output)."""
    import torch.nn.functional as F

    x = torch.randn(4, 6, 5, 7, device="cuda", dtype=dtype)
    # float32 parameters, as an autocast model has them; float64 input needs float64 ones (torch refuses a mix)
    w = torch.linspace(0.5, 1.5, 6, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.autocast("cuda", dtype=torch.float16):
        mine, theirs = AUTOCAST_CALLS[op](nf, x, w), AUTOCAST_CALLS[op](F, x, w)
    assert mine.dtype == theirs.dtype, f"{op}: {mine.dtype}, torch {theirs.dtype}"
    exact = AUTOCAST_CALLS[op](F, x.double(), w.double())  # no autocast: the float64 answer
    assert_rel_close(mine.cpu(), exact.cpu(), mine.dtype, op)
