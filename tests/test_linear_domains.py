"""The back-substitution domains end to end: hand-computed bounds, exactness on affine networks,
DeepPoly = CROWN, CROWN ≤ CROWN-IBP, α-CROWN ≤ CROWN, sampling (and attack) soundness of logits
and margins, slope policies, float64, gradients, devices and ``torch.compile``."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import certfx
from certfx.domains.crown import AlphaCrownOptions, BacksubOptions
from certfx.domains.linear import Slopes
from certfx.domains.relaxations import SlopePolicy
from certfx.errors import UnsupportedOpsError
from tests.models import NETWORKS

BACKSUB = ["deeppoly", "crown", "crown-ibp", "alpha-crown"]
BALL = certfx.LinfBall(1.0, lower=None, upper=None)


def _two_two_one(b1: tuple[float, float], w2: tuple[float, float]) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor(b1))
        net[2].weight.copy_(torch.tensor([w2]))
        net[2].bias.zero_()
    return net


def _bounds(net: nn.Module, domain: str, options: object = None) -> tuple[float, float]:
    x = torch.zeros(1, 2)
    cm = certfx.compile(net, domain=domain, input_spec=BALL, example_input=x,
                        domain_options=options)
    lo, hi = cm.certified_forward(x)
    return round(lo.item(), 5), round(hi.item(), 5)


def test_hand_computed_symmetric_2_2_1() -> None:
    """y = relu(x₁+x₂) − relu(x₁−x₂) on [−1, 1]²; both pre-activations in [−2, 2].

    Upper lines 0.5z + 1; adaptive lower slopes 1 (u ≥ −l): y ≥ x₁+x₂ − (0.5(x₁−x₂) + 1)
    = 0.5x₁ + 1.5x₂ − 1 ≥ −3, and symmetrically y ≤ 3. Slope 0: y ≥ −0.5x₁ + 0.5x₂ − 1 ≥ −2.
    Slope ½ (parallel): y ≥ x₂ − 1 ≥ −2. The exact range is [−2, 2], which α-CROWN finds."""
    net = _two_two_one((0.0, 0.0), (1.0, -1.0))
    for domain in ("deeppoly", "crown", "crown-ibp"):
        assert _bounds(net, domain) == (-3.0, 3.0)
        for policy in (SlopePolicy.ZERO, SlopePolicy.PARALLEL):
            assert _bounds(net, domain, BacksubOptions(Slopes(policy))) == (-2.0, 2.0)
        assert _bounds(net, domain, BacksubOptions(Slopes(SlopePolicy.ONE))) == (-3.0, 3.0)
    assert _bounds(net, "alpha-crown") == (-2.0, 2.0)
    assert _bounds(net, "box") == (-2.0, 2.0)


def test_hand_computed_asymmetric_2_2_1() -> None:
    """y = relu(x₁+x₂−1) + relu(x₁−x₂+0.5): pre-activations in [−3, 1] (adaptive slope 0,
    upper 0.25z + 0.75) and [−1.5, 2.5] (slope 1, upper 0.625z + 0.9375).
    Lower: y ≥ x₁ − x₂ + 0.5 ≥ −1.5; upper: y ≤ 0.875x₁ − 0.375x₂ + 1.75 ≤ 3. The exact range
    is [0, 2.5]; α-CROWN's lower slopes 0 reach the lower end; box gives [0, 3.5]."""
    net = _two_two_one((-1.0, 0.5), (1.0, 1.0))
    for domain in ("deeppoly", "crown", "crown-ibp"):
        assert _bounds(net, domain) == (-1.5, 3.0)
    assert _bounds(net, "alpha-crown") == (0.0, 3.0)
    assert _bounds(net, "box") == (0.0, 3.5)


class _Affine(nn.Module):
    """conv → BN → avg-pool → two branches (linear, and a scaled copy) added → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.a, self.b = nn.Linear(27, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.avg_pool2d(self.bn(self.conv(x)), 2).flatten(1)
        h = self.a(h)
        return self.b(h + 0.5 * h - x.flatten(1)[:, :8])


@pytest.mark.parametrize("domain", BACKSUB)
def test_affine_networks_get_the_exact_range(domain: str) -> None:
    torch.manual_seed(0)
    net = _Affine().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 2, 6, 6)
    cm = certfx.compile(net, domain=domain, input_spec=certfx.LinfBall(0.1, None, None),
                        example_input=x[:1])
    lo, hi = cm.certified_forward(x)
    for i in range(2):  # exact: M c ± |M| r for the Jacobian M
        jac = torch.autograd.functional.jacobian(lambda v: net(v.view(1, 2, 6, 6)),
                                                 x[i:i + 1]).reshape(4, -1)
        center = net(x[i:i + 1])[0]
        radius = jac.abs() @ torch.full((72,), 0.1)
        torch.testing.assert_close(lo[i], center - radius, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hi[i], center + radius, atol=1e-5, rtol=1e-5)


class _Dag(nn.Module):
    """Slices, a concat of a ReLU and a tanh branch, and nodes with several users."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        z = torch.cat([h[:, ::2], torch.tanh(self.b(x)), h[:, 1:5]], 1)
        return self.c(torch.relu(z) - 0.5 * z + h[:, :1])


@pytest.mark.parametrize("domain", BACKSUB)
def test_general_dag_is_sound(domain: str) -> None:
    torch.manual_seed(6)
    net = _Dag()
    x = torch.rand(2, 6)
    ball = certfx.LinfBall(0.3, None, None)
    cm = certfx.compile(net, domain=domain, input_spec=ball, example_input=x[:1])
    crown = certfx.compile(net, domain="crown", input_spec=ball, example_input=x[:1])
    lo, hi = cm.certified_forward(x)
    for i in range(2):
        xl, xh = cm.input_bounds(x[i:i + 1])
        pts = [xl + torch.rand(2000, 6) * (xh - xl)]
        pts += [_attack(net, xl, xh, w.unsqueeze(0)) for w in torch.cat([torch.eye(3),
                                                                         -torch.eye(3)])]
        out = net(torch.cat(pts)).detach()
        assert bool((out >= lo[i] - 1e-5).all() and (out <= hi[i] + 1e-5).all())
    ref_lo, ref_hi = crown.certified_forward(x)
    if domain in ("deeppoly", "alpha-crown"):
        assert bool((lo >= ref_lo - 1e-6).all() and (hi <= ref_hi + 1e-6).all())


def _compile(name: str, domain: str, eps: float, options: object = None,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    make, shape = NETWORKS[name]
    net = make().to(device=device, dtype=dtype)
    cm = certfx.compile(net, domain=domain, input_spec=certfx.LinfBall(eps),
                        example_input=torch.zeros(1, *shape, device=device, dtype=dtype),
                        domain_options=options)
    return net, cm, shape


def _all(name: str, eps: float, x: torch.Tensor, y: torch.Tensor) -> dict:
    out = {}
    for domain in ("box", *BACKSUB):
        _, cm, _ = _compile(name, domain, eps)
        with torch.no_grad():
            out[domain] = (*cm.certified_forward(x), cm.certified_forward(x, y=y))
    return out


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_orderings_between_the_domains(name: str) -> None:
    """DeepPoly = CROWN exactly; CROWN at least as tight as CROWN-IBP, α-CROWN as CROWN."""
    torch.manual_seed(1)
    net, _, shape = _compile(name, "box", 0.0)
    x = torch.rand(4, *shape)
    y = net(x).argmax(1)
    for eps in (0.01, 0.05):
        b = _all(name, eps, x, y)
        assert all(torch.equal(p, q) for p, q in zip(b["deeppoly"], b["crown"]))
        for tight, loose in (("crown", "crown-ibp"), ("alpha-crown", "crown")):
            lo, hi, margin = b[tight]
            lo2, hi2, margin2 = b[loose]
            assert bool((lo >= lo2 - 1e-5).all() and (hi <= hi2 + 1e-5).all())
            assert bool((margin >= margin2 - 1e-5).all())
        assert float(b["crown"][2].mean()) > float(b["box"][2].mean())


def _attack(net: nn.Module, lo: torch.Tensor, hi: torch.Tensor, weights: torch.Tensor,
            steps: int = 15) -> torch.Tensor:
    """Points of the box ``[lo, hi]`` minimizing ``weights·net`` (projected sign gradient)."""
    z = (lo + hi) / 2
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        grad, = torch.autograd.grad((net(z) * weights).sum(), z)
        z = torch.minimum(torch.maximum(z - (hi - lo) * 0.25 * grad.sign(), lo), hi)
    return z.detach()


@pytest.mark.parametrize("domain", BACKSUB)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_sound_by_sampling_and_attacks(name: str, domain: str) -> None:
    torch.manual_seed(2)
    net, cm, shape = _compile(name, domain, 0.05)
    x = torch.rand(3, *shape)
    y = net(x).argmax(1)
    lo, hi = cm.certified_forward(x)
    margins = cm.certified_forward(x, y=y)
    classes = lo.shape[1]
    for i in range(3):
        xl, xh = cm.input_bounds(x[i:i + 1])
        u = torch.rand(300, *shape)
        u[:150] = (u[:150] < 0.5).to(u.dtype)  # corners
        pts = [xl + u * (xh - xl)]
        for k in range(classes):  # attack every logit from both sides, and every margin
            for sign in (1.0, -1.0):
                w = torch.zeros(1, classes)
                w[0, k] = sign
                pts.append(_attack(net, xl, xh, w))
            if k != y[i]:
                w = torch.zeros(1, classes)
                w[0, y[i]], w[0, k] = 1.0, -1.0
                pts.append(_attack(net, xl, xh, w))
        out = net(torch.cat(pts)).detach()
        assert bool((out >= lo[i] - 1e-5).all() and (out <= hi[i] + 1e-5).all())
        true_margin = out[:, y[i]].unsqueeze(1) - out
        true_margin = torch.cat([true_margin[:, :y[i]], true_margin[:, y[i] + 1:]], 1)
        assert bool((true_margin >= margins[i] - 1e-5).all())


def test_float64_and_random_slopes_are_sound() -> None:
    torch.manual_seed(3)
    for options in (BacksubOptions(), BacksubOptions(Slopes.random(0.6, 0.2))):
        net, cm, shape = _compile("cnn_bn_maxpool", "crown", 0.05, options, torch.float64)
        x = torch.rand(2, *shape, dtype=torch.float64)
        lo, hi = cm.certified_forward(x)
        assert lo.dtype == torch.float64
        xl, xh = cm.input_bounds(x)
        for i in range(2):
            out = net(xl[i] + torch.rand(500, *shape, dtype=torch.float64) * (xh[i] - xl[i]))
            assert bool((out >= lo[i] - 1e-9).all() and (out <= hi[i] + 1e-9).all())


def test_slopes_can_be_chosen_per_call() -> None:
    net, cm, shape = _compile("mlp", "crown", 0.05)
    _, zero, _ = _compile("mlp", "crown", 0.05, BacksubOptions(Slopes(SlopePolicy.ZERO)))
    lo, hi = cm.input_bounds(torch.rand(2, *shape))
    per_call = cm.bounds(lo, hi, slopes=Slopes(SlopePolicy.ZERO))
    torch.testing.assert_close(per_call.lower, zero.bounds(lo, hi).lower)
    assert not torch.equal(per_call.lower, cm.bounds(lo, hi).lower)


def test_alpha_crown_options() -> None:
    torch.manual_seed(4)
    net, crown, shape = _compile("mlp", "crown", 0.05)
    x = torch.rand(3, *shape)
    y = net(x).argmax(1)
    ref = crown.certified_forward(x, y=y)
    results = []
    for options in (AlphaCrownOptions(steps=0), AlphaCrownOptions(steps=10),
                    AlphaCrownOptions(steps=10, optimize_intermediate=True)):
        _, cm, _ = _compile("mlp", "alpha-crown", 0.05, options)
        results.append(cm.certified_forward(x, y=y).detach())
    torch.testing.assert_close(results[0], ref)
    assert bool((results[1] >= ref - 1e-6).all()) and bool((results[1] > ref + 1e-4).any())
    assert bool((results[2] >= ref - 1e-6).all())
    assert float(results[2].sum()) >= float(results[1].sum()) - 1e-3
    assert "alpha_crown_optimize(" in cm.code
    assert "relax_relu_weighted(" in cm.bounds.passes.code and "alpha_out_relu" in cm.bounds.passes.code


@pytest.mark.parametrize("domain", ["crown", "crown-ibp", "alpha-crown"])
def test_gradients_reach_the_model_parameters(domain: str, device: torch.device) -> None:
    net, cm, shape = _compile("cnn_bn_maxpool", domain, 0.02, device=device)
    x = torch.rand(3, *shape, device=device)
    loss = -cm.certified_forward(x, y=torch.tensor([0, 1, 2], device=device)).mean()
    loss.backward()
    assert net[0].weight.grad is not None and bool(net[0].weight.grad.abs().sum() > 0)
    assert net[1].weight.grad is not None
    assert any(p is net[0].weight for p in cm.bounds.parameters())


@pytest.mark.parametrize("optimize_intermediate", [False, True])
def test_alpha_crown_bounds_with_gradients_are_the_optimized_bounds(
        optimize_intermediate: bool) -> None:
    """With gradients on, α-CROWN recomputes the bounds from each output row's best slopes: the
    same bounds as without gradients where every slope belongs to one output row, and never
    looser in either case."""
    options = AlphaCrownOptions(steps=8, optimize_intermediate=optimize_intermediate)
    net, cm, shape = _compile("mlp", "alpha-crown", 0.1, options=options)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        plain = cm.certified_forward(x)
    tracked = cm.certified_forward(x)
    assert tracked.lower.requires_grad
    if not optimize_intermediate:
        torch.testing.assert_close(tracked.lower.detach(), plain.lower)
        torch.testing.assert_close(tracked.upper.detach(), plain.upper)
    assert bool((tracked.lower.detach() >= plain.lower - 1e-6).all())
    assert bool((tracked.upper.detach() <= plain.upper + 1e-6).all())


def test_alpha_crown_stops_at_its_deadline_with_sound_bounds() -> None:
    """Past the deadline (as the cascade sets it), α-CROWN stops after evaluating its starting
    slopes: CROWN's bounds exactly; without one, its Adam steps tighten them."""
    import time

    from certfx.domains.crown import optimization_deadline

    torch.manual_seed(4)
    _, crown, shape = _compile("mlp", "crown", 0.05)
    _, alpha, _ = _compile("mlp", "alpha-crown", 0.05, AlphaCrownOptions(steps=10))
    x = torch.rand(3, *shape)
    with torch.no_grad():
        reference = crown.certified_forward(x)
        with optimization_deadline(time.perf_counter() - 1.0):
            stopped = alpha.certified_forward(x)
        full = alpha.certified_forward(x)
    torch.testing.assert_close(stopped.lower, reference.lower)
    torch.testing.assert_close(stopped.upper, reference.upper)
    assert bool((full.lower > reference.lower + 1e-4).any())


def test_generated_code_is_a_sequence_of_rule_calls(device: torch.device) -> None:
    _, cm, shape = _compile("residual", "crown", 0.02, device=device)
    code = cm.code
    for call in ("lin_pass_bounds(", "back_conv(", "back_relu(", "back_add(", "lin_add(",
                 "lin_concretize(", "relax_relu(", "box_conv("):
        assert call in code
    assert "for " not in code and "while " not in code
    lo, hi = cm.certified_forward(torch.rand(2, *shape, device=device))
    assert lo.device.type == device.type


@pytest.mark.parametrize("domain", ["crown", "crown-ibp"])
def test_torch_compile_of_generated_module(domain: str) -> None:
    _, cm, shape = _compile("mlp", domain, 0.05)
    x = torch.rand(3, *shape)
    ref = cm.certified_forward(x)
    out = torch.compile(cm.bounds, backend="eager")(*cm.input_bounds(x))
    torch.testing.assert_close(out.lower, ref.lower)
    torch.testing.assert_close(out.upper, ref.upper)


def test_unrelaxable_constants_are_rejected_at_compile_time() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.5), nn.Linear(4, 2))
    for domain in BACKSUB:
        with pytest.raises(UnsupportedOpsError, match="leaky_relu"):
            certfx.compile(net, domain=domain, example_input=torch.zeros(1, 3))
    certfx.compile(net, domain="box", example_input=torch.zeros(1, 3))  # box handles it


@pytest.mark.parametrize("domain", BACKSUB)
def test_lower_bounds_only(domain: str) -> None:
    """``bound_upper=False`` runs half the output's rows: the same lower bounds, upper +inf;
    ``certified_forward(x, y)`` uses it."""
    torch.manual_seed(5)
    net, cm, shape = _compile("residual", domain, 0.05)
    x = torch.rand(2, *shape)
    y = net(x).argmax(1)
    spec = cm.output_spec.matrix(y, cm.num_outputs)
    lo, hi = cm.input_bounds(x)
    both = cm.bounds(lo, hi, spec)
    low = cm.bounds(lo, hi, spec, bound_upper=False)
    assert bool(torch.isinf(low.upper).all())
    torch.testing.assert_close(low.lower, both.lower)
    torch.testing.assert_close(cm.certified_forward(x, y=y), both.lower)
    plain = cm.bounds(lo, hi, bound_upper=False)  # without a specification: on the logits
    torch.testing.assert_close(plain.lower, cm.bounds(lo, hi).lower)


def test_chunked_passes_match_one_pass_and_bound_memory() -> None:
    """Intermediate passes run in chunks of rows within the coefficient budget: a budget of a
    few rows gives the same bounds as one pass over all unstable neurons."""
    make, shape = NETWORKS["cnn_bn_maxpool"]
    net, x = make(), torch.rand(3, *shape)
    ball = certfx.LinfBall(0.05)
    results = []
    for budget in (10_000, 1 << 24):
        cm = certfx.compile(net, domain="crown", input_spec=ball, example_input=x[:1],
                            domain_options=BacksubOptions(max_coefficients=budget))
        results.append(cm.certified_forward(x))
        passes = [n for n in cm.bounds.graph.nodes
                  if n.op == "call_function" and n.target.__name__ == "lin_pass_bounds"]
        rows = [(n.args[4], math.prod(n.args[2])) for n in passes]  # (chunk, neurons)
        assert rows and all(chunk >= 1 for chunk, _ in rows)
        if budget == 10_000:  # several chunks per pass
            assert any(chunk < neurons for chunk, neurons in rows), rows
    torch.testing.assert_close(results[0].lower, results[1].lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0].upper, results[1].upper, rtol=1e-5, atol=1e-5)


def test_oversized_backward_passes_are_rejected_at_compile_time() -> None:
    """Passes that cannot run in chunks (α-CROWN's per-pass slopes span all rows) fail early
    beyond the budget, naming the node and the way out."""
    make, shape = NETWORKS["cnn_bn_maxpool"]
    options = AlphaCrownOptions(max_coefficients=10_000, optimize_intermediate=True)
    with pytest.raises(certfx.CertfxError, match="(?s)batch_norm.*crown-ibp"):
        certfx.compile(make(), domain="alpha-crown", example_input=torch.zeros(1, *shape),
                       domain_options=options)
    for domain in ("crown", "crown-ibp", "alpha-crown"):
        certfx.compile(make(), domain=domain, example_input=torch.zeros(1, *shape),
                       domain_options=BacksubOptions(max_coefficients=10_000)
                       if domain != "alpha-crown" else AlphaCrownOptions(max_coefficients=10_000))


@pytest.mark.parametrize("domain", ["crown", "alpha-crown"])
def test_generated_modules_survive_pickling(domain: str) -> None:
    """Unpickling re-traces FX code; the rule calls (and α-CROWN's submodules) must survive."""
    options = AlphaCrownOptions(steps=3) if domain == "alpha-crown" else None
    _, cm, shape = _compile("residual", domain, 0.02, options)
    buffer = io.BytesIO()
    torch.save(cm.bounds, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    lo, hi = cm.input_bounds(torch.rand(2, *shape))
    torch.testing.assert_close(again(lo, hi).lower, cm.bounds(lo, hi).lower)


def _conv_chain(seed: int = 0) -> nn.Module:
    """Strides, paddings, batch norm, sigmoid and leaky ReLU: every patches step."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 4, 2, 1), nn.Sigmoid(), nn.Conv2d(5, 3, 3, 1, 0),
                        nn.LeakyReLU(0.1), nn.Conv2d(3, 4, 3, 2, 2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 3))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("make", [_conv_chain, lambda: NETWORKS["cnn_bn_maxpool"][0]()])
def test_patches_equal_dense_coefficients(make: object) -> None:
    """Local coefficients change memory and time, never the bounds."""
    net = make()
    shape = (2, 11, 11) if make is _conv_chain else NETWORKS["cnn_bn_maxpool"][1]
    x = torch.rand(3, *shape)
    results = []
    for patches in (True, False):
        cm = certfx.compile(net, domain="crown", input_spec=certfx.LinfBall(0.05),
                            example_input=x[:1], domain_options=BacksubOptions(patches=patches))
        uses = "patch_rows(" in cm.code
        assert uses == patches or make is not _conv_chain
        results.append(cm.certified_forward(x))
    torch.testing.assert_close(results[0].lower, results[1].lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0].upper, results[1].upper, rtol=1e-5, atol=1e-5)


class _Gated(nn.Module):
    """relu(a(x)) · b(x): a product of two perturbed tensors (McCormick planes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x)) * self.b(x))


@pytest.mark.parametrize("domain", BACKSUB)
def test_products_of_perturbed_tensors_are_sound(domain: str) -> None:
    net, x = _Gated(), torch.rand(4, 4, dtype=torch.float64)
    net = net.double()
    cm = certfx.compile(net, domain=domain, input_spec=certfx.LinfBall(0.2),
                        example_input=x[:1])
    assert "back_product(" in cm.code or "back_product(" in str(cm.bounds.passes.code
                                                                 if domain == "alpha-crown" else "")
    lo, hi = cm.certified_forward(x)
    xl, xh = cm.input_bounds(x)
    u = torch.rand(4, 3000, 4, dtype=torch.float64)
    u[:, :1500] = (u[:, :1500] < 0.5).double()  # corners
    with torch.no_grad():
        y = net(xl[:, None] + u * (xh - xl)[:, None])
    assert bool((y >= lo[:, None] - 1e-9).all() and (y <= hi[:, None] + 1e-9).all())
