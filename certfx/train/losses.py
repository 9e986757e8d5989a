"""Losses on bounds: the robust cross-entropy of certified training.

Given lower bounds ``m_j`` on the margins ``z_y − z_j`` over the input region, the worst-case
logits relative to the true class are ``z_y − z_j = m_j``; the cross-entropy of those logits,
``log(1 + Σ_j exp(−m_j))``, upper-bounds the cross-entropy of every point of the region (Wong &
Kolter 2018, Thm. 2; Gowal et al. 2018, Eq. 7 with the specification folded into the last layer).

Example:
    >>> import torch
    >>> m = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])
    >>> [round(v, 4) for v in robust_ce(m, reduction="none").tolist()]
    [0.1698, 1.4644]
    >>> certified(m).tolist()
    [True, False]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["certified", "robust_ce", "worst_case_logits"]


def worst_case_logits(margins: Tensor) -> Tensor:
    """Logits ``[0, −m_1, …, −m_{K−1}]`` (true class first) from margin lower bounds."""
    return torch.cat([torch.zeros_like(margins[:, :1]), -margins], dim=1)


def robust_ce(margins: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the worst-case logits, ``log(1 + Σ_j exp(−m_j))``."""
    target = torch.zeros(margins.shape[0], dtype=torch.long, device=margins.device)
    return F.cross_entropy(worst_case_logits(margins), target, reduction=reduction)


def certified(margins: Tensor) -> Tensor:
    """Which examples are certified: every margin lower bound positive."""
    return (margins > 0).all(dim=1)
