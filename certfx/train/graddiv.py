"""GradDiv: gradient-diversity regularization of randomized networks (thesis Sec. 2.2.3).

EOT (Eq. 2.2.8) attacks a randomized network ``F ~ q_θ`` along the mean ``ĝ`` of its sampled
loss gradients. To first order the expected loss increase along ``ĝ/‖ĝ‖`` is bounded by
``α·M_X·ρ`` (Theorem 2.2.1, Eq. 2.2.13), where ``ρ`` is the mean resultant length (MRL) of the
gradient *directions* ``v = ∇_X l_F(X) / ‖∇_X l_F(X)‖``. GradDiv makes the sampled gradients
point in different directions by penalizing their concentration. With ``n`` sampled gradients
``g_1..g_n`` at an input of ``p`` features, unit directions ``v_i`` and sample MRL
``ρ̂ = ‖(1/n) Σ_i v_i‖``:

* ``R_κ = κ̂/p = ρ̂(p − ρ̂) / (p(1 − ρ̂²))`` — the approximate ML estimate of the von Mises-Fisher
  concentration (Eq. 2.2.10), normalized by ``p`` (Eq. 2.2.16): :func:`concentration`;
* ``R_mean = (1/(n(n−1))) Σ_{i≠j} cos(g_i, g_j)`` (Eq. 2.2.17); since
  ``‖Σ v_i‖² = n + Σ_{i≠j} v_iᵀv_j`` it equals ``(nρ̂² − 1)/(n − 1)``: :func:`mean_cosine`;
* ``R_DPP = −log det(G_nᵀ G_n)``, ``G_n = [v_1 … v_n]`` (Eq. 2.2.19): :func:`dpp_loss`;
* the variants of App. A.2, the largest pairwise cosine and its LogSumExp smooth maximum:
  :func:`max_cosine`, :func:`smoothmax_cosine`.

Every function takes gradient samples shaped ``(…, n, p)`` (any leading batch dimensions) and
returns one value per leading index. A zero gradient has no direction: its ``v`` is taken as 0.

The training method ``graddiv`` (:class:`GradDiv`) minimizes Eq. 2.2.20, ``L(X; θ) + λ·R(X; θ)``,
where ``L`` is the adversarial cross-entropy of PGD/EOT adversarial training (averaged over the
``n`` draws) and ``R`` one of the regularizers at the adversarial point. λ is 0 during a warm-up
and then grows linearly over a ramp (Sec. 2.2.4, Table A.1). The defaults are the thesis' MNIST
settings: GradDiv-κ with λ = 1, ``n = 3`` gradient samples, training PGD with ``m = 10`` steps of
``α = ε/4``, warm-up 3 and ramp-up 20 epochs of a 60-epoch run (scaled to the run's length).

Example:
    >>> import torch
    >>> same = torch.tensor([[1.0, 2.0], [2.0, 4.0]])       # two gradients, one direction
    >>> opposite = torch.tensor([[1.0, 2.0], [-3.0, -6.0]])
    >>> round(float(mean_resultant_length(same)), 6), float(mean_resultant_length(opposite))
    (1.0, 0.0)
    >>> round(float(mean_cosine(same)), 6), round(float(mean_cosine(opposite)), 6)
    (1.0, -1.0)
    >>> orthonormal = torch.eye(3)                           # n = p = 3: ρ̂ = 1/√3
    >>> round(float(concentration(orthonormal)), 4)          # (1/√3)(3 − 1/√3) / (3·(2/3))
    0.6994
    >>> round(abs(float(dpp_loss(orthonormal))), 4)          # det(I) = 1
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certfx.errors import InvalidValueError, ShapeError
from certfx.random_layers import kl_divergence, random_layers
from certfx.train.method import LossOutput, Method, StepContext, option, register_method
from certfx.verify.eot import EOTConfig, eot_pgd

__all__ = [
    "REGULARIZERS",
    "GradDiv",
    "GradDivOptions",
    "concentration",
    "dpp_loss",
    "max_cosine",
    "mean_cosine",
    "mean_resultant_length",
    "reg_scale",
    "sample_gradients",
    "smoothmax_cosine",
]

_TINY = 1e-12  # below this norm a gradient has no direction


def _directions(grads: Tensor, min_samples: int = 1) -> Tensor:
    """The unit directions ``v_i = g_i / ‖g_i‖`` of samples ``(…, n, p)`` (0 for ``g_i = 0``)."""
    if grads.dim() < 2:
        raise ShapeError(f"gradient samples must be shaped (..., n, p), got {tuple(grads.shape)}")
    if grads.shape[-2] < min_samples or grads.shape[-1] < 1:
        raise InvalidValueError(f"this regularizer needs n >= {min_samples} gradient samples of "
                                f"p >= 1 features, got n={grads.shape[-2]}, p={grads.shape[-1]}")
    norm = grads.norm(dim=-1, keepdim=True)
    return grads / norm.clamp_min(_TINY) * (norm > _TINY)


def mean_resultant_length(grads: Tensor) -> Tensor:
    """The sample MRL ``ρ̂ = ‖(1/n) Σ_i v_i‖`` of the directions of ``grads`` ``(…, n, p)``
    (Sec. 2.2.3): 1 when all samples point one way, near 0 when they cancel.

    >>> import torch
    >>> float(mean_resultant_length(torch.tensor([[3.0, 0.0], [0.0, 5.0]])))  # √2 / 2
    0.7071067690849304
    """
    return _directions(grads).mean(-2).norm(dim=-1)


def concentration(grads: Tensor, max_mrl: float = 1 - 1e-4) -> Tensor:
    """``R_κ = κ̂/p = ρ̂(p − ρ̂) / (p(1 − ρ̂²))`` (Eqs. 2.2.10, 2.2.16), increasing in ``ρ̂``.

    ``ρ̂`` is capped at ``max_mrl`` (the estimate diverges at ``ρ̂ = 1``, e.g. for a network
    without randomness).

    >>> import torch
    >>> float(concentration(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])))  # ρ̂ = 0: no concentration
    0.0
    """
    if not 0 < max_mrl < 1:
        raise InvalidValueError(f"max_mrl must lie in (0, 1), got {max_mrl}")
    p = grads.shape[-1]
    rho = mean_resultant_length(grads).clamp(max=max_mrl)
    return rho * (p - rho) / (p * (1 - rho ** 2))


def mean_cosine(grads: Tensor) -> Tensor:
    """``R_mean = (1/(n(n−1))) Σ_{i≠j} cos(g_i, g_j)`` (Eq. 2.2.17); needs ``n >= 2``.

    Computed as ``(‖Σ_i v_i‖² − Σ_i ‖v_i‖²) / (n(n−1))``, the sum of all pairwise inner products
    less the diagonal.

    >>> import torch
    >>> float(mean_cosine(torch.eye(4)))                    # mutually orthogonal
    0.0
    """
    v = _directions(grads, min_samples=2)
    n = v.shape[-2]
    total = v.sum(-2).pow(2).sum(-1) - v.pow(2).sum((-2, -1))
    return total / (n * (n - 1))


def _cosines(grads: Tensor) -> tuple[Tensor, Tensor]:
    """The off-diagonal pairwise cosines ``(…, n(n−1))`` of the samples (``n >= 2``)."""
    v = _directions(grads, min_samples=2)
    n = v.shape[-2]
    gram = v @ v.transpose(-1, -2)
    off = ~torch.eye(n, dtype=torch.bool, device=v.device)
    return gram[..., off], gram


def max_cosine(grads: Tensor) -> Tensor:
    """``R_max = max_{i≠j} cos(g_i, g_j)`` (App. A.2).

    >>> import torch
    >>> float(max_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])))  # cos 45°
    0.7071067690849304
    """
    return _cosines(grads)[0].amax(-1)


def smoothmax_cosine(grads: Tensor) -> Tensor:
    """``R_smoothmax = log Σ_{i≠j} exp cos(g_i, g_j)`` (App. A.2).

    >>> import torch, math
    >>> round(float(smoothmax_cosine(torch.eye(2))) - math.log(2), 6)   # two zero cosines
    0.0
    """
    return torch.logsumexp(_cosines(grads)[0], -1)


def dpp_loss(grads: Tensor, jitter: float = 1e-6) -> Tensor:
    """``R_DPP = −log det(G_nᵀ G_n)`` with ``G_n`` the unit directions as columns (Eq. 2.2.19);
    0 for orthonormal directions, large when they are nearly dependent. ``jitter·I`` is added to
    the Gram matrix so that dependent samples (or ``n > p``) give a large finite value.

    >>> import torch
    >>> float(dpp_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))) > 0   # 45° apart: det = 1/2
    True
    """
    if not jitter >= 0:
        raise InvalidValueError(f"jitter must be >= 0, got {jitter}")
    v = _directions(grads)
    n = v.shape[-2]
    gram = v @ v.transpose(-1, -2) + jitter * torch.eye(n, dtype=v.dtype, device=v.device)
    return -torch.linalg.slogdet(gram)[1]


REGULARIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "kappa": concentration,      # GradDiv-κ, Eq. 2.2.16
    "mean": mean_cosine,         # GradDiv-mean, Eq. 2.2.17
    "dpp": dpp_loss,             # GradDiv-DPP, Eq. 2.2.19
    "max": max_cosine,           # App. A.2
    "smoothmax": smoothmax_cosine,  # App. A.2
}


def sample_gradients(model: nn.Module, x: Tensor, y: Tensor, samples: int,
                     create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """``n = samples`` draws of the loss gradients ``g_i = ∇_X CE(F_i(X), Y)`` of a randomized
    model, one forward pass per draw.

    Returns:
        ``(grads, losses)``: ``grads`` ``(B, n, p)`` with ``p`` the features per example, and the
        per-draw cross-entropies ``(B, n)``, differentiable with respect to the model's
        parameters. With ``create_graph`` the gradients are too (the regularizers are trained
        through them); without, they are constants.
    """
    if samples < 1:
        raise InvalidValueError(f"sample_gradients needs samples >= 1, got {samples}")
    if y.shape[0] != x.shape[0]:
        raise ShapeError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    point = x.detach().requires_grad_(True)
    grads, losses = [], []
    with torch.enable_grad():
        for _ in range(samples):
            loss = F.cross_entropy(model(point), y, reduction="none")
            # examples are independent, so the gradient of the sum is the per-example gradient
            # retain_graph: the losses stay differentiable w.r.t. the parameters either way
            (g,) = torch.autograd.grad(loss.sum(), point, create_graph=create_graph,
                                       retain_graph=True)
            grads.append(g.flatten(1))
            losses.append(loss)
    return torch.stack(grads, 1), torch.stack(losses, 1)


def reg_scale(epoch: int, warmup: float, ramp: float) -> float:
    """λ's fraction in ``epoch`` (0-based): 0 during ``warmup`` epochs, then a linear ramp over
    ``ramp`` epochs reaching 1 at its end (Sec. 2.2.4); the value at the end of the epoch.

    >>> [reg_scale(e, warmup=3, ramp=20) for e in (0, 2, 3, 12, 22, 40)]
    [0.0, 0.0, 0.05, 0.5, 1.0, 1.0]
    """
    done = epoch + 1 - warmup
    if done <= 0:
        return 0.0
    return 1.0 if ramp <= 0 else min(1.0, done / ramp)


@dataclass(frozen=True)
class GradDivOptions:
    """GradDiv hyperparameters (defaults: the thesis' MNIST settings, Sec. 2.2.4, Table A.1)."""

    regularizer: str = option("kappa", "GradDiv regularizer: kappa (Eq. 2.2.16), mean "
                              "(2.2.17), dpp (2.2.19), max or smoothmax (App. A.2); the thesis' "
                              "best on MNIST is kappa")
    reg_weight: float = option(1.0, "λ of Eq. 2.2.20 after the ramp (MNIST: 1; the thesis "
                               "cross-validates over [0.05, 10]); 0 trains without GradDiv")
    grad_samples: int = option(3, "n, sampled loss gradients per input for the regularizer and "
                               "the adversarial loss (the thesis finds 3 sufficient)")
    reg_warmup: float = option(3.0, "epochs with λ = 0, of a run of schedule_epochs (MNIST: 3)")
    reg_ramp: float = option(20.0, "epochs of λ's linear ramp, of a run of schedule_epochs "
                             "(MNIST: 20)")
    schedule_epochs: int = option(60, "the run length warm-up and ramp refer to (MNIST: 60); "
                                  "both are scaled by the run's epochs / this")
    pgd_steps: int = option(10, "steps m of the training attack (thesis: 10)")
    pgd_step_size: float = option(0.25, "step α of the training attack as a fraction of ε "
                                     "(thesis: ε/4)")
    eot_samples: int = option(1, "draws per step of the training attack: 1 is PGD on one "
                                 "draw per step (as the thesis trains), > 1 is EOT-PGD")
    pgd_restarts: int = option(1, "random restarts of the training attack")
    reg_point: str = option("adversarial", "where the gradients are sampled: 'adversarial' "
                            "(the training attack's point) or 'clean'")
    kl_weight: float = option(0.0, "weight of the KL divergence of BayesLinear layers to "
                              "N(0, prior_sigma²), averaged per Bayesian parameter (Adv-BNN's "
                              "α_KL = 0.02 in the thesis refers to its own normalization)")
    prior_sigma: float = option(0.05, "σ₀ of the Bayesian prior (thesis, MNIST: 0.05)")

    def __post_init__(self) -> None:
        if self.regularizer not in REGULARIZERS:
            raise InvalidValueError(f"unknown GradDiv regularizer '{self.regularizer}'; choose "
                                    f"one of {', '.join(REGULARIZERS)}")
        if not self.reg_weight >= 0 or math.isinf(self.reg_weight):
            raise InvalidValueError(f"reg_weight (λ) must be finite and >= 0, got "
                                    f"{self.reg_weight}")
        if self.grad_samples < 2:
            raise InvalidValueError(f"GradDiv needs grad_samples >= 2 (a concentration of one "
                                    f"sample is undefined), got {self.grad_samples}")
        if self.reg_warmup < 0 or self.reg_ramp < 0 or self.schedule_epochs < 1:
            raise InvalidValueError("reg_warmup and reg_ramp must be >= 0 and schedule_epochs "
                                    ">= 1")
        if self.pgd_steps < 0 or self.eot_samples < 1 or self.pgd_restarts < 1 \
                or not self.pgd_step_size > 0:
            raise InvalidValueError("the training attack needs steps >= 0, samples >= 1, "
                                    "restarts >= 1 and a step size > 0")
        if self.reg_point not in ("adversarial", "clean"):
            raise InvalidValueError(f"reg_point must be 'adversarial' or 'clean', got "
                                    f"'{self.reg_point}'")
        if not self.kl_weight >= 0 or not self.prior_sigma > 0:
            raise InvalidValueError("kl_weight must be >= 0 and prior_sigma > 0")


@register_method
class GradDiv(Method):
    """PGD/EOT adversarial training of a randomized network plus ``λ·R_GradDiv`` (Eq. 2.2.20).

    Per batch: the training attack (EOT-PGD with ``eot_samples`` draws per step, in the ε-ball
    of the step's ε), then ``n = grad_samples`` draws at the regularized point giving the per-draw
    cross-entropies and input gradients; the loss is the mean cross-entropy at the adversarial
    point plus ``λ_t·R`` of those gradients, with ``λ_t`` on the warm-up/ramp schedule. The
    metrics report all three concentration measures of Fig. 2.3 (κ̂/p, mean cosine, DPP) and
    ``ρ̂`` whatever the regularizer.

    Example:
        >>> import torch
        >>> from certfx.random_layers import GaussianNoise
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(GaussianNoise(0.1), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 2))
        >>> method = GradDiv(net, torch.rand(1, 1, 2, 2))
        >>> method.total_epochs = 1
        >>> ctx = StepContext(0, 0, 0.1, 0.1, 1.0, torch.Generator().manual_seed(0))
        >>> out = method.loss(torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,)), ctx)
        >>> bool(torch.isfinite(out.loss)), sorted(out.metrics)[:3]
        (True, ['adversarial_loss', 'dpp', 'kappa_over_p'])
    """

    name = "graddiv"
    Options = GradDivOptions
    description = "GradDiv: adversarial training of a randomized network with a gradient-" \
                  "diversity regularizer (thesis Sec. 2.2.3)"

    def __init__(self, model: nn.Module, example_input: Tensor, options: GradDivOptions | None
                 = None, input_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__(model, example_input, options, input_range)
        self.regularizer = REGULARIZERS[self.options.regularizer]
        self.has_randomness = bool(random_layers(model))

    def reg_weight(self, epoch: int) -> float:
        """λ in ``epoch``: the target λ times the warm-up/ramp fraction, scaled to the run."""
        opts = self.options
        scale = (self.total_epochs or opts.schedule_epochs) / opts.schedule_epochs
        return opts.reg_weight * reg_scale(epoch, opts.reg_warmup * scale,
                                           opts.reg_ramp * scale)

    def attack(self, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor:
        """The training attack's points (``x`` itself when ε = 0)."""
        opts = self.options
        if ctx.eps <= 0:
            return x
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=ctx.generator,
                                 device=ctx.generator.device))
        cfg = EOTConfig(samples=opts.eot_samples, steps=opts.pgd_steps,
                        step_size=opts.pgd_step_size, restarts=opts.pgd_restarts,
                        seed=seed)
        return eot_pgd(self.model, x, y, ctx.eps, cfg, *self.input_range).x_adv

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        xa = self.attack(x, y, ctx)
        lam = self.reg_weight(ctx.epoch)
        point = xa if opts.reg_point == "adversarial" else x
        grads, losses = sample_gradients(self.model, point, y, opts.grad_samples,
                                         create_graph=lam > 0)
        if opts.reg_point == "adversarial":
            adversarial = losses.mean()  # the n draws' mean cross-entropy at the attack's point
        else:
            adversarial = F.cross_entropy(self.model(xa), y)
        loss = adversarial
        if lam > 0:
            loss = loss + lam * self.regularizer(grads).mean()
        if opts.kl_weight > 0:
            bayes = sum(p.numel() for name, p in self.model.named_parameters()
                        if name.endswith("_mu"))
            loss = loss + opts.kl_weight * kl_divergence(self.model, opts.prior_sigma).to(
                loss.device) / max(bayes, 1)
        with torch.no_grad():
            g = grads.detach()
            metrics = {"adversarial_loss": adversarial.item(), "lambda": lam,
                       "mrl": mean_resultant_length(g).mean().item(),
                       "kappa_over_p": concentration(g).mean().item(),
                       "mean_cos": mean_cosine(g).mean().item(),
                       "dpp": dpp_loss(g).mean().item()}
        return LossOutput(loss, metrics)
