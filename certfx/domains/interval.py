"""The interval (Box / IBP) domain: the :class:`Interval` element and its rules.

Interval bound propagation (Gowal et al. 2018, "On the effectiveness of interval bound
propagation", Sec. 3) keeps elementwise bounds ``l ≤ z ≤ u`` for every node:

* monotone ops (ReLU, sigmoid, tanh, hardtanh, max-pool, avg-pool, sums, reshapes, concat, add):
  ``f(z) ∈ [f(l), f(u)]`` — exact for elementwise ops;
* affine ops ``f(z) = L z + b`` (linear, conv, batch norm, mul/div by constants, sub, …) in
  centre/radius form: with ``c = (u + l)/2`` and ``r = (u − l)/2``,
  ``f(z) ∈ [L c + b − |L| r, L c + b + |L| r]`` (Gowal et al., Eq. 6) — exact per output.

Both rules are derived from the op traits of :mod:`certfx.ops` (so exp and log, being
monotone, need nothing here; log's bounds are NaN where ``l < 0``); only ops whose traits do not
suffice have a rule written here: leaky ReLU with a negative slope, the decreasing reciprocal,
the product of two perturbed tensors (the four corner products, ACE Eq. 28–29) and the
softmax entropy (interval arithmetic on Eq. 5 of ACE) and ACE's selection node (the chosen
branch where the score's bounds decide the selection, the hull of both branches elsewhere).

Example:
    >>> import torch
    >>> from certfx import ops
    >>> box = Interval(torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[2.0, 4.0, 4.0]]))
    >>> out = box_linear(box, torch.ones(1, 3), torch.tensor([2.0]))
    >>> out.lower.item(), out.upper.item()
    (8.0, 12.0)
    >>> box_relu(Interval(torch.tensor([-1.0]), torch.tensor([2.0]))).lower.item()
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.base import Domain, Rule, register_domain
from certfx.ops import OpTraits

__all__ = ["Interval", "box_input", "box_product", "box_softmax_entropy", "entropy_shift",
           "entropy_range",
           "box_ace_select", "SelectionDecision", "selection_decision", "BOX"]


@dataclass(frozen=True)
class Interval:
    """Elementwise bounds ``lower ≤ z ≤ upper`` on a batch-first tensor ``z``.

    Iterating yields ``lower`` then ``upper``, so ``lo, hi = interval`` works.
    """

    lower: Tensor
    upper: Tensor

    @staticmethod
    def from_center_radius(center: Tensor, radius: Tensor) -> Interval:
        """The interval ``[center − radius, center + radius]``."""
        return Interval(center - radius, center + radius)

    @property
    def center(self) -> Tensor:
        """``(lower + upper) / 2`` (one fused kernel)."""
        return torch.lerp(self.lower, self.upper, 0.5)

    @property
    def radius(self) -> Tensor:
        """``(upper − lower) / 2``."""
        return (self.upper - self.lower) * 0.5

    def center_radius(self) -> tuple[Tensor, Tensor]:
        """``(center, radius)`` in two kernels: the radius as ``upper − center``."""
        center = self.center
        return center, self.upper - center

    @property
    def shape(self) -> torch.Size:
        """Shape of the bounded tensor."""
        return self.lower.shape

    def __iter__(self):  # noqa: D105 - tuple-style unpacking
        yield self.lower
        yield self.upper

    def contains(self, z: Tensor, tol: float = 0.0) -> Tensor:
        """Whether every entry of ``z`` lies in the interval (up to ``tol``)."""
        return ((z >= self.lower - tol) & (z <= self.upper + tol)).all()


def box_input(lower: Tensor, upper: Tensor) -> Interval:
    """The element of the input box ``[lower, upper]``."""
    return Interval(lower, upper)


def _bound(arg: Any, upper: bool) -> Any:
    """``arg`` with every interval replaced by its lower (or upper) bound."""
    if isinstance(arg, Interval):
        return arg.upper if upper else arg.lower
    if isinstance(arg, (list, tuple)):
        return type(arg)(_bound(a, upper) for a in arg)
    return arg


def _derive_monotone(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """``[f(l), f(u)]`` for ops non-decreasing in every argument."""
    if not op_traits.monotone:
        return None

    def rule(*args: Any) -> Interval:
        return Interval(op(*[_bound(a, False) for a in args]),
                        op(*[_bound(a, True) for a in args]))

    return rule


def _derive_affine(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """Centre/radius propagation ``[f(c) − |L| r, f(c) + |L| r]`` for affine ops."""
    if not op_traits.affine or op_traits.abs_linear_part is None:
        return None
    abs_linear = op_traits.abs_linear_part
    perturbable = set(op_traits.perturbed_args)

    def rule(*args: Any) -> Interval:
        centers, radii = list(args), list(args)
        for k, a in enumerate(args):
            if isinstance(a, Interval):
                centers[k], radii[k] = a.center_radius()
            elif k in perturbable:
                radii[k] = 0.0  # a constant operand contributes no radius
        return Interval.from_center_radius(op(*centers), abs_linear(*radii))

    return rule


BOX = register_domain(Domain(
    name="box",
    aliases=("interval", "ibp"),
    element=Interval,
    input_rule=box_input,
    module=__name__,
    prefix="box",
    derivers=[_derive_monotone, _derive_affine],
))


@BOX.rule(ops.leaky_relu)
def box_leaky_relu(x: Interval, negative_slope: float) -> Interval:
    """Leaky ReLU: monotone for a slope ≥ 0; otherwise the function is convex with its minimum
    0 at 0, so the upper bound is at an end point and the lower bound is 0 if 0 ∈ [l, u]."""
    fl, fu = ops.leaky_relu(x.lower, negative_slope), ops.leaky_relu(x.upper, negative_slope)
    if negative_slope >= 0:
        return Interval(fl, fu)
    lower = torch.where((x.lower <= 0) & (x.upper >= 0), torch.zeros_like(fl),
                        torch.minimum(fl, fu))
    return Interval(lower, torch.maximum(fl, fu))


@BOX.rule(ops.spec_linear)
def box_spec_linear(x: Interval, weight: Tensor, bias: Tensor | None,
                    spec: Tensor | None) -> Interval:
    """The last layer with the C-matrix folded in. The centre is exact through the layer and
    then ``C``: ``c' = C (W c + b)``; the radius uses the fused weight, ``r' = |C W| r``, which
    is what makes the fused bound tighter than bounding ``W z + b`` first (never looser)."""
    if spec is None:
        return box_linear(x, weight, bias)  # noqa: F821 - derived below, called at run time
    x_center, x_radius = x.center_radius()
    logits = torch.nn.functional.linear(x_center, weight, bias)  # (batch, out)
    center = (spec * logits.unsqueeze(1)).sum(-1)  # (batch, m)
    radius = (torch.matmul(spec, weight).abs() * x_radius.unsqueeze(1)).sum(-1)
    return Interval.from_center_radius(center, radius)


@BOX.rule(ops.reciprocal)
def box_reciprocal(x: Interval) -> Interval:
    """``1/x`` is decreasing on each side of 0: ``[1/u, 1/l]`` when ``0 ∉ [l, u]``; an
    interval touching 0 has no finite bounds, ``[−∞, ∞]``."""
    crossing = (x.lower <= 0) & (x.upper >= 0)
    lower = torch.where(crossing, -math.inf, 1 / torch.where(crossing, 1.0, x.upper))
    upper = torch.where(crossing, math.inf, 1 / torch.where(crossing, 1.0, x.lower))
    return Interval(lower, upper)


@BOX.rule(ops.product)
def box_product(x: Interval | Tensor, y: Interval | Tensor) -> Interval:
    """``x·y``: bilinear, so its extremes over a box are at the four corners (ACE Eq. 28–29).
    Either factor may be a constant tensor."""
    xl, xu = (x.lower, x.upper) if isinstance(x, Interval) else (x, x)
    yl, yu = (y.lower, y.upper) if isinstance(y, Interval) else (y, y)
    corners = torch.stack(torch.broadcast_tensors(xl * yl, xl * yu, xu * yl, xu * yu))
    return Interval(corners.amin(0), corners.amax(0))


def entropy_shift(x: Interval) -> Tensor:
    """The constant ``c`` of the log-sum-exp form (paper 000, Eq. 5): ``max_j u_j`` per example,
    so every ``e^{y_j − c} ≤ 1``. Any constant is exact; it only guards against overflow."""
    return x.upper.detach().amax(dim=1, keepdim=True)


@BOX.rule(ops.softmax_entropy)
def box_softmax_entropy(x: Interval, within_range: bool = True) -> Interval:
    """Interval arithmetic on Eq. 5 of paper 000 (logits ``(batch, n)`` → ``(batch, 1)``)::

        H = c + L − Σ_j y_j·p_j,   L = log Σ_i e^{y_i − c},   p_j = e^{y_j − c − L}

    with monotone exp/log, interval subtraction and the corner product for ``y_j·p_j``; the
    exponent of ``p_j`` is ``log p_j ≤ 0``, so its upper bound is capped at 0 (``p_j ≤ 1``).
    With ``within_range`` the result is met with ``[0, log n]`` (:func:`entropy_range`); a
    training loss passes ``False``, as the meet has no gradient where it cuts.
    """
    c = entropy_shift(x)
    lse = Interval(torch.log(torch.exp(x.lower - c).sum(1, keepdim=True)),
                   torch.log(torch.exp(x.upper - c).sum(1, keepdim=True)))
    probs = Interval(torch.exp(x.lower - c - lse.upper),
                     torch.exp((x.upper - c - lse.lower).clamp_max(0.0)))
    terms = box_product(x, probs)
    h = Interval(c + lse.lower - terms.upper.sum(1, keepdim=True),
                 c + lse.upper - terms.lower.sum(1, keepdim=True))
    return entropy_range(h, x.lower.shape[1]) if within_range else h


def entropy_range(h: Interval, n: int) -> Interval:
    """``h`` met with ``[0, log n]``, where every entropy of ``n`` outcomes lies (sound for any
    transformer's result; ACE's chains of transformers can overshoot ``log n``)."""
    top = math.log(n)
    return Interval(h.lower.clamp(0.0, top), h.upper.clamp(0.0, top))


@dataclass(frozen=True)
class SelectionDecision:
    """Where bounds on a selection score ``s`` decide ``1[s > T]`` for every point of the set.

    Attributes:
        selected: ``lower(s) > T``: every point selects the certification network.
        rejected: ``upper(s) ≤ T``: every point selects the core network.
    Both are ``(batch, 1, …)`` booleans shaped to broadcast against a branch of ``ndim`` dims;
    where neither holds, both branches are reachable.
    """

    selected: Tensor
    rejected: Tensor

    @property
    def undecided(self) -> Tensor:
        return ~(self.selected | self.rejected)


def selection_decision(score: Interval | Tensor, threshold: float, ndim: int) -> SelectionDecision:
    """The :class:`SelectionDecision` of ``score`` (bounds, or a constant tensor) against ``T``.

    Example:
        >>> d = selection_decision(Interval(torch.tensor([[0.5], [-1.0]]),
        ...                                 torch.tensor([[2.0], [1.0]])), 0.0, ndim=2)
        >>> d.selected.flatten().tolist(), d.undecided.flatten().tolist()
        ([True, False], [False, True])
    """
    lower, upper = (score.lower, score.upper) if isinstance(score, Interval) else (score, score)
    shape = (lower.shape[0], *[1] * (ndim - 1))
    return SelectionDecision((lower > threshold).reshape(shape),
                             (upper <= threshold).reshape(shape))


def _as_interval(v: Interval | Tensor) -> Interval:
    return v if isinstance(v, Interval) else Interval(v, v)


@BOX.rule(ops.ace_select)
def box_ace_select(score: Interval | Tensor, chosen: Interval | Tensor,
                   other: Interval | Tensor, threshold: float) -> Interval:
    """ACE's selection node (paper 000, Eq. 2, certified as in Sec. 4.2): where the score's
    bounds decide ``1[s > T]`` for the whole set, the decided branch's bounds; elsewhere either
    branch may answer, so the hull ``[min(l_c, l_o), max(u_c, u_o)]``."""
    c, o = _as_interval(chosen), _as_interval(other)
    d = selection_decision(score, threshold, max(c.lower.dim(), o.lower.dim()))
    lower = torch.where(d.selected, c.lower, torch.where(d.rejected, o.lower,
                                                         torch.minimum(c.lower, o.lower)))
    upper = torch.where(d.selected, c.upper, torch.where(d.rejected, o.upper,
                                                         torch.maximum(c.upper, o.upper)))
    return Interval(lower, upper)


BOX.derive_missing()
