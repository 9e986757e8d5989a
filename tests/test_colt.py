"""COLT: latent regions, the change of variables, stages, ε and mixing schedules, freezing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from certfx.domains import Zonotope
from certfx.errors import CertfxError, InvalidValueError
from certfx.train import StepContext, TrainConfig, Trainer, get_method
from certfx.train.batch_stats import batch_statistics
from certfx.train.colt import (
    COLT,
    latent_attack,
    mix_weight,
    project_to_zonotope,
    stage_eps_factor,
)
from tests.models import toy_images


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 12),
                         nn.ReLU(), nn.Linear(12, 3))


data = toy_images


def colt(net: nn.Module, total_epochs: int = 3, **options) -> COLT:
    method = get_method("colt")(net, torch.zeros(1, 1, 8, 8),
                                get_method("colt").Options(**options))
    method.total_epochs = total_epochs
    assert isinstance(method, COLT)
    return method


def ctx(epoch: int = 1, eps: float = 0.03) -> StepContext:
    return StepContext(epoch, 0, eps, eps, 1.0, torch.Generator().manual_seed(0))


def in_zonotope(z: Tensor, region: Zonotope | tuple[Tensor, Tensor], directions: int = 64,
                tol: float = 1e-5) -> bool:
    """``d·z ≤ h_Z(d) = d·a + Σ_i |d·A_i|`` for the axes and random directions ``d`` (the
    support function of the zonotope; a point in Z satisfies it for every ``d``)."""
    a, gens = (region.center, region.generators) if isinstance(region, Zonotope) else region
    a, gens = a.flatten(1), gens.flatten(2)
    z = z.flatten(1)
    n = a.shape[1]
    ds = torch.cat([torch.eye(n), -torch.eye(n), torch.randn(directions, n)])
    support = ds @ a.T + (torch.einsum("dn,bmn->bdm", ds, gens).abs().sum(2)).T  # (D, B)
    return bool((ds @ z.T <= support + tol * (1 + support.abs())).all())


def test_stages_and_eps_follow_the_paper():
    method = colt(cnn(), epochs_per_stage=2)
    assert method.latent == ["relu", "relu_1"] and method.stages == 3  # input, ReLU 1, ReLU 2
    assert [method.stage_of(e)[0] for e in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    # default: the run's epochs split evenly, the last stage runs to the end
    assert [colt(cnn(), total_epochs=7).stage_of(e)[:2] for e in range(7)] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    # Sec. 7: 10% above the target, 5% less per stage (floored at the target unless asked)
    assert [stage_eps_factor(s) for s in range(4)] == [1.1, 1.05, 1.0, 1.0]
    assert [stage_eps_factor(s, floor=0.0) for s in range(4)] == [1.1, 1.05, 1.0, 0.95]
    for stage, factor in enumerate([1.1, 1.05, 1.0]):
        method.on_epoch_start(2 * stage)
        assert method.stage_eps(0.1) == pytest.approx(0.1 * factor)
        assert method.loss(*data(4), ctx(eps=0.1)).metrics["stage_eps"] == pytest.approx(
            0.1 * factor)


def test_the_natural_loss_is_mixed_in_at_the_start_of_each_stage():
    assert [mix_weight(t, 40, 0.5, 0.0, 0.125) for t in range(6)] == pytest.approx(
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert mix_weight(3, 4, 0.5, 0.1, 0.0) == 0.1
    method = colt(cnn(), epochs_per_stage=8, natural_weight=0.1, mix_start=0.6,
                  mix_fraction=0.5)
    weights = []
    for epoch in (0, 2, 4, 8, 12):
        method.on_epoch_start(epoch)
        weights.append(method.loss(*data(4), ctx()).metrics["natural_weight"])
    assert weights == pytest.approx([0.6, 0.35, 0.1, 0.6, 0.1])


def test_projection_is_the_change_of_variables():
    torch.manual_seed(0)
    a, gens = torch.randn(3, 5), torch.randn(3, 7, 5)
    e = torch.rand(3, 7) * 2 - 1
    e2, z = project_to_zonotope(a, gens, e)
    assert torch.equal(e2, e)  # in the cube already: unchanged
    assert torch.allclose(z, a + (e[:, :, None] * gens).sum(1))
    e2, z = project_to_zonotope(a, gens, e * 5)
    assert e2.abs().max() <= 1 and torch.equal(e2, (e * 5).clamp(-1, 1))
    assert in_zonotope(z, (a, gens))


def test_the_region_is_sound_and_latent_points_stay_in_it():
    torch.manual_seed(0)
    net = cnn().eval()
    method = colt(net)
    x, y = data(4)
    eps = 0.05
    for stage, cut in ((1, 2), (2, 5)):
        method.on_epoch_start(stage)
        region = method.region(x, eps)
        assert region.generators.shape[:2] == (4, region.generators.shape[1])
        assert not region.center.requires_grad and not region.generators.requires_grad
        for _ in range(30):  # true latent values of sampled inputs lie in C_l(x)
            xs = (x + (torch.rand_like(x) * 2 - 1) * eps * 1.1).clamp(0, 1)
            assert in_zonotope(net[:cut](xs), region)
        corners = (x + torch.randint(0, 2, x.shape).float() * 2 * eps * 1.1 - eps * 1.1)
        assert in_zonotope(net[:cut](corners.clamp(0, 1)), region)
        # clipped coefficients give points of the region, and PGD stays in it
        e = torch.rand(4, region.generators.shape[1]) * 4 - 2
        assert in_zonotope(project_to_zonotope(region.center, region.generators, e)[1], region)
        classifier = method._part(stage).classifier
        adv = latent_attack(classifier, region, y, 10, 0.25, torch.Generator().manual_seed(0))
        assert in_zonotope(adv, region)
        # PGD in e raises the classifier's loss above the centre's
        loss = nn.functional.cross_entropy
        assert loss(classifier(adv), y).item() > loss(classifier(region.center), y).item()
        assert torch.allclose(classifier(net[:cut](x)), net(x), atol=1e-5)


def test_regions_are_sound_with_batch_norm_under_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(144, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    method = colt(net.train())
    x, _ = data(16)
    for stage, cut in ((1, 3), (2, 7)):
        method.on_epoch_start(stage)
        with batch_statistics(net, x):
            region = method.region(x, 0.03)
            for _ in range(20):
                z = net[:cut]((x + (torch.rand_like(x) * 2 - 1) * 0.03).clamp(0, 1))
                assert in_zonotope(z, region)
            assert torch.allclose(method._part(stage).classifier(net[:cut](x)), net(x),
                                  atol=1e-5)


def test_freezing_follows_the_stages_and_keeps_the_users_own_flags():
    net = cnn()
    net[5].bias.requires_grad_(False)  # frozen by the user: stays frozen throughout
    method = colt(net, epochs_per_stage=1)
    trainable = lambda: [p.requires_grad for p in net.parameters()]
    method.on_epoch_start(0)   # stage 0: nothing of COLT's is frozen
    assert trainable() == [True, True, True, True, True, False]
    method.on_epoch_start(1)   # latent layer 1: the conv is frozen
    assert trainable() == [False, False, True, True, True, False]
    method.on_epoch_start(2)   # latent layer 2: the conv and the first linear layer
    assert trainable() == [False, False, False, False, True, False]
    method.on_epoch_start(0)   # back to stage 0 (a new run): unfrozen again
    assert trainable() == [True, True, True, True, True, False]
    method.on_epoch_start(2)
    method.on_train_end()
    assert trainable() == [True, True, True, True, True, False]
    unfrozen = colt(cnn(), freeze=False)
    unfrozen.on_epoch_start(2)
    assert all(p.requires_grad for p in unfrozen.model.parameters())


def test_a_latent_stage_freezes_the_extractor_and_trains_the_rest():
    net = cnn()
    x, y = data(64)
    trainer = Trainer(net, x, y, TrainConfig(method="colt", eps=0.05, epochs=2, batch_size=32,
                                             eps_warmup=0, eps_ramp=0, options=get_method(
                                                 "colt").Options(epochs_per_stage=1)))
    trainer.train_epoch()  # stage 0: everything trains
    conv, head = net[0].weight.detach().clone(), net[3].weight.detach().clone()
    bias = net[0].bias.detach().clone()
    trainer.train_epoch()  # stage 1: the conv before the latent layer is frozen (Adam too)
    assert torch.equal(net[0].weight, conv) and torch.equal(net[0].bias, bias)
    assert not torch.equal(net[3].weight, head)
    assert trainer.history[-1]["stage"] == 1.0
    trainer.method.on_train_end()
    assert all(p.requires_grad for p in net.parameters())


def test_the_loss_decreases_in_a_latent_stage():
    net = cnn(1).train()
    method = colt(net, epochs_per_stage=1, mix_start=0.0)
    method.on_epoch_start(1)
    x, y = data(32)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        with batch_statistics(net, x):
            out = method.loss(x, y, ctx())
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_first_epoch_runs_in_seconds():
    x, y = data(96)
    history = Trainer(cnn(), x, y, TrainConfig(method="colt", eps=0.05, epochs=1,
                                               batch_size=32)).fit()
    assert history[0]["seconds"] < 30


def test_user_latent_layers_and_errors():
    method = colt(cnn(), latent_layers=("relu_1",), max_error_terms=20)
    assert method.latent == ["relu_1"] and method.stages == 2
    method.on_epoch_start(2)
    region = method.region(*data(2)[:1], 0.05)
    assert region.generators.shape[1] <= 20 + 12  # folded, plus at most one box term per neuron
    with pytest.raises(InvalidValueError, match="no node"):
        colt(cnn(), latent_layers=("nope",))
    with pytest.raises(InvalidValueError, match="graph order"):
        colt(cnn(), latent_layers=("relu_1", "relu"))
    with pytest.raises(InvalidValueError):
        get_method("colt").Options(mix_start=2.0)


def test_a_network_without_cut_after_a_relu_is_refused():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = x.flatten(1)
            return self.b(torch.relu(self.a(h)) + h)

    with pytest.raises(CertfxError, match="cut point"):
        get_method("colt")(Skip(), torch.zeros(1, 1, 8, 8))


def test_colt_certification_adds_partial_milp_to_alpha_crown_and_is_exact_on_two_layers():
    """``evaluate(cert="colt")`` (Sec. 6-7): α-CROWN, then MILP with binaries for the last one
    and then two ReLU layers. On a network with two ReLU layers the last stage is the exact
    MILP, so COLT certifies exactly the PGD-robust examples an exact MILP proves — here more
    than α-CROWN alone."""
    from certfx.specs import Property, UnsafeRegion
    from certfx.train.evaluate import evaluate
    from certfx.verify.cascade import CascadeOptions, Verdict, Verifier

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    with torch.no_grad():
        net[0].weight.mul_(6)
    x = torch.rand(16, 4)
    y = net(x).argmax(1)
    eps = 0.1
    alpha = evaluate(net, x, y, eps, cert="alpha-crown", pgd_steps=20, pgd_restarts=2)
    colt = evaluate(net, x, y, eps, cert="colt", pgd_steps=20, pgd_restarts=2,
                    cascade_timeout=20)
    exact = Verifier(net, example_input=x[:1], options=CascadeOptions(methods=("milp",),
                                                                      timeout=20))
    proven = [exact.verify(Property((x[i] - eps).clamp(0, 1).double(),
                                    (x[i] + eps).clamp(0, 1).double(),
                                    UnsafeRegion.misclassified(int(y[i]), 3))).verdict
              is Verdict.VERIFIED for i in range(16)]
    assert colt.certified == round(sum(proven) / 16, 4)
    assert alpha.certified < colt.certified <= colt.pgd
