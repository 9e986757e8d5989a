"""CROWN-IBP training (Zhang et al. 2020).

The margin bound mixes the CROWN-IBP bound (back-substitution from the output with interval
intermediate bounds, certfx domain ``crown-ibp``) and the IBP bound:
``m = β·m_CROWN-IBP + (1 − β)·m_IBP``, and the loss mixes natural and robust cross-entropy:
``κ·L_nat + (1 − κ)·L_rob(m)``. Both β and κ move linearly from their start to their end value
while ε ramps up (Zhang et al., Sec. 4: β 1 → 0, κ 1 → 0); once β = 0 the CROWN-IBP pass is
skipped, so late epochs cost what IBP costs.

Lower slopes of unstable ReLUs in the CROWN-IBP pass (thesis ``004``, Sec. 3.3.3), ``--lower-slopes``:

* ``adaptive`` — CROWN-IBP's ``a = 1[u > −l]``;
* ``random`` — the thesis' (p, q) variants of its smoothness analysis: ``a = 1`` with
  probability ``p`` where ``|l| > |u|`` and ``q`` where ``|l| ≤ |u|`` (CROWN-IBP is (0, 1));
* ``one-step`` — Eq. 3.3.24: from ``a₀ ~ U[0, 1]`` one projected signed-gradient step of the
  loss, ``â = Π_[0,1](a₀ − η·sign(∇_a L))``, which tightens the bound and tends to make ``a``
  sparse (a smoother loss landscape). The step's gradient is taken w.r.t. the slopes only;
  ``â`` is then a constant of the step, like any other valid slope, so the bound stays sound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    lower_slopes: str = option("adaptive", "unstable ReLUs' lower slopes: adaptive "
                                           "(CROWN-IBP), random ((p, q) of the thesis Sec. "
                                           "3.3.3) or one-step (Eq. 3.3.24)")
    slope_p: float = option(0.0, "random slopes: P(a = 1) where |l| > |u| (thesis' p)")
    slope_q: float = option(1.0, "random slopes: P(a = 1) where |l| <= |u| (thesis' q)")
    slope_eta: float = option(1.0, "one-step slopes: the step η >= 1 of Eq. 3.3.24")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lower_slopes not in ("adaptive", "random", "one-step"):
            raise InvalidValueError("lower_slopes must be adaptive, random or one-step")
        if not (0 <= self.slope_p <= 1 and 0 <= self.slope_q <= 1) or self.slope_eta < 1:
            raise InvalidValueError("need 0 <= slope_p, slope_q <= 1 and slope_eta >= 1")
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
        from certfx.domains.crown import BacksubOptions
        from certfx.domains.linear import Slopes

        opts = self.options
        # certfx's RANDOM policy draws 1 with probability p where u ≥ −l (|u| ≥ |l|): the
        # thesis' q; and q elsewhere: the thesis' p.
        slopes = Slopes.random(opts.slope_q, opts.slope_p) if opts.lower_slopes == "random" \
            else Slopes()
        self.crown_ibp = self.compile("crown-ibp", domain_options=BacksubOptions(slopes))
        self.one_step = None
        if opts.lower_slopes == "one-step":
            from certfx.domains.linear_lowering import AlphaScope, IntermediateBounds, \
                emit_backsub

            self.one_step = emit_backsub(self.crown_ibp.network, IntermediateBounds.INTERVAL,
                                         Slopes(), AlphaScope.FINAL, result="bounds+slopes",
                                         class_name="OneStepCrownIbp")

    def one_step_margins(self, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """CROWN-IBP margins with the one-step slopes of Eq. 3.3.24 (see the module
        docstring)."""
        from certfx.domains.linear_lowering import ALPHA_KEY

        cm = self.crown_ibp
        lo, hi = cm.input_bounds(x, eps)
        spec = cm.output_spec.matrix(y, cm.num_outputs, dtype=x.dtype)
        names = [name for name, _ in self.one_step.meta[ALPHA_KEY]]
        with torch.no_grad():
            _, init = self.one_step(lo, hi, spec, bound_upper=False)
        rows = spec.shape[1]
        # a₀ ~ U[0, 1] per neuron, shared by the rows (the thesis' a is per neuron)
        start = [torch.rand(s.shape[0] if s.shape[0] > 1 else x.shape[0], 1, *s.shape[2:],
                            device=x.device, dtype=x.dtype) for s in init]
        weights = [a.expand(a.shape[0], rows, *a.shape[2:]).clone().requires_grad_(True)
                   for a in start]
        out, _ = self.one_step(lo, hi, spec, bound_upper=False, **dict(zip(names, weights)))
        grads = torch.autograd.grad(robust_ce(out.lower), weights)
        eta = self.options.slope_eta
        stepped = [(a - eta * g.sum(1, keepdim=True).sign()).clamp(0.0, 1.0)
                   .expand(-1, rows, *a.shape[2:]) for a, g in zip(start, grads)]
        out, _ = self.one_step(lo, hi, spec, bound_upper=False, **dict(zip(names, stepped)))
        return out.lower

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        beta = linear_ramp(opts.beta_start, opts.beta_end, ctx.progress)
        kappa = linear_ramp(opts.kappa_start, opts.kappa_end, ctx.progress)
        bounds = self.box(x, y, ctx.eps)
        margins = bounds.margins
        if beta > 0:
            tight = self.one_step_margins(x, y, ctx.eps) if self.one_step is not None else \
                self.crown_ibp.certified_forward(x, y, eps=ctx.eps)
            margins = beta * tight + (1 - beta) * margins
        robust = robust_ce(margins)
        natural = F.cross_entropy(self.model(x), y)
        loss = kappa * natural + (1 - kappa) * robust
        metrics = {"robust_loss": robust.item(), "natural_loss": natural.item(),
                   "beta": beta, "kappa": kappa,
                   "cert": float(certified(margins).float().mean())}
        return LossOutput(self.regularized(loss, bounds, ctx, metrics), metrics)
