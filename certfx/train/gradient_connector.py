"""TAPS's gradient connector (paper ``001``, Sec. 3, "Gradient Connector", Fig. 3).

The latent adversarial example ``ẑ ∈ [z_lo, z_hi]`` comes out of a PGD search, which has no
gradient w.r.t. the box. The connector passes ``ẑ`` forward unchanged and defines the pseudo
gradients per dimension (dimensions are independent: a box has no relational information):

    ∂ẑ_i/∂z_lo_i = max(0, 1 − (ẑ_i − z_lo_i) / (c·(z_hi_i − z_lo_i)))
    ∂ẑ_i/∂z_hi_i = max(0, 1 − (z_hi_i − ẑ_i) / (c·(z_hi_i − z_lo_i)))

the *rectified linear* connector with constant ``c ∈ [0, 1]`` (default 0.5). ``c = 1`` is the
linear connector (``(z_hi − ẑ)/(z_hi − z_lo)`` for the lower bound); ``c = 0`` the binary one
(``1`` exactly when ``ẑ`` sits on that bound). Where ``z_lo_i = z_hi_i`` both are 0.5.

Example:
    >>> import torch
    >>> lo, hi = torch.zeros(1, 3, requires_grad=True), torch.ones(1, 3, requires_grad=True)
    >>> z_hat = torch.tensor([[0.0, 0.25, 0.9]])
    >>> connect(z_hat, lo, hi, c=0.5).sum().backward()
    >>> lo.grad.tolist(), [round(v, 2) for v in hi.grad[0].tolist()]
    ([[1.0, 0.5, 0.0]], [0.0, 0.0, 0.8])
"""

from __future__ import annotations

import torch
from torch import Tensor

from certfx.errors import InvalidValueError

__all__ = ["connect", "connector_gradients"]


def connector_gradients(z_hat: Tensor, lo: Tensor, hi: Tensor, c: float
                        ) -> tuple[Tensor, Tensor]:
    """``(∂ẑ/∂z_lo, ∂ẑ/∂z_hi)`` elementwise (see the module docstring)."""
    width = hi - lo
    flat = width <= 0
    if c == 0:  # the binary connector: a sub-gradient of PGD's projection
        d_lo, d_hi = (z_hat == lo).to(z_hat.dtype), (z_hat == hi).to(z_hat.dtype)
    else:
        scale = c * torch.where(flat, torch.ones_like(width), width)
        d_lo = torch.clamp(1 - (z_hat - lo) / scale, min=0)
        d_hi = torch.clamp(1 - (hi - z_hat) / scale, min=0)
    half = torch.full_like(z_hat, 0.5)
    return torch.where(flat, half, d_lo), torch.where(flat, half, d_hi)


class _Connector(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_hat: Tensor, lo: Tensor, hi: Tensor, c: float) -> Tensor:
        ctx.save_for_backward(z_hat, lo, hi)
        ctx.c = c
        return z_hat.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        z_hat, lo, hi = ctx.saved_tensors
        d_lo, d_hi = connector_gradients(z_hat, lo, hi, ctx.c)
        return None, grad * d_lo, grad * d_hi, None


def connect(z_hat: Tensor, lo: Tensor, hi: Tensor, c: float = 0.5) -> Tensor:
    """``ẑ`` (a detached point in ``[lo, hi]``) carrying the connector's gradients to the box."""
    if z_hat.shape != lo.shape or lo.shape != hi.shape:
        raise InvalidValueError(f"connect needs ẑ, lo and hi of one shape, got "
                                f"{tuple(z_hat.shape)}, {tuple(lo.shape)}, {tuple(hi.shape)}")
    if not 0 <= c <= 1:
        raise InvalidValueError(f"the connector constant c must lie in [0, 1], got {c}")
    return _Connector.apply(z_hat.detach(), lo, hi, c)
