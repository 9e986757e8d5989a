"""Every VNN-COMP network in ``shared/benchmarks/vnncomp`` loads, and its canonical graph agrees
with onnxruntime on random inputs from the input box of one of the benchmark's properties."""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import certfx

ROOT = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/vnncomp"
MODELS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.onnx")) if ROOT.is_dir() \
    else []
_BOUND = re.compile(r"\(\s*(<=|>=)\s+(\S+)\s+(\S+?)\s*\)")


@functools.cache
def _properties() -> dict[str, str]:
    """The first VNN-LIB property listed for each network in ``ground_truth.csv``."""
    table: dict[str, str] = {}
    with open(ROOT / "ground_truth.csv", newline="") as f:
        for row in csv.DictReader(f):
            table.setdefault(_clean(row["onnx"]), _clean(row["vnnlib"]))
    return table


def _clean(path: str) -> str:
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def _input_box(onnx_path: str, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry input bounds from the property (the union of its boxes); [0, 1] without one."""
    low, high = np.full(numel, np.inf), np.full(numel, -np.inf)
    prop = _properties().get(onnx_path)
    if prop is not None and (ROOT / prop).is_file():
        for op, a, b in _BOUND.findall((ROOT / prop).read_text()):
            if a.startswith("X_"):
                index, value, upper = int(a[2:]), float(b), op == "<="
            elif b.startswith("X_"):
                index, value, upper = int(b[2:]), float(a), op == ">="
            else:
                continue
            if upper:
                high[index] = max(high[index], value)
            else:
                low[index] = min(low[index], value)
    unset = ~np.isfinite(low) | ~np.isfinite(high)
    low[unset], high[unset] = 0.0, 1.0
    return low, high


@pytest.mark.skipif(not MODELS, reason=f"no VNN-COMP models under {ROOT}")
@pytest.mark.parametrize("onnx_path", MODELS)
def test_vnncomp_model_matches_onnxruntime(onnx_path: str) -> None:
    path = ROOT / onnx_path
    gm = certfx.load(path)
    shape = gm.meta["certfx.input_shape"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # old models list their weights as inputs: ort warns
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    onnx_input = sess.get_inputs()[0]
    batched = len(onnx_input.shape) == len(shape) + 1

    numel = int(np.prod(shape))
    low, high = _input_box(onnx_path, numel)
    rng = np.random.default_rng(0)
    x = (low + (high - low) * rng.random((3, numel))).astype(np.float32).reshape(3, *shape)

    got = gm(torch.from_numpy(x)).detach().numpy()
    want = np.stack([
        sess.run(None, {onnx_input.name: x[i:i + 1] if batched else x[i]})[0].reshape(
            got.shape[1:]) for i in range(len(x))])
    scale = max(float(np.abs(want).max()), 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
