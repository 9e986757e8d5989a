"""The model zoo: the papers' architectures, with the data set's normalization inside.

Every model starts with :class:`Normalize`, so inputs are images in ``[0, 1]`` and ε is in pixel
space. ``build_model(name, dataset)`` adapts the input channels and size (MNIST 1×28×28,
CIFAR-10 3×32×32); all have 10 outputs.

* ``mlp``: fully connected, hidden widths ``(256, 256)`` by default;
* ``cnn3``: a tiny three-layer CNN (conv 4 4×4/2, conv 8 4×4/2, FC 10). TAPS (paper ``001``,
  App. D) measures worst-case-loss precision against MILP on "a small CNN3" without giving its
  layers; this one is small enough for exact MILP per example;
* ``small_cnn``: conv 16 4×4/2, conv 32 4×4/2, FC 100, FC 10 (the "small" CNN of Wong & Kolter
  2018 and CROWN-IBP), the CPU benchmarks' network;
* ``cnn7``: CNN7 with batch norm (Shi et al. 2021; SABR and TAPS App. D.3): conv 64, 64, 128/2,
  128, 128 (3×3, padding 1), FC 512, FC 10, each but the last followed by BN and ReLU;
* ``conv2``, ``conv3``, ``conv5``: ACE (paper ``000``) App. A, Table 3 (every layer followed by
  ReLU, a final FC 10; padding 1). ``conv3`` is COLT's largest CIFAR-10 network.

Example:
    >>> import torch
    >>> net = build_model("small_cnn", "mnist")
    >>> tuple(net(torch.zeros(2, 1, 28, 28)).shape)
    (2, 10)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from certfx.errors import InvalidValueError

__all__ = ["MODELS", "BasicBlock", "Normalize", "build_model", "conv_net", "resnet2b"]

_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class Normalize(nn.Module):
    """``(x − mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _normalize(dataset: str) -> Normalize:
    from certfx.data.datasets import DATASETS
    info = DATASETS[dataset]
    return Normalize(info.mean, info.std)


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_net(dataset: str, convs: Sequence[tuple[int, int, int]], fcs: Sequence[int],
             batch_norm: bool = False, padding: int = 1, classes: int = 10) -> nn.Sequential:
    """Normalize, then ``(channels, kernel, stride)`` convolutions and fully connected widths,
    each followed by (batch norm and) ReLU, then a final linear layer to ``classes``."""
    ch, size, _ = _SHAPES[dataset]
    layers: list[nn.Module] = [_normalize(dataset)]
    for out, kernel, stride in convs:
        layers += [nn.Conv2d(ch, out, kernel, stride, padding)]
        layers += [nn.BatchNorm2d(out)] if batch_norm else []
        layers += [nn.ReLU()]
        ch, size = out, _out_size(size, kernel, stride, padding)
    layers.append(nn.Flatten())
    width = ch * size * size
    for out in fcs:
        layers += [nn.Linear(width, out)]
        layers += [nn.BatchNorm1d(out)] if batch_norm else []
        layers += [nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def mlp(dataset: str, widths: Sequence[int] = (256, 256)) -> nn.Sequential:
    """Normalize, flatten, ``widths`` hidden ReLU layers, FC 10."""
    c, h, w = _SHAPES[dataset]
    layers: list[nn.Module] = [_normalize(dataset), nn.Flatten()]
    fan_in = c * h * w
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)
        self.c2, self.b2 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


def resnet2b(dataset: str = "cifar10") -> nn.Sequential:
    """A small ResNet: conv 16 3×3/2, two basic blocks, average pool 4, FC 10."""
    ch, size, _ = _SHAPES[dataset]
    pooled = _out_size(size, 3, 2, 1) // 4
    return nn.Sequential(_normalize(dataset), nn.Conv2d(ch, 16, 3, 2, 1), nn.ReLU(),
                         BasicBlock(16), BasicBlock(16), nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(16 * pooled * pooled, 10))


MODELS: dict[str, tuple[Callable[[str], nn.Module], str]] = {
    "mlp": (mlp, "MLP 256-256"),
    "cnn3": (lambda d: conv_net(d, [(4, 4, 2), (8, 4, 2)], []), "tiny CNN3 (MILP-sized)"),
    "small_cnn": (lambda d: conv_net(d, [(16, 4, 2), (32, 4, 2)], [100]), "CNN small"),
    "cnn7": (lambda d: conv_net(d, [(64, 3, 1), (64, 3, 1), (128, 3, 2), (128, 3, 1),
                                    (128, 3, 1)], [512], batch_norm=True), "CNN7 with BN"),
    "conv2": (lambda d: conv_net(d, [(32, 4, 2), (32, 4, 2)], [200]), "ACE Conv2"),
    "conv3": (lambda d: conv_net(d, [(32, 3, 1), (32, 4, 2), (128, 4, 2)], [250]),
              "ACE/COLT Conv3"),
    "conv5": (lambda d: conv_net(d, [(64, 3, 1), (64, 3, 1), (128, 3, 2), (128, 3, 1),
                                     (128, 3, 1)], [512]), "ACE Conv5"),
    "resnet2b": (resnet2b, "ResNet with 2 basic blocks"),
}


def build_model(name: str, dataset: str = "mnist") -> nn.Module:
    """A fresh model ``name`` for ``dataset`` (``mnist`` or ``cifar10``)."""
    if name not in MODELS:
        raise InvalidValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    if dataset not in _SHAPES:
        raise InvalidValueError(f"unknown data set '{dataset}'; choose one of "
                                f"{', '.join(_SHAPES)}")
    return MODELS[name][0](dataset)
