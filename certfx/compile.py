"""``certfx.compile``: a model plus a domain and specifications to a :class:`CertifiedModule`.

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> cm = certfx.compile(net, domain="box", input_spec=certfx.LinfBall(0.1),
    ...                     example_input=torch.zeros(1, 2))
    >>> x = torch.full((4, 2), 0.5)
    >>> lo, hi = cm.certified_forward(x)
    >>> bool((lo <= cm(x)).all() and (cm(x) <= hi).all())
    True
    >>> cm.certified_forward(x, y=torch.zeros(4, dtype=torch.long)).shape
    torch.Size([4, 1])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from certfx.errors import ShapeError
from certfx.specs import InputSpec, LinfBall, Margin, check_finite

__all__ = ["CertifiedModule", "compile", "LOWER_ONLY_KEY"]

# meta key of generated modules whose forward takes ``bound_upper=False`` (lower bounds only)
LOWER_ONLY_KEY = "certfx.lower_only_arg"


class CertifiedModule(nn.Module):
    """A network together with its generated bound computation.

    ``forward(x)`` is the network itself; ``certified_forward(x, y=None)`` returns the domain's
    bounds on the logits over the input set around ``x`` (an element with ``.lower`` and
    ``.upper``; it unpacks as ``lo, hi``), or, given labels ``y``, lower bounds on the margins
    ``logit_y − logit_j`` of shape ``(batch, classes − 1)`` (positive everywhere = certified).

    Attributes:
        network: the canonical graph with the output specification folded in.
        bounds: the generated bound module (``print(cm.code)`` shows its code).
        domain: the domain's name.
        input_spec: the input set (``LinfBall``, ``Box``).
        output_spec: the output specification (``Margin``).
    """

    def __init__(self, network: fx.GraphModule, bounds: fx.GraphModule, domain: str,
                 input_spec: InputSpec, output_spec: Margin):
        super().__init__()
        self.network = network
        self.bounds = bounds
        self.domain = domain
        self.input_spec = input_spec
        self.output_spec = output_spec
        self.input_shape: tuple[int, ...] = tuple(network.meta["certfx.input_shape"])
        self.output_shape: tuple[int, ...] = tuple(network.meta["certfx.output_shape"])
        self.num_outputs = math.prod(self.output_shape)
        # Back-substitution modules also take the ℓ2 ball of an L2Ball/LpBall input spec.
        self.takes_ball = any(n.op == "placeholder" and n.name == "ball"
                              for n in bounds.graph.nodes)

    @property
    def code(self) -> str:
        """The Python code of the generated bound computation, followed by that of the
        generated modules it calls (``self.<name>``: e.g. back-substitution passes run in
        chunks)."""
        parts = [self.bounds.code]
        for name, sub in self.bounds.named_modules():
            if name and isinstance(sub, fx.GraphModule):
                parts.append(f"# self.{name}:{sub.code}")
        return "\n".join(parts)

    def forward(self, x: Tensor) -> Tensor:
        """The network's output on a batch ``x``."""
        self._check_input(x)
        return self.network(x)

    def input_bounds(self, x: Tensor, eps: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The input set's elementwise bounds around ``x`` (``eps`` overrides a ball's radius)."""
        self._check_input(x, finite=False)  # the input spec checks the values itself
        return self._spec(eps).bounds(x)

    def _spec(self, eps: float | Tensor | None) -> InputSpec:
        spec = self.input_spec
        if eps is not None:
            if not hasattr(spec, "with_eps"):
                raise TypeError("eps can only be overridden for a ball input spec (LinfBall, "
                                "L2Ball, LpBall)")
            spec = spec.with_eps(eps)
        return spec

    def _ball_kwargs(self, x: Tensor, eps: float | Tensor | None) -> dict[str, Any]:
        """``ball=(center, radius)`` for modules that take it, with an ℓ2/ℓp input spec."""
        spec = self._spec(eps)
        if self.takes_ball and hasattr(spec, "ball"):
            return {"ball": spec.ball(x)}
        return {}

    def certified_forward(self, x: Tensor, y: Tensor | None = None,
                          eps: float | Tensor | None = None) -> Any:
        """Bounds over the input set around ``x``; see the class docstring.

        Args:
            x: a batch ``(batch, *input_shape)``.
            y: optional labels ``(batch,)``; then margin lower bounds are returned.
            eps: optional radius overriding the input ball's (e.g. for ε-annealing).
        """
        lo, hi = self.input_bounds(x, eps)
        ball = self._ball_kwargs(x, eps)
        if y is None:
            return self.bounds(lo, hi, **ball)
        spec = self.output_spec.matrix(y.to(x.device) if isinstance(y, Tensor) else
                                       torch.as_tensor(y, device=x.device),
                                       self.num_outputs, dtype=x.dtype)
        if spec.shape[0] != x.shape[0]:
            raise ShapeError(f"{spec.shape[0]} labels for a batch of {x.shape[0]} inputs")
        if self.bounds.meta.get(LOWER_ONLY_KEY):  # skip the upper bounds nobody reads
            return self.bounds(lo, hi, spec, bound_upper=False, **ball).lower
        return self.bounds(lo, hi, spec, **ball).lower

    def _check_input(self, x: Tensor, finite: bool = True) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a tensor input, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            hint = (" (add the batch dim: x.unsqueeze(0))"
                    if tuple(x.shape) == self.input_shape else "")
            raise ShapeError(f"input of shape {tuple(x.shape)} does not match the model's input "
                             f"(batch, {', '.join(map(str, self.input_shape))}){hint}")
        if finite:
            check_finite(x, "input x")


def _with_l2_input(domain: str, options: Any, input_spec: InputSpec) -> Any:
    """Domain options told that the input set is also an ℓ2 ball (``L2Ball``/``LpBall``), for
    domains whose options have an ``l2_input`` field (back-substitution)."""
    import dataclasses

    from certfx.domains import get_domain

    cls = get_domain(domain).options
    if not hasattr(input_spec, "ball") or cls is None or "l2_input" not in {
            f.name for f in dataclasses.fields(cls)}:
        return options
    return dataclasses.replace(options if options is not None else cls(), l2_input=True)


def compile(model: Any, domain: str = "box", input_spec: InputSpec | None = None,  # noqa: A001
            output_spec: Margin | None = None, example_input: Tensor | None = None,
            dump: Any = False, domain_options: Any = None) -> CertifiedModule:
    """Compile a model into a :class:`CertifiedModule` for ``domain``.

    Args:
        model: an ``nn.Module`` (with ``example_input``), an ONNX model or path, or a canonical
            graph from :func:`certfx.load`.
        domain: ``"box"`` (aliases ``"interval"``, ``"ibp"``), ``"deepz"`` (alias
            ``"zonotope"``); more domains register themselves.
        input_spec: the input set; default ``LinfBall(eps=0, lower=0, upper=1)``.
        output_spec: the output specification; default :class:`Margin`.
        example_input: one input batch, required for an ``nn.Module``.
        dump: print/write the graph after every pass (see ``PassManager``).
        domain_options: the domain's options, e.g.
            ``ZonotopeOptions(max_error_terms=1000)`` for ``"deepz"``; written into the
            generated code.
    """
    from certfx.frontends import load
    from certfx.passes import PassManager, check_support, fuse_spec, lower
    from certfx.passes.infra import clone_graph_module

    canonical = load(model, example_input, dump=dump)
    input_spec = input_spec if input_spec is not None else LinfBall(0.0)
    domain_options = _with_l2_input(domain, domain_options, input_spec)
    output_spec = output_spec if output_spec is not None else Margin()
    # fuse_spec rewrites its graph in place: work on a copy that shares the parameters.
    network = PassManager([check_support(domain), fuse_spec], dump=dump).run(
        clone_graph_module(canonical))
    bounds = PassManager([lower(domain, domain_options)], dump=dump).run(network)
    return CertifiedModule(network, bounds, bounds.meta["certfx.domain"], input_spec,
                           output_spec)
