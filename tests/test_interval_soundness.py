"""Sampling soundness of every interval rule: for every core op the box domain handles, random
boxes and thousands of sampled points (random corners included) all lie within the bounds.

The table ``CASES`` must cover every op with a box rule; ``test_every_box_rule_has_a_case``
fails when a new op is added without a soundness case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from certfx import ops
from certfx.domains import get_domain
from certfx.domains.interval import Interval

B = 3  # batch size of every case
N_SAMPLES = 2000
TOL = 1e-5


class P:
    """Marks a perturbed argument: a random box of the given per-batch shape."""

    def __init__(self, *shape: int, positive: bool = False):
        self.shape = shape
        self.positive = positive


class PerExample:
    """Marks a constant with a leading batch dim (a per-example C-matrix, say)."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def _c(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _e(*shape: int) -> PerExample:
    return PerExample(torch.randn(B, *shape))


CASES: dict[Callable[..., Any], list[Callable[[], tuple]]] = {
    ops.linear: [lambda: (P(B, 5), _c(4, 5), _c(4)), lambda: (P(B, 2, 5), _c(4, 5), None)],
    ops.matmul: [lambda: (P(B, 3, 5), _c(5, 4))],
    ops.conv: [
        lambda: (P(B, 2, 7, 7), _c(4, 1, 3, 3), _c(4), (2, 2), (1, 1), (1, 1), 2),
        lambda: (P(B, 3, 8), _c(2, 3, 3), None, (1,), (2,), (2,), 1),
        lambda: (P(B, 2, 6, 6), _c(3, 2, 2, 2), _c(3), (1, 2), (0, 1), (2, 1), 1),
    ],
    ops.batch_norm: [lambda: (P(B, 3, 4, 4), _c(3), torch.rand(3) + 0.1, _c(3), _c(3), 1e-5),
                     lambda: (P(B, 3), _c(3), torch.rand(3) + 0.1, None, None, 1e-5)],
    ops.add: [lambda: (P(B, 4), P(B, 4)), lambda: (P(B, 4), _c(4)), lambda: (_c(1, 4), P(B, 4))],
    ops.sub: [lambda: (P(B, 4), P(B, 4)), lambda: (P(B, 4), _c(4)), lambda: (_c(4), P(B, 4))],
    ops.mul: [lambda: (P(B, 2, 4), _c(2, 1)), lambda: (P(B, 4), -2.5)],
    ops.div: [lambda: (P(B, 4), torch.tensor([0.5, -2.0, 3.0, -0.25]))],
    ops.neg: [lambda: (P(B, 4),)],
    ops.avg_pool: [lambda: (P(B, 2, 6, 6), (3, 3), (2, 2), (1, 1), False, True),
                   lambda: (P(B, 2, 7), (2,), (2,), (0,), True, False)],
    ops.reduce_sum: [lambda: (P(B, 2, 3, 4), (1, 3), False)],
    ops.reduce_mean: [lambda: (P(B, 2, 3, 4), (2,), True)],
    ops.pad: [lambda: (P(B, 2, 4, 4), (1, 2, 0, 1), 0.5)],
    ops.spec_linear: [lambda: (P(B, 5), _c(3, 5), _c(3), _e(2, 3)),
                      lambda: (P(B, 5), _c(3, 5), _c(3), None)],
    ops.apply_spec: [lambda: (P(B, 3), _e(2, 3)), lambda: (P(B, 3), None)],
    ops.reshape: [lambda: (P(B, 2, 6), (3, 4))],
    ops.permute: [lambda: (P(B, 2, 3, 4), (0, 3, 1, 2))],
    ops.strided_slice: [lambda: (P(B, 3, 9), 2, 1, 8, 3)],
    ops.concat: [lambda: ([P(B, 2, 3), _e(1, 3), P(B, 4, 3)], 1)],
    ops.relu: [lambda: (P(B, 10),)],
    ops.leaky_relu: [lambda: (P(B, 10), 0.1), lambda: (P(B, 10), -0.5)],
    ops.sigmoid: [lambda: (P(B, 10),)],
    ops.tanh: [lambda: (P(B, 10),)],
    ops.hardtanh: [lambda: (P(B, 10), -0.5, 1.0), lambda: (P(B, 10), 0.0, float("inf"))],
    ops.max_pool: [lambda: (P(B, 2, 6, 6), (3, 3), (2, 2), (1, 1), (1, 1), False),
                   lambda: (P(B, 2, 5, 5), (2, 2), (1, 1), (0, 0), (2, 2), True),
                   lambda: (P(B, 2, 9), (3,), (3,), (0,), (1,), False)],
    ops.exp: [lambda: (P(B, 10),)],
    ops.log: [lambda: (P(B, 10, positive=True),)],
    ops.reciprocal: [lambda: (P(B, 10, positive=True),), lambda: (P(B, 10),)],
    ops.product: [lambda: (P(B, 2, 5), P(B, 2, 5)), lambda: (P(B, 2, 5), P(B, 2, 1)),
                  lambda: (P(B, 4), _c(4))],
    ops.softmax_entropy: [lambda: (P(B, 5),)],
    # ACE's selection: random score boxes give decided and undecided examples
    ops.ace_select: [lambda: (P(B, 1), P(B, 4), P(B, 4), 0.0),
                     lambda: (P(B, 1), P(B, 2, 3), P(B, 2, 3), 0.5),
                     lambda: (P(B, 1), _c(4), P(B, 4), -0.5)],
}


def _box(p: P) -> Interval:
    center = torch.randn(*p.shape) * 2
    radius = torch.rand(*p.shape) * 1.5
    radius[torch.rand(*p.shape) < 0.1] = 0.0  # some degenerate (point) entries
    if p.positive:  # the domain of log (and one side of the reciprocal)
        center = center.abs() + radius + 0.05
    return Interval(center - radius, center + radius)


def _map(args: tuple, fn: Callable[[Any], Any]) -> tuple:
    return tuple([fn(a) for a in x] if isinstance(x, list) else fn(x) for x in args)


def _abstract(args: tuple) -> tuple:
    """Replace each P by a random Interval (PerExample constants stay marked)."""
    return _map(args, lambda a: _box(a) if isinstance(a, P) else a)


def _unmark(args: tuple) -> tuple:
    return _map(args, lambda a: a.value if isinstance(a, PerExample) else a)


def _sample(args: tuple, n: int) -> tuple:
    """n concrete argument tuples (batched along a new leading sample dim folded into batch)."""

    def draw(iv: Interval) -> torch.Tensor:
        lo, hi = iv.lower.expand(n, *iv.shape), iv.upper.expand(n, *iv.shape)
        u = torch.rand(n, *iv.shape)
        corner = torch.rand(n, *iv.shape) < 0.5
        is_corner = (torch.arange(n) < n // 2).view(n, *([1] * len(iv.shape)))
        u = torch.where(is_corner, corner.to(u.dtype), u)  # half the samples are corners
        pts = lo + u * (hi - lo)
        return pts.reshape(n * iv.shape[0], *iv.shape[1:])

    def concretize(a: Any) -> Any:
        if isinstance(a, Interval):
            return draw(a)
        if isinstance(a, PerExample):
            return a.value.repeat(n, *([1] * (a.value.dim() - 1)))
        return a

    return _map(args, concretize)


def _cases() -> list:
    return [pytest.param(op, k, id=f"{op.__name__}-{k}")
            for op, makers in CASES.items() for k in range(len(makers))]


def test_every_box_rule_has_a_case() -> None:
    box = get_domain("box")
    missing = [op.__name__ for op in ops.CORE_OPS if box.supports(op) and op not in CASES]
    assert not missing, f"box rules without a soundness case: {missing}"


@pytest.mark.parametrize("op,k", _cases())
def test_box_rule_is_sound(op: Callable[..., Any], k: int) -> None:
    torch.manual_seed(1000 + k)
    args = CASES[op][k]()
    abstract = _abstract(args)
    result = get_domain("box").rule_for(op)(*_unmark(abstract))
    assert isinstance(result, Interval)
    assert bool((result.lower <= result.upper + TOL).all())
    concrete = op(*_sample(abstract, N_SAMPLES))
    concrete = concrete.reshape(N_SAMPLES, *result.shape)
    scale = 1.0 + concrete.abs().amax()
    assert bool((concrete >= result.lower - TOL * scale).all()), "a sample lies below the bound"
    assert bool((concrete <= result.upper + TOL * scale).all()), "a sample lies above the bound"


@pytest.mark.parametrize("op", [ops.relu, ops.sigmoid, ops.tanh, ops.hardtanh, ops.leaky_relu,
                                ops.linear, ops.conv, ops.batch_norm, ops.max_pool, ops.exp,
                                ops.log, ops.reciprocal, ops.product])
def test_box_rule_is_tight_at_end_points(op: Callable[..., Any]) -> None:
    """The rules are exact per output (monotone or centre/radius): some sample gets close."""
    torch.manual_seed(7)
    args = CASES[op][0]()
    abstract = _abstract(args)
    result = get_domain("box").rule_for(op)(*_unmark(abstract))
    concrete = op(*_sample(abstract, N_SAMPLES)).reshape(N_SAMPLES, *result.shape)
    if op in (ops.linear, ops.conv, ops.batch_norm):
        # Exact bounds are attained at the corner sign(W) picks; random corners get within
        # a fraction of the width for these small fan-ins.
        gap = (concrete.amin(0) - result.lower) / (result.upper - result.lower + 1e-12)
        assert float(gap.median()) < 0.35
    else:
        assert torch.allclose(concrete.amin(0), result.lower, atol=1e-5)
        assert torch.allclose(concrete.amax(0), result.upper, atol=1e-5)


def test_hand_computed_linear_relu() -> None:
    """W = 1, b = 2 on [1, 2, 3] ± 1: the pre-activation lies in [5, 11]."""
    box = get_domain("box")
    x = Interval(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 3.0, 4.0]]))
    pre = box.rule_for(ops.linear)(x, torch.ones(1, 3), torch.tensor([2.0]))
    assert pre.lower.tolist() == [[5.0]] and pre.upper.tolist() == [[11.0]]
    neg = box.rule_for(ops.linear)(x, -torch.ones(1, 3), torch.tensor([2.0]))
    assert neg.lower.tolist() == [[-7.0]] and neg.upper.tolist() == [[-1.0]]
    post = box.rule_for(ops.relu)(neg)
    assert post.lower.tolist() == [[0.0]] and post.upper.tolist() == [[0.0]]
    crossing = box.rule_for(ops.relu)(Interval(torch.tensor([-1.0]), torch.tensor([2.0])))
    assert crossing.lower.tolist() == [0.0] and crossing.upper.tolist() == [2.0]
    # max pool of [0,1], [2,3], [-5,10] over one window: [2, 10]
    mp = box.rule_for(ops.max_pool)(
        Interval(torch.tensor([[[0.0, 2.0, -5.0]]]), torch.tensor([[[1.0, 3.0, 10.0]]])),
        (3,), (3,), (0,), (1,), False)
    assert mp.lower.flatten().tolist() == [2.0] and mp.upper.flatten().tolist() == [10.0]
