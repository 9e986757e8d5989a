"""Backward rules of back-substitution: push :class:`LinearBounds` through one core op.

A backward rule ``back_<op>(a, *args)`` receives the bounds ``a`` on the targets as a linear
function of the op's *output* and returns them as a function of the op's perturbed *inputs*
(the op's arguments, with every perturbed one replaced by a :class:`~certfx.domains.linear.Var`
carrying its shape). There are three kinds:

* **affine ops** ``f(x) = L x + f(0)``, derived from the op traits: the coefficients move
  through the transpose, ``A_in = Lᵀ A_out``, which is the vector-Jacobian product of the
  op's ``linear_part``; ``torch.func.vjp`` computes it (a conv becomes a transposed conv, never
  a dense Jacobian) and ``torch.func.vmap`` maps it over the rows. The constant enters the
  bias, ``b += ⟨A_out, f(0)⟩`` (bias, batch-norm shift, pad value, added constants). A
  multi-input op (``add`` of two perturbed nodes) returns one term per input; the incoming
  bias goes to the first only, so that summing at a shared node counts it once.
* **activations**, from the shared relaxation table: with lines ``α_l z + β_l ≤ f(z) ≤
  α_u z + β_u``, the lower bound of ``⟨A, f(z)⟩`` uses the lower line where ``A ≥ 0`` and the
  upper line where ``A < 0`` (CROWN, Zhang et al. 2018, Thm. 3.2; DeepPoly, Singh et al. 2019,
  Sec. 4). The relaxation is computed once per node by ``relax_<op>(bounds, …)`` from the
  bounds of the op's input.
* **max_pool**: ``y ≥ x_j`` for the window entry ``j`` with the largest lower bound, and
  ``y ≤ max_i u_i`` — or ``y = x_j`` when ``l_j ≥ u_i`` for all other ``i`` (the DeepPoly max-pool
  transformer as implemented in ERAN).

The commonest affine ops also have hand-written rules (:mod:`certfx.domains.linear_affine`:
the same results without functorch's per-call cost, or with per-example constants);
``softmax_entropy`` has none and is rejected by ``check_support``. ``product`` (of two perturbed
tensors) has the McCormick relaxation below, and ACE's selection node ``ace_select`` a
case split on its score's bounds (see :class:`SelectRelaxation`). New affine
ops and new relaxation-table entries get rules automatically.

Example:
    >>> import torch
    >>> from certfx import ops
    >>> a = LinearBounds(torch.tensor([[[[-2.0]]]]), torch.zeros(1, 1))   # q = −2y
    >>> out = BACK.rule_for(ops.avg_pool)(a, Var((1, 2)), (2,), (2,), (0,), False, True)
    >>> out.coef.tolist()     # y = (x₁ + x₂)/2, so q = −x₁ − x₂
    [[[[-1.0, -1.0]]]]
    >>> relu = RELAX[ops.relu](Interval(torch.tensor([[-1.0]]), torch.tensor([[3.0]])))
    >>> BACK.rule_for(ops.relu)(LinearBounds(-torch.ones(1, 1, 1), torch.zeros(1, 1)), relu)
    LinearBounds(coef=tensor([[[-0.7500]]]), bias=tensor([[-0.7500]]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.base import Domain, Rule, expose_to_codegen
from certfx.domains.interval import Interval, box_ace_select, selection_decision
from certfx.domains.linear import LinearBounds, Slopes, Var, lin_input, rowdot
from certfx.domains.relaxations import RELAXATIONS, LinearRelaxation, linear_relaxation
from certfx.ops import OpTraits

__all__ = ["BACK", "RELAX", "RELAX_WEIGHTED", "MaxPoolRelaxation", "ProductRelaxation",
           "SelectRelaxation",
           "WeightedRelaxation", "has_free_slope", "UNSUPPORTED"]

# Ops deliberately without a backward rule, and why (check_support names them).
UNSUPPORTED = {
    ops.softmax_entropy: "the softmax entropy has no linear relaxation here",
}

# Relaxations whose lines are always finite; others (reciprocal, log, exp) may carry ±inf or
# NaN offsets, for which 0·∞ must count as 0 in the sign split.
_FINITE = {ops.relu, ops.leaky_relu, ops.hardtanh, ops.sigmoid, ops.tanh}


def _dot_const(coef: Tensor, value: Tensor) -> Tensor:
    """``⟨coef_r, value⟩``: ``(B, R, *shape) × (1|B, *shape) → (B, R)``."""
    value = torch.broadcast_to(value, (value.shape[0] if value.dim() == coef.dim() - 1 else 1,
                                       *coef.shape[2:]))
    return rowdot(coef.flatten(2), value.flatten(1))


def _terms(bias: Tensor, coefs: list[Tensor]) -> Any:
    """One :class:`LinearBounds` per perturbed input; the bias travels with the first only."""
    out = [LinearBounds(c, bias if k == 0 else torch.zeros_like(bias))
           for k, c in enumerate(coefs)]
    return out[0] if len(out) == 1 else tuple(out)


# ---- affine ops, derived from the traits ----------------------------------------------------

def _derive_affine(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """``A_in = Lᵀ A_out`` by ``vmap(vjp(linear_part))``, ``b += ⟨A_out, f(0)⟩``."""
    if not op_traits.affine or op_traits.linear_part is None:
        return None
    linear_part = op_traits.linear_part
    has_constant = linear_part is not op  # an op that is its own linear part has f(0) = 0
    perturbable = set(op_traits.perturbed_args)

    def rule(a: LinearBounds, *args: Any) -> Any:
        where = [k for k, v in enumerate(args) if isinstance(v, Var)]
        coef = a.coef
        zeros = [coef.new_zeros((1, *args[k].shape)) for k in where]

        def with_inputs(xs: tuple[Tensor, ...], others: Any) -> list[Any]:
            full = [others if (k in perturbable and not isinstance(v, Var)) else v
                    for k, v in enumerate(args)]
            for k, x in zip(where, xs):
                full[k] = x
            return full

        # Lᵀ A for all rows at once: the vjp at a batch-1 zero input, vmapped over the rows.
        _, vjp_fn = torch.func.vjp(lambda *xs: linear_part(*with_inputs(xs, 0.0)), *zeros)
        batch, rows = coef.shape[:2]
        grads = torch.func.vmap(vjp_fn)(coef.reshape(batch * rows, 1, *coef.shape[2:]))
        bias = a.bias
        if has_constant:  # the constant term f(0), e.g. a layer's bias
            f0 = op(*[x if not isinstance(x, Var) else z
                      for x, z in zip(args, _zeros_at(args, where, zeros))])
            bias = bias + _dot_const(coef, f0)
        return _terms(bias, [g.reshape(batch, rows, *g.shape[2:]) for g in grads])

    return rule


def _zeros_at(args: tuple[Any, ...], where: list[int], zeros: list[Tensor]) -> list[Any]:
    out = list(args)
    for k, z in zip(where, zeros):
        out[k] = z
    return out


# ---- activations, from the relaxation table -------------------------------------------------

def _rowdot(coef: Tensor, value: Tensor) -> Tensor:
    """``Σ coef·value`` per example and row: ``(B|1, R, *shape) × (B|1, 1|R, *shape) →
    (B, R)``, as a matrix product where ``value`` is the same for every row."""
    v = value.flatten(2)
    if v.shape[1] != 1:
        return (coef.flatten(2) * v).sum(-1)
    return rowdot(coef.flatten(2), v[:, 0])


def _back_relaxed(a: LinearBounds, r: LinearRelaxation, finite: bool) -> LinearBounds:
    """CROWN's sign split (Zhang et al. 2018, Thm. 3.2): for lower bounds, the positive part
    ``A⁺`` takes the lower line ``α_l z + β_l`` and the negative part ``A⁻`` the upper line
    ``α_u z + β_u``: ``⟨A, f(z)⟩ ≥ ⟨A⁺α_l + A⁻α_u, z⟩ + ⟨A⁺, β_l⟩ + ⟨A⁻, β_u⟩``.
    Relaxation fields are ``(batch, 1 or R, *shape)``."""
    coef = a.coef
    pos = coef.clamp(min=0)
    neg = coef - pos
    new_coef = torch.addcmul(neg * r.upper_slope, pos, r.lower_slope)
    if finite:
        bias = _rowdot(pos, r.lower_bias) + _rowdot(neg, r.upper_bias)
    else:  # a zero coefficient on an infinite offset contributes nothing (not NaN)
        terms = torch.where(pos > 0, pos * r.lower_bias, 0.0) + torch.where(
            neg < 0, neg * r.upper_bias, 0.0)
        bias = terms.flatten(2).sum(-1)
    return LinearBounds(new_coef, a.bias + bias)


def _derive_activation(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """``back_<op>(a, relaxation)`` for every op of the relaxation table."""
    if op not in RELAXATIONS:
        return None
    finite = op in _FINITE

    def rule(a: LinearBounds, relaxation: LinearRelaxation) -> LinearBounds:
        return _back_relaxed(a, relaxation, finite)

    return rule


def has_free_slope(op: Callable[..., Any], *op_args: Any) -> bool:
    """Whether ``op``'s relaxation has a free lower slope (α-CROWN can optimize it)."""
    if op not in RELAXATIONS:
        return False
    try:
        linear_relaxation(op, torch.tensor([-1.0]), torch.tensor([1.0]), *op_args,
                          lower_slope=torch.tensor([0.5]))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class WeightedRelaxation(LinearRelaxation):
    """A relaxation whose lower line is ``(1 − w)·lowest + w·highest`` of the valid lower lines
    of a free-slope relaxation (for ReLU: slope ``w``); ``weight`` is ``w``, α-CROWN's variable.
    A convex combination of two lower lines is a lower line, so every ``w ∈ [0, 1]`` is sound.
    For sigmoid and tanh ``weight`` holds two positions per neuron instead (``(batch, R, 2,
    *shape)``, see :func:`_positioned`)."""

    weight: Tensor


def _named(fn: Callable[..., Any], name: str, doc: str) -> Callable[..., Any]:
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = doc
    globals()[name] = fn
    expose_to_codegen(fn)
    return fn


def _make_relax(op: Callable[..., Any]) -> Callable[..., LinearRelaxation]:
    def relax(bounds: Interval, *op_args: Any, slopes: Slopes = Slopes()) -> LinearRelaxation:
        # (batch, 1, *shape): the lines broadcast over the rows of a LinearBounds.
        return linear_relaxation(op, bounds.lower.unsqueeze(1), bounds.upper.unsqueeze(1),
                                 *op_args, policy=slopes.policy, pq=(slopes.p, slopes.q))

    return _named(relax, f"relax_{op.__name__}", f"The linear relaxation of ``{op.__name__}`` "
                  "on the bounds of its input, from the shared relaxation table.")


# S-shaped ops: two weights (stacked after the rows) position the tangent points of the lower
# and of the upper line in their valid ranges (the relaxation table's ``lower_slope`` for them),
# tighter than a blend of the two end tangents
_POSITIONED = {ops.sigmoid, ops.tanh}


def _positioned(op: Callable[..., Any], lo: Tensor, up: Tensor, *op_args: Any,
                alpha: Tensor | None) -> WeightedRelaxation:
    """Sigmoid's or tanh's lines with both tangent points free: ``alpha[:, :, 0]`` places the
    lower line's, ``alpha[:, :, 1]`` the upper line's. An S-shaped ``f`` is point-symmetric,
    ``f(x) = 2 f(0) − f(−x)``, so the lower line ``a·y + b`` of ``f`` on ``[−u, −l]`` gives the
    upper line ``a·x + 2 f(0) − b`` on ``[l, u]``: each position is the table's lower-line
    position, on the reflected interval for the upper line, and every position is sound."""
    if alpha is None:  # the policy's lines, and the middle of both ranges to start from
        r = linear_relaxation(op, lo, up, *op_args)
        start = torch.full_like(r.lower_slope, 0.5).unsqueeze(2)
        return WeightedRelaxation(r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias,
                                  torch.cat([start, start], 2))
    w = alpha + (alpha.clamp(0.0, 1.0) - alpha).detach()
    lower_line = linear_relaxation(op, lo, up, *op_args, lower_slope=w[:, :, 0])
    reflected = linear_relaxation(op, -up, -lo, *op_args, lower_slope=w[:, :, 1])
    twice_f0 = 2 * float(op(torch.zeros(())))
    return WeightedRelaxation(lower_line.lower_slope, lower_line.lower_bias,
                              reflected.lower_slope, twice_f0 - reflected.lower_bias, w)


def _make_weighted_relax(op: Callable[..., Any]) -> Callable[..., WeightedRelaxation]:
    def relax(bounds: Interval, *op_args: Any, slopes: Slopes = Slopes(),
              alpha: Tensor | None = None) -> WeightedRelaxation:
        # α-CROWN (Xu et al. 2021, Sec. 3.1): one weight per neuron and row, (batch, R, *shape).
        lo, up = bounds.lower.unsqueeze(1), bounds.upper.unsqueeze(1)
        if op in _POSITIONED:
            return _positioned(op, lo, up, *op_args, alpha=alpha)
        low = linear_relaxation(op, lo, up, *op_args, lower_slope=torch.zeros_like(lo))
        high = linear_relaxation(op, lo, up, *op_args, lower_slope=torch.ones_like(lo))
        span = high.lower_slope - low.lower_slope
        if alpha is None:  # the policy's line, and its weight as the starting point
            r = linear_relaxation(op, lo, up, *op_args, policy=slopes.policy,
                                  pq=(slopes.p, slopes.q))
            free = span > 0
            weight = torch.where(free, (r.lower_slope - low.lower_slope)
                                 / torch.where(free, span, 1.0), 0.0)
            return WeightedRelaxation(r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias,
                                      weight)
        # Projected onto [0, 1] in value, with the gradient of the identity (a clamp's is 0 at
        # its ends, where the optimization starts).
        w = alpha + (alpha.clamp(0.0, 1.0) - alpha).detach()
        return WeightedRelaxation(low.lower_slope + w * span,
                                  low.lower_bias + w * (high.lower_bias - low.lower_bias),
                                  low.upper_slope, low.upper_bias, w)

    return _named(relax, f"relax_{op.__name__}_weighted",
                  f"The relaxation of ``{op.__name__}`` with its free lower line chosen by a "
                  "weight ``alpha`` (see :class:`WeightedRelaxation`).")


# ---- the registry ---------------------------------------------------------------------------

BACK = Domain(
    name="backward",  # a rule registry shared by the back-substitution domains; not registered
    element=LinearBounds,
    input_rule=lin_input,
    module=__name__,
    prefix="back",
    derivers=[_derive_activation, _derive_affine],
)

# relax_<op>(bounds, *op_args, slopes=..., alpha=None) for every op with a backward rule that
# needs the bounds of its input.
RELAX: dict[Callable[..., Any], Callable[..., Any]] = {}
# relax_<op>_weighted(bounds, *op_args, slopes=..., alpha=None) for the ops of the relaxation
# table: used where α-CROWN optimizes a free lower slope (see ``has_free_slope``).
RELAX_WEIGHTED: dict[Callable[..., Any], Callable[..., Any]] = {}


# ---- max pooling ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MaxPoolRelaxation:
    """Per output entry: ``x_index ≤ y``, and ``y ≤ upper``, or ``y = x_index`` where ``exact``.

    Attributes:
        index: ``(batch, 1, C, L_out)`` flat input position (within a channel) of the selected
            window entry.
        exact: ``(batch, 1, C, L_out)``: the selected entry is the maximum for every point.
        upper: ``(batch, 1, C, L_out)``: the largest upper bound in the window.
        in_shape: the per-example input shape ``(C, *spatial)``.
    """

    index: Tensor
    exact: Tensor
    upper: Tensor
    in_shape: tuple[int, ...]


def relax_max_pool(bounds: Interval, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                   padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool, *,
                   slopes: Slopes = Slopes()) -> MaxPoolRelaxation:
    """Select, per window, the entry with the largest lower bound (see the module docstring)."""
    lower, upper = bounds.lower, bounds.upper
    args = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    u_max = ops.max_pool(upper, *args, ceil_mode)
    out = tuple(u_max.shape[2:])
    lw = ops.pool_windows(lower, *args, out, -math.inf)
    uw = ops.pool_windows(upper, *args, out, -math.inf)
    spatial = lower.shape[2:]
    positions = torch.arange(math.prod(spatial), device=lower.device,  # exact in float64
                             dtype=torch.float64).reshape(1, 1, *spatial)
    iw = ops.pool_windows(positions, *args, out, -1.0)
    pick = lw.argmax(-1, keepdim=True)
    index = iw.expand(lw.shape).gather(-1, pick).squeeze(-1).long()
    others = uw.scatter(-1, pick, -math.inf).amax(-1)
    exact = lw.gather(-1, pick).squeeze(-1) >= others
    flat = (lower.shape[0], 1, lower.shape[1], -1)
    return MaxPoolRelaxation(index.reshape(flat), exact.reshape(flat), u_max.reshape(flat),
                             tuple(lower.shape[1:]))


@BACK.rule(ops.max_pool)
def back_max_pool(a: LinearBounds, relaxation: MaxPoolRelaxation) -> LinearBounds:
    """Rows with ``A ≥ 0`` (and all rows where exact) go to the selected entry; rows with
    ``A < 0`` elsewhere take the constant upper bound into the bias."""
    r = relaxation
    coef = a.coef.flatten(3)  # (batch, R, C, L_out)
    to_entry = torch.where(r.exact, coef, coef.clamp(min=0))
    constant = torch.where(r.exact, 0.0, coef.clamp(max=0)) * r.upper
    batch = max(coef.shape[0], r.index.shape[0])
    shape = (batch, coef.shape[1], r.in_shape[0], math.prod(r.in_shape[1:]))
    new = coef.new_zeros(shape).scatter_add(-1, r.index.expand(*shape[:3], -1),
                                            to_entry.expand(*shape[:3], -1))
    return LinearBounds(new.reshape(*shape[:2], *r.in_shape),
                        a.bias + constant.flatten(2).sum(-1))


RELAX[ops.max_pool] = relax_max_pool
expose_to_codegen(relax_max_pool)


# ---- products of two perturbed tensors ------------------------------------------------------

@dataclass(frozen=True)
class ProductRelaxation:
    """Planes ``c_y x + c_x y + β_l ≤ x·y ≤ c_y x + c_x y + β_u`` per output entry.

    McCormick (1976): for ``x ∈ [l_x, u_x]``, ``y ∈ [l_y, u_y]`` both
    ``xy ≥ l_y x + l_x y − l_x l_y`` and ``xy ≥ u_y x + u_x y − u_x u_y`` hold, and both
    ``xy ≤ u_y x + l_x y − l_x u_y`` and ``xy ≤ l_y x + u_x y − u_x l_y``. The average of each
    pair is again a valid plane, and both averages have the slopes ``c_y = (l_y + u_y)/2`` on
    ``x`` and ``c_x = (l_x + u_x)/2`` on ``y``: ``β_l = −(l_x l_y + u_x u_y)/2``,
    ``β_u = −(l_x u_y + u_x l_y)/2``. Fields are ``(batch, 1, *output_shape)``. A constant
    factor is a point interval, where the planes are exact; ``x_shape``/``y_shape`` are
    ``None`` for a constant factor (it gets no term).
    """

    slope_x: Tensor
    slope_y: Tensor
    lower_bias: Tensor
    upper_bias: Tensor
    x_shape: tuple[int, ...] | None
    y_shape: tuple[int, ...] | None


def _factor(v: Interval | Tensor) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """``(lower, upper)`` as ``(batch | 1, 1, *shape)``, and the per-example shape of a
    perturbed factor (``None`` for a constant)."""
    if isinstance(v, Interval):
        return v.lower.unsqueeze(1), v.upper.unsqueeze(1), tuple(v.lower.shape[1:])
    c = torch.as_tensor(v).unsqueeze(0).unsqueeze(0)
    return c, c, None


def relax_product(x: Interval | Tensor, y: Interval | Tensor, *,
                  slopes: Slopes = Slopes()) -> ProductRelaxation:
    """The McCormick planes of ``x·y`` from the bounds of both factors (see
    :class:`ProductRelaxation`)."""
    (lx, ux, x_shape), (ly, uy, y_shape) = _factor(x), _factor(y)
    shape = torch.broadcast_shapes(lx.shape, ly.shape)
    if x_shape is None or y_shape is None:  # c·z is linear: the exact plane, no offsets
        c = (ly if y_shape is None else lx).expand(shape)
        zero = torch.zeros_like(c)
        return ProductRelaxation(c if y_shape is None else zero, zero if y_shape is None else c,
                                 zero, zero, x_shape, y_shape)
    return ProductRelaxation(((ly + uy) / 2).expand(shape), ((lx + ux) / 2).expand(shape),
                             -(lx * ly + ux * uy) / 2, -(lx * uy + ux * ly) / 2,
                             x_shape, y_shape)


def _sum_to(coef: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum a ``(B, R, *out)`` coefficient over the dims a factor of ``shape`` was broadcast
    along: ``(B, R, *shape)``."""
    lead = coef.dim() - 2 - len(shape)
    if lead:
        coef = coef.sum(tuple(range(2, 2 + lead)))
    dims = tuple(2 + i for i, n in enumerate(shape) if n == 1 and coef.shape[2 + i] != 1)
    return coef.sum(dims, keepdim=True) if dims else coef


@BACK.rule(ops.product)
def back_product(a: LinearBounds, relaxation: ProductRelaxation) -> Any:
    """``⟨A, xy⟩ ≥ ⟨A·c_y, x⟩ + ⟨A·c_x, y⟩ + ⟨A⁺, β_l⟩ + ⟨A⁻, β_u⟩``: one term per perturbed
    factor (a tuple for two), the bias in the first only (see the module docstring)."""
    r = relaxation
    coef = a.coef
    pos = coef.clamp(min=0)
    bias = a.bias + _rowdot(pos, r.lower_bias) + _rowdot(coef - pos, r.upper_bias)
    terms = [_sum_to(coef * slope, shape) for slope, shape in
             ((r.slope_x, r.x_shape), (r.slope_y, r.y_shape)) if shape is not None]
    if len(terms) == 1:
        return LinearBounds(terms[0], bias)
    return LinearBounds(terms[0], bias), LinearBounds(terms[1], torch.zeros_like(bias))


RELAX[ops.product] = relax_product
expose_to_codegen(relax_product)

# ---- ACE's selection node (paper 000, Eq. 2) -------------------------------------------------

@dataclass(frozen=True)
class SelectRelaxation:
    """``y = chosen`` where the score's bounds prove ``s > T``, ``y = other`` where they prove
    ``s ≤ T``, and ``y ∈ [hull_lower, hull_upper]`` (both branches' hull) elsewhere.

    ``selected``/``rejected`` are 0/1 masks ``(batch, 1, *shape)``; the hull is 0 where decided.
    ``score_shape`` is the score's per-example shape (it gets a zero term: the selection moves
    no coefficients into the selection network, only the decision); ``chosen``/``other`` hold
    a constant branch's value (``None`` for a perturbed one).
    """

    selected: Tensor
    rejected: Tensor
    hull_lower: Tensor
    hull_upper: Tensor
    score_shape: tuple[int, ...] | None
    chosen: Tensor | None
    other: Tensor | None


def relax_ace_select(score: Interval | Tensor, chosen: Interval | Tensor,
                     other: Interval | Tensor, threshold: float, *,
                     slopes: Slopes = Slopes()) -> SelectRelaxation:
    """The :class:`SelectRelaxation` from the bounds of the score and both branches."""
    hull = box_ace_select(score, chosen, other, threshold)
    d = selection_decision(score, threshold, hull.lower.dim())
    und = d.undecided
    one = hull.lower.new_ones(())

    def mask(m: Tensor) -> Tensor:
        return (m * one).unsqueeze(1)

    def const(v: Interval | Tensor) -> Tensor | None:
        if isinstance(v, Interval):
            return None
        return torch.as_tensor(v).to(hull.lower).expand_as(hull.lower).unsqueeze(1)

    return SelectRelaxation(
        mask(d.selected), mask(d.rejected),
        torch.where(und, hull.lower, 0.0).unsqueeze(1), torch.where(und, hull.upper, 0.0).unsqueeze(1),
        tuple(score.lower.shape[1:]) if isinstance(score, Interval) else None,
        const(chosen), const(other))


@BACK.rule(ops.ace_select)
def back_ace_select(a: LinearBounds, relaxation: SelectRelaxation) -> Any:
    """``⟨A, y⟩ ≥ ⟨A·sel, chosen⟩ + ⟨A·rej, other⟩ + ⟨A⁺·und, l_hull⟩ + ⟨A⁻·und, u_hull⟩``
    per example: one term per perturbed argument (score, chosen, other), in that order, the
    bias in the first."""
    r = relaxation
    coef = a.coef
    und = 1 - r.selected - r.rejected
    pos = coef.clamp(min=0) * und
    bias = a.bias + _rowdot(pos, r.hull_lower) + _rowdot(coef * und - pos, r.hull_upper)
    terms = []
    if r.score_shape is not None:
        terms.append(coef.new_zeros(max(coef.shape[0], r.selected.shape[0]), coef.shape[1],
                                    *r.score_shape))
    for m, value in ((r.selected, r.chosen), (r.rejected, r.other)):
        if value is None:
            terms.append(coef * m)
        else:
            bias = bias + _rowdot(coef * m, value)
    out = [LinearBounds(t, bias if k == 0 else torch.zeros_like(bias))
           for k, t in enumerate(terms)]
    return out[0] if len(out) == 1 else tuple(out)


RELAX[ops.ace_select] = relax_ace_select
expose_to_codegen(relax_ace_select)

for _op in RELAXATIONS:
    RELAX[_op] = _make_relax(_op)
    RELAX_WEIGHTED[_op] = _make_weighted_relax(_op)

# The hand-written rules register themselves first; every other op gets a derived one.
import certfx.domains.linear_affine  # noqa: E402, F401

BACK.derive_missing()
