"""Certified training: methods as losses over generated graphs, one shared training loop.

A method (:class:`~certfx.train.method.Method`) compiles the abstract and split views of an
ordinary ``nn.Module`` once and maps a batch to a loss; :class:`~certfx.train.loop.Trainer` runs
the schedules, batch-norm statistics, clipping, checkpoints; :func:`~certfx.train.evaluate.evaluate`
measures natural, PGD and certified accuracy afterwards.

Example:
    >>> from certfx.train import METHODS, get_method
    >>> get_method("sabr").Options().lambda_ratio
    0.4
"""

from certfx.train.evaluate import EvalResult, evaluate
from certfx.train.loop import TrainConfig, Trainer, paper_schedule
from certfx.train.method import METHODS, LossOutput, Method, StepContext, get_method

__all__ = [
           "METHODS",
           "EvalResult",
           "LossOutput",
           "Method",
           "StepContext",
           "TrainConfig",
           "Trainer",
           "evaluate",
           "get_method",
           "paper_schedule",
]
