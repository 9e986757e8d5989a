"""Reference execution of ONNX files with onnxruntime, to check a canonical graph against them.

:func:`run_onnx` runs the original file on a batch given in certfx's batch-first convention,
whatever the file's own convention (a symbolic batch dim, a fixed batch of 1, or one unbatched
example): it feeds the batch whole or one example at a time and stacks the results.
:func:`compare_with_onnx` returns the largest absolute difference between the canonical graph
and onnxruntime on random inputs.

Example:
    >>> import tempfile, torch, onnx, certfx
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> import numpy as np
    >>> w = numpy_helper.from_array(np.ones((3, 2), np.float32), "W")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "tiny",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    >>> path = tempfile.mkdtemp() + "/tiny.onnx"
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    >>> onnx.save(model, path)
    >>> compare_with_onnx(certfx.load(path), path, samples=3) < 1e-5
    True
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import Tensor

from certfx.errors import CertfxError

__all__ = ["run_onnx", "compare_with_onnx"]


def _session(path: str | os.PathLike[str]):  # -> onnxruntime.InferenceSession
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise CertfxError("checking against the ONNX file needs onnxruntime; install it with "
                          "pip install onnxruntime (or pip install 'certfx[test]')") from err
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/… types
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CertfxError(f"onnxruntime {ort.__version__} cannot run {Path(path).name}: "
                          f"{text}") from err


def run_onnx(path: str | os.PathLike[str], x: Tensor) -> Tensor:
    """The ONNX file's output on a batch ``x`` of shape ``(batch, *input_shape)``, as a tensor
    ``(batch, *output_shape)`` computed by onnxruntime on the CPU."""
    session = _session(path)
    info = session.get_inputs()[0]
    dtype = _numpy_dtype(Path(path), info.name)
    dims = list(info.shape)
    per_example = x.dim() - 1
    if len(dims) == per_example:  # the file takes one unbatched example
        feeds = [x[i] for i in range(x.shape[0])]
        unbatched = True
    elif isinstance(dims[0], int) and dims[0] >= 1:  # a fixed batch size (normally 1)
        if x.shape[0] % dims[0]:
            raise CertfxError(f"the ONNX input has a fixed batch of {dims[0]}, which does "
                              f"not divide {x.shape[0]}")
        feeds = list(x.split(dims[0]))
        unbatched = False
    else:  # a symbolic batch dim
        feeds, unbatched = [x], False
    outputs = []
    for feed in feeds:
        (out,) = session.run(None, {info.name: feed.detach().cpu().numpy().astype(dtype)})
        out_t = torch.from_numpy(np.asarray(out))
        outputs.append(out_t.unsqueeze(0) if unbatched else out_t)
    return torch.cat(outputs)


def compare_with_onnx(gm: fx.GraphModule, path: str | os.PathLike[str], samples: int = 4,
                      seed: int = 0, low: float = 0.0, high: float = 1.0) -> float:
    """Largest ``|gm(x) − onnxruntime(x)|`` over ``samples`` inputs uniform in ``[low, high]``.

    Args:
        gm: the canonical graph of the file at ``path`` (from :func:`certfx.load`).
        path: the ``.onnx`` file.
        samples: how many random inputs to draw.
        seed: the random seed.
        low: smallest input value.
        high: largest input value.
    """
    shape = tuple(gm.meta["certfx.input_shape"])
    params = list(gm.parameters()) + list(gm.buffers())
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand((samples, *shape), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ours = gm(x.to(device=device, dtype=dtype)).double().cpu()
    ref = run_onnx(path, x).double()
    if ref.numel() != ours.numel():
        raise CertfxError(f"onnxruntime output has shape {tuple(ref.shape)}, the canonical "
                          f"graph {tuple(ours.shape)}")
    return float((ours.reshape(samples, -1) - ref.reshape(samples, -1)).abs().max())


def _numpy_dtype(path: Path, name: str) -> np.dtype:
    """The numpy dtype of the ONNX graph input ``name`` (float32 when unknown)."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        if value.name == name:
            try:
                return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
                    value.type.tensor_type.elem_type))
            except Exception:
                break
    return np.dtype(np.float32)
