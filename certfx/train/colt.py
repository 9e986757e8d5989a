"""COLT: convex layerwise adversarial training (Balunović & Vechev, ICLR 2020; paper ``003``).

Training runs in stages over latent layers ``l = 0, 1, …`` (Algorithm 1). Stage 0 is PGD
adversarial training in the input ball (``C_0(x) = S_0(x)``, Eq. 2). In stage ``l ≥ 1`` the
network ``h = h^{l+1:k} ∘ h^{1:l}`` is cut after its ``l``-th latent layer, by default the output
of its ``l``-th ReLU layer (:func:`certfx.passes.split.split`). The extractor's reachable set over
``B^ε(x)`` is over-approximated by the zonotope ``C_l(x) = {a_l + A_l e : e ∈ [−1, 1]^m}`` of the
DeepZ lowering (Sec. 5, App. A.1), a constant of the step (Sec. 4: "we do not backpropagate
through the convex relaxation"), and PGD looks for a *latent adversarial example* in it by the
change of variables of Sec. 5: ascend in ``e``, clip ``e`` to the cube, so that
``z' = a_l + A_l e`` never leaves the region (:func:`project_to_zonotope`). The loss is the
classifier's cross-entropy at ``z'`` (Eq. 3), mixed with the natural loss.

Schedules and choices (the paper's text where it has one):

* stages: ``epochs_per_stage`` epochs each (default: the run's epochs split evenly; Algorithm 1's
  ``n_epochs`` per layer); the extractor ``h^{1:l}`` is frozen in stage ``l`` (Algorithm 1,
  line 10), and the user's own ``requires_grad`` flags come back when the stage changes;
* ε: 10% above the target at first, 5% less per stage (Sec. 7, "Training"), i.e.
  ``ε_s = ε·max(f_min, 1.1 − 0.05·s)``; the paper states no floor, we keep ``f_min = 1`` (never
  train below the certified radius); ``ε`` is the loop's annealed radius (``ctx.eps``);
* natural-loss mixing (not in paper ``003``; ACE, paper ``000`` App. B: "an initial loss mixing
  period" of 5 of 40 epochs per stage, and a "natural loss component"): the natural weight falls
  linearly from ``mix_start`` to ``natural_weight`` over the first ``mix_fraction`` of a stage;
* L1 (Sec. 7: 10⁻⁵) is the loop's ``TrainConfig(l1=1e-5)``; Adam with learning rate 10⁻³ too;
* memory: ``A_l`` has one column per input pixel plus one per unstable ReLU before the cut
  (batch × m × latent size floats); ``max_error_terms`` folds the smallest into box terms
  (:class:`certfx.domains.ZonotopeOptions`), a sound but coarser region.

Example:
    >>> import torch
    >>> a, A = torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # 2 errors, 2 dims
    >>> e, z = project_to_zonotope(a, A, torch.tensor([[3.0, -1.0]]))
    >>> e.tolist(), z.tolist()
    ([[1.0, -1.0]], [[0.5, -0.5]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import certfx
from certfx.domains import Zonotope, ZonotopeOptions
from certfx.errors import CertfxError, InvalidValueError
from certfx.passes.split import ACTIVATIONS, cut_points, split
from certfx.train.method import LossOutput, Method, StepContext, option, register_method
from certfx.train.pgd import check_pgd_options, pgd_box

__all__ = ["COLT", "COLTOptions", "latent_attack", "latent_point", "mix_weight",
           "project_to_zonotope", "stage_eps_factor"]


def latent_point(center: Tensor, generators: Tensor, e: Tensor) -> Tensor:
    """``z' = a_l + A_l e`` (Sec. 5, "Projection to linear convex regions").

    Args:
        center: ``a_l``, shape ``(B, *shape)``.
        generators: ``A_l``, shape ``(B, m, *shape)``; ``generators[:, i]`` is column ``i``.
        e: the coefficients, shape ``(B, m)``.
    """
    return center + torch.einsum("bm,bm...->b...", e, generators)


def project_to_zonotope(center: Tensor, generators: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """The projection ``Π_{C_l(x)}`` by change of variables (Sec. 5, Fig. 2).

    A point of ``C_l(x) = {a_l + A_l e : e ∈ [−1, 1]^m}`` is given by its coefficients ``e``,
    whose domain is a box: project ``e`` by ``clip(e, −1, 1) = min(max(e, −1), 1)`` and map it
    back, ``z' = a_l + A_l·clip(e, −1, 1)``. Every such ``z'`` lies in the zonotope. (This is the
    projection in ``e``-space, which is what the paper's PGD uses, not the Euclidean projection of
    a point onto the zonotope.)

    Returns:
        ``(clip(e, −1, 1), z')``.
    """
    e = e.clamp(-1.0, 1.0)
    return e, latent_point(center, generators, e)


def stage_eps_factor(stage: int, start: float = 1.1, decay: float = 0.05,
                     floor: float = 1.0) -> float:
    """ε of stage ``s`` relative to the target, ``max(floor, start − decay·s)`` (Sec. 7,
    "Training": 10% above the certified ε at first, 5% less per stage; the floor is ours).

    >>> [stage_eps_factor(s) for s in range(4)], stage_eps_factor(3, floor=0.0)
    ([1.1, 1.05, 1.0, 1.0], 0.95)
    """
    return max(floor, round(start - decay * stage, 10))


def mix_weight(epoch_in_stage: int, stage_epochs: int, start: float, end: float,
               fraction: float) -> float:
    """The natural loss's weight ``κ_t`` in epoch ``t`` of a stage of ``T`` epochs:
    ``κ_t = end + (start − end)·max(0, 1 − t/(fraction·T))`` (ACE App. B's mixing period; the
    first epoch of a stage is always mixed at ``start``).

    >>> [mix_weight(t, 40, 0.5, 0.0, 0.125) for t in (0, 1, 5)], mix_weight(0, 1, 0.5, 0.2, 0)
    ([0.5, 0.4, 0.0], 0.2)
    """
    period = fraction * stage_epochs
    if period <= 0:
        return end
    return end + (start - end) * max(0.0, 1.0 - epoch_in_stage / period)


def latent_attack(classifier: Callable[[Tensor], Tensor], region: Zonotope, y: Tensor,
                  steps: int, step_size: float, generator: torch.Generator | None) -> Tensor:
    """PGD over ``e ∈ [−1, 1]^m`` maximizing the classifier's cross-entropy at ``a_l + A_l e``;
    returns the latent point with the highest loss over all iterates (no gradient).

    Sec. 5 updates ``e ← clip(e + α A_lᵀ ∇_{z'} L, −1, 1)``; by the chain rule through
    ``z' = a_l + A_l e``, ``A_lᵀ ∇_{z'} L = ∇_e L``, which autograd gives directly. We step by its
    sign (ℓ∞ PGD on the cube, Madry et al.), so ``step_size`` is a fraction of the cube's
    half-width whatever the scale of ``A_l``. The start is uniform in the cube (Algorithm 1,
    line 4: ``x'_j ~ C_l(x_j)``).
    """
    center, gens = region.center.detach(), region.generators.detach()
    e = torch.rand((center.shape[0], gens.shape[1]), generator=generator, device=center.device,
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
            e = project_to_zonotope(center, gens, e.detach() + step_size * grad.sign())[0]
    return project_to_zonotope(center, gens, best_e)[1].detach()


class _Stage(NamedTuple):
    """What stage ``l ≥ 1`` needs: DeepZ over the extractor ``h^{1:l}`` (giving ``C_l(x)``),
    the classifier ``h^{l+1:k}``, and the extractor's parameters (frozen in the stage)."""

    region: certfx.CertifiedModule
    classifier: fx.GraphModule
    frozen: list[nn.Parameter]


@dataclass(frozen=True)
class COLTOptions:
    """COLT hyperparameters (paper ``003`` Sec. 5 and 7; ACE App. B for the loss mixing)."""

    latent_layers: tuple[str, ...] | None = option(
        None, "the latent layers of stages 1, 2, … (node names, in graph order; default: the "
              "output of every ReLU layer that is a cut point)")
    epochs_per_stage: int | None = option(None, "epochs per stage (default: the run's epochs "
                                                "split evenly over the stages)")
    pgd_steps: int = option(8, "PGD steps (COLT: in the input ball and in each latent "
                               "region; its paper gives no value)")
    pgd_step_size: float = option(0.25, "PGD step as a fraction of the box half-width (COLT: "
                                        "of ε in stage 0, of the e-cube's half-width 1 later)")
    natural_weight: float = option(0.0, "κ: weight of the natural loss mixed into the robust "
                                        "one (COLT: after each stage's mixing period)")
    mix_start: float = option(0.5, "weight of the natural loss at the start of each stage")
    mix_fraction: float = option(0.125, "fraction of each stage over which the natural weight "
                                        "falls to κ (ACE App. B: 5 of 40 epochs)")
    eps_factor_start: float = option(1.1, "ε factor of stage 0 (Sec. 7: 10 percent above the "
                                          "target)")
    eps_factor_decay: float = option(0.05, "ε factor decrease per stage (Sec. 7: 5 percent)")
    eps_factor_min: float = option(1.0, "lowest ε factor (the paper states none; 0: no floor)")
    freeze: bool = option(True, "freeze the layers before the latent layer in each stage")
    max_error_terms: int | None = option(None, "bound the zonotope's error terms (memory); "
                                               "the smallest are folded into box terms")

    def __post_init__(self) -> None:
        if self.epochs_per_stage is not None and self.epochs_per_stage < 1:
            raise InvalidValueError("epochs_per_stage must be >= 1")
        if self.latent_layers is not None and not self.latent_layers:
            raise InvalidValueError("latent_layers must name at least one node (or be None)")
        check_pgd_options(self.pgd_steps, self.pgd_step_size)
        if not (0 <= self.natural_weight <= 1 and 0 <= self.mix_start <= 1
                and 0 <= self.mix_fraction <= 1):
            raise InvalidValueError("natural_weight, mix_start and mix_fraction must be in "
                                    "[0, 1]")
        if not self.eps_factor_start > 0 or self.eps_factor_decay < 0 or self.eps_factor_min < 0:
            raise InvalidValueError("need eps_factor_start > 0, eps_factor_decay >= 0 and "
                                    "eps_factor_min >= 0")
        if self.max_error_terms is not None and self.max_error_terms < 1:
            raise InvalidValueError("max_error_terms must be >= 1 or None")


@register_method
class COLT(Method):
    """Layerwise adversarial training in zonotope regions of latent layers."""

    name = "colt"
    Options = COLTOptions
    description = "COLT (Balunović & Vechev 2020): PGD in zonotope regions of latent layers"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.canonical = certfx.load(self.model, self.example_input)
        self.latent = self._latent_layers(self.options.latent_layers)
        self.stage, self.epoch_in_stage, self.stage_epochs = 0, 0, 1
        self._parts: dict[int, _Stage] = {}
        # the user's own flags: parameters frozen before training stay frozen in every stage
        self._trainable = {p: p.requires_grad for p in self.model.parameters()}

    def _latent_layers(self, names: tuple[str, ...] | None) -> list[str]:
        """The FX names of the latent layers, checked to be cut points in graph order."""
        order = {n.name: i for i, n in enumerate(self.canonical.graph.nodes)}
        if names is None:
            # the output of every activation layer that is a cut point (inside a residual block
            # none is: those layers are skipped)
            valid = {p.node for p in cut_points(self.canonical)}
            latent = [n.name for n in self.canonical.graph.nodes if n.op == "call_function"
                      and n.target in ACTIVATIONS and n.name in valid]
            if not latent:
                raise CertfxError("COLT needs a ReLU layer whose output is a cut point of the "
                                  "network; this one has none (see certfx.passes.split), or "
                                  "name the latent layers with latent_layers")
            return latent
        # split() raises with the list of valid cut points; it resolves ONNX node names too
        latent = [split(self.canonical, at=name).cut.node for name in names]
        if any(order[a] >= order[b] for a, b in pairwise(latent)):
            raise InvalidValueError(f"COLT's latent_layers must be distinct and in graph order "
                                    f"(each stage freezes more of the network), got {names}")
        return latent

    @property
    def stages(self) -> int:
        """The number of stages: the input and every latent layer."""
        return 1 + len(self.latent)

    def stage_of(self, epoch: int) -> tuple[int, int, int]:
        """``(stage, epoch within it, epochs per stage)`` of ``epoch``; the last stage runs
        until training ends."""
        per = self.options.epochs_per_stage or max(
            1, math.ceil((self.total_epochs or self.stages) / self.stages))
        stage = min(epoch // per, self.stages - 1)
        return stage, epoch - stage * per, per

    def stage_eps(self, eps: float) -> float:
        """``ε_s = ε·max(f_min, f_0 − δ·s)`` of the current stage (Sec. 7)."""
        o = self.options
        return eps * stage_eps_factor(self.stage, o.eps_factor_start, o.eps_factor_decay,
                                      o.eps_factor_min)

    def _part(self, stage: int) -> _Stage:
        """The split at latent layer ``stage`` (built and compiled once, then cached)."""
        if stage not in self._parts:
            extractor, classifier, _ = split(self.canonical, at=self.latent[stage - 1])
            zopts = ZonotopeOptions(max_error_terms=self.options.max_error_terms)
            region = self.compile("deepz", model=extractor, domain_options=zopts)
            self._parts[stage] = _Stage(region, classifier, list(extractor.parameters()))
        return self._parts[stage]

    def on_epoch_start(self, epoch: int) -> None:
        self.stage, self.epoch_in_stage, self.stage_epochs = self.stage_of(epoch)
        self._restore_flags()
        if self.stage > 0 and self.options.freeze:
            # Algorithm 1, line 10: θ_1 … θ_l stay fixed; their grads stay None, so Adam
            # (which skips parameters without a gradient) leaves them, momentum included
            for p in self._part(self.stage).frozen:
                p.requires_grad_(False)

    def on_train_end(self) -> None:
        self._restore_flags()

    def _restore_flags(self) -> None:
        for p, flag in self._trainable.items():
            p.requires_grad_(flag)

    def region(self, x: Tensor, eps: float) -> Zonotope:
        """``C_l(x)`` of the current stage ``l ≥ 1``: DeepZ through ``h^{1:l}`` over
        ``B^eps(x) ∩ [lo, hi]``, without gradients."""
        with torch.no_grad():
            out = self._part(self.stage).region.certified_forward(x, eps=eps)
        assert isinstance(out, Zonotope)
        return out

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        o = self.options
        eps = self.stage_eps(ctx.eps)
        kappa = mix_weight(self.epoch_in_stage, self.stage_epochs, o.mix_start,
                           o.natural_weight, o.mix_fraction)
        if self.stage == 0 or eps <= 0:
            # stage 0, Eq. 2 (C_0 = S_0): max over x' ∈ B^ε_s(x) ∩ [0, 1] of L(h(x'), y)
            lo, hi = (x - eps).clamp(*self.input_range), (x + eps).clamp(*self.input_range)
            xa = pgd_box(self.model, lo, hi, y, steps=o.pgd_steps, step_size=o.pgd_step_size,
                         generator=ctx.generator) if eps > 0 else x
            adversarial = F.cross_entropy(self.model(xa), y)
        else:
            # stage l, Eq. 3: max over z' ∈ C_l(x) of L(h^{l+1:k}(z'), y); z' is a constant,
            # so the gradient reaches the classifier's parameters only
            classifier = self._part(self.stage).classifier
            z = latent_attack(classifier, self.region(x, eps), y, o.pgd_steps,
                              o.pgd_step_size, ctx.generator)
            adversarial = F.cross_entropy(classifier(z), y)
        # L = κ·L_nat + (1 − κ)·L_adv
        loss = adversarial
        metrics = {"adversarial_loss": adversarial.item(), "stage": float(self.stage),
                   "stage_eps": eps, "natural_weight": kappa}
        if kappa > 0:
            natural = F.cross_entropy(self.model(x), y)
            loss = kappa * natural + (1 - kappa) * adversarial
            metrics["natural_loss"] = natural.item()
        return LossOutput(loss, metrics)
