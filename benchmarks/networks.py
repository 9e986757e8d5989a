"""The networks the benchmarks measure, with their input shapes (random weights, fixed seed).

* ``mlp``: MNIST MLP 784-256-256-10 (the "256×2" MLP);
* ``mlp6x100``: MNIST MLP with six hidden layers of 100 (ERAN's 6×100);
* ``cnn7``: CNN7 with batch norm (Shi et al. 2021; as used by SABR and TAPS), CIFAR-10;
* ``conv3``: COLT's Conv3 (ACE paper, App. A, Table 3: conv 32 3×3/1, conv 32 4×4/2,
  conv 128 4×4/2, FC 250, FC 10; padding 1), CIFAR-10;
* ``resnet2b``: a small ResNet, conv 16 then two basic blocks (conv-BN-ReLU-conv-BN + identity,
  ReLU), average pool, FC 10, CIFAR-10.

All have the dataset normalization inside the graph, so ε is in pixel space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class Normalize(nn.Module):
    """``(x − mean) / std`` per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def mnist_mlp(widths: tuple[int, ...] = (256, 256)) -> nn.Module:
    """An MNIST MLP with the given hidden widths."""
    layers: list[nn.Module] = [Normalize(MNIST_MEAN, MNIST_STD), nn.Flatten()]
    fan_in = 784
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def cnn7(in_ch: int = 3, size: int = 32, classes: int = 10) -> nn.Module:
    """CNN7 with batch norm (Shi et al. 2021; SABR/TAPS App. "Model Architectures")."""
    layers: list[nn.Module] = [Normalize(CIFAR_MEAN, CIFAR_STD)]
    channels, ch = [(64, 1), (64, 1), (128, 2), (128, 1), (128, 1)], in_ch
    for out_ch, stride in channels:
        layers += [nn.Conv2d(ch, out_ch, 3, stride=stride, padding=1), nn.BatchNorm2d(out_ch),
                   nn.ReLU()]
        ch = out_ch
    flat = ch * (size // 2) ** 2
    layers += [nn.Flatten(), nn.Linear(flat, 512), nn.BatchNorm1d(512), nn.ReLU(),
               nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def conv3() -> nn.Module:
    """COLT's Conv3 for CIFAR-10 (ACE App. A, Table 3)."""
    return nn.Sequential(
        Normalize(CIFAR_MEAN, CIFAR_STD),
        nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 128, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(128 * 8 * 8, 250), nn.ReLU(), nn.Linear(250, 10))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)
        self.c2, self.b2 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)


def resnet2b() -> nn.Module:
    """A small CIFAR-10 ResNet with two basic blocks."""
    return nn.Sequential(
        Normalize(CIFAR_MEAN, CIFAR_STD), nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
        BasicBlock(16), BasicBlock(16), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


@dataclass(frozen=True)
class Network:
    """A benchmark network: display name, constructor, per-example input shape, ε."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    eps: float


NETWORKS = {
    "mlp": Network("mlp 784-256-256-10", mnist_mlp, (1, 28, 28), 0.02),
    "mlp6x100": Network("mlp 6x100", lambda: mnist_mlp((100,) * 6), (1, 28, 28), 0.02),
    "cnn7": Network("cnn7 (CIFAR-10)", cnn7, (3, 32, 32), 2 / 255),
    "conv3": Network("conv3 (COLT)", conv3, (3, 32, 32), 2 / 255),
    "resnet2b": Network("resnet 2 blocks", resnet2b, (3, 32, 32), 2 / 255),
}


def build(key: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The network ``key`` in eval mode with realistic batch-norm statistics."""
    torch.manual_seed(seed)
    net = NETWORKS[key].make().to(device)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()
