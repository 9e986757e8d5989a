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

import dataclasses
from typing import Any

import torch.fx as fx

from certfx.domains import get_domain
from certfx.errors import CertfxError
from certfx.passes.check_support import check_support
from certfx.passes.infra import GraphPass
from certfx.passes.mark_perturbed import PERTURBED_KEY

__all__ = ["lower", "DOMAIN_KEY"]

DOMAIN_KEY = "certfx.domain"


def lower(domain: str, options: Any = None) -> GraphPass:
    """A pass that turns a canonical graph into the generated bound module of ``domain``.

    Args:
        domain: the domain's name.
        options: an instance of the domain's options dataclass (``Domain.options``, e.g.
            :class:`~certfx.domains.zonotope.ZonotopeOptions`); its fields are written into the
            generated code as keyword arguments of the input rule.

    Raises:
        CertfxError: for options of another type than the domain's.
    """
    dom = get_domain(domain)
    input_kwargs: dict[str, Any] = {}
    if options is not None:
        if dom.options is None or not isinstance(options, dom.options):
            wanted = dom.options.__name__ if dom.options is not None else "no options"
            raise CertfxError(f"domain '{dom.name}' takes {wanted}, got "
                              f"{type(options).__name__}")
        input_kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}

    def run(gm: fx.GraphModule) -> fx.GraphModule:
        check_support(dom.name)(gm)
        if dom.lowering is not None:  # e.g. back-substitution: whole backward passes
            out = dom.lowering(gm, options)
            out.meta[DOMAIN_KEY] = dom.name
            return out
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        lo, hi = graph.placeholder("lower"), graph.placeholder("upper")
        for extra in placeholders[1:]:
            env[extra] = graph.placeholder(extra.name, default_value=extra.meta.get(
                "certfx.default", None))
        kwargs = dict(input_kwargs)
        if dom.ball_input:  # the ℓ2 ball of an L2Ball input spec, when there is one
            kwargs["ball"] = graph.placeholder("ball", default_value=None)
        env[placeholders[0]] = graph.call_function(dom.input_rule, (lo, hi), kwargs)
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
