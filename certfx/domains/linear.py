"""The :class:`LinearBounds` element of back-substitution and the primitives around it.

Back-substitution (DeepPoly, Singh et al. 2019, Sec. 4; CROWN, Zhang et al. 2018, Thm. 3.2)
keeps, for ``m`` target quantities ``q`` (logits, margins ``C·logits``, or the neurons of an
intermediate node) and some node ``z`` of the graph, linear functions of ``z`` that bound them:

    ``A_lower·z + b_lower ≤ q ≤ A_upper·z + b_upper``.

Starting at the targets (``A = I``, or ``A = C`` for a specification) the functions are pushed
backward through the graph, one op at a time (:mod:`certfx.domains.linear_backward`), until
``z`` is the input, where they are *concretized* over the input set (:func:`lin_concretize`).

One code path for both sides: a :class:`LinearBounds` stores only *lower* bounds, on the stacked
targets ``[q; −q]`` (``2m`` rows), and the upper bound of ``q`` is the negated lower bound of
``−q``. So every backward rule handles a single case, the sign split of a relaxation included.

Example:
    >>> import torch
    >>> box = lin_input(torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 2.0]]))
    >>> start = lin_identity(box.lower, (2,))   # q = z itself: rows [z; −z]
    >>> lin_split(lin_concretize(start, box), (2,)).upper.tolist()
    [[1.0, 2.0]]
    >>> lb = LinearBounds(torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]), torch.zeros(1, 2))
    >>> lb.A_upper.tolist(), lin_split(lin_concretize(lb, box), ()).lower.tolist()
    ([[[1.0, -1.0]]], [-3.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from certfx.domains.base import expose_to_codegen
from certfx.domains.interval import Interval
from certfx.domains.relaxations import SlopePolicy

__all__ = [
    "LinearBounds",
    "Var",
    "Slopes",
    "lin_slopes",
    "lin_input",
    "BallBox",
    "lin_identity",
    "lin_output_start",
    "lin_add",
    "lin_concretize",
    "lin_split",
    "lin_intersect",
    "lin_output_bounds",
    "lin_pass_bounds",
    "lin_restrict",
    "lin_lagrange",
    "lin_unit_rows",
    "rowdot",
]


@dataclass(frozen=True)
class LinearBounds:
    """Lower bounds ``q_r ≥ ⟨coef_r, z⟩ + bias_r`` on ``R`` stacked targets ``q``.

    As started by :func:`lin_identity`, rows ``[0, R/2)`` bound the targets from below and rows
    ``[R/2, R)`` bound their negations from below, i.e. the targets from above (see the module
    docstring); the ``A_*``/``b_*`` properties read that layout. A pass that bounds from below
    only (``bound_upper=False``) has just the first half.

    Attributes:
        coef: ``(batch, R, *node_shape)``; batch 1 when the same for every example.
        bias: ``(batch, R)`` (batch 1 likewise).
    """

    coef: Tensor
    bias: Tensor

    @property
    def rows(self) -> int:
        """``R``: twice the number of targets."""
        return self.coef.shape[1]

    @property
    def A_lower(self) -> Tensor:
        """``(batch, m, *node_shape)``: ``q ≥ A_lower·z + b_lower``."""
        return self.coef[:, : self.rows // 2]

    @property
    def b_lower(self) -> Tensor:
        """``(batch, m)``."""
        return self.bias[:, : self.rows // 2]

    @property
    def A_upper(self) -> Tensor:
        """``(batch, m, *node_shape)``: ``q ≤ A_upper·z + b_upper``."""
        return -self.coef[:, self.rows // 2:]

    @property
    def b_upper(self) -> Tensor:
        """``(batch, m)``."""
        return -self.bias[:, self.rows // 2:]


class Var(NamedTuple):
    """Stands for a perturbed argument (of the given per-example shape) in a backward-rule call.

    A backward rule takes the op's arguments with every perturbed tensor replaced by a ``Var``,
    and returns one :class:`LinearBounds` per ``Var`` (a tuple when there are several).
    """

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Slopes:
    """How relaxations choose free lower slopes (ReLU-like neurons that cross 0).

    Attributes:
        policy: a :class:`~certfx.domains.relaxations.SlopePolicy`.
        p, q: the probabilities of :attr:`SlopePolicy.RANDOM` (paper 004, Sec. 3.3): slope 1
            with probability ``p`` where ``u ≥ −l``, with probability ``q`` elsewhere.

    Example:
        >>> Slopes.random(0.9, 0.1)
        Slopes(SlopePolicy.RANDOM, 0.9, 0.1)
    """

    policy: SlopePolicy = SlopePolicy.ADAPTIVE
    p: float = 1.0
    q: float = 0.0

    @staticmethod
    def random(p: float, q: float) -> Slopes:
        """The (p, q)-random lower slopes."""
        if not (0.0 <= p <= 1.0 and 0.0 <= q <= 1.0):
            raise ValueError(f"p and q must lie in [0, 1], got {p}, {q}")
        return Slopes(SlopePolicy.RANDOM, p, q)

    def __repr__(self) -> str:
        # Valid Python: generated code prints the default of its ``slopes`` argument this way.
        return f"Slopes(SlopePolicy.{self.policy.name}, {self.p!r}, {self.q!r})"


def lin_slopes(slopes: Slopes | None, default: Slopes) -> Slopes:
    """The slope choice of a call: ``slopes``, or the compiled-in ``default`` for ``None``."""
    return default if slopes is None else slopes


@dataclass(frozen=True)
class BallBox(Interval):
    """An input set that lies in both the box ``[lower, upper]`` and the ℓ2 ball
    ``‖x − ball_center‖₂ ≤ ball_radius`` (``ball_radius`` per example, ``(B,)``): e.g. an ℓ2
    ball clipped to the valid range. Every rule that reads it as an :class:`Interval` (its
    circumscribing box) is sound; :func:`lin_concretize` also uses the ball."""

    ball_center: Tensor = None  # type: ignore[assignment]
    ball_radius: Tensor = None  # type: ignore[assignment]


def lin_input(lower: Tensor, upper: Tensor,
              ball: tuple[Tensor, Tensor] | None = None) -> Interval:
    """The input set: the box ``[lower, upper]``, or with ``ball = (center, radius)`` the
    :class:`BallBox` of box and ℓ2 ball, concretized by :func:`lin_concretize`."""
    if ball is None:
        return Interval(lower, upper)
    center, radius = ball
    return BallBox(lower, upper, center, torch.as_tensor(radius).to(lower).reshape(-1))


def lin_identity(like: Tensor, shape: tuple[int, ...], bound_upper: bool = True
                 ) -> LinearBounds:
    """The start of the bounds of a node of per-example ``shape``: ``q = z``, rows ``[I; −I]``
    (batch 1, shared by all examples), in the dtype and on the device of ``like``; only ``[I]``
    (lower bounds) without ``bound_upper``."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    coef = (torch.cat([eye, -eye]) if bound_upper else eye).reshape(1, -1, *shape)
    return LinearBounds(coef, coef.new_zeros(1, coef.shape[1]))


def lin_output_start(like: Tensor, spec: Tensor | None, shape: tuple[int, ...],
                     bound_upper: bool = True) -> LinearBounds:
    """The start at the output node: the identity over its ``shape``, or over its ``m`` outputs
    when a specification ``spec`` (``(batch, m, K)``) is folded into the last op."""
    return lin_identity(like, shape if spec is None else (spec.shape[1],), bound_upper)


def lin_add(a: LinearBounds, b: LinearBounds) -> LinearBounds:
    """Accumulate the contributions of two users of one node: the node's value enters the
    targets through both, so ``q ≥ ⟨A₁ + A₂, z⟩ + b₁ + b₂`` (each bias holds the constants of
    its own path only, see :mod:`certfx.domains.linear_backward`)."""
    return LinearBounds(a.coef + b.coef, a.bias + b.bias)


_BLOCK = 1 << 21  # entries of |A| formed at a time by lin_concretize
_SMALL = 1 << 22  # below, a product and a sum beat a batched matrix-vector product on CPU


def rowdot(coef: Tensor, v: Tensor) -> Tensor:
    """``⟨coef_r, v⟩`` per example and row: ``(B|1, R, n) × (B|1, n) → (B, R)``."""
    if coef.shape[0] == 1 and v.shape[0] > 1:
        return v @ coef[0].transpose(0, 1)
    if max(coef.shape[0], v.shape[0]) * coef.shape[1] * coef.shape[2] <= _SMALL:
        return (coef * v.unsqueeze(1)).sum(-1)
    if v.shape[0] == 1:
        return coef @ v[0]
    return torch.bmm(coef, v.unsqueeze(-1)).squeeze(-1)


def lin_concretize(a: LinearBounds, box: Interval) -> Tensor:
    """The lowest value of every row over the input set: ``(batch, R)``.

    For the ℓ∞ box ``c ± r``: ``min_z ⟨A, z⟩ + b = ⟨A, c⟩ − ⟨|A|, r⟩ + b`` (CROWN, Zhang et
    al. 2018, Thm. 3.2 with q = ∞; Hölder's inequality). For a :class:`BallBox` the ℓ2 ball's
    value ``⟨A, x⟩ − ε‖A‖₂ + b`` (Thm. 3.2 with q = 2, the dual norm; thesis Sec. 3.2) is a second
    lower bound, and the larger of the two holds. This is the only place that knows the input
    set's shape.
    """
    center, radius = box.center_radius()
    coef = a.coef.flatten(2)
    radius = radius.flatten(1)
    # |A| in blocks of rows of about 2M entries: the same sums without a full-size temporary.
    step = max(1, _BLOCK // (coef.shape[0] * coef.shape[2]))
    spread = [rowdot(coef[:, i:i + step].abs(), radius) for i in range(0, coef.shape[1], step)]
    value = rowdot(coef, center.flatten(1)) - (torch.cat(spread, 1) if len(spread) > 1
                                               else spread[0])
    if isinstance(box, BallBox):
        by_ball = rowdot(coef, box.ball_center.flatten(1)) - \
            box.ball_radius.unsqueeze(1) * coef.norm(dim=2)
        value = torch.maximum(value, by_ball)
    return value + a.bias


def lin_split(rows: Tensor, shape: tuple[int, ...]) -> Interval:
    """The interval of ``m`` targets of per-example ``shape`` from the ``2m`` concretized rows
    ``[lower bounds of q; lower bounds of −q]``."""
    m = rows.shape[1] // 2
    batch = rows.shape[0]
    return Interval(rows[:, :m].reshape(batch, *shape), (-rows[:, m:]).reshape(batch, *shape))


def lin_intersect(a: Interval, b: Interval) -> Interval:
    """Both bounds hold, so their intersection does: ``[max(l_a, l_b), min(u_a, u_b)]``."""
    return Interval(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def lin_restrict(bounds: Interval, splits: Any, index: int) -> Interval:
    """The bounds of the ``index``-th split node (a relaxed op's input) within a branch of a
    branch and bound: intersected with ``splits[index] = (lower, upper)`` when the caller
    gives one (``splits`` ``None`` or its entry ``None``: unchanged).

    A branch that fixes a ReLU's input to ``z ≥ 0`` passes ``lower = 0`` there (``−inf``
    elsewhere); the bounds then hold on the branch's inputs only, and every later bound of the
    pass is computed from them (Bunel et al. 2020's ReLU splitting, without β-CROWN's
    Lagrangian terms). An empty intersection (``lower > upper``) shows the branch holds no
    input."""
    if splits is None or splits[index] is None:
        return bounds
    lower, upper = splits[index]
    return Interval(torch.maximum(bounds.lower, lower), torch.minimum(bounds.upper, upper))


def lin_lagrange(a: LinearBounds, multipliers: Any, splits: Any, index: int) -> LinearBounds:
    """The rows ``a`` of the output's pass at the ``index``-th split node ``z``, with a branch's
    split constraints ``z ≥ l_s`` and ``z ≤ u_s`` (``splits[index] = (l_s, u_s)``) added by
    Lagrange multipliers ``multipliers[index] = (λ, ν)`` (β-CROWN, Wang et al. 2021, Sec. 3.1,
    Eq. 5–7): on the branch ``λ·(z − l_s) ≥ 0`` and ``ν·(u_s − z) ≥ 0`` for ``λ, ν ≥ 0``, so

        ``q ≥ ⟨A, z⟩ + b ≥ ⟨A − λ + ν, z⟩ + b + ⟨λ, l_s⟩ − ⟨ν, u_s⟩``.

    Sound for any multipliers: negative ones are taken as 0, and so are those of a bound that
    is infinite (no constraint). ``λ, ν``: ``(batch, R, *node_shape)``; unchanged without them.
    """
    if multipliers is None or multipliers[index] is None or splits is None \
            or splits[index] is None:
        return a
    lam, nu = multipliers[index]
    low, high = splits[index]
    has_low, has_high = torch.isfinite(low).unsqueeze(1), torch.isfinite(high).unsqueeze(1)
    # (a where, not a clamp: the gradient must flow at 0, where the multipliers start)
    lam = torch.where(has_low & (lam >= 0), lam, 0.0)
    nu = torch.where(has_high & (nu >= 0), nu, 0.0)
    low = torch.where(has_low, low.unsqueeze(1), 0.0)
    high = torch.where(has_high, high.unsqueeze(1), 0.0)
    bias = (lam * low - nu * high).flatten(2).sum(2)
    return LinearBounds(a.coef - lam + nu, a.bias + bias)


def lin_output_bounds(rows: Tensor, spec: Tensor | None, shape: tuple[int, ...],
                      bound_upper: bool = True) -> Interval:
    """Like :func:`lin_split` for the output node: ``shape`` without a specification, the
    ``(m,)`` specified quantities with one. Without ``bound_upper`` the rows are lower bounds
    only, and the upper bounds are ``+inf`` (true, and free)."""
    if not bound_upper:
        lower = rows.reshape(rows.shape[0], *(shape if spec is None else (-1,)))
        return Interval(lower, torch.full_like(lower, math.inf))
    return lin_split(rows, shape if spec is None else (rows.shape[1] // 2,))


def lin_unit_rows(index: Tensor, shape: tuple[int, ...], like: Tensor) -> LinearBounds:
    """The start of a pass over the neurons ``index`` (``(batch | 1, c)``, flat indices into
    a node of per-example ``shape``): rows ``[e_i; −e_i]``, ``(batch | 1, 2c, *shape)``."""
    eye = torch.zeros(*index.shape, math.prod(shape), dtype=like.dtype, device=like.device)
    eye.scatter_(2, index.unsqueeze(2), 1.0)
    coef = torch.cat([eye, -eye], 1).reshape(index.shape[0], -1, *shape)
    return LinearBounds(coef, coef.new_zeros(coef.shape[:2]))


# A chunk's coefficient tensors hold about this many entries over the whole batch (4 MiB in
# float32) unless ``rows_per_chunk`` allows fewer: temporaries of this size are reused by the
# allocator, where larger ones are mapped afresh (and page-faulted) for every elementwise op —
# on a 2-core CPU that halves CROWN's time on the 256×2 MLP at batch 32 (benchmarks/domains.py).
_CHUNK_ENTRIES = 1 << 20
_MIN_ROW_VECTORS = 512  # …but at least this many row vectors per chunk, over the batch


def chunk_rows(rows_per_chunk: int, row_width: int, batch: int) -> int:
    """Neurons per chunk of a pass whose rows hold up to ``row_width`` coefficients each:
    ``rows_per_chunk`` (the per-example memory budget) or fewer, so that a chunk's ``2c`` rows
    over the batch hold about ``_CHUNK_ENTRIES`` entries (``row_width`` 0: no such limit)."""
    if row_width <= 0 or batch <= 0:
        return rows_per_chunk
    by_working_set = _CHUNK_ENTRIES // (2 * row_width * batch)
    floor = -(-_MIN_ROW_VECTORS // (2 * batch))
    return max(1, min(rows_per_chunk, max(floor, by_working_set)))


def lin_weight_rows(index: Tensor, weight: Tensor, bias: Tensor | None) -> LinearBounds:
    """The unit rows of :func:`lin_unit_rows` at ``z = W x + b`` taken back to ``x`` at once:
    ``e_i`` becomes ``(W_i, b_i)`` and ``−e_i`` becomes ``(−W_i, −b_i)``. A gather of the
    weight's rows, where :func:`lin_unit_rows` and ``back_linear`` would multiply by ``W``."""
    rows = weight[index]
    coef = torch.cat([rows, -rows], 1)
    if bias is None:
        return LinearBounds(coef, coef.new_zeros(coef.shape[:2]))
    picked = bias[index]
    return LinearBounds(coef, torch.cat([picked, -picked], 1))


def lin_pass_bounds(backward_pass: Callable[..., Tensor], intervals: Interval,
                    shape: tuple[int, ...], unstable_only: bool, rows_per_chunk: int,
                    *captured: Any, row_width: int = 0) -> Interval:
    """The bounds of a node by a backward pass from its neurons, a chunk of them at a time,
    intersected with its interval bounds ``intervals``.

    ``backward_pass(index, *captured)`` is the generated pass: it maps the flat indices
    ``(batch | 1, c)`` of a chunk's neurons to the concretized rows ``(batch, 2c)`` of their
    unit rows ``[e_i; −e_i]`` (:func:`lin_unit_rows`). Its coefficients hold ``2c × numel``
    entries per example at each node it visits (fewer with patches), so ``rows_per_chunk``
    bounds the memory of any pass, whatever the node's size; with ``row_width`` (the widest
    row's entries) chunks are kept smaller still, to a working set (:func:`chunk_rows`).

    With ``unstable_only`` (the node feeds only ReLU-like ops), only the neurons whose interval
    bounds cross 0 get a pass, per example (Zhang et al. 2018 and auto_LiRPA do likewise): a
    stable neuron's relaxation is exact whatever its bounds, so its interval bounds serve. The
    neurons are ordered unstable-first per example; a chunk that runs past an example's
    unstable ones bounds some stable ones too — every bound from a pass is sound, so they are
    intersected all the same.
    """
    lower, upper = intervals.lower.flatten(1), intervals.upper.flatten(1)
    batch, size = lower.shape
    if unstable_only:
        crossing = (lower < 0) & (upper > 0)
        count = int(crossing.sum(1).max()) if batch else 0
        if count == 0:
            return intervals
        # a stable sort keeps each example's unstable neurons first, in index order
        index = torch.sort(crossing.to(torch.uint8), dim=1, descending=True, stable=True)[1]
        index = index[:, :count]
    else:
        index = torch.arange(size, device=lower.device).unsqueeze(0)  # shared by the batch
    found_lower, found_upper = [], []
    step = chunk_rows(rows_per_chunk, row_width, batch)
    for first in range(0, index.shape[1], step):
        chunk = index[:, first:first + step]
        rows = backward_pass(chunk, *captured)
        found_lower.append(rows[:, :chunk.shape[1]])
        found_upper.append(-rows[:, chunk.shape[1]:])
    index = index.expand(batch, -1)
    new_lower = torch.maximum(lower.gather(1, index), torch.cat(found_lower, 1))
    new_upper = torch.minimum(upper.gather(1, index), torch.cat(found_upper, 1))
    return Interval(lower.scatter(1, index, new_lower).reshape(intervals.lower.shape),
                    upper.scatter(1, index, new_upper).reshape(intervals.upper.shape))


for _fn in (lin_slopes, lin_input, lin_identity, lin_output_start, lin_add, lin_concretize,
            lin_split, lin_intersect, lin_output_bounds, lin_pass_bounds, lin_restrict,
            lin_lagrange, lin_unit_rows, lin_weight_rows, Var, Slopes, SlopePolicy):
    expose_to_codegen(_fn)
