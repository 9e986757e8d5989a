"""Schedules of certified training: ε annealing, the learning rate, CROWN-IBP's β and κ.

Everything is a function of the global step, so a resumed run continues exactly where it stopped.

* ε (Gowal et al. 2018; Shi et al. 2021, as TAPS App. D uses it): ``warmup`` epochs at ε = 0
  (natural training), then ``ramp`` epochs growing to the target, then constant. The ``smooth``
  shape is Zhang et al.'s (CROWN-IBP) smoothed ramp: exponential growth up to ``mid`` of the ramp,
  then linear, with a continuous slope at the joint; ``linear`` is a straight line.
* learning rate: multiplied by ``decay_factor`` at each epoch of ``decay_epochs`` (TAPS App. D.4:
  0.2 at Decay-1 and Decay-2 of its Table 2).

Example:
    >>> s = EpsSchedule(target=0.1, steps_per_epoch=10, warmup=1, ramp=2, shape="linear")
    >>> [round(s(step), 3) for step in (0, 9, 10, 20, 30, 99)]
    [0.0, 0.0, 0.0, 0.05, 0.1, 0.1]
    >>> smooth = EpsSchedule(target=0.1, steps_per_epoch=10, warmup=0, ramp=2)
    >>> 0 < smooth(5) < 0.1 * 5 / 20 and smooth(20) == 0.1
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from certfx.errors import InvalidValueError

__all__ = ["EpsSchedule", "linear_ramp", "lr_factor"]

SHAPES = ("smooth", "linear")


@dataclass(frozen=True)
class EpsSchedule:
    """ε at a global step: 0 during ``warmup`` epochs, a ramp over ``ramp`` epochs, then
    ``target``.

    Attributes:
        target: the final ε (pixel space).
        steps_per_epoch: optimizer steps per epoch.
        warmup: epochs at ε = 0.
        ramp: epochs of growth (0: the target from the first step after the warm-up).
        shape: ``"smooth"`` (exponential then linear) or ``"linear"``.
        mid: where the smooth ramp switches from exponential to linear, as a fraction of it.
        start: ε where the ramp begins (the smooth shape starts from ``start_fraction·target``).
    """

    target: float
    steps_per_epoch: int
    warmup: float = 0.0
    ramp: float = 0.0
    shape: str = "smooth"
    mid: float = 0.25
    start: float = 0.0

    def __post_init__(self) -> None:
        if not self.target >= 0:
            raise InvalidValueError(f"the target ε must be >= 0, got {self.target}")
        if self.steps_per_epoch < 1 or self.warmup < 0 or self.ramp < 0:
            raise InvalidValueError("steps_per_epoch >= 1, warmup >= 0 and ramp >= 0 needed")
        if self.shape not in SHAPES:
            raise InvalidValueError(f"unknown ε schedule shape {self.shape!r}; use one of "
                                    f"{', '.join(SHAPES)}")
        if not 0 < self.mid < 1:
            raise InvalidValueError(f"mid must lie in (0, 1), got {self.mid}")

    def progress(self, step: int) -> float:
        """How far the ramp is at ``step``, in ``[0, 1]``."""
        begin = self.warmup * self.steps_per_epoch
        length = self.ramp * self.steps_per_epoch
        if step < begin:
            return 0.0
        if length <= 0:
            return 1.0
        return min(1.0, (step - begin) / length)

    def __call__(self, step: int) -> float:
        if step < self.warmup * self.steps_per_epoch:
            return 0.0
        t = self.progress(step)
        if t >= 1.0:
            return self.target
        lo, span = self.start, self.target - self.start
        if self.shape == "linear":
            return lo + span * t
        # smooth: f(t) = a·t^p on [0, mid], linear afterwards, value and slope continuous at
        # mid, f(1) = 1; with exponent p = 4 (as in CROWN-IBP's smoothed scheduler)
        p, m = 4.0, self.mid
        # linear part f(t) = f(m) + f'(m)(t − m) with f(m) = a m^p, f'(m) = a p m^(p−1):
        # f(1) = a m^(p−1) (m + p (1 − m)) = 1
        a = 1.0 / (m ** (p - 1) * (m + p * (1 - m)))
        f = a * t ** p if t <= m else a * m ** p + a * p * m ** (p - 1) * (t - m)
        return lo + span * f


def lr_factor(epoch: int, decay_epochs: tuple[int, ...], decay_factor: float) -> float:
    """The learning-rate multiplier in ``epoch`` (0-based): ``decay_factor`` per passed decay.

    >>> lr_factor(55, (50, 60), 0.2)
    0.2
    """
    return decay_factor ** sum(epoch >= d for d in decay_epochs)


def linear_ramp(start: float, end: float, progress: float) -> float:
    """``start + (end − start)·progress`` (CROWN-IBP's β and κ follow the ε ramp's progress).

    >>> linear_ramp(1.0, 0.0, 0.25)
    0.75
    """
    return start + (end - start) * min(max(progress, 0.0), 1.0)
