"""The zonotope (DeepZ) domain: the :class:`Zonotope` element, its error-term bookkeeping, and
its rules for affine and shape ops and for the activations of the relaxation table.

A zonotope bounds a batch-first tensor ``z`` by an affine form in shared error terms
(ACE App. H.1, Eq. 8–9; Singh et al. 2018, "Fast and effective robustness certification")::

    z = c + Σ_e g_e·ε_e,   ε ∈ [−1, 1]^E,   c: (batch, *shape),   g: (batch, E, *shape)

* affine ops are exact (Eq. 10): the centre goes through the op, the generators through its
  ``linear_part`` with the error dim folded into the batch (a conv runs as the same conv on the
  generators); shape-only ops likewise — all derived from the op traits;
* elementwise activations use the parallelograms ``λx + μ ± β`` of
  :mod:`certfx.domains.relaxations` (DeepZ, Thm. 3.1–3.2; ACE App. H.2–H.4), with a new error
  term only for neurons whose ``β ≠ 0`` in some example of the batch;
* max-pool, the product of two zonotopes and the softmax entropy live in
  :mod:`certfx.domains.zonotope_rules`.

**Error blocks.** The error dim is the concatenation of *blocks* (:class:`ErrorBlock`): the
input's terms, the terms one ReLU added, …. A block is identified by the object itself, created
once by the rule that introduced its terms, so terms made on two different branches of a DAG are
never identified with each other. Combining zonotopes (``add``, ``sub``, ``concat``, ``product``)
aligns their blocks by identity and zero-pads the ones a side lacks: ``x + x`` is exactly
``2x``, and a residual block keeps the input's correlations.

**Bounded error terms.** ``ZonotopeOptions(max_error_terms=k)`` folds the smallest terms into
fresh per-neuron (box) terms whenever a rule makes more than ``k`` (:func:`consolidate`).

Example:
    >>> import torch
    >>> from certfx import ops
    >>> z = deepz_input(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 1.0]]))
    >>> z.blocks, z.n_errors                      # no term for the point entry
    ((input[1],), 1)
    >>> y = deepz_linear(z, torch.tensor([[1.0, 1.0], [1.0, -1.0]]), torch.tensor([0.0, 1.0]))
    >>> y.lower.tolist(), y.upper.tolist()
    ([[1.0, 0.0]], [[3.0, 2.0]])
    >>> d = deepz_sub(y, z)                       # shared terms cancel (a box: [-1, 3])
    >>> d.lower.tolist(), d.upper.tolist()
    ([[1.0, -1.0]], [[1.0, 1.0]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.base import Domain, Rule, register_domain
from certfx.domains.interval import Interval
from certfx.domains.relaxations import RELAXATIONS, parallel_relaxation
from certfx.ops import OpTraits

__all__ = [
    "ErrorBlock",
    "ZonotopeOptions",
    "Zonotope",
    "InputBall",
    "DEEPZ",
    "deepz_input",
    "align",
    "diagonal_terms",
    "extend",
    "consolidate",
    "relax",
]


@dataclass(frozen=True, eq=False)
class ErrorBlock:
    """A group of ``size`` consecutive error terms, equal only to itself (identity, not name)."""

    name: str
    size: int

    def __repr__(self) -> str:
        return f"{self.name}[{self.size}]"


@dataclass(frozen=True)
class ZonotopeOptions:
    """Memory options of the zonotope domain (keyword arguments of its input rule).

    Attributes:
        max_error_terms: when a rule leaves more error terms than this, the smallest are folded
            into one fresh box term per neuron (:func:`consolidate`); ``None``: no limit. A layer
            wider than the limit still gets one term per neuron.
        product_max_terms: the product of two zonotopes (ACE H.5) costs memory quadratic in the
            number of error terms; above this many it uses the interval product instead
            (ACE Eq. 28–30).
    """

    max_error_terms: int | None = None
    product_max_terms: int = 256

    def __post_init__(self) -> None:
        if self.max_error_terms is not None and self.max_error_terms < 1:
            raise ValueError(f"max_error_terms must be ≥ 1 or None, got {self.max_error_terms}")
        if self.product_max_terms < 0:
            raise ValueError(f"product_max_terms must be ≥ 0, got {self.product_max_terms}")


@dataclass(frozen=True)
class Zonotope:
    """``center + Σ_e generators[:, e]·ε_e`` with ``ε ∈ [−1, 1]^E``.

    Attributes:
        center: ``(batch, *shape)``.
        generators: ``(batch, E, *shape)``; the error dim concatenates ``blocks``.
        blocks: the error blocks, in order; their sizes sum to ``E``.
        options: carried along from the input rule.

    Iterating yields the concretization's ``lower`` then ``upper``.
    """

    center: Tensor
    generators: Tensor
    blocks: tuple[ErrorBlock, ...] = ()
    options: ZonotopeOptions = ZonotopeOptions()

    def __post_init__(self) -> None:
        sizes = sum(b.size for b in self.blocks)
        if self.generators.dim() != self.center.dim() + 1 or sizes != self.generators.shape[1]:
            raise ValueError(f"generators {tuple(self.generators.shape)} do not match centre "
                             f"{tuple(self.center.shape)} and blocks {self.blocks}")

    @property
    def n_errors(self) -> int:
        """The number of error terms ``E``."""
        return self.generators.shape[1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the bounded tensor."""
        return self.center.shape

    @cached_property
    def radius(self) -> Tensor:
        """``Σ_e |g_e|``: half the width of the concretization over the cube of error terms."""
        return self.generators.abs().sum(1)

    @cached_property
    def _extent(self) -> tuple[Tensor, Tensor]:
        """``(min, max)`` of ``Σ_e g_e ε_e`` over the error terms' set: the cube, where the
        input's terms also lie in an ℓ2 ball (:class:`InputBall`) intersected with it."""
        ball = getattr(self.options, "ball", None)
        if ball is None or ball.block not in self.blocks:
            return -self.radius, self.radius
        start = 0
        for b in self.blocks:
            if b is ball.block:
                break
            start += b.size
        g_in = self.generators.narrow(1, start, ball.block.size)
        l1 = g_in.abs().sum(1)
        rest = self.radius - l1
        view = (ball.shift.shape[0], ball.block.size, *[1] * (g_in.dim() - 2))
        # over {ε : ‖r∘(ε − shift)‖₂ ≤ ρ}: g·ε = g·shift ± ρ‖g/r‖₂ (the dual norm)
        mid = (g_in * ball.shift.view(view)).sum(1)
        spread = ball.rho.view(-1, *[1] * (g_in.dim() - 2)) * \
            (g_in * ball.inv_r.view(view)).pow(2).sum(1).clamp_min(0).sqrt()
        return (-rest + torch.maximum(-l1, mid - spread),
                rest + torch.minimum(l1, mid + spread))

    @cached_property
    def lower(self) -> Tensor:
        """Lower bound of the concretization, ``c − Σ|g|`` (tighter with an input ball)."""
        return self.center + self._extent[0]

    @cached_property
    def upper(self) -> Tensor:
        """Upper bound of the concretization, ``c + Σ|g|`` (tighter with an input ball)."""
        return self.center + self._extent[1]

    def concretize(self) -> Interval:
        """The interval hull ``[c − Σ|g|, c + Σ|g|]`` (exact per entry)."""
        return Interval(self.lower, self.upper)

    def __iter__(self) -> Iterator[Tensor]:
        yield self.lower
        yield self.upper

    def point(self, eps: Tensor) -> Tensor:
        """The concrete point ``c + Σ_e g_e ε_e`` for error values ``eps`` of shape
        ``(batch, E)`` (or ``(E,)``) in ``[−1, 1]``."""
        eps = eps.expand(self.center.shape[0], self.n_errors).to(self.generators)
        flat = torch.einsum("be,bek->bk", eps, self.generators.flatten(2))
        return self.center + flat.view_as(self.center)

    def contains(self, z: Tensor, tol: float = 0.0) -> Tensor:
        """Whether every entry of ``z`` lies in the concretization (up to ``tol``)."""
        return self.concretize().contains(z, tol)


# ---- error-term bookkeeping -----------------------------------------------------------------

def align(*zs: Zonotope) -> tuple[tuple[ErrorBlock, ...], list[Tensor]]:
    """The union of the zonotopes' blocks (first-seen order) and each one's generators laid
    out over it, a missing block as zeros: the same ``ε`` index means the same error term."""
    blocks: list[ErrorBlock] = []
    for z in zs:
        blocks.extend(b for b in z.blocks if b not in blocks)
    if all(z.blocks == tuple(blocks) for z in zs):
        return tuple(blocks), [z.generators for z in zs]
    out = []
    for z in zs:
        start, where = 0, {}
        for b in z.blocks:
            where[b], start = start, start + b.size
        g = z.generators
        pieces = [g.narrow(1, where[b], b.size) if b in where
                  else g.new_zeros(g.shape[0], b.size, *g.shape[2:]) for b in blocks]
        out.append(torch.cat(pieces, 1) if pieces else g)
    return tuple(blocks), out


def diagonal_terms(radius: Tensor) -> Tensor:
    """Generators ``(batch, K, *shape)``: one term per entry whose radius is non-zero (or NaN)
    in some example of the batch, carrying that entry's radius (zero in the other examples)."""
    b = radius.shape[0]
    flat = radius.reshape(b, -1)
    idx = (flat != 0).any(0).nonzero().squeeze(1)
    k = idx.shape[0]
    gens = flat.new_zeros(b, k, flat.shape[1]).scatter(
        2, idx.view(1, k, 1).expand(b, k, 1), flat[:, idx].unsqueeze(2))
    return gens.view(b, k, *radius.shape[1:])


def extend(center: Tensor, generators: Tensor, blocks: tuple[ErrorBlock, ...],
           new_radius: Tensor | None, name: str, options: ZonotopeOptions) -> Zonotope:
    """A zonotope with fresh box terms of ``new_radius`` appended as a new block ``name``,
    consolidated to ``options.max_error_terms``."""
    if new_radius is not None:
        new = diagonal_terms(new_radius.expand_as(center))
        if new.shape[1]:
            generators = torch.cat([generators.expand(-1, -1, *center.shape[1:]), new], 1)
            blocks = (*blocks, ErrorBlock(name, new.shape[1]))
    return consolidate(Zonotope(center, generators, blocks, options), options.max_error_terms)


def consolidate(z: Zonotope, max_terms: int | None) -> Zonotope:
    """Fold the smallest error terms into fresh box terms so that at most ``max_terms`` remain
    (when the layer has fewer neurons than that).

    With ``N`` neurons per example, the ``k = E − max_terms + N`` terms of least total
    magnitude ``Σ_{batch, neurons} |g_e|`` are replaced by one fresh term per neuron with radius
    ``Σ_removed |g_e|`` (their box hull: sound). A block losing only some of its terms continues
    under a fresh :class:`ErrorBlock`: treating the kept terms as new, independent errors is an
    over-approximation for any other zonotope that still holds the full block.

    Example:
        >>> z = deepz_input(torch.zeros(1, 2), torch.tensor([[1.0, 4.0]]))
        >>> zz = deepz_linear(z, torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 1.0]]))
        >>> c = consolidate(zz, 4)
        >>> c.n_errors <= 4 and bool((c.lower <= zz.lower).all())
        True
    """
    e = z.n_errors
    if max_terms is None or e <= max_terms:
        return z
    neurons = math.prod(z.center.shape[1:])
    k = min(e, e - max_terms + neurons)
    g = z.generators
    score = g.detach().abs().sum(dim=(0, *range(2, g.dim())))
    keep = torch.ones(e, dtype=torch.bool, device=g.device)
    keep[torch.topk(score, k, largest=False).indices] = False
    counts = [int(c) for c in torch.stack([m.sum() for m in keep.split(
        [b.size for b in z.blocks])]).tolist()]
    blocks = tuple(b if n == b.size else ErrorBlock(f"{b.name}'", n)
                   for b, n in zip(z.blocks, counts) if n)
    removed = (g.abs() * (~keep).to(g.dtype).view(1, e, *([1] * (g.dim() - 2)))).sum(1)
    kept = g.index_select(1, keep.nonzero().squeeze(1))
    new = diagonal_terms(removed)
    if new.shape[1]:
        kept, blocks = torch.cat([kept, new], 1), (*blocks, ErrorBlock("consolidated",
                                                                        new.shape[1]))
    return Zonotope(z.center, kept, blocks, z.options)


def relax(op: Callable[..., Any], x: Zonotope, bounds: Interval | None = None,
          *op_args: Any) -> Zonotope:
    """Apply the parallel relaxation of an elementwise ``op`` (ACE Eq. 11): ``y = λx + μ + β·ε'``
    with ``λ, μ, β`` computed on ``bounds`` — the concretization of ``x`` unless tighter bounds
    on its concrete values are known (any valid bounds give a sound result)."""
    bounds = x.concretize() if bounds is None else bounds
    r = parallel_relaxation(op, bounds.lower, bounds.upper, *op_args)
    return extend(r.slope * x.center + r.offset, r.slope.unsqueeze(1) * x.generators, x.blocks,
                  r.radius, op.__name__, x.options)


# ---- input and derived rules ----------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class InputBall:
    """The input's error terms also lie in an ℓ2 ball: with the input ``x = c + r∘ε`` (term
    ``k`` moving entry ``k`` by ``r_k``) and the ball ``‖x − x₀‖₂ ≤ ρ``, the terms satisfy
    ``‖r∘(ε − shift)‖₂ ≤ ρ`` with ``shift = (x₀ − c)/r``. Entries without a term (``r = 0``)
    are dropped from the ball, which only enlarges it (sound).

    Attributes:
        block: the input's error block (the ball applies while a zonotope holds it whole).
        shift, inv_r: ``(batch, K)``; ``1/r`` is 0 where an example has no extent.
        rho: ``(batch,)``.
    """

    block: ErrorBlock
    shift: Tensor
    inv_r: Tensor
    rho: Tensor


@dataclass(frozen=True)
class _OptionsWithBall(ZonotopeOptions):
    """The domain options carried by a zonotope whose input terms also lie in a ball."""

    ball: InputBall | None = None


def deepz_input(lower: Tensor, upper: Tensor, max_error_terms: int | None = None,
                product_max_terms: int = 256,
                ball: tuple[Tensor, Tensor] | None = None) -> Zonotope:
    """The input box as a zonotope: centre ``(l + u)/2`` and one error term per entry with a
    non-zero radius (diagonal generators); with ``ball = (x₀, ρ)`` (an ``L2Ball`` input spec)
    the terms also lie in that ℓ2 ball (:class:`InputBall`), which every concretization uses
    (``min g·ε = max(−‖g‖₁, g·shift − ρ‖g/r‖₂)``, thesis Sec. 3.2's dual norm)."""
    center = torch.lerp(lower, upper, 0.5)
    radius = upper - center
    gens = diagonal_terms(radius)
    block = ErrorBlock("input", gens.shape[1])
    if ball is None:
        return Zonotope(center, gens, (block,), ZonotopeOptions(max_error_terms,
                                                                product_max_terms))
    x0, rho = ball
    flat = radius.reshape(radius.shape[0], -1)
    idx = (flat != 0).any(0).nonzero().squeeze(1)  # the entries with a term, as diagonal_terms
    r = flat[:, idx]
    inv_r = torch.where(r > 0, 1 / torch.where(r > 0, r, 1.0), 0.0)
    shift = (x0 - center).reshape(radius.shape[0], -1)[:, idx] * inv_r
    rho = torch.as_tensor(rho).to(lower).reshape(-1).expand(lower.shape[0])
    options = _OptionsWithBall(max_error_terms, product_max_terms,
                               InputBall(block, shift, inv_r, rho))
    return Zonotope(center, gens, (block,), options)


def _derive_affine(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """ACE Eq. 10: the centre through ``op``, the generators through its linear part (error dim
    folded into the batch; a constant operand contributes 0)."""
    if not op_traits.affine or op_traits.linear_part is None:
        return None
    linear = op_traits.linear_part
    perturbable = set(op_traits.perturbed_args)

    def rule(*args: Any) -> Zonotope:
        zs = [a for a in args if isinstance(a, Zonotope)]
        blocks, gens = align(*zs)
        center = op(*[a.center if isinstance(a, Zonotope) else a for a in args])
        b, e = gens[0].shape[:2]
        if e == 0:
            return Zonotope(center, center.new_zeros(b, 0, *center.shape[1:]), blocks,
                            zs[0].options)
        folded = iter(g.reshape(b * e, *g.shape[2:]) for g in gens)
        out = linear(*[next(folded) if isinstance(a, Zonotope) else
                       (0.0 if k in perturbable else a) for k, a in enumerate(args)])
        out = out.reshape(b, e, *out.shape[1:]).expand(b, e, *center.shape[1:])
        return Zonotope(center, out, blocks, zs[0].options)

    return rule


def _derive_relaxation(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """Elementwise activations with an entry in the relaxation table."""
    if op not in RELAXATIONS:
        return None

    def rule(x: Zonotope, *op_args: Any) -> Zonotope:
        return relax(op, x, None, *op_args)

    return rule


DEEPZ = register_domain(Domain(
    name="deepz",
    aliases=("zonotope",),
    element=Zonotope,
    input_rule=deepz_input,
    module=__name__,
    prefix="deepz",
    derivers=[_derive_affine, _derive_relaxation],
    options=ZonotopeOptions,
    ball_input=True,
))


@DEEPZ.rule(ops.spec_linear)
def deepz_spec_linear(x: Zonotope, weight: Tensor, bias: Tensor | None,
                      spec: Tensor | None) -> Zonotope:
    """The last layer with the C-matrix folded in, exact: the fused weight ``C W``
    ``(batch, m, in)`` maps the centre and every generator of its own example."""
    if spec is None:
        return deepz_linear(x, weight, bias)  # noqa: F821 - derived below, called at run time
    fused = torch.matmul(spec, weight)
    center = torch.einsum("bmi,bi->bm", fused, x.center)
    if bias is not None:
        center = center + torch.matmul(spec, bias)
    gens = torch.einsum("bmi,bei->bem", fused, x.generators)
    return Zonotope(center, gens, x.blocks, x.options)


@DEEPZ.rule(ops.apply_spec)
def deepz_apply_spec(x: Zonotope, spec: Tensor | None) -> Zonotope:
    """``C x`` per example, exact."""
    if spec is None:
        return x
    center = torch.einsum("bmk,bk->bm", spec, x.center.flatten(1))
    gens = torch.einsum("bmk,bek->bem", spec, x.generators.flatten(2))
    return Zonotope(center, gens, x.blocks, x.options)


@DEEPZ.rule(ops.concat)
def deepz_concat(xs: Sequence[Zonotope | Tensor], dim: int) -> Zonotope:
    """Concatenation with aligned error blocks; a constant piece has zero generators."""
    zs = [a for a in xs if isinstance(a, Zonotope)]
    blocks, gens = align(*zs)
    b, e = gens[0].shape[:2]
    it = iter(gens)
    pieces = [next(it) if isinstance(a, Zonotope) else a.new_zeros(b, e, *a.shape[1:])
              for a in xs]
    center = torch.cat([a.center if isinstance(a, Zonotope) else a for a in xs], dim)
    return Zonotope(center, torch.cat(pieces, dim + 1), blocks, zs[0].options)


def _load_nonlinear_rules() -> None:
    """Register max-pool, product and softmax-entropy rules (their own module)."""
    import certfx.domains.zonotope_rules  # noqa: F401


_load_nonlinear_rules()
DEEPZ.derive_missing()
