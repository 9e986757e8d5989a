"""Batch normalization during certified training.

The canonical graph evaluates batch norm with the module's ``running_mean``/``running_var``
(an affine map every domain handles). During a training step certfx sets those buffers to the
statistics of the current clean batch, runs every loss term (natural, adversarial and bounds) with
the model in eval mode, and afterwards restores the running averages, updated with the module's
momentum. So the bounds and the concrete outputs use the same normalization within a step (the
bounds are sound for the network with this batch's statistics), as in Shi et al. (2021) and the
SABR/TAPS code. The statistics are constants of the step: gradients do not flow through them
(a simplification against PyTorch's train-mode batch norm; noted in the README).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> x = torch.randn(16, 2) * 3 + 5
    >>> with batch_statistics(net, x):
    ...     out, mode_inside = net(x), net.training
    >>> bool(out.mean(0).abs().max() < 1e-4), mode_inside
    (True, False)
    >>> net.training, bool((net[1].running_mean != 0).all())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["batch_statistics"]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@contextmanager
def batch_statistics(model: nn.Module, x: Tensor) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and its batch norms normalizing by the
    statistics of the clean batch ``x`` (biased variance, as train-mode batch norm uses)."""
    was_training = model.training
    norms = _batch_norms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in norms]
    counts: dict[nn.Module, int] = {}
    if norms and was_training:
        def use_batch_statistics(m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            # the input is already normalized by the batch statistics of the norms before m
            z = inputs[0]
            dims = [0] + list(range(2, z.dim()))
            m.running_mean.copy_(z.mean(dims))
            m.running_var.copy_(z.var(dims, unbiased=False))
            counts[m] = z.numel() // z.shape[1]

        handles = [m.register_forward_pre_hook(use_batch_statistics) for m in norms]
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
    else:
        model.eval()
    try:
        yield
    finally:
        if norms and was_training:
            with torch.no_grad():
                for m, (mean, var, momentum) in zip(norms, saved):
                    if m not in counts:  # the clean pass skipped this norm: keep its averages
                        m.running_mean.copy_(mean)
                        m.running_var.copy_(var)
                        continue
                    rate = 0.1 if momentum is None else momentum
                    n = counts[m]
                    batch_var = m.running_var * (n / max(n - 1, 1))  # unbiased, as PyTorch keeps
                    m.running_mean.copy_((1 - rate) * mean + rate * m.running_mean)
                    m.running_var.copy_((1 - rate) * var + rate * batch_var)
        model.train(was_training)
