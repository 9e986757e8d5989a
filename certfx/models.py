"""The model zoo: the papers' architectures, with the data set's normalization inside.

Every model starts with :class:`Normalize` (the mean and std of :data:`certfx.data.DATASETS`),
so inputs are images in ``[0, 1]`` and ε is in pixel space. ``build_model(name, dataset)``
adapts input channels and size to ``mnist`` (1×28×28), ``cifar10`` (3×32×32) or ``digits``
(1×8×8); every model has 10 outputs and works for every data set (a layer stack that would
shrink an image below 1×1, e.g. with other keyword arguments, raises :class:`ShapeError`).
"Conv c k×k/s" below is a 2-D convolution with ``c`` output channels, kernel ``k`` and stride
``s``; "FC n" a linear layer; every layer but the last is followed by ReLU.

* ``mlp`` — hidden widths ``(256, 256)`` by default (``widths=``).
* ``cnn3`` — TAPS's CNN3 (paper ``001``, Fig. 1 and App. D "a small CNN3"; the layers are not in
  the paper but in its code, ``cnn_3layer``): Conv 16 5×5/2 (padding 2), Conv 32 4×4/2
  (padding 1), FC 10. ``width=`` scales the channels (16, 32); ``width=1`` is the tiny
  ``cnn_3layer_tiny`` whose worst-case losses TAPS computes exactly with MILP (Fig. 6).
* ``small_cnn`` — the "small" CNN of Wong & Kolter (2018): Conv 16 4×4/2, Conv 32 4×4/2
  (padding 1), FC 100, FC 10; the CPU benchmarks' network. (CROWN-IBP's "DM-small" of Gowal et
  al. 2018 is similar but has Conv 32 4×4/1 without padding.)
* ``cnn7`` — CNN7 of Shi et al. (2021), used by SABR (``002``) and TAPS (``001`` App. D.3):
  Conv 64, 64, 128/2, 128, 128 (3×3, padding 1; stride 1 unless /2), FC 512, FC 10; every layer
  but the last followed by batch norm and ReLU (``batch_norm=False`` drops the batch norms).
* ``conv2``, ``conv3``, ``conv5`` — ACE (``000``) App. A, Table 3, padding 1 (as in ACE's code):
  Conv2 = Conv 32 4×4/2, Conv 32 4×4/2, FC 200; Conv3 = Conv 32 3×3/1, Conv 32 4×4/2,
  Conv 128 4×4/2, FC 250 (COLT's largest network, its released ``convmedbig_flat_2_2_4_250``);
  Conv5 = Conv 64 3×3/1, 64 3×3/1, 128 3×3/2, 128 3×3/1, 128 3×3/1, FC 512 (CROWN-IBP's
  DM-large); each then FC 10.
* ``colt_conv3`` — the network of the COLT paper's text (``003``, Sec. 6): Conv 32 4×4/2,
  Conv 128 4×4/2 (padding 1), FC 150, FC 10 (16,534 ReLUs on CIFAR-10; the paper says 16,544).
* ``resnet2b`` — a small ResNet: Conv 16 3×3/2, two basic blocks (conv-BN-ReLU-conv-BN plus the
  identity, ReLU), average pool 4, FC 10 (a benchmark network, not from the papers).

Example:
    >>> import torch
    >>> net = build_model("cnn3", "mnist")
    >>> tuple(net(torch.zeros(2, 1, 28, 28)).shape)
    (2, 10)
    >>> tuple(build_model("mlp", "digits", widths=(20,))(torch.zeros(1, 1, 8, 8)).shape)
    (1, 10)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certfx.data.datasets import DATASETS
from certfx.errors import InvalidValueError, ShapeError

__all__ = [
    "MODELS",
    "BasicBlock",
    "ModelInfo",
    "Normalize",
    "build_model",
    "cnn3",
    "cnn7",
    "colt_conv3",
    "conv2",
    "conv3",
    "conv5",
    "conv_net",
    "mlp",
    "resnet2b",
    "small_cnn",
]

# (out channels, kernel, stride, padding) of one convolution
ConvSpec = tuple[int, int, int, int]


class Normalize(nn.Module):
    """``(x − mean) / std`` per channel: the model's first layer, so ε stays in pixel space.

    Example:
        >>> import torch
        >>> Normalize([0.5], [0.25])(torch.ones(1, 1, 1, 1)).item()
        2.0
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _info(dataset: str) -> tuple[Normalize, tuple[int, int, int]]:
    if dataset not in DATASETS:
        raise InvalidValueError(f"unknown data set '{dataset}'; choose one of "
                                f"{', '.join(DATASETS)}")
    info = DATASETS[dataset]
    return Normalize(info.mean, info.std), info.input_shape


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_net(dataset: str, convs: Sequence[ConvSpec], fcs: Sequence[int],
             batch_norm: bool = False, classes: int = 10) -> nn.Sequential:
    """Normalize, the convolutions ``(channels, kernel, stride, padding)`` and the hidden fully
    connected widths, each followed by (batch norm and) ReLU, then a linear layer to ``classes``.

    Raises:
        ShapeError: when the convolutions shrink the data set's images below 1×1.

    Example:
        >>> net = conv_net("digits", [(4, 3, 1, 1)], [8])
        >>> [type(m).__name__ for m in net]
        ['Normalize', 'Conv2d', 'ReLU', 'Flatten', 'Linear', 'ReLU', 'Linear']
    """
    normalize, (ch, size, _) = _info(dataset)
    layers: list[nn.Module] = [normalize]
    for i, (out, kernel, stride, padding) in enumerate(convs):
        new = _out_size(size, kernel, stride, padding)
        if new < 1:
            raise ShapeError(f"convolution {i + 1} ({kernel}×{kernel}/{stride}, padding "
                             f"{padding}) gets {size}×{size} inputs on {dataset} and would "
                             f"output {new}×{new}; use a data set with larger images")
        layers += [nn.Conv2d(ch, out, kernel, stride, padding)]
        layers += [nn.BatchNorm2d(out)] if batch_norm else []
        layers += [nn.ReLU()]
        ch, size = out, new
    layers.append(nn.Flatten())
    width = ch * size * size
    for out in fcs:
        layers += [nn.Linear(width, out)]
        layers += [nn.BatchNorm1d(out)] if batch_norm else []
        layers += [nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def mlp(dataset: str = "mnist", widths: Sequence[int] = (256, 256)) -> nn.Sequential:
    """Normalize, flatten, the hidden ReLU layers ``widths``, FC 10."""
    return conv_net(dataset, [], widths)


def cnn3(dataset: str = "mnist", width: int = 16) -> nn.Sequential:
    """TAPS's CNN3: Conv ``width`` 5×5/2, Conv ``2·width`` 4×4/2, FC 10."""
    return conv_net(dataset, [(width, 5, 2, 2), (2 * width, 4, 2, 1)], [])


def small_cnn(dataset: str = "mnist") -> nn.Sequential:
    """Wong & Kolter's small CNN: Conv 16 4×4/2, Conv 32 4×4/2, FC 100, FC 10."""
    return conv_net(dataset, [(16, 4, 2, 1), (32, 4, 2, 1)], [100])


def cnn7(dataset: str = "cifar10", width: int = 64, linear_size: int = 512,
         batch_norm: bool = True) -> nn.Sequential:
    """CNN7 (Shi et al. 2021): Conv w, w, 2w/2, 2w, 2w (3×3), FC ``linear_size``, FC 10, BN."""
    convs = [(width, 3, 1, 1), (width, 3, 1, 1), (2 * width, 3, 2, 1), (2 * width, 3, 1, 1),
             (2 * width, 3, 1, 1)]
    return conv_net(dataset, convs, [linear_size], batch_norm=batch_norm)


def conv2(dataset: str = "cifar10") -> nn.Sequential:
    """ACE's Conv2: Conv 32 4×4/2, Conv 32 4×4/2, FC 200, FC 10."""
    return conv_net(dataset, [(32, 4, 2, 1), (32, 4, 2, 1)], [200])


def conv3(dataset: str = "cifar10") -> nn.Sequential:
    """ACE's Conv3 (= COLT's released largest network): Conv 32 3×3/1, Conv 32 4×4/2,
    Conv 128 4×4/2, FC 250, FC 10."""
    return conv_net(dataset, [(32, 3, 1, 1), (32, 4, 2, 1), (128, 4, 2, 1)], [250])


def conv5(dataset: str = "cifar10") -> nn.Sequential:
    """ACE's Conv5 (CROWN-IBP's DM-large): Conv 64, 64, 128/2, 128, 128 (3×3), FC 512, FC 10."""
    convs = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]
    return conv_net(dataset, convs, [512])


def colt_conv3(dataset: str = "cifar10") -> nn.Sequential:
    """The COLT paper's network (Sec. 6): Conv 32 4×4/2, Conv 128 4×4/2, FC 150, FC 10."""
    return conv_net(dataset, [(32, 4, 2, 1), (128, 4, 2, 1)], [150])


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU (3×3 convolutions, ``ch`` channels)."""

    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)
        self.c2, self.b2 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


def resnet2b(dataset: str = "cifar10") -> nn.Sequential:
    """A small ResNet: Conv 16 3×3/2, two basic blocks, average pool 4, FC 10."""
    normalize, (ch, size, _) = _info(dataset)
    pooled = _out_size(size, 3, 2, 1) // 4
    if pooled < 1:
        raise ShapeError(f"resnet2b needs images of at least 7×7, {dataset} has {size}×{size}")
    return nn.Sequential(normalize, nn.Conv2d(ch, 16, 3, 2, 1), nn.ReLU(),
                         BasicBlock(16), BasicBlock(16), nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(16 * pooled * pooled, 10))


@dataclass(frozen=True)
class ModelInfo:
    """A zoo entry: the builder ``(dataset, **kwargs) -> nn.Module`` and a one-line summary."""

    build: Callable[..., nn.Module]
    description: str


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo(mlp, "MLP, hidden widths (256, 256) (widths=)"),
    "cnn3": ModelInfo(cnn3, "TAPS's CNN3: Conv 16 5x5/2, Conv 32 4x4/2, FC 10 (width=)"),
    "small_cnn": ModelInfo(small_cnn, "Wong & Kolter's small CNN: Conv 16, Conv 32, FC 100"),
    "cnn7": ModelInfo(cnn7, "CNN7 with batch norm (Shi et al. 2021; SABR, TAPS)"),
    "conv2": ModelInfo(conv2, "ACE Conv2: Conv 32, Conv 32, FC 200"),
    "conv3": ModelInfo(conv3, "ACE Conv3 = COLT's released largest: Conv 32, 32, 128, FC 250"),
    "conv5": ModelInfo(conv5, "ACE Conv5 = CROWN-IBP DM-large: Conv 64,64,128,128,128, FC 512"),
    "colt_conv3": ModelInfo(colt_conv3, "COLT paper Sec. 6: Conv 32, Conv 128, FC 150"),
    "resnet2b": ModelInfo(resnet2b, "small ResNet: Conv 16, two basic blocks, FC 10"),
}


def build_model(name: str, dataset: str = "mnist", **kwargs: object) -> nn.Module:
    """A fresh model ``name`` of :data:`MODELS` for ``dataset`` (``mnist``, ``cifar10``,
    ``digits``); ``kwargs`` go to its builder (e.g. ``widths=`` for ``mlp``).

    Raises:
        InvalidValueError: an unknown model, data set or keyword argument.
        ShapeError: the architecture does not fit the data set's image size.
    """
    if name not in MODELS:
        raise InvalidValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    if dataset not in DATASETS:
        raise InvalidValueError(f"unknown data set '{dataset}'; choose one of "
                                f"{', '.join(DATASETS)}")
    build = MODELS[name].build
    accepted = list(inspect.signature(build).parameters)[1:]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "no options"
        raise InvalidValueError(f"model '{name}' has no option {', '.join(unknown)}; it takes "
                                f"{takes}")
    return build(dataset, **kwargs)
