"""The ``shape_prop`` pass: write each node's per-example shape into ``node.meta``.

``node.meta["certfx.shape"]`` is the shape *without* the batch dim (``(16, 14, 14)``), and
``node.meta["certfx.dtype"]`` the dtype, from one run on a zero input of batch size 1.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> gm = load(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.zeros(1, 3))
    >>> [n.meta["certfx.shape"] for n in gm.graph.nodes if n.op != "get_attr"]
    [(3,), (2,), (2,)]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from certfx.passes.infra import graph_pass

__all__ = ["shape_prop", "SHAPE_KEY", "DTYPE_KEY"]

SHAPE_KEY = "certfx.shape"
DTYPE_KEY = "certfx.dtype"


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor) and n.op != "get_attr":
            n.meta[SHAPE_KEY] = tuple(value.shape[1:])
            n.meta[DTYPE_KEY] = value.dtype
        return value


def _first_param_dtype(gm: fx.GraphModule) -> torch.dtype:
    for t in list(gm.parameters()) + list(gm.buffers()):
        if torch.is_floating_point(t):
            return t.dtype
    return torch.float32


@graph_pass("shape_prop")
def shape_prop(gm: fx.GraphModule) -> fx.GraphModule:
    """Record per-example shapes of all nodes (needs ``gm.meta["certfx.input_shape"]``)."""
    shape = gm.meta["certfx.input_shape"]
    params = list(gm.parameters()) + list(gm.buffers())
    device = params[0].device if params else torch.device("cpu")
    x = torch.zeros((1, *shape), dtype=_first_param_dtype(gm), device=device)
    with torch.no_grad():
        _Recorder(gm).run(x)
    for n in gm.graph.nodes:
        if n.op == "output" and isinstance(n.args[0], fx.Node):
            n.meta[SHAPE_KEY] = n.args[0].meta.get(SHAPE_KEY)
    return gm
