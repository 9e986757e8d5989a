"""ℓ2 input sets (thesis Sec. 3.2): L2Ball / LpBall specs, dual-norm concretization in the
back-substitution domains, soundness by sampling (surface included) and ℓ2 PGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import certfx
from certfx.errors import InvalidValueError
from certfx.specs import L2Ball, LpBall, circumscribing_l2_radius
from certfx.verify import PGDConfig, pgd_ball
from certfx.verify.attacks import Norm

DOMAINS = ["box", "deepz", "deeppoly", "crown", "crown-ibp", "alpha-crown"]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                         nn.Linear(20, 4))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=1, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 4))


def ball_samples(x: torch.Tensor, eps: float, n: int, surface: int) -> torch.Tensor:
    """Points of the ℓ2 ball around each ``x`` (``surface`` of them on the sphere), clipped to
    [0, 1] — clipping towards a centre inside the box never leaves the ball."""
    b, shape = x.shape[0], x.shape[1:]
    d = math.prod(shape)
    u = torch.randn(b, n, d, dtype=x.dtype)
    u = u / u.norm(dim=2, keepdim=True)
    r = torch.rand(b, n, 1, dtype=x.dtype) ** (1.0 / d)
    r[:, :surface] = 1.0
    pts = x.reshape(b, 1, d) + eps * r * u
    return pts.clamp(0, 1).reshape(b, n, *shape)


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_domain_is_sound_on_the_l2_ball(make, dtype) -> None:
    net = make().to(dtype)
    x = torch.rand(6, 1, 4, 4, dtype=dtype)
    eps = 0.6
    pts = ball_samples(x, eps, 3000, 500)
    with torch.no_grad():
        out = net(pts.flatten(0, 1)).reshape(6, -1, 4)
    y = out[:, 0].argmax(1)
    # PGD in the ℓ2 ball adds maximizers of each logit difference
    adv = pgd_ball(net, x, y, eps, norm=Norm.L2, config=PGDConfig(steps=40, restarts=2)).x_adv
    tol = 1e-5 if dtype is torch.float32 else 1e-9
    for domain in DOMAINS:
        cm = certfx.compile(net, domain, input_spec=L2Ball(eps), example_input=x[:1])
        with torch.no_grad():
            lo, hi = cm.certified_forward(x)
            assert bool((out >= lo.unsqueeze(1) - tol).all()), domain
            assert bool((out <= hi.unsqueeze(1) + tol).all()), domain
            if adv is not None:
                z = net(adv)
                assert bool((z >= lo - tol).all() and (z <= hi + tol).all()), domain


def test_the_dual_norm_tightens_back_substitution() -> None:
    """At a radius far below the box's corner distance, ‖A‖₂ε beats the circumscribing box."""
    net = _mlp().double()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64) * 0.5 + 0.25
    via_ball = certfx.compile(net, "crown", input_spec=L2Ball(0.2), example_input=x[:1])
    via_box = certfx.compile(net, "crown", input_spec=certfx.LinfBall(0.2), example_input=x[:1])
    with torch.no_grad():
        lo_b, hi_b = via_ball.certified_forward(x)
        lo_x, hi_x = via_box.certified_forward(x)
    assert bool((hi_b - lo_b <= hi_x - lo_x + 1e-12).all())
    assert float((hi_b - lo_b).mean()) < 0.8 * float((hi_x - lo_x).mean())


def test_first_layer_bounds_use_the_ball_not_only_intervals() -> None:
    """Interval propagation is exact through the first layer only for a box: with an ℓ2 ball the
    first hidden layer's bounds must come from the dual norm, ``w·x ± ε‖w‖₂`` — in the
    back-substitution and in the zonotope domain."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x = torch.rand(4, 64, dtype=torch.float64) * 0.5 + 0.25
    for domain in ("crown", "deepz"):
        first = certfx.compile(net[:1], domain, input_spec=L2Ball(0.05), example_input=x[:1])
        with torch.no_grad():
            lo, hi = first.certified_forward(x)
            z, r = net[0](x), 0.05 * net[0].weight.norm(dim=1)
        assert torch.allclose(lo, z - r) and torch.allclose(hi, z + r), domain
        whole = certfx.compile(net, domain, input_spec=L2Ball(0.05), example_input=x[:1])
        box = certfx.compile(net, domain, input_spec=certfx.LinfBall(0.05),
                             example_input=x[:1])
        with torch.no_grad():
            w_l2 = (lambda b: b.upper - b.lower)(whole.certified_forward(x))
            w_box = (lambda b: b.upper - b.lower)(box.certified_forward(x))
        assert float(w_l2.mean()) < 0.5 * float(w_box.mean()), domain


def test_affine_network_is_exact_under_the_dual_norm() -> None:
    """For z = w·x + b over an unclipped ℓ2 ball the range is w·x ± ε‖w‖₂ exactly."""
    net = nn.Linear(5, 1).double()
    x = torch.rand(3, 5, dtype=torch.float64)
    cm = certfx.compile(net, "crown", input_spec=L2Ball(0.3, lower=None, upper=None),
                        example_input=x[:1])
    with torch.no_grad():
        lo, hi = cm.certified_forward(x)
        mid, r = net(x), 0.3 * net.weight.norm()
    assert torch.allclose(lo, mid - r) and torch.allclose(hi, mid + r)


def test_margins_and_eps_override() -> None:
    net = _mlp()
    x = torch.rand(4, 1, 4, 4)
    y = net(x).argmax(1)
    cm = certfx.compile(net, "crown", input_spec=L2Ball(1.0), example_input=x[:1])
    with torch.no_grad():
        small = cm.certified_forward(x, y, eps=0.01)
        large = cm.certified_forward(x, y, eps=torch.full((4,), 1.0))
    assert bool((small >= large - 1e-6).all()) and bool((small > 0).all())


def test_lp_balls_and_bad_radii() -> None:
    assert circumscribing_l2_radius(0.1, math.inf, 100) == pytest.approx(1.0)
    assert circumscribing_l2_radius(0.5, 4, 16) == pytest.approx(0.5 * 16 ** 0.25)
    assert circumscribing_l2_radius(0.5, 1.5, 16) == 0.5
    net = _mlp()
    x = torch.rand(2, 1, 4, 4)
    lp = certfx.compile(net, "crown", input_spec=LpBall(0.05, math.inf), example_input=x[:1])
    linf = certfx.compile(net, "crown", input_spec=certfx.LinfBall(0.05), example_input=x[:1])
    with torch.no_grad():
        a, b = lp.certified_forward(x), linf.certified_forward(x)
    # the ℓ∞ ball's circumscribing ℓ2 ball is looser than its box: the box bound decides
    assert torch.allclose(a.lower, b.lower) and torch.allclose(a.upper, b.upper)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidValueError):
            L2Ball(bad)
    with pytest.raises(InvalidValueError):
        LpBall(0.1, 0.5)


# ---- BCP (thesis Sec. 3.2) ---------------------------------------------------------------------

def _pgd_ball_box_min(c, center, rho, lo, hi, steps=4000):
    """min cᵀζ over the ball ∩ box by projected gradient with alternating projections (Dykstra's
    algorithm onto the intersection), in float64 — an independent reference."""
    z = center.clone()
    for t in range(steps):
        z = z - (0.5 / (1 + t) ** 0.5) * c
        # Dykstra: project onto the intersection of the two convex sets
        p, q = torch.zeros_like(z), torch.zeros_like(z)
        y = z
        for _ in range(50):
            a = y + p
            d = a - center
            n = d.norm(dim=-1, keepdim=True)
            yb = center + d * torch.clamp(rho.view(-1, 1) / n.clamp_min(1e-30), max=1.0)
            p = a - yb
            b_ = yb + q
            y = torch.minimum(torch.maximum(b_, lo), hi)
            q = b_ - y
        z = y
    return (c * z).sum(-1)


def test_ball_box_min_equals_an_independent_solver_and_terminates_early() -> None:
    from certfx.domains.interval import Interval
    from certfx.domains.lipschitz import ball_box_min

    g = torch.Generator().manual_seed(0)
    for n in (3, 8, 20):
        b = 5
        c = torch.randn(b, 1, n, generator=g, dtype=torch.float64)
        center = torch.randn(b, n, generator=g, dtype=torch.float64)
        rho = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
        r_lo = torch.rand(b, n, generator=g, dtype=torch.float64) * rho.view(-1, 1)
        r_hi = torch.rand(b, n, generator=g, dtype=torch.float64) * rho.view(-1, 1)
        lo, hi = center - r_lo, center + r_hi  # the centre lies in the box
        value, iters, ok = ball_box_min(c, center, rho, Interval(lo, hi))
        assert bool(ok.all())
        # Prop. 3.2.1: fewer passes than n — except when the whole box lies in the ball, where
        # every coordinate ends clamped (the box's corner) and the last pass clamps the n-th
        box_min = (c[:, 0].clamp(min=0) * lo + c[:, 0].clamp(max=0) * hi).sum(-1)
        assert int(iters.max()) <= n
        assert bool((iters[:, 0][value[:, 0] > box_min + 1e-9] < n).all())
        ref = _pgd_ball_box_min(c[:, 0], center, rho, lo, hi)
        assert torch.allclose(value[:, 0], ref, atol=1e-4), (value[:, 0], ref)
        # a binding box: the intersection's minimum is above the ball's own
        assert bool((value[:, 0] >= center.mul(c[:, 0]).sum(-1) - rho * c[:, 0].norm(dim=-1)
                     - 1e-12).all())


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_bcp_is_sound_and_beats_the_global_lipschitz_bound(make) -> None:
    net = make().double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    eps = 0.5
    cm = certfx.compile(net, "bcp", input_spec=L2Ball(eps), example_input=x[:1])
    pts = ball_samples(x, eps, 3000, 500)
    with torch.no_grad():
        out = net(pts.flatten(0, 1)).reshape(6, -1, 4)
        lo, hi = cm.certified_forward(x)
        y = net(x).argmax(1)
        margins = cm.certified_forward(x, y)
    assert bool((out >= lo.unsqueeze(1) - 1e-9).all() and (out <= hi.unsqueeze(1) + 1e-9).all())
    true_margin = (out.gather(2, y.view(-1, 1, 1).expand(-1, out.shape[1], 1))
                   - out).min(1).values  # (6, 4): sampled worst margins
    others = torch.stack([torch.cat([true_margin[i, :y[i]], true_margin[i, y[i] + 1:]])
                          for i in range(6)])
    assert bool((margins <= others + 1e-9).all())
    # the global Lipschitz margin bound: z_y − z_j − ε·Π‖W‖₂·‖w_y − w_j‖₂ (no boxes)
    from certfx.domains.lipschitz import spectral_norm_bound

    gm = certfx.load(net, x[:1])
    lip, shape = torch.tensor(1.0, dtype=torch.float64), (1, 4, 4)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for n in nodes[:-1]:
        if ops_affine(n.target):
            args = tuple(getattr(gm, a.target) if hasattr(a, "op") and a.op == "get_attr"
                         else a for a in n.args)
            lip = lip * spectral_norm_bound(n.target, args, 0, tuple(n.args[0].meta[
                "certfx.shape"]) if hasattr(n.args[0], "meta") else shape)
    w = dict(net.named_parameters())[[k for k in dict(net.named_parameters()) if
                                      k.endswith("weight")][-1]]
    with torch.no_grad():
        z = net(x)
    global_margins = []
    for i in range(6):
        row = [float(z[i, y[i]] - z[i, j] - eps * lip * (w[y[i]] - w[j]).norm())
               for j in range(4) if j != int(y[i])]
        global_margins.append(row)
    assert bool((margins >= torch.tensor(global_margins, dtype=torch.float64) - 1e-9).all())


def ops_affine(target) -> bool:
    from certfx import ops

    return ops.is_core_op(target) and ops.traits(target).affine


class _Residual(nn.Module):
    """x → relu(W1 x) → h + relu(W2 h) (App. B.2.4: the branches' balls and boxes add)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b, self.out = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.flatten(1)))
        return self.out(h + torch.relu(self.b(h)))


def test_bcp_is_sound_through_a_residual_block() -> None:
    net = _Residual().double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    eps = 0.4
    cm = certfx.compile(net, "bcp", input_spec=L2Ball(eps), example_input=x[:1])
    pts = ball_samples(x, eps, 3000, 500)
    with torch.no_grad():
        out = net(pts.flatten(0, 1)).reshape(6, -1, 4)
        lo, hi = cm.certified_forward(x)
    assert bool((out >= lo.unsqueeze(1) - 1e-9).all() and (out <= hi.unsqueeze(1) + 1e-9).all())
    assert bool(torch.isfinite(lo).all())
