"""The ``check_support`` pass: list *every* node a domain cannot handle, all at once.

It raises :class:`~certfx.errors.UnsupportedOpsError` naming each offending node with its op,
its ONNX node name or source line, and what to add; it changes nothing.

Example:
    >>> import torch
    >>> from certfx.frontends import load
    >>> gm = load(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), torch.zeros(1, 3))
    >>> check_support("box")(gm) is gm
    True
"""

from __future__ import annotations

import torch.fx as fx

from certfx import ops
from certfx.domains import get_domain
from certfx.errors import UnsupportedOp, UnsupportedOpsError
from certfx.passes.infra import GraphPass
from certfx.passes.mark_perturbed import PERTURBED_KEY
from certfx.passes.normalize import SOURCE_KEY, _where

__all__ = ["check_support"]


def _perturbed_outside(n: fx.Node) -> list[int]:
    """Positions of perturbed arguments where the op's traits allow only constants."""
    allowed = ops.traits(n.target).perturbed_args
    found = []
    for i, arg in enumerate(n.args):
        inside: list[fx.Node] = []
        fx.node.map_arg(arg, inside.append)
        if i not in allowed and any(a.meta.get(PERTURBED_KEY, False) for a in inside):
            found.append(i)
    return found


def check_support(domain: str) -> GraphPass:
    """A pass checking that domain ``domain`` has a rule for every perturbed node."""
    dom = get_domain(domain)

    def run(gm: fx.GraphModule) -> fx.GraphModule:
        problems: list[UnsupportedOp] = []
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "get_attr", "output"):
                continue
            where = _where(n) if (SOURCE_KEY in n.meta or "stack_trace" in n.meta) else ""
            if n.op != "call_function" or not ops.is_core_op(n.target):
                what = getattr(n.target, "__name__", str(n.target))
                problems.append(UnsupportedOp(n.name, f"{n.op} {what}", where,
                                              "not a core op: map it onto certfx.ops in a pass "
                                              "(see examples/custom_pass.py)"))
                continue
            misplaced = _perturbed_outside(n)
            if misplaced:  # e.g. mul(x, x): a rule for a constant factor would be unsound
                problems.append(UnsupportedOp(
                    n.name, n.target.__name__, where,
                    f"argument(s) {misplaced} of {n.target.__name__} must be constant but are "
                    "perturbed: use ops.product for a product of two perturbed tensors "
                    "(and ops.reciprocal for a perturbed divisor)"))
                continue
            if n.meta.get(PERTURBED_KEY, True) and not dom.supports(n.target):
                problems.append(UnsupportedOp(
                    n.name, n.target.__name__, where,
                    f"domain '{dom.name}' has no rule for {n.target.__name__}: register one "
                    f"with @{dom.prefix.upper()}.rule(ops.{n.target.__name__}) in "
                    f"{dom.module}, or choose another domain"))
        if problems:
            raise UnsupportedOpsError(f"domain '{dom.name}' cannot handle the model", problems)
        return gm

    return GraphPass("check_support", run)
