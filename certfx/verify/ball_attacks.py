"""Dataset robustness attacks: PGD in ℓ∞ and ℓ2 balls around a batch of points.

:func:`pgd_ball` runs the PGD of :mod:`certfx.verify.attacks` (Madry et al. 2018) in the ball
of radius ε around each example, intersected with the valid input range, with the margin loss
of Carlini & Wagner (2017) or cross-entropy, and reports a point as adversarial only after a
concrete float64 (or onnxruntime) re-check that it lies in the set and is misclassified.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
    >>> x, y = torch.tensor([[0.6, 0.4], [0.9, 0.1]]), torch.tensor([0, 0])
    >>> result = pgd_ball(net, x, y, eps=0.15)
    >>> result.found.tolist()     # 0.6 − 0.15 < 0.4 + 0.15; 0.9 − 0.15 > 0.1 + 0.15
    [True, False]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from certfx.errors import InvalidValueError, ShapeError, SpecError
from certfx.specs import Margin
from certfx.verify.attacks import (ModelArg, Norm, PGDConfig, _attack_mode, _inward,
                                   _l2_step, _linf_step, _objective, _pgd, _Target, _uniform,
                                   _violations)

__all__ = ["BallAttackResult", "pgd_ball"]


@dataclass(frozen=True)
class BallAttackResult:
    """The outcome of :func:`pgd_ball`, per example of the batch.

    Attributes:
        x_adv: the best point per example ``(B, *input_shape)``; always inside the set.
        found: ``(B,)`` whether ``x_adv`` is a re-checked counterexample (misclassified).
        violation: ``(B,)`` ``min_r (C @ z)_r`` at ``x_adv`` in the re-check (for the default
            spec the margin ``z_y − max_{j≠y} z_j``); ``<= 0`` means misclassified.
        reasons: why each example has no counterexample (empty strings where found).
    """

    x_adv: Tensor
    found: Tensor
    violation: Tensor
    reasons: tuple[str, ...]


# ---- dataset robustness (ℓ∞ and ℓ2 balls) -----------------------------------------------------

def _l2_inside(x: Tensor, x0: Tensor, eps: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Pull points whose float64 distance exceeds ε (rounding) back inside, clipping last."""
    view = (-1, *[1] * (x.dim() - 1))
    for _ in range(4):
        delta = (x.double() - x0.double()).flatten(1)
        dist = delta.norm(dim=1)
        if not bool((dist > eps).any()):
            break
        shrink = torch.where(dist > eps, eps / dist * (1 - 2.0 ** -20), torch.ones_like(dist))
        x = torch.clamp((x0.double() + delta.view_as(x) * shrink.view(view)).to(x.dtype), lo, hi)
    return x


def _l2_project(c: Tensor, eps: Tensor, lo: Tensor, hi: Tensor) -> Callable[[Tensor], Tensor]:
    """Alternating projections onto the ℓ2 ball ``‖p − c‖ <= eps`` (radial scaling) and the box
    ``[lo, hi]``, clipping last; they converge to a point of the intersection."""
    view = (-1, *[1] * (c.dim() - 1))

    def project(p: Tensor) -> Tensor:
        for _ in range(3):
            d = (p - c).flatten(1).norm(dim=1).clamp_min(1e-30)
            p = torch.clamp(c + (p - c) * (eps / d).clamp(max=1.0).to(p.dtype).view(view), lo, hi)
        return p
    return project


def _l2_uniform(gen: torch.Generator, c: Tensor, eps: Tensor) -> Tensor:
    """Points uniform in the ℓ2 balls: a Gaussian direction, radius ``eps·u^(1/d)``."""
    view = (-1, *[1] * (c.dim() - 1))
    g = torch.randn(c.shape, generator=gen, dtype=torch.float64).to(c.device)
    u = torch.rand(len(c), generator=gen, dtype=torch.float64).to(c.device)
    radius = eps * u ** (1.0 / c[0].numel()) / g.flatten(1).norm(dim=1).clamp_min(1e-30)
    return (c.double() + g * radius.view(view)).to(c.dtype)


def pgd_ball(model: ModelArg, x: Tensor, y: Tensor | None, eps: float | Tensor,
             norm: Norm | None = None, config: PGDConfig | None = None,
             lower: float | Tensor = 0.0, upper: float | Tensor = 1.0,
             spec: Tensor | None = None) -> BallAttackResult:
    """Batched PGD in the ℓ∞ or ℓ2 ball of radius ``eps`` around each ``x``, within
    ``[lower, upper]``, for points where some row of ``spec @ z`` is ``<= 0``.

    ℓ∞: sign steps, projection by clipping to ``[max(x−ε, lower), min(x+ε, upper)]``. ℓ2:
    normalized-gradient steps, projection alternating between the ball (radial scaling) and the
    box, clipping last; the final point's float64 distance is checked, and only points inside
    both sets are returned. Restarts run one after another over the examples still without a
    counterexample (all of them without early stop).

    Args:
        model: a torch model or an ONNX path (see :func:`pgd_property`).
        x: the data points ``(B, *input_shape)``.
        y: labels ``(B,)``; unused when ``spec`` is given.
        eps: the radius, a float or per example ``(B,)`` (ℓ∞ also per feature).
        norm: overrides ``config.norm``.
        config: the attack settings.
        lower: smallest valid input value (float or tensor broadcastable to ``x``).
        upper: largest valid input value.
        spec: C-matrix ``(B, rows, K)`` or ``(rows, K)``; default ``Margin().matrix(y, K)``,
            whose rows ``z_y − z_j`` make "some row <= 0" mean misclassified (ties count, as in
            :meth:`UnsafeRegion.misclassified`).
    """
    cfg = config or PGDConfig()
    norm = norm or cfg.norm
    target = _Target(model, x.device)
    module, B, view = target.module, x.shape[0], (-1, *[1] * (x.dim() - 1))
    x0 = x.detach()
    if spec is None and y is None:
        raise SpecError("pgd_ball needs labels y or a C-matrix spec")
    with _attack_mode(module), torch.no_grad():
        z0 = module(x0).flatten(1)
    C = spec if spec is not None else Margin().matrix(y.to(x.device), z0.shape[1], x.dtype)
    C = C.to(x.device, x.dtype).expand(B, -1, -1)
    matrix, offset = C[:, :, None, :], torch.zeros(C.shape[:2] + (1,), dtype=x.dtype,
                                                   device=x.device)
    eps64 = torch.as_tensor(eps, dtype=torch.float64, device=x.device)
    if bool(torch.isnan(eps64).any()) or bool((eps64 < 0).any()):
        raise InvalidValueError("eps must be finite and >= 0")
    if eps64.dim() == 1 and eps64.numel() == B and x.dim() > 1:
        eps64 = eps64.view(view)
    elif norm is Norm.L2 and eps64.numel() != 1:
        raise ShapeError("an ℓ2 radius is a float or one value per example (B,)")
    range_lo, range_hi = (torch.as_tensor(v, dtype=torch.float64, device=x.device).expand_as(x0)
                          for v in (lower, upper))
    if norm is Norm.LINF:
        lo64 = torch.maximum(x0.double() - eps64, range_lo)
        hi64 = torch.minimum(x0.double() + eps64, range_hi)
        empty = (lo64 > hi64).flatten(1).any(1)
    else:
        lo64, hi64 = range_lo, range_hi
        eps_b = eps64.expand(B, *[1] * (x.dim() - 1)).flatten()
        gap = (x0.double() - x0.double().clamp(range_lo, range_hi)).flatten(1).norm(dim=1)
        empty = gap > eps_b
    lo, hi = _inward(lo64, hi64, x.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the clean point counts when it is in the set (then clamping leaves it unchanged)
    best_x = torch.clamp(x0, lo, hi)
    in_range = ((x0.double() >= range_lo) & (x0.double() <= range_hi)).flatten(1).all(1)
    clean = torch.einsum("bk,brk->br", z0, C).amin(1).double()
    best = torch.where(in_range & ~empty, clean, torch.full_like(clean, math.inf))
    for r in range(cfg.restarts):
        idx = (best > 0) & ~empty if cfg.early_stop else ~empty
        idx = idx.nonzero().flatten()
        if not len(idx):
            break
        c, a, b, l_, h_ = x0[idx], matrix[idx], offset[idx], lo[idx], hi[idx]
        if norm is Norm.LINF:
            alpha = (cfg.relative_step * eps64.expand_as(x0)[idx]).to(x.dtype)
            project, step = (lambda p, l_=l_, h_=h_: torch.clamp(p, l_, h_)), _linf_step(alpha)
            start = _uniform(gen, l_, h_, len(idx))
        else:
            e = eps_b[idx]
            project, step = _l2_project(c, e, l_, h_), _l2_step(
                (cfg.relative_step * e).to(x.dtype).view(view))
            start = _l2_uniform(gen, c, e)
        if r == 0 and cfg.init is not None:
            start = cfg.init.to(x.device, x.dtype)[idx]

        def score(z: Tensor, a: Tensor = a, b: Tensor = b) -> tuple[Tensor, Tensor]:
            v = _violations(z, a, b)
            return _objective(v, cfg.loss, None), v.amin(1)

        with _attack_mode(module):
            xs, vs, _ = _pgd(module, start, project, step, score, cfg.steps,
                             (lambda v: bool((v <= 0).all())) if cfg.early_stop else None)
        better = vs < best[idx]
        best[idx] = torch.where(better, vs, best[idx])
        best_x[idx[better]] = xs[better]
    if norm is Norm.L2:
        best_x = _l2_inside(best_x, x0, eps_b, lo, hi)
    return _recheck_ball(target, best_x, x0, eps64, norm, range_lo, range_hi, C, empty)


def _recheck_ball(target: _Target, xa: Tensor, x0: Tensor, eps64: Tensor, norm: Norm,
                  range_lo: Tensor, range_hi: Tensor, C: Tensor, empty: Tensor) -> BallAttackResult:
    """Concrete re-check of the final points: exact float64 set membership, then the output."""
    xd, cd = xa.double(), x0.double()
    if norm is Norm.LINF:
        inside = ((xd - cd).abs() <= eps64).flatten(1).all(1)
    else:
        eps_b = eps64.expand(len(xa), *[1] * (xa.dim() - 1)).flatten()
        inside = (xd - cd).flatten(1).norm(dim=1) <= eps_b
    inside &= ((xd >= range_lo) & (xd <= range_hi)).flatten(1).all(1)
    xa = torch.where(inside.view(-1, *[1] * (xa.dim() - 1)), xa, torch.clamp(
        x0, *_inward(range_lo, range_hi, x0.dtype)))  # report only points in the set
    z = target.concrete(xa)
    violation = torch.einsum("bk,brk->br", z, C.double()).amin(1).cpu()
    found = (violation <= 0) & inside.cpu() & ~empty.cpu()
    reasons = tuple("" if f else "the input set is empty" if e else
                    "the best point fell outside the set" if not i else
                    f"not misclassified (margin {v:.3g} in the concrete re-check)"
                    for f, e, i, v in zip(found.tolist(), empty.tolist(), inside.tolist(),
                                          violation.tolist()))
    return BallAttackResult(xa.detach(), found, violation, reasons)
