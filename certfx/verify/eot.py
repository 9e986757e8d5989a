"""Expectation over Transformation (EOT): attacks and accuracy for randomized networks.

A randomized network (thesis Sec. 2.2.1, :mod:`certfx.random_layers`) draws a sample model
``F ~ q_θ`` at every forward pass, so one gradient is not the gradient of the model that will
classify the point. EOT-PGD (thesis Sec. 2.2.2, Eq. 2.2.8; Athalye et al. 2018) replaces it by
the sample mean of ``n`` drawn gradients,

    X'_k = X_k + argmax_{‖g‖ <= α} gᵀ Ê_{F~q_θ}[∇_X L(F(X_k), Y)],   X_{k+1} = Π_B(X'_k),

i.e. a sign step for ℓ∞ and a normalized step for ℓ2, then the projection onto the ball (within
the valid input range). With ``n = 1`` on a deterministic model this is exactly the PGD of
:func:`certfx.verify.ball_attacks.pgd_ball` (same starts, steps, projection and choice of the
returned point), whose helpers it reuses. The thesis' settings (Sec. 2.2.4, Table A.2) are the
defaults of :class:`EOTConfig`: ``n = 20`` draws, ``m = 20`` steps, ``α = ε/4``.

A randomized network predicts by the expected softmax over draws (the thesis averages 20 sample
models, Sec. 2.2.4); :func:`eot_predict` and :func:`eot_accuracy` do that. The point returned
per example is the iterate (or the clean point) with the lowest estimated margin of that
prediction, ``log p̄_y − max_{j≠y} log p̄_j`` with ``p̄`` the mean softmax over the step's ``n``
draws (for ``n = 1`` this is the logit margin ``z_y − max_{j≠y} z_j``). The estimate is noisy;
judge the attack only with fresh draws (:func:`eot_accuracy` on the returned points).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
    >>> x, y = torch.tensor([[0.6, 0.4], [0.9, 0.1]]), torch.tensor([0, 0])
    >>> result = eot_pgd(net, x, y, eps=0.15, config=EOTConfig(samples=1))
    >>> eot_accuracy(net, x, y, samples=1), eot_accuracy(net, result.x_adv, y, samples=1)
    (1.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certfx.errors import InvalidValueError, ShapeError, SpecError
from certfx.specs import Margin
from certfx.verify.attacks import (Loss, Norm, _attack_mode, _inward, _l2_step, _linf_step,
                                   _objective, _pgd, _uniform, _violations)
from certfx.verify.ball_attacks import _l2_inside, _l2_project, _l2_uniform

__all__ = ["EOTConfig", "EOTResult", "eot_accuracy", "eot_pgd", "eot_predict"]


@dataclass(frozen=True)
class EOTConfig:
    """Settings of EOT-PGD (defaults: the thesis' evaluation attack, Sec. 2.2.4 / Table A.2).

    Attributes:
        samples: ``n``, model draws whose gradients are averaged per step (Eq. 2.2.8); the
            thesis reports ``n = 5, 10, 20`` and uses 20 as the worst case (App. A.5).
        steps: ``m``, gradient steps per restart (20).
        step_size: ``α`` as a fraction of ε (1/4: ``α = ε/4``).
        restarts: independent random starts; each example keeps its best point over all.
        loss: the per-draw objective whose gradients are averaged (cross-entropy: ``L`` of
            Eq. 2.2.8; ``Loss.MARGIN`` for the Carlini-Wagner margin).
        norm: ``Norm.LINF`` (sign steps) or ``Norm.L2`` (normalized steps).
        random_start: start uniformly in the ball (else at the clean point).
        seed: seed of the random starts (the model's draws use torch's global generator).
    """

    samples: int = 20
    steps: int = 20
    step_size: float = 0.25
    restarts: int = 1
    loss: Loss = Loss.CE
    norm: Norm = Norm.LINF
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise InvalidValueError(f"EOT needs samples (n) >= 1, got {self.samples}")
        if self.steps < 0 or self.restarts < 1:
            raise InvalidValueError(f"EOT needs steps >= 0 and restarts >= 1, got "
                                    f"steps={self.steps}, restarts={self.restarts}")
        if not self.step_size > 0 or math.isinf(self.step_size):
            raise InvalidValueError(f"step_size must be a finite fraction > 0 of ε, got "
                                    f"{self.step_size}")
        if not isinstance(self.loss, Loss) or not isinstance(self.norm, Norm):
            raise SpecError("EOTConfig.loss must be a Loss and .norm a Norm (e.g. Loss.CE, "
                            f"Norm.L2), got {self.loss!r} and {self.norm!r}")


@dataclass(frozen=True)
class EOTResult:
    """The outcome of :func:`eot_pgd`, per example.

    Attributes:
        x_adv: the returned point per example ``(B, …)``, inside the ball and the valid range.
        margin: ``(B,)`` the attack's own estimate (from one step's ``n`` draws) of the expected
            softmax's log-margin at ``x_adv``; ``<= 0`` means it believed the point misclassified.
            Re-evaluate with fresh draws (:func:`eot_accuracy`) before reporting anything.
    """

    x_adv: Tensor
    margin: Tensor


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps >= 0 or math.isinf(eps):
        raise InvalidValueError(f"eps must be a finite radius >= 0, got {eps}")
    return eps


def _draws(model: nn.Module, n: int) -> Callable[[Tensor], Tensor]:
    """``x ↦ (B, n, K)``: the logits of ``n`` forward passes (``n`` independent draws)."""
    return lambda x: torch.stack([model(x).flatten(1) for _ in range(n)], 1)


def _score(z: Tensor, n: int, C: Tensor, loss: Loss) -> tuple[Tensor, Tensor]:
    """From ``n`` draws' logits ``z`` ``(B, n·K)``: the EOT objective (the mean of the per-draw
    objectives, whose input gradient is the sample-mean gradient of Eq. 2.2.8) and the log-margin
    ``min_r (C log p̄)_r`` of the mean softmax ``p̄`` over the draws."""
    B = z.shape[0]
    z = z.view(B, n, -1)
    matrix = C[:, :, None, :]  # (B, rows, 1, K): one single-row term per row of C
    offset = torch.zeros(C.shape[:2] + (1,), dtype=z.dtype, device=z.device)
    per_draw = torch.stack([_objective(_violations(z[:, i], matrix, offset), loss, None)
                            for i in range(n)], 1)
    log_mean = torch.logsumexp(F.log_softmax(z, -1), 1) - math.log(n)  # log p̄, (B, K)
    margin = torch.einsum("bk,brk->br", log_mean, C).amin(1)
    return per_draw.mean(1), margin


def eot_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float,
            config: EOTConfig | None = None, lower: float = 0.0,
            upper: float = 1.0) -> EOTResult:
    """EOT-PGD (Eq. 2.2.8 with the projection 2.1.6) in the ℓ∞ or ℓ2 ball of radius ``eps``
    around each example, within ``[lower, upper]`` (see the module docstring).

    Args:
        model: a (randomized) torch module mapping a batch to logits ``(B, K)``; it runs in eval
            mode with frozen parameters during the attack (both restored afterwards).
        x: the clean points ``(B, …)``.
        y: their labels ``(B,)``.
        eps: the radius (>= 0), in input units.
        config: the attack settings (default: the thesis' ``n = 20``, ``m = 20``, ``α = ε/4``).
        lower, upper: the valid input range.

    Raises:
        InvalidValueError: a negative or non-finite ε, or ``lower > upper``.
        ShapeError: ``x`` and ``y`` have different batch sizes.
    """
    cfg = config or EOTConfig()
    eps = _check_eps(eps)
    if not lower <= upper:
        raise InvalidValueError(f"the valid range needs lower <= upper, got [{lower}, {upper}]")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ShapeError(f"x has {x.shape[0]} examples, y must be ({x.shape[0]},), got "
                         f"{tuple(y.shape)}")
    B, view, n = x.shape[0], (-1, *[1] * (x.dim() - 1)), cfg.samples
    x0 = x.detach()
    forward = _draws(model, n)
    with _attack_mode(model), torch.no_grad():
        z0 = forward(x0).flatten(1)
    K = z0.shape[1] // n
    C = Margin().matrix(y.to(x.device), K, x.dtype).to(x.device, x.dtype).expand(B, -1, -1)
    eps64 = torch.tensor(eps, dtype=torch.float64, device=x.device)
    range_lo, range_hi = (torch.full_like(x0, v, dtype=torch.float64) for v in (lower, upper))
    if cfg.norm is Norm.LINF:
        lo64, hi64 = (torch.maximum(x0.double() - eps64, range_lo),
                      torch.minimum(x0.double() + eps64, range_hi))
        empty = (lo64 > hi64).flatten(1).any(1)
    else:
        lo64, hi64 = range_lo, range_hi
        eps_b = eps64.expand(B)
        empty = (x0.double() - x0.double().clamp(range_lo, range_hi)).flatten(1).norm(
            dim=1) > eps_b
    if bool(empty.any()):
        raise InvalidValueError(f"{int(empty.sum())} example(s) lie farther than ε from the "
                                f"valid range [{lower}, {upper}]; the ball holds no valid input")
    lo, hi = _inward(lo64, hi64, x.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_x = torch.clamp(x0, lo, hi)
    in_range = ((x0.double() >= range_lo) & (x0.double() <= range_hi)).flatten(1).all(1)
    clean = _score(z0, n, C, cfg.loss)[1].double()
    best = torch.where(in_range, clean, torch.full_like(clean, math.inf))

    def score(z: Tensor) -> tuple[Tensor, Tensor]:
        return _score(z, n, C, cfg.loss)

    if cfg.norm is Norm.LINF:
        project, step = (lambda p: torch.clamp(p, lo, hi)), _linf_step(
            (cfg.step_size * eps64.expand_as(x0)).to(x.dtype))
    else:
        project, step = _l2_project(x0, eps_b, lo, hi), _l2_step(
            (cfg.step_size * eps_b).to(x.dtype).view(view))
    for _restart in range(cfg.restarts):
        if not cfg.random_start:
            start = torch.clamp(x0, lo, hi)
        elif cfg.norm is Norm.LINF:
            start = _uniform(gen, lo, hi, B)
        else:
            start = _l2_uniform(gen, x0, eps_b)
        with _attack_mode(model):
            xs, vs, _taken = _pgd(forward, start, project, step, score, cfg.steps, None)
        better = vs < best
        best = torch.where(better, vs, best)
        best_x[better] = xs[better]
    if cfg.norm is Norm.L2:
        best_x = _l2_inside(best_x, x0, eps_b, lo, hi)
    return EOTResult(best_x.detach(), best.float().cpu())


def eot_predict(model: nn.Module, x: Tensor, samples: int = 20,
                batch_size: int = 500) -> Tensor:
    """The expected softmax ``p̄ = (1/n) Σ_i softmax(F_i(x))`` over ``n = samples`` draws, shape
    ``(B, K)`` (the thesis classifies with an ensemble of 20 sample models, Sec. 2.2.4). The model
    runs in eval mode (restored afterwards); its randomized layers stay random."""
    if samples < 1:
        raise InvalidValueError(f"eot_predict needs samples >= 1, got {samples}")
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    with _attack_mode(model), torch.no_grad():
        for chunk in x.split(batch_size):
            p = sum(F.softmax(model(chunk).flatten(1), -1) for _ in range(samples))
            out.append(p / samples)
    return torch.cat(out)


def eot_accuracy(model: nn.Module, x: Tensor, y: Tensor, samples: int = 20,
                 batch_size: int = 500) -> float:
    """The fraction of ``x`` whose expected-softmax prediction (:func:`eot_predict`) is ``y``."""
    if y.shape[0] != x.shape[0]:
        raise ShapeError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    pred = eot_predict(model, x, samples, batch_size).argmax(1)
    return float((pred == y.to(pred.device)).float().mean())
