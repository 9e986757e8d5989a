"""Small PyTorch networks shared by the tests (MLP, CNN with batch norm and max-pool, a
residual block, a normalized network), all deterministic given a seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 5))


def cnn_bn_maxpool(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4))
    _randomize_bn(net)
    return net.eval()


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus identity, relu; then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.b1 = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.b2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 6 * 6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)) + x)
        return self.head(torch.flatten(h, 1))


def residual(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = ResidualBlock()
    _randomize_bn(net)
    return net.eval()


class Normalized(nn.Module):
    """(x − mean) / std inside the graph, then a small CNN with sigmoid, tanh and avg-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.3]).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(2, 3, 3, groups=1, dilation=2, padding=2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        h = torch.sigmoid(self.conv(h))
        h = F.avg_pool2d(h, 2)
        h = torch.tanh(h.view(h.size(0), -1))
        return self.fc(h)


def normalized(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Normalized().eval()


def _randomize_bn(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


# name -> (constructor, per-example input shape)
NETWORKS = {
    "mlp": (mlp, (3, 4)),
    "cnn_bn_maxpool": (cnn_bn_maxpool, (1, 8, 8)),
    "residual": (residual, (3, 6, 6)),
    "normalized": (normalized, (2, 6, 6)),
}


def toy_images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 1×8×8 images in three classes: the class is which third of the image is bright
    (learnable with a margin, for the training tests)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for i in range(n):
        x[i, 0, :, int(y[i]) * 2:int(y[i]) * 2 + 3] += 0.6
    return x.clamp(0, 1), y
