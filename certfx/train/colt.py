"""COLT: convex layerwise adversarial training (Balunović & Vechev, ICLR 2020; paper ``003``).

Training runs in stages over latent layers ``l = 0, 1, …`` (Algorithm 1). Stage 0 is PGD
adversarial training in the input ball. In stage ``l ≥ 1`` the network is cut after its
``l``-th ReLU layer (:func:`certfx.passes.split.split`); the extractor's reachable set over
``B^ε(x)`` is over-approximated by the zonotope ``C_l(x) = {a_l + A_l e : e ∈ [−1, 1]^m}``
computed by the DeepZ lowering (App. A; no gradients flow through it, Sec. 4: "we do not
backpropagate through the convex relaxation"), and PGD searches a *latent adversarial example*
in it by the change of variables of Sec. 5: ascend in ``e`` and clip it to ``[−1, 1]^m``, so that
``z' = a_l + A_l e`` never leaves the region (:func:`latent_point`). The loss is the classifier's
cross-entropy at ``z'``, mixed with the natural loss at the start of each stage (ACE App. B: a
loss-mixing period). The extractor's parameters are frozen during stage ``l`` (Algorithm 1,
line 10: layers of earlier stages stay fixed), and ε starts 10% above the target and drops by 5%
per stage (Sec. 7, "Training"), here never below the target.

Example:
    >>> import torch
    >>> a, A = torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # 2 errors, 2 dims
    >>> latent_point(a, A, torch.tensor([[1.0, -1.0]])).tolist()
    [[0.5, -0.5]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import certfx
from certfx.domains import Zonotope, ZonotopeOptions
from certfx.errors import CertfxError, InvalidValueError
from certfx.passes.split import ACTIVATIONS, cut_points, split
from certfx.specs import LinfBall
from certfx.train.method import LossOutput, Method, StepContext, option, register_method
from certfx.train.pgd import check_pgd_options, pgd_box

__all__ = ["COLT", "COLTOptions", "latent_attack", "latent_point", "stage_eps_factor"]


def latent_point(center: Tensor, generators: Tensor, e: Tensor) -> Tensor:
    """``z' = a_l + A_l e`` (Sec. 5, "Projection to linear convex regions"; the region
    ``C_l(x) = {a_l + A_l e : e ∈ [−1, 1]^m}`` of Sec. 5 / App. A.1): ``center (B, *shape)``,
    ``generators (B, m, *shape)`` (``generators[:, i]`` is column ``i`` of ``A_l``), ``e (B, m)``.
    Every ``e`` in the cube gives a point of the zonotope, so clipping ``e`` is the projection."""
    return center + torch.einsum("bm,bm...->b...", e, generators)


def stage_eps_factor(stage: int, start: float = 1.1, decay: float = 0.05) -> float:
    """ε of stage ``s`` relative to the target, ``max(1, start − decay·s)`` (Sec. 7,
    "Training": 10% above the certified ε at first, 5% less per stage).

    >>> [stage_eps_factor(s) for s in range(4)]
    [1.1, 1.05, 1.0, 1.0]
    """
    return max(1.0, round(start - decay * stage, 10))


def latent_attack(classifier: Callable[[Tensor], Tensor], region: Zonotope, y: Tensor,
                  steps: int, step_size: float, generator: torch.Generator | None) -> Tensor:
    """PGD over ``e ∈ [−1, 1]^m`` maximizing the classifier's cross-entropy at ``a + A e``:
    sign steps of ``step_size`` in ``e``, clipped to the cube (the projection of Sec. 5).

    Sec. 5 updates ``e ← clip(e + α A_lᵀ ∇_{z'} L, −1, 1)``; by the chain rule through
    ``z' = a_l + A_l e`` that gradient is ``∇_e L``, which autograd gives directly. Its sign
    (ℓ∞ PGD, Madry et al.) makes ``step_size`` independent of the scale of ``A_l``. The start is
    uniform in the cube (Algorithm 1, line 4: ``z' ~ C_l(x)``)."""
    center, gens = region.center.detach(), region.generators.detach()
    m = gens.shape[1]
    e = torch.rand((center.shape[0], m), generator=generator, device=center.device,
                   dtype=center.dtype) * 2 - 1
    best_e, best = e.clone(), torch.full_like(y, -math.inf, dtype=center.dtype)
    for i in range(steps + 1):
        e.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(classifier(latent_point(center, gens, e)), y,
                                   reduction="none")
            grad = torch.autograd.grad(loss.sum(), e)[0] if i < steps else None
        better = loss.detach() > best
        best = torch.where(better, loss.detach(), best)
        best_e = torch.where(better[:, None], e.detach(), best_e)
        if grad is not None:
            e = (e.detach() + step_size * grad.sign()).clamp(-1, 1)
    return latent_point(center, gens, best_e).detach()


class _Stage(NamedTuple):
    """What stage ``l ≥ 1`` needs: DeepZ over the extractor ``h^{1:l}`` (giving ``C_l(x)``),
    the classifier ``h^{l+1:k}``, and the extractor's parameters (frozen in the stage)."""

    region: Any                      # certfx.CertifiedModule of the extractor
    classifier: fx.GraphModule
    frozen: list[nn.Parameter]


@dataclass(frozen=True)
class COLTOptions:
    """COLT hyperparameters (paper ``003`` Sec. 5 and 7; ACE App. B for the loss mixing)."""

    epochs_per_stage: int | None = option(None, "epochs per latent layer (default: the run's "
                                                "epochs split evenly over the stages)")
    pgd_steps: int = option(8, "PGD steps in the input ball (stage 0) and latent region")
    pgd_step_size: float = option(0.25, "PGD step: a fraction of ε in stage 0, of the e-cube "
                                        "half-width in later stages")
    natural_weight: float = option(0.5, "weight of the natural loss at the start of a stage; "
                                        "it falls linearly to 0 over the stage's first half")
    eps_factor_start: float = option(1.1, "ε factor of stage 0 (10% above the target)")
    eps_factor_decay: float = option(0.05, "ε factor decrease per stage")
    freeze: bool = option(True, "freeze the layers before the latent layer in each stage")
    max_error_terms: int | None = option(None, "bound the zonotope's error terms (memory); "
                                               "the smallest are merged into a box term")

    def __post_init__(self) -> None:
        if self.epochs_per_stage is not None and self.epochs_per_stage < 1:
            raise InvalidValueError("epochs_per_stage must be >= 1")
        check_pgd_options(self.pgd_steps, self.pgd_step_size)
        if not 0 <= self.natural_weight <= 1 or self.eps_factor_start < 1:
            raise InvalidValueError("need 0 <= natural_weight <= 1 and eps_factor_start >= 1")


@register_method
class COLT(Method):
    """Layerwise adversarial training in zonotope regions of latent layers."""

    name = "colt"
    Options = COLTOptions
    description = "COLT (Balunović & Vechev 2020): PGD in zonotope regions of latent layers"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        canonical = certfx.load(self.model, self.example_input)
        valid = {p.node for p in cut_points(canonical)}
        acts = [n.name for n in canonical.graph.nodes if n.op == "call_function"
                and n.target in ACTIVATIONS]
        # latent layers: the output of every activation layer that is a cut point (inside a
        # residual block none is, and those layers are skipped)
        self.latent = [name for name in acts if name in valid]
        if not self.latent:
            raise CertfxError("COLT needs a ReLU layer whose output is a cut point of the "
                              "network; this one has none (see certfx.passes.split)")
        self.canonical = canonical
        self.stage, self.epoch_in_stage, self.stage_epochs = 0, 0, 1
        self._parts: dict[int, _Stage] = {}
        # the user's own flags: parameters frozen before training stay frozen in every stage
        self._trainable = {p: p.requires_grad for p in self.model.parameters()}

    @property
    def stages(self) -> int:
        return 1 + len(self.latent)

    def stage_of(self, epoch: int) -> tuple[int, int, int]:
        """``(stage, epoch within it, epochs per stage)`` of ``epoch``."""
        per = self.options.epochs_per_stage or max(
            1, math.ceil((self.total_epochs or self.stages) / self.stages))
        return min(epoch // per, self.stages - 1), epoch % per, per

    def _part(self, stage: int) -> _Stage:
        """The split at latent layer ``stage`` (built once, then cached)."""
        if stage not in self._parts:
            extractor, classifier, _ = split(self.canonical, at=self.latent[stage - 1])
            zopts = ZonotopeOptions(max_error_terms=self.options.max_error_terms)
            box = certfx.compile(extractor, "deepz", LinfBall(0.0, *self.input_range),
                                 example_input=self.example_input, domain_options=zopts)
            self._parts[stage] = _Stage(box, classifier, list(extractor.parameters()))
        return self._parts[stage]

    def on_epoch_start(self, epoch: int) -> None:
        self.stage, self.epoch_in_stage, self.stage_epochs = self.stage_of(epoch)
        self._restore_flags()
        if self.stage > 0 and self.options.freeze:
            for p in self._part(self.stage).frozen:
                p.requires_grad_(False)

    def on_train_end(self) -> None:
        self._restore_flags()

    def _restore_flags(self) -> None:
        for p, flag in self._trainable.items():
            p.requires_grad_(flag)

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        o = self.options
        # ε_s = ε · max(1, 1.1 − 0.05·s)
        eps = ctx.eps * stage_eps_factor(self.stage, o.eps_factor_start, o.eps_factor_decay)
        # κ = κ₀ · max(0, 1 − t/(T/2)) at epoch t of a stage of T epochs (the mixing period)
        half = max(self.stage_epochs / 2, 1e-9)
        kappa = o.natural_weight * max(0.0, 1 - self.epoch_in_stage / half)
        if self.stage == 0 or eps <= 0:
            # stage 0, Eq. 2 (C_0 = S_0): max over x' ∈ B^ε_s(x) ∩ [0, 1] of L(h(x'), y)
            lo, hi = (x - eps).clamp(*self.input_range), (x + eps).clamp(*self.input_range)
            xa = pgd_box(self.model, lo, hi, y, steps=o.pgd_steps, step_size=o.pgd_step_size,
                         generator=ctx.generator) if eps > 0 else x
            adversarial = F.cross_entropy(self.model(xa), y)
        else:
            # stage l, Eq. 3: max over z' ∈ C_l(x) of L(h^{l+1:k}(z'), y), where
            # C_l(x) = a_l + A_l·[−1, 1]^m is DeepZ over B^ε_s(x) ∩ [0, 1], a constant of the
            # step (Sec. 4: no backpropagation through the relaxation)
            box, classifier = self._part(self.stage)[:2]
            with torch.no_grad():
                lo, hi = box.input_bounds(x, eps)
                region = box.bounds(lo, hi)
            z = latent_attack(classifier, region, y, o.pgd_steps, o.pgd_step_size,
                              ctx.generator)
            adversarial = F.cross_entropy(classifier(z), y)
        # L = κ·L_nat + (1 − κ)·L_adv
        loss = adversarial
        metrics = {"adversarial_loss": adversarial.item(), "stage": float(self.stage),
                   "stage_eps": eps}
        if kappa > 0:
            natural = F.cross_entropy(self.model(x), y)
            loss = kappa * natural + (1 - kappa) * adversarial
            metrics["natural_loss"] = natural.item()
        return LossOutput(loss, metrics)
