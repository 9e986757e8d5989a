"""The networks the benchmarks measure, with their input shapes (random weights, fixed seed).

* ``mlp``: MNIST MLP 784-256-256-10 (the "256×2" MLP);
* ``mlp6x100``: MNIST MLP with six hidden layers of 100 (ERAN's 6×100);
* ``cnn7``: CNN7 with batch norm (Shi et al. 2021; as used by SABR and TAPS), CIFAR-10;
* ``conv3``: COLT's Conv3 (ACE paper, App. A, Table 3: conv 32 3×3/1, conv 32 4×4/2,
  conv 128 4×4/2, FC 250, FC 10; padding 1), CIFAR-10;
* ``resnet2b``: a small ResNet, conv 16 then two basic blocks (conv-BN-ReLU-conv-BN + identity,
  ReLU), average pool, FC 10, CIFAR-10.

All come from the zoo (:mod:`certfx.models`) and have the dataset normalization inside the
graph, so ε is in pixel space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from certfx.models import BasicBlock, Normalize, build_model

__all__ = ["NETWORKS", "BasicBlock", "Network", "Normalize", "build", "cnn7", "conv3",
           "mnist_mlp", "resnet2b"]


def mnist_mlp(widths: tuple[int, ...] = (256, 256)) -> nn.Module:
    """An MNIST MLP with the given hidden widths."""
    return build_model("mlp", "mnist", widths=widths)


def cnn7() -> nn.Module:
    """CNN7 with batch norm for CIFAR-10 (the zoo's ``cnn7``)."""
    return build_model("cnn7", "cifar10")


def conv3() -> nn.Module:
    """COLT's Conv3 for CIFAR-10 (ACE App. A, Table 3)."""
    return build_model("conv3", "cifar10")


def resnet2b() -> nn.Module:
    """A small CIFAR-10 ResNet with two basic blocks."""
    return build_model("resnet2b", "cifar10")


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
