"""normkit.reference: a float64 computation stays float64 through a model's own downcasts."""

import torch
from torch import nn

from normkit.reference import float64_call, keep_float64, to_float64


class UpcastRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm pattern: statistics 'in float32', cast back to the input dtype."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def oracle(m, x):
    return m.weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)


def test_downcast_inside_forward_stays_float64():
    m = UpcastRMSNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e20
    plain = m(x)
    assert plain.abs().max() == 0  # the trap: float32 squares overflow, rsqrt(inf) = 0
    out, lowered = float64_call(m, x)
    assert out.dtype == torch.float64 and lowered == []
    torch.testing.assert_close(out, oracle(m, x), rtol=1e-14, atol=0)


def test_every_cast_form_is_lifted():
    x = torch.randn(4, dtype=torch.float64)
    f32 = torch.zeros(1)
    with keep_float64() as mode:
        outs = [x.float(), x.half(), x.bfloat16(), x.to(torch.float32), x.to(dtype=torch.float16), x.to("cpu", torch.float32),
                x.to(f32), x.type(torch.float32), x.type_as(f32), torch.zeros(2, dtype=torch.float32), torch.tensor(0.5),
                torch.softmax(x, 0, dtype=torch.float32), x.sum(dtype=torch.float32), torch.arange(3).float()]
    assert [o.dtype for o in outs] == [torch.float64] * len(outs)
    assert mode.lowered == []
    torch.testing.assert_close(outs[0], x, rtol=0, atol=0)  # no rounding happened on the way
    assert torch.get_default_dtype() == torch.float32  # restored


def test_view_as_dtype_is_not_a_conversion():
    x = torch.randn(4, dtype=torch.float64)
    with keep_float64() as mode:
        bits = x.view(torch.float32)
    assert bits.dtype == torch.float32 and bits.numel() == 8
    assert mode.lowered == []


def test_what_cannot_be_lifted_is_reported():
    x32 = torch.randn(4)  # arrives in float32 from outside the mode
    with keep_float64() as mode:
        y = x32 * 2
    assert y.dtype == torch.float32
    assert len(mode.lowered) == 1 and "float32" in str(mode.lowered[0])


def test_to_float64_keeps_integers():
    ids = torch.tensor([1, 2, 3])
    out = to_float64({"ids": ids, "x": (torch.ones(2, dtype=torch.float16),)})
    assert out["ids"].dtype == torch.int64 and out["x"][0].dtype == torch.float64
