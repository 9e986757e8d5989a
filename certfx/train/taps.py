"""TAPS and STAPS (Mao, Müller, Fischer, Vechev; paper ``001``).

The network is split into a feature extractor ``f_E`` and a classifier ``f_C``
(:func:`certfx.passes.split.split`, by default with the last ReLU layer in the classifier).

* **TAPS loss** (Sec. 3): IBP gives the box ``[z_lo, z_hi]`` of the embedding over ``B^ε(x)``;
  *multi-estimator* PGD runs one attack per class ``i ≠ y`` in that box, each maximizing the
  logit difference ``f_C(ẑ)_i − f_C(ẑ)_y``; the per-class worst cases form the loss
  ``L_TAPS = ln(1 + Σ_{i≠y} exp(max_ẑ f_C(ẑ)_i − f_C(ẑ)_y))``. Gradients reach the extractor
  through the gradient connector (:mod:`certfx.train.gradient_connector`).
* **Objective** (App. A, C): ``L = L_TAPS · L_IBP`` with both factors averaged over the batch
  before multiplying, and the gradient rescaled to
  ``2α·dL_TAPS·L_IBP + (2 − 2α)·dL_IBP·L_TAPS`` with ``w_TAPS = α/(1 − α)`` (default 5).
* **Schedule** (App. D, Algorithm 1): while ε is still annealed (``ε < ε_target``) the loss is
  IBP plus Shi et al.'s regularizer; the product loss starts once ε reaches its target.
* **STAPS** (App. B): SABR's small box ``B^τ(x')`` (:mod:`certfx.train.sabr`) replaces the
  input region, both for the extractor's box and for the IBP factor.

:meth:`TAPS.taps_margins` is the TAPS estimate of the worst-case margins; the rate at which all
are positive is the *TAPS accuracy* proxy of App. E for model selection (:func:`taps_accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import certfx
from certfx.errors import InvalidValueError
from certfx.passes.split import split
from certfx.specs import LinfBall
from certfx.train.gradient_connector import connect
from certfx.train.ibp import IBPOptions, IntervalTraining
from certfx.train.losses import certified, robust_ce
from certfx.train.method import LossOutput, StepContext, option, register_method
from certfx.train.pgd import check_pgd_options, pgd_box
from certfx.train.sabr import sabr_box

__all__ = ["STAPS", "TAPS", "TAPSOptions", "latent_attack", "scaled_product", "taps_accuracy"]


def latent_attack(classifier: nn.Module, lo: Tensor, hi: Tensor, y: Tensor, classes: int,
                  steps: int, step_size: float, restarts: int,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-estimator PGD in the box ``[lo, hi]``: for each example and each class ``i ≠ y``
    a point maximizing ``f_C(ẑ)_i − f_C(ẑ)_y``.

    Returns ``(ẑ, lo_rep, hi_rep)`` with ``B·(K − 1)`` rows ordered example-major, and the box
    repeated to match (differentiable w.r.t. ``lo``/``hi``)."""
    B = y.shape[0]
    others = torch.arange(classes, device=y.device).expand(B, classes)
    others = others[others != y[:, None]].view(B, classes - 1)
    lo_rep = lo.repeat_interleave(classes - 1, dim=0)
    hi_rep = hi.repeat_interleave(classes - 1, dim=0)
    y_rep = y.repeat_interleave(classes - 1)
    target = others.reshape(-1)

    def objective(logits: Tensor, _: Tensor) -> Tensor:
        return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, y_rep[:, None])[:, 0]

    z_hat = pgd_box(classifier, lo_rep, hi_rep, y_rep, steps=steps, restarts=restarts,
                    step_size=step_size, objective=objective, generator=generator)
    return z_hat, lo_rep, hi_rep


def scaled_product(l_taps: Tensor, l_ibp: Tensor, w_taps: float) -> Tensor:
    """``L_TAPS · L_IBP`` whose gradient is ``2α dL_TAPS L_IBP + (2 − 2α) dL_IBP L_TAPS``,
    ``α = w/(1 + w)`` (App. A). The value stays the product."""
    alpha = w_taps / (1 + w_taps)
    surrogate = 2 * alpha * l_taps * l_ibp.detach() + (2 - 2 * alpha) * l_taps.detach() * l_ibp
    return surrogate - surrogate.detach() + (l_taps * l_ibp).detach()


@dataclass(frozen=True)
class TAPSOptions(IBPOptions):
    """TAPS/STAPS hyperparameters (paper ``001``; App. A, D)."""

    split_relus: int = option(1, "ReLU layers in the classifier (TAPS's split position)")
    split_at: str | None = option(None, "cut after this graph node instead of --split-relus")
    w_taps: float = option(5.0, "w_TAPS = α/(1−α): the gradient weight of the TAPS factor")
    connector_c: float = option(0.5, "the gradient connector's constant c in [0, 1]")
    pgd_steps: int = option(8, "PGD steps per estimator in the embedding box")
    pgd_step_size: float = option(0.5, "PGD step as a fraction of the box half-width")
    pgd_restarts: int = option(1, "PGD random restarts")
    lambda_ratio: float = option(0.4, "STAPS only: SABR's box ratio τ = λε")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_relus < 1 or self.w_taps < 0 or not 0 <= self.connector_c <= 1:
            raise InvalidValueError("need split_relus >= 1, w_taps >= 0, connector_c in [0, 1]")
        check_pgd_options(self.pgd_steps, self.pgd_step_size, self.pgd_restarts)
        if not 0 < self.lambda_ratio <= 1:
            raise InvalidValueError(f"lambda_ratio must lie in (0, 1], got {self.lambda_ratio}")


@register_method
class TAPS(IntervalTraining):
    """IBP through the extractor, PGD through the classifier, joined by the connector."""

    name = "taps"
    Options = TAPSOptions
    description = "TAPS (Mao et al. 2023): IBP extractor box + multi-estimator PGD classifier"
    small_box = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opts = self.options
        canonical = certfx.load(self.model, self.example_input)
        parts = split(canonical, relus=None if opts.split_at else opts.split_relus,
                      at=opts.split_at)
        self.cut = parts.cut
        self.classifier = parts.classifier
        self.extractor_box = certfx.compile(parts.extractor, "box",
                                            LinfBall(0.0, *self.input_range),
                                            example_input=self.example_input)
        self.classes = int(canonical.meta["certfx.output_shape"][0])

    def _region(self, x: Tensor, y: Tensor, ctx: StepContext) -> tuple[Tensor, float]:
        """The input region's centre and radius: ``B^ε(x)``, or SABR's box for STAPS."""
        if not self.small_box:
            return x, ctx.eps
        o = self.options
        return sabr_box(self.model, x, y, ctx.eps, o.lambda_ratio, self.input_range,
                        o.pgd_steps, 0.5, 1, ctx.generator)

    def taps_margins(self, x: Tensor, y: Tensor, eps: float, generator=None) -> Tensor:
        """Per class ``i ≠ y`` the PGD estimate of ``min f_C(ẑ)_y − f_C(ẑ)_i`` over the
        embedding box, shape ``(B, K − 1)``; differentiable (connector) w.r.t. the model."""
        o = self.options
        lo, hi = self.extractor_box.certified_forward(x, eps=eps)
        z_hat, lo_rep, hi_rep = latent_attack(self.classifier, lo, hi, y, self.classes,
                                              o.pgd_steps, o.pgd_step_size, o.pgd_restarts,
                                              generator)
        logits = self.classifier(connect(z_hat, lo_rep, hi_rep, o.connector_c))
        y_rep = y.repeat_interleave(self.classes - 1)
        B = y.shape[0]
        others = torch.arange(self.classes, device=y.device).expand(B, -1)
        others = others[others != y[:, None]]
        margins = logits.gather(1, y_rep[:, None])[:, 0] - logits.gather(1, others[:, None])[:, 0]
        return margins.view(B, self.classes - 1)

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        if ctx.eps <= 0 or ctx.eps < ctx.eps_target:  # Algorithm 1: IBP while ε anneals
            return self.robust_terms(x, y, ctx.eps, ctx)
        centre, radius = self._region(x, y, ctx)
        ibp = self.robust_terms(centre, y, radius, ctx, clean=x)
        margins = self.taps_margins(centre, y, radius, ctx.generator)
        l_taps = robust_ce(margins)
        loss = scaled_product(l_taps, ibp.loss, self.options.w_taps)
        metrics = {**ibp.metrics, "ibp_loss": ibp.loss.item(), "taps_loss": l_taps.item(),
                   "taps_cert": float(certified(margins).float().mean())}
        return LossOutput(loss, metrics)


@register_method
class STAPS(TAPS):
    """TAPS with SABR's small box as the input region (App. B)."""

    name = "staps"
    description = "STAPS: TAPS on SABR's small boxes"
    small_box = True


def taps_accuracy(method: TAPS, x: Tensor, y: Tensor, eps: float, batch_size: int = 200
                  ) -> float:
    """App. E's *TAPS accuracy*: the share of examples whose TAPS margin estimates are all
    positive (an unsound but cheap proxy of certified accuracy, for model selection)."""
    hits = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            margins = method.taps_margins(x[i:i + batch_size], y[i:i + batch_size], eps)
            hits += int(certified(margins).sum())
    return hits / max(x.shape[0], 1)
