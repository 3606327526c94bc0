"""A pre-norm transformer encoder block (as in GPT-2 / ViT): ``x + attn(norm1(x))``, then
``x + mlp(norm2(x))``, with LayerNorm or RMSNorm. Input ``(batch, sequence, d_model)``."""

from __future__ import annotations

import torch
from torch import nn

from ._seed import seeded

NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int = 64, n_heads: int = 4, norm: str = "layer", mlp_ratio: int = 4,
                 num_classes: int | None = None, seq_len: int = 16) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"transformer_block: norm={norm!r} is not one of {', '.join(map(repr, NORMS))}")
        if d_model % n_heads:
            raise ValueError(f"transformer_block: n_heads={n_heads} must divide d_model={d_model}")
        self.norm1 = NORMS[norm](d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm2 = NORMS[norm](d_model)
        self.linear1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.activation = nn.GELU()
        self.linear2 = nn.Linear(mlp_ratio * d_model, d_model)
        # an optional classification head on the mean token, so the block can stand alone in the zoo
        self.head = nn.Linear(d_model, num_classes) if num_classes else None
        self.example_input_shape = (2, seq_len, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.linear2(self.activation(self.linear1(self.norm2(x))))
        return x if self.head is None else self.head(x.mean(dim=1))


def transformer_block(d_model: int = 64, n_heads: int = 4, norm: str = "layer", *, num_classes: int | None = None,
                      seq_len: int = 16, seed: int = 0) -> TransformerBlock:
    """A pre-norm encoder block (``norm="layer"`` or ``"rms"``); ``example_input_shape`` is
    ``(2, seq_len, d_model)``. With ``num_classes`` a Linear head reads the mean token."""
    with seeded(seed):
        return TransformerBlock(d_model, n_heads, norm, num_classes=num_classes, seq_len=seq_len)
