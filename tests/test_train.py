"""Certified training: schedules, batch-norm statistics, the methods' losses, the loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certfx.domains import Interval
from certfx.errors import CertfxError, InvalidValueError
from certfx.train import (
    StepContext,
    TrainConfig,
    Trainer,
    evaluate,
    get_method,
)
from certfx.train.batch_stats import batch_statistics
from certfx.train.ibp import fast_regularizer, ibp_init_
from certfx.train.losses import robust_ce
from certfx.train.sabr import sabr_box
from certfx.train.schedule import EpsSchedule, lr_factor
from tests.models import toy_images


def small_cnn(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4) if bn else nn.Identity(),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 3))


toy_data = toy_images


def ctx(eps: float, target: float | None = None, progress: float = 1.0) -> StepContext:
    return StepContext(0, 0, eps, eps if target is None else target, progress,
                       torch.Generator().manual_seed(0))


# ---- schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["smooth", "linear"])
def test_eps_schedule_is_monotone_continuous_and_reaches_the_target(shape):
    s = EpsSchedule(0.3, steps_per_epoch=50, warmup=1, ramp=4, shape=shape)
    values = [s(k) for k in range(400)]
    assert values[:50] == [0.0] * 50
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert max(b - a for a, b in itertools.pairwise(values)) < 0.3 / 200 * 2.5  # no jump
    assert values[250] == values[-1] == 0.3 and values[249] < 0.3


def test_smooth_schedule_starts_slower_than_linear():
    smooth = EpsSchedule(1.0, 100, ramp=1, shape="smooth")
    linear = EpsSchedule(1.0, 100, ramp=1, shape="linear")
    assert smooth(10) < linear(10) and smooth(100) == linear(100) == 1.0


def test_lr_decays_at_the_milestones():
    assert [lr_factor(e, (2, 4), 0.2) for e in range(6)] == pytest.approx(
        [1, 1, 0.2, 0.2, 0.04, 0.04])


def test_schedule_rejects_bad_values():
    with pytest.raises(InvalidValueError):
        EpsSchedule(-0.1, 10)
    with pytest.raises(InvalidValueError):
        EpsSchedule(0.1, 10, shape="cosine")


# ---- batch norm ----------------------------------------------------------------------------
def test_batch_statistics_match_train_mode_batch_norm_and_update_the_averages():
    net = small_cnn()
    twin = small_cnn()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        expected = twin.train()(x)  # PyTorch's train-mode batch norm (updates its averages)
    net.train()
    with batch_statistics(net, x):
        assert not net.training
        with torch.no_grad():
            got = net(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert net.training
    assert torch.allclose(net[1].running_mean, twin[1].running_mean, atol=1e-6)
    assert torch.allclose(net[1].running_var, twin[1].running_var, atol=1e-5)


def test_bounds_in_a_step_use_the_batch_statistics():
    """The box bounds computed inside a step contain the step's (batch-statistics) outputs."""
    net = small_cnn().train()
    method = get_method("ibp")(net, torch.zeros(1, 1, 8, 8))
    x, y = toy_data(16)
    with batch_statistics(net, x):
        bounds = method.box(x, y, 0.02)
        out = net(x)
    margins = out.gather(1, y[:, None]) - out
    others = margins.masked_select(F.one_hot(y, 3) == 0).view(16, 2)
    assert (bounds.margins <= others + 1e-5).all()


# ---- IBP initialization and regularizers ------------------------------------------------
def test_ibp_init_scales_by_fan_in():
    net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Conv2d(3, 8, 5))
    assert ibp_init_(net) == 2
    assert net[0].weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / 400, rel=0.05)
    assert net[2].weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / 75, rel=0.1)
    assert float(net[0].bias.detach().abs().max()) == 0


def test_fast_regularizer_by_hand():
    first = Interval(torch.zeros(1, 2), torch.full((1, 2), 2.0))  # radius 1
    # centres [2, -2, 3, -1], radii 1: active 2 and 3 (l > 0), inactive -2 (u < 0), -1 unstable
    box = Interval(torch.tensor([[1.0, -3.0, 2.0, -2.0]]), torch.tensor([[3.0, -1.0, 4.0, 0.0]]))
    tight = 0.0  # radius ratio 1/1 = 1 >= τ
    c = torch.tensor([2.0, -2.0, 3.0, -1.0])
    mean_ratio = (5 / 4) / (2 / 4)  # → folded: 0.4
    dev = (c - c.mean()) ** 2
    var_ratio = float(dev[1] / (dev[0] + dev[2]))
    relu = (max(0, 0.5 - min(mean_ratio, 1 / mean_ratio)) + max(0, 0.5 - min(
        var_ratio, 1 / var_ratio))) / 0.5
    assert float(fast_regularizer([box], first, 0.5)) == pytest.approx(tight + relu)


def test_fast_regularizer_penalizes_growing_boxes():
    first = Interval(torch.zeros(1, 4), torch.ones(1, 4))
    small = Interval(-torch.ones(1, 4) * 0.5 + torch.tensor([[2, -2, 2, -2.]]),
                     torch.ones(1, 4) * 0.5 + torch.tensor([[2, -2, 2, -2.]]))
    big = Interval(small.lower - 10, small.upper + 10)
    assert float(fast_regularizer([small], first)) == pytest.approx(0.0)
    assert float(fast_regularizer([big], first)) > 0.5


# ---- losses --------------------------------------------------------------------------------
def test_robust_ce_bounds_the_cross_entropy_of_every_sampled_point():
    net = small_cnn(bn=False).eval()
    method = get_method("ibp")(net, torch.zeros(1, 1, 8, 8), get_method("ibp").Options(
        init="default"))
    x, y = toy_data(8)
    bound = robust_ce(method.box(x, y, 0.05).margins, reduction="none")
    for _ in range(20):
        xs = (x + (torch.rand_like(x) * 2 - 1) * 0.05).clamp(0, 1)
        assert (F.cross_entropy(net(xs), y, reduction="none") <= bound + 1e-5).all()


def test_sabr_box_lies_in_the_ball_and_contains_the_pgd_point():
    net = small_cnn(bn=False).eval()
    x, y = toy_data(8)
    eps, lam = 0.1, 0.3
    centre, tau = sabr_box(net, x, y, eps, lam, (0.0, 1.0), steps=5, step_size=0.5,
                           restarts=1, generator=torch.Generator().manual_seed(1))
    assert tau == pytest.approx(lam * eps)
    lo, hi = (centre - tau).clamp(0, 1), (centre + tau).clamp(0, 1)
    assert (lo >= x - eps - 1e-7).all() and (hi <= x + eps + 1e-7).all()
    # the PGD point itself (the same seed) is inside the small box
    from certfx.train.pgd import pgd_box
    x_star = pgd_box(net, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), y, steps=5,
                     step_size=0.5, generator=torch.Generator().manual_seed(1))
    assert (x_star >= lo - 1e-7).all() and (x_star <= hi + 1e-7).all()
    assert not torch.equal(x_star, x)  # the attack moved


@pytest.mark.parametrize("name", ["standard", "pgd", "ibp", "crown-ibp", "sabr"])
def test_each_method_decreases_its_loss_on_a_small_batch(name):
    net = small_cnn(seed=1).train()
    method = get_method(name)(net, torch.zeros(1, 1, 8, 8))
    x, y = toy_data(32)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    step = ctx(0.02)
    losses = []
    for _ in range(25):
        with batch_statistics(net, x):
            out = method.loss(x, y, step)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_ibp_adds_the_regularizer_only_while_eps_ramps():
    net = small_cnn().train()
    method = get_method("ibp")(net, torch.zeros(1, 1, 8, 8))
    x, y = toy_data(16)
    with batch_statistics(net, x):
        ramping = method.loss(x, y, ctx(0.01, target=0.1, progress=0.1))
        done = method.loss(x, y, ctx(0.1, target=0.1))
    assert "fast_reg" in ramping.metrics and "fast_reg" not in done.metrics


def test_unknown_method_and_bad_options_are_named():
    with pytest.raises(CertfxError, match="unknown training method 'ibpp'.*sabr"):
        get_method("ibpp")
    with pytest.raises(InvalidValueError, match="lambda_ratio"):
        get_method("sabr").Options(lambda_ratio=0.0)
    with pytest.raises(CertfxError, match="takes SABROptions"):
        get_method("sabr")(small_cnn(), torch.zeros(1, 1, 8, 8), get_method("ibp").Options())


# ---- the loop ------------------------------------------------------------------------------
def test_resuming_from_a_checkpoint_gives_the_same_weights(tmp_path):
    x, y = toy_data(40)
    config = TrainConfig(method="sabr", eps=0.05, epochs=2, batch_size=16, eps_warmup=0.5,
                         eps_ramp=1, decay_epochs=(1,))  # fixed: the default scales with epochs
    straight = small_cnn(seed=3)
    Trainer(straight, x, y, config).fit()
    resumed = small_cnn(seed=3)
    Trainer(resumed, x, y, TrainConfig(**{**config.__dict__, "epochs": 1}), out=tmp_path).fit()
    trainer = Trainer(small_cnn(seed=3), x, y, config, out=tmp_path)
    assert trainer.epoch == 1
    trainer.fit()
    for a, b in zip(straight.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    x, y = toy_data(16)
    Trainer(small_cnn(), x, y, TrainConfig(method="ibp", eps=0.05, epochs=1, batch_size=16),
            out=tmp_path).fit()
    with pytest.raises(CertfxError, match="other settings.*method"):
        Trainer(small_cnn(), x, y, TrainConfig(method="sabr", eps=0.05, epochs=1), out=tmp_path)


def test_a_diverging_loss_stops_with_advice():
    x, y = toy_data(16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(CertfxError):
        Trainer(small_cnn(), x, y, TrainConfig(method="standard", eps=0.0, epochs=1)).fit()


def test_bad_training_settings_are_refused():
    with pytest.raises(InvalidValueError, match="eps"):
        TrainConfig(eps=-0.1)
    with pytest.raises(InvalidValueError):
        TrainConfig(epochs=0)
    x, y = toy_data(8)
    with pytest.raises(InvalidValueError, match="labels"):
        Trainer(small_cnn(), x, y[:4], TrainConfig(epochs=1))


@pytest.mark.parametrize("name", sorted({"standard", "pgd", "ibp", "crown-ibp", "sabr"}))
def test_every_method_trains_an_epoch_in_seconds(name):
    x, y = toy_data(96)
    history = Trainer(small_cnn(), x, y, TrainConfig(method=name, eps=0.05, epochs=1,
                                                     batch_size=32)).fit()
    assert history[0]["seconds"] < 30 and math.isfinite(history[0]["loss"])


def test_training_and_evaluation_end_to_end():
    """IBP makes a net certifiable on toy data where standard training does not."""
    x, y = toy_data(192, seed=1)
    xt, yt = toy_data(60, seed=2)
    results = {}
    for name in ("standard", "ibp"):
        net = small_cnn(seed=0)
        Trainer(net, x, y, TrainConfig(method=name, eps=0.1, epochs=6, batch_size=32, lr=5e-3,
                                       eps_warmup=1, eps_ramp=2)).fit()
        results[name] = evaluate(net, xt, yt, 0.1, cert="box", pgd_steps=10, pgd_restarts=1)
    for r in results.values():
        assert r.certified <= r.pgd <= r.natural
    assert results["ibp"].certified > results["standard"].certified
    assert results["ibp"].certified > 0.5
