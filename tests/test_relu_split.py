"""Tests of activation branch and bound (``certfx.verify.relu_split``) and of the branch inputs
of the back-substitution modules (``splits``: restricted intermediate bounds; ``multipliers``:
the split constraints' Lagrange terms)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn

import certfx
from certfx.backends.milp import MilpOptions, output_bounds
from certfx.backends.milp.ortools import SCIP_PARAMETERS
from certfx.domains.crown import AlphaCrownOptions
from certfx.domains.linear_lowering import SPLIT_KEY
from certfx.specs import Conjunction, Property, UnsafeRegion
from certfx.verify.cascade import CascadeOptions, Verdict, Verifier
from certfx.verify.relu_split import AlphaCrownBranches, relu_split_verify

EXACT = MilpOptions(domains=(), time_limit=60.0,
                    scip_parameters=SCIP_PARAMETERS + "limits/gap = 0\nlimits/absgap = 0\n")
UNBOUNDED = certfx.LinfBall(1.0, lower=None, upper=None)


def _net(seed: int, widths: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _branch(net: nn.Sequential, x0: Tensor, picks: int) -> tuple[list, Tensor]:
    """Split constraints fixing the sign of ``picks`` neurons of each hidden layer as they are
    at ``x0`` (so the branch holds ``x0``), as ``splits`` entries ``(lower, upper)``, and the
    pre-activations of every layer as a function."""
    inf = torch.inf
    splits, z, h = [], [], x0
    for layer in net:
        if isinstance(layer, nn.Linear) and layer is not net[-1]:
            pre = layer(h)
            lo, hi = torch.full_like(pre, -inf), torch.full_like(pre, inf)
            for i in range(picks):
                if pre[0, i] >= 0:
                    lo[0, i] = 0.0
                else:
                    hi[0, i] = 0.0
            splits.append((lo, hi))
            z.append(pre)
        h = layer(h)
    return splits, z


def _pre_activations(net: nn.Sequential, x: Tensor) -> list[Tensor]:
    out, h = [], x
    for layer in net:
        h = layer(h)
        if isinstance(layer, nn.Linear) and layer is not net[-1]:
            out.append(h)
    return out



@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restricted_bounds_with_lagrange_terms_hold_on_every_input_of_the_branch(seed) -> None:
    """Random multipliers (of any sign: negative ones count as 0) and optimized ones alike:
    the bound never exceeds the sampled minimum over the branch."""
    net = _net(seed, (3, 8, 8, 2))
    lo, hi = -torch.ones(1, 3), torch.ones(1, 3)
    cm = certfx.compile(net, domain="alpha-crown", input_spec=UNBOUNDED, example_input=lo)
    assert [e[1] for e in cm.bounds.meta[SPLIT_KEY]] == [True, True]
    crown = certfx.compile(net, domain="crown", input_spec=UNBOUNDED, example_input=lo)
    gen = torch.Generator().manual_seed(seed)
    spec = torch.tensor([[[1.0, -1.0], [0.0, 1.0]]])
    with torch.no_grad():
        x0 = lo + (hi - lo) * torch.rand(1, 3, generator=gen)
        splits, _ = _branch(net, x0, picks=4)
        splits = tuple(splits)
        multipliers = tuple((torch.randn(1, 2, 8, generator=gen) * 3,
                             torch.randn(1, 2, 8, generator=gen) * 3) for _ in splits)
        random = crown.bounds(lo, hi, spec, bound_upper=False, splits=splits,
                              multipliers=multipliers).lower[0]
        branches = AlphaCrownBranches(cm.bounds, steps=100, lagrange_lr=0.5)
        fixed = branches.restricted(lo, hi, spec, splits)
        optimized, chosen = branches.rows(lo, hi, spec, fixed, splits)
        optimized = optimized[0]
        plain = AlphaCrownBranches(cm.bounds, steps=100, lagrange_lr=0.0).rows(
            lo, hi, spec, fixed, splits)[0][0]
        # the same bound again from the returned slopes and multipliers, in one pass
        again = branches.rows(lo, hi, spec, fixed, splits, steps=0, start=chosen)[0][0]
        xs = lo + (hi - lo) * torch.rand(200_000, 3, generator=gen)
        inside = torch.ones(len(xs), dtype=torch.bool)
        for (s_lo, s_hi), z in zip(splits, _pre_activations(net, xs)):
            inside &= ((z >= s_lo) & (z <= s_hi)).all(1)
        assert int(inside.sum()) > 100  # the branch is not empty
        least = (net(xs[inside]) @ spec[0].T).min(0).values
    for bound in (random, optimized, plain):
        assert torch.isfinite(bound).all() and (least >= bound - 1e-5).all(), (least, bound)
    assert (optimized >= plain - 1e-6).all()  # the multipliers start at 0: never worse
    assert torch.allclose(again, optimized, atol=1e-5), (again, optimized)


@pytest.mark.parametrize("variant", ["parent bounds", "recompute", "optimized root"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_branch_and_bound_agrees_with_the_exact_minimum(seed, variant) -> None:
    """Verified just below the exact minimum (MILP), never just above it."""
    net = _net(seed, (4, 12, 12, 12, 1))
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(1, 4, generator=gen) - 1.0
    hi = lo + 1.0
    exact = float(output_bounds(certfx.load(net, lo), lo[0].double(), hi[0].double(),
                                EXACT).lower[0])
    cm = certfx.compile(net, domain="alpha-crown", input_spec=UNBOUNDED, example_input=lo)
    root = None
    if variant == "optimized root":
        root = certfx.compile(net, domain="alpha-crown", input_spec=UNBOUNDED, example_input=lo,
                              domain_options=AlphaCrownOptions(optimize_intermediate=True)).bounds
    for offset, verifiable in ((exact - 0.02 * abs(exact) - 1e-3, True), (exact + 1e-3, False)):
        unsafe = UnsafeRegion((Conjunction(torch.tensor([[1.0]]), torch.tensor([offset])),))
        out = relu_split_verify(AlphaCrownBranches(cm.bounds, root=root), lo, hi, unsafe, [0],
                                tolerance=1e-6, deadline=time.perf_counter() + 60,
                                recompute=variant == "recompute")
        assert (out.status == "verified") == verifiable, (offset, exact, out)


def test_cascade_splits_neurons_where_the_input_is_too_large_to_bisect() -> None:
    net = _net(3, (80, 16, 16, 1))
    x = torch.zeros(1, 80)
    lo, hi = x - 0.1, x + 0.1
    cm = certfx.compile(net, domain="alpha-crown", input_spec=UNBOUNDED, example_input=x)
    with torch.no_grad():
        root = cm.bounds(lo, hi, torch.ones(1, 1, 1), bound_upper=False).lower.item()
    exact = float(output_bounds(certfx.load(net, x), lo[0].double(), hi[0].double(),
                                EXACT).lower[0])
    assert root < exact - 1e-3  # α-CROWN alone cannot prove a threshold in between
    threshold = (root + 3 * exact) / 4
    prop = Property(lo[0], hi[0], UnsafeRegion(
        (Conjunction(torch.tensor([[1.0]]), torch.tensor([threshold])),)), "between")
    verifier = Verifier(net, example_input=x, options=CascadeOptions(
        methods=("alpha-crown", "split"), timeout=60))
    result = verifier.verify(prop)
    assert result.verdict is Verdict.VERIFIED and result.stage == "split"
    assert any("neuron branches" in note for note in result.notes)


def test_branches_need_an_alpha_crown_module_with_intermediate_bounds() -> None:
    net = _net(0, (3, 4, 1))
    x = torch.zeros(1, 3)
    for domain, options in (("crown", None),
                            ("alpha-crown", AlphaCrownOptions(optimize_intermediate=True))):
        cm = certfx.compile(net, domain=domain, input_spec=UNBOUNDED, example_input=x,
                            domain_options=options)
        with pytest.raises(ValueError, match="alpha-crown"):
            AlphaCrownBranches(cm.bounds)


def test_branch_and_bound_gives_up_past_its_queue_limit() -> None:
    """A property that needs branching (as in the module's example) is ``unknown`` when the
    queue may hold a single branch, and verified without the limit."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    lo, hi = -torch.ones(1, 2), torch.ones(1, 2)
    cm = certfx.compile(net, domain="alpha-crown", input_spec=UNBOUNDED, example_input=lo)
    unsafe = UnsafeRegion((Conjunction(torch.tensor([[1.0]]), torch.tensor([-0.34])),))
    outcomes = [relu_split_verify(AlphaCrownBranches(cm.bounds), lo, hi, unsafe, [0],
                                  tolerance=1e-6, deadline=time.perf_counter() + 30,
                                  batch=1, max_branches=limit).status for limit in (1, None)]
    assert outcomes == ["unknown", "verified"]
