"""CROWN-IBP training (Zhang et al. 2020).

The margin bound mixes the CROWN-IBP bound (back-substitution from the output with interval
intermediate bounds, certfx domain ``crown-ibp``) and the IBP bound:
``m = β·m_CROWN-IBP + (1 − β)·m_IBP``, and the loss mixes natural and robust cross-entropy:
``κ·L_nat + (1 − κ)·L_rob(m)``. Both β and κ move linearly from their start to their end value
while ε ramps up (Zhang et al., Sec. 4: β 1 → 0, κ 1 → 0); once β = 0 the CROWN-IBP pass is
skipped, so late epochs cost what IBP costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from certfx.errors import InvalidValueError
from certfx.train.ibp import (
    IBPOptions,
    IntervalTraining,
)
from certfx.train.losses import certified, robust_ce
from certfx.train.method import LossOutput, StepContext, option, register_method
from certfx.train.schedule import linear_ramp

__all__ = ["CrownIBP", "CrownIBPOptions"]


@dataclass(frozen=True)
class CrownIBPOptions(IBPOptions):
    """CROWN-IBP's β and κ schedules (Zhang et al. 2020) on top of the IBP options."""

    init: str = option("default", "weight initialization: 'ibp' (Shi et al.) or 'default'")
    fast_reg: float = option(0.0, "weight λ of Shi et al.'s warm-up regularizers (0: off)")
    beta_start: float = option(1.0, "β at the start of the ε ramp (weight of CROWN-IBP)")
    beta_end: float = option(0.0, "β once ε reaches its target")
    kappa_start: float = option(1.0, "κ (natural-loss weight) at the start of the ε ramp")
    kappa_end: float = option(0.0, "κ once ε reaches its target")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.natural_weight:
            raise InvalidValueError("CROWN-IBP mixes the natural loss by its κ schedule; set "
                                    "kappa_start/kappa_end instead of natural_weight")
        for name in ("beta_start", "beta_end", "kappa_start", "kappa_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidValueError(f"{name} must lie in [0, 1]")


@register_method
class CrownIBP(IntervalTraining):
    """CROWN-IBP: a β-mix of back-substitution and interval margin bounds."""

    name = "crown-ibp"
    Options = CrownIBPOptions
    description = "CROWN-IBP (Zhang et al. 2020) with its β/κ schedule"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.crown_ibp = self.compile("crown-ibp")

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        beta = linear_ramp(opts.beta_start, opts.beta_end, ctx.progress)
        kappa = linear_ramp(opts.kappa_start, opts.kappa_end, ctx.progress)
        bounds = self.box(x, y, ctx.eps)
        margins = bounds.margins
        if beta > 0:
            margins = beta * self.crown_ibp.certified_forward(x, y, eps=ctx.eps) + \
                (1 - beta) * margins
        robust = robust_ce(margins)
        natural = F.cross_entropy(self.model(x), y)
        loss = kappa * natural + (1 - kappa) * robust
        metrics = {"robust_loss": robust.item(), "natural_loss": natural.item(),
                   "beta": beta, "kappa": kappa,
                   "cert": float(certified(margins).float().mean())}
        return LossOutput(self.regularized(loss, bounds, ctx, metrics), metrics)
