"""BCP certified training for ℓ2 robustness (thesis ``004``, Sec. 3.2, Algorithm 1, Eq. 3.2.13).

Each step bounds the margins over the ℓ2 ball ``B₂(x, ε)`` (clipped to the valid range) with the
``bcp`` domain (:mod:`certfx.domains.lipschitz`: Lipschitz balls and boxes propagated together,
the worst-translated logit over their intersection at the last layer) and minimizes

    J = (1 − λ)·L(z(x), y) + λ·L(z̲(x), y)                                  (3.2.13)

with ``L`` the cross-entropy and ``z̲`` the worst-translated logits (margins as in
:func:`certfx.train.losses.robust_ce`). As in the thesis, ε and λ grow together: λ is 0 during the
warm-up and rises linearly to ``lambda_end`` over the ε ramp (App. B.3, Table B.1: λ from 0 to 1).

Example:
    >>> import torch
    >>> from certfx.train import TrainConfig, Trainer
    >>> torch.manual_seed(0) is not None
    True
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> x, y = torch.rand(64, 4), torch.randint(0, 3, (64,))
    >>> history = Trainer(net, x, y, TrainConfig(method="bcp", eps=0.1, epochs=2,
    ...                                          batch_size=32)).fit()
    >>> "robust_loss" in history[-1]
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

import certfx
from certfx.errors import InvalidValueError
from certfx.specs import L2Ball
from certfx.train.losses import certified, robust_ce
from certfx.train.method import LossOutput, Method, StepContext, option, register_method

__all__ = ["BCPTraining", "BCPOptions"]


@dataclass(frozen=True)
class BCPOptions:
    """BCP training hyperparameters (thesis App. B.3, Table B.1)."""

    lambda_start: float = option(0.0, "λ of Eq. 3.2.13 when the ε ramp starts (thesis: 0)")
    lambda_end: float = option(1.0, "λ of Eq. 3.2.13 once ε reaches its target (thesis: 1)")
    bcp_iterations: int = option(10, "passes of Algorithm 1 per step (thesis: 10 on MNIST); "
                                     "0 uses the ball's or the box's bound alone")

    def __post_init__(self) -> None:
        if not (0 <= self.lambda_start <= 1 and 0 <= self.lambda_end <= 1):
            raise InvalidValueError("lambda_start and lambda_end must lie in [0, 1]")
        if self.bcp_iterations < 0:
            raise InvalidValueError("bcp_iterations must be >= 0")


@register_method
class BCPTraining(Method):
    """ℓ2 certified training with BCP's worst-translated logits; ``--eps`` is the ℓ2 radius."""

    name = "bcp"
    Options = BCPOptions
    description = "BCP (thesis Sec. 3.2): ℓ2 certified training with Lipschitz balls and boxes"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        lo, hi = self.input_range
        from certfx.domains.lipschitz import BCPOptions as DomainOptions

        self.bounds = certfx.compile(
            self.model, domain="bcp", input_spec=L2Ball(0.0, lo, hi),
            example_input=self.example_input,
            domain_options=DomainOptions(max_iterations=self.options.bcp_iterations))

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        natural = F.cross_entropy(self.model(x), y)
        if ctx.eps <= 0:
            return LossOutput(natural, {"natural_loss": natural.item()})
        lam = opts.lambda_start + (opts.lambda_end - opts.lambda_start) * ctx.progress
        margins = self.bounds.certified_forward(x, y, eps=ctx.eps)
        robust = robust_ce(margins)
        loss = (1 - lam) * natural + lam * robust
        return LossOutput(loss, {"natural_loss": natural.item(), "robust_loss": robust.item(),
                                 "lambda": lam, "bcp_cert": float(certified(margins).float()
                                                                  .mean())})
