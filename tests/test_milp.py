"""Tests of the exact MILP backend (``certfx.backends.milp``).

Exactness is checked against an independent brute force: the networks are small enough to
enumerate every activation pattern (ReLU on/off, leaky/hardtanh pieces, the arg-max of every
max-pool window); on each pattern the network is affine, and an LP (GLOP, written here by hand)
gives the exact min/max of each output over the pattern's region of the input box.
"""

from __future__ import annotations

import copy
import csv
import doctest
import importlib
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ortools.linear_solver import pywraplp
from torch import nn

import certfx
from certfx.backends.milp import (
    MilpOptions,
    MilpStatus,
    Solver,
    Tightening,
    encode,
    encode_property,
    output_bounds,
    verify_property,
)
from certfx.backends.milp.nonlinear import pool_windows
from certfx.backends.milp.ortools import SCIP_PARAMETERS
from certfx.errors import UnsupportedOpsError
from certfx.report import prefix_graph
from certfx.specs import Conjunction, Property, UnsafeRegion
from tests.models import cnn_bn_maxpool, mlp, residual

EXACT = MilpOptions(domains=(), time_limit=30.0,
                    scip_parameters=SCIP_PARAMETERS + "limits/gap = 0\nlimits/absgap = 0\n")
TOL = 1e-6


# ---- independent brute force ----------------------------------------------------------------

def _lp(g: list[np.ndarray], h: list[float], lo: np.ndarray, hi: np.ndarray,
        obj: np.ndarray | None = None, maximize: bool = False) -> float | None:
    """Optimum of ``obj·x`` over ``{lo ≤ x ≤ hi, g x ≤ h}`` by GLOP (None if infeasible)."""
    s = pywraplp.Solver.CreateSolver("GLOP")
    x = [s.NumVar(float(a), float(b), "") for a, b in zip(lo, hi)]
    for row, rhs in zip(g, h):
        s.Add(sum(float(c) * v for c, v in zip(row, x) if c != 0) <= float(rhs))
    if obj is not None:
        (s.Maximize if maximize else s.Minimize)(sum(float(c) * v for c, v in zip(obj, x)))
    return s.Objective().Value() if s.Solve() == pywraplp.Solver.OPTIMAL else None


def _affine(module: nn.Module, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple]:
    n = int(np.prod(shape))
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        zero = module(torch.zeros(1, *shape, dtype=torch.float64))
        jac = (module(basis) - zero).reshape(n, -1).T.numpy()
    return jac, zero.reshape(-1).numpy(), tuple(zero.shape[1:])


def _pieces(module: nn.Module, n: int, shape: tuple[int, ...]):
    """Yield (selector rows S, constant s, constraint rows (G, h) on the input value z):
    on that piece the output is ``S z + s`` subject to ``G z ≤ h``."""
    if isinstance(module, nn.MaxPool2d):
        c, height, width = shape
        k = module.kernel_size
        windows = [[ch * height * width + (k * i + a) * width + (k * j + b)
                    for a in range(k) for b in range(k)]
                   for ch in range(c) for i in range(height // k) for j in range(width // k)]
        for choice in itertools.product(*[range(len(w)) for w in windows]):
            sel = np.zeros((len(windows), n))
            g = []
            for o, (w, pick) in enumerate(zip(windows, choice)):
                sel[o, w[pick]] = 1.0
                for other in w:
                    if other != w[pick]:
                        row = np.zeros(n)
                        row[other], row[w[pick]] = 1.0, -1.0   # z_other − z_pick ≤ 0
                        g.append((row, 0.0))
            yield sel, np.zeros(len(windows)), g
        return
    # pieces of an elementwise op: (slope, offset, [(sign, rhs): sign·z ≤ rhs])
    if isinstance(module, nn.LeakyReLU):
        options = [(1.0, 0.0, [(-1.0, 0.0)]), (module.negative_slope, 0.0, [(1.0, 0.0)])]
    elif isinstance(module, nn.Hardtanh):
        a, b = module.min_val, module.max_val
        options = [(0.0, a, [(1.0, a)]), (1.0, 0.0, [(-1.0, -a), (1.0, b)]),
                   (0.0, b, [(-1.0, -b)])]
    else:
        options = [(1.0, 0.0, [(-1.0, 0.0)]), (0.0, 0.0, [(1.0, 0.0)])]
    for choice in itertools.product(range(len(options)), repeat=n):
        sel, const, g = np.zeros((n, n)), np.zeros(n), []
        for i, k in enumerate(choice):
            sel[i, i], const[i], cons = options[k]
            for sign, rhs in cons:
                row = np.zeros(n)
                row[i] = sign
                g.append((row, rhs))
        yield sel, const, g


def brute_force(net: nn.Sequential, lo: np.ndarray, hi: np.ndarray,
                shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Exact min and max of every output over the box, by activation-pattern enumeration."""
    net = copy.deepcopy(net).double()
    found: list = []  # per feasible leaf: [[min of each output], [max of each output]]

    def walk(k: int, a: np.ndarray, c: np.ndarray, shp: tuple, g: list, h: list) -> None:
        if g and _lp(g, h, lo, hi) is None:
            return
        if k == len(net):
            found.append([[_lp(g, h, lo, hi, a[j], top) + c[j] for j in range(a.shape[0])]
                          for top in (False, True)])
            return
        m = net[k]
        if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.MaxPool2d)):
            for sel, const, rows in _pieces(m, a.shape[0], shp):
                new_g = g + [r @ a for r, _ in rows]
                new_h = h + [rhs - r @ c for r, rhs in rows]
                out_shape = shp if not isinstance(m, nn.MaxPool2d) else (
                    shp[0], shp[1] // m.kernel_size, shp[2] // m.kernel_size)
                walk(k + 1, sel @ a, sel @ c + const, out_shape, new_g, new_h)
            return
        jac, b, out_shape = _affine(m, shp)
        walk(k + 1, jac @ a, jac @ c + b, out_shape, g, h)

    n = int(np.prod(shape))
    walk(0, np.eye(n), np.zeros(n), shape, [], [])
    return np.array(found)[:, 0].min(0), np.array(found)[:, 1].max(0)


def _seeded(seed: int, *layers: nn.Module) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(*layers)
    for p in net.parameters():
        nn.init.uniform_(p, -1.0, 1.0)
    return net.eval()


TINY = {
    "mlp": lambda s: _seeded(s, nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                             nn.Linear(4, 2)),
    "leaky": lambda s: _seeded(s, nn.Linear(2, 4), nn.LeakyReLU(0.2), nn.Linear(4, 3),
                               nn.Hardtanh(-0.5, 0.5), nn.Linear(3, 2)),
    "odd_slopes": lambda s: _seeded(s, nn.Linear(2, 4), nn.LeakyReLU(-0.5), nn.Linear(4, 3),
                                    nn.LeakyReLU(1.5), nn.Linear(3, 2)),
    "conv": lambda s: _seeded(s, nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
    "maxpool": lambda s: _seeded(s, nn.Linear(2, 4), nn.ReLU(), nn.Unflatten(1, (1, 2, 2)),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 2)),
}
SHAPES = {"mlp": (2,), "leaky": (2,), "odd_slopes": (2,), "conv": (1, 3, 3), "maxpool": (2,)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(TINY))
def test_encoding_is_exact(name: str, seed: int) -> None:
    net, shape = TINY[name](seed), SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(shape, generator=gen, dtype=torch.float64) - 1.0
    hi = lo + 1.0 + torch.rand(shape, generator=gen, dtype=torch.float64)
    gm = certfx.load(net, torch.zeros(1, *shape))
    got = output_bounds(gm, lo, hi, EXACT)
    want_lo, want_hi = brute_force(net, lo.reshape(-1).numpy(), hi.reshape(-1).numpy(), shape)
    for proven, attained, want in ((got.lower, got.lower_attained, want_lo),
                                   (got.upper, got.upper_attained, want_hi)):
        np.testing.assert_allclose(proven, want, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(attained, want, atol=TOL, rtol=TOL)
    samples = lo + (hi - lo) * torch.rand(2000, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ys = copy.deepcopy(net).double()(samples).numpy()
    assert (ys >= got.lower - TOL).all() and (ys <= got.upper + TOL).all()


@pytest.mark.parametrize("make,shape", [(mlp, (3, 4)), (cnn_bn_maxpool, (1, 8, 8)),
                                        (residual, (3, 6, 6))])
def test_point_box_reproduces_the_network(make, shape) -> None:
    net = make()
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    enc = encode(certfx.load(net, torch.zeros(1, *shape)), x[0], x[0])
    want = copy.deepcopy(net).double()(x).reshape(-1).detach().numpy()
    for got in enc.output.interval(enc.problem.lower, enc.problem.upper):
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_cnn_maxima_are_attained_and_sound() -> None:
    net, shape = cnn_bn_maxpool(), (1, 8, 8)
    gm = certfx.load(net, torch.zeros(1, *shape))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = output_bounds(gm, x - 0.03, x + 0.03, MilpOptions(domains=("crown",), time_limit=20))
    net64 = copy.deepcopy(net).double()
    samples = x + 0.03 * (2 * torch.rand(500, *shape, dtype=torch.float64) - 1)
    ys = net64(samples).detach().numpy()
    assert (ys <= got.upper + TOL).all() and (ys >= got.lower - TOL).all()
    assert got.encoding.binaries > 0 and got.encoding.exact


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [
    (2, 2, 0, 1, False), (3, 2, 1, 1, False), (2, 1, 0, 2, False), (3, 2, 1, 1, True),
    (2, 3, 0, 1, True)])
def test_pool_windows_match_torch(kernel, stride, padding, dilation, ceil) -> None:
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64)
    want = nn.functional.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil)
    win = pool_windows((2, 7, 6), tuple(want.shape[1:]), (kernel,) * 2, (stride,) * 2,
                       (padding,) * 2, (dilation,) * 2)
    flat = torch.cat([x.reshape(-1), torch.tensor([-np.inf], dtype=torch.float64)])
    got = flat[torch.from_numpy(win)].max(1).values
    assert torch.equal(got, want.reshape(-1))


# ---- verification ---------------------------------------------------------------------------

def _robustness(eps: float, seed: int = 0) -> tuple[nn.Module, torch.fx.GraphModule, Property]:
    net = mlp(seed)
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed))
    label = int(net(x[None]).argmax())
    gm = certfx.load(net, torch.zeros(1, 3, 4))
    return net, gm, Property(x - eps, x + eps, UnsafeRegion.misclassified(label, 5))


@pytest.mark.parametrize("solver", [Solver.SCIP, Solver.HIGHS])
def test_property_that_holds_is_verified(solver: Solver) -> None:
    _, gm, prop = _robustness(0.02)
    result = verify_property(gm, prop, MilpOptions(solver=solver, time_limit=30))
    assert result.status is MilpStatus.VERIFIED and result.counterexample is None
    assert result.stats.sound and result.stats.exact


@pytest.mark.parametrize("solver", [Solver.SCIP, Solver.HIGHS])
def test_violated_property_gives_a_rechecked_counterexample(solver: Solver) -> None:
    net, gm, prop = _robustness(0.6)
    result = verify_property(gm, prop, MilpOptions(solver=solver, time_limit=60, domains=()))
    assert result.status is MilpStatus.FALSIFIED
    y = copy.deepcopy(net).double()(result.counterexample)
    assert bool(prop.is_counterexample(result.counterexample, y)[0])
    assert torch.allclose(y, result.output)


def test_cp_sat_never_verifies() -> None:
    """CP-SAT solves a discretized problem: its "infeasible" is not a proof."""
    _, gm, prop = _robustness(0.3)   # robust (sampling agrees), but needs solver proofs
    result = verify_property(gm, prop, MilpOptions(solver=Solver.CP_SAT, domains=(),
                                                   time_limit=3))
    assert result.status in (MilpStatus.UNKNOWN, MilpStatus.TIMEOUT)


def test_polytope_terms_and_margin() -> None:
    net, gm, prop = _robustness(0.05)
    y0 = net(((prop.lower + prop.upper) / 2)[None]).detach().double()[0]
    rows = torch.eye(5, dtype=torch.float64)[:2]
    # one impossible term (y0 ≤ y0(x) − 100) and one polytope containing the centre's output
    far = Conjunction(rows[:1], y0[:1] - 100)
    near = Conjunction(torch.cat([rows, -rows]), torch.cat([y0[:2] + 1, -(y0[:2] - 1)]))
    result = verify_property(gm, Property(prop.lower, prop.upper, UnsafeRegion((far, near))),
                             MilpOptions(time_limit=30))
    assert result.status is MilpStatus.FALSIFIED
    only_far = Property(prop.lower, prop.upper, UnsafeRegion((far,)))
    result = verify_property(gm, only_far, MilpOptions(time_limit=30, optimize_margin=True,
                                                       domains=()))
    assert result.status is MilpStatus.VERIFIED and result.stats.terms[0].bound > 90


def test_unsound_known_bounds_never_verify() -> None:
    _, gm, prop = _robustness(0.02)
    result = verify_property(gm, prop, MilpOptions(known_bounds_sound=False, time_limit=30))
    assert result.status is MilpStatus.UNKNOWN and not result.stats.sound


# ---- bounds, partial MILP, limits, errors ---------------------------------------------------

@pytest.mark.parametrize("mode", [Tightening.LP, Tightening.MILP])
def test_tightening_shrinks_bounds_soundly(mode: Tightening) -> None:
    net, gm, prop = _robustness(0.4, seed=1)
    plain, _ = encode_property(gm, prop.lower, prop.upper, MilpOptions(domains=()))
    tight, _ = encode_property(gm, prop.lower, prop.upper, MilpOptions(
        domains=(), tightening=mode, tighten_time_per_neuron=2.0))
    gm64 = copy.deepcopy(gm).double()
    samples = prop.lower + (prop.upper - prop.lower) * torch.rand(3000, 3, 4).double()
    shrunk = 0
    for name in tight.tightened:
        lo0, hi0 = plain.bounds[name]
        lo1, hi1 = tight.bounds[name]
        assert (lo1 >= lo0 - 1e-12).all() and (hi1 <= hi0 + 1e-12).all()
        values = prefix_graph(gm64, name)(samples).reshape(3000, -1).detach().numpy()
        assert (values >= lo1).all() and (values <= hi1).all()
        shrunk += int(((lo1 > lo0 + 1e-6) | (hi1 < hi0 - 1e-6)).sum())
    assert tight.tightened and shrunk > 0
    assert sum(tight.unstable.values()) <= sum(plain.unstable.values())


def test_partial_milp_lies_between_lp_and_exact() -> None:
    net = mlp(2)
    gm = certfx.load(net, torch.zeros(1, 3, 4))
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ups = {}
    for k in (0, 1, None):
        opts = MilpOptions(domains=(), exact_layers=k, time_limit=30,
                           scip_parameters=EXACT.scip_parameters)
        got = output_bounds(gm, x - 0.3, x + 0.3, opts)
        ups[k] = (got.lower, got.upper)
        assert got.encoding.exact == (k is None)
    assert (ups[0][1] >= ups[1][1] - TOL).all() and (ups[1][1] >= ups[None][1] - TOL).all()
    assert (ups[0][0] <= ups[1][0] + TOL).all() and (ups[1][0] <= ups[None][0] + TOL).all()
    assert (ups[0][1] > ups[None][1] + 1e-4).any()   # the relaxation is looser somewhere


def test_time_limit_is_honoured() -> None:
    net = _seeded(5, nn.Linear(20, 60), nn.ReLU(), nn.Linear(60, 60), nn.ReLU(),
                  nn.Linear(60, 60), nn.ReLU(), nn.Linear(60, 2))
    gm = certfx.load(net, torch.zeros(1, 20))
    lo, hi = -torch.ones(20), torch.ones(20)
    with torch.no_grad():
        best = float(net(lo + 2 * torch.rand(4000, 20))[:, 0].max())
    # "y0 ≥ (sampled max) + 0.01": probably unsat, and far too hard to prove in 2 s.
    term = Conjunction(-torch.eye(2, dtype=torch.float64)[:1], torch.tensor([-(best + 0.01)]))
    start = time.perf_counter()
    result = verify_property(gm, Property(lo, hi, UnsafeRegion((term,))),
                             MilpOptions(domains=(), time_limit=2.0))
    assert time.perf_counter() - start < 30.0
    assert result.status in (MilpStatus.TIMEOUT, MilpStatus.FALSIFIED)


def test_conv_max_pool_minima_are_attained() -> None:
    """Each proven minimum of a conv + max-pool net is attained by a real input: ``y_j ≤ min +
    1e-3`` is falsified with a re-checked counterexample and ``y_j ≤ min − 1e-3`` verified."""
    net = _seeded(7, nn.Conv2d(1, 2, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                  nn.Linear(2, 2))
    gm = certfx.load(net, torch.zeros(1, 1, 3, 3))
    lo, hi = torch.zeros(1, 3, 3, dtype=torch.float64), torch.ones(1, 3, 3, dtype=torch.float64)
    b = output_bounds(gm, lo, hi, EXACT)
    for j in range(2):
        row = torch.eye(2, dtype=torch.float64)[j:j + 1]
        for slack, expected in ((1e-3, MilpStatus.FALSIFIED), (-1e-3, MilpStatus.VERIFIED)):
            unsafe = UnsafeRegion((Conjunction(row, torch.tensor([b.lower[j] + slack])),))
            result = verify_property(gm, Property(lo, hi, unsafe), MilpOptions(domains=()))
            assert result.status is expected, (j, slack, result.status)


def test_unsupported_op_raises_with_the_node() -> None:
    net = _seeded(0, nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2))
    gm = certfx.load(net, torch.zeros(1, 3))
    with pytest.raises(UnsupportedOpsError, match="sigmoid") as err:
        encode(gm, -torch.ones(3), torch.ones(3))
    assert "allow_relaxation" in str(err.value)
    got = output_bounds(gm, -torch.ones(3), torch.ones(3),
                        MilpOptions(domains=(), allow_relaxation=True))
    ys = copy.deepcopy(net).double()(2 * torch.rand(2000, 3, dtype=torch.float64) - 1)
    ys = ys.detach().numpy()
    assert not got.encoding.exact and (ys >= got.lower - TOL).all()
    assert (ys <= got.upper + TOL).all()
    impossible = UnsafeRegion((Conjunction(torch.eye(2)[:1], torch.tensor([-100.0])),))
    prop = Property(-torch.ones(3), torch.ones(3), impossible)          # y0 ≤ −100
    relaxed = MilpOptions(domains=(), allow_relaxation=True)
    assert verify_property(gm, prop, relaxed).status is MilpStatus.VERIFIED


def test_docstring_examples() -> None:
    for name in ("problem", "nonlinear", "encode", "ortools", "bounds", "verify"):
        module = importlib.import_module(f"certfx.backends.milp.{name}")
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, name
    assert doctest.testmod(importlib.import_module("certfx.backends.milp")).failed == 0


# ---- VNN-COMP 2021 "test" instances -----------------------------------------------------------

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp"


def _instances() -> list[tuple[str, str, str]]:
    table = VNNCOMP / "ground_truth.csv"
    wanted = ("test_nano", "test_tiny", "test_small", "test_sat")
    if not table.is_file():
        return []
    with table.open() as f:
        return [(r["onnx"], r["vnnlib"], r["expected"]) for r in csv.DictReader(f)
                if r["benchmark"] == "vnncomp2021/test" and Path(r["onnx"]).stem in wanted]


@pytest.mark.skipif(not _instances(), reason="/work/shared VNN-COMP benchmarks not present")
@pytest.mark.parametrize("onnx,vnnlib,expected", _instances() or [("", "", "")])
def test_vnncomp2021_test_instances(onnx: str, vnnlib: str, expected: str) -> None:
    from certfx.frontends.vnnlib import read_vnnlib

    gm = certfx.load(str(VNNCOMP / onnx))
    props = read_vnnlib(VNNCOMP / vnnlib, tuple(gm.meta["certfx.input_shape"]))
    statuses = [verify_property(gm, p, MilpOptions(time_limit=60)).status for p in props]
    if expected == "sat":
        assert MilpStatus.FALSIFIED in statuses
    else:
        assert all(s is MilpStatus.VERIFIED for s in statuses)
