"""TAPS and STAPS (Mao, Müller, Fischer, Vechev; paper ``001``).

The network is split into a feature extractor ``f_E`` and a classifier ``f_C``
(:func:`certfx.passes.split.split`; by default the last ReLU layer is in the classifier).

* **TAPS loss** (Sec. 3): IBP gives the box ``[z_lo, z_hi]`` of the embedding over ``B^ε(x)``;
  *multi-estimator* PGD runs one attack per class ``i ≠ y`` in that box, each maximizing the
  logit difference ``o_i^Δ = f_C(ẑ)_i − f_C(ẑ)_y``; the per-class worst cases form the loss
  ``L_TAPS = ln(1 + Σ_{i≠y} exp(max_ẑ o_i^Δ))``, i.e. the robust cross-entropy of the margins
  ``m_i = −max_ẑ o_i^Δ``. Gradients reach the extractor through the gradient connector
  (:mod:`certfx.train.gradient_connector`); PGD itself leaves no gradient in the parameters.
* **Objective** (App. A, C): ``L = L_TAPS · L_IBP`` with both factors averaged over the batch
  before multiplying, and the gradient rescaled to
  ``dL/dθ = 2α·dL_TAPS/dθ·L_IBP + (2 − 2α)·dL_IBP/dθ·L_TAPS`` with ``w_TAPS = α/(1 − α)``
  (default 5, so α = 5/6); ``w_TAPS = 1`` (α = 0.5) is the plain product rule.
* **Schedule** (App. D, Algorithm 1): while ε is still annealed (``ε < ε_target``) the loss is
  ``L_IBP + ε/ε_target·λ·(L_tightness + L_relu)`` (Shi et al.'s regularizer); the product loss
  starts once ε reaches its target.
* **STAPS** (App. B): SABR's small box ``B^τ(x')`` (:func:`certfx.train.sabr.sabr_box`)
  replaces the input region everywhere IBP is used: the IBP factor, the extractor's box, and
  the IBP loss while ε anneals.

:meth:`TAPS.taps_margins` is the TAPS estimate of the worst-case margins; the share of examples
where they are all positive is the *TAPS accuracy* of App. E (:func:`taps_accuracy`), a cheap,
unsound proxy of certified accuracy for model selection.

Example:
    >>> import torch
    >>> o = TAPSOptions()
    >>> o.w_taps, o.connector_c, o.split_relus, o.pgd_steps, o.fast_reg_weighting
    (5.0, 0.5, 1, 8, 'grow')
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> taps = TAPS(net, torch.zeros(1, 4))
    >>> taps.cut.node, taps.cut.relus_after
    ('linear_1', 1)
    >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> taps.taps_margins(x, y, eps=0.1).shape       # (batch, classes − 1)
    torch.Size([5, 2])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

__all__ = ["STAPS", "TAPS", "TAPSOptions", "latent_attack", "other_classes", "scaled_product",
           "taps_accuracy"]


def other_classes(y: Tensor, classes: int) -> Tensor:
    """The classes ``i ≠ y`` of every example, ascending, shape ``(B, K − 1)``."""
    every = torch.arange(classes, device=y.device).expand(y.shape[0], classes)
    return every[every != y[:, None]].view(y.shape[0], classes - 1)


def latent_attack(classifier: nn.Module, lo: Tensor, hi: Tensor, y: Tensor, classes: int,
                  steps: int, step_size: float, restarts: int,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-estimator PGD in the box ``[lo, hi]`` (Sec. 3): for each example and each class
    ``i ≠ y`` a point ``ẑ`` maximizing ``o_i^Δ = f_C(ẑ)_i − f_C(ẑ)_y``.

    Returns ``(ẑ, lo_rep, hi_rep)`` with ``B·(K − 1)`` rows ordered example-major (row
    ``b·(K − 1) + j`` attacks ``other_classes(y)[b, j]``); ``ẑ`` is detached, the box repeated
    to match stays differentiable w.r.t. ``lo``/``hi``.
    """
    k = classes - 1
    lo_rep, hi_rep = lo.repeat_interleave(k, dim=0), hi.repeat_interleave(k, dim=0)
    y_rep = y.repeat_interleave(k)
    target = other_classes(y, classes).reshape(-1, 1)

    def logit_difference(logits: Tensor, labels: Tensor) -> Tensor:
        # estimator b·(K−1)+j ascends o^Δ = f_C(ẑ)_target − f_C(ẑ)_y
        return (logits.gather(1, target) - logits.gather(1, labels[:, None]))[:, 0]

    # pgd_box detaches the box and differentiates w.r.t. ẑ only: no parameter gradients
    z_hat = pgd_box(classifier, lo_rep, hi_rep, y_rep, steps=steps, restarts=restarts,
                    step_size=step_size, objective=logit_difference, generator=generator)
    return z_hat, lo_rep, hi_rep


def scaled_product(l_taps: Tensor, l_ibp: Tensor, w_taps: float) -> Tensor:
    """``L_TAPS · L_IBP`` whose gradient is ``2α dL_TAPS·L_IBP + (2 − 2α) dL_IBP·L_TAPS``
    with ``α = w/(1 + w)`` (App. A). The value stays the product.

    Example:
        >>> a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
        >>> loss = scaled_product(a, b, w_taps=5.0)      # α = 5/6
        >>> loss.backward()
        >>> loss.item(), round(a.grad.item(), 4), round(b.grad.item(), 4)
        (6.0, 5.0, 0.6667)
    """
    alpha = w_taps / (1 + w_taps)  # w = α/(1 − α)
    # detach trick: d/dθ of the surrogate is exactly the rescaled gradient of App. A
    surrogate = 2 * alpha * l_taps * l_ibp.detach() + (2 - 2 * alpha) * l_taps.detach() * l_ibp
    # value: L_TAPS·L_IBP (the surrogate's value is the same, but state it exactly)
    return surrogate - surrogate.detach() + (l_taps * l_ibp).detach()


@dataclass(frozen=True)
class TAPSOptions(IBPOptions):
    """TAPS/STAPS hyperparameters (paper ``001``; Sec. 3, App. A, B, D).

    The paper does not state the PGD settings of its latent attack; 8 steps and 1 restart are
    the cheap settings of SABR-style training. STAPS's λ is SABR's default 0.4.
    """

    fast_reg_weighting: str = option("grow", "'grow': λ·ε/ε_t as TAPS's Algorithm 1 writes it; "
                                             "'decay': λ(1−ε/ε_t) (Shi et al.)")
    split_relus: int = option(1, "ReLU layers in the classifier (TAPS's split position; "
                                 "1 in most of Tables 3 and 5)")
    split_at: str | None = option(None, "cut after this graph node instead of --split-relus")
    w_taps: float = option(5.0, "w_TAPS = α/(1−α): the gradient weight of the TAPS factor "
                                "(App. A; 1 is the plain product rule)")
    connector_c: float = option(0.5, "the gradient connector's constant c in [0, 1] "
                                     "(0: binary, 1: linear)")
    pgd_steps: int = option(8, "PGD steps per estimator in the embedding box (and, for "
                               "STAPS, of SABR's attack)")
    pgd_step_size: float = option(0.5, "PGD step as a fraction of the box half-width")
    pgd_restarts: int = option(1, "PGD random restarts")
    lambda_ratio: float = option(0.4, "STAPS only: SABR's box ratio, τ = λε")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_relus < 1:
            raise InvalidValueError(f"split_relus must be >= 1 (0 ReLUs in the classifier is "
                                    f"IBP training: use --method ibp), got {self.split_relus}")
        if not self.w_taps >= 0 or not 0 <= self.connector_c <= 1:
            raise InvalidValueError(f"need w_taps >= 0 and connector_c in [0, 1], got "
                                    f"{self.w_taps} and {self.connector_c}")
        check_pgd_options(self.pgd_steps, self.pgd_step_size, self.pgd_restarts)
        if not 0 < self.lambda_ratio <= 1:
            raise InvalidValueError(f"lambda_ratio must lie in (0, 1], got {self.lambda_ratio}")


@register_method
class TAPS(IntervalTraining):
    """IBP through the extractor, PGD through the classifier, joined by the connector.

    Attributes:
        cut: where the network was split (:class:`certfx.passes.split.CutPoint`).
        extractor, classifier: the two halves (GraphModules sharing the model's parameters).
        extractor_box: the extractor compiled for the box domain (IBP of the embedding).
        classes: the number of classes ``K``.
    """

    name = "taps"
    Options = TAPSOptions
    description = "TAPS (Mao et al. 2023): IBP extractor box + multi-estimator PGD classifier"
    small_box = False  # STAPS: SABR's box as the input region

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # IBP init (option), box compile of the whole model
        opts = self.options
        canonical = certfx.load(self.model, self.example_input)
        parts = split(canonical, relus=None if opts.split_at else opts.split_relus,
                      at=opts.split_at)
        self.cut = parts.cut
        self.extractor, self.classifier = parts.extractor, parts.classifier
        self.extractor_box = certfx.compile(parts.extractor, "box",
                                            LinfBall(0.0, *self.input_range),
                                            example_input=self.example_input)
        self.classes = self.box.cm.num_outputs
        if self.classes < 2:
            raise InvalidValueError(f"TAPS needs at least 2 classes, the model has "
                                    f"{self.classes} output(s)")

    def region(self, x: Tensor, y: Tensor, ctx: StepContext) -> tuple[Tensor, float]:
        """The propagation region's centre and radius: ``B^ε(x)``, or SABR's ``B^τ(x')``."""
        if not self.small_box:
            return x, ctx.eps
        o = self.options
        return sabr_box(self.model, x, y, ctx.eps, o.lambda_ratio, self.input_range,
                        o.pgd_steps, o.pgd_step_size, o.pgd_restarts, ctx.generator)

    def embedding_box(self, x: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
        """``[z_lo, z_hi]``: the IBP box of the extractor's output over ``B^eps(x)``."""
        lo, hi = self.extractor_box.certified_forward(x, eps=eps)
        return lo, hi

    def taps_margins(self, x: Tensor, y: Tensor, eps: float | Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """``m_i = f_C(ẑ_i)_y − f_C(ẑ_i)_i`` per class ``i ≠ y`` (ascending), with ``ẑ_i`` the
        estimator of ``max o_i^Δ`` in the embedding box, shape ``(B, K − 1)``; differentiable
        w.r.t. the classifier directly and the extractor through the connector."""
        o = self.options
        lo, hi = self.embedding_box(x, eps)
        z_hat, lo_rep, hi_rep = latent_attack(self.classifier, lo, hi, y, self.classes,
                                              o.pgd_steps, o.pgd_step_size, o.pgd_restarts,
                                              generator)
        logits = self.classifier(connect(z_hat, lo_rep, hi_rep, o.connector_c))
        target = other_classes(y, self.classes).reshape(-1, 1)
        true = y.repeat_interleave(self.classes - 1)[:, None]
        margins = logits.gather(1, true) - logits.gather(1, target)  # m = −o^Δ
        return margins.view(y.shape[0], self.classes - 1)

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        if ctx.eps <= 0:  # nothing to bound: the natural loss (plus the regularizer's term)
            return self.robust_terms(x, y, 0.0, ctx)
        centre, radius = self.region(x, y, ctx)
        if ctx.eps < ctx.eps_target:  # Algorithm 1: IBP (STAPS: SABR) + L_fast while ε anneals
            return self.robust_terms(centre, y, radius, ctx, clean=x)
        # Algorithm 1, after annealing: batch means of L_IBP and L_TAPS (App. C), then the
        # product with the gradient scaling of App. A
        ibp_margins = self.box.cm.certified_forward(centre, y, eps=radius)
        l_ibp = robust_ce(ibp_margins)
        margins = self.taps_margins(centre, y, radius, ctx.generator)
        l_taps = robust_ce(margins)
        loss = scaled_product(l_taps, l_ibp, opts.w_taps)
        metrics = {"ibp_loss": l_ibp.item(), "taps_loss": l_taps.item(),
                   "box_cert": float(certified(ibp_margins).float().mean()),
                   "taps_cert": float(certified(margins).float().mean())}
        if opts.natural_weight > 0:  # κ·L_nat + (1 − κ)·L, as for IBP (Gowal et al.)
            natural = F.cross_entropy(self.model(x), y)
            loss = opts.natural_weight * natural + (1 - opts.natural_weight) * loss
            metrics["natural_loss"] = natural.item()
        return LossOutput(loss, metrics)


@register_method
class STAPS(TAPS):
    """TAPS with SABR's small box as the input region (App. B)."""

    name = "staps"
    description = "STAPS (Mao et al. 2023): TAPS on SABR's small boxes"
    small_box = True


def taps_accuracy(method_or_model: TAPS | nn.Module, x: Tensor, y: Tensor, eps: float, *,
                  split_relus: int = 1, split_at: str | None = None, batch_size: int = 200,
                  input_range: tuple[float, float] = (0.0, 1.0),
                  generator: torch.Generator | None = None) -> float:
    """App. E's *TAPS accuracy*: the share of examples whose clean prediction is right and all
    of whose latent adversarial examples (one per class ``i ≠ y``, in the IBP box of the
    embedding over ``B^eps(x)``) are classified correctly. Unsound, for model selection only.

    Args:
        method_or_model: a :class:`TAPS`/:class:`STAPS` method (its split and PGD settings are
            used; STAPS is evaluated on the full ε-ball too), or a model, split with
            ``split_relus``/``split_at`` and left as it is (no re-initialization).
        x, y: the examples and their labels.
        eps: the ℓ∞ radius.
        batch_size: examples per attack batch (each becomes ``K − 1`` estimator rows).
        input_range: the valid input range (for a model).
        generator: random numbers for PGD's starts.

    Batch norm uses the running statistics (the canonical graph's semantics).
    """
    if isinstance(method_or_model, TAPS):
        method = method_or_model
    elif isinstance(method_or_model, nn.Module):
        options = TAPSOptions(init="default", split_relus=split_relus, split_at=split_at)
        method = TAPS(method_or_model, x[:1], options, input_range=input_range)
    else:
        raise TypeError(f"taps_accuracy takes a TAPS method or an nn.Module, got "
                        f"{type(method_or_model).__name__}")
    hits = 0
    with torch.no_grad():  # PGD enables gradients w.r.t. ẑ itself
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            clean = method.classifier(method.extractor(xb)).argmax(1) == yb
            margins = method.taps_margins(xb, yb, eps, generator)
            hits += int((clean & certified(margins)).sum())
    return hits / max(x.shape[0], 1)
