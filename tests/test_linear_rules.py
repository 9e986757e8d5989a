"""Backward rules of back-substitution, one op at a time, in float32 and float64.

* affine ops: the rule is an *identity*: ``⟨A, f(z)⟩ + b = ⟨A_in, z⟩ + b_in`` for every ``z``;
* activations and max-pool: a *lower bound* on every row for every ``z`` in the input box
  (random points and corners), under every slope policy and for random α-CROWN weights;
* hand-written fast rules equal the trait-derived ones;
* every core op has a rule or is rejected by ``check_support`` with its name.

Argument specifications come from the interval soundness table, so an op added there (with a
backward rule) is tested here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
from certfx.passes import check_support

from certfx import ops
from certfx.domains.interval import Interval
from certfx.domains.linear import LinearBounds, Slopes, Var
from certfx.domains.linear_backward import (
    BACK,
    RELAX,
    RELAX_WEIGHTED,
    UNSUPPORTED,
    _derive_affine,
    has_free_slope,
)
from certfx.domains.relaxations import SlopePolicy
from certfx.errors import UnsupportedOpsError
from tests.test_interval_soundness import CASES, P, PerExample, _box

B, ROWS, N = 3, 4, 400
DTYPES = [torch.float32, torch.float64]
POLICIES = [Slopes(), Slopes(SlopePolicy.ZERO), Slopes(SlopePolicy.ONE),
            Slopes(SlopePolicy.PARALLEL), Slopes.random(0.7, 0.3)]


def _cases(kind: str) -> list:
    out = []
    for op, makers in CASES.items():
        if op in UNSUPPORTED or not BACK.supports(op):
            continue
        if (op in RELAX) != (kind == "relaxed"):
            continue
        out += [pytest.param(op, k, dt, id=f"{op.__name__}-{k}-{str(dt)[6:]}")
                for k in range(len(makers)) for dt in DTYPES]
    return out


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    def one(a: Any) -> Any:
        if isinstance(a, list):
            return [one(x) for x in a]
        if isinstance(a, PerExample):
            return PerExample(a.value.to(dtype))
        return a.to(dtype) if isinstance(a, torch.Tensor) else a
    return tuple(one(a) for a in args)


def _map(args: tuple, fn: Callable[[Any], Any]) -> tuple:
    return tuple([fn(a) for a in x] if isinstance(x, list) else fn(x) for x in args)


def _boxes(args: tuple, dtype: torch.dtype) -> tuple:
    return _map(args, lambda a: (Interval(*(t.to(dtype) for t in _box(a)))
                                 if isinstance(a, P) else a))


def _points(box: Interval, n: int) -> torch.Tensor:
    """``(n, *shape)`` points of the box: half random corners, half uniform."""
    u = torch.rand(n, *box.shape, dtype=box.lower.dtype)
    u[: n // 2] = (u[: n // 2] < 0.5).to(u.dtype)
    return box.lower + u * (box.upper - box.lower)


def _evaluate(op: Callable[..., Any], args: tuple, points: dict[int, torch.Tensor],
              n: int) -> torch.Tensor:
    """``op`` on ``n`` concrete argument tuples (``points[id(box)]`` per box), folded into the
    batch dim; returns ``(n, B, *out)``."""
    def concrete(a: Any) -> Any:
        if isinstance(a, Interval):
            return points[id(a)].reshape(n * B, *a.shape[1:])
        if isinstance(a, PerExample):
            return a.value.repeat(n, *([1] * (a.value.dim() - 1)))
        return a
    out = op(*_map(args, concrete))
    return out.reshape(n, B, *out.shape[1:])


def _rule_args(args: tuple) -> tuple:
    """The rule's arguments: boxes become ``Var``s, per-example constants plain tensors."""
    return _map(args, lambda a: Var(tuple(a.shape[1:])) if isinstance(a, Interval) else
                (a.value if isinstance(a, PerExample) else a))


def _value(coef: torch.Tensor, bias: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``⟨coef_r, z⟩ + bias_r`` for ``n`` points ``z`` ``(n, B, *shape)``: ``(n, B, R)``."""
    return (coef.unsqueeze(0) * z.unsqueeze(2)).flatten(3).sum(-1) + bias


def _terms(result: Any) -> list[LinearBounds]:
    return list(result) if isinstance(result, tuple) else [result]


def _tol(dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    return (1e-4 if dtype == torch.float32 else 1e-9) * (1 + scale)


@pytest.mark.parametrize("op,k,dtype", _cases("affine"))
def test_affine_rule_is_exact(op: Callable[..., Any], k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(100 + k)
    args = _boxes(_cast(CASES[op][k](), dtype), dtype)
    boxes = [a for a in _flat(args) if isinstance(a, Interval)]
    points = {id(b): _points(b, N) for b in boxes}
    out = _evaluate(op, args, points, N)
    for shared in (False, True):  # coefficients per example, or shared by the batch
        coef = torch.randn(1 if shared else B, ROWS, *out.shape[2:], dtype=dtype)
        a = LinearBounds(coef, torch.randn(1 if shared else B, ROWS, dtype=dtype))
        terms = _terms(BACK.rule_for(op)(a, *_rule_args(args)))
        assert len(terms) == len(boxes)
        lhs = _value(a.coef, a.bias, out)
        rhs = sum(_value(t.coef, t.bias, points[id(b)]) for t, b in zip(terms, boxes))
        torch.testing.assert_close(rhs, lhs, atol=float(_tol(dtype, lhs.abs().max())), rtol=0)


def _flat(args: tuple) -> list:
    return [x for a in args for x in (a if isinstance(a, list) else [a])]


@pytest.mark.parametrize("op,k,dtype", _cases("relaxed"))
def test_relaxed_rule_is_a_lower_bound(op: Callable[..., Any], k: int,
                                       dtype: torch.dtype) -> None:
    torch.manual_seed(200 + k)
    args = _boxes(_cast(CASES[op][k](), dtype), dtype)
    box, const = args[0], args[1:]
    boxes = [a for a in _flat(args) if isinstance(a, Interval)]  # two for a product
    points = {id(b): _points(b, N) for b in boxes}
    out = _evaluate(op, args, points, N)
    a = LinearBounds(torch.randn(B, ROWS, *out.shape[2:], dtype=dtype),
                     torch.randn(B, ROWS, dtype=dtype))
    try:
        relaxations = [RELAX[op](box, *const, slopes=s) for s in POLICIES]
    except ValueError:  # no linear relaxation for these constants (a leaky slope of −0.5):
        return          # deliberate, and rejected at compile time (test_linear_domains)
    if has_free_slope(op, *const):  # α-CROWN's weights, per row, also outside [0, 1]
        start = RELAX_WEIGHTED[op](box, *const)  # its weight's layout (sigmoid: two per neuron)
        alpha = torch.rand(B, ROWS, *start.weight.shape[2:], dtype=dtype) * 1.4 - 0.2
        relaxations += [RELAX_WEIGHTED[op](box, *const, alpha=alpha), start]
    truth = _value(a.coef, a.bias, out)
    for relaxation in relaxations:
        terms = _terms(BACK.rule_for(op)(a, relaxation))
        assert len(terms) == len(boxes)
        bound = sum(_value(t.coef, t.bias, points[id(b)]) for t, b in zip(terms, boxes))
        assert not bool(bound.isnan().any())
        assert bool((bound <= truth + _tol(dtype, truth.abs().max())).all()), \
            f"{op.__name__}: a point lies below the lower bound"


def test_weighted_relaxation_starts_at_the_policy() -> None:
    """Without α the weighted relaxation is the policy's; its weight reproduces it."""
    box = _box(P(B, 50))
    for policy in POLICIES:
        plain = RELAX[ops.relu](box, slopes=policy)
        weighted = RELAX_WEIGHTED[ops.relu](box, slopes=policy)
        again = RELAX_WEIGHTED[ops.relu](box, alpha=weighted.weight)
        if policy.policy is not SlopePolicy.RANDOM:
            torch.testing.assert_close(weighted.lower_slope, plain.lower_slope)
        torch.testing.assert_close(again.lower_slope, weighted.lower_slope)


def test_max_pool_selects_and_is_exact_when_dominated() -> None:
    """One window [0,1], [2,3], [-5,1.5]: y ≥ x₂, and y = x₂ as 2 ≥ max(1, 1.5)."""
    box = Interval(torch.tensor([[[0.0, 2.0, -5.0]]]), torch.tensor([[[1.0, 3.0, 1.5]]]))
    r = RELAX[ops.max_pool](box, (3,), (3,), (0,), (1,), False)
    assert r.index.flatten().tolist() == [1] and bool(r.exact.all())
    up = LinearBounds(torch.tensor([[[[-1.0]]]]), torch.zeros(1, 1))  # −y ≥ −x₂
    assert BACK.rule_for(ops.max_pool)(up, r).coef.flatten().tolist() == [0.0, -1.0, 0.0]
    box = Interval(box.lower, torch.tensor([[[1.0, 3.0, 10.0]]]))   # no longer dominated
    r = RELAX[ops.max_pool](box, (3,), (3,), (0,), (1,), False)
    t = BACK.rule_for(ops.max_pool)(up, r)  # −y ≥ −10
    assert t.coef.abs().sum().item() == 0.0 and t.bias.item() == -10.0


@pytest.mark.parametrize("op", [ops.linear, ops.conv, ops.reshape, ops.add, ops.sub, ops.mul,
                                ops.div, ops.neg, ops.batch_norm])
def test_hand_written_rules_equal_the_derived_ones(op: Callable[..., Any]) -> None:
    derived = _derive_affine(op, ops.traits(op))
    for k, maker in enumerate(CASES[op]):
        torch.manual_seed(300 + k)
        args = _rule_args(_boxes(_cast(maker(), torch.float64), torch.float64))
        shape = op(*_map(args, lambda v: torch.zeros(1, *v.shape, dtype=torch.float64)
                          if isinstance(v, Var) else v)).shape[1:]
        a = LinearBounds(torch.randn(B, ROWS, *shape, dtype=torch.float64),
                         torch.randn(B, ROWS, dtype=torch.float64))
        for mine, ref in zip(_terms(BACK.rule_for(op)(a, *args)), _terms(derived(a, *args))):
            torch.testing.assert_close(mine.coef, ref.coef)
            torch.testing.assert_close(mine.bias, ref.bias)


def test_affine_rules_are_differentiable_in_the_weights() -> None:
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    a = LinearBounds(torch.randn(2, 4, 3, 5, 5), torch.zeros(2, 4))
    out = BACK.rule_for(ops.conv)(a, Var((2, 5, 5)), w, None, (1, 1), (1, 1), (1, 1), 1)
    derived = _derive_affine(ops.batch_norm, ops.traits(ops.batch_norm))
    gamma = torch.rand(2, requires_grad=True)
    out2 = derived(out, Var((2, 5, 5)), torch.zeros(2), torch.ones(2), gamma, None, 1e-5)
    out2.coef.sum().backward()
    assert w.grad is not None and gamma.grad is not None and bool(w.grad.abs().sum() > 0)


def test_every_core_op_has_a_rule_or_is_rejected_by_name() -> None:
    missing = [op.__name__ for op in ops.CORE_OPS
               if not BACK.supports(op) and op not in UNSUPPORTED]
    assert not missing, f"core ops with neither a backward rule nor a rejection: {missing}"
    for op in UNSUPPORTED:  # a graph using it is rejected with the node and op named
        graph = fx.Graph()
        x = graph.placeholder("x")
        args = (x, x) if len(ops.traits(op).perturbed_args) == 2 else (x,)
        node = graph.call_function(op, args)
        graph.output(node)
        gm = fx.GraphModule(torch.nn.Module(), graph)
        for domain in ("deeppoly", "crown", "crown-ibp", "alpha-crown"):
            with pytest.raises(UnsupportedOpsError, match=op.__name__):
                check_support(domain)(gm)
