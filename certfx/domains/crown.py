"""The back-substitution domains: DeepPoly, CROWN, CROWN-IBP and α-CROWN.

All four share the backward rules of :mod:`certfx.domains.linear_backward`, the shared
relaxation table and one code generator (:mod:`certfx.domains.linear_lowering`):

* ``"deeppoly"`` (Singh et al. 2019) and ``"crown"`` (Zhang et al. 2018): the bounds of every
  relaxed op's input by a full backward pass to the input (intersected with the interval
  bounds of that node, which cost little and are sometimes tighter), adaptive lower slopes by
  default. With the same slopes they are the same algorithm — DeepPoly's back-substitution
  *is* CROWN's bound propagation — so both names lower to the very same code.
* ``"crown-ibp"`` (Zhang et al. 2020, Sec. 3): intermediate bounds by interval propagation, the
  output's bounds by one backward pass. Differentiable: a certified-training loss.
* ``"alpha-crown"`` (Xu et al. 2021, "Fast and complete", Sec. 3.1): the lower lines of
  ReLU-like and S-shaped neurons become variables, one per neuron *and per output row*: weights
  ``α ∈ [0, 1]`` of the lowest and highest valid lower lines (for ReLU, ``α`` is the slope;
  for sigmoid and tanh, two per neuron and row: the positions of the lower and of the upper
  line's tangent points in their valid ranges),
  optimized by Adam to maximize the output's lower bounds (and minimize its upper bounds),
  starting from the CROWN slopes and keeping the best bound seen per output. Every ``α`` gives
  a sound bound, so the elementwise best over the steps is sound, and never looser than CROWN.

The generated modules take ``bound_upper=False`` to bound the outputs from below only (half
the output's backward pass; upper bounds ``+inf``): ``certified_forward(x, y)`` does so.

Options (``certfx.compile(..., domain_options=...)``):

* :class:`BacksubOptions` for deeppoly/crown/crown-ibp: ``slopes``, the lower-slope policy
  (:class:`~certfx.domains.linear.Slopes`: adaptive, zero, one, parallel, or (p, q)-random).
  It is the default of the generated module's ``slopes`` argument, so it can also be chosen
  per call: ``cm.bounds(lower, upper, spec, slopes=Slopes(SlopePolicy.ZERO))``.
* :class:`AlphaCrownOptions`: ``steps``, ``lr``, ``optimize_intermediate`` (also optimize the
  slopes of every intermediate backward pass, jointly for the output's bound) and the initial
  ``slopes``.
* Both have ``max_coefficients``: dense coefficients grow as (neurons of a node) × (size of
  every node behind it), so compiling fails early, naming the nodes, where a backward pass
  would form more than this many per example (CNN7's second conv layer would need 32 GiB).

α-CROWN's generated module is a small driver: ``self.intermediate`` (generated: the CROWN bounds
the output's backward pass needs) and ``self.passes`` (generated: that pass, taking the slopes
``alpha_out_<node>`` as inputs) are called by :func:`alpha_crown_optimize`, the Python loop of
Adam steps. The optimization itself runs without gradients to the model; where gradients are on,
one more pass with the chosen slopes (each output row's best) carries them, so α-CROWN bounds
are differentiable like CROWN's.

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    ...     _ = net[0].bias.zero_(); _ = net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    ...     _ = net[2].bias.zero_()
    >>> x, ball = torch.zeros(1, 2), certfx.LinfBall(1.0, lower=None, upper=None)
    >>> crown = certfx.compile(net, domain="crown", input_spec=ball, example_input=x)
    >>> lo, hi = crown.certified_forward(x); lo.item(), hi.item()
    (-3.0, 3.0)
    >>> zero = certfx.compile(net, domain="crown", input_spec=ball, example_input=x,
    ...                       domain_options=BacksubOptions(Slopes(SlopePolicy.ZERO)))
    >>> lo, hi = zero.certified_forward(x); lo.item(), hi.item()
    (-2.0, 2.0)
    >>> alpha = certfx.compile(net, domain="alpha-crown", input_spec=ball, example_input=x)
    >>> lo, hi = alpha.certified_forward(x); round(lo.item(), 4), round(hi.item(), 4)
    (-2.0, 2.0)
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from certfx.compile import LOWER_ONLY_KEY
from certfx.domains.base import Domain, expose_to_codegen, register_domain
from certfx.domains.interval import Interval
from certfx.domains.linear import LinearBounds, Slopes, lin_input, lin_slopes
from certfx.domains.linear_backward import BACK
from certfx.domains.linear_lowering import (
    ALPHA_KEY,
    DEFAULT_MAX_COEFFICIENTS,
    SPLIT_KEY,
    AlphaScope,
    IntermediateBounds,
    RuleTracer,
    emit_backsub,
)
from certfx.domains.relaxations import SlopePolicy

__all__ = [
    "BacksubOptions",
    "AlphaCrownOptions",
    "alpha_crown_optimize",
    "optimization_deadline",
    "DEEPPOLY",
    "CROWN",
    "CROWN_IBP",
    "ALPHA_CROWN",
    "Slopes",
    "SlopePolicy",
]


@dataclass(frozen=True)
class BacksubOptions:
    """Options of ``deeppoly``, ``crown`` and ``crown-ibp``.

    Attributes:
        slopes: the default lower-slope policy (per call: the ``slopes`` argument).
        max_coefficients: per example, the largest coefficient tensor a backward pass may
            form (intermediate passes run in chunks of rows within it; the output's pass fails
            to compile beyond; memory ≈ 4 bytes × batch × this × a few temporaries).
        patches: intermediate passes through convolutional chains keep local coefficients
            (:mod:`~certfx.domains.linear_patches`): the same bounds, far cheaper.
        l2_input: the input set is also an ℓ2 ball (set by ``certfx.compile`` for an
            ``L2Ball`` input spec): intermediate bounds always get a backward pass, whose
            dual-norm concretization the interval shortcut would miss.
    """

    slopes: Slopes = Slopes()
    max_coefficients: int = DEFAULT_MAX_COEFFICIENTS
    patches: bool = True
    l2_input: bool = False


@dataclass(frozen=True)
class AlphaCrownOptions:
    """Options of ``alpha-crown``.

    Attributes:
        steps: Adam steps (each one backward pass forward and back).
        lr: Adam's learning rate.
        optimize_intermediate: also optimize the slopes of the intermediate bounds' backward
            passes (one set per pass), recomputing every pass at every step; slower, tighter.
        slopes: the slopes the optimization starts from (CROWN's adaptive ones by default).
        max_coefficients, l2_input: as in :class:`BacksubOptions`.
    """

    steps: int = 20
    lr: float = 0.5
    optimize_intermediate: bool = False
    slopes: Slopes = Slopes()
    max_coefficients: int = DEFAULT_MAX_COEFFICIENTS
    l2_input: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0:
            raise ValueError(f"need steps >= 0 and lr > 0, got {self.steps}, {self.lr}")


def _backsub_lowering(intermediate: IntermediateBounds, class_name: str) -> Any:
    def lowering(gm: fx.GraphModule, options: BacksubOptions | None) -> fx.GraphModule:
        options = options or BacksubOptions()
        return emit_backsub(gm, intermediate, options.slopes, class_name=class_name,
                            max_coefficients=options.max_coefficients,
                            use_patches=options.patches, input_is_box=not options.l2_input)

    return lowering


# A time (``time.perf_counter()``) after which α-CROWN stops its Adam steps early: the best
# bounds so far are sound whatever the step. Set by callers with a budget (the cascade).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("certfx_alpha_deadline",
                                                                        default=None)


@contextmanager
def optimization_deadline(deadline: float | None) -> Iterator[None]:
    """Within the block, α-CROWN optimizations stop at the ``time.perf_counter()`` value
    ``deadline`` (``None``: no limit), returning the best bounds found by then.

    Example:
        >>> import time
        >>> with optimization_deadline(time.perf_counter() + 5.0):
        ...     _DEADLINE.get() is not None
        True
    """
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def alpha_crown_optimize(intermediate: fx.GraphModule | None, passes: fx.GraphModule,
                         lower: Tensor, upper: Tensor, *extras: Any, slopes: Slopes | None,
                         default_slopes: Slopes, bound_upper: bool = True,
                         alphas: tuple[tuple[str, int | None], ...], steps: int,
                         lr: float, ball: tuple[Tensor, Tensor] | None = None,
                         splits: Any = None, lagrange_lr: float = 0.0,
                         intermediate_out: list[Interval] | None = None,
                         start: Sequence[Tensor] | None = None,
                         weights_out: list[Tensor] | None = None) -> Interval:
    """α-CROWN's optimization loop around the generated modules (see the module docstring).

    Args:
        intermediate: returns the bounds ``passes`` takes (``None`` when ``passes`` computes
            them itself, with its own slopes: ``optimize_intermediate``).
        passes: returns ``(bounds, lower slopes used)`` given the slopes ``alpha_*``.
        lower, upper, extras: the generated modules' inputs (``extras``: ``spec``).
        slopes, default_slopes: the initial slope policy (``None``: the default).
        bound_upper: also bound (and tighten) the outputs from above.
        alphas: ``(name, rows)`` of each slope input of ``passes`` (rows ``None``: twice the
            number of outputs).
        steps, lr: Adam's steps and learning rate.
        ball: the ℓ2 ball ``(center, radius)`` of an ``L2Ball`` input spec, passed on.
        splits: a branch's restrictions of the relaxed ops' inputs
            (:func:`~certfx.domains.linear.lin_restrict`), passed on.
        lagrange_lr: with ``splits``, also optimize the Lagrange multipliers of the split
            constraints in the output's pass (β-CROWN's β, :func:`~certfx.domains.linear.
            lin_lagrange`; one per neuron and output row, from 0) at this learning rate.
        intermediate_out: with ``passes`` that also return the intermediate bounds (emitted
            with ``result="bounds+slopes+intermediate"``), filled with their intersection over
            all steps (each step's are sound, so their meet is): the tightest intermediate
            bounds of the optimization, for a branch and bound to start from.
        start: the variables to start from instead of the default slopes and zero
            multipliers: the slopes (one tensor per ``alphas`` entry), then the multipliers,
            as ``weights_out`` gives them — a branch warm-started from its parent's, as
            α,β-CROWN does. Any values give sound bounds: this only changes where Adam begins
            (with ``steps=0``: the bounds at ``start``, one pass).
        weights_out: filled with the variables at each row's best bound (that layout).
    """
    slopes = lin_slopes(slopes, default_slopes)
    kwargs: dict[str, Any] = {"ball": ball, "splits": splits}
    differentiable = torch.is_grad_enabled()
    lagrange = splits is not None and lagrange_lr > 0 and any(s is not None for s in splits)
    warm = bool(start)  # the default slopes' pass is then not needed
    best_lower = best_upper = None
    tightest: list[Interval] = []
    with torch.no_grad():
        fixed = tuple(intermediate(lower, upper, *extras, slopes=slopes, **kwargs)) \
            if intermediate else ()
        if not warm:
            first, init, *inner = passes(lower, upper, *fixed, *extras, slopes=slopes,
                                         bound_upper=bound_upper, **kwargs)
            best_lower, best_upper = first.lower, first.upper
            tightest = [Interval(b.lower.detach(), b.upper.detach())
                        for b in inner[0]] if inner else []

    def report() -> None:
        if intermediate_out is not None:
            intermediate_out[:] = tightest

    if not warm and ((not alphas and not lagrange) or steps == 0):
        report()
        if weights_out is not None:
            weights_out[:] = []
        return _with_gradient(intermediate, passes, lower, upper, extras, slopes, bound_upper,
                              kwargs, {}, best_lower, best_upper) if differentiable \
            else Interval(best_lower, best_upper)
    names = [name for name, _ in alphas]
    rows_of = [rows for _, rows in alphas]
    if warm:
        expected = len(alphas) + (2 * sum(s is not None for s in splits) if lagrange else 0)
        if len(start) != expected:
            raise ValueError(f"start: expected {expected} tensors (the slopes, then the "
                             f"multipliers), got {len(start)}")
        everything = [value.detach().clone().requires_grad_(True) for value in start]
        weights, multipliers = everything[:len(alphas)], everything[len(alphas):]
    else:
        outputs = best_lower[0].numel() * (2 if bound_upper else 1)
        weights = [s.expand(s.shape[0], rows or outputs, *s.shape[2:]).clone()
                   .requires_grad_(True) for s, (_, rows) in zip(init, alphas)]
        # the multipliers (λ, ν) of each restricted node, per output row: (batch, rows, *shape)
        multipliers = []
        if lagrange:
            for split in splits:
                if split is not None:
                    low = split[0]
                    multipliers += [low.new_zeros(low.shape[0], outputs, *low.shape[1:])
                                    .requires_grad_(True) for _ in range(2)]
        everything = weights + multipliers
    rows_of += [None] * len(multipliers)

    def call_kwargs(values: list[Tensor]) -> dict[str, Any]:
        named = dict(zip(names, values[:len(names)]))
        if lagrange:
            pairs, rest = [], iter(values[len(names):])
            for split in splits:
                pairs.append(None if split is None else (next(rest), next(rest)))
            named["multipliers"] = tuple(pairs)
        return named

    # the weights at each output row's best bound so far: a row's bound depends only on its own
    # weights where every slope is per output row (rows None); joint slopes keep the last ones
    best_weights = [w.detach().clone() for w in everything]
    groups = [{"params": weights, "lr": lr}] if weights else []
    if multipliers:
        groups.append({"params": multipliers, "lr": lagrange_lr})
    optimizer = torch.optim.Adam(groups)
    for step in range(steps + 1):
        with torch.set_grad_enabled(step < steps):  # the last step only evaluates
            out, _, *inner = passes(lower, upper, *fixed, *extras, slopes=slopes,
                                    bound_upper=bound_upper, **kwargs,
                                    **call_kwargs(everything))
            if step < steps:  # maximize every lower bound, minimize every upper bound
                loss = (out.upper.sum() if bound_upper else 0.0) - out.lower.sum()
                grads = torch.autograd.grad(loss, everything, allow_unused=True)
        if best_lower is None:  # warm: the first step's bounds are the first seen
            best_lower, best_upper = out.lower.detach(), out.upper.detach()
            tightest = [Interval(b.lower.detach(), b.upper.detach())
                        for b in inner[0]] if inner else []
        improved = (out.lower.detach() > best_lower).flatten(1)
        if bound_upper:
            improved = torch.cat([improved, (out.upper.detach() < best_upper).flatten(1)], 1)
        for best, weight, rows in zip(best_weights, everything, rows_of):
            if rows is None:
                mask = improved.reshape(*improved.shape, *[1] * (best.dim() - 2))
                best.copy_(torch.where(mask, weight.detach(), best))
            else:
                best.copy_(weight.detach())
        best_lower = torch.maximum(best_lower, out.lower.detach())
        best_upper = torch.minimum(best_upper, out.upper.detach())
        if inner:
            tightest = [Interval(torch.maximum(t.lower, b.lower.detach()),
                                 torch.minimum(t.upper, b.upper.detach()))
                        for t, b in zip(tightest, inner[0])]
        deadline = _DEADLINE.get()
        if step == steps or (deadline is not None and time.perf_counter() > deadline):
            break
        for weight, grad in zip(everything, grads):
            weight.grad = torch.zeros_like(weight) if grad is None else grad
        optimizer.step()
        with torch.no_grad():  # project back onto the valid weights
            for weight in weights:
                weight.clamp_(0.0, 1.0)
            for weight in multipliers:
                weight.clamp_(min=0.0)
    report()
    if weights_out is not None:
        weights_out[:] = best_weights
    if differentiable:
        return _with_gradient(intermediate, passes, lower, upper, extras, slopes, bound_upper,
                              kwargs, call_kwargs(best_weights), best_lower, best_upper)
    return Interval(best_lower, best_upper)


def _with_gradient(intermediate: fx.GraphModule | None, passes: fx.GraphModule,
                   lower: Tensor, upper: Tensor, extras: tuple[Any, ...], slopes: Slopes,
                   bound_upper: bool, kwargs: dict[str, Any], weights: dict[str, Any],
                   best_lower: Tensor, best_upper: Tensor) -> Interval:
    """The bounds once more with the chosen (constant) slopes, this time with gradients to the
    model and the input set, met with the best bounds seen (elementwise: where a bound of this
    pass is the best, its gradient flows; both are sound, so their meet is)."""
    fixed = tuple(intermediate(lower, upper, *extras, slopes=slopes, **kwargs)) \
        if intermediate else ()
    out, *_ = passes(lower, upper, *fixed, *extras, slopes=slopes, bound_upper=bound_upper,
                     **kwargs, **weights)
    return Interval(torch.maximum(out.lower, best_lower), torch.minimum(out.upper, best_upper))


expose_to_codegen(alpha_crown_optimize)


def _alpha_lowering(gm: fx.GraphModule, options: AlphaCrownOptions | None) -> fx.GraphModule:
    options = options or AlphaCrownOptions()
    root = torch.nn.Module()
    budget = options.max_coefficients
    box = not options.l2_input
    if options.optimize_intermediate:
        root.passes = emit_backsub(gm, IntermediateBounds.BACKSUB, options.slopes,
                                   AlphaScope.ALL, result="bounds+slopes+intermediate",
                                   class_name="AlphaCrownPasses", max_coefficients=budget,
                                   input_is_box=box)
    else:
        root.intermediate = emit_backsub(gm, IntermediateBounds.BACKSUB, options.slopes,
                                         result="intermediate", class_name="CrownIntermediate",
                                         max_coefficients=budget, input_is_box=box)
        root.passes = emit_backsub(gm, IntermediateBounds.BACKSUB, options.slopes,
                                   AlphaScope.FINAL, bounds_inputs=True,
                                   result="bounds+slopes", class_name="AlphaCrownFinal",
                                   max_coefficients=budget, input_is_box=box)
    graph = fx.Graph()
    lower, upper = graph.placeholder("lower"), graph.placeholder("upper")
    extras = [graph.placeholder(p.name, default_value=p.meta.get("certfx.default", None))
              for p in list(gm.graph.nodes)[1:] if p.op == "placeholder"]
    slopes = graph.placeholder("slopes", default_value=None)  # None: options.slopes
    bound_upper = graph.placeholder("bound_upper", default_value=True)
    ball = graph.placeholder("ball", default_value=None)  # an L2Ball's ℓ2 ball
    splits = graph.placeholder("splits", default_value=None)  # a branch's (lin_restrict)
    intermediate = (None if options.optimize_intermediate
                    else graph.get_attr("intermediate"))
    out = graph.call_function(alpha_crown_optimize,
                              (intermediate, graph.get_attr("passes"), lower, upper, *extras),
                              {"slopes": slopes, "default_slopes": options.slopes,
                               "bound_upper": bound_upper,
                               "alphas": tuple(root.passes.meta[ALPHA_KEY]),
                               "steps": options.steps, "lr": options.lr, "ball": ball,
                               "splits": splits})
    graph.output(out)
    graph._tracer_cls = RuleTracer
    module = fx.GraphModule(root, graph, class_name="AlphaCrownBounds")
    module.meta.update(gm.meta)
    module.meta[LOWER_ONLY_KEY] = True
    restricting = root.passes if options.optimize_intermediate else root.intermediate
    module.meta[SPLIT_KEY] = restricting.meta[SPLIT_KEY]
    return module


def _domain(name: str, aliases: tuple[str, ...], options: type, lowering: Any) -> Domain:
    # The rule dict is BACK's own: a rule registered for one back-substitution domain (with
    # ``@BACK.rule``) serves them all.
    return register_domain(Domain(name=name, aliases=aliases, element=LinearBounds,
                                  input_rule=lin_input, module=BACK.module, prefix=BACK.prefix,
                                  options=options, rules=BACK.rules, lowering=lowering))


DEEPPOLY = _domain("deeppoly", (), BacksubOptions,
                   _backsub_lowering(IntermediateBounds.BACKSUB, "DeeppolyBounds"))
CROWN = _domain("crown", (), BacksubOptions,
                _backsub_lowering(IntermediateBounds.BACKSUB, "CrownBounds"))
CROWN_IBP = _domain("crown-ibp", ("crown_ibp", "crownibp"), BacksubOptions,
                    _backsub_lowering(IntermediateBounds.INTERVAL, "CrownIbpBounds"))
ALPHA_CROWN = _domain("alpha-crown", ("alpha_crown", "alphacrown"), AlphaCrownOptions,
                      _alpha_lowering)
