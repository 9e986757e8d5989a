"""One table of activation relaxations, read by the zonotope, back-substitution and MILP code.

For an elementwise activation ``f`` on pre-activation bounds ``l ≤ x ≤ u`` an entry gives

* a :class:`LinearRelaxation`: lines with ``a_l x + b_l ≤ f(x) ≤ a_u x + b_u`` on ``[l, u]``
  (DeepPoly, Singh et al. 2019, Sec. 4; CROWN, Zhang et al. 2018, Sec. 3.1). The lower slope of
  ReLU-like functions is free in ``[0, 1]``; :class:`SlopePolicy` chooses it, or the caller
  passes it (α-CROWN optimizes it);
* a :class:`ParallelRelaxation`: ``f(x) ∈ λ x + μ ± β`` (two parallel lines), the form the
  zonotope transformers need (DeepZ, Singh et al. 2018, Thm. 3.1 for ReLU).

Registering a new activation is one :func:`relaxation` entry. ReLU and leaky ReLU are defined
here; sigmoid, tanh, hardtanh, exp, log and reciprocal in
:mod:`certfx.domains.relaxation_entries`.

Example:
    >>> import torch
    >>> from certfx import ops
    >>> r = linear_relaxation(ops.relu, torch.tensor([-1.0]), torch.tensor([3.0]))
    >>> r.upper_slope.item(), r.upper_bias.item(), r.lower_slope.item()
    (0.75, 0.75, 1.0)
    >>> p = parallel_relaxation(ops.relu, torch.tensor([-1.0]), torch.tensor([3.0]))
    >>> p.slope.item(), p.offset.item(), p.radius.item()
    (0.75, 0.375, 0.375)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from certfx import ops

__all__ = [
    "LinearRelaxation",
    "ParallelRelaxation",
    "SlopePolicy",
    "Relaxation",
    "RELAXATIONS",
    "relaxation",
    "linear_relaxation",
    "parallel_relaxation",
]


@dataclass(frozen=True)
class LinearRelaxation:
    """Elementwise ``lower_slope·x + lower_bias ≤ f(x) ≤ upper_slope·x + upper_bias`` on
    ``[l, u]``; all fields broadcast to the shape of ``l``."""

    lower_slope: Tensor
    lower_bias: Tensor
    upper_slope: Tensor
    upper_bias: Tensor


@dataclass(frozen=True)
class ParallelRelaxation:
    """Elementwise ``f(x) ∈ [slope·x + offset − radius, slope·x + offset + radius]`` on
    ``[l, u]`` (``radius ≥ 0``)."""

    slope: Tensor
    offset: Tensor
    radius: Tensor


class SlopePolicy(enum.Enum):
    """How to choose the free lower slope of a ReLU-like relaxation on a crossing neuron.

    * ``ADAPTIVE``: 1 if ``u ≥ −l`` else 0, the smaller-area choice (DeepPoly/CROWN).
    * ``ZERO`` / ``ONE``: always 0 / always 1.
    * ``PARALLEL``: the upper line's slope ``u / (u − l)`` (as in Fast-Lin/DeepZ).
    * ``RANDOM``: 1 with probability ``p`` where ``u ≥ −l`` and with probability ``q``
      otherwise (the thesis' (p, q)-random slopes, paper 004, Sec. 3.3).
    """

    ADAPTIVE = "adaptive"
    ZERO = "zero"
    ONE = "one"
    PARALLEL = "parallel"
    RANDOM = "random"


LinearFn = Callable[..., LinearRelaxation]
ParallelFn = Callable[..., ParallelRelaxation]


@dataclass(frozen=True)
class Relaxation:
    """The relaxations of one activation; ``op_args`` (e.g. a leaky slope) follow ``l, u``."""

    linear: LinearFn
    parallel: ParallelFn


RELAXATIONS: dict[Callable[..., Any], Relaxation] = {}


def relaxation(op: Callable[..., Any], linear: LinearFn, parallel: ParallelFn) -> None:
    """Register the relaxations of the elementwise core op ``op`` (once)."""
    if op in RELAXATIONS:
        raise ValueError(f"relaxation for {op.__name__} registered twice")
    RELAXATIONS[op] = Relaxation(linear, parallel)


def linear_relaxation(op: Callable[..., Any], lower: Tensor, upper: Tensor, *op_args: Any,
                      policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                      lower_slope: Tensor | None = None,
                      pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    """The :class:`LinearRelaxation` of ``op`` on ``[lower, upper]``.

    Args:
        op: an elementwise core op with a registered relaxation.
        lower, upper: pre-activation bounds.
        op_args: the op's extra arguments (leaky slope, hardtanh range, …).
        policy: how to choose a free lower slope (ReLU-like ops).
        lower_slope: an explicit lower slope (α-CROWN); clipped to the valid range.
        pq: the probabilities of :attr:`SlopePolicy.RANDOM`.
    """
    entry = RELAXATIONS.get(op)
    if entry is None:
        raise KeyError(f"no relaxation registered for {getattr(op, '__name__', op)}")
    return entry.linear(lower, upper, *op_args, policy=policy, lower_slope=lower_slope, pq=pq)


def parallel_relaxation(op: Callable[..., Any], lower: Tensor, upper: Tensor,
                        *op_args: Any) -> ParallelRelaxation:
    """The :class:`ParallelRelaxation` of ``op`` on ``[lower, upper]``."""
    entry = RELAXATIONS.get(op)
    if entry is None:
        raise KeyError(f"no relaxation registered for {getattr(op, '__name__', op)}")
    return entry.parallel(lower, upper, *op_args)


# ---- ReLU and leaky ReLU --------------------------------------------------------------------

def _free_slope(lower: Tensor, upper: Tensor, policy: SlopePolicy, lower_slope: Tensor | None,
                pq: tuple[float, float], low: float) -> Tensor:
    """The lower slope in ``[low, 1]`` of a crossing ReLU-like neuron."""
    if lower_slope is not None:
        return lower_slope.clamp(low, 1.0)
    big_upper = upper >= -lower
    if policy is SlopePolicy.ADAPTIVE:
        return torch.where(big_upper, 1.0, low).to(lower)
    if policy is SlopePolicy.ZERO:
        return torch.full_like(lower, low)
    if policy is SlopePolicy.ONE:
        return torch.ones_like(lower)
    if policy is SlopePolicy.PARALLEL:
        return _chord_slope(lower, upper, low)
    if policy is SlopePolicy.RANDOM:
        p, q = pq
        draw = torch.rand_like(lower)
        return torch.where(draw < torch.where(big_upper, p, q), 1.0, low).to(lower)
    raise ValueError(f"unknown slope policy {policy!r}")


def _chord_slope(lower: Tensor, upper: Tensor, low: float) -> Tensor:
    """Slope of the chord of ``max(low·x, x)`` from ``l < 0`` to ``u > 0``."""
    width = (upper - lower).clamp_min(1e-12)
    return (upper - low * lower) / width


def _leaky_linear(lower: Tensor, upper: Tensor, negative_slope: float,
                  policy: SlopePolicy, lower_slope: Tensor | None,
                  pq: tuple[float, float]) -> LinearRelaxation:
    """Leaky ReLU ``max(a·x, x)`` with ``0 ≤ a ≤ 1`` (ReLU: ``a = 0``): convex, so the chord is
    the upper line and any slope in ``[a, 1]`` through 0 is a lower line."""
    a = float(negative_slope)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"the linear relaxation needs a leaky slope in [0, 1], got {a}")
    active, inactive = lower >= 0, upper <= 0
    chord = _chord_slope(lower, upper, a)
    up_slope = torch.where(active, 1.0, torch.where(inactive, a, chord)).to(lower)
    up_bias = torch.where(active | inactive, 0.0, (a - chord) * lower).to(lower)
    free = _free_slope(lower, upper, policy, lower_slope, pq, a)
    lo_slope = torch.where(active, 1.0, torch.where(inactive, a, free)).to(lower)
    return LinearRelaxation(lo_slope, torch.zeros_like(lower), up_slope, up_bias)


def _relu_linear(lower: Tensor, upper: Tensor, *, policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                 lower_slope: Tensor | None = None,
                 pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    return _leaky_linear(lower, upper, 0.0, policy, lower_slope, pq)


def _leaky_relu_linear(lower: Tensor, upper: Tensor, negative_slope: float, *,
                       policy: SlopePolicy = SlopePolicy.ADAPTIVE,
                       lower_slope: Tensor | None = None,
                       pq: tuple[float, float] = (1.0, 0.0)) -> LinearRelaxation:
    return _leaky_linear(lower, upper, negative_slope, policy, lower_slope, pq)


def _leaky_parallel(lower: Tensor, upper: Tensor, negative_slope: float) -> ParallelRelaxation:
    """DeepZ's minimum-area parallelogram (Singh et al. 2018, Thm. 3.1), for ``max(a·x, x)``:
    slope ``λ`` = the chord's; the lines through the chord and through the kink at 0."""
    a = float(negative_slope)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"the zonotope relaxation needs a leaky slope in [0, 1], got {a}")
    active, inactive = lower >= 0, upper <= 0
    chord = _chord_slope(lower, upper, a)
    slope = torch.where(active, 1.0, torch.where(inactive, a, chord)).to(lower)
    # For a crossing neuron f(x) − λx lies in [0, (a − λ)·l] (the chord sits (a−λ)l above 0).
    half = torch.where(active | inactive, 0.0, (a - chord) * lower / 2).to(lower)
    return ParallelRelaxation(slope, half, half)


def _relu_parallel(lower: Tensor, upper: Tensor) -> ParallelRelaxation:
    return _leaky_parallel(lower, upper, 0.0)


relaxation(ops.relu, _relu_linear, _relu_parallel)
relaxation(ops.leaky_relu, _leaky_relu_linear, _leaky_parallel)


# The entries of sigmoid, tanh, hardtanh, exp, log and reciprocal register themselves from their
# own module; importing it here completes the table whenever this module is loaded.
from certfx.domains import relaxation_entries as _entries  # noqa: E402, F401
