"""Activation branch and bound: split unstable neurons until the bounds prove every branch.

Where the input has too many values to bisect (an MNIST image), the looseness of back-
substitution bounds comes from the relaxation of the neurons whose input bounds cross the kink
(Bunel et al. 2020, "Branch and bound for piecewise linear neural network verification"). This
stage follows α,β-CROWN (Wang et al. 2021, "Beta-CROWN"):

1. **The root.** On the whole box, α-CROWN with every backward pass's slopes optimized for the
   output's bound (``optimize_intermediate``) gives the intermediate bounds — the bounds of
   every relaxed op's input — far tighter on deep networks than CROWN's, and the open rows'
   bounds. Each step's intermediate bounds are sound, so their intersection over the steps is
   kept.
2. **A branch** is a set of split constraints ``z_i ≤ m`` or ``z_i ≥ m`` on the relaxed ops'
   inputs, with the terms of the unsafe region still open in it. Its intermediate bounds are
   its parent's, intersected with the new constraint (``recompute``: every later bound
   computed again from the restricted ones, tighter and a backward pass per layer dearer);
   the constraints also enter the output's backward pass by Lagrange multipliers
   (:func:`~certfx.domains.linear.lin_lagrange`, β-CROWN's β), optimized with the slopes by
   Adam, starting from its parent's slopes and multipliers (the new constraint's at 0). A
   branch whose bounds cross (``lower > upper + tolerance`` for some neuron) holds no
   input: closed. A branch's bound is at least its parent's (the parent's holds on the smaller
   set), so the non-monotonicity of the optimization never loses ground.
3. **Branching** picks, per open branch, the neuron with the largest first-order estimate of
   what fixing it gains, ``|∂B/∂u_i|·|u_i| + |∂B/∂l_i|·|l_i|`` (``B``: the sum of the open
   rows' CROWN bounds as a function of the intermediate bounds, by autograd — the role of
   BaBSR's score in Bunel et al. 2020, Sec. 5.1, read off the gradient instead of derived per
   op), and splits it at 0 when only ReLU-like ops read it (each side's relaxation is then
   exact), else at 0 when its bounds cross 0 (a sigmoid or tanh is convex on one side,
   concave on the other) and at the midpoint otherwise.
4. A branch with nothing left to split is a linear program that only the multipliers'
   optimization stands between; it gets :data:`LEAF_STEPS` more steps, and if still open the
   stage gives up (``unknown``) — this stage proves, it never falsifies (the attacks do).

The two children ``z_i ≤ m`` and ``z_i ≥ m`` cover their parent, and every bound is sound on
its branch whatever the slopes and multipliers, so the property is verified only when every
branch is closed — sound whatever the heuristics.

Example:
    A small random network whose minimum over ``[−1, 1]²`` is about −0.30 (by sampling):
    α-CROWN's bound alone stays below −0.34, a few branches prove ``y > −0.34``.

    >>> import time, torch, certfx
    >>> from certfx.specs import Conjunction, UnsafeRegion
    >>> _ = torch.manual_seed(3)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
    ...                           torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> lo, hi = -torch.ones(1, 2), torch.ones(1, 2)
    >>> cm = certfx.compile(net, domain="alpha-crown", example_input=lo,
    ...                     input_spec=certfx.LinfBall(1.0, lower=None, upper=None))
    >>> with torch.no_grad():
    ...     cm.bounds(lo, hi, torch.ones(1, 1, 1), bound_upper=False).lower.item() < -0.34
    True
    >>> unsafe = UnsafeRegion((Conjunction(torch.tensor([[1.0]]), torch.tensor([-0.34])),))
    >>> out = relu_split_verify(AlphaCrownBranches(cm.bounds), lo, hi, unsafe, [0],
    ...                         tolerance=1e-6, deadline=time.perf_counter() + 10)
    >>> out.status, out.branches > 1
    ('verified', True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from certfx.domains.crown import alpha_crown_optimize
from certfx.domains.interval import Interval
from certfx.domains.linear import Slopes
from certfx.domains.linear_lowering import ALPHA_KEY, SPLIT_KEY
from certfx.specs import UnsafeRegion
from certfx.verify.split import term_rows

__all__ = ["ReluSplitOutcome", "AlphaCrownBranches", "relu_split_verify", "splittable"]

LEAF_STEPS = 100  # optimization steps for a branch with no neuron left to split
MIN_SMOOTH_WIDTH = 1e-4  # a smooth activation's input narrower than this is not split again
QUEUE_ENTRIES = 1 << 28  # values the queue of branches may hold (1 GiB in float32)


@dataclass(frozen=True)
class ReluSplitOutcome:
    """``status`` in ``verified``, ``timeout`` or ``unknown`` (a branch with no neuron left to
    split, or the branch limit); ``branches``: branches bounded."""

    status: str
    branches: int


def splittable(bounds: fx.GraphModule) -> bool:
    """Whether a compiled α-CROWN bound module can bound branches (it has a relaxed op whose
    input it restricts)."""
    entries = bounds.meta.get(SPLIT_KEY) or []
    return hasattr(bounds, "intermediate") and any(e is not None for e in entries)


class AlphaCrownBranches:
    """The bounds of branches from a compiled ``alpha-crown`` module's parts.

    Args:
        bounds: ``certfx.compile(..., domain="alpha-crown").bounds`` (not
            ``optimize_intermediate``): its ``intermediate`` module takes ``splits``, its
            ``passes`` module the restricted bounds.
        steps, lr: α-CROWN's Adam steps per batch of branches, and its rate.
        lagrange_lr: the rate of the split constraints' multipliers (β-CROWN's β), optimized
            jointly with the slopes; 0: the constraints act through the restricted
            intermediate bounds alone.
        root: optionally, the bound module of ``alpha-crown`` with ``optimize_intermediate``:
            the whole box's intermediate bounds then come from every pass's slopes optimized
            (``root_steps`` steps) for the output's bound, far tighter on deep networks than
            CROWN's (the start of α,β-CROWN's branch and bound, Wang et al. 2021, Sec. 3.3).
        root_lr: the root's Adam rate. Every pass's slopes move together there, and a rate
            of 0.5 overshoots on deep networks: on VNN-COMP 2021 eran's sigmoid 6x200 idx 1211
            the worst row's bound was −1.9 at 0.5 and +1.3 at 0.2 (20 steps; relu 9x200
            changed by under 3% between 0.1 and 0.5).
    """

    def __init__(self, bounds: fx.GraphModule, steps: int = 8, lr: float = 0.5,
                 lagrange_lr: float = 0.1, root: fx.GraphModule | None = None,
                 root_steps: int = 50, root_lr: float = 0.1):
        if not splittable(bounds):
            raise ValueError("need an alpha-crown bound module with intermediate bounds to "
                             "restrict (domain 'alpha-crown', optimize_intermediate=False)")
        self.intermediate, self.passes = bounds.intermediate, bounds.passes
        self.entries: list[tuple[str, bool] | None] = list(bounds.meta[SPLIT_KEY])
        self.alphas = tuple(self.passes.meta[ALPHA_KEY])
        self.steps, self.lr, self.lagrange_lr = steps, lr, lagrange_lr
        self.root_passes = None if root is None else root.passes
        self.root_alphas = () if root is None else tuple(root.passes.meta[ALPHA_KEY])
        self.root_steps, self.root_lr = root_steps, root_lr

    def whole(self, lower: Tensor, upper: Tensor, spec: Tensor
              ) -> tuple[Tensor, tuple[Interval, ...], list[Tensor]]:
        """On the whole box (no split): the rows' lower bounds, the intermediate bounds, and
        the output pass's slopes at the rows' best bounds (the branches' first start)."""
        unrestricted = (None,) * len(self.entries)
        if self.root_passes is None:
            fixed = self.restricted(lower, upper, spec, unrestricted)
            rows, chosen = self.rows(lower, upper, spec, fixed, unrestricted)
            return rows, fixed, chosen
        tightest: list[Interval] = []
        out = alpha_crown_optimize(None, self.root_passes, lower, upper, spec, slopes=None,
                                   default_slopes=Slopes(), bound_upper=False,
                                   alphas=self.root_alphas, steps=self.root_steps,
                                   lr=self.root_lr,
                                   intermediate_out=tightest)
        fixed = tuple(tightest)
        # the output pass alone, on those bounds: its slopes start the branches
        rows, chosen = self.rows(lower, upper, spec, fixed, unrestricted, steps=self.root_steps)
        return torch.maximum(out.lower, rows), fixed, chosen

    def restricted(self, lower: Tensor, upper: Tensor, spec: Tensor,
                   splits: tuple[Any, ...]) -> tuple[Interval, ...]:
        """The intermediate bounds of each branch (batch of ``lower``/``upper``/``spec``)."""
        return tuple(self.intermediate(lower, upper, spec, splits=splits))

    def rows(self, lower: Tensor, upper: Tensor, spec: Tensor, fixed: tuple[Interval, ...],
             splits: tuple[Any, ...], steps: int | None = None,
             start: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """The lower bounds ``(n, R)`` of the rows ``spec @ y`` given those bounds and the
        branches' restrictions (``steps``: other than the default), and the slopes and
        multipliers at each row's best bound (``start``: where the optimization begins,
        e.g. the parents' — β-CROWN's warm start)."""
        chosen: list[Tensor] = []
        out = alpha_crown_optimize(lambda *args, **kwargs: fixed, self.passes, lower, upper,
                                   spec, slopes=None, default_slopes=Slopes(),
                                   bound_upper=False, alphas=self.alphas,
                                   steps=self.steps if steps is None else steps,
                                   lr=self.lr, splits=splits, lagrange_lr=self.lagrange_lr,
                                   start=start, weights_out=chosen)
        return out.lower, chosen

    def sensitivity(self, lower: Tensor, upper: Tensor, spec: Tensor,
                    fixed: tuple[Interval, ...], weight: Tensor
                    ) -> list[tuple[Tensor, Tensor]]:
        """``(∂B/∂l, ∂B/∂u)`` per entry, ``B`` the ``weight``-weighted sum of the rows' CROWN
        lower bounds (``weight`` ``(n, R)``: 1 on each branch's open rows)."""
        leaves = [Interval(b.lower.detach().requires_grad_(True),
                           b.upper.detach().requires_grad_(True)) for b in fixed]
        with torch.enable_grad():
            out, _ = self.passes(lower, upper, *leaves, spec, bound_upper=False)
            total = (torch.nan_to_num(out.lower, nan=0.0, posinf=0.0, neginf=0.0)
                     * weight).sum()
            flat = [t for b in leaves for t in (b.lower, b.upper)]
            grads = torch.autograd.grad(total, flat, allow_unused=True)
        pairs = []
        for k, b in enumerate(leaves):
            gl, gu = grads[2 * k], grads[2 * k + 1]
            pairs.append((torch.zeros_like(b.lower) if gl is None else gl,
                          torch.zeros_like(b.upper) if gu is None else gu))
        return pairs


def _scores(entries: list[tuple[str, bool] | None], fixed: tuple[Interval, ...],
            grads: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per branch, the score of every neuron of every entry, flattened and concatenated
    ``(n, N)`` (``−inf``: not a candidate), and the value each would be split at."""
    scores, points = [], []
    for entry, bounds, (gl, gu) in zip(entries, fixed, grads):
        lo, hi = bounds.lower.flatten(1), bounds.upper.flatten(1)
        if entry is None:
            scores.append(torch.full_like(lo, -torch.inf))
            points.append(torch.zeros_like(lo))
            continue
        _, kinked = entry
        crossing = (lo < 0) & (hi > 0)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        candidate = finite & (crossing if kinked else hi - lo > MIN_SMOOTH_WIDTH)
        gain = gl.flatten(1).abs() * lo.abs() + gu.flatten(1).abs() * hi.abs()
        # a tiny share of the width breaks ties among neurons the gradient does not see
        gain = gain + 1e-6 * (hi - lo).clamp(min=0).nan_to_num(0.0)
        scores.append(torch.where(candidate, gain.nan_to_num(0.0), -torch.inf))
        at_zero = torch.ones_like(crossing) if kinked else crossing
        points.append(torch.where(at_zero, torch.zeros_like(lo), (lo + hi) / 2))
    return torch.cat(scores, 1), torch.cat(points, 1)


def _per_entry(lo: Tensor, hi: Tensor, sizes: list[int], shapes: list[tuple[int, ...]]
               ) -> list[tuple[Tensor, Tensor]]:
    """Per entry, ``(lower, upper)`` of shape ``(n, *shape)`` from values flattened and
    concatenated over the entries (``(n, N)``)."""
    n = lo.shape[0]
    return [(a.reshape(n, *shape), b.reshape(n, *shape))
            for a, b, shape in zip(lo.split(sizes, 1), hi.split(sizes, 1), shapes)]


def _splits(entries: list[tuple[str, bool] | None], r_lo: Tensor, r_hi: Tensor,
            sizes: list[int], shapes: list[tuple[int, ...]]) -> tuple[Any, ...]:
    """The ``splits`` argument of the bound modules for branches' flattened restrictions."""
    return tuple(None if entry is None else pair
                 for entry, pair in zip(entries, _per_entry(r_lo, r_hi, sizes, shapes)))


def _unflattened(values: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Tensors ``(n, *shape)`` from values flattened and concatenated ``(n, W)``."""
    sizes = [math.prod(shape) for shape in shapes]
    return [v.reshape(values.shape[0], *shape) for v, shape in zip(values.split(sizes, 1),
                                                                   shapes)]


def _tightened(values: Tensor, index: Tensor, at: Tensor, take: Any) -> Tensor:
    """``values`` with the entry ``index`` of each row replaced by ``take(entry, at)``."""
    return values.scatter(1, index, take(values.gather(1, index), at))


@dataclass
class _Branches:
    """A batch of branches, every tensor ``(n, ·)``: the restrictions ``r_lo``/``r_hi`` and
    the intermediate bounds ``b_lo``/``b_hi`` (flattened and concatenated over the entries,
    ``N`` neurons), the terms still open, the rows' best lower bounds so far, and the slopes
    and multipliers that gave them (flattened, ``W`` values; a child starts from them)."""

    r_lo: Tensor
    r_hi: Tensor
    b_lo: Tensor
    b_hi: Tensor
    still: Tensor
    rows: Tensor
    weights: Tensor

    def __len__(self) -> int:
        return self.r_lo.shape[0]

    def pick(self, index: Tensor | slice) -> _Branches:
        return _Branches(*(t[index] for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.r_lo, self.r_hi, self.b_lo, self.b_hi, self.still, self.rows,
                self.weights)

    def then(self, other: _Branches) -> _Branches:
        return _Branches(*(torch.cat([a, b]) for a, b in zip(self.tensors(),
                                                            other.tensors())))


def _children(parents: _Branches, index: Tensor, at: Tensor) -> _Branches:
    """Both children of each parent split at neuron ``index`` (``(n, 1)``) at value ``at``: the
    left ones ``z_i ≤ at`` first, then the right ones ``z_i ≥ at`` (restriction and bounds
    alike); they start from their parent's slopes and multipliers."""
    left, right = parents.pick(slice(None)), parents.pick(slice(None))
    left.r_hi = _tightened(left.r_hi, index, at, torch.minimum)
    left.b_hi = _tightened(left.b_hi, index, at, torch.minimum)
    right.r_lo = _tightened(right.r_lo, index, at, torch.maximum)
    right.b_lo = _tightened(right.b_lo, index, at, torch.maximum)
    return left.then(right)


class _Stack:
    """The open branches, last in first out (depth first: the queue stays short), kept as the
    batches they were made in, so taking and adding branches never copies the whole queue."""

    def __init__(self, first: _Branches):
        self.chunks, self.count = [first], len(first)

    def __len__(self) -> int:
        return self.count

    def push(self, branches: _Branches) -> None:
        if len(branches):
            self.chunks.append(branches)
            self.count += len(branches)

    def pop(self, most: int) -> _Branches:
        """Up to ``most`` branches, the newest first."""
        taken: list[_Branches] = []
        need = min(most, self.count)
        while need:
            chunk = self.chunks.pop()
            if len(chunk) > need:
                self.chunks.append(chunk.pick(slice(need, None)))
                chunk = chunk.pick(slice(0, need))
            taken.append(chunk)
            need -= len(chunk)
        out = taken[0]
        for chunk in taken[1:]:
            out = out.then(chunk)
        self.count -= len(out)
        return out


def relu_split_verify(branches: AlphaCrownBranches, lower: Tensor, upper: Tensor,
                      region: UnsafeRegion, terms: list[int], tolerance: float,
                      deadline: float, batch: int = 64, recompute: bool = False,
                      max_branches: int | None = None) -> ReluSplitOutcome:
    """Branch and bound over the relaxed neurons (see the module docstring).

    Args:
        branches: bounds of branches (:class:`AlphaCrownBranches`).
        lower, upper: the input box ``(1, *input_shape)``.
        region, terms: the unsafe region and the indices of its terms still open.
        tolerance: a row is proven when its bound exceeds ``offset + tolerance``; a branch is
            empty when a neuron's restricted lower bound exceeds its upper one by more.
        deadline: ``time.perf_counter()`` value at which to stop with ``timeout``.
        batch: branches bounded at once.
        recompute: recompute every intermediate bound of every branch from its restrictions
            (tighter: a split tightens all later layers; a backward pass per layer and
            branch). Without, a branch keeps its parent's intermediate bounds, intersected
            with the new restriction, and the split constraints act through the multipliers
            of the output's pass alone (β-CROWN's choice: one pass per branch).
        max_branches: branches in the queue beyond which the stage gives up (``unknown``);
            by default as many as :data:`QUEUE_ENTRIES` values hold (each branch keeps four
            per neuron: its restrictions and its bounds).
    """
    matrix, offset, owner = term_rows(region, terms, lower.dtype, lower.device)
    n_terms = len(terms)
    entries = branches.entries
    with torch.no_grad():  # the root's intermediate bounds, unrestricted
        root_rows, root, root_weights = branches.whole(lower, upper, matrix.unsqueeze(0))
    sizes = [b.lower[0].numel() for b in root]
    shapes = [tuple(b.lower.shape[1:]) for b in root]
    flat_lo = torch.cat([b.lower.flatten(1) for b in root], 1)
    # the optimization's variables per branch: the output pass's slopes, then (β) a pair of
    # multipliers per output row for every restricted entry, zero at the root
    layout = [tuple(w.shape[1:]) for w in root_weights]
    if branches.lagrange_lr > 0:
        layout += [(matrix.shape[0], *shape) for entry, shape in zip(entries, shapes)
                   if entry is not None for _ in range(2)]
    warm = len(root_weights) == len(branches.alphas)  # else: every branch starts afresh
    width = sum(math.prod(shape) for shape in layout) if warm else 0
    flat_weights = flat_lo.new_zeros(1, width)  # the multipliers' part stays 0
    if warm and root_weights:
        given = torch.cat([w.flatten(1) for w in root_weights], 1)
        flat_weights[:, :given.shape[1]] = given
    if max_branches is None:
        max_branches = max(batch, QUEUE_ENTRIES // (4 * flat_lo.shape[1] + width))
    queue = _Stack(_Branches(torch.full_like(flat_lo, -torch.inf),
                             torch.full_like(flat_lo, torch.inf), flat_lo,
                             torch.cat([b.upper.flatten(1) for b in root], 1),
                             torch.ones(1, n_terms, dtype=torch.bool, device=lower.device),
                             root_rows, flat_weights))
    bounded = 0

    def proven_terms(rows: Tensor) -> Tensor:
        proven_rows = (rows - offset) > tolerance  # NaN compares False: not proven
        return torch.stack([proven_rows[:, owner == k].any(1) for k in range(n_terms)], 1)

    def unflatten(lo: Tensor, hi: Tensor) -> tuple[Interval, ...]:
        return tuple(Interval(a, b) for a, b in _per_entry(lo, hi, sizes, shapes))

    while len(queue):
        if time.perf_counter() > deadline:
            return ReluSplitOutcome("timeout", bounded)
        if len(queue) > max_branches:
            return ReluSplitOutcome("unknown", bounded)
        now = queue.pop(batch)
        n = len(now)
        bounded += n
        x_lo, x_hi = lower.expand(n, *lower.shape[1:]), upper.expand(n, *upper.shape[1:])
        spec = matrix.expand(n, -1, -1)
        splits = _splits(entries, now.r_lo, now.r_hi, sizes, shapes)
        with torch.no_grad():
            if recompute:  # both are sound on the branch: keep the tighter of each
                fresh = branches.restricted(x_lo, x_hi, spec, splits)
                now.b_lo = torch.maximum(now.b_lo, torch.cat([b.lower.flatten(1)
                                                              for b in fresh], 1))
                now.b_hi = torch.minimum(now.b_hi, torch.cat([b.upper.flatten(1)
                                                              for b in fresh], 1))
            empty = ((now.b_lo - now.b_hi) > tolerance).any(1)
            fixed = unflatten(now.b_lo, now.b_hi)
            rows, chosen = branches.rows(x_lo, x_hi, spec, fixed, splits,
                                         start=_unflattened(now.weights, layout) if warm
                                         else None)
            now.rows = torch.maximum(rows, now.rows)
            if warm and chosen:
                now.weights = torch.cat([w.flatten(1) for w in chosen], 1)
        now.still = now.still & ~proven_terms(now.rows)
        keep = now.still.any(1) & ~empty
        if not bool(keep.any()):
            continue
        now = now.pick(keep)
        x_lo, x_hi, spec = x_lo[keep], x_hi[keep], spec[keep]
        fixed = unflatten(now.b_lo, now.b_hi)
        weight = now.still[:, owner].to(lower.dtype)
        grads = branches.sensitivity(x_lo, x_hi, spec, fixed, weight)
        scores, points = _scores(entries, fixed, grads)
        leaf = torch.isinf(scores.max(1).values)
        if bool(leaf.any()):
            # nothing left to split: every ReLU's relaxation is exact there (smooth ones are
            # narrow), what is left is the multipliers' optimization, so it gets LEAF_STEPS
            # steps before the stage gives up
            leaves = now.pick(leaf)
            with torch.no_grad():
                again, _ = branches.rows(x_lo[leaf], x_hi[leaf], spec[leaf],
                                         unflatten(leaves.b_lo, leaves.b_hi),
                                         _splits(entries, leaves.r_lo, leaves.r_hi, sizes,
                                                 shapes), steps=LEAF_STEPS,
                                         start=_unflattened(leaves.weights, layout) if warm
                                         else None)
            if bool((leaves.still & ~proven_terms(again)).any()):
                return ReluSplitOutcome("unknown", bounded)
            now, scores, points = now.pick(~leaf), scores[~leaf], points[~leaf]
        if not len(now):
            continue
        best = scores.argmax(1, keepdim=True)
        queue.push(_children(now, best, points.gather(1, best)))
    return ReluSplitOutcome("verified", bounded)
