"""The split pass: cut points, exact composition, shared parameters, clear errors."""

from __future__ import annotations

import pytest
import torch
from certfx.passes.split import cut_points, split
from torch import nn

import certfx
from certfx.errors import CertfxError
from certfx.specs import LinfBall
from tests.models import cnn_bn_maxpool, mlp, residual


class Concat(nn.Module):
    """Two branches concatenated: a DAG whose only cuts are before the fork and after the join."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


def load(net: nn.Module, shape: tuple[int, ...]):
    net = net.eval()
    return net, certfx.load(net, torch.zeros(1, *shape))


CASES = [(mlp, (12,)), (cnn_bn_maxpool, (1, 8, 8)), (residual, (3, 6, 6))]


def _shape(make):
    return dict(CASES)[make]


@pytest.mark.parametrize("make", [c[0] for c in CASES], ids=lambda f: f.__name__)
def test_every_cut_composes_to_the_network(make):
    net, gm = load(make(), _shape(make))
    x = torch.rand(4, *_shape(make))
    points = cut_points(gm)
    assert points
    for p in points:
        extractor, classifier, cut = split(gm, at=p.node)
        z = extractor(x)
        assert tuple(z.shape[1:]) == cut.shape
        assert torch.allclose(classifier(z), net(x), atol=1e-5)


def test_relus_k_puts_k_relu_layers_in_the_classifier():
    net, gm = load(nn.Sequential(nn.Flatten(), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 6),
                                 nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)),
                   (1, 3, 3))
    for k in (1, 2, 3):
        _, classifier, cut = split(gm, relus=k)
        assert cut.relus_after == k
        relus = [n for n in classifier.graph.nodes if n.target is certfx.ops.relu]
        assert len(relus) == k
        # the classifier starts with that ReLU: its input is the pre-activation
        first = next(n for n in classifier.graph.nodes if n.op == "call_function")
        assert first.target is certfx.ops.relu


def test_halves_share_the_models_parameters():
    net, gm = load(mlp(), (12,))
    extractor, classifier, _ = split(gm, relus=1)
    params = {id(p) for p in net.parameters()}
    assert {id(p) for p in extractor.parameters()} <= params
    assert {id(p) for p in classifier.parameters()} <= params
    x = torch.rand(3, 12)
    classifier(extractor(x)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    before = classifier(extractor(x)).detach()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    assert not torch.allclose(classifier(extractor(x)), before)
    assert torch.allclose(classifier(extractor(x)), net(x), atol=1e-5)


def test_residual_block_internals_are_not_cut_points():
    net, gm = load(residual(), (3, 6, 6))
    names = {p.node for p in cut_points(gm)}
    relus = [n for n in gm.graph.nodes if n.target is certfx.ops.relu]
    inside = [r for r in relus if r.name not in names]
    assert inside, "the residual test model has a ReLU inside a block"
    with pytest.raises(CertfxError, match=rf"cannot cut .*'{inside[0].name}'.*still read by.*"
                                          r"Valid cut points: .*ReLU layer"):
        split(gm, at=inside[0].name)


def test_dag_with_concat():
    net, gm = load(Concat(), (4,))
    x = torch.rand(5, 4)
    names = [p.node for p in cut_points(gm)]
    assert "cat" in names or any(n.startswith("concat") for n in names)
    for name in names:
        e, c, _ = split(gm, at=name)
        assert torch.allclose(c(e(x)), net(x), atol=1e-6)
    branch = next(n.name for n in gm.graph.nodes if n.target is certfx.ops.relu)
    with pytest.raises(CertfxError, match="cannot cut"):
        split(gm, at=branch)


def test_bad_requests_list_the_options():
    _, gm = load(mlp(), (12,))
    with pytest.raises(CertfxError, match="exactly one"):
        split(gm)
    with pytest.raises(CertfxError, match="relus=9.*choose 1..2.*Valid cut points"):
        split(gm, relus=9)
    with pytest.raises(CertfxError, match="no node named 'nope'.*Valid cut points"):
        split(gm, at="nope")


@pytest.mark.parametrize("make", [mlp, cnn_bn_maxpool], ids=lambda f: f.__name__)
def test_halves_compile_and_their_bounds_compose_soundly(make):
    net, gm = load(make(), _shape(make))
    extractor, classifier, cut = split(gm, relus=1)
    x = torch.rand(3, *_shape(make))
    eps = 0.05
    box_e = certfx.compile(extractor, "box", LinfBall(eps), example_input=x[:1])
    z_lo, z_hi = box_e.certified_forward(x)
    box_c = certfx.compile(classifier, "box", certfx.Box(z_lo, z_hi), example_input=z_lo[:1])
    lo, hi = box_c.certified_forward((z_lo + z_hi) / 2)
    whole_lo, whole_hi = certfx.compile(gm, "box", LinfBall(eps)).certified_forward(x)
    for _ in range(30):
        xs = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
        out = net(xs)
        assert (lo <= out + 1e-5).all() and (out <= hi + 1e-5).all()
    # composing box bounds at the cut is exactly box over the whole network
    assert torch.allclose(lo, whole_lo, atol=1e-4) and torch.allclose(hi, whole_hi, atol=1e-4)
