"""The PyTorch frontend: trace an ``nn.Module`` with ``torch.fx`` and normalize it.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    >>> gm = trace_module(net, torch.zeros(1, 3))
    >>> gm.meta["certfx.input_shape"]
    (3,)
"""

from __future__ import annotations

import traceback

import torch
import torch.fx as fx
from torch import Tensor, nn

from certfx.errors import ShapeError, TraceError
from certfx.specs import check_finite

__all__ = ["trace_module", "trace_source"]


def trace_module(module: nn.Module, example_input: Tensor) -> fx.GraphModule:
    """Trace ``module`` symbolically and map it onto core ops (the ``normalize`` pass)."""
    from certfx.passes.normalize import normalize

    return normalize(example_input, batched=True,
                     context=f"normalize {type(module).__name__}")(trace_source(module,
                                                                                 example_input))


def trace_source(module: nn.Module, example_input: Tensor) -> fx.GraphModule:
    """Check the inputs and trace ``module`` with ``torch.fx`` (not yet normalized).

    Args:
        module: the network; it is not modified (its parameters are shared, not copied).
        example_input: one batch of inputs ``(batch, *shape)``, used for shapes only.

    Raises:
        TraceError: when ``torch.fx`` cannot trace the module (data-dependent control flow);
            the message names the offending line.
        ShapeError: when the module rejects the example input's shape.
    """
    if not isinstance(example_input, Tensor):
        raise ShapeError("example_input must be a tensor of shape (batch, *input_shape); "
                         "certfx needs it to know the input shape of an nn.Module")
    if example_input.dim() < 2:
        raise ShapeError(f"example_input has shape {tuple(example_input.shape)}; give it a "
                         "batch dimension first, e.g. x.unsqueeze(0)")
    check_finite(example_input, "example_input")
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if torch.is_floating_point(p):
            check_finite(p.detach(), f"model parameter '{name}'")
    try:
        tracer = fx.Tracer()
        tracer.record_stack_traces = True  # so errors can name the source line of a node
        graph = tracer.trace(module)
        traced = fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception as err:  # fx raises TraceError, TypeError, … for dynamic control flow
        raise TraceError(_trace_failure(module, err)) from err
    try:
        with torch.no_grad():
            module_was_training = module.training
            module.eval()
            try:
                module(example_input)
            finally:
                module.train(module_was_training)
    except Exception as err:
        raise ShapeError(f"the model rejects an input of shape {tuple(example_input.shape)}: "
                         f"{err}") from err
    return traced


def _trace_failure(module: nn.Module, err: Exception) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if "torch/fx" not in f.filename.replace("\\", "/")
            and "/torch/" not in f.filename.replace("\\", "/")]
    where = f" at {user[-1].filename}:{user[-1].lineno}: {user[-1].line}" if user else ""
    return (f"torch.fx cannot trace {type(module).__name__}{where} ({type(err).__name__}: "
            f"{err}). Data-dependent control flow (an `if` or loop on tensor values) cannot be "
            "traced: replace it with tensor ops (torch.where, masks), move it out of forward, "
            "or export the model to ONNX and load the .onnx file")
