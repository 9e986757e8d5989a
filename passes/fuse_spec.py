"""The ``fuse_spec`` pass: fold an output specification C-matrix into the last linear layer.

Bounding ``C (W z + b)`` as one affine layer with weight ``C W`` is tighter than bounding
``W z + b`` and then ``C`` (Gowal et al. 2018, elision of the last layer). The pass adds a
placeholder ``spec`` (default ``None``: the plain network) and replaces the final ``linear`` by
``spec_linear``; when the network does not end in a linear layer it appends ``apply_spec``.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> gm = fuse_spec(load(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.zeros(1, 3)))
    >>> [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    ['x', 'spec']
    >>> gm(torch.ones(1, 3), torch.tensor([[[1.0, -1.0]]])).shape
    torch.Size([1, 1])
"""

from __future__ import annotations

import torch.fx as fx

from certfx import ops
from certfx.passes.infra import graph_pass

__all__ = ["fuse_spec"]


@graph_pass("fuse_spec")
def fuse_spec(gm: fx.GraphModule) -> fx.GraphModule:
    """Add the ``spec`` input and fold it into the last layer (see module docstring)."""
    graph = gm.graph
    if any(n.op == "placeholder" and n.name == "spec" for n in graph.nodes):
        return gm  # already fused
    output = next(n for n in graph.nodes if n.op == "output")
    last = output.args[0]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        spec = graph.placeholder("spec", default_value=None)
    spec.meta.update({"certfx.perturbed": False})
    if isinstance(last, fx.Node) and last.target is ops.linear and len(last.users) == 1:
        x, weight, bias = (list(last.args) + [None])[:3]
        with graph.inserting_before(output):
            fused = graph.call_function(ops.spec_linear, (x, weight, bias, spec))
    else:
        with graph.inserting_before(output):
            fused = graph.call_function(ops.apply_spec, (last, spec))
    fused.meta.update({k: v for k, v in last.meta.items() if k != "certfx.shape"})
    output.args = (fused,)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
