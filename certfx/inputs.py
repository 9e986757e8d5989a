"""Reading user data files (input batches, labels) and writing result files atomically.

Inputs come from ``.npy`` or ``.pt`` files holding one tensor of shape ``(N, *input_shape)`` or
a single example ``input_shape``; labels from ``.npy``/``.pt`` files or a list of integers.
Every problem (missing file, wrong shape, NaN, values outside the valid input range) raises a
:class:`~certfx.errors.CertfxError` subclass that says what to do.

Example:
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/x.npy"
    >>> np.save(path, np.full((2, 3), 0.5, np.float32))
    >>> read_inputs(path, (3,)).shape
    torch.Size([2, 3])
    >>> read_inputs(path, (4,))
    Traceback (most recent call last):
    ...
    certfx.errors.ShapeError: inputs in x.npy have shape (2, 3); the model takes (N, 4) or (4)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from certfx.errors import CertfxError, InvalidValueError, ShapeError
from certfx.specs import check_finite

__all__ = ["read_tensor", "read_inputs", "read_labels", "check_range", "write_json_atomic",
           "write_text_atomic", "write_bytes_atomic"]

SUFFIXES = (".npy", ".pt", ".pth")


def read_tensor(path: str | os.PathLike[str], what: str = "input") -> Tensor:
    """The one array stored in a ``.npy`` or ``.pt`` file, as a tensor."""
    path = Path(path)
    if not path.is_file():
        raise CertfxError(f"{what} file '{path}' does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CertfxError(f"{what} file '{path.name}' must be a .npy or .pt file, not "
                          f"'{suffix or 'no suffix'}'")
    try:
        if suffix == ".npy":
            value: Any = np.load(path, allow_pickle=False)
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files raise ValueError, UnpicklingError, EOFError, …
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CertfxError(f"cannot read {what} file '{path.name}' ({type(err).__name__}: "
                          f"{first}); it must hold one array saved with numpy.save or "
                          "torch.save") from err
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise CertfxError(f"{what} file '{path.name}' holds {value.dtype} data; numbers "
                              "are needed")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Tensor):
        return value.detach()
    raise CertfxError(f"{what} file '{path.name}' holds a {type(value).__name__}, not one "
                      "tensor; save a single tensor with torch.save(x, path)")


def read_inputs(path: str | os.PathLike[str], input_shape: Sequence[int],
                dtype: torch.dtype = torch.float32) -> Tensor:
    """A batch ``(N, *input_shape)`` of finite inputs from ``path`` (a single example gets a
    batch dim).

    Raises:
        ShapeError: the stored array fits neither ``(N, *input_shape)`` nor ``input_shape``.
        InvalidValueError: NaN or inf entries.
    """
    x = read_tensor(path, "input")
    shape = tuple(int(d) for d in input_shape)
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    elif tuple(x.shape[1:]) != shape:
        want = ", ".join(map(str, shape))
        raise ShapeError(f"inputs in {Path(path).name} have shape {tuple(x.shape)}; the model "
                         f"takes (N, {want}) or ({want})")
    if x.shape[0] == 0:
        raise ShapeError(f"{Path(path).name} holds no inputs (batch size 0)")
    x = x.to(dtype)
    check_finite(x, f"input file {Path(path).name}")
    return x


def check_range(x: Tensor, lower: float | None, upper: float | None, what: str) -> None:
    """Raise :class:`InvalidValueError` when ``x`` leaves the valid range ``[lower, upper]``."""
    lo, hi = float(x.min()), float(x.max())
    if (lower is not None and lo < lower) or (upper is not None and hi > upper):
        raise InvalidValueError(
            f"{what} lie in [{lo:g}, {hi:g}], outside the valid input range [{lower}, {upper}]; "
            "rescale them (e.g. divide pixel values by 255) or set --lower/--upper")


def read_labels(source: str | os.PathLike[str] | Sequence[int], count: int) -> Tensor:
    """``count`` class labels (int64) from a ``.npy``/``.pt`` file or a list of integers."""
    if isinstance(source, (str, os.PathLike)):
        y = read_tensor(source, "labels").reshape(-1)
        name = Path(source).name
    else:
        y, name = torch.as_tensor(list(source)), "--y"
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise InvalidValueError(f"labels in {name} must be integer class indices")
    if y.dtype == torch.bool:
        raise InvalidValueError(f"labels in {name} must be integer class indices, not booleans")
    if y.numel() != count:
        raise ShapeError(f"{y.numel()} labels in {name} for {count} inputs; give one label "
                         "per input")
    return y.to(torch.int64)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, _dumps(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so that
    ``path`` is either untouched or complete."""
    _write_atomic(path, text, "w")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_text_atomic`)."""
    _write_atomic(path, data, "wb")


def _write_atomic(path: str | os.PathLike[str], data: str | bytes, mode: str) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise CertfxError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dumps(data: Any) -> str:
    """JSON with one line per top-level key, and one line per row of a list of lists."""
    if not isinstance(data, dict):
        return json.dumps(data) + "\n"
    items = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            rows = ",\n  ".join(json.dumps(v) for v in value)
            items.append(f" {json.dumps(key)}: [\n  {rows}\n ]")
        else:
            items.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(items) + "\n}\n"
