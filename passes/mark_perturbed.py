"""The ``mark_perturbed`` pass: which nodes depend on the perturbed input.

``node.meta["certfx.perturbed"]`` is ``True`` for the input and every node that (transitively)
reads it, ``False`` for constants. Domains lower only perturbed nodes to abstract rules.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> gm = load(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.zeros(1, 3))
    >>> [(n.name, n.meta["certfx.perturbed"]) for n in gm.graph.nodes][:3]
    [('x', True), ('m0_weight', False), ('m0_bias', False)]
"""

from __future__ import annotations

import torch.fx as fx

from certfx.passes.infra import graph_pass

__all__ = ["mark_perturbed", "PERTURBED_KEY"]

PERTURBED_KEY = "certfx.perturbed"


@graph_pass("mark_perturbed")
def mark_perturbed(gm: fx.GraphModule) -> fx.GraphModule:
    """Mark every node with whether it depends on the (first) placeholder."""
    first_input = True
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta[PERTURBED_KEY] = first_input
            first_input = False
        elif n.op == "get_attr":
            n.meta[PERTURBED_KEY] = False
        else:
            n.meta[PERTURBED_KEY] = any(a.meta.get(PERTURBED_KEY, False)
                                        for a in n.all_input_nodes)
    return gm
