"""AlexNet as in the original paper (Krizhevsky et al., 2012): torchvision's module layout
(``features`` / ``avgpool`` / ``classifier``) with ``LocalResponseNorm(5, 1e-4, 0.75, 2.0)`` right after
each of the first two ReLUs, as the paper has it (torchvision drops them).

``features`` indices: 0 conv, 1 relu, 2 LRN, 3 pool, 4 conv, 5 relu, 6 LRN, 7 pool, 8-13 conv/relu x3, 14 pool.
"""

from __future__ import annotations

import torch
from torch import nn

from ._seed import seeded


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(num_classes: int = 1000, *, seed: int = 0) -> AlexNet:
    """AlexNet with LRN, torch's default initialization drawn from ``seed``."""
    with seeded(seed):
        return AlexNet(num_classes)
