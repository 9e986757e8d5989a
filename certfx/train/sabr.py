"""SABR: certified training with small boxes (Müller et al., ICLR 2023; paper ``002``, Sec. 3).

For each example: a PGD attack in ``B^ε(x)`` (within the valid range) finds a high-loss point
``x*``; projecting it onto ``B^(ε−τ)(x)`` gives the centre ``x'`` of the propagation region
``B^τ(x')`` with ``τ = λε``, which lies inside ``B^ε(x)`` by the triangle inequality. The loss is
the IBP robust cross-entropy of that small box (clipped to the valid range, which keeps it inside
the ε-ball). ``λ = 1`` is IBP; small λ regularizes less and keeps more accuracy.

Example:
    >>> import torch
    >>> x = torch.full((1, 3), 0.5)
    >>> centre = sabr_centre(x, torch.tensor([[0.0, 0.6, 0.52]]), eps=0.1, tau=0.04)
    >>> [round(v, 2) for v in centre[0].tolist()]
    [0.44, 0.56, 0.52]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from certfx.errors import InvalidValueError
from certfx.train.ibp import IBPOptions, IntervalTraining
from certfx.train.method import LossOutput, StepContext, option, register_method
from certfx.train.pgd import check_pgd_options, pgd_box

__all__ = ["SABR", "SABROptions", "sabr_box", "sabr_centre"]


def sabr_centre(x: Tensor, x_star: Tensor, eps: float | Tensor, tau: float | Tensor) -> Tensor:
    """The projection of ``x_star`` onto ``B^(ε−τ)(x)`` (ℓ∞: clipping)."""
    radius = torch.as_tensor(eps, dtype=x.dtype, device=x.device) - tau
    return torch.max(torch.min(x_star, x + radius), x - radius)


def sabr_box(model, x: Tensor, y: Tensor, eps: float, lam: float, valid: tuple[float, float],
             steps: int, step_size: float, restarts: int, generator: torch.Generator | None
             ) -> tuple[Tensor, float]:
    """SABR's propagation region ``B^τ(x')``: its centre ``x'`` and ``τ = λε``."""
    lo = (x - eps).clamp(*valid)
    hi = (x + eps).clamp(*valid)
    x_star = pgd_box(model, lo, hi, y, steps=steps, restarts=restarts, step_size=step_size,
                     generator=generator)
    tau = lam * eps
    return sabr_centre(x, x_star, eps, tau), tau


@dataclass(frozen=True)
class SABROptions(IBPOptions):
    """SABR hyperparameters (paper ``002``; λ = 0.4 as for MNIST ε = 0.1 in its Table 5)."""

    lambda_ratio: float = option(0.4, "SABR's subselection ratio λ: the box radius τ = λε")
    pgd_steps: int = option(8, "PGD steps that find the box centre")
    pgd_step_size: float = option(0.5, "PGD step as a fraction of the box half-width")
    pgd_restarts: int = option(1, "PGD random restarts")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.lambda_ratio <= 1:
            raise InvalidValueError(f"lambda_ratio must lie in (0, 1], got {self.lambda_ratio}")
        check_pgd_options(self.pgd_steps, self.pgd_step_size, self.pgd_restarts)


@register_method
class SABR(IntervalTraining):
    """IBP of a small box around an adversarial point."""

    name = "sabr"
    Options = SABROptions
    description = "SABR (Müller et al. 2023): IBP of a small adversarially placed box"

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        if ctx.eps <= 0:
            return self.robust_terms(x, y, 0.0, ctx)
        centre, tau = sabr_box(self.model, x, y, ctx.eps, opts.lambda_ratio, self.input_range,
                               opts.pgd_steps, opts.pgd_step_size, opts.pgd_restarts,
                               ctx.generator)
        out = self.robust_terms(centre, y, tau, ctx, clean=x)
        return out
