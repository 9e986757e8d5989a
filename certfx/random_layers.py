"""Layers whose randomness stays on at test time: the randomized networks of thesis Sec. 2.2.1.

A randomized network ``F ~ q_θ`` draws a new sample model at every forward pass, in eval mode
too (certfx attacks and the training loop run models in eval mode). Three kinds:

* :class:`GaussianNoise` — additive noise ``x + σ·ξ``, ``ξ ~ N(0, I)`` drawn per element (RSE,
  Liu et al. 2018; the thesis' RSE baseline uses σ = 0.2 before the first layer and 0.1 before the
  others, Sec. 2.2.4). ``learnable=True`` makes ``log σ`` (one per channel) a parameter, so
  training (GradDiv, Eq. 2.2.20) can shape the randomness itself.
* :class:`AlwaysDropout` and :func:`keep_dropout_on` — dropout that is not switched off by
  ``model.eval()`` (Monte-Carlo dropout).
* :class:`BayesLinear` — a mean-field Gaussian linear layer ``W = μ + softplus(ρ)·ξ`` with one
  weight draw per forward pass, shared by the batch (the Bayesian layer of Adv-BNN, the thesis'
  baseline), and its KL divergence to a ``N(0, σ₀²)`` prior.

Every layer draws from torch's global random-number generator (``torch.manual_seed`` makes a run
repeatable) and has an ``active`` flag; :func:`randomness` turns all of them off for a block,
which leaves the deterministic "mean" network.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(GaussianNoise(0.2), torch.nn.Linear(3, 2)).eval()
    >>> x = torch.zeros(1, 3)
    >>> bool((net(x) != net(x)).any())          # two draws differ, in eval mode too
    True
    >>> with randomness(net, False):
    ...     bool((net(x) == net(x)).all())
    True
    >>> drop = keep_dropout_on(torch.nn.Sequential(torch.nn.Dropout(0.5))).eval()
    >>> type(drop[0]).__name__, bool((drop(torch.ones(1, 100)) == 0).any())
    ('AlwaysDropout', True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certfx.errors import InvalidValueError

__all__ = [
    "AlwaysDropout",
    "BayesLinear",
    "GaussianNoise",
    "RandomLayer",
    "keep_dropout_on",
    "kl_divergence",
    "randomness",
    "random_layers",
]


class RandomLayer(nn.Module):
    """Marker base class: a layer that draws a new sample at each forward while ``active``."""

    active: bool = True


class GaussianNoise(RandomLayer):
    """``x + σ·ξ`` with ``ξ ~ N(0, I)`` per element, in train and eval mode (while ``active``).

    Args:
        sigma: the noise standard deviation (>= 0), in the units of the layer's input.
        learnable: make ``log σ`` a parameter, one value per channel (dimension 1 of the input).
        channels: the number of channels, needed when ``learnable``.
    """

    def __init__(self, sigma: float, learnable: bool = False, channels: int = 1):
        super().__init__()
        if not sigma >= 0 or math.isinf(sigma):
            raise InvalidValueError(f"GaussianNoise needs a finite sigma >= 0, got {sigma}")
        if learnable and (sigma == 0 or channels < 1):
            raise InvalidValueError("a learnable noise scale needs sigma > 0 and channels >= 1")
        self.learnable = learnable
        if learnable:
            self.log_sigma = nn.Parameter(torch.full((channels,), math.log(sigma)))
        else:
            self.register_buffer("sigma", torch.tensor(float(sigma)))

    def scale(self, x: Tensor) -> Tensor:
        """σ, broadcastable to ``x``."""
        if not self.learnable:
            return self.sigma.to(x.dtype)
        return self.log_sigma.exp().to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        return x + self.scale(x) * torch.randn_like(x)

    def extra_repr(self) -> str:
        if self.learnable:
            return f"learnable, channels={self.log_sigma.numel()}"
        return f"sigma={float(self.sigma):g}"


class AlwaysDropout(nn.Dropout, RandomLayer):
    """Dropout that keeps dropping in eval mode (Monte-Carlo dropout) while ``active``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, training=self.active, inplace=self.inplace)


def keep_dropout_on(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` in ``model`` (in place) by :class:`AlwaysDropout` with the
    same rate, so that ``model.eval()`` keeps it random; returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Dropout) and not isinstance(child, AlwaysDropout):
            setattr(model, name, AlwaysDropout(child.p, child.inplace))
        else:
            keep_dropout_on(child)
    return model


class BayesLinear(RandomLayer):
    """A linear layer with Gaussian weights ``W = μ_W + softplus(ρ_W)·ξ`` (and bias likewise);
    one draw per forward pass, shared by the batch. While not ``active`` it uses the means.

    Args:
        in_features, out_features: as ``nn.Linear``.
        sigma_init: the initial standard deviation of every weight (> 0).
    """

    def __init__(self, in_features: int, out_features: int, sigma_init: float = 0.05):
        super().__init__()
        if not sigma_init > 0:
            raise InvalidValueError(f"BayesLinear needs sigma_init > 0, got {sigma_init}")
        base = nn.Linear(in_features, out_features)
        rho = math.log(math.expm1(sigma_init))  # softplus⁻¹(σ)
        self.weight_mu = nn.Parameter(base.weight.detach().clone())
        self.bias_mu = nn.Parameter(base.bias.detach().clone())
        self.weight_rho = nn.Parameter(torch.full_like(base.weight, rho))
        self.bias_rho = nn.Parameter(torch.full_like(base.bias, rho))

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return F.linear(x, self.weight_mu, self.bias_mu)
        w = self.weight_mu + F.softplus(self.weight_rho) * torch.randn_like(self.weight_mu)
        b = self.bias_mu + F.softplus(self.bias_rho) * torch.randn_like(self.bias_mu)
        return F.linear(x, w, b)

    def kl(self, prior_sigma: float) -> Tensor:
        """``KL(N(μ, σ²) ‖ N(0, σ₀²))`` summed over the weights and biases."""
        total = self.weight_mu.new_zeros(())
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            sigma = F.softplus(rho)
            # closed form for two Gaussians: log(σ₀/σ) + (σ² + μ²)/(2σ₀²) − 1/2
            total = total + (math.log(prior_sigma) - sigma.log()
                             + (sigma ** 2 + mu ** 2) / (2 * prior_sigma ** 2) - 0.5).sum()
        return total


def kl_divergence(model: nn.Module, prior_sigma: float) -> Tensor:
    """The summed KL divergence of every :class:`BayesLinear` of ``model`` to the prior
    ``N(0, σ₀²)`` (0 for a model without Bayesian layers)."""
    if not prior_sigma > 0:
        raise InvalidValueError(f"the prior standard deviation must be > 0, got {prior_sigma}")
    terms = [m.kl(prior_sigma) for m in model.modules() if isinstance(m, BayesLinear)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def random_layers(model: nn.Module) -> list[RandomLayer]:
    """The randomized layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, RandomLayer)]


@contextmanager
def randomness(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Switch every randomized layer of ``model`` on or off for the block (restored after)."""
    layers = random_layers(model)
    saved = [m.active for m in layers]
    try:
        for m in layers:
            m.active = enabled
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.active = flag
