"""Smooth CROWN-IBP (thesis Sec. 3.3.3): (p, q)-random and one-step (Eq. 3.3.24) lower slopes in
CROWN-IBP training — sound margins, gradients to the model, and the losses train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certfx.errors import InvalidValueError
from certfx.train import TrainConfig, Trainer, get_method
from certfx.train.losses import robust_ce


def _setup(slopes: str, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                        nn.Linear(24, 3))
    x = torch.rand(32, 6)
    with torch.no_grad():
        y = net(x).argmax(1)
    opts = get_method("crown-ibp").Options(lower_slopes=slopes, **kw)
    method = get_method("crown-ibp")(net, x[:1], opts)
    return net, x, y, method


def _sampled_margins(net, x, y, eps, n=2000):
    pts = (x.unsqueeze(1) + eps * (2 * torch.rand(x.shape[0], n, x.shape[1]) - 1)).clamp(0, 1)
    pts[:, :20] = (x.unsqueeze(1) + eps * torch.sign(torch.randn(x.shape[0], 20, x.shape[1]))
                   ).clamp(0, 1)
    with torch.no_grad():
        z = net(pts.flatten(0, 1)).reshape(x.shape[0], n, -1)
    m = z.gather(2, y.view(-1, 1, 1).expand(-1, n, 1)) - z
    return m.min(1).values  # (B, K)


@pytest.mark.parametrize("slopes,kw", [("one-step", {}), ("one-step", {"slope_eta": 3.0}),
                                       ("random", {"slope_p": 0.5, "slope_q": 1.0}),
                                       ("random", {"slope_p": 0.0, "slope_q": 0.0})])
def test_margins_are_sound(slopes, kw) -> None:
    net, x, y, method = _setup(slopes, **kw)
    eps = 0.05
    if slopes == "one-step":
        margins = method.one_step_margins(x, y, eps)
    else:
        margins = method.crown_ibp.certified_forward(x, y, eps=eps)
    true = _sampled_margins(net, x, y, eps)
    others = torch.stack([torch.cat([true[i, :y[i]], true[i, y[i] + 1:]])
                          for i in range(x.shape[0])])
    assert bool((margins.detach() <= others + 1e-5).all())


def test_one_step_is_differentiable_and_tighter_on_average() -> None:
    """The thesis' claim (Fig. 3.10) on a fixed model: one signed step from random slopes gives
    a better average margin bound than CROWN-IBP's adaptive slopes and than all-zero or all-one
    slopes (not per example: the bound is concave, not linear, in the slopes)."""
    from certfx.domains.linear import Slopes
    from certfx.domains.relaxations import SlopePolicy

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 2))
    x = torch.rand(16, 5)
    with torch.no_grad():
        y = net(x).argmax(1)
    method = get_method("crown-ibp")(net, x[:1], get_method("crown-ibp").Options(
        lower_slopes="one-step"))
    eps = 0.1
    margins = method.one_step_margins(x, y, eps)
    robust_ce(margins).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    cm = method.crown_ibp
    lo, hi = cm.input_bounds(x, eps)
    spec = cm.output_spec.matrix(y, 2)
    with torch.no_grad():
        for policy in (SlopePolicy.ADAPTIVE, SlopePolicy.ZERO, SlopePolicy.ONE):
            other = cm.bounds(lo, hi, spec, slopes=Slopes(policy), bound_upper=False).lower
            assert float(margins.detach().mean()) >= float(other.mean()), policy
        adaptive = cm.bounds(lo, hi, spec, bound_upper=False).lower
    assert float((margins.detach() - adaptive).max()) > 1e-4  # strictly tighter somewhere


@pytest.mark.parametrize("slopes", ["one-step", "random"])
def test_training_with_smooth_slopes_lowers_the_loss(slopes) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3))
    x = torch.rand(64, 6)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    opts = get_method("crown-ibp").Options(lower_slopes=slopes, beta_end=1.0)
    cfg = TrainConfig(method="crown-ibp", options=opts, eps=0.02, epochs=15, batch_size=64,
                      lr=5e-3, eps_warmup=0, eps_ramp=1)
    history = Trainer(net, x, y, cfg).fit()
    assert history[-1]["robust_loss"] < history[1]["robust_loss"]


def test_bad_slope_options() -> None:
    Options = get_method("crown-ibp").Options
    with pytest.raises(InvalidValueError):
        Options(lower_slopes="best")
    with pytest.raises(InvalidValueError):
        Options(lower_slopes="one-step", slope_eta=0.5)
