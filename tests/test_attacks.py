"""PGD attacks (``certfx.verify.attacks``): counterexamples found where they provably exist,
never reported where the property provably holds, every point re-checked concretely (float64 or
onnxruntime) and inside its input set, and the model left as it was."""

from __future__ import annotations

import doctest
import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from certfx.errors import InvalidValueError, SpecError
from certfx.specs import Conjunction, Property, UnsafeRegion
from certfx.verify import Loss, Norm, PGDConfig, attacks, pgd_ball, pgd_property, recheck

SHARED = Path(__file__).resolve().parents[2] / "shared"
VNNCOMP_TEST = SHARED / "benchmarks" / "vnncomp" / "vnncomp2021" / "test"
FAST = PGDConfig(steps=20, restarts=3)


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    """A linear layer with the given weights (float32)."""
    net = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        net.weight.copy_(torch.tensor(weight))
        net.bias.copy_(torch.tensor(bias))
    return net


def region(*terms: tuple[list[list[float]], list[float]]) -> UnsafeRegion:
    """An unsafe region from ``(matrix, offset)`` pairs (``matrix @ y <= offset``)."""
    return UnsafeRegion(tuple(Conjunction(torch.tensor(m, dtype=torch.float64),
                                          torch.tensor(o, dtype=torch.float64))
                              for m, o in terms))


def box_min(w: torch.Tensor, b: float, lo: torch.Tensor, hi: torch.Tensor) -> float:
    """The exact minimum of ``w·x + b`` over the box ``[lo, hi]``."""
    return float(torch.minimum(w * lo, w * hi).sum() + b)


def test_doctest() -> None:
    result = doctest.testmod(attacks, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted and not result.failed


# ---- properties over boxes --------------------------------------------------------------------

@pytest.mark.parametrize("loss", list(Loss))
def test_box_counterexample_found_where_the_minimum_is_unsafe(loss: Loss) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(6), 0.3
    net = linear([w.tolist()], [b])
    lo, hi = -torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    lowest = box_min(w.double(), b, lo, hi)
    prop = Property(lo, hi, region(([[1.0]], [lowest + 0.05])))  # unsafe: y <= min + 0.05
    result = pgd_property(net, prop, PGDConfig(steps=20, restarts=2, loss=loss))
    assert result.found and result.reason == "" and result.violation <= 0
    assert bool(((result.x >= lo) & (result.x <= hi)).all())
    assert float(result.output[0]) <= lowest + 0.05
    assert recheck(net, prop, result.x)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_counterexample_where_the_property_provably_holds(seed: int) -> None:
    torch.manual_seed(seed)
    w = torch.randn(6)
    net = linear([w.tolist()], [0.0])
    lo, hi = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    lowest = box_min(w.double(), 0.0, lo, hi)
    prop = Property(lo, hi, region(([[1.0]], [lowest - 1e-3])))  # below the exact minimum
    result = pgd_property(net, prop, PGDConfig(steps=30, restarts=4, seed=seed))
    assert not result.found and "no counterexample" in result.reason
    assert result.violation == pytest.approx(1e-3, abs=1e-5)  # PGD reaches the minimizing corner


def test_disjunction_of_terms_and_conjunction_of_rows() -> None:
    net = linear([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0])  # y1 = −y0, y0 ∈ [−1, 1] on [0, 1]²
    lo, hi = torch.zeros(2), torch.ones(2)
    # term 1 impossible (y0 <= −2), term 2 possible (y1 <= −0.9, i.e. x ≈ (1, 0))
    disjunction = Property(lo, hi, region(([[1.0, 0.0]], [-2.0]), ([[0.0, 1.0]], [-0.9])))
    result = pgd_property(net, disjunction, FAST)
    assert result.found and float(result.output[1]) <= -0.9
    # both rows at once: y0 <= −0.2 and y1 <= 0.5, feasible for y0 ∈ [−0.5, −0.2]
    feasible = Property(lo, hi, region(([[1.0, 0.0], [0.0, 1.0]], [-0.2, 0.5])))
    result = pgd_property(net, feasible, FAST)
    assert result.found and -0.5 <= float(result.output[0]) <= -0.2
    # each row alone is feasible, together they are not (y1 = −y0)
    infeasible = Property(lo, hi, region(([[1.0, 0.0], [0.0, 1.0]], [-0.3, -0.3]),
                                         ([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [-2.0, 0., 0.])))
    for loss in Loss:
        assert not pgd_property(net, infeasible, PGDConfig(steps=20, restarts=3, loss=loss)).found


def test_recheck_rejects_points_outside_the_box_or_not_unsafe() -> None:
    net = linear([[1.0, 1.0]], [0.0])
    prop = Property(torch.tensor([0.25, 0.25]), torch.tensor([1.0, 1.0]),
                    region(([[1.0]], [0.6])))  # unsafe: x0 + x1 <= 0.6
    assert recheck(net, prop, torch.tensor([0.25, 0.25]))
    assert recheck(net, prop, torch.tensor([[0.25, 0.3]]))  # a batch dim of 1 is fine
    below = torch.nextafter(torch.tensor(0.25), torch.tensor(0.0))  # one ulp outside the box
    assert not recheck(net, prop, torch.stack([below, torch.tensor(0.25)]))
    assert not recheck(net, prop, torch.tensor([0.5, 0.5]))  # inside, but y = 1 is safe


class _Cancel(nn.Module):
    """``(x + 1e8) − 1e8``: 0 in float32 for small x, x in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1e8) - 1e8


def test_float32_artifact_is_rejected_by_the_float64_recheck() -> None:
    prop = Property(torch.tensor([0.25]), torch.tensor([0.5]), region(([[1.0]], [0.0])))
    result = pgd_property(_Cancel(), prop, PGDConfig(steps=2, restarts=1))
    assert not result.found
    assert "re-check" in result.reason and result.violation == pytest.approx(float(result.x[0]))


def test_property_input_validation() -> None:
    prop = Property(torch.zeros(1), torch.ones(1), region(([[1.0]], [0.0])))
    with pytest.raises(SpecError):
        pgd_property(linear([[1.0]], [0.0]), prop, PGDConfig(norm=Norm.L2))
    with pytest.raises(InvalidValueError):
        PGDConfig(steps=-1)
    with pytest.raises(InvalidValueError):
        PGDConfig(step_size=0.0)


def test_initial_points_are_used() -> None:
    net = linear([[1.0]], [0.0])
    prop = Property(torch.zeros(1), torch.ones(1), region(([[1.0]], [0.0])))  # only x = 0
    result = pgd_property(net, prop, PGDConfig(steps=0, restarts=1, init=torch.zeros(1, 1)))
    assert result.found and result.steps == 0 and float(result.x[0]) == 0.0


# ---- balls ------------------------------------------------------------------------------------

def _two_class() -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear 2-class model, points well inside [−10, 10], and their exact ℓ2 distances to
    the decision boundary."""
    torch.manual_seed(1)
    net = linear(torch.randn(2, 5).tolist(), [0.1, -0.2])
    x = torch.randn(8, 5)
    y = net(x).argmax(1)
    a = net.weight[y] - net.weight[1 - y]  # margin z_y − z_other = a·x + c
    c = net.bias[y] - net.bias[1 - y]
    distance = ((a * x).sum(1) + c) / a.norm(dim=1)
    return net, x, y, distance.detach()


@pytest.mark.parametrize("loss", list(Loss))
def test_l2_ball_finds_exactly_the_points_beyond_the_boundary(loss: Loss) -> None:
    net, x, y, distance = _two_class()
    eps = distance.median().item()
    result = pgd_ball(net, x, y, eps, Norm.L2, PGDConfig(steps=30, restarts=2, loss=loss),
                      lower=-10.0, upper=10.0)
    beyond = distance < eps - 1e-3
    within = distance > eps + 1e-3
    assert bool(result.found[beyond].all()) and not bool(result.found[within].any())
    dist = (result.x_adv.double() - x.double()).norm(dim=1)
    assert bool((dist <= eps).all())


def test_l2_ball_with_an_active_box_stays_in_both() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.rand(16, 10)
    eps = torch.full((16,), 0.5)
    result = pgd_ball(net, x, net(x).argmax(1), eps, Norm.L2, FAST)
    xa = result.x_adv.double()
    assert bool(((xa - x.double()).norm(dim=1) <= 0.5).all())
    assert bool(((xa >= 0) & (xa <= 1)).all())
    flips = net(result.x_adv).argmax(1) != net(x).argmax(1)
    assert bool((result.found == flips).all())  # ties aside, found = the prediction changed


def test_linf_ball_agrees_with_the_exact_linear_answer() -> None:
    net, x, y, _ = _two_class()
    a = (net.weight[y] - net.weight[1 - y]).detach()
    margin = (net(x).gather(1, y[:, None]) - net(x).gather(1, 1 - y[:, None]))[:, 0].detach()
    eps = (margin / a.abs().sum(1)).median().item()  # ℓ∞ distance to the boundary, unclipped
    result = pgd_ball(net, x, y, eps, Norm.LINF, FAST, lower=-10.0, upper=10.0)
    lowest = margin - eps * a.abs().sum(1)  # min over the ℓ∞ ball of the margin
    assert bool(result.found[lowest < -1e-3].all()) and not bool(result.found[lowest > 1e-3].any())
    assert bool(((result.x_adv - x).abs() <= eps).all())
    assert (result.violation[result.found] <= 0).all()
    assert all(r == "" for r, f in zip(result.reasons, result.found.tolist()) if f)


def test_model_state_is_unchanged(device: torch.device) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).to(device)
    net.train()
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(5, 4, device=device)
    pgd_ball(net, x, torch.zeros(5, dtype=torch.long, device=device), 0.1, Norm.LINF, FAST)
    prop = Property(torch.zeros(4), torch.ones(4), region(([[1.0, -1.0, 0.0]], [0.0])))
    pgd_property(net, prop, FAST)
    assert net.training and all(m.training for m in net.modules())
    assert not net[0].weight.requires_grad and net[3].weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.device.type == device.type


def test_pgd_beats_random_sampling_on_an_mnist_like_mlp() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.rand(32, 1, 28, 28)
    y = net(x).argmax(1)
    eps, config = 0.01, PGDConfig(steps=10, restarts=1)
    result = pgd_ball(net, x, y, eps, Norm.LINF, config)
    gen = torch.Generator().manual_seed(0)
    random_hits = torch.zeros(32, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(config.steps + 1):  # as many forward passes as PGD
            noise = eps * (2 * torch.rand(x.shape, generator=gen) - 1)
            random_hits |= net((x + noise).clamp(0, 1)).argmax(1) != y
    assert int(result.found.sum()) > 2 * int(random_hits.sum()) + 3


# ---- ONNX -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (torch.zeros(1, 3),), buffer, dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        except Exception as err:  # pragma: no cover - depends on the torch build
            pytest.skip(f"torch.onnx.export is unavailable: {err}")
    path.write_bytes(buffer.getvalue())
    return path


def test_onnx_property_is_rechecked_with_onnxruntime(onnx_path: Path) -> None:
    from certfx.reference import run_onnx

    lo, hi = -torch.ones(3), torch.ones(3)
    grid = lo + (hi - lo) * torch.rand(4096, 3)
    out = run_onnx(onnx_path, grid).double()
    gap = out[:, 0] - out[:, 1]
    prop = Property(lo, hi, region(([[1.0, -1.0]], [float(gap.min()) + 1e-3])))
    result = pgd_property(onnx_path, prop, FAST)
    assert result.found and recheck(onnx_path, prop, result.x)
    reference = run_onnx(onnx_path, result.x[None]).double()[0]
    assert torch.equal(result.output, reference)  # the reported output is onnxruntime's
    safe = Property(lo, hi, region(([[1.0, -1.0]], [float(gap.min()) - 10.0])))
    assert not pgd_property(onnx_path, safe, FAST).found
    ball = pgd_ball(str(onnx_path), grid[:8], out[:8].argmax(1), 0.5, Norm.L2, FAST, -1.0, 1.0)
    flips = run_onnx(onnx_path, ball.x_adv).argmax(1) != out[:8].argmax(1)
    assert bool((ball.found == flips).all())


@pytest.mark.skipif(not VNNCOMP_TEST.exists(), reason="/work/shared/benchmarks is not present")
def test_vnncomp_test_sat_counterexample() -> None:
    """``test_sat.onnx`` with ``test_prop.vnnlib`` (ACAS Xu property 3): unsafe when Y_0 is the
    minimal score, i.e. Y_0 − Y_j <= 0 for j = 1..4 (one term, four rows)."""
    pytest.importorskip("onnxruntime")
    lo = torch.tensor([-0.30353115613746867, -0.009549296585513092, 0.4933803235848431, 0.3, 0.3],
                      dtype=torch.float64)
    hi = torch.tensor([-0.29855281193475053, 0.009549296585513092, 0.49999999998567607, 0.5,
                       0.5], dtype=torch.float64)
    matrix = torch.zeros(4, 5, dtype=torch.float64)
    matrix[:, 0] = 1.0
    matrix[range(4), range(1, 5)] = -1.0
    prop = Property(lo, hi, UnsafeRegion((Conjunction(matrix, torch.zeros(4,
                                                                          dtype=torch.float64)),)))
    result = pgd_property(VNNCOMP_TEST / "test_sat.onnx", prop, PGDConfig())
    assert result.found and recheck(VNNCOMP_TEST / "test_sat.onnx", prop, result.x)
    assert int(result.output.argmin()) == 0
    unsat = pgd_property(VNNCOMP_TEST / "test_unsat.onnx", prop, PGDConfig(steps=20, restarts=2))
    assert not unsat.found  # the instance is verified unsat by the VNN-COMP tools


def test_a_passed_deadline_stops_pgd_at_once() -> None:
    """The cascade's time limit reaches inside the attack: no step runs after the deadline."""
    import time

    torch.manual_seed(0)
    net = linear([torch.randn(6).tolist()], [0.0])
    lo, hi = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    prop = Property(lo, hi, region(([[1.0]], [-100.0])))  # unreachable: PGD would run on
    result = pgd_property(net, prop, PGDConfig(steps=500, restarts=3),
                          deadline=time.perf_counter())
    assert result.steps == 0 and not result.found
    assert pgd_property(net, prop, PGDConfig(steps=5, restarts=1)).steps == 5
