"""ACE's joint entropy loss (paper 000, Sec. 4.1.2, Eq. 6) on top of IBP training.

Entropy selection sends an input to the certification network when the entropy of its softmax is
below a threshold. To make that decision robust, the certification network is trained with

    L_joint = (1 − λ)·L_CE + λ·L_H,     L_H = sign(y_s)·H(softmax(y_b)),  sign(0) = −1,

where ``y_s`` is the example's selection target, computed like the loss it enters: for the robust
(IBP) loss, whether the example is certified by IBP at this step. In the robust loss the entropy is
itself bounded over the ball (interval arithmetic on the log-sum-exp form, Eq. 5, as
:func:`~certfx.domains.interval.box_softmax_entropy`): certified examples minimize the *upper*
bound of their entropy, the others maximize its *lower* bound, which narrows the entropy range
where the selection must be robust and separates the two groups. As in the paper, the first part
of training uses λ = 0 (pre-training, ``pretrain`` of the epochs).

Example:
    >>> import torch
    >>> from certfx.train import TrainConfig, Trainer
    >>> torch.manual_seed(0) is not None
    True
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> x, y = torch.rand(64, 4), torch.randint(0, 3, (64,))
    >>> cfg = TrainConfig(method="ace-entropy", eps=0.01, epochs=2, batch_size=32)
    >>> "entropy_loss" in Trainer(net, x, y, cfg).fit()[-1]
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from certfx.domains.interval import Interval, box_softmax_entropy
from certfx.errors import InvalidValueError
from certfx.train.ibp import IBPOptions, IntervalTraining
from certfx.train.losses import certified
from certfx.train.method import LossOutput, StepContext, option, register_method

__all__ = ["AceEntropy", "AceEntropyOptions", "entropy_loss"]


@dataclass(frozen=True)
class AceEntropyOptions(IBPOptions):
    """IBP's options plus Eq. 6's weight and the pre-training period."""

    entropy_weight: float = option(0.5, "λ of ACE Eq. 6: weight of the entropy loss (0.5 as "
                                        "in ACE Sec. 5)")
    pretrain: float = option(0.5, "fraction of the epochs trained with λ = 0 first")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.entropy_weight <= 1 or not 0 <= self.pretrain < 1:
            raise InvalidValueError("need 0 <= entropy_weight <= 1 and 0 <= pretrain < 1")


def entropy_loss(entropy: Interval, selected: Tensor) -> Tensor:
    """``L_H`` of Eq. 6 with the worst case over the ball: ``+upper(H)`` where ``y_s = 1``,
    ``−lower(H)`` where ``y_s = 0``, averaged over the batch.

    Example:
        >>> h = Interval(torch.tensor([[0.2], [0.5]]), torch.tensor([[0.4], [0.9]]))
        >>> round(float(entropy_loss(h, torch.tensor([True, False]))), 6)
        -0.05
    """
    per_example = torch.where(selected, entropy.upper[:, 0], -entropy.lower[:, 0])
    return per_example.mean()


@register_method
class AceEntropy(IntervalTraining):
    """IBP with ACE's joint entropy loss, for certification networks of entropy selection."""

    name = "ace-entropy"
    Options = AceEntropyOptions
    description = "IBP with ACE's joint entropy loss (Eq. 6) for entropy selection"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits_box = self.compile("box")

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        opts = self.options
        bounds = self.box(x, y, ctx.eps)
        out = self.robust_terms(x, y, ctx.eps, ctx, bounds=bounds)
        total = self.total_epochs or 1
        if opts.entropy_weight == 0 or ctx.epoch < opts.pretrain * total:
            return out
        lower, upper = self.logits_box.certified_forward(x, eps=ctx.eps)
        entropy = box_softmax_entropy(Interval(lower, upper), within_range=False)
        selected = certified(bounds.margins).detach()  # y_s: certified by IBP at this step
        l_h = entropy_loss(entropy, selected)
        out.metrics.update(entropy_loss=l_h.item(), selected=float(selected.float().mean()))
        lam = opts.entropy_weight
        return LossOutput((1 - lam) * out.loss + lam * l_h, out.metrics)
