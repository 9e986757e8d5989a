"""IBP training (Gowal et al. 2018) with the initialization and warm-up regularizers of Shi et
al. (2021), as TAPS (paper ``001``, App. D, Algorithm 1) and SABR use them.

* Loss: the robust cross-entropy of the interval bounds on the margins over ``B^ε(x)``
  (:func:`certfx.train.losses.robust_ce`), optionally mixed with the natural loss
  (``κ·L_nat + (1 − κ)·L_rob``, Gowal et al. Eq. 7).
* IBP initialization (Shi et al., Sec. 3.2): ``w ~ N(0, σ²)`` with ``σ = √(2π)/n`` for fan-in
  ``n``, biases 0. Then ``E Σ_j |w_ij| = n·σ·√(2/π) = 2``, which cancels the halving of the
  box radius by an unstable ReLU, so box widths neither explode nor vanish with depth.
* Warm-up regularizers (Shi et al., Sec. 3.3), with ``τ`` the tolerance and, for each ReLU's
  input box ``[l, u]`` with centres ``c = (l+u)/2`` and radii ``r = (u−l)/2``:
  - tightness: ``relu(τ − mean(r₀)/mean(r_i))/τ``, with ``r₀`` the radius entering the first
    layer — penalizes boxes growing across layers;
  - ReLU balance: the ratio of the mean centres of active (``l > 0``) and inactive (``u < 0``)
    neurons, and of their summed squared deviations from the layer mean, each folded into
    ``(0, 1]`` by ``min(ρ, 1/ρ)``, penalized by ``relu(τ − ρ)/τ`` — keeps IBP from killing ReLUs.
  Their mean over layers is added with weight ``λ·(1 − ε/ε_target)`` while ε ramps up (Shi et
  al.), or ``λ·ε/ε_target`` as TAPS's Algorithm 1 writes it (``fast_reg_weighting="grow"``);
  0 once ε reaches its target.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> ibp_init_(net)
    2
    >>> w, b = net[1].weight.detach(), net[1].bias.detach()
    >>> abs(float(w.std()) - (2 * 3.14159) ** 0.5 / 4) < 0.3, float(b.abs().max())
    (True, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certfx.domains import Interval
from certfx.errors import InvalidValueError
from certfx.train.losses import certified, robust_ce
from certfx.train.method import (
    ActivationBounds,
    BoundsAndActivations,
    LossOutput,
    Method,
    StepContext,
    option,
    register_method,
)

__all__ = ["IBP", "IBPOptions", "fast_reg_weight", "fast_regularizer", "ibp_init_"]


def ibp_init_(model: nn.Module) -> int:
    """Shi et al.'s IBP initialization of every linear and conv layer; returns their number."""
    count = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
            count += 1
    return count


def _balance(a: Tensor, b: Tensor) -> Tensor:
    """``min(a/b, b/a)`` for positive ``a``, ``b``: 1 when balanced, → 0 when one dominates."""
    ratio = a / b.clamp_min(1e-12)
    return torch.minimum(ratio, 1 / ratio.clamp_min(1e-12))


def fast_regularizer(activations: list[Interval], first_input: Interval, tol: float = 0.5
                     ) -> Tensor:
    """``L_tightness + L_relu`` of Shi et al. (2021), averaged over the ReLU layers."""
    r0 = ((first_input.upper - first_input.lower) / 2).mean()
    total = r0.new_zeros(())
    for box in activations:
        c, r = (box.upper + box.lower) / 2, (box.upper - box.lower) / 2
        total = total + F.relu(tol - r0 / r.mean().clamp_min(1e-12)) / tol
        active, inactive = (box.lower > 0).to(c.dtype), (box.upper < 0).to(c.dtype)
        deviation = (c - c.mean()) ** 2
        mean_ratio = _balance((c * active).mean(), -(c * inactive).mean())
        var_ratio = _balance((deviation * active).sum(), (deviation * inactive).sum())
        relu_term = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if bool(torch.isfinite(relu_term)):  # a layer with no active or inactive neuron
            total = total + relu_term
    return total / max(len(activations), 1)


def fast_reg_weight(weight: float, ctx: StepContext, weighting: str = "decay") -> float:
    """The regularizer's weight at this step: ``λ(1 − ε/ε_t)`` (Shi et al.) or ``λ ε/ε_t``
    (TAPS Alg. 1) while ε < ε_t, else 0."""
    if weight == 0 or ctx.eps_target <= 0 or ctx.eps >= ctx.eps_target:
        return 0.0
    ratio = ctx.eps / ctx.eps_target
    return weight * (1 - ratio if weighting == "decay" else ratio)


@dataclass(frozen=True)
class IBPOptions:
    """IBP hyperparameters (defaults: Shi et al. 2021 as used by TAPS App. D)."""

    init: str = option("ibp", "weight initialization: 'ibp' (Shi et al.) or 'default' "
                              "(PyTorch's)")
    fast_reg: float = option(0.5, "weight λ of Shi et al.'s warm-up regularizers (0: off)")
    fast_reg_tol: float = option(0.5, "tolerance τ of the warm-up regularizers")
    fast_reg_weighting: str = option("decay", "'decay': λ(1−ε/ε_t) (Shi et al.); 'grow': "
                                              "λ·ε/ε_t (TAPS Algorithm 1)")
    natural_weight: float = option(0.0, "κ: weight of the natural loss mixed into the robust "
                                        "one (Gowal et al.)")

    def __post_init__(self) -> None:
        if self.init not in ("ibp", "default"):
            raise InvalidValueError(f"init must be 'ibp' or 'default', got {self.init!r}")
        if self.fast_reg_weighting not in ("decay", "grow"):
            raise InvalidValueError("fast_reg_weighting must be 'decay' or 'grow'")
        if self.fast_reg < 0 or not self.fast_reg_tol > 0 or not 0 <= self.natural_weight <= 1:
            raise InvalidValueError("need fast_reg >= 0, fast_reg_tol > 0, 0 <= natural_weight "
                                    "<= 1")


class IntervalTraining(Method):
    """Shared by IBP and SABR: box bounds with the ReLU input boxes exposed, the warm-up
    regularizers and the natural-loss mix."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options.init == "ibp":
            ibp_init_(self.model)
        self.box = ActivationBounds(self.compile("box"))

    def regularized(self, loss: Tensor, bounds: BoundsAndActivations, ctx: StepContext,
                    metrics: dict[str, float]) -> Tensor:
        """``loss`` plus Shi et al.'s warm-up regularizer at this step's weight."""
        opts = self.options
        weight = fast_reg_weight(opts.fast_reg, ctx, opts.fast_reg_weighting)
        if weight <= 0:
            return loss
        reg = fast_regularizer(bounds.activations, bounds.first_layer_input, opts.fast_reg_tol)
        metrics["fast_reg"] = reg.item()
        return loss + weight * reg

    def robust_terms(self, x: Tensor, y: Tensor, eps: float | Tensor, ctx: StepContext,
                     clean: Tensor | None = None,
                     bounds: BoundsAndActivations | None = None) -> LossOutput:
        """The (regularized, mixed) robust loss over ``B^eps(x)``; ``clean`` are the clean
        inputs for the natural term (default ``x``); ``bounds``: this batch's box bounds if
        the caller computed them already."""
        opts = self.options
        if bounds is None:
            bounds = self.box(x, y, eps)
        loss = robust_ce(bounds.margins)
        metrics = {"robust_loss": loss.item(), "box_cert": float(certified(
            bounds.margins).float().mean())}
        loss = self.regularized(loss, bounds, ctx, metrics)
        if opts.natural_weight > 0:
            natural = F.cross_entropy(self.model(x if clean is None else clean), y)
            loss = opts.natural_weight * natural + (1 - opts.natural_weight) * loss
            metrics["natural_loss"] = natural.item()
        return LossOutput(loss, metrics)


@register_method
class IBP(IntervalTraining):
    """Interval bound propagation over the whole ε-ball."""

    name = "ibp"
    Options = IBPOptions
    description = "IBP (Gowal et al. 2018) with Shi et al. (2021) init and regularizers"

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        return self.robust_terms(x, y, ctx.eps, ctx)
