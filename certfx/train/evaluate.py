"""Evaluation after training: natural, PGD and certified accuracy on a test set.

* natural: the prediction on the clean input is the label;
* PGD (Madry et al. 2018, with restarts; a point counts as broken only after the concrete
  re-check of :func:`certfx.verify.pgd_ball`): correct and not broken;
* certified: correct and proven for the whole ε-ball (clipped to the valid range), by one domain
  (``box``, ``crown``, … — every margin bound above the cascade's float32 tolerance) or by the
  verification cascade (``cascade``: attack → box → deepz → crown → α-crown → MILP, per example,
  with a time limit), on the examples that are correct and survived PGD; or by COLT's
  certification (``colt``, paper ``003_…`` Sec. 6–7): linear relaxations with learned slopes
  (α-CROWN), then partial MILP with binaries for the last ReLU layer, then for the last two (the
  layers before them by their triangle relaxation), each stage on what is still open.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.eye(2)); _ = net[0].bias.zero_()
    >>> x, y = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]]), torch.tensor([0, 0, 0])
    >>> r = evaluate(net, x, y, eps=0.1, cert="box", pgd_steps=10, pgd_restarts=1)
    >>> r.natural, r.pgd, r.certified
    (0.6667, 0.3333, 0.3333)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from certfx.errors import InvalidValueError
from certfx.specs import LinfBall

__all__ = ["CERT_CHOICES", "EvalResult", "evaluate"]

CERT_CHOICES = ("box", "deepz", "deeppoly", "crown", "crown-ibp", "alpha-crown", "cascade",
                "colt", "none")


@dataclass
class EvalResult:
    """Accuracies in ``[0, 1]`` (rounded to 4 digits) and how they were measured."""

    examples: int
    eps: float
    natural: float
    pgd: float
    certified: float | None
    cert_method: str
    pgd_steps: int
    pgd_restarts: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float, cert: str = "crown",
             batch_size: int = 256, pgd_steps: int = 50, pgd_restarts: int = 5,
             valid: tuple[float, float] = (0.0, 1.0), cascade_timeout: float = 10.0,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Natural, PGD and certified accuracy of ``model`` on ``(x, y)`` at radius ``eps``."""
    import time

    import certfx
    from certfx.verify import PGDConfig, pgd_ball

    if cert not in CERT_CHOICES:
        raise InvalidValueError(f"unknown certification {cert!r}; choose one of "
                                f"{', '.join(CERT_CHOICES)}")
    if not eps >= 0 or math.isinf(eps):
        raise InvalidValueError(f"eps must be a finite radius >= 0, got {eps}")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    correct = torch.zeros(n, dtype=torch.bool, device=device)
    robust = torch.zeros_like(correct)
    proven = torch.zeros_like(correct)
    bounds = None
    if cert not in ("cascade", "none"):  # COLT's first stage: α-CROWN on the batch
        bounds = certfx.compile(model, domain="alpha-crown" if cert == "colt" else cert,
                                input_spec=LinfBall(eps, *valid), example_input=x[:1])
    config = PGDConfig(steps=pgd_steps, restarts=pgd_restarts)
    tolerance = 1e-5  # as the cascade's float32 tolerance: a margin in (0, 1e-5] is unproven
    for part in _batches(n, batch_size):
        xb, yb = x[part], y[part]
        with torch.no_grad():
            correct[part] = model(xb).argmax(1) == yb
        if eps > 0:
            attacked = pgd_ball(model, xb, yb, eps, config=config, lower=valid[0],
                                upper=valid[1]).found.to(device)
            robust[part] = correct[part] & ~attacked
        else:
            robust[part] = correct[part]
        if bounds is not None:
            with torch.no_grad():
                margins = bounds.certified_forward(xb, yb)
            proven[part] = correct[part] & (margins > tolerance).all(1)
        if progress is not None:
            progress(part.stop, n)
    if cert == "cascade":
        proven = robust & _cascade(model, x, y, robust, eps, valid, cascade_timeout)
    elif cert == "colt":  # partial MILP on what α-CROWN left open
        proven = proven | (robust & _cascade(model, x, y, robust & ~proven, eps, valid,
                                             cascade_timeout, partial_milp=True))
    if was_training:
        model.train()
    return EvalResult(n, eps, round(float(correct.float().mean()), 4),
                      round(float(robust.float().mean()), 4),
                      None if cert == "none" else round(float(proven.float().mean()), 4),
                      cert, pgd_steps, pgd_restarts, round(time.perf_counter() - start, 2))


def _cascade(model: nn.Module, x: Tensor, y: Tensor, todo: Tensor, eps: float,
             valid: tuple[float, float], timeout: float, partial_milp: bool = False) -> Tensor:
    """Which of the ``todo`` examples the verification cascade proves robust, in ``timeout``
    seconds each. With ``partial_milp``, COLT's last stages instead (Sec. 7, "Certification"):
    MILP with binaries for the last ReLU layer only, then for the last two, half the time each
    (the layers before are encoded by their triangle relaxation, with CROWN's intermediate
    bounds: at least as tight as the DeepZ/DeepPoly region the paper starts the MILP from)."""
    from certfx.backends.milp import MilpOptions
    from certfx.specs import Property, UnsafeRegion
    from certfx.verify.cascade import CascadeOptions, Verdict, Verifier

    out = torch.zeros_like(todo)
    if not bool(todo.any()):
        return out
    k = int(model(x[:1]).shape[1])
    if partial_milp:
        stages = [CascadeOptions(methods=("milp",), timeout=timeout / 2,
                                 milp=MilpOptions(exact_layers=layers, allow_relaxation=True))
                  for layers in (1, 2)]
    else:
        stages = [CascadeOptions(timeout=timeout)]
    for options in stages:
        verifier = Verifier(model, example_input=x[:1].cpu(), options=options)
        for i in (todo & ~out).nonzero().flatten().tolist():
            lo = (x[i] - eps).clamp(*valid).cpu().double()
            hi = (x[i] + eps).clamp(*valid).cpu().double()
            prop = Property(lo, hi, UnsafeRegion.misclassified(int(y[i]), k), f"#{i}")
            out[i] = verifier.verify(prop).verdict is Verdict.VERIFIED
    return out
