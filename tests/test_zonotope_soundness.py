"""Sampling soundness of every zonotope (DeepZ) rule.

For every core op the ``deepz`` domain handles, random input zonotopes (shared and private error
blocks, some degenerate entries) are pushed through the rule; sampled error vectors (half of
them corners of ``[−1, 1]^E``) give concrete inputs, and the op's concrete outputs must

* lie in the output zonotope's concretization, and
* be reachable by the output zonotope *with the same values of the input error terms*: the
  residual ``f(x(ε)) − c − Σ_old g·ε`` must be covered by the new terms, ``≤ Σ_new |g|``. This
  catches misaligned or wrongly shared error terms, which containment alone would not.

``CASES`` (the interval test's table, plus cases of its own) must cover every op with a deepz
rule; ``test_every_deepz_rule_has_a_case`` fails when one is added without a case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from certfx import ops
from certfx.domains import get_domain
from certfx.domains.zonotope import ErrorBlock, Zonotope, ZonotopeOptions
from tests.test_interval_soundness import CASES as BOX_CASES
from tests.test_interval_soundness import P, PerExample

B = 3
N_SAMPLES = 600
TOL = 2e-5
SHARED, PRIVATE = 4, 3  # error terms shared by all arguments of a case / private to each

CASES: dict[Callable[..., Any], list[Callable[[], tuple]]] = {
    op: list(makers) for op, makers in BOX_CASES.items()}
# DeepZ relaxes leaky ReLU for slopes in [0, 1] only (tested to raise below).
CASES[ops.leaky_relu] = [lambda: (P(B, 10), 0.1), lambda: (P(B, 10), 1.0)]
CASES[ops.reciprocal] = CASES[ops.reciprocal] + [lambda: (P(B, 2, 5, positive=True),)]
CASES[ops.hardtanh] = CASES[ops.hardtanh] + [lambda: (P(B, 10), -float("inf"), 0.3)]
CASES[ops.softmax_entropy] = CASES[ops.softmax_entropy] + [lambda: (P(B, 2),)]


def _zonotope(p: P, shared: ErrorBlock, options: ZonotopeOptions) -> Zonotope:
    private = ErrorBlock("private", PRIVATE)
    g = torch.randn(p.shape[0], SHARED + PRIVATE, *p.shape[1:]) * 0.3
    g[:, torch.rand(SHARED + PRIVATE) < 0.2] = 0.0  # some unused terms
    g = g * (torch.rand(p.shape[0], 1, *p.shape[1:]) > 0.1)  # some point entries
    center = torch.randn(*p.shape) * 2
    if p.positive:
        center = center.abs() + g.abs().sum(1) + 0.05
    return Zonotope(center, g, (shared, private), options)


def _map(args: tuple, fn: Callable[[Any], Any]) -> tuple:
    return tuple([fn(a) for a in x] if isinstance(x, list) else fn(x) for x in args)


def make_abstract(args: tuple, options: ZonotopeOptions | None = None) -> tuple:
    """Replace each P by a random zonotope; all of them share one error block."""
    shared = ErrorBlock("shared", SHARED)
    options = options if options is not None else ZonotopeOptions()
    return _map(args, lambda a: _zonotope(a, shared, options) if isinstance(a, P) else a)


def unmark(args: tuple) -> tuple:
    return _map(args, lambda a: a.value if isinstance(a, PerExample) else a)


def sample_errors(args: tuple, n: int) -> dict[ErrorBlock, torch.Tensor]:
    """Values ``(n, batch, size)`` for every error block of the arguments; half are corners."""
    blocks: list[ErrorBlock] = []
    _map(args, lambda a: blocks.extend(b for b in a.blocks if b not in blocks)
         if isinstance(a, Zonotope) else None)
    out = {}
    for b in blocks:
        u = torch.rand(n, B, b.size) * 2 - 1
        u[: n // 2] = torch.sign(u[: n // 2])
        out[b] = u
    return out


def _error_part(z: Zonotope, eps: dict[ErrorBlock, torch.Tensor]) -> torch.Tensor:
    """``Σ g·ε`` over the blocks of ``z`` that have sampled values, ``(n, batch, *shape)``."""
    n = next(iter(eps.values())).shape[0] if eps else 1
    total = z.center.new_zeros(n, *z.center.shape)
    start = 0
    for b in z.blocks:
        if b in eps:
            g = z.generators.narrow(1, start, b.size)
            total = total + torch.einsum("nbe,be...->nb...", eps[b].to(g), g)
        start += b.size
    return total


def concretize_args(args: tuple, eps: dict[ErrorBlock, torch.Tensor], n: int) -> tuple:
    """Concrete arguments, the sample dim folded into the batch."""

    def point(a: Any) -> Any:
        if isinstance(a, Zonotope):
            pts = a.center + _error_part(a, eps)
            return pts.reshape(n * a.center.shape[0], *a.center.shape[1:])
        if isinstance(a, PerExample):
            return a.value.repeat(n, *([1] * (a.value.dim() - 1)))
        return a

    return _map(args, point)


def check_sound(op: Callable[..., Any], abstract: tuple, result: Zonotope, n: int,
                tol: float = TOL) -> None:
    """Containment and same-ε reachability of sampled concrete outputs (see module doc)."""
    eps = sample_errors(abstract, n)
    concrete = op(*concretize_args(abstract, eps, n)).reshape(n, *result.shape)
    scale = 1.0 + concrete.abs().amax()
    assert bool((concrete >= result.lower - tol * scale).all()), "a sample lies below"
    assert bool((concrete <= result.upper + tol * scale).all()), "a sample lies above"
    residual = concrete - result.center - _error_part(result, eps)
    start, new = 0, torch.zeros_like(result.center)
    for b in result.blocks:
        if b not in eps:
            new = new + result.generators.narrow(1, start, b.size).abs().sum(1)
        start += b.size
    assert bool((residual.abs() <= new + tol * scale).all()), \
        "the output zonotope does not reach a sample with the input's error values"


def _cases() -> list:
    return [pytest.param(op, k, id=f"{op.__name__}-{k}")
            for op, makers in CASES.items() for k in range(len(makers))]


def test_every_deepz_rule_has_a_case() -> None:
    deepz = get_domain("deepz")
    missing = [op.__name__ for op in ops.CORE_OPS if deepz.supports(op) and op not in CASES]
    assert not missing, f"deepz rules without a soundness case: {missing}"


@pytest.mark.parametrize("op,k", _cases())
def test_deepz_rule_is_sound(op: Callable[..., Any], k: int) -> None:
    torch.manual_seed(2000 + k)
    abstract = make_abstract(CASES[op][k]())
    result = get_domain("deepz").rule_for(op)(*unmark(abstract))
    assert isinstance(result, Zonotope)
    assert result.generators.shape[1] == sum(b.size for b in result.blocks)
    check_sound(op, abstract, result, N_SAMPLES)


@pytest.mark.parametrize("op", [ops.product, ops.max_pool, ops.relu, ops.sigmoid, ops.exp])
def test_sound_when_consolidating_error_terms(op: Callable[..., Any]) -> None:
    """A tiny ``max_error_terms`` folds terms into box terms after every term-adding rule."""
    torch.manual_seed(5)
    options = ZonotopeOptions(max_error_terms=3)
    abstract = make_abstract(CASES[op][0](), options)
    result = get_domain("deepz").rule_for(op)(*unmark(abstract))
    neurons = result.center[0].numel()
    assert result.n_errors <= max(3, neurons)
    check_sound(op, abstract, result, N_SAMPLES)


def test_product_interval_fallback_is_sound_and_equals_the_box_product() -> None:
    """With more error terms than ``product_max_terms``: ACE Eq. 28–30."""
    torch.manual_seed(6)
    abstract = make_abstract((P(B, 6), P(B, 6)), ZonotopeOptions(product_max_terms=2))
    result = get_domain("deepz").rule_for(ops.product)(*abstract)
    box = get_domain("box").rule_for(ops.product)(*[z.concretize() for z in abstract])
    torch.testing.assert_close(result.lower, box.lower)
    torch.testing.assert_close(result.upper, box.upper)
    check_sound(ops.product, abstract, result, N_SAMPLES)


def test_leaky_relu_with_a_negative_slope_raises() -> None:
    abstract = make_abstract((P(B, 4),))
    with pytest.raises(ValueError, match="leaky slope"):
        get_domain("deepz").rule_for(ops.leaky_relu)(*abstract, -0.5)


def test_sound_in_float64() -> None:
    torch.manual_seed(9)
    deepz = get_domain("deepz")
    for op in (ops.sigmoid, ops.tanh, ops.exp, ops.product, ops.softmax_entropy):
        args = CASES[op][0]()
        abstract = _map(make_abstract(args), lambda a: Zonotope(
            a.center.double(), a.generators.double(), a.blocks) if isinstance(a, Zonotope)
            else a)
        result = deepz.rule_for(op)(*abstract)
        assert result.center.dtype == torch.float64
        check_sound(op, abstract, result, N_SAMPLES, tol=1e-10)
