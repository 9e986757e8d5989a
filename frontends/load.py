"""``certfx.load``: any supported model object to a canonical graph, through the default passes.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> gm = load(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.zeros(1, 3))
    >>> gm.meta["certfx.input_shape"], gm.meta["certfx.output_shape"]
    ((3,), (2,))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from certfx.errors import ModelLoadError

__all__ = ["load"]


def load(obj: Any, example_input: Tensor | None = None, *,
         dump: bool | str | Path = False) -> fx.GraphModule:
    """Load a model as a canonical graph of core ops.

    Args:
        obj: an ``nn.Module``, an ``onnx.ModelProto``, or a path to an ``.onnx`` file.
        example_input: for an ``nn.Module``, one input batch ``(batch, *shape)`` (required);
            ignored for ONNX models, whose input shape comes from the file.
        dump: passed to :class:`~certfx.passes.PassManager` (print graphs after every pass).

    Returns:
        The canonical ``GraphModule`` after ``normalize``, ``fold_batchnorm``, ``shape_prop``
        and ``mark_perturbed``. ``gm.meta["certfx.input_shape"]`` is the per-example shape.

    Raises:
        ModelLoadError: missing/corrupt files, unsupported model objects.
        TraceError, UnsupportedOpsError, ShapeError, InvalidValueError: see the frontends.
    """
    from certfx.passes import default_pipeline, normalize

    if isinstance(obj, fx.GraphModule) and obj.meta.get("certfx.input_shape") is not None:
        return obj  # already canonical
    if isinstance(obj, nn.Module):
        from certfx.frontends.torch import trace_source

        if example_input is None:
            raise ModelLoadError("certfx.load(module) needs example_input, one batch of inputs "
                                 "such as torch.zeros(1, 3, 32, 32)")
        source = trace_source(obj, example_input)
        step = normalize(example_input, batched=True, context=f"normalize {type(obj).__name__}")
    elif isinstance(obj, (str, os.PathLike)) or type(obj).__name__ == "ModelProto":
        from certfx.frontends.onnx import onnx_source

        source, example, batched, name = onnx_source(obj)
        step = normalize(example, batched=batched, context=f"normalize {name}")
    else:
        raise ModelLoadError(f"cannot load a {type(obj).__name__}; pass an nn.Module, an "
                             "onnx.ModelProto or a path to an .onnx file")
    return default_pipeline(step, dump=dump).run(source)
