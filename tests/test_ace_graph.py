"""ACE composition (paper 000, Eq. 2): the insert_ace pass and the selection node in every domain
and the MILP backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import certfx
from certfx import ops
from certfx.domains.interval import Interval, box_ace_select
from certfx.errors import CertfxError, ShapeError, UnsupportedOpsError
from certfx.passes import Entropy, SelectionNet, insert_ace


def _nets(seed: int = 0, d: int = 4, k: int = 3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    core = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))
    cert = nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, k))
    return core, cert


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(logits.softmax(1)).sum(1, keepdim=True)


def test_composed_graph_is_eq2_for_both_mechanisms() -> None:
    core, cert = _nets()
    x = torch.rand(200, 4)
    h = _entropy(cert(x)).detach()
    t = float(h.detach().median())
    ace = insert_ace(core, cert, Entropy(t), example_input=x[:1])
    expected = torch.where(h < t, cert(x), core(x))
    assert torch.allclose(ace(x), expected)
    assert 0 < int((h < t).sum()) < 200  # both branches taken

    head = nn.Linear(8, 2)
    ace = insert_ace(core, cert, SelectionNet(0.1, head=head), example_input=x[:1])
    feats = cert[1](cert[0](x))
    score = head(feats)[:, 1:] - head(feats)[:, :1]
    assert 0 < int((score > 0.1).sum()) < 200
    assert torch.allclose(ace(x), torch.where(score > 0.1, cert(x), core(x)))
    assert ace.get_parameter("select_head.weight") is head.weight  # shared, trainable


def test_exactly_at_the_threshold_the_core_answers() -> None:
    core, cert = _nets()
    head = nn.Linear(8, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.25)  # score ≡ 0.25
    x = torch.rand(5, 4)
    at = insert_ace(core, cert, SelectionNet(0.25, head=head), example_input=x[:1])
    assert torch.equal(at(x), core(x))
    below = insert_ace(core, cert, SelectionNet(0.2499, head=head), example_input=x[:1])
    assert torch.equal(below(x), cert(x))


def test_separate_selection_network() -> None:
    core, cert = _nets()
    sel = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    x = torch.rand(50, 4)
    ace = insert_ace(core, cert, SelectionNet(0.0, network=sel), example_input=x[:1])
    assert torch.allclose(ace(x), torch.where(sel(x) > 0, cert(x), core(x)))


def test_box_rule_by_hand() -> None:
    score = Interval(torch.tensor([[1.0], [-2.0], [-1.0]]), torch.tensor([[2.0], [0.0], [1.0]]))
    chosen = Interval(torch.tensor([[0.0, 0.0]] * 3), torch.tensor([[1.0, 1.0]] * 3))
    other = Interval(torch.tensor([[5.0, -3.0]] * 3), torch.tensor([[6.0, -2.0]] * 3))
    out = box_ace_select(score, chosen, other, 0.0)
    # selected; rejected (upper = T exactly: the core answers); undecided: the hull
    assert out.lower.tolist() == [[0.0, 0.0], [5.0, -3.0], [0.0, -3.0]]
    assert out.upper.tolist() == [[1.0, 1.0], [6.0, -2.0], [6.0, 1.0]]


class _NegEntropy(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return -_entropy(logits)


def _samples(x: torch.Tensor, eps: float, n: int = 1500) -> torch.Tensor:
    b, d = x.shape
    pts = x.unsqueeze(1) + eps * (2 * torch.rand(b, n, d) - 1)
    pts[:, :16] = x.unsqueeze(1) + eps * torch.sign(torch.randn(b, 16, d))  # corners
    return pts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("select,domains", [
    ("selnet", ["box", "deepz", "deeppoly", "crown", "alpha-crown", "crown-ibp"]),
    ("entropy", ["box", "deepz"]),
])
def test_every_domain_bounds_the_composition_soundly(select: str, domains: list[str],
                                                     dtype: torch.dtype) -> None:
    core, cert = _nets(seed=3)
    core, cert = core.to(dtype), cert.to(dtype)
    x = torch.rand(48, 4, dtype=dtype)
    eps = 0.08
    if select == "selnet":
        head = nn.Linear(8, 1).to(dtype)
        score_net = nn.Sequential(cert[0], cert[1], head)
        selection = SelectionNet(float(score_net(x).detach().median()), head=head)
    else:
        selection = Entropy(float(_entropy(cert(x)).detach().median()))
        score_net = nn.Sequential(cert, _NegEntropy())
    ace = insert_ace(core, cert, selection, example_input=x[:1])
    pts = _samples(x, eps)
    with torch.no_grad():
        out = ace(pts.reshape(-1, 4)).reshape(48, -1, 3)
        # The inputs must exercise selected, rejected and undecided examples.
        score = score_net(pts.reshape(-1, 4)).reshape(48, -1)
    t = -selection.threshold if select == "entropy" else selection.threshold
    always, never = (score > t).all(1), (score <= t).all(1)
    assert bool(always.any()) and bool(never.any()) and bool((~always & ~never).any())
    tol = 1e-5 if dtype is torch.float32 else 1e-10
    for domain in domains:
        cm = certfx.compile(ace, domain, input_spec=certfx.LinfBall(eps, lower=-9, upper=9))
        with torch.no_grad():
            lo, hi = cm.certified_forward(x)
        assert bool((out >= lo.unsqueeze(1) - tol).all()), domain
        assert bool((out <= hi.unsqueeze(1) + tol).all()), domain


def test_milp_is_exact_on_a_2d_composition() -> None:
    from certfx.backends.milp import output_bounds

    torch.manual_seed(1)
    core = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 2))
    cert = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 2))
    head = nn.Linear(5, 1)
    ace = insert_ace(core, cert, SelectionNet(0.0, head=head), example_input=torch.zeros(1, 2))
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 201), torch.linspace(0, 1, 201),
                                      indexing="ij"), -1).reshape(-1, 2)
    switched = 0
    for trial in range(4):
        x0 = torch.rand(2)
        lo, hi = x0 - 0.4, x0 + 0.4
        pts = lo + (hi - lo) * grid
        with torch.no_grad():
            out = ace(pts).double()
            s = head(cert[1](cert[0](pts)))
        switched += int(bool((s > 0).any() and (s <= 0).any()))
        b = output_bounds(ace, lo, hi)
        b_lower, b_upper = torch.as_tensor(b.lower), torch.as_tensor(b.upper)
        # exact: the MILP optimum is attained on the grid up to its resolution, never beaten
        assert bool((b_lower <= out.min(0).values + 1e-6).all())
        assert bool((b_upper >= out.max(0).values - 1e-6).all())
        assert bool((b_lower >= out.min(0).values - 0.02).all())
        assert bool((b_upper <= out.max(0).values + 0.02).all())
    assert switched > 0  # some box contains both selections


def test_bad_compositions_are_named() -> None:
    core, cert = _nets()
    x = torch.zeros(1, 4)
    other = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(ShapeError, match="output shape"):
        insert_ace(core, other, Entropy(1.0), example_input=x)
    with pytest.raises(CertfxError, match="finite"):
        insert_ace(core, cert, Entropy(float("nan")), example_input=x)
    with pytest.raises(ShapeError, match="one output .* or two"):
        insert_ace(core, cert, SelectionNet(0.0, network=nn.Linear(4, 3)), example_input=x)
    with pytest.raises(CertfxError, match="no node 'nope'"):
        insert_ace(core, cert, SelectionNet(0.0, at="nope"), example_input=x)
    ace = insert_ace(core, cert, Entropy(1.0), example_input=x)
    with pytest.raises(UnsupportedOpsError, match="softmax_entropy"):
        certfx.compile(ace, "crown")


def test_selection_op_is_registered() -> None:
    assert ops.is_core_op(ops.ace_select)
    assert ops.traits(ops.ace_select).perturbed_args == (0, 1, 2)
