"""The relaxation-table entries of sigmoid, tanh, hardtanh, exp, log and reciprocal.

Each entry gives the two forms of :mod:`certfx.domains.relaxations` — sound lines
(:class:`LinearRelaxation`, for back-substitution) and a parallelogram
(:class:`ParallelRelaxation`, for zonotopes) — on pre-activation bounds ``[l, u]``, point
intervals included (no NaN). The free-slope arguments of the table's interface (``policy``,
``pq``) only matter for hardtanh's kinks. ``lower_slope`` (α-CROWN's variable) is, for sigmoid
and tanh, the position in ``[0, 1]`` of the lower line's tangent point within its valid range
(see :func:`_s_upper_line`); the other entries reject it. Where a function is unbounded on ``[l, u]`` (log for
``l ≤ 0``, reciprocal across 0) the bounds are NaN or infinite, so nothing can be certified.

Example:
    >>> import torch
    >>> from certfx import ops
    >>> from certfx.domains.relaxations import parallel_relaxation
    >>> p = parallel_relaxation(ops.exp, torch.tensor([0.0]), torch.tensor([1.0]))
    >>> round(p.slope.item(), 4) == round(math.e - 1, 4)   # e^{t_crit}: the chord's slope
    True
    >>> bool(p.slope * 0 + p.offset - p.radius > 0)        # positive at l (ACE Eq. 22)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.relaxations import (
    LinearRelaxation,
    ParallelRelaxation,
    SlopePolicy,
    linear_relaxation,
    relaxation,
)

__all__: list[str] = []


# ---- shared helpers ----------------------------------------------------------------------------
#
# Every smooth entry below is convex, concave, or S-shaped (convex for x < 0, concave for
# x > 0) on its interval; hardtanh is piecewise linear. Two facts give all the lines:
#  * a tangent of a convex function lies below it everywhere, and its chord above it on
#    [l, u] (concave: the other way round);
#  * for any slope λ, g(x) = f(x) − λx has, on [l, u], its extremes at the end points or at a
#    point where f'(x) = λ. So f(x) ∈ λx + [min g, max g] is a *sound* parallelogram for every
#    λ, and ACE's App. H (Eq. 11–14) is the choice λ = f'(t) for a tangent point t, for which
#    the extreme in the interior is g(t) itself.

_TINY = 1e-12
_SEARCH_STEPS = 24  # bisection steps for the tangent point of S-shaped functions
# exp's positivity limit t ≤ l + 1 (ACE Eq. 22) less a small delta, as App. H.3 suggests, so
# that rounding cannot push the lower edge below 0 (it is then ≥ e^t·δ at x = l).
_EXP_POSITIVE_DELTA = 1.0 / 64


def _no_free_slope(op: str, lower_slope: Tensor | None) -> None:
    """Only ReLU-like and S-shaped entries have a free lower line for α-CROWN to optimize."""
    if lower_slope is not None:
        raise ValueError(f"the {op} relaxation has no free lower slope; pass lower_slope only "
                         "for relu, leaky_relu, sigmoid and tanh")


def _chord_or_tangent(f_l: Tensor, f_u: Tensor, lower: Tensor, upper: Tensor,
                      df_l: Tensor) -> Tensor:
    """The chord's slope ``(f(u) − f(l)) / (u − l)``, or ``f'(l)`` on a point interval."""
    width = upper - lower
    ok = width > _TINY
    return torch.where(ok, (f_u - f_l) / torch.where(ok, width, 1.0), df_l)


def _tangent_parallel(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor],
                      lower: Tensor, upper: Tensor, t: Tensor, convex: bool) -> ParallelRelaxation:
    """ACE App. H.2, Eq. 11–14: slope ``λ = f'(t)`` for a tangent point ``t ∈ [l, u]``.

    With ``g(x) = f(x) − λx``, ``g`` is convex (concave) with its minimum (maximum) ``g(t)`` at
    the tangent point and its other extreme at an end point, so ``f(x) ∈ λx + [g_min, g_max]``.
    """
    lam = df(t)
    g_t = f(t) - lam * t
    g_l, g_u = f(lower) - lam * lower, f(upper) - lam * upper
    g_lo, g_hi = (g_t, torch.maximum(g_l, g_u)) if convex else (torch.minimum(g_l, g_u), g_t)
    return ParallelRelaxation(lam, (g_hi + g_lo) / 2, ((g_hi - g_lo) / 2).clamp_min(0.0))


def _convex_linear(f_l: Tensor, f_u: Tensor, lower: Tensor, upper: Tensor, df_l: Tensor,
                   f_t: Tensor, df_t: Tensor, t: Tensor) -> LinearRelaxation:
    """Convex ``f``: the chord is the upper line, the tangent at ``t`` the lower one."""
    chord = _chord_or_tangent(f_l, f_u, lower, upper, df_l)
    return LinearRelaxation(df_t, f_t - df_t * t, chord, f_l - chord * lower)


def _flip_concave(r: LinearRelaxation) -> LinearRelaxation:
    """The relaxation of ``f`` from that of the convex ``−f`` (negate and swap the lines)."""
    return LinearRelaxation(-r.upper_slope, -r.upper_bias, -r.lower_slope, -r.lower_bias)


# ---- sigmoid and tanh: S-shaped, point-symmetric about (0, f(0)) -----------------------------

def _s_upper_line(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor], lower: Tensor,
                  upper: Tensor, position: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A sound upper line of an S-shaped ``f`` on ``[l, u]`` (CROWN, Zhang et al. 2018, Sec. 3.2;
    DeepPoly, Singh et al. 2019, Sec. 4.3), as ``(slope, bias)``.

    * The chord (slope ``k``) is above ``f`` iff ``k ≤ f'(u)``: ``h = f − chord`` vanishes at
      ``l`` and ``u``, is convex on ``[l, 0]`` and concave on ``[0, u]``, and ``h'(u) ≥ 0``
      makes the concave part non-decreasing up to ``h(u) = 0`` (so ``h(0) ≤ 0``, and the convex
      part lies below its end values). This covers every ``u ≤ 0``.
    * Otherwise (``k > f'(u)``, so ``u > 0``) the tangent at ``d ≥ 0`` lies above ``f`` on the
      concave part ``[0, ∞)``, and on ``[l, 0]`` iff it is above ``f(l)``:
      ``φ(d) = f(d) + f'(d)(l − d) − f(l) ≥ 0``. ``φ`` is non-decreasing on ``[0, ∞)``
      (``φ' = f''(d)(l − d) ≥ 0``) and ``φ(u) = (u − l)(k − f'(u)) > 0``, so bisection keeps
      a valid ``d`` as its upper end. Among valid points the midpoint ``m`` minimizes the area
      (``∂/∂d ∫ T_d = (u − l) f''(d)(m − d)``), hence ``d = max(d_valid, m)``. With
      ``position`` ``p ∈ [0, 1]`` (α-CROWN's free variable for S-shaped functions, Xu et al.
      2021, Sec. 3.1), ``d = d_valid + p·(u − d_valid)``: every point of ``[d_valid, u]`` is
      valid, as ``φ`` is non-decreasing.
    """
    f_l, f_u, df_u = f(lower), f(upper), df(upper)
    k = _chord_or_tangent(f_l, f_u, lower, upper, df(lower))
    with torch.no_grad():  # the tangent point is a choice; any valid one is sound
        lo = torch.minimum(lower.clamp_min(0.0), upper)
        hi = upper.clone()
        for _ in range(_SEARCH_STEPS):
            mid = (lo + hi) / 2
            ok = f(mid) + df(mid) * (lower - mid) - f_l >= 0
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        d = torch.maximum(hi, (lower + upper) / 2)
    if position is not None:  # outside no_grad: the gradient reaches the position
        # projected onto [0, 1] with the identity's gradient (a clamp's is 0 at the ends)
        p = position + (position.clamp(0.0, 1.0) - position).detach()
        d = hi + p * (upper - hi)
    df_d = df(d)
    chord_ok = k <= df_u
    slope = torch.where(chord_ok, k, df_d)
    bias = torch.where(chord_ok, f_l - k * lower, f(d) - df_d * d)
    return slope, bias


def _s_linear(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor], f0: float,
              lower: Tensor, upper: Tensor, lower_position: Tensor | None = None
              ) -> LinearRelaxation:
    """Both lines of an S-shaped ``f`` with ``f(x) = 2 f(0) − f(−x)``: the lower line on
    ``[l, u]`` is the reflection of the upper line on ``[−u, −l]`` (``lower_position``: where
    its tangent point lies in its valid range, 1 at ``l``; see :func:`_s_upper_line`)."""
    up_slope, up_bias = _s_upper_line(f, df, lower, upper)
    lo_slope, refl_bias = _s_upper_line(f, df, -upper, -lower, lower_position)
    return LinearRelaxation(lo_slope, 2 * f0 - refl_bias, up_slope, up_bias)


def _s_parallel(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor], lower: Tensor,
                upper: Tensor) -> ParallelRelaxation:
    """DeepZ (Singh et al. 2018, Thm. 3.2): ``λ = min(f'(l), f'(u))``. ``f'`` is unimodal with
    its maximum at 0, so ``λ ≤ f'`` on ``[l, u]`` and ``g = f − λx`` is non-decreasing:
    ``f(x) ∈ λx + [g(l), g(u)]``."""
    lam = torch.minimum(df(lower), df(upper))
    g_l, g_u = f(lower) - lam * lower, f(upper) - lam * upper
    return ParallelRelaxation(lam, (g_u + g_l) / 2, ((g_u - g_l) / 2).clamp_min(0.0))


def _dsigmoid(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _dtanh(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


def _sigmoid_linear(lower: Tensor, upper: Tensor, *, policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                    lower_slope: Tensor | None = None,
                    pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    return _s_linear(torch.sigmoid, _dsigmoid, 0.5, lower, upper, lower_slope)


def _tanh_linear(lower: Tensor, upper: Tensor, *, policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                 lower_slope: Tensor | None = None,
                 pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    return _s_linear(torch.tanh, _dtanh, 0.0, lower, upper, lower_slope)


def _sigmoid_parallel(lower: Tensor, upper: Tensor) -> ParallelRelaxation:
    return _s_parallel(torch.sigmoid, _dsigmoid, lower, upper)


def _tanh_parallel(lower: Tensor, upper: Tensor) -> ParallelRelaxation:
    return _s_parallel(torch.tanh, _dtanh, lower, upper)


# ---- hardtanh: clip to [a, b], piecewise linear ---------------------------------------------

def _finite_range(lower: Tensor, upper: Tensor, a: float, b: float) -> tuple[Tensor, Tensor]:
    """``a``, ``b`` as tensors, an infinite one replaced by a value beyond ``[l, u]`` and beyond
    the other end of the range (the clip then does not bind there, and no branch computes with
    infinities)."""
    a_t = lower.clamp_max(b) - 1 if a == -math.inf else torch.full_like(lower, a)
    b_t = upper.clamp_min(a) + 1 if b == math.inf else torch.full_like(lower, b)
    return a_t, b_t


def _hardtanh_linear(lower: Tensor, upper: Tensor, min_val: float, max_val: float, *,
                     policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                     lower_slope: Tensor | None = None,
                     pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    """``clip(x, a, b)``. Flat or identity where ``[l, u]`` misses the kinks. Across ``a`` only
    it is ``a + relu(x − a)`` and across ``b`` only ``b − relu(b − x)``: the ReLU lines, with
    the free slope chosen by ``policy``. Across both, the upper line goes through ``(b, b)``
    with a slope in ``[0, (b − a)/(b − l)]`` and the lower one through ``(a, a)`` with a slope
    in ``[0, (b − a)/(u − a)]`` (each stays on the right side of all three pieces); the
    extreme slope is taken when it reduces the area (midpoint below ``b`` / above ``a``)."""
    _no_free_slope("hardtanh", lower_slope)
    a, b = _finite_range(lower, upper, min_val, max_val)
    zero, one = torch.zeros_like(lower), torch.ones_like(lower)
    # Lower kink only: f = a + relu(x − a), relu(z) ∈ [s z, k z + c].
    r = linear_relaxation(ops.relu, lower - a, upper - a, policy=policy, pq=pq)
    lk = (r.lower_slope, a - r.lower_slope * a, r.upper_slope, r.upper_bias + a - r.upper_slope * a)
    # Upper kink only: f = b − relu(b − x).
    r = linear_relaxation(ops.relu, b - upper, b - lower, policy=policy, pq=pq)
    uk = (r.upper_slope, b - r.upper_slope * b - r.upper_bias, r.lower_slope, b - r.lower_slope * b)
    # Both kinks.
    mid = (lower + upper) / 2
    s_up = torch.where(mid < b, (b - a) / (b - lower).clamp_min(_TINY), zero)
    s_lo = torch.where(mid > a, (b - a) / (upper - a).clamp_min(_TINY), zero)
    bk = (s_lo, a - s_lo * a, s_up, b - s_up * b)
    cases = [
        (upper <= a, (zero, a, zero, a)),
        (lower >= b, (zero, b, zero, b)),
        ((lower >= a) & (upper <= b), (one, zero, one, zero)),
        ((lower < a) & (upper <= b), lk),
        ((lower >= a) & (upper > b), uk),
    ]
    out = list(bk)
    for mask, fields in reversed(cases):  # the first matching case wins
        out = [torch.where(mask, v, o) for v, o in zip(fields, out)]
    return LinearRelaxation(*out)


def _hardtanh_parallel(lower: Tensor, upper: Tensor, min_val: float,
                       max_val: float) -> ParallelRelaxation:
    """Slope ``λ`` = the chord's (in ``[0, 1]``); ``g = f − λx`` is piecewise linear with kinks
    at ``a`` and ``b`` only, so its extremes on ``[l, u]`` are among ``l, u`` and the kinks
    clamped into ``[l, u]``. (For ReLU = clip(x, 0, ∞) this is DeepZ's parallelogram.)"""
    a, b = _finite_range(lower, upper, min_val, max_val)
    f = lambda x: torch.minimum(torch.maximum(x, a), b)  # noqa: E731
    inside = ((lower > a) & (lower < b)).to(lower)
    lam = _chord_or_tangent(f(lower), f(upper), lower, upper, inside).clamp(0.0, 1.0)
    points = [lower, upper, torch.minimum(torch.maximum(a, lower), upper),
              torch.minimum(torch.maximum(b, lower), upper)]
    g = torch.stack([f(x) - lam * x for x in points])
    g_lo, g_hi = g.amin(0), g.amax(0)
    return ParallelRelaxation(lam, (g_hi + g_lo) / 2, (g_hi - g_lo) / 2)


# ---- exp: convex, increasing, positive (ACE App. H.3) ---------------------------------------

def _exp_t_crit(lower: Tensor, upper: Tensor) -> Tensor:
    """``t_crit = log((e^u − e^l)/(u − l))`` (ACE Eq. 15 for exp), in the stable form
    ``l + log(expm1(d)/d) = l + d + log(−expm1(−d)) − log(d)`` with ``d = u − l``."""
    d = upper - lower
    ok = d > _TINY
    safe = torch.where(ok, d, 1.0)
    offset = safe + torch.log(-torch.expm1(-safe)) - torch.log(safe)
    return torch.minimum(torch.maximum(lower + torch.where(ok, offset, 0.0), lower), upper)


def _exp_linear(lower: Tensor, upper: Tensor, *, policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                lower_slope: Tensor | None = None,
                pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    """Upper: the chord (slope ``e^{t_crit}``); lower: the tangent at the midpoint (largest area
    under a tangent), moved to ``t ≤ l + 1 − δ`` so that the line stays > 0 on ``[l, u]``
    (``e^t (l − t + 1) > 0``, as in ACE Eq. 22) and a following log sees positive bounds."""
    _no_free_slope("exp", lower_slope)
    t = torch.minimum((lower + upper) / 2, lower + (1 - _EXP_POSITIVE_DELTA))
    e_t = torch.exp(t)
    chord = torch.exp(_exp_t_crit(lower, upper))
    e_l = torch.exp(lower)
    return LinearRelaxation(e_t, e_t * (1 - t), chord, e_l - chord * lower)


def _exp_parallel(lower: Tensor, upper: Tensor) -> ParallelRelaxation:
    """ACE App. H.3: tangent point ``t_opt = min(t_crit, t_crit,2)`` with ``t_crit,2 = l + 1 − δ``:
    the minimum-area parallelogram whose lower edge stays > 0 at ``l`` (Eq. 22)."""
    t = torch.minimum(_exp_t_crit(lower, upper), lower + (1 - _EXP_POSITIVE_DELTA))
    return _tangent_parallel(torch.exp, torch.exp, lower, upper, t, convex=True)


# ---- log: concave, increasing on x > 0 (ACE App. H.4) ---------------------------------------

def _nan_unless(valid: Tensor, x: Tensor) -> Tensor:
    return torch.where(valid, x, math.nan)


def _log_t_crit(lower: Tensor, upper: Tensor) -> Tensor:
    """``t_crit = (u − l)/(ln u − ln l)`` (ACE App. H.4), the logarithmic mean, computed as
    ``d / log1p(d / l)``; ``l`` on a point interval."""
    d = upper - lower
    ok = d > _TINY
    t = torch.where(ok, d, 1.0) / torch.log1p(torch.where(ok, d, 1.0) / lower)
    return torch.minimum(torch.maximum(torch.where(ok, t, lower), lower), upper)


def _log_linear(lower: Tensor, upper: Tensor, *, policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                lower_slope: Tensor | None = None,
                pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    """Lower: the chord; upper: the tangent at the midpoint. NaN where ``l ≤ 0`` (log is not
    bounded below there)."""
    _no_free_slope("log", lower_slope)
    valid = lower > 0
    lo = torch.where(valid, lower, 1.0)
    up = torch.where(valid, upper, 1.0)
    m = (lo + up) / 2
    r = _flip_concave(_convex_linear(-torch.log(lo), -torch.log(up), lo, up, -1 / lo,
                                     -torch.log(m), -1 / m, m))
    return LinearRelaxation(*(_nan_unless(valid, v) for v in (
        r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias)))


def _log_parallel(lower: Tensor, upper: Tensor) -> ParallelRelaxation:
    """ACE App. H.4: tangent point ``t_crit`` (minimum area); NaN where ``l ≤ 0``."""
    valid = lower > 0
    lo = torch.where(valid, lower, 1.0)
    up = torch.where(valid, upper, 1.0)
    p = _tangent_parallel(torch.log, torch.reciprocal, lo, up, _log_t_crit(lo, up), convex=False)
    return ParallelRelaxation(*(_nan_unless(valid, v) for v in (p.slope, p.offset, p.radius)))


# ---- reciprocal: 1/x, convex decreasing on x > 0, odd -----------------------------------------

def _positive_side(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(p, q, negative, crossing)``: the interval ``[p, q] ⊂ (0, ∞)`` that ``|x|`` ranges
    over when ``[l, u]`` lies on one side of 0 (``1/x = −1/(−x)`` maps ``x < 0`` onto it)."""
    negative, crossing = upper < 0, (lower <= 0) & (upper >= 0)
    p = torch.where(negative, -upper, lower)
    q = torch.where(negative, -lower, upper)
    p = torch.where(crossing, 1.0, p)
    q = torch.where(crossing, 1.0, q)
    return p, q, negative, crossing


def _reciprocal_linear(lower: Tensor, upper: Tensor, *,
                       policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                       lower_slope: Tensor | None = None,
                       pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    """On ``[p, q] ⊂ (0, ∞)``: upper chord ``(p + q − x)/(pq)``, lower tangent at the midpoint
    ``(2m − x)/m²`` (positive on ``[p, q]``). For ``x < 0`` via ``f(x) = −f(−x)``: the lines
    swap roles, keep their slopes and negate their biases. Unbounded (±inf) across 0."""
    _no_free_slope("reciprocal", lower_slope)
    p, q, negative, crossing = _positive_side(lower, upper)
    m = (p + q) / 2
    r = LinearRelaxation(-1 / (m * m), 2 / m, -1 / (p * q), 1 / p + 1 / q)
    lo_s = torch.where(negative, r.upper_slope, r.lower_slope)
    lo_b = torch.where(negative, -r.upper_bias, r.lower_bias)
    up_s = torch.where(negative, r.lower_slope, r.upper_slope)
    up_b = torch.where(negative, -r.lower_bias, r.upper_bias)
    zero = torch.zeros_like(lower)
    return LinearRelaxation(
        torch.where(crossing, zero, lo_s), torch.where(crossing, -math.inf, lo_b),
        torch.where(crossing, zero, up_s), torch.where(crossing, math.inf, up_b))


def _reciprocal_parallel(lower: Tensor, upper: Tensor) -> ParallelRelaxation:
    """ACE App. H.2 with ``t_crit = √(pq)`` (``−1/t² = −1/(pq)``, the chord's slope); for
    ``x < 0`` the offset is negated. Unbounded (infinite radius) across 0."""
    p, q, negative, crossing = _positive_side(lower, upper)
    r = _tangent_parallel(torch.reciprocal, lambda x: -1 / (x * x), p, q, torch.sqrt(p * q),
                          convex=True)
    offset = torch.where(negative, -r.offset, r.offset)
    return ParallelRelaxation(torch.where(crossing, 0.0, r.slope),
                              torch.where(crossing, 0.0, offset),
                              torch.where(crossing, math.inf, r.radius))


relaxation(ops.sigmoid, _sigmoid_linear, _sigmoid_parallel)
relaxation(ops.tanh, _tanh_linear, _tanh_parallel)
relaxation(ops.hardtanh, _hardtanh_linear, _hardtanh_parallel)
relaxation(ops.exp, _exp_linear, _exp_parallel)
relaxation(ops.log, _log_linear, _log_parallel)
relaxation(ops.reciprocal, _reciprocal_linear, _reciprocal_parallel)
