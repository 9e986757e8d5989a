"""The relaxation table: every entry's linear and parallel relaxations hold on dense grids of
random intervals (point intervals included), in float32 and float64, without NaN values or
gradients, and with the tightness properties the derivations promise."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from certfx import ops
from certfx.domains.relaxations import RELAXATIONS, linear_relaxation, parallel_relaxation

N = 3000

# op -> [(op_args, interval kind)]; kinds: "any", "positive", "negative"
ENTRIES: dict[Callable[..., Any], list[tuple[tuple, str]]] = {
    ops.relu: [((), "any")],
    ops.leaky_relu: [((0.1,), "any")],
    ops.sigmoid: [((), "any")],
    ops.tanh: [((), "any")],
    ops.hardtanh: [((-1.0, 1.0), "any"), ((0.0, math.inf), "any"), ((-math.inf, 0.3), "any"),
                   ((-0.2, 0.1), "any"), ((0.0, 6.0), "any")],
    ops.exp: [((), "any")],
    ops.log: [((), "positive")],
    ops.reciprocal: [((), "positive"), ((), "negative")],
}


def _intervals(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    center = torch.randn(N, dtype=dtype) * 3
    radius = torch.rand(N, dtype=dtype) * torch.rand(N, dtype=dtype) * 6
    radius[: N // 10] = 0.0  # point intervals
    lo, hi = center - radius, center + radius
    if kind == "positive":
        lo, hi = center.abs() + 0.01, center.abs() + 0.01 + 2 * radius
    elif kind == "negative":
        lo, hi = -(center.abs() + 0.01 + 2 * radius), -(center.abs() + 0.01)
    return lo, hi


def test_every_entry_is_tested() -> None:
    assert set(RELAXATIONS) == set(ENTRIES)


def _cases() -> list:
    return [pytest.param(op, args, kind, dtype, id=f"{op.__name__}{list(args)}-{kind}-{dtype}")
            for op, entries in ENTRIES.items() for args, kind in entries
            for dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize("op,args,kind,dtype", _cases())
def test_relaxations_hold(op: Callable[..., Any], args: tuple, kind: str,
                          dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lo, hi = _intervals(kind, dtype)
    lin = linear_relaxation(op, lo, hi, *args)
    par = parallel_relaxation(op, lo, hi, *args)
    for v in (*vars(lin).values(), *vars(par).values()):
        assert not torch.isnan(v).any()
    assert bool((par.radius >= 0).all())
    x = lo + torch.linspace(0, 1, 201, dtype=dtype).unsqueeze(1) * (hi - lo)  # (201, N)
    x = torch.minimum(torch.maximum(x, lo), hi)  # rounding must not leave [lo, hi]
    y = op(x, *args)
    rel = 1e-6 if dtype == torch.float32 else 1e-14

    def ordered(low: torch.Tensor, high: torch.Tensor, *terms: torch.Tensor) -> bool:
        """``low ≤ high`` up to the rounding of the terms that were summed."""
        scale = 1 + y.abs() + sum(t.abs() for t in terms)
        return bool((low <= high + rel * scale).all())

    for slope, bias, side in ((lin.lower_slope, lin.lower_bias, -1),
                              (lin.upper_slope, lin.upper_bias, 1),
                              (par.slope, par.offset - par.radius, -1),
                              (par.slope, par.offset + par.radius, 1)):
        line = slope * x + bias
        low, high = (line, y) if side < 0 else (y, line)
        assert ordered(low, high, slope * x, bias, par.radius), f"side {side} fails"
    point = lo == hi  # exact on point intervals
    assert bool((par.radius[point] <= 1e3 * rel * (1 + y[0][point].abs())).all())


@pytest.mark.parametrize("op,args,kind", [(op, a, k) for op, es in ENTRIES.items()
                                          for a, k in es])
def test_gradients_are_finite(op: Callable[..., Any], args: tuple, kind: str) -> None:
    torch.manual_seed(1)
    lo, hi = _intervals(kind, torch.float64)
    lo.requires_grad_(True)
    hi.requires_grad_(True)
    lin = linear_relaxation(op, lo, hi, *args)
    par = parallel_relaxation(op, lo, hi, *args)
    sum(v.sum() for v in (*vars(lin).values(), *vars(par).values())).backward()
    assert torch.isfinite(lo.grad).all() and torch.isfinite(hi.grad).all()


def test_exp_stays_positive_and_uses_the_minimum_area_slope() -> None:
    """ACE App. H.3: t_opt = min(t_crit, l + 1 − δ); the lower edge is > 0 at l."""
    lo = torch.tensor([-1.0, 0.0, -5.0, 2.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.5, 5.0, 2.0], dtype=torch.float64)
    par = parallel_relaxation(ops.exp, lo, hi)
    assert bool((par.slope * lo + par.offset - par.radius > 0).all())
    t_crit = torch.log((hi.exp() - lo.exp()) / (hi - lo))
    t_crit[3] = lo[3]  # a point interval
    torch.testing.assert_close(par.slope, torch.minimum(t_crit, lo + 1 - 1 / 64).exp())
    assert bool((t_crit[:3] > lo[:3] + 1 - 1 / 64).tolist() == [True, False, True])
    lin = linear_relaxation(ops.exp, lo, hi)
    assert bool((lin.lower_slope * lo + lin.lower_bias > 0).all())


def test_s_shaped_lines_are_chords_or_tangents() -> None:
    """On the convex side the chord is the upper line; across 0 with a short left part the
    chord is still valid (k ≤ f'(u)); a tangent touches otherwise."""
    lo = torch.tensor([-4.0, -0.5, -4.0])
    hi = torch.tensor([-1.0, 3.0, 4.0])
    r = linear_relaxation(ops.sigmoid, lo, hi)
    chord = (torch.sigmoid(hi) - torch.sigmoid(lo)) / (hi - lo)
    torch.testing.assert_close(r.upper_slope[0], chord[0])
    torch.testing.assert_close(r.lower_slope[1], chord[1])  # lower chord: k ≤ f'(l)
    x = torch.linspace(-4, 4, 10001)
    gap = r.upper_slope[2] * x + r.upper_bias[2] - torch.sigmoid(x)
    assert float(gap.min()) < 1e-4  # the tangent touches the curve


def test_invalid_domains_give_non_finite_bounds() -> None:
    lo, hi = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0])
    assert torch.isnan(parallel_relaxation(ops.log, lo, hi).radius).all()
    assert torch.isnan(linear_relaxation(ops.log, lo, hi).lower_bias).all()
    r = parallel_relaxation(ops.reciprocal, lo, hi)
    assert torch.isinf(r.radius).all()
    lin = linear_relaxation(ops.reciprocal, lo, hi)
    assert torch.isinf(lin.lower_bias).all() and torch.isinf(lin.upper_bias).all()


def test_free_lower_line_only_for_relu_like_and_s_shaped_ops() -> None:
    for op in (ops.exp, ops.hardtanh):
        args = (-1.0, 1.0) if op is ops.hardtanh else ()
        with pytest.raises(ValueError, match="no free lower slope"):
            linear_relaxation(op, torch.zeros(1), torch.ones(1), *args,
                              lower_slope=torch.ones(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [ops.sigmoid, ops.tanh])
def test_s_shaped_lower_lines_hold_at_every_tangent_position(op, dtype) -> None:
    """α-CROWN's positions (0, 1, anything between, and beyond: projected) all give sound
    lower lines, with finite gradients; the upper line does not move."""
    torch.manual_seed(2)
    lo, hi = _intervals("any", dtype)
    default = linear_relaxation(op, lo, hi)
    x = lo + torch.linspace(0, 1, 201, dtype=dtype).unsqueeze(1) * (hi - lo)
    x = torch.minimum(torch.maximum(x, lo), hi)
    y = op(x)
    rel = 1e-6 if dtype == torch.float32 else 1e-14
    for position in (torch.zeros(N, dtype=dtype), torch.ones(N, dtype=dtype),
                     torch.rand(N, dtype=dtype), torch.rand(N, dtype=dtype) * 3 - 1):
        position.requires_grad_(True)
        lin = linear_relaxation(op, lo, hi, lower_slope=position)
        line = lin.lower_slope * x + lin.lower_bias
        scale = 1 + y.abs() + (lin.lower_slope * x).abs() + lin.lower_bias.abs()
        assert bool((line <= y + rel * scale).all())
        torch.testing.assert_close(lin.upper_slope, default.upper_slope)
        (lin.lower_slope.sum() + lin.lower_bias.sum()).backward()
        assert torch.isfinite(position.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [ops.sigmoid, ops.tanh])
def test_s_shaped_alpha_crown_lines_hold_at_every_pair_of_positions(op, dtype) -> None:
    """α-CROWN's relaxation of sigmoid and tanh has two free positions, the lower line's and
    (by point symmetry) the upper line's: every pair gives lines around ``f``, with finite
    gradients, and the upper line does move with its position."""
    from certfx.domains.interval import Interval
    from certfx.domains.linear_backward import RELAX_WEIGHTED

    torch.manual_seed(3)
    lo, hi = _intervals("any", dtype)
    bounds = Interval(lo.unsqueeze(0), hi.unsqueeze(0))  # one example of N neurons
    start = RELAX_WEIGHTED[op](bounds)
    assert start.weight.shape == (1, 1, 2, N)
    x = lo + torch.linspace(0, 1, 201, dtype=dtype).unsqueeze(1) * (hi - lo)
    x = torch.minimum(torch.maximum(x, lo), hi)
    y = op(x)
    rel = 1e-6 if dtype == torch.float32 else 1e-14
    uppers = []
    for make in (torch.zeros, torch.ones, torch.rand, lambda *s, dtype: torch.rand(*s) * 3 - 1):
        alpha = make(1, 1, 2, N, dtype=dtype).requires_grad_(True)
        lin = RELAX_WEIGHTED[op](bounds, alpha=alpha)
        lower = lin.lower_slope[0, 0] * x + lin.lower_bias[0, 0]
        upper = lin.upper_slope[0, 0] * x + lin.upper_bias[0, 0]
        assert bool((lower <= y + rel * (1 + y.abs() + lower.abs())).all())
        assert bool((upper >= y - rel * (1 + y.abs() + upper.abs())).all())
        (lin.lower_bias.sum() + lin.upper_bias.sum() + lin.upper_slope.sum()).backward()
        assert torch.isfinite(alpha.grad).all()
        uppers.append(lin.upper_slope.detach())
    crossing = (lo < -0.5) & (hi > 0.5)
    assert bool((uppers[0] != uppers[1])[0, 0][crossing].any())
