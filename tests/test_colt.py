"""COLT: latent regions, the change of variables, stages, freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certfx.errors import CertfxError
from certfx.train import StepContext, TrainConfig, Trainer, get_method
from certfx.train.batch_stats import batch_statistics
from certfx.train.colt import latent_attack, latent_point, stage_eps_factor
from tests.models import toy_images


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 12),
                         nn.ReLU(), nn.Linear(12, 3))


data = toy_images


def colt(net, **options):
    method = get_method("colt")(net, torch.zeros(1, 1, 8, 8),
                                get_method("colt").Options(**options))
    method.total_epochs = 3
    return method


def test_stages_and_eps_follow_the_paper():
    method = colt(cnn(), epochs_per_stage=2)
    assert method.stages == 3  # input, after ReLU 1, after ReLU 2
    assert [method.stage_of(e)[0] for e in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    assert [stage_eps_factor(s) for s in range(3)] == [1.1, 1.05, 1.0]


def test_the_region_is_sound_and_latent_points_stay_in_it():
    net = cnn().eval()
    method = colt(net)
    box, classifier, _ = method._part(1)
    x, y = data(4)
    eps = 0.05
    lo, hi = box.input_bounds(x, eps)
    region = box.bounds(lo, hi)
    hull_lo, hull_hi = region.center - region.generators.abs().sum(1), \
        region.center + region.generators.abs().sum(1)
    extractor = nn.Sequential(*list(net)[:2])
    for _ in range(50):  # true latent values of sampled inputs lie in the zonotope's hull
        xs = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
        z = extractor(xs)
        assert (z >= hull_lo - 1e-5).all() and (z <= hull_hi + 1e-5).all()
    e = torch.rand(4, region.generators.shape[1]) * 4 - 2  # outside the cube: clip first
    z = latent_point(region.center, region.generators, e.clamp(-1, 1))
    assert (z >= hull_lo - 1e-5).all() and (z <= hull_hi + 1e-5).all()
    # PGD in e raises the classifier's loss above the centre's
    adv = latent_attack(classifier, region, y, 10, 0.25, torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy
    assert loss(classifier(adv), y).item() > loss(classifier(region.center), y).item()
    assert (adv >= hull_lo - 1e-5).all() and (adv <= hull_hi + 1e-5).all()


def test_regions_are_sound_with_batch_norm_under_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(144, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    method = colt(net.train())
    x, _ = data(16)
    for stage, cut in ((1, 3), (2, 7)):
        part = method._part(stage)
        with batch_statistics(net, x):
            region = part.region.bounds(*part.region.input_bounds(x, 0.03))
            radius = region.generators.abs().sum(1)
            for _ in range(20):
                z = net[:cut]((x + (torch.rand_like(x) * 2 - 1) * 0.03).clamp(0, 1))
                assert (z >= region.center - radius - 1e-5).all()
                assert (z <= region.center + radius + 1e-5).all()
            assert torch.allclose(part.classifier(net[:cut](x)), net(x), atol=1e-5)


def test_freezing_follows_the_stages_and_keeps_the_users_own_flags():
    net = cnn()
    net[5].bias.requires_grad_(False)  # frozen by the user: stays frozen throughout
    method = colt(net, epochs_per_stage=1)
    trainable = lambda: [p.requires_grad for p in net.parameters()]
    method.on_epoch_start(1)   # latent layer 1: the conv is frozen
    assert trainable() == [False, False, True, True, True, False]
    method.on_epoch_start(2)   # latent layer 2: the conv and the first linear layer
    assert trainable() == [False, False, False, False, True, False]
    method.on_epoch_start(0)   # stage 0 (e.g. a new run): nothing of COLT's is frozen
    assert trainable() == [True, True, True, True, True, False]
    method.on_epoch_start(2)
    method.on_train_end()
    assert trainable() == [True, True, True, True, True, False]
    assert all(p.requires_grad for p in colt(cnn(), freeze=False).model.parameters())


def test_a_latent_stage_freezes_the_extractor_and_trains_the_rest():
    net = cnn()
    x, y = data(64)
    trainer = Trainer(net, x, y, TrainConfig(method="colt", eps=0.05, epochs=2, batch_size=32,
                                             eps_warmup=0, eps_ramp=0, options=get_method(
                                                 "colt").Options(epochs_per_stage=1)))
    trainer.train_epoch()  # stage 0: everything trains
    conv, head = net[0].weight.detach().clone(), net[3].weight.detach().clone()
    trainer.train_epoch()  # stage 1: the conv before the latent layer is frozen
    assert torch.equal(net[0].weight, conv)
    assert not torch.equal(net[3].weight, head)
    trainer.method.on_train_end()
    assert all(p.requires_grad for p in net.parameters())


def test_the_loss_decreases_in_a_latent_stage():
    net = cnn(1).train()
    method = colt(net, epochs_per_stage=1, natural_weight=0.0)
    method.on_epoch_start(1)
    x, y = data(32)
    opt = torch.optim.Adam([p for p in net.parameters()], lr=2e-2)
    ctx = StepContext(1, 0, 0.03, 0.03, 1.0, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        with batch_statistics(net, x):
            out = method.loss(x, y, ctx)
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


def test_a_network_without_cut_after_a_relu_is_refused():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 3)

        def forward(self, x):
            h = x.flatten(1)
            return self.b(torch.relu(self.a(h)) + h)

    with pytest.raises(CertfxError, match="cut point"):
        get_method("colt")(Skip(), torch.zeros(1, 1, 8, 8))
