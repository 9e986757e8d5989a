"""The test networks exported to ONNX: the canonical graph matches onnxruntime, and the interval
bounds are sound (sampled through onnxruntime) and equal to those of the PyTorch module."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

import certfx
from tests.models import NETWORKS

ort = pytest.importorskip("onnxruntime")
# The TorchScript-based exporter (dynamo=False) warns that it is deprecated; it still works.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _export(net: torch.nn.Module, shape: tuple[int, ...], dynamic: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
    torch.onnx.export(net, torch.zeros(1, *shape), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes=axes, opset_version=13)
    return onnx.load_from_string(buffer.getvalue())


def _run_ort(model: onnx.ModelProto, x: torch.Tensor, dynamic: bool) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = [x] if dynamic else [x[i:i + 1] for i in range(x.shape[0])]
    outs = [session.run(None, {"x": b.numpy().astype(np.float32)})[0] for b in batches]
    return torch.from_numpy(np.concatenate(outs))


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "batch-1"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_onnx_network_matches_onnxruntime_and_bounds_are_sound(name: str, dynamic: bool) -> None:
    make, shape = NETWORKS[name]
    net = make().eval().requires_grad_(False)
    model = _export(net, shape, dynamic)
    gm = certfx.load(model)
    x = torch.rand(4, *shape)
    torch.testing.assert_close(gm(x), _run_ort(model, x, dynamic), rtol=1e-4, atol=1e-5)

    eps = 0.03
    cm = certfx.compile(model, input_spec=certfx.LinfBall(eps, 0.0, 1.0))
    lo, hi = cm.certified_forward(x[:2])
    ref = certfx.compile(net, input_spec=certfx.LinfBall(eps, 0.0, 1.0),
                         example_input=torch.zeros(1, *shape)).certified_forward(x[:2])
    torch.testing.assert_close(lo, ref.lower, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hi, ref.upper, rtol=1e-4, atol=1e-5)
    for i in range(2):
        xl, xh = cm.input_bounds(x[i:i + 1])
        pts = xl + torch.rand(64, *shape) * (xh - xl)
        out = _run_ort(model, pts, dynamic)
        assert bool((out >= lo[i] - 1e-4).all() and (out <= hi[i] + 1e-4).all())
