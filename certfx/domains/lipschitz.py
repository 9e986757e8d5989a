"""BCP, Box Constraint Propagation (thesis ``004``, Sec. 3.2): ℓ2 balls and boxes propagated
together, and the worst-translated logit over their intersection.

The element (:class:`BallBox`) of a node holds two outer bounds of its values over the input set:

* the ball ``B₂(z, ρ)``: ``z`` is the node's value at the clean input, ``ρ`` an upper bound on the
  Lipschitz constant of the network up to the node times the input radius (``ρ^(k) = ε Π L^(i)``);
* the box ``B∞ = midrad(m, r)``.

Through an affine op ``h(ζ) = W ζ + b`` (Eq. 3.2.6–3.2.8) the ball's centre is ``h(z)`` and its
radius ``L(h)·ρ`` with a *sound upper bound* ``L(h) ≥ ‖W‖₂`` (the exact spectral norm for a
linear layer; for other affine ops, conv included, ``√(‖W‖₁‖W‖∞)``, which bounds ``‖W‖₂`` —
the thesis' power iteration estimates ``‖W‖₂`` from below and would not be sound for a
certificate). The new box is the intersection of the interval image of the box (Eq. 3.2.7) and
the box circumscribing the ball's image, ``h(z) ± ρ‖W_i‖₂`` per row (Eq. 3.2.6; exact row norms
for linear and conv layers, the ℓ1 row norm, an upper bound, otherwise). Eq. 3.2.8 prints the
hull of the two boxes; the text asks for their intersection, which is what both outer bounds
allow and what is implemented. Activations ``σ`` with Lipschitz constant ``L(σ)`` (App. B.2.3):
``σ(z)``, ``L(σ)ρ`` and ``σ(z) ± L(σ)ρ`` met with the interval image. Residual additions add
centres and radii (App. B.2.4; for any multi-input affine op, the radii weighted by each input's
constant).

At the last layer with the margin specification folded in (``spec_linear``), each row
``c = C_r W`` is bounded below by the exact minimum of ``cᵀζ`` over ``B₂(z, ρ) ∩ B∞`` (3.2.11),
found by the finite algorithm of Algorithm 1 (:func:`ball_box_min`; Prop. 3.2.1: fewer
iterations than the dimension). This is the worst-translated logit of (3.2.10).

With an :class:`~certfx.specs.L2Ball` input spec the input ball is the ℓ2 ball (clipped to the
valid range by the box); with any other input set, BCP starts from the ball circumscribing the box
(ℓ∞: ``ρ = ‖r‖₂``, the thesis' ℓ∞ variant).

Example:
    >>> import torch, certfx
    >>> torch.manual_seed(0) is not None
    True
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> cm = certfx.compile(net, "bcp", input_spec=certfx.specs.L2Ball(0.1),
    ...                     example_input=torch.zeros(1, 4))
    >>> x = torch.rand(5, 4)
    >>> lo, hi = cm.certified_forward(x)
    >>> bool((lo <= net(x)).all() and (net(x) <= hi).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.base import Domain, Rule, register_domain
from certfx.domains.interval import BOX, Interval
from certfx.ops import OpTraits

__all__ = ["BallBox", "BCP", "BCPOptions", "bcp_input", "ball_box_min", "spectral_norm_bound",
           "row_norms", "ACTIVATION_LIPSCHITZ"]


@dataclass(frozen=True)
class BCPOptions:
    """Options of the ``bcp`` domain (keyword arguments of its input rule).

    Attributes:
        max_iterations: passes of Algorithm 1 at the last layer; ``None``: until it converges
            (at most the layer's width, Prop. 3.2.1). Training may cap it (the thesis uses 10
            on MNIST); where a capped loop has not converged the bound falls back to the larger
            of the ball's and the box's own minima, so it stays sound.
    """

    max_iterations: int | None = None

    def __post_init__(self) -> None:
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0 or None, got {self.max_iterations}")


@dataclass(frozen=True)
class BallBox:
    """Both outer bounds of a node: the ball ``‖ζ − center‖₂ ≤ rho`` and the box ``box``.

    Attributes:
        center: the node's value at the clean input, ``(batch, *shape)``.
        rho: the ball's radius per example, ``(batch,)``.
        box: the box, an :class:`Interval`.

    ``lower``/``upper`` (and iterating) give the box, so a BallBox reads like an Interval.
    """

    center: Tensor
    rho: Tensor
    box: Interval
    options: BCPOptions = BCPOptions()

    @property
    def lower(self) -> Tensor:
        return self.box.lower

    @property
    def upper(self) -> Tensor:
        return self.box.upper

    def __iter__(self) -> Iterator[Tensor]:
        yield self.box.lower
        yield self.box.upper


def bcp_input(lower: Tensor, upper: Tensor, ball: tuple[Tensor, Tensor] | None = None,
              max_iterations: int | None = None) -> BallBox:
    """The input element: the box ``[lower, upper]`` and the ℓ2 ball ``ball = (center,
    radius)``, or without one the ball circumscribing the box (centre ``(l+u)/2``, radius
    ``‖(u−l)/2‖₂``)."""
    if ball is None:
        center = (lower + upper) / 2
        rho = ((upper - lower) / 2).flatten(1).norm(dim=1)
    else:
        center, rho = ball
        rho = torch.as_tensor(rho).to(lower).reshape(-1).expand(lower.shape[0])
    return BallBox(center, rho, Interval(lower, upper), BCPOptions(max_iterations))


def _meet(a: Interval, b: Interval) -> Interval:
    return Interval(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def _per_example(rho: Tensor, like: Tensor) -> Tensor:
    return rho.view(-1, *[1] * (like.dim() - 1))


# ---- Lipschitz constants and row norms of affine ops -----------------------------------------

def spectral_norm_bound(op: Callable[..., Any], args: tuple[Any, ...], k: int,
                        in_shape: tuple[int, ...]) -> Tensor:
    """A sound upper bound on ``‖L‖₂`` for the linear part ``L`` of ``op`` in argument ``k``.

    ``linear``: the spectral norm (largest singular value, raised a little against rounding).
    Otherwise the bound
    ``‖L‖₂ ≤ √(‖L‖₁ ‖L‖∞)`` (Hölder/Schur), with the largest column and row sums of ``|L|``
    read off the op's ``abs_linear_part`` and its transpose (a vector-Jacobian product).

    Example:
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> round(float(spectral_norm_bound(ops.linear, (None, w, None), 0, (2,))), 1)
        3.0
    """
    if op is ops.linear or (op is ops.spec_linear and args[3] is None):
        return _largest_singular_value(args[1])
    abs_part = ops.traits(op).abs_linear_part
    ones = _ones_like_input(args, k, in_shape)
    rows = _apply(abs_part, op, args, k, ones)
    _, vjp = torch.func.vjp(lambda v: _apply(abs_part, op, args, k, v), ones)
    (cols,) = vjp(torch.ones_like(rows))
    return torch.sqrt(rows.amax() * cols.amax())


def _largest_singular_value(w: Tensor) -> Tensor:
    """``σ_max(W)`` as the square root of the largest eigenvalue of the smaller Gram matrix
    (a symmetric eigenproblem: far cheaper than an SVD), raised by a relative ``1e-5`` (float32:
    ``4e-3``) against rounding, so the bound stays above the true value."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    top = torch.linalg.eigvalsh(gram)[-1].clamp_min(0)
    slack = 1e-5 if w.dtype == torch.float64 else 4e-3
    return torch.sqrt(top + 1e-30) * (1 + slack)


def row_norms(op: Callable[..., Any], args: tuple[Any, ...], k: int,
              in_shape: tuple[int, ...]) -> Tensor:
    """``‖L_i‖₂`` per output entry (an upper bound where not exact), ``(1, *out_shape)``:
    exact for ``linear`` and ``conv`` (the conv of a ones input with the squared kernel), the ℓ1
    row norm ``|L|·1`` otherwise."""
    if op is ops.linear or (op is ops.spec_linear and args[3] is None):
        w = args[1]
        return w.norm(dim=1).unsqueeze(0) if w.dim() == 2 else w.norm(dim=-1)
    ones = _ones_like_input(args, k, in_shape)
    if op is ops.conv:
        _, weight, _, stride, padding, dilation, groups = args
        squared = ops.conv(ones, weight * weight, None, stride, padding, dilation, groups)
        return squared.clamp_min(1e-30).sqrt()
    return _apply(ops.traits(op).abs_linear_part, op, args, k, ones)


def _ones_like_input(args: tuple[Any, ...], k: int, in_shape: tuple[int, ...]) -> Tensor:
    like = next(a for a in args if isinstance(a, Tensor)) if any(
        isinstance(a, Tensor) for a in args) else torch.zeros(())
    return torch.ones((1, *in_shape), dtype=like.dtype if like.is_floating_point()
                      else torch.float32, device=like.device)


def _apply(part: Callable[..., Any], op: Callable[..., Any], args: tuple[Any, ...], k: int,
           v: Tensor) -> Tensor:
    """``part`` with ``v`` in position ``k``, 0 in the op's other perturbed positions."""
    perturbable = set(ops.traits(op).perturbed_args)
    call = [v if i == k else (0.0 if i in perturbable else a) for i, a in enumerate(args)]
    return part(*call)


# ---- rules ------------------------------------------------------------------------------------

def _derive_affine(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    """Eq. 3.2.6–3.2.8 for any affine op (see the module docstring)."""
    if not op_traits.affine or op_traits.abs_linear_part is None:
        return None
    box_rule = BOX.rule_for(op)

    def rule(*args: Any) -> BallBox:
        perturbed = [k for k, a in enumerate(args) if isinstance(a, BallBox)]
        centers = [a.center if isinstance(a, BallBox) else a for a in args]
        center = op(*centers)
        box = box_rule(*[a.box if isinstance(a, BallBox) else a for a in args])
        rho = center.new_zeros(center.shape[0])
        spread = torch.zeros_like(center)
        for k in perturbed:
            shape = tuple(args[k].center.shape[1:])
            rk = args[k].rho
            rho = rho + rk * spectral_norm_bound(op, args, k, shape)
            spread = spread + _per_example(rk, center) * row_norms(op, args, k, shape)
        ball_box = Interval(center - spread, center + spread)
        return BallBox(center, rho, _meet(box, ball_box), args[perturbed[0]].options)

    return rule


# Lipschitz constants of the elementwise activations (App. B.2.3).
ACTIVATION_LIPSCHITZ: dict[Callable[..., Any], Callable[..., float]] = {
    ops.relu: lambda: 1.0,
    ops.leaky_relu: lambda slope: max(1.0, abs(float(slope))),
    ops.sigmoid: lambda: 0.25,
    ops.tanh: lambda: 1.0,
    ops.hardtanh: lambda lo, hi: 1.0,
}


def _derive_activation(op: Callable[..., Any], op_traits: OpTraits) -> Rule | None:
    if op not in ACTIVATION_LIPSCHITZ:
        return None
    box_rule = BOX.rule_for(op)

    def rule(x: BallBox, *op_args: Any) -> BallBox:
        lip = ACTIVATION_LIPSCHITZ[op](*op_args)
        center = op(x.center, *op_args)
        spread = _per_example(lip * x.rho, center)
        box = _meet(box_rule(x.box, *op_args), Interval(center - spread, center + spread))
        return BallBox(center, lip * x.rho, box, x.options)

    return rule


def ball_box_min(c: Tensor, center: Tensor, rho: Tensor, box: Interval,
                 max_iter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``min cᵀζ`` over ``‖ζ − center‖₂ ≤ rho`` and ``ζ ∈ box`` by Algorithm 1 (thesis,
    (3.2.11)–(3.2.12)); ``c`` is ``(B, R, n)``, ``center``/``box`` ``(B, n)``, ``rho`` ``(B,)``.

    In coordinates ``q = ζ − center``, start at the ball's minimizer ``q = −ρ c/‖c‖``; while some
    entries leave the box, clamp those (and keep every entry already at a face: the set ``I``),
    and rescale the others by ``η`` (3.2.12) back onto the sphere. Prop. 3.2.1: the loop ends at
    the optimum in fewer iterations than ``n``.

    Returns ``(value, iterations, converged)``: ``value`` ``(B, R)`` is the optimum where the loop
    converged and otherwise the larger of the ball's and the box's own minima (each a sound
    lower bound, as each set contains the intersection).

    Example:
        >>> c = torch.tensor([[[1.0, 1.0]]])
        >>> box = Interval(torch.tensor([[-0.1, -5.0]]), torch.tensor([[5.0, 5.0]]))
        >>> v, it, ok = ball_box_min(c, torch.zeros(1, 2), torch.tensor([1.0]), box)
        >>> round(float(v), 4), bool(ok)       # ζ = (−0.1, −√0.99)
        (-1.095, True)
    """
    b, r, n = c.shape
    lo = (box.lower - center).unsqueeze(1).expand(b, r, n)
    hi = (box.upper - center).unsqueeze(1).expand(b, r, n)
    rho_ = rho.view(b, 1)
    norm = c.pow(2).sum(2, keepdim=True).clamp_min(1e-30).sqrt()
    q = -rho_.unsqueeze(2) * c / norm
    ball_value = -rho_ * c.norm(dim=2)
    box_value = (c.clamp(min=0) * lo + c.clamp(max=0) * hi).sum(2)
    fixed = torch.zeros_like(q, dtype=torch.bool)
    iterations = torch.zeros(b, r, dtype=torch.long, device=c.device)
    tol = 1e-9 if c.dtype == torch.float64 else 1e-6
    for _ in range(n + 1 if max_iter is None else max_iter):
        outside = (q < lo - tol) | (q > hi + tol)
        active = outside.any(2)
        if not bool(active.any()):
            break
        iterations += active.long()
        fixed = fixed | (active.unsqueeze(2) & ((q <= lo) | (q >= hi)))
        clamped = torch.where(fixed, torch.minimum(torch.maximum(q, lo), hi), q)
        free = ~fixed
        used = (clamped * fixed).pow(2).sum(2, keepdim=True)
        rest = (clamped * free).pow(2).sum(2, keepdim=True)
        # (clamped before the square roots: their gradient at 0 is infinite)
        eta = torch.sqrt((rho_.unsqueeze(2) ** 2 - used).clamp_min(1e-30)) / \
            torch.sqrt(rest.clamp_min(1e-30))
        scaled = torch.where(free, clamped * eta, clamped)
        q = torch.where(active.unsqueeze(2), scaled, q)
    converged = ~((q < lo - tol) | (q > hi + tol)).any(2)
    exact = (c * q).sum(2)
    value = torch.where(converged, torch.maximum(exact, torch.maximum(ball_value, box_value)),
                        torch.maximum(ball_value, box_value))
    return value + (c * center.unsqueeze(1)).sum(2), iterations, converged


def _worst_case(x: BallBox, c: Tensor, bias: Tensor) -> Interval:
    """Bounds on ``c ζ + bias`` (rows of ``c``: ``(B, R, n)``) over the ball ∩ box of ``x``."""
    center = x.center.flatten(1)
    box = Interval(x.box.lower.flatten(1), x.box.upper.flatten(1))
    c = c.expand(center.shape[0], *c.shape[1:]) if c.shape[0] == 1 else c
    low, _, _ = ball_box_min(c, center, x.rho, box, x.options.max_iterations)
    # Upper bounds of specification rows are not read by a certificate (margins need lower
    # bounds): the cheaper of the two relaxations, without the loop, is sound.
    high, _, _ = ball_box_min(-c, center, x.rho, box, max_iter=0)
    return Interval(low + bias, -high + bias)


BCP = register_domain(Domain(
    name="bcp",
    aliases=("lipschitz",),
    element=BallBox,
    input_rule=bcp_input,
    module=__name__,
    prefix="bcp",
    derivers=[_derive_activation, _derive_affine],
    options=BCPOptions,
    ball_input=True,
))


@BCP.rule(ops.spec_linear)
def bcp_spec_linear(x: BallBox, weight: Tensor, bias: Tensor | None,
                    spec: Tensor | None) -> BallBox | Interval:
    """The last layer: with a specification ``C``, the worst-translated rows ``C(Wζ + b)`` over
    ball ∩ box (3.2.10–3.2.11, Algorithm 1); without one, the affine rule."""
    if spec is None:
        return bcp_linear(x, weight, bias)  # noqa: F821 - derived below, called at run time
    c = torch.matmul(spec, weight)  # (B, R, n)
    b = torch.zeros(c.shape[:2], dtype=c.dtype, device=c.device) if bias is None else \
        torch.matmul(spec, bias)
    return _worst_case(x, c, b)


@BCP.rule(ops.apply_spec)
def bcp_apply_spec(x: BallBox, spec: Tensor | None) -> BallBox | Interval:
    """A specification on a non-linear output: the same worst case with ``c = C``."""
    if spec is None:
        return x
    return _worst_case(x, spec, torch.zeros(spec.shape[:2], dtype=spec.dtype,
                                            device=spec.device))


BCP.derive_missing()
