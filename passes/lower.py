"""The ``lower`` pass: generate the bound computation of a domain as a new GraphModule.

The generated module's ``forward(lower, upper, spec=None)`` builds the input element with the
domain's input rule, then calls one rule function per perturbed node, in graph order; constant
nodes stay plain tensor code. The result is ordinary PyTorch: ``print(gm.code)`` shows it, it runs
on the device of its inputs, autograd differentiates it, and it reads the very parameters of the
canonical graph (``get_attr`` of the same attributes), so gradients reach the user's model.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> gm = load(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), torch.zeros(1, 3))
    >>> bounds = lower("box")(gm)
    >>> "box_relu" in bounds.code
    True
    >>> out = bounds(torch.zeros(1, 3), torch.ones(1, 3))
    >>> bool((out.lower <= out.upper).all())
    True
"""

from __future__ import annotations

import torch.fx as fx

from certfx.domains import get_domain
from certfx.passes.check_support import check_support
from certfx.passes.infra import GraphPass
from certfx.passes.mark_perturbed import PERTURBED_KEY

__all__ = ["lower", "DOMAIN_KEY"]

DOMAIN_KEY = "certfx.domain"


def lower(domain: str) -> GraphPass:
    """A pass that turns a canonical graph into the generated bound module of ``domain``."""
    dom = get_domain(domain)

    def run(gm: fx.GraphModule) -> fx.GraphModule:
        check_support(dom.name)(gm)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        lo, hi = graph.placeholder("lower"), graph.placeholder("upper")
        for extra in placeholders[1:]:
            env[extra] = graph.placeholder(extra.name, default_value=extra.meta.get(
                "certfx.default", None))
        env[placeholders[0]] = graph.call_function(dom.input_rule, (lo, hi))
        env[placeholders[0]].name = "x"  # keep the generated code's names readable
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                graph.output(env[n.args[0]])
                continue
            if n.op == "get_attr":
                env[n] = graph.get_attr(str(n.target))
                continue
            target = dom.rule_for(n.target) if n.meta.get(PERTURBED_KEY, True) else n.target
            new = graph.call_function(target, fx.node.map_arg(n.args, env.__getitem__),
                                      fx.node.map_arg(n.kwargs, env.__getitem__))
            new.name = n.name
            new.meta.update(n.meta)
            env[n] = new
        out = fx.GraphModule(gm, graph, class_name=f"{dom.name.capitalize()}Bounds")
        out.meta.update(gm.meta)
        out.meta[DOMAIN_KEY] = dom.name
        return out

    return GraphPass(f"lower[{dom.name}]", run)
