"""PGD for training: the adversarial points of PGD training, SABR and TAPS.

A lean batched PGD in an axis-aligned box (Madry et al. 2018): random start, ``steps`` signed
gradient steps of ``step_size`` times the box half-width, projection by clipping, and the point
with the highest loss over all steps and restarts. Unlike :func:`certfx.verify.pgd_ball` it
neither re-checks nor reports counterexamples: a training point only has to be a good estimate of
the worst case, and it must be cheap.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
    >>> x, y = torch.tensor([[0.6, 0.4]]), torch.tensor([0])
    >>> xa = pgd_box(net, x - 0.1, x + 0.1, y, steps=10)
    >>> xa.tolist()          # the corner that maximizes the loss of class 0
    [[0.5, 0.5]]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from certfx.errors import InvalidValueError

__all__ = ["ce_objective", "margin_objective", "pgd_box"]

Objective = Callable[[Tensor, Tensor], Tensor]


def check_pgd_options(steps: int, step_size: float, restarts: int = 1) -> None:
    """Raise a clear error for PGD settings no attack can run with."""
    if steps < 0 or restarts < 1 or not step_size > 0:
        raise InvalidValueError(f"PGD needs steps >= 0, restarts >= 1 and step size > 0, got "
                                f"{steps}, {restarts}, {step_size}")


def ce_objective(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (the loss PGD training ascends)."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_objective(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example ``max_{j≠y} z_j − z_y`` (Carlini & Wagner 2017)."""
    true = logits.gather(1, y[:, None])
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (others.amax(1, keepdim=True) - true)[:, 0]


def pgd_box(model: Callable[[Tensor], Tensor], lower: Tensor, upper: Tensor, y: Tensor,
            steps: int = 8, restarts: int = 1, step_size: float = 0.5,
            objective: Objective = ce_objective, generator: torch.Generator | None = None,
            start: Tensor | None = None) -> Tensor:
    """The point of ``[lower, upper]`` with the highest ``objective`` PGD found.

    Args:
        model: maps a batch of points to logits (its gradients w.r.t. parameters are not kept).
        lower, upper: the box per example, shape ``(B, …)``.
        y: labels ``(B,)`` passed to ``objective``.
        steps: gradient steps per restart.
        restarts: random starts (the first one at ``start`` when given).
        step_size: the step as a fraction of the half-width ``(upper − lower)/2``.
        objective: ``(logits, y) -> (B,)`` loss to ascend.
        generator: random-number generator for the starts (on the box's device).
        start: optional first starting point.
    """
    lower, upper = lower.detach(), upper.detach()
    alpha = step_size * (upper - lower) / 2
    best_x, best = (lower + upper) / 2, torch.full_like(y, float("-inf"), dtype=lower.dtype)
    for r in range(restarts):
        if r == 0 and start is not None:
            x = start.detach().clamp(lower, upper)
        else:
            u = torch.rand(lower.shape, generator=generator, device=lower.device,
                           dtype=lower.dtype)
            x = lower + (upper - lower) * u
        for i in range(steps + 1):
            x.requires_grad_(True)
            with torch.enable_grad():
                loss = objective(model(x), y)
                grad = torch.autograd.grad(loss.sum(), x)[0] if i < steps else None
            value = loss.detach()
            better = value > best
            best = torch.where(better, value, best)
            best_x = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x.detach(), best_x)
            if grad is not None:
                x = torch.min(torch.max(x.detach() + alpha * grad.sign(), lower), upper)
    return best_x.detach()
