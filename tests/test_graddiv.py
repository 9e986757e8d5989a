"""Randomized networks: randomized layers, EOT-PGD and expected-softmax accuracy, and the GradDiv
regularizers and training method (thesis Sec. 2.2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certfx.errors import InvalidValueError, ShapeError
from certfx.random_layers import (AlwaysDropout, BayesLinear, GaussianNoise, keep_dropout_on,
                                  kl_divergence, randomness)
from certfx.train import METHODS, StepContext, TrainConfig, Trainer
from certfx.train.graddiv import (GradDiv, GradDivOptions, concentration, dpp_loss, max_cosine,
                                  mean_cosine, mean_resultant_length, reg_scale,
                                  sample_gradients, smoothmax_cosine)
from certfx.verify.attacks import Loss, Norm, PGDConfig
from certfx.verify.ball_attacks import pgd_ball
from certfx.verify.eot import EOTConfig, eot_accuracy, eot_pgd, eot_predict


def ctx(eps: float, epoch: int = 0) -> StepContext:
    return StepContext(epoch, 0, eps, eps, 1.0, torch.Generator().manual_seed(0))


def noisy_mlp(seed: int = 0, sigma: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), GaussianNoise(sigma), nn.Linear(16, 32), nn.ReLU(),
                         GaussianNoise(sigma), nn.Linear(32, 3))


def deterministic_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def tiny_data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :8].sum(1) > x.flatten(1)[:, 8:].sum(1)).long() + (
        x.flatten(1)[:, 0] > 0.8).long()
    return x, y


class SineNoiseToy(nn.Module):
    """A randomized model whose single-draw gradients mislead and whose mean gradient does not.

    Margin ``m0 − dᵀx + (s/ω) Σ_j ξ_j sin(ω x_j)`` (class 0 vs a zero logit), ``ξ ~ N(0, I)`` per
    draw: a draw's input gradient is ``−d + s·ξ∘cos(ωx)``, mostly noise for ``s = 3``, while its
    mean is ``−d``; the output moves by at most ``s·p/ω`` (tiny), so the expected-softmax
    prediction is class 0 exactly when ``dᵀx < m0``.
    """

    def __init__(self, p: int = 10, m0: float = 0.7, s: float = 3.0, omega: float = 1e4):
        super().__init__()
        self.m0, self.s, self.omega = m0, s, omega
        self.register_buffer("d", torch.ones(p) / math.sqrt(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi = torch.randn_like(x)
        m = self.m0 - x @ self.d + self.s / self.omega * (xi * torch.sin(self.omega * x)).sum(1)
        return torch.stack([m, torch.zeros_like(m)], 1)


# ---- randomized layers ---------------------------------------------------------------------
def test_noise_stays_random_in_eval_mode_and_has_the_right_scale():
    torch.manual_seed(0)
    layer = GaussianNoise(0.2).eval()
    x = torch.zeros(20000)
    out = layer(x)
    assert out.std().item() == pytest.approx(0.2, rel=0.03)
    assert not torch.equal(layer(x), layer(x))
    with randomness(layer, False):
        assert torch.equal(layer(x), x)
    assert layer.active


def test_learnable_noise_scale_gets_gradients():
    layer = GaussianNoise(0.1, learnable=True, channels=3)
    layer(torch.ones(4, 3, 2, 2)).pow(2).sum().backward()
    assert layer.log_sigma.grad is not None and bool((layer.log_sigma.grad != 0).all())


def test_keep_dropout_on_replaces_nested_dropout_with_the_same_rate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.3), nn.ReLU()))
    keep_dropout_on(net).eval()
    assert isinstance(net[1][0], AlwaysDropout) and net[1][0].p == 0.3
    out = net[1][0](torch.ones(100000))
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert out.max().item() == pytest.approx(1 / 0.7)  # inverted-dropout scaling kept


def test_bayes_linear_draws_per_forward_and_kl_is_zero_at_the_prior():
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, sigma_init=0.05).eval()
    x = torch.ones(2, 3)
    a = layer(x)
    assert not torch.equal(a, layer(x))
    assert torch.allclose(a[0], a[1])  # one weight draw shared by the batch
    with torch.no_grad():
        layer.weight_mu.zero_(), layer.bias_mu.zero_()
    assert kl_divergence(layer, 0.05).item() == pytest.approx(0.0, abs=1e-4)
    assert kl_divergence(layer, 0.5).item() > 1.0
    with pytest.raises(InvalidValueError):
        kl_divergence(layer, 0.0)


def test_random_layers_reject_bad_values():
    with pytest.raises(InvalidValueError):
        GaussianNoise(-0.1)
    with pytest.raises(InvalidValueError):
        BayesLinear(2, 2, sigma_init=0.0)


# ---- the GradDiv regularizers --------------------------------------------------------------
def test_mrl_is_one_for_aligned_and_zero_for_cancelling_gradients():
    g = torch.randn(5, 7)
    aligned = g[:1] * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert float(mean_resultant_length(aligned)) == pytest.approx(1.0, abs=1e-6)
    assert float(mean_resultant_length(torch.cat([g[:1], -4 * g[:1]]))) == pytest.approx(
        0.0, abs=1e-6)
    # n orthonormal directions: ρ̂ = ‖(1/n) Σ e_i‖ = 1/√n
    assert float(mean_resultant_length(torch.eye(6)[:4] * 3)) == pytest.approx(0.5, abs=1e-6)


def test_mean_cosine_matches_the_pairwise_definition_and_the_mrl_identity():
    torch.manual_seed(1)
    g = torch.randn(3, 5, 9)  # a batch of 3 inputs, n = 5 samples, p = 9
    cos = F.cosine_similarity
    brute = torch.stack([sum(cos(g[b, i], g[b, j], dim=0) for i, j in
                             itertools.permutations(range(5), 2)) / 20 for b in range(3)])
    assert torch.allclose(mean_cosine(g), brute, atol=1e-5)
    rho = mean_resultant_length(g)
    assert torch.allclose(mean_cosine(g), (5 * rho ** 2 - 1) / 4, atol=1e-5)
    assert torch.allclose(max_cosine(g), torch.stack([max(
        cos(g[b, i], g[b, j], dim=0) for i, j in itertools.permutations(range(5), 2))
        for b in range(3)]), atol=1e-5)
    lse = torch.stack([torch.logsumexp(torch.stack([cos(g[b, i], g[b, j], dim=0) for i, j in
                                                    itertools.permutations(range(5), 2)]), 0)
                       for b in range(3)])
    assert torch.allclose(smoothmax_cosine(g), lse, atol=1e-5)


def test_concentration_is_the_vmf_estimate_and_grows_with_the_mrl():
    torch.manual_seed(2)
    p = 9
    g = torch.randn(4, 3, p)
    rho = mean_resultant_length(g)
    assert torch.allclose(concentration(g), rho * (p - rho) / (1 - rho ** 2) / p, atol=1e-5)
    # two unit vectors at angle θ: ρ̂ = cos(θ/2) falls as θ grows, and so does κ̂/p
    values = []
    for theta in (0.2, 0.8, 1.6, 2.4, 3.0):
        pair = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
        assert float(mean_resultant_length(pair)) == pytest.approx(math.cos(theta / 2), abs=1e-6)
        values.append(float(concentration(pair)))
    assert all(a > b for a, b in itertools.pairwise(values))


def test_dpp_loss_is_zero_for_orthonormal_and_grows_as_directions_align():
    q, _ = torch.linalg.qr(torch.randn(8, 3))
    assert float(dpp_loss(q.T * torch.tensor([[2.0], [0.5], [7.0]]))) == pytest.approx(
        0.0, abs=1e-4)
    # two directions at angle θ: det = 1 − cos²θ = sin²θ
    for theta in (0.3, 1.0):
        pair = torch.tensor([[1.0, 0.0, 0.0], [math.cos(theta), math.sin(theta), 0.0]])
        assert float(dpp_loss(pair)) == pytest.approx(-math.log(math.sin(theta) ** 2),
                                                      rel=1e-4)


def test_regularizers_reject_too_few_samples_and_bad_shapes():
    with pytest.raises(InvalidValueError):
        mean_cosine(torch.randn(1, 5))
    with pytest.raises(InvalidValueError):
        max_cosine(torch.randn(2, 1, 5))
    with pytest.raises(ShapeError):
        mean_resultant_length(torch.randn(5))
    with pytest.raises(InvalidValueError):
        sample_gradients(noisy_mlp(), *tiny_data(4), samples=0)


def test_sample_gradients_are_the_per_draw_input_gradients():
    net = noisy_mlp()
    x, y = tiny_data(6)
    torch.manual_seed(5)
    grads, losses = sample_gradients(net, x, y, samples=3, create_graph=False)
    assert grads.shape == (6, 3, 16) and losses.shape == (6, 3)
    torch.manual_seed(5)  # replay the same draws one by one
    for i in range(3):
        point = x.clone().requires_grad_(True)
        loss = F.cross_entropy(net(point), y, reduction="none")
        loss.sum().backward()
        assert torch.allclose(grads[:, i], point.grad.flatten(1), atol=1e-6)
        assert torch.allclose(losses[:, i], loss.detach(), atol=1e-6)


@pytest.mark.parametrize("name", ["kappa", "mean", "dpp", "max", "smoothmax"])
def test_regularizer_has_gradients_to_the_parameters(name):
    from certfx.train.graddiv import REGULARIZERS
    net = noisy_mlp()
    x, y = tiny_data(8)
    grads, _ = sample_gradients(net, x, y, samples=3)
    REGULARIZERS[name](grads).mean().backward()
    got = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in got)
    assert sum(float(g.abs().sum()) for g in got) > 0


def test_regularizer_gradient_step_lowers_the_concentration():
    """A few descent steps on R_mean alone (a fixed draw of the noise) lower it."""
    net = noisy_mlp(sigma=0.5)
    x, y = tiny_data(16)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)

    def value() -> torch.Tensor:
        torch.manual_seed(7)
        return mean_cosine(sample_gradients(net, x, y, samples=3)[0]).mean()

    before = value().item()
    for _ in range(10):
        opt.zero_grad()
        value().backward()
        opt.step()
    assert value().item() < before - 0.05


# ---- EOT-PGD and expected-softmax accuracy --------------------------------------------------
@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.1), (Norm.L2, 0.5)])
def test_eot_with_one_sample_on_a_deterministic_model_is_plain_pgd(norm, eps):
    net = deterministic_mlp().eval()
    x, y = tiny_data(24)
    plain = pgd_ball(net, x, y, eps, norm=norm, config=PGDConfig(
        steps=15, restarts=2, step_size=0.25, loss=Loss.CE, early_stop=False, seed=3))
    eot = eot_pgd(net, x, y, eps, EOTConfig(samples=1, steps=15, restarts=2, step_size=0.25,
                                            norm=norm, seed=3))
    assert torch.allclose(eot.x_adv, plain.x_adv, atol=1e-6)
    assert torch.allclose(eot.margin.double(), plain.violation, atol=1e-4)
    # the attack did move: some points are misclassified, and EOT's estimate says so too
    assert bool(plain.found.any())
    assert torch.equal(eot.margin <= 0, plain.found)


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 1 / math.sqrt(10)), (Norm.L2, 1.0)])
def test_eot_finds_adversarial_examples_that_single_draw_pgd_misses(norm, eps):
    torch.manual_seed(0)
    net = SineNoiseToy()
    x, y = torch.zeros(100, 10), torch.zeros(100, dtype=torch.long)
    assert eot_accuracy(net, x, y, samples=50) == 1.0
    kwargs = dict(lower=-10.0, upper=10.0)
    single = eot_pgd(net, x, y, eps, EOTConfig(samples=1, norm=norm), **kwargs).x_adv
    eot = eot_pgd(net, x, y, eps, EOTConfig(samples=20, norm=norm), **kwargs).x_adv
    # the expected-softmax prediction is wrong exactly when dᵀx >= m0: check it both ways
    assert eot_accuracy(net, single, y, samples=100) > 0.5
    assert eot_accuracy(net, eot, y, samples=100) < 0.1
    assert float((eot @ net.d >= net.m0).float().mean()) > 0.9
    dist = (eot - x).abs().amax(1) if norm is Norm.LINF else (eot - x).norm(dim=1)
    assert bool((dist <= eps * (1 + 1e-6)).all())


def test_eot_respects_the_ball_and_the_valid_range():
    torch.manual_seed(0)
    net = noisy_mlp()
    x, y = tiny_data(16)
    xa = eot_pgd(net, x, y, 0.2, EOTConfig(samples=3, steps=5, restarts=2)).x_adv
    assert bool(((xa - x).abs() <= 0.2 + 1e-6).all()) and xa.min() >= 0 and xa.max() <= 1
    xa = eot_pgd(net, x, y, 0.8, EOTConfig(samples=3, steps=5, norm=Norm.L2)).x_adv
    assert bool(((xa - x).flatten(1).norm(dim=1) <= 0.8 + 1e-5).all())
    assert xa.min() >= 0 and xa.max() <= 1


def test_eot_predict_is_the_mean_softmax_and_accuracy_follows_it():
    torch.manual_seed(0)
    net = noisy_mlp(sigma=0.5).train()
    x, y = tiny_data(10)
    torch.manual_seed(3)
    p = eot_predict(net, x, samples=4)
    assert net.training  # mode restored
    torch.manual_seed(3)
    with torch.no_grad():
        expected = sum(F.softmax(net.eval()(x), -1) for _ in range(4)) / 4
    assert torch.allclose(p, expected, atol=1e-6)
    det = deterministic_mlp().eval()
    assert eot_accuracy(det, x, y, samples=3) == pytest.approx(
        float((det(x).argmax(1) == y).float().mean()))


def test_eot_rejects_bad_settings():
    net, (x, y) = noisy_mlp(), tiny_data(4)
    with pytest.raises(InvalidValueError):
        eot_pgd(net, x, y, -0.1)
    with pytest.raises(InvalidValueError):
        EOTConfig(samples=0)
    with pytest.raises(InvalidValueError):
        EOTConfig(step_size=0.0)
    with pytest.raises(InvalidValueError):
        eot_predict(net, x, samples=0)
    with pytest.raises(ShapeError):
        eot_pgd(net, x, y[:2], 0.1)


# ---- the training method -------------------------------------------------------------------
def test_method_is_registered_with_the_thesis_defaults():
    assert METHODS["graddiv"] is GradDiv
    o = GradDivOptions()
    assert (o.regularizer, o.reg_weight, o.grad_samples, o.pgd_steps, o.pgd_step_size) \
        == ("kappa", 1.0, 3, 10, 0.25)
    with pytest.raises(InvalidValueError):
        GradDivOptions(grad_samples=1)
    with pytest.raises(InvalidValueError):
        GradDivOptions(regularizer="entropy")
    with pytest.raises(InvalidValueError):
        GradDivOptions(reg_weight=-1.0)


def test_lambda_schedule_warms_up_then_ramps_and_scales_with_the_run():
    assert [reg_scale(e, 1, 2) for e in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    method = GradDiv(noisy_mlp(), torch.zeros(1, 1, 4, 4), GradDivOptions(reg_weight=2.0))
    method.total_epochs = 6  # 60-epoch schedule scaled by 1/10: warm-up 0.3, ramp 2
    assert [method.reg_weight(e) for e in range(3)] == pytest.approx([0.7, 1.7, 2.0])


def test_regularized_loss_adds_lambda_times_the_regularizer():
    x, y = tiny_data(8)
    opts = GradDivOptions(regularizer="mean", reg_weight=3.0, reg_warmup=0, reg_ramp=0)
    net = noisy_mlp()
    torch.manual_seed(11)
    with_reg = GradDiv(net, x, opts).loss(x, y, ctx(0.0))
    torch.manual_seed(11)
    without = GradDiv(net, x, GradDivOptions(regularizer="mean", reg_weight=0.0)).loss(
        x, y, ctx(0.0))
    assert with_reg.metrics["lambda"] == 3.0 and without.metrics["lambda"] == 0.0
    assert with_reg.loss.item() == pytest.approx(
        without.loss.item() + 3.0 * with_reg.metrics["mean_cos"], rel=1e-5)


@pytest.mark.parametrize("reg_weight", [1.0, 0.0])
def test_method_loss_decreases_on_a_tiny_batch(reg_weight):
    net = noisy_mlp(sigma=0.1)
    x, y = tiny_data(32)
    method = GradDiv(net, x, GradDivOptions(reg_weight=reg_weight, reg_warmup=0, reg_ramp=0,
                                            pgd_steps=3))
    method.total_epochs = 1
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    torch.manual_seed(0)
    for step in range(30):
        out = method.loss(x, y, ctx(0.05))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_trainer_runs_graddiv_end_to_end():
    torch.manual_seed(0)
    x, y = tiny_data(32)
    trainer = Trainer(noisy_mlp(), x, y, TrainConfig(
        method="graddiv", options=GradDivOptions(pgd_steps=2), eps=0.05, epochs=2,
        batch_size=16))
    history = trainer.fit()
    assert len(history) == 2
    assert {"mrl", "kappa_over_p", "mean_cos", "dpp", "lambda"} <= set(history[-1])
    assert 0 <= history[-1]["mrl"] <= 1
