"""The baselines: standard training and PGD adversarial training (Madry et al. 2018).

PGD training minimizes the cross-entropy at the point of ``B^ε(x)`` (within the valid range)
where a ``steps``-step PGD attack found the highest cross-entropy, optionally mixed with the
natural loss. ε follows the same annealing schedule as the certified methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from certfx.errors import InvalidValueError
from certfx.train.method import LossOutput, Method, StepContext, option, register_method
from certfx.train.pgd import check_pgd_options, pgd_box

__all__ = ["PGD", "PGDOptions", "Standard", "StandardOptions"]


@dataclass(frozen=True)
class StandardOptions:
    """Standard training has no hyperparameters of its own."""


@register_method
class Standard(Method):
    """Cross-entropy on clean inputs."""

    name = "standard"
    Options = StandardOptions
    description = "standard (natural) training"

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        loss = F.cross_entropy(self.model(x), y)
        return LossOutput(loss, {"natural_loss": loss.item()})


@dataclass(frozen=True)
class PGDOptions:
    """PGD training hyperparameters."""

    pgd_steps: int = option(10, "PGD steps of the training attack")
    pgd_step_size: float = option(0.25, "PGD step as a fraction of ε")
    pgd_restarts: int = option(1, "PGD random restarts")
    natural_weight: float = option(0.0, "weight of the natural loss in the mix")

    def __post_init__(self) -> None:
        check_pgd_options(self.pgd_steps, self.pgd_step_size, self.pgd_restarts)
        if not 0 <= self.natural_weight <= 1:
            raise InvalidValueError("natural_weight must lie in [0, 1]")


@register_method
class PGD(Method):
    """Adversarial training on PGD points."""

    name = "pgd"
    Options = PGDOptions
    description = "PGD adversarial training (Madry et al. 2018)"

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        if ctx.eps > 0:
            lo, hi = (x - ctx.eps).clamp(*self.input_range), (x + ctx.eps).clamp(
                *self.input_range)
            xa = pgd_box(self.model, lo, hi, y, steps=opts.pgd_steps,
                         restarts=opts.pgd_restarts, step_size=opts.pgd_step_size,
                         generator=ctx.generator)
        else:
            xa = x
        adversarial = F.cross_entropy(self.model(xa), y)
        loss, metrics = adversarial, {"adversarial_loss": adversarial.item()}
        if opts.natural_weight > 0:
            natural = F.cross_entropy(self.model(x), y)
            loss = opts.natural_weight * natural + (1 - opts.natural_weight) * adversarial
            metrics["natural_loss"] = natural.item()
        return LossOutput(loss, metrics)
