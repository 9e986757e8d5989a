"""Input sets (where the input may be) and output specifications (what must hold of the output).

An input spec turns a batch of points ``x`` into elementwise bounds ``(lower, upper)``, clipped
to the valid input range; an output spec turns labels into a C-matrix whose rows are the linear
functions of the logits to bound from below.

Example:
    >>> import torch
    >>> lo, hi = LinfBall(eps=0.25, lower=0.0, upper=1.0).bounds(torch.tensor([[0.125, 0.5]]))
    >>> lo.tolist(), hi.tolist()
    ([[0.0, 0.25]], [[0.375, 0.75]])
    >>> Margin().matrix(torch.tensor([1]), num_classes=3).tolist()
    [[[-1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from certfx.errors import InvalidValueError, ShapeError, SpecError

__all__ = ["InputSpec", "LinfBall", "L2Ball", "LpBall", "Box", "Margin", "Conjunction",
           "UnsafeRegion", "Property", "check_finite", "circumscribing_l2_radius"]


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`InvalidValueError` when ``t`` holds NaN or ±inf."""
    if not torch.is_floating_point(t):
        return
    # One reduction on the fast path: a sum is finite unless an entry is NaN/inf (or the sum
    # overflows, which the exact check below then rules out).
    if math.isfinite(float(t.detach().sum())) or bool(torch.isfinite(t).all()):
        return
    bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
    raise InvalidValueError(f"{what} contains {bad}; replace it with finite values")


class InputSpec:
    """Base class: a set of inputs around each point of a batch."""

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """Elementwise ``(lower, upper)`` bounds of the set around ``x``."""
        raise NotImplementedError


def _as_range(value: float | Tensor | None, x: Tensor) -> float | Tensor | None:
    """A clip bound usable by ``Tensor.clamp`` together with ``x``."""
    if isinstance(value, Tensor):
        return value.to(x).expand_as(x)
    return None if value is None else float(value)


@dataclass(frozen=True)
class LinfBall(InputSpec):
    """The ℓ∞ ball ``{x' : ‖x' − x‖∞ ≤ eps}`` intersected with ``[lower, upper]``.

    Args:
        eps: radius; a float, or a tensor broadcastable to the batch (per example ``(B, 1, …)``
            or per feature).
        lower: smallest valid input value (float or broadcastable tensor); ``None`` for no clip.
        upper: largest valid input value; ``None`` for no clip.
    """

    eps: float | Tensor
    lower: float | Tensor | None = 0.0
    upper: float | Tensor | None = 1.0

    def __post_init__(self) -> None:
        eps = torch.as_tensor(self.eps, dtype=torch.float64)
        if bool(torch.isnan(eps).any()):
            raise InvalidValueError("eps is NaN; pass a finite radius >= 0")
        if bool((eps < 0).any()):
            raise InvalidValueError(f"eps must be >= 0, got {float(eps.min())}; pass a radius >= 0")
        if self.lower is not None and self.upper is not None:
            lo = torch.as_tensor(self.lower, dtype=torch.float64)
            hi = torch.as_tensor(self.upper, dtype=torch.float64)
            if bool((lo > hi).any()):
                raise InvalidValueError("LinfBall lower > upper; the valid range is empty")

    def with_eps(self, eps: float | Tensor) -> LinfBall:
        """The same ball with another radius."""
        return LinfBall(eps, self.lower, self.upper)

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_finite(x, "input x")
        eps = self.eps.to(x) if isinstance(self.eps, Tensor) else self.eps
        lo, hi = x - eps, x + eps
        if self.lower is None and self.upper is None:
            return lo, hi
        lower, upper = (_as_range(v, x) for v in (self.lower, self.upper))
        return lo.clamp(lower, upper), hi.clamp(lower, upper)


def _check_radius(eps: float | Tensor) -> None:
    value = torch.as_tensor(eps, dtype=torch.float64)
    if bool(torch.isnan(value).any()):
        raise InvalidValueError("eps is NaN; pass a finite radius >= 0")
    if bool((value < 0).any()):
        raise InvalidValueError(f"eps must be >= 0, got {float(value.min())}; pass a radius >= 0")
    if bool(torch.isinf(value).any()):
        raise InvalidValueError("eps is infinite; pass a finite radius")


@dataclass(frozen=True)
class L2Ball(InputSpec):
    """The ℓ2 ball ``{x' : ‖x' − x‖₂ ≤ eps}`` intersected with ``[lower, upper]``.

    ``bounds(x)`` is the circumscribing box ``x ± eps`` (clipped), which every domain can use
    soundly; domains that know the ball (back-substitution, by the dual norm: ``min ⟨A, x'⟩ ≥
    ⟨A, x⟩ − eps‖A‖₂``; BCP) also read :meth:`ball`. ``eps`` is a float or one radius per example
    ``(B,)``.

    Example:
        >>> ball = L2Ball(0.5)
        >>> lo, hi = ball.bounds(torch.tensor([[0.25, 0.75]]))
        >>> lo.tolist(), hi.tolist()
        ([[0.0, 0.25]], [[0.75, 1.0]])
        >>> center, radius = ball.ball(torch.tensor([[0.25, 0.75]]))
        >>> radius.tolist()
        [0.5]
    """

    eps: float | Tensor
    lower: float | Tensor | None = 0.0
    upper: float | Tensor | None = 1.0

    def __post_init__(self) -> None:
        _check_radius(self.eps)
        if isinstance(self.eps, Tensor) and self.eps.dim() > 1:
            raise ShapeError(f"L2Ball eps is a float or one radius per example (B,), got shape "
                             f"{tuple(self.eps.shape)}")
        LinfBall(0.0, self.lower, self.upper)  # the same checks of the valid range

    def with_eps(self, eps: float | Tensor) -> L2Ball:
        return L2Ball(eps, self.lower, self.upper)

    def ball(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(center, radius)``: ``x`` and the radius per example ``(B,)``."""
        check_finite(x, "input x")
        eps = torch.as_tensor(self.eps, dtype=x.dtype, device=x.device)
        return x, eps.expand(x.shape[0]) if eps.dim() == 0 else eps

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, eps = self.ball(x)
        return LinfBall(eps.view(-1, *[1] * (x.dim() - 1)), self.lower, self.upper).bounds(x)


def circumscribing_l2_radius(eps: float, p: float, dim: int) -> float:
    """The radius of the smallest ℓ2 ball containing the ℓp ball of radius ``eps`` in ``dim``
    dimensions (thesis Sec. 3.2's extension to ℓp): ``eps`` for ``p ≤ 2`` (the ℓp ball lies in
    the ℓ2 ball of the same radius) and ``eps·dim^(1/2 − 1/p)`` for ``p > 2`` (Hölder).

    Example:
        >>> round(circumscribing_l2_radius(0.1, math.inf, 784), 6)   # the corner of the ℓ∞ ball
        2.8
        >>> circumscribing_l2_radius(1.0, 1, 10)
        1.0
    """
    if not p >= 1:
        raise InvalidValueError(f"p must be >= 1 (an ℓp norm), got {p}")
    if dim < 1:
        raise InvalidValueError(f"dim must be >= 1, got {dim}")
    if p <= 2:
        return float(eps)
    exponent = 0.5 if math.isinf(p) else 0.5 - 1.0 / p
    return float(eps) * dim ** exponent


@dataclass(frozen=True)
class LpBall(InputSpec):
    """The ℓp ball (``p ≥ 1``) intersected with ``[lower, upper]``, bounded by its circumscribing
    ℓ2 ball (:func:`circumscribing_l2_radius`) and its circumscribing box — both sound, so every
    domain that takes an :class:`L2Ball` takes it."""

    eps: float
    p: float
    lower: float | Tensor | None = 0.0
    upper: float | Tensor | None = 1.0

    def __post_init__(self) -> None:
        _check_radius(self.eps)
        circumscribing_l2_radius(self.eps, self.p, 1)

    def with_eps(self, eps: float | Tensor) -> LpBall:
        return LpBall(float(eps), self.p, self.lower, self.upper)

    def ball(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = circumscribing_l2_radius(self.eps, self.p, math.prod(x.shape[1:]))
        return L2Ball(r, self.lower, self.upper).ball(x)

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # every coordinate of an ℓp ball (p ≥ 1) moves by at most eps
        return LinfBall(self.eps, self.lower, self.upper).bounds(x)


@dataclass(frozen=True)
class Box(InputSpec):
    """An explicit box ``[lower, upper]``; ``bounds(x)`` ignores ``x`` except for its batch size.

    ``lower``/``upper`` are shaped like one input (no batch dim) or like the whole batch.
    """

    lower: Tensor
    upper: Tensor

    def __post_init__(self) -> None:
        lo, hi = torch.as_tensor(self.lower), torch.as_tensor(self.upper)
        if lo.shape != hi.shape:
            raise ShapeError(f"Box lower {tuple(lo.shape)} and upper {tuple(hi.shape)} differ")
        check_finite(lo, "Box lower")
        check_finite(hi, "Box upper")
        if bool((lo > hi).any()):
            n = int((lo > hi).sum())
            raise InvalidValueError(f"Box has lower > upper in {n} entries; swap or fix them")

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lo = torch.as_tensor(self.lower, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(self.upper, dtype=x.dtype, device=x.device)
        if lo.dim() == x.dim() - 1:
            lo, hi = lo.expand_as(x), hi.expand_as(x)
        if lo.shape != x.shape:
            raise ShapeError(f"Box of shape {tuple(lo.shape)} does not fit inputs {tuple(x.shape)}")
        return lo, hi


@dataclass(frozen=True)
class Margin:
    """Robustness margins ``logit_y − logit_j`` for every class ``j ≠ y``.

    ``matrix(y, K)`` is the C-matrix of shape ``(batch, K − 1, K)``: row ``j`` is ``e_y − e_j``
    (classes other than ``y`` in increasing order). The property holds when every row's lower
    bound is positive.
    """

    def matrix(self, y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The C-matrix for labels ``y`` of shape ``(batch,)``."""
        y = y if isinstance(y, Tensor) else torch.as_tensor(y)
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise SpecError("labels must be a 1-d integer tensor of class indices, got "
                            f"{y.dtype} of shape {tuple(y.shape)}")
        if num_classes < 2:
            raise SpecError("a margin specification needs at least 2 output classes")
        if y.numel():
            lowest, highest = torch.aminmax(y)
            if int(lowest) < 0 or int(highest) >= num_classes:
                raise SpecError(f"labels must lie in [0, {num_classes - 1}], got {y.tolist()}")
        return _margin_table(num_classes, dtype, y.device)[y]


@functools.lru_cache(maxsize=32)
def _margin_table(num_classes: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """All margin C-matrices, ``table[y]`` of shape ``(K − 1, K)`` for label ``y``."""
    eye = torch.eye(num_classes, dtype=dtype, device=device)
    c = eye.unsqueeze(1) - eye.unsqueeze(0)  # c[y, j] = e_y − e_j
    others = ~torch.eye(num_classes, dtype=torch.bool, device=device)
    return c[others].reshape(num_classes, num_classes - 1, num_classes)


# ---- verification properties (VNN-LIB and dataset robustness) -------------------------------

@dataclass(frozen=True)
class Conjunction:
    """Linear constraints ``matrix @ y <= offset`` on the flattened output, all rows at once.

    Attributes:
        matrix: ``(rows, outputs)``.
        offset: ``(rows,)``.
    """

    matrix: Tensor
    offset: Tensor

    def __post_init__(self) -> None:
        if self.matrix.dim() != 2 or self.offset.shape != self.matrix.shape[:1]:
            raise ShapeError(f"a conjunction needs matrix (rows, outputs) and offset (rows,), got "
                             f"{tuple(self.matrix.shape)} and {tuple(self.offset.shape)}")
        check_finite(self.matrix, "constraint matrix")
        check_finite(self.offset, "constraint offset")

    def slack(self, y: Tensor) -> Tensor:
        """``offset − matrix @ y`` per row for outputs ``y`` of shape ``(batch, outputs)``;
        all rows ``>= 0`` means ``y`` satisfies the conjunction."""
        return self.offset.to(y) - y.flatten(1) @ self.matrix.to(y).T


@dataclass(frozen=True)
class UnsafeRegion:
    """The outputs that violate a property: a disjunction of :class:`Conjunction` terms.

    This is VNN-LIB's reading: the file's output assertions describe a counterexample, so an
    input is a counterexample when its output satisfies *some* term entirely. The property is
    verified when every term is infeasible over the input set, which back-substitution shows
    soundly by a positive lower bound of ``(matrix @ y − offset)`` on at least one row of it.

    Example:
        >>> region = UnsafeRegion.misclassified(label=1, num_classes=3)
        >>> region.contains(torch.tensor([[0.0, 2.0, 1.0], [3.0, 2.0, 1.0]])).tolist()
        [False, True]
    """

    terms: tuple[Conjunction, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise SpecError("an unsafe region needs at least one term")
        outputs = {t.matrix.shape[1] for t in self.terms}
        if len(outputs) != 1:
            raise ShapeError(f"unsafe-region terms constrain different output sizes {outputs}")

    @property
    def num_outputs(self) -> int:
        """The number of network outputs the constraints read."""
        return int(self.terms[0].matrix.shape[1])

    @staticmethod
    def misclassified(label: int, num_classes: int) -> UnsafeRegion:
        """Some class ``j ≠ label`` scores at least as high: terms ``y_label − y_j <= 0``."""
        rows = Margin().matrix(torch.tensor([label]), num_classes, torch.float64)[0]
        return UnsafeRegion(tuple(Conjunction(row[None], torch.zeros(1, dtype=torch.float64))
                                  for row in rows))

    def contains(self, y: Tensor, tolerance: float = 0.0) -> Tensor:
        """Which outputs ``(batch, outputs)`` lie in the region (every row of some term holds,
        up to ``tolerance``), as a boolean ``(batch,)``."""
        hits = [(t.slack(y) >= -tolerance).all(1) for t in self.terms]
        return torch.stack(hits, 1).any(1)


@dataclass(frozen=True)
class Property:
    """One verification query: an input box and the unsafe output region.

    A VNN-LIB file may yield several (its top-level input disjunction gives one per box).

    Attributes:
        lower, upper: the input box, shaped like one input (no batch dim).
        unsafe: the outputs that would make an input a counterexample.
        name: where the property came from (file and index, or data row).
    """

    lower: Tensor
    upper: Tensor
    unsafe: UnsafeRegion
    name: str = ""

    def __post_init__(self) -> None:
        Box(self.lower, self.upper)  # validates shapes, finiteness and order

    def is_counterexample(self, x: Tensor, y: Tensor, tolerance: float = 0.0) -> Tensor:
        """Whether inputs ``x`` lie in the box and their outputs ``y`` in the unsafe region."""
        x = x.flatten(1)
        lo, hi = self.lower.to(x).flatten(), self.upper.to(x).flatten()
        inside = ((x >= lo - tolerance) & (x <= hi + tolerance)).all(1)
        return inside & self.unsafe.contains(y, tolerance)
