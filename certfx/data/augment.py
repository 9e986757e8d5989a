"""Augmentation and batching of image tensors already in memory.

:class:`RandomCropFlip` is TAPS's CIFAR-10 augmentation (paper ``001``, App. D.2): a random
32×32 crop of the image padded by 2 pixels at every margin, and a random horizontal flip.
:func:`batches` cuts a data set into (shuffled, augmented) batches. Both take an optional
``torch.Generator`` for reproducible draws and run on the tensors' device.

Example:
    >>> import torch
    >>> from certfx.data import ImageDataset
    >>> data = ImageDataset(torch.rand(5, 3, 4, 4), torch.arange(5), "toy", "train", "memory")
    >>> aug = RandomCropFlip(size=4, padding=1)
    >>> gen = torch.Generator().manual_seed(0)
    >>> [tuple(x.shape) for x, y in batches(data, 2, shuffle=True, generator=gen, augment=aug)]
    [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from certfx.data.datasets import ImageDataset
from certfx.errors import InvalidValueError, ShapeError

__all__ = ["RandomCropFlip", "batches"]


class RandomCropFlip:
    """A random ``size``×``size`` crop of the batch padded by ``padding`` pixels at every margin,
    then a random horizontal flip with probability 1/2; one draw per image, all in one gather.

    TAPS (paper ``001``, App. D.2) trains CIFAR-10 with padding 2, crop 32 and flips. The paper
    does not say how the margin is filled; ``padding_mode="edge"`` (the default) repeats the
    border pixels as TAPS's released loader does (torchvision ``RandomCrop(32, 2,
    padding_mode='edge')``), ``"zeros"`` fills with black.

    Example:
        >>> import torch
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> out = RandomCropFlip(size=4, padding=0)(x, torch.Generator().manual_seed(1))
        >>> torch.equal(out, x) or torch.equal(out, x.flip(-1))
        True
    """

    def __init__(self, size: int = 32, padding: int = 2, flip: bool = True,
                 padding_mode: str = "edge"):
        if size < 1 or padding < 0:
            raise InvalidValueError(f"crop size must be >= 1 and padding >= 0, got {size}, "
                                    f"{padding}")
        if padding_mode not in ("edge", "zeros"):
            raise InvalidValueError(f"padding_mode must be 'edge' or 'zeros', got "
                                    f"{padding_mode!r}")
        self.size, self.padding, self.flip, self.padding_mode = size, padding, flip, padding_mode

    def __repr__(self) -> str:
        return (f"RandomCropFlip(size={self.size}, padding={self.padding}, flip={self.flip}, "
                f"padding_mode={self.padding_mode!r})")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch ``(N, C, H, W)``; draws come from ``generator`` (on any device)."""
        if x.dim() != 4:
            raise ShapeError(f"RandomCropFlip takes a batch (N, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        n, c, h, w = x.shape
        p, s = self.padding, self.size
        if s > h + 2 * p or s > w + 2 * p:
            raise ShapeError(f"crop {s}×{s} is larger than the padded image "
                             f"{h + 2 * p}×{w + 2 * p}")
        if p:
            x = F.pad(x, (p, p, p, p), mode="replicate" if self.padding_mode == "edge"
                      else "constant")
        dev = generator.device if generator is not None else torch.device("cpu")
        oy = torch.randint(0, h + 2 * p - s + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, w + 2 * p - s + 1, (n,), generator=generator, device=dev)
        steps = torch.arange(s, device=dev).expand(n, s)
        if self.flip:  # a flipped crop reads its columns right to left
            flipped = torch.rand(n, generator=generator, device=dev) < 0.5
            steps = torch.where(flipped[:, None], steps.flip(-1), steps)
        rows = (oy[:, None] + torch.arange(s, device=dev)).to(x.device)
        cols = (ox[:, None] + steps).to(x.device)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return x[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def batches(data: ImageDataset | tuple[Tensor, Tensor], batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None,
            augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` batches of ``data`` in order or shuffled by ``generator``, each
    passed through ``augment(images, generator)`` when given (e.g. :class:`RandomCropFlip`)."""
    if batch_size < 1:  # checked now, not at the first batch
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    images, labels = (data.images, data.labels) if isinstance(data, ImageDataset) else data
    n = int(labels.shape[0])
    if shuffle:
        dev = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=dev).to(labels.device)
    else:
        order = torch.arange(n, device=labels.device)
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            x = images[index]
            yield (augment(x, generator) if augment is not None else x), labels[index]

    return generate()
