"""TAPS's gradient connector (paper ``001``, Sec. 3, "Gradient Connector", Fig. 3).

The latent adversarial example ``ẑ ∈ [z_lo, z_hi]`` comes out of a PGD search, which has no
gradient w.r.t. the box. The connector passes ``ẑ`` forward unchanged and defines the pseudo
gradients per dimension — dimensions are independent, ``∂ẑ_j/∂z_lo_i = ∂ẑ_j/∂z_hi_i = 0`` for
``i ≠ j``, since a box carries no relational information between dimensions (Sec. 3) — as the
*rectified linear* connector with a constant ``c ∈ [0, 1]`` (default 0.5):

    ∂ẑ_i/∂z_lo_i = max(0, 1 − (ẑ_i − z_lo_i) / (c·(z_hi_i − z_lo_i)))
    ∂ẑ_i/∂z_hi_i = max(0, 1 − (z_hi_i − ẑ_i) / (c·(z_hi_i − z_lo_i)))

(the paper writes the lower bound and states that the upper one "follows analogously": the
mirrored distance to ``z_hi``). ``c = 1`` is the *linear* connector
``∂ẑ_i/∂z_lo_i = (z_hi_i − ẑ_i)/(z_hi_i − z_lo_i)``; ``c → 0`` the *binary* one
``1[ẑ_i = z_lo_i]``, a sub-gradient of PGD's projection. Where ``z_lo_i = z_hi_i`` both pseudo
gradients are 0.5 (Sec. 3, last sentence of the paragraph).

Example:
    >>> import torch
    >>> lo, hi = torch.zeros(1, 3, requires_grad=True), torch.ones(1, 3, requires_grad=True)
    >>> z_hat = torch.tensor([[0.0, 0.25, 0.9]])
    >>> connect(z_hat, lo, hi, c=0.5).sum().backward()
    >>> lo.grad.tolist(), [round(v, 2) for v in hi.grad[0].tolist()]
    ([[1.0, 0.5, 0.0]], [0.0, 0.0, 0.8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certfx.errors import InvalidValueError

__all__ = ["connect", "connector_gradients"]


def connector_gradients(z_hat: Tensor, lo: Tensor, hi: Tensor, c: float
                        ) -> tuple[Tensor, Tensor]:
    """``(∂ẑ/∂z_lo, ∂ẑ/∂z_hi)`` elementwise (see the module docstring).

    Example:
        >>> lo, hi = torch.zeros(4), torch.full((4,), 2.0)
        >>> d_lo, d_hi = connector_gradients(torch.tensor([0.0, 0.5, 1.0, 2.0]), lo, hi, 1.0)
        >>> d_lo.tolist(), d_hi.tolist()       # c = 1: linear in the relative position
        ([1.0, 0.75, 0.5, 0.0], [0.0, 0.25, 0.5, 1.0])
    """
    width = hi - lo
    flat = width <= 0  # z_lo = z_hi: both pseudo gradients 0.5 (Sec. 3)
    if c == 0:
        # binary connector, the c → 0 limit: 1[ẑ_i = z_lo_i] and 1[ẑ_i = z_hi_i]
        d_lo, d_hi = (z_hat == lo).to(z_hat.dtype), (z_hat == hi).to(z_hat.dtype)
    else:
        # rectified linear connector: with the relative distances
        #   t_lo = (ẑ − z_lo)/(z_hi − z_lo),  t_hi = (z_hi − ẑ)/(z_hi − z_lo)  (t_lo + t_hi = 1)
        # ∂ẑ/∂z_lo = max(0, 1 − t_lo/c), ∂ẑ/∂z_hi = max(0, 1 − t_hi/c): 1 on the bound itself,
        # falling linearly to 0 at a relative distance c from it (c = 1: linear connector).
        scale = c * torch.where(flat, torch.ones_like(width), width)
        d_lo = torch.clamp(1 - (z_hat - lo) / scale, min=0)
        d_hi = torch.clamp(1 - (hi - z_hat) / scale, min=0)
    half = torch.full_like(z_hat, 0.5)
    return torch.where(flat, half, d_lo), torch.where(flat, half, d_hi)


class _Connector(torch.autograd.Function):
    """Identity on ``ẑ``; backward: chain rule through the connector's pseudo gradients,
    ``dL/dz_lo_i = dL/dẑ_i · ∂ẑ_i/∂z_lo_i`` and likewise for ``z_hi`` (Sec. 3)."""

    @staticmethod
    def forward(ctx: Any, z_hat: Tensor, lo: Tensor, hi: Tensor, c: float) -> Tensor:
        ctx.save_for_backward(z_hat, lo, hi)
        ctx.c = c
        return z_hat.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, None]:
        z_hat, lo, hi = ctx.saved_tensors
        d_lo, d_hi = connector_gradients(z_hat, lo, hi, ctx.c)
        # ẑ itself is a constant of the step (PGD's output): no gradient to it
        return None, grad * d_lo, grad * d_hi, None


def connect(z_hat: Tensor, lo: Tensor, hi: Tensor, c: float = 0.5) -> Tensor:
    """``ẑ`` (detached; a point of ``[lo, hi]``) carrying the connector's gradients to the box.

    Args:
        z_hat: the latent adversarial example (e.g. from :func:`certfx.train.pgd.pgd_box`).
        lo, hi: the box bounds of the embedding, differentiable w.r.t. the extractor.
        c: the connector's constant in ``[0, 1]`` (0: binary, 1: linear; paper default 0.5).
    """
    if z_hat.shape != lo.shape or lo.shape != hi.shape:
        raise InvalidValueError(f"connect needs ẑ, lo and hi of one shape, got "
                                f"{tuple(z_hat.shape)}, {tuple(lo.shape)}, {tuple(hi.shape)}")
    if not 0 <= c <= 1:
        raise InvalidValueError(f"the connector constant c must lie in [0, 1], got {c}")
    return _Connector.apply(z_hat.detach(), lo, hi, float(c))
