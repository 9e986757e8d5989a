"""TAPS and STAPS: the gradient connector, multi-estimator PGD, the scaled product loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certfx.errors import CertfxError, InvalidValueError
from certfx.train import StepContext, TrainConfig, Trainer, get_method
from certfx.train.batch_stats import batch_statistics
from certfx.train.gradient_connector import connect, connector_gradients
from certfx.train.losses import robust_ce
from certfx.train.taps import scaled_product, taps_accuracy
from tests.models import toy_images


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 3))


data = toy_images


def ctx(eps: float, target: float | None = None) -> StepContext:
    return StepContext(0, 0, eps, eps if target is None else target, 1.0,
                       torch.Generator().manual_seed(0))


# ---- the gradient connector --------------------------------------------------------------
def paper_formula(z, lo, hi, c):
    """Sec. 3: ∂ẑ/∂z_lo = max(0, 1 − (ẑ − z_lo)/(c(z_hi − z_lo))), mirrored for z_hi."""
    out_lo, out_hi = [], []
    for zi, li, hi_ in zip(z, lo, hi):
        if hi_ == li:
            out_lo.append(0.5)
            out_hi.append(0.5)
        elif c == 0:
            out_lo.append(float(zi == li))
            out_hi.append(float(zi == hi_))
        else:
            out_lo.append(max(0.0, 1 - (zi - li) / (c * (hi_ - li))))
            out_hi.append(max(0.0, 1 - (hi_ - zi) / (c * (hi_ - li))))
    return out_lo, out_hi


@pytest.mark.parametrize("c", [0.0, 0.3, 0.5, 1.0])
def test_connector_pseudo_gradients_follow_the_paper(c):
    lo = torch.tensor([0.0, 0.0, 0.0, -1.0, 2.0, 1.0])
    hi = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    z = torch.tensor([0.0, 0.2, 1.0, 0.5, 2.0, 1.4])
    lo_p, hi_p = lo.clone().requires_grad_(), hi.clone().requires_grad_()
    out = connect(z, lo_p, hi_p, c)
    assert torch.equal(out, z)
    weights = torch.arange(1.0, 7.0)  # an arbitrary upstream gradient
    (out * weights).sum().backward()
    want_lo, want_hi = paper_formula(z.tolist(), lo.tolist(), hi.tolist(), c)
    assert lo_p.grad.tolist() == pytest.approx([w * g for w, g in zip(weights.tolist(), want_lo)])
    assert hi_p.grad.tolist() == pytest.approx([w * g for w, g in zip(weights.tolist(), want_hi)])


def test_connector_limits_are_binary_and_linear():
    lo, hi = torch.zeros(5), torch.ones(5)
    z = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    d_lo, d_hi = connector_gradients(z, lo, hi, 1.0)
    assert torch.allclose(d_lo, hi - z) and torch.allclose(d_hi, z - lo)  # linear
    d_lo, d_hi = connector_gradients(z, lo, hi, 0.0)
    assert d_lo.tolist() == [1, 0, 0, 0, 0] and d_hi.tolist() == [0, 0, 0, 0, 1]  # binary
    with pytest.raises(InvalidValueError):
        connect(z, lo, hi, 1.5)


# ---- the loss -----------------------------------------------------------------------------
def test_scaled_product_value_and_gradient_weights():
    a = torch.tensor(2.0, requires_grad=True)  # L_TAPS
    b = torch.tensor(3.0, requires_grad=True)  # L_IBP
    w = 5.0
    loss = scaled_product(a, b, w)
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    alpha = w / (1 + w)
    assert float(a.grad) == pytest.approx(2 * alpha * 3.0)
    assert float(b.grad) == pytest.approx((2 - 2 * alpha) * 2.0)
    # w = 1 (α = 0.5) is the plain product rule
    a.grad = b.grad = None
    scaled_product(a, b, 1.0).backward()
    assert float(a.grad) == pytest.approx(3.0) and float(b.grad) == pytest.approx(2.0)


def test_latent_points_lie_in_the_box_and_taps_is_below_ibp():
    net = mlp().eval()
    method = get_method("taps")(net, torch.zeros(1, 1, 8, 8))
    x, y = data(16)
    eps = 0.05
    margins = method.taps_margins(x, y, eps)
    ibp = method.box(x, y, eps).margins
    # the latent points lie in the embedding's IBP box, whose classifier IBP equals the whole
    # network's IBP: every TAPS margin is >= the IBP bound, so L_TAPS <= L_IBP (App. A)
    assert (margins >= ibp - 1e-5).all()
    assert float(robust_ce(margins)) <= float(robust_ce(ibp)) + 1e-6


@pytest.mark.parametrize("name", ["taps", "staps"])
def test_taps_and_staps_decrease_their_loss(name):
    net = mlp(1).train()
    method = get_method(name)(net, torch.zeros(1, 1, 8, 8))
    x, y = data(32)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        with batch_statistics(net, x):
            out = method.loss(x, y, ctx(0.03))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        losses.append(out.loss.item())
        assert "taps_loss" in out.metrics
    assert losses[-1] < 0.7 * losses[0], losses


def test_taps_uses_ibp_while_eps_anneals():
    method = get_method("taps")(mlp(), torch.zeros(1, 1, 8, 8))
    x, y = data(8)
    assert "taps_loss" not in method.loss(x, y, ctx(0.01, target=0.05)).metrics
    assert "taps_loss" in method.loss(x, y, ctx(0.05)).metrics


def test_the_extractor_receives_gradients_through_the_connector():
    net = mlp().train()
    method = get_method("taps")(net, torch.zeros(1, 1, 8, 8),
                                get_method("taps").Options(fast_reg=0.0))
    x, y = data(8)
    margins = method.taps_margins(x, y, 0.05)
    robust_ce(margins).backward()
    assert net[1].weight.grad is not None and float(net[1].weight.grad.abs().sum()) > 0


def test_bad_split_is_reported():
    with pytest.raises(CertfxError, match="relus=5.*Valid cut points"):
        get_method("taps")(mlp(), torch.zeros(1, 1, 8, 8),
                           get_method("taps").Options(split_relus=5))


def test_taps_accuracy_and_a_first_epoch_on_8x8_inputs():
    x, y = data(96)
    for name in ("taps", "staps"):
        net = mlp()
        trainer = Trainer(net, x, y, TrainConfig(method=name, eps=0.05, epochs=1,
                                                 batch_size=32, eps_warmup=0, eps_ramp=0))
        history = trainer.fit()
        assert history[0]["seconds"] < 30 and "taps_loss" in history[0]
        assert 0.0 <= taps_accuracy(trainer.method, x[:16], y[:16], 0.05) <= 1.0
