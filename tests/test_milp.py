"""The MILP backend against exhaustive enumeration of activation patterns on tiny networks, its
verification answers and re-checked counterexamples, partial MILP, and bad inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ortools.linear_solver import pywraplp
from torch import nn

import certfx
from certfx.backends.milp import MilpOptions, MilpStatus, output_bounds, verify_property
from certfx.errors import UnsupportedOpsError
from certfx.specs import Conjunction, Property, UnsafeRegion


def _mlp(seed: int, widths: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _enumerate(net: nn.Sequential, lo: np.ndarray, hi: np.ndarray, c: np.ndarray,
               maximize: bool) -> float:
    """``min/max c·net(x)`` over the box: one LP per activation pattern (GLOP, built here from
    the weights, independently of the encoder). Every quantity is affine in ``x`` for a fixed
    pattern: ``z = A x + a``."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears]
    hidden = [w.shape[0] for w, _ in weights[:-1]]
    best = -np.inf if maximize else np.inf
    for pattern in itertools.product((0, 1), repeat=sum(hidden)):
        solver = pywraplp.Solver.CreateSolver("GLOP")
        xs = [solver.NumVar(float(lo[i]), float(hi[i]), f"x{i}") for i in range(len(lo))]
        A, a = np.eye(len(lo)), np.zeros(len(lo))
        k = 0
        for (w, b), width in zip(weights[:-1], hidden):
            A, a = w @ A, w @ a + b
            for j in range(width):
                expr = sum(float(A[j, i]) * xs[i] for i in range(len(lo))) + float(a[j])
                solver.Add(expr >= 0 if pattern[k + j] else expr <= 0)
            mask = np.array(pattern[k:k + width], dtype=float)
            A, a = mask[:, None] * A, mask * a
            k += width
        w, b = weights[-1]
        A, a = c @ (w @ A), float(c @ (w @ a + b))
        objective = sum(float(A[i]) * xs[i] for i in range(len(lo))) + a
        (solver.Maximize if maximize else solver.Minimize)(objective)
        if solver.Solve() == pywraplp.Solver.OPTIMAL:
            value = solver.Objective().Value()
            best = max(best, value) if maximize else min(best, value)
    return best


@pytest.mark.parametrize("seed, widths", [(0, (2, 4, 4, 2)), (1, (3, 5, 3, 2)),
                                          (2, (2, 10, 1))])
def test_output_bounds_equal_exhaustive_enumeration(seed: int, widths: tuple[int, ...]) -> None:
    net = _mlp(seed, widths)
    gm = certfx.load(net, torch.zeros(1, widths[0], dtype=torch.float64))
    lo = -np.ones(widths[0])
    hi = np.ones(widths[0]) * 0.5
    b = output_bounds(gm, torch.from_numpy(lo), torch.from_numpy(hi), MilpOptions(domains=()))
    for j in range(widths[-1]):
        c = np.eye(widths[-1])[j]
        assert b.lower[j] == pytest.approx(_enumerate(net, lo, hi, c, False), abs=1e-5)
        assert b.upper[j] == pytest.approx(_enumerate(net, lo, hi, c, True), abs=1e-5)


def test_verification_answers_and_counterexamples_recheck() -> None:
    net = _mlp(4, (2, 6, 6, 2))
    gm = certfx.load(net, torch.zeros(1, 2, dtype=torch.float64))
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    label = int(net(x[None]).argmax())
    for radius in (1e-3, 2.0):
        prop = Property(x - radius, x + radius, UnsafeRegion.misclassified(label, 2))
        result = verify_property(gm, prop, MilpOptions(domains=("crown",)))
        c = prop.unsafe.terms[0].matrix[0].numpy()  # y_label − y_other: min over the box
        exact = _enumerate(net, prop.lower.numpy(), prop.upper.numpy(), c, False)
        if exact > 1e-4:
            assert result.status is MilpStatus.VERIFIED
        elif exact < -1e-4:
            assert result.status is MilpStatus.FALSIFIED
            cex = result.counterexample.reshape(1, 2)
            assert bool(prop.is_counterexample(cex, net(cex)))


def test_partial_milp_lies_between_relaxation_and_exact() -> None:
    net = _mlp(5, (2, 8, 8, 8, 1))
    gm = certfx.load(net, torch.zeros(1, 2, dtype=torch.float64))
    lo, hi = torch.full((2,), -1.0, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    exact = output_bounds(gm, lo, hi, MilpOptions(domains=())).upper[0]
    partial = output_bounds(gm, lo, hi, MilpOptions(domains=(), exact_layers=1)).upper[0]
    relaxed = output_bounds(gm, lo, hi, MilpOptions(domains=(), exact_layers=0)).upper[0]
    assert exact - 1e-6 <= partial <= relaxed + 1e-6
    with torch.no_grad():  # the exact maximum is attained (up to a grid's resolution)
        grid = torch.cartesian_prod(*[torch.linspace(-1, 1, 201, dtype=torch.float64)] * 2)
        assert float(net(grid).max()) <= exact + 1e-6


def test_smooth_activations_need_the_relaxation_option() -> None:
    """Sigmoid has no exact encoding: named in an error, or soundly relaxed on request."""
    torch.manual_seed(6)
    gm = certfx.load(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1)),
                     torch.zeros(1, 2))
    unsafe = UnsafeRegion((Conjunction(torch.ones(1, 1), torch.tensor([-100.0])),))  # y <= −100
    prop = Property(torch.zeros(2), torch.ones(2), unsafe)
    with pytest.raises(UnsupportedOpsError, match="sigmoid"):
        verify_property(gm, prop, MilpOptions(domains=()))
    result = verify_property(gm, prop, MilpOptions(domains=(), allow_relaxation=True))
    assert result.status is MilpStatus.VERIFIED  # |y| is small: y <= −100 is impossible


def test_conv_and_max_pool_bounds_are_exact() -> None:
    """On a conv + max-pool net each proven minimum is attained by a real input: the property
    ``y_j <= min + 1e-3`` is falsified with a concretely re-checked counterexample, and
    ``y_j <= min − 1e-3`` is verified; no sampled input goes below the minimum."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(2, 2)).double()
    gm = certfx.load(net, torch.zeros(1, 1, 3, 3, dtype=torch.float64))
    lo, hi = torch.zeros(1, 3, 3, dtype=torch.float64), torch.ones(1, 3, 3, dtype=torch.float64)
    b = output_bounds(gm, lo.flatten(), hi.flatten(), MilpOptions(domains=()))
    for j in range(2):
        row = torch.eye(2, dtype=torch.float64)[j:j + 1]
        for slack, expected in ((1e-3, MilpStatus.FALSIFIED), (-1e-3, MilpStatus.VERIFIED)):
            unsafe = UnsafeRegion((Conjunction(row, torch.tensor([b.lower[j] + slack])),))
            result = verify_property(gm, Property(lo, hi, unsafe), MilpOptions(domains=()))
            assert result.status is expected, (j, slack, result.status)
    u = torch.rand(20000, 1, 3, 3, dtype=torch.float64)
    u[:10000] = (u[:10000] < 0.5).double()  # corners
    with torch.no_grad():
        y = net(u).numpy()
    assert (y.min(0) >= b.lower - 1e-6).all() and (y.max(0) <= b.upper + 1e-6).all()
