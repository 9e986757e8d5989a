"""``expose``: make a graph also return some of its intermediate values.

Certified training reads more than the final bounds: Shi et al.'s (2021) regularizers need the
interval bounds of every ReLU's input. ``expose(names)`` rewrites a graph's output ``out`` into
``(out, (v_1, …, v_n))`` for the nodes named ``names`` — on a generated bound module these are the
abstract elements at those nodes (``lower`` keeps the canonical node names). The values are
computed anyway, so nothing runs twice.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> from certfx.passes import lower
    >>> gm = load(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), torch.zeros(1, 3))
    >>> relu_input = next(n for n in gm.graph.nodes if n.name.startswith("relu")).args[0].name
    >>> box = expose([relu_input])(lower("box")(gm))
    >>> out, (pre,) = box(torch.zeros(1, 3), torch.ones(1, 3))
    >>> bool((pre.lower <= pre.upper).all()), tuple(pre.lower.shape)
    (True, (1, 2))
"""

from __future__ import annotations

from collections.abc import Sequence

from certfx.passes.infra import GraphPass, clone_graph_module
from torch import fx

from certfx.errors import CertfxError

__all__ = ["expose"]


def expose(names: Sequence[str]) -> GraphPass:
    """A pass returning ``(output, tuple of the values of the nodes named names)``."""
    wanted = list(names)

    def run(gm: fx.GraphModule) -> fx.GraphModule:
        out = clone_graph_module(gm)
        nodes = {n.name: n for n in out.graph.nodes}
        missing = [name for name in wanted if name not in nodes]
        if missing:
            raise CertfxError(f"expose: no node named {', '.join(missing)} in the graph; its "
                              f"nodes are {', '.join(nodes)}")
        (output,) = [n for n in out.graph.nodes if n.op == "output"]
        extra = tuple(nodes[name] for name in wanted)
        output.args = ((output.args[0], extra),)
        out.recompile()
        return out

    return GraphPass(f"expose[{', '.join(wanted)}]", run)
