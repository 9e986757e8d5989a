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
from certfx.train.taps import (
    STAPS,
    TAPS,
    TAPSOptions,
    latent_attack,
    scaled_product,
    taps_accuracy,
)
from tests.models import toy_images


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


data = toy_images
EXAMPLE = torch.zeros(1, 1, 8, 8)


def ctx(eps: float, target: float | None = None) -> StepContext:
    return StepContext(0, 0, eps, eps if target is None else target, 1.0,
                       torch.Generator().manual_seed(0))


# ---- the gradient connector --------------------------------------------------------------
def paper_formula(z, lo, hi, c):
    """Sec. 3: ∂ẑ/∂z_lo = max(0, 1 − (ẑ − z_lo)/(c(z_hi − z_lo))), mirrored for z_hi;
    c = 0 is the binary connector 1[ẑ = bound]; 0.5 for both where z_lo = z_hi."""
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
    lo = torch.tensor([0.0, 0.0, 0.0, -1.0, 2.0, 1.0, -3.0])
    hi = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 3.0, -1.0])
    z = torch.tensor([0.0, 0.2, 1.0, 0.5, 2.0, 1.4, -1.5])
    lo_p, hi_p = lo.clone().requires_grad_(), hi.clone().requires_grad_()
    out = connect(z, lo_p, hi_p, c)
    assert torch.equal(out, z)
    weights = torch.arange(1.0, 8.0)  # an arbitrary upstream gradient dL/dẑ
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
    near_lo, near_hi = connector_gradients(z, lo, hi, 1e-9)  # c → 0 tends to the binary one
    assert torch.equal(near_lo, d_lo) and torch.equal(near_hi, d_hi)
    with pytest.raises(InvalidValueError):
        connect(z, lo, hi, 1.5)
    with pytest.raises(InvalidValueError):
        connect(z[:3], lo, hi)


def test_connector_sends_no_gradient_to_the_latent_point():
    z = torch.tensor([0.3], requires_grad=True)
    lo, hi = torch.zeros(1, requires_grad=True), torch.ones(1, requires_grad=True)
    connect(z, lo, hi).sum().backward()
    assert z.grad is None and float(lo.grad) == pytest.approx(0.4)


# ---- multi-estimator PGD and the loss -----------------------------------------------------
@pytest.mark.parametrize("make,seed", [(mlp, 0), (mlp, 3), (cnn, 1)])
def test_latent_points_lie_in_the_box_and_taps_is_below_ibp(make, seed):
    net = make(seed).eval()
    method = TAPS(net, EXAMPLE)
    x, y = data(16, seed=seed)
    eps = 0.05
    lo, hi = method.embedding_box(x, eps)
    z_hat, lo_rep, hi_rep = latent_attack(method.classifier, lo, hi, y, 3, 8, 0.5, 1, None)
    assert z_hat.shape[0] == 2 * x.shape[0] and not z_hat.requires_grad
    assert (lo_rep <= z_hat).all() and (z_hat <= hi_rep).all()
    # the embedding's IBP box pushed through the classifier is the whole network's IBP, so
    # every TAPS margin is >= its IBP bound: L_TAPS <= L_IBP (App. A)
    with torch.no_grad():
        margins = method.taps_margins(x, y, eps)
        ibp = method.box(x, y, eps).margins
    assert (margins >= ibp - 1e-5).all()
    assert robust_ce(margins).item() <= robust_ce(ibp).item() + 1e-6
    # PGD leaves nothing in the parameters' gradients
    assert all(p.grad is None for p in net.parameters())


def test_scaled_product_value_and_gradient_weights():
    a = torch.tensor(2.0, requires_grad=True)  # L_TAPS
    b = torch.tensor(3.0, requires_grad=True)  # L_IBP
    w = 5.0
    loss = scaled_product(a, b, w)
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    alpha = w / (1 + w)
    assert a.grad.item() == pytest.approx(2 * alpha * 3.0)
    assert b.grad.item() == pytest.approx((2 - 2 * alpha) * 2.0)
    a.grad = b.grad = None
    scaled_product(a, b, 1.0).backward()  # w = 1 (α = 0.5): the plain product rule
    assert a.grad.item() == pytest.approx(3.0) and b.grad.item() == pytest.approx(2.0)


@pytest.mark.parametrize("w", [1.0, 5.0])
def test_method_gradient_is_the_scaled_product_rule(w):
    net = mlp(2)
    method = TAPS(net, EXAMPLE, TAPSOptions(w_taps=w))
    params = list(net.parameters())
    x, y = data(8)
    out = method.loss(x, y, ctx(0.05))
    got = torch.autograd.grad(out.loss, params)
    # the same PGD points (same generator seed), the factors differentiated separately
    l_ibp = robust_ce(method.box.cm.certified_forward(x, y, eps=0.05))
    l_taps = robust_ce(method.taps_margins(x, y, 0.05, torch.Generator().manual_seed(0)))
    assert out.loss.item() == pytest.approx((l_ibp * l_taps).item(), rel=1e-5)
    assert out.metrics["taps_loss"] <= out.metrics["ibp_loss"] + 1e-6
    d_ibp = torch.autograd.grad(l_ibp, params, retain_graph=True)
    d_taps = torch.autograd.grad(l_taps, params, allow_unused=True)
    alpha = w / (1 + w)
    for g, gi, gt in zip(got, d_ibp, d_taps):
        gt = torch.zeros_like(gi) if gt is None else gt
        want = 2 * alpha * gt * l_ibp + (2 - 2 * alpha) * gi * l_taps
        assert torch.allclose(g, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,make", [("taps", mlp), ("staps", mlp), ("taps", cnn)])
def test_taps_and_staps_decrease_their_loss(name, make):
    net = make(1).train()
    method = get_method(name)(net, EXAMPLE)
    x, y = data(32)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        with batch_statistics(net, x):
            out = method.loss(x, y, ctx(0.03))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        losses.append(out.loss.item())
        assert "taps_loss" in out.metrics
    assert losses[-1] < 0.7 * losses[0], losses


def test_algorithm_1_ibp_with_growing_regularizer_while_eps_anneals():
    net = mlp()
    method = TAPS(net, EXAMPLE)
    ibp = get_method("ibp")(net, EXAMPLE, get_method("ibp").Options(
        init="default", fast_reg_weighting="grow"))
    x, y = data(8)
    annealing = method.loss(x, y, ctx(0.01, target=0.05))
    assert "taps_loss" not in annealing.metrics and "fast_reg" in annealing.metrics
    assert annealing.loss.item() == pytest.approx(ibp.loss(x, y, ctx(0.01, 0.05)).loss.item())
    assert "taps_loss" in method.loss(x, y, ctx(0.05)).metrics


def test_staps_uses_sabr_boxes_while_eps_anneals():
    net = mlp()
    staps = STAPS(net, EXAMPLE, TAPSOptions(fast_reg=0.0))
    sabr = get_method("sabr")(net, EXAMPLE, get_method("sabr").Options(init="default",
                                                                       fast_reg=0.0))
    x, y = data(8)
    got = staps.loss(x, y, ctx(0.02, target=0.05)).loss.item()
    assert got == pytest.approx(sabr.loss(x, y, ctx(0.02, 0.05)).loss.item())


def test_the_extractor_receives_gradients_through_the_connector():
    net = mlp().train()
    method = TAPS(net, EXAMPLE, TAPSOptions(fast_reg=0.0))
    x, y = data(8)
    robust_ce(method.taps_margins(x, y, 0.05)).backward()
    assert net[1].weight.grad is not None and float(net[1].weight.grad.abs().sum()) > 0


def test_bad_options_and_splits_are_reported():
    with pytest.raises(CertfxError, match="(?is)relus=5.*valid cut points"):
        TAPS(mlp(), EXAMPLE, TAPSOptions(split_relus=5))
    with pytest.raises(CertfxError, match="nowhere"):
        TAPS(mlp(), EXAMPLE, TAPSOptions(split_at="nowhere"))
    with pytest.raises(InvalidValueError, match="split_relus"):
        TAPSOptions(split_relus=0)
    with pytest.raises(InvalidValueError, match="connector_c"):
        TAPSOptions(connector_c=2.0)


def test_taps_accuracy_of_a_model_leaves_its_weights_alone():
    net = mlp().eval()
    before = [p.clone() for p in net.parameters()]
    x, y = data(16)
    acc = taps_accuracy(net, x, y, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    natural = (net(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(natural)  # ε = 0: the box is the point itself
    assert taps_accuracy(net, x, y, 0.1, split_relus=2) <= acc
    with pytest.raises(TypeError):
        taps_accuracy("net", x, y, 0.1)


def test_taps_accuracy_and_a_first_epoch_on_8x8_inputs():
    x, y = data(96)
    for name in ("taps", "staps"):
        net = mlp()
        trainer = Trainer(net, x, y, TrainConfig(method=name, eps=0.05, epochs=1,
                                                 batch_size=32, eps_warmup=0, eps_ramp=0))
        history = trainer.fit()
        assert history[0]["seconds"] < 30 and "taps_loss" in history[0]
        assert 0.0 <= taps_accuracy(trainer.method, x[:16], y[:16], 0.05) <= 1.0
