"""Adversarial attacks: projected gradient descent that searches input sets for counterexamples.

This module only *falsifies*: :func:`pgd_property` looks for a counterexample of a
:class:`~certfx.specs.Property` (an input in its box whose output lies in its unsafe region),
:func:`~certfx.verify.ball_attacks.pgd_ball` for misclassified points in ℓ∞ or ℓ2 balls around
a batch of data points (in its own module, on the helpers here). Both
run PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR
2018) with random restarts and a margin or cross-entropy loss. Nothing is reported as a
counterexample until :func:`recheck` (or its batched twin) has re-run the model concretely on the
point: in float64 on a copy of a torch model, with onnxruntime for an ONNX file; and checked that
the point lies in the input set, exactly, in float64. Tolerances only ever shrink the set
searched (the safe direction): boxes are rounded inward to the model's dtype and ℓ2 points are
pulled strictly inside the ball, so that rounding cannot carry a point out of the set.

Example:
    >>> import torch
    >>> from certfx.specs import Conjunction, Property, UnsafeRegion
    >>> net = torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, -1.0]])), net.bias.zero_()
    >>> # unsafe: y <= -0.5; over [0, 1]^2 the output's minimum is -1, at (0, 1)
    >>> unsafe = UnsafeRegion((Conjunction(torch.ones(1, 1), torch.tensor([-0.5])),))
    >>> prop = Property(torch.zeros(2), torch.ones(2), unsafe)
    >>> result = pgd_property(net, prop, PGDConfig(steps=20, restarts=2))
    >>> result.found, result.violation <= 0, recheck(net, prop, result.x)
    (True, True, True)
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from certfx.errors import CertfxError, InvalidValueError, ShapeError, SpecError
from certfx.specs import Property, UnsafeRegion

__all__ = ["Loss", "Norm", "PGDConfig", "AttackResult", "pgd_property", "recheck"]

ModelArg = nn.Module | str | os.PathLike


class Loss(enum.Enum):
    """The objective PGD ascends.

    ``MARGIN``: the negated violation ``−v`` of one target (Carlini & Wagner, "Towards
    Evaluating the Robustness of Neural Networks", S&P 2017, their f6; for a classifier
    ``max_{j≠y} z_j − z_y``). ``CE``: ``log(1 + Σ_t exp(−v_t))``, which is exactly the
    cross-entropy when the terms are ``z_y − z_j <= 0`` and its smooth generalization otherwise.
    """

    MARGIN = "margin"
    CE = "ce"


class Norm(enum.Enum):
    """The ball's norm and the matching steepest-ascent step (sign for ℓ∞, normalized for ℓ2)."""

    LINF = "linf"
    L2 = "l2"


@dataclass(frozen=True)
class PGDConfig:
    """Settings of a PGD attack.

    Attributes:
        steps: gradient steps per restart (Madry et al. use 40–100).
        restarts: independent random starts.
        step_size: the step as a fraction of the set's radius (ε, or the box's half-width per
            coordinate); ``None`` is Madry et al.'s schedule ``2.5 / steps`` (a constant step
            ``2.5·ε/steps``, long enough to cross the set from any start).
        loss: the objective (:class:`Loss`).
        norm: the ball's norm for :func:`pgd_ball`; :func:`pgd_property` searches boxes (ℓ∞).
        early_stop: stop as soon as every target has a (not yet re-checked) counterexample.
        seed: seed of the random starts (drawn on the CPU, so the same on every device).
        init: optional starting points ``(n, *input_shape)`` used by the first restarts (one
            per restart for a property; one per example, for restart 0, for a ball).
    """

    steps: int = 50
    restarts: int = 5
    step_size: float | None = None
    loss: Loss = Loss.MARGIN
    norm: Norm = Norm.LINF
    early_stop: bool = True
    seed: int = 0
    init: Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.restarts < 1:
            raise InvalidValueError(f"PGDConfig needs steps >= 0 and restarts >= 1, got "
                                    f"steps={self.steps}, restarts={self.restarts}")
        if self.step_size is not None and not self.step_size > 0:
            raise InvalidValueError(f"step_size must be > 0, got {self.step_size}")
        if not isinstance(self.loss, Loss) or not isinstance(self.norm, Norm):
            raise SpecError("PGDConfig.loss must be a Loss and .norm a Norm (e.g. Loss.MARGIN, "
                            f"Norm.L2), got {self.loss!r} and {self.norm!r}")

    @property
    def relative_step(self) -> float:
        """The step as a fraction of the radius."""
        return self.step_size if self.step_size is not None else 2.5 / max(self.steps, 1)


@dataclass(frozen=True)
class AttackResult:
    """The outcome of :func:`pgd_property`.

    Attributes:
        found: a re-checked counterexample was found.
        x: the counterexample, else the best point found; shaped like ``prop.lower``.
        output: the concrete (re-check) output at ``x``, flattened, float64.
        violation: ``min_t max_r (matrix_t @ y − offset_t)_r`` at ``x`` in the re-check; ``<= 0``
            means the output is in the unsafe region.
        reason: why ``found`` is False (empty when found).
        steps: gradient steps taken (all restarts run in parallel).
    """

    found: bool
    x: Tensor
    output: Tensor
    violation: float
    reason: str
    steps: int


# ---- the model --------------------------------------------------------------------------------

class _Target:
    """A model argument: the module to differentiate and how to run it concretely."""

    def __init__(self, model: ModelArg, device: torch.device | None = None, load: bool = True):
        self.path = Path(model) if isinstance(model, (str, os.PathLike)) else None
        self.module: nn.Module | None = model if self.path is None else None
        if self.path is not None and load:
            from certfx.frontends import load as load_model

            self.module = load_model(self.path).to(device or "cpu")
        tensors = ([t for t in (*self.module.parameters(), *self.module.buffers())
                    if t.is_floating_point()] if self.module is not None else [])
        self.dtype = tensors[0].dtype if tensors else torch.float32
        self.device = tensors[0].device if tensors else (device or torch.device("cpu"))

    def input_shape(self, like: Tensor) -> tuple[int, ...]:
        """The per-example input shape: the canonical graph's, when ``like`` fits it."""
        meta = getattr(self.module, "meta", {}) if self.module is not None else {}
        shape = meta.get("certfx.input_shape")
        return tuple(shape) if shape is not None and math.prod(shape) == like.numel() \
            else tuple(like.shape)

    def concrete(self, x: Tensor) -> Tensor:
        """Outputs ``(n, outputs)`` in float64: onnxruntime for a file, else a float64 copy of
        the module (its own forward when the copy cannot run in float64)."""
        with torch.no_grad():
            if self.path is not None:
                from certfx.reference import run_onnx

                return run_onnx(self.path, x.detach().cpu()).double().flatten(1).to(x.device)
            try:
                double = copy.deepcopy(self.module).double().eval()
                return double(x.double()).flatten(1)
            except Exception:  # an op without float64 support: the model's own precision
                with _attack_mode(self.module):
                    return self.module(x.to(self.dtype)).double().flatten(1)


@contextlib.contextmanager
def _attack_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the attack; both are restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        module.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


# ---- the PGD loop -----------------------------------------------------------------------------

def _violations(z: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """``v[n, t] = max_r (A_t z_n − b_t)_r``: ``<= 0`` iff output ``n`` satisfies term ``t``.

    ``matrix`` is ``(T, R, K)`` shared by all outputs or ``(N, T, R, K)`` per output."""
    eq = "nk,trk->ntr" if matrix.dim() == 3 else "nk,ntrk->ntr"
    return (torch.einsum(eq, z, matrix) - offset).amax(-1)


def _objective(v: Tensor, loss: Loss, term: Tensor | None) -> Tensor:
    """The quantity PGD ascends per candidate, from violations ``v`` of shape ``(N, T)``."""
    if loss is Loss.CE:  # log(1 + Σ_t exp(−v_t)): cross-entropy for z_y − z_j <= 0 terms
        return torch.logsumexp(torch.cat([torch.zeros_like(v[:, :1]), -v], 1), 1)
    if term is None:  # Carlini-Wagner margin: −min_t v_t (= max_{j≠y} z_j − z_y)
        return -v.amin(1)
    return -v.gather(1, term[:, None])[:, 0]  # one target term per candidate


def _pgd(forward: Callable[[Tensor], Tensor], x: Tensor, project: Callable[[Tensor], Tensor],
         step: Callable[[Tensor, Tensor], Tensor], score: Callable[[Tensor], tuple[Tensor, Tensor]],
         steps: int, stop: Callable[[Tensor], bool] | None) -> tuple[Tensor, Tensor, int]:
    """Projected gradient ascent ``x ← Π(x + step(∇ loss))`` (Madry et al. 2018, Eq. 2).

    ``score(z)`` gives ``(loss to ascend, violation)``; returns the lowest-violation point seen
    per candidate, that violation, and the number of steps taken."""
    x = project(x).detach()
    best_x, best = x.clone(), torch.full(x.shape[:1], math.inf, dtype=torch.float64,
                                         device=x.device)
    for i in range(steps + 1):
        x.requires_grad_(True)
        with torch.enable_grad():
            loss, violation = score(forward(x).flatten(1))
        violation = violation.detach().double()
        better = violation < best  # NaN never improves
        best = torch.where(better, violation, best)
        best_x[better] = x.detach()[better]
        if i == steps or (stop is not None and stop(best)):
            return best_x, best, i
        (grad,) = torch.autograd.grad(loss.sum(), x)
        x = project(step(x.detach(), torch.nan_to_num(grad))).detach()
    return best_x, best, steps  # pragma: no cover - the loop always returns


def _linf_step(alpha: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Steepest ℓ∞ ascent: ``x + α·sign(∇)``."""
    return lambda x, g: x + alpha * g.sign()


def _l2_step(alpha: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Steepest ℓ2 ascent: ``x + α·∇/‖∇‖₂``."""
    def step(x: Tensor, g: Tensor) -> Tensor:
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
        return x + alpha * g / norm
    return step


def _inward(lo64: Tensor, hi64: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``[lo, hi]`` in ``dtype``, rounded inward so that every point of the rounded box lies
    in the exact one: the only safe direction for a tolerance on the input set."""
    lo, hi = lo64.to(dtype), hi64.to(dtype)
    lo = torch.where(lo.double() < lo64, torch.nextafter(lo, torch.full_like(lo, math.inf)), lo)
    hi = torch.where(hi.double() > hi64, torch.nextafter(hi, torch.full_like(hi, -math.inf)), hi)
    return lo, hi


def _uniform(gen: torch.Generator, lo: Tensor, hi: Tensor, n: int) -> Tensor:
    """``n`` points uniform in the box, per candidate (``lo`` is ``(n, …)`` or broadcasts)."""
    u = torch.rand((n, *lo.shape[1:]), generator=gen, dtype=torch.float64).to(lo.device)
    return (lo.double() + (hi.double() - lo.double()) * u).to(lo.dtype)


# ---- properties (boxes, VNN-LIB) --------------------------------------------------------------

def _terms(region: UnsafeRegion, dtype: torch.dtype, device: torch.device) -> tuple[Tensor,
                                                                                     Tensor]:
    """The terms stacked as ``(T, R, K)`` and ``(T, R)``; a term with fewer rows repeats its
    first row, which leaves the max over its rows unchanged."""
    rows = max(t.matrix.shape[0] for t in region.terms)
    pad = [(torch.cat([t.matrix, t.matrix[:1].expand(rows - len(t.matrix), -1)]),
            torch.cat([t.offset, t.offset[:1].expand(rows - len(t.offset))])) for t in region.terms]
    return (torch.stack([m.to(device, dtype) for m, _ in pad]),
            torch.stack([o.to(device, dtype) for _, o in pad]))


def _recheck_property(target: _Target, prop: Property, x: Tensor,
                      shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Concrete check of candidates ``x`` ``(n, *shape)``: ``(ok, violation, outputs,
    reasons)``. The box is checked exactly in float64 (no tolerance), the region too."""
    xd = x.reshape(len(x), -1).double()
    lo, hi = (b.to(xd.device).double().flatten() for b in (prop.lower, prop.upper))
    excess = torch.maximum(lo - xd, xd - hi).amax(1)
    z = target.concrete(x.reshape(len(x), *shape))
    if z.shape[1] != prop.unsafe.num_outputs:
        raise ShapeError(f"the model has {z.shape[1]} outputs, the property reads "
                         f"{prop.unsafe.num_outputs}")
    matrix, offset = _terms(prop.unsafe, torch.float64, z.device)
    violation = _violations(z, matrix, offset).amin(1)
    unsafe = prop.unsafe.contains(z)
    ok = (excess <= 0) & unsafe
    reasons = ["" if k else (f"outside the input box by {float(e):.3g}" if e > 0 else
                             f"output not in the unsafe region (violation {float(v):.3g} in "
                             "the concrete re-check)")
               for k, e, v in zip(ok.tolist(), excess.tolist(), violation.tolist())]
    return ok.cpu(), violation.cpu(), z.cpu(), reasons


def recheck(model_or_onnx_path: ModelArg, prop: Property, x: Tensor) -> bool:
    """Whether ``x`` is a genuine counterexample of ``prop``, by a concrete forward pass.

    Args:
        model_or_onnx_path: a torch model (run in float64 on a copy) or an ONNX file (run with
            onnxruntime).
        prop: the property; ``x`` must lie in its box exactly (no tolerance) and its output in
            ``prop.unsafe``.
        x: one input, shaped like ``prop.lower`` or the model's input, optionally with a batch
            dim of 1.
    """
    target = _Target(model_or_onnx_path, load=False)
    if target.path is not None:
        try:
            target.module = _Target(target.path).module  # only for its input shape
        except CertfxError:
            pass
    if x.numel() != prop.lower.numel():
        raise ShapeError(f"recheck takes one input of {prop.lower.numel()} values, got x of "
                         f"shape {tuple(x.shape)}")
    shape = target.input_shape(prop.lower)
    x = x.reshape(1, *shape).to(target.device)
    return bool(_recheck_property(target, prop, x, shape)[0][0])


def pgd_property(model: ModelArg, prop: Property, config: PGDConfig | None = None,
                 deadline: float | None = None) -> AttackResult:
    """Search the box ``[prop.lower, prop.upper]`` for an input whose output is in ``prop.unsafe``.

    PGD minimizes the violation ``v_t(y) = max_r (matrix_t @ y − offset_t)_r`` of the unsafe
    region's terms (``v_t <= 0``: term ``t`` holds). With ``Loss.MARGIN`` every restart runs one
    candidate per term, each descending its own ``v_t`` (the min over terms is not smooth, and
    attacking the terms separately lets every disjunct be tried); with ``Loss.CE`` every restart
    ascends ``log(1 + Σ_t exp(−v_t))`` for the whole region. Sign-gradient steps, scaled per
    coordinate by the box's half-width, are projected onto the box after each step. All
    candidates run as one batch; those with ``v <= 0`` are re-checked concretely, best first.

    Args:
        model: a torch model callable on a batch, or an ONNX path (differentiated through
            :func:`certfx.load`, re-checked with onnxruntime).
        prop: the input box and unsafe region.
        config: the attack settings; ``config.norm`` must be ``Norm.LINF``.
        deadline: a ``time.perf_counter()`` value after which PGD stops at its next step
            (the best points so far are still re-checked); ``None``: no limit.

    Raises:
        SpecError: ``config.norm`` is ``Norm.L2`` (a box has no ℓ2 radius; see :func:`pgd_ball`).
    """
    cfg = config or PGDConfig()
    if cfg.norm is not Norm.LINF:
        raise SpecError("pgd_property searches a box, an ℓ∞ set; use Norm.LINF (ℓ2 balls are "
                        "attacked by pgd_ball)")
    target = _Target(model, prop.lower.device)
    shape, dtype, device = target.input_shape(prop.lower), target.dtype, target.device
    lo64, hi64 = (b.to(device, torch.float64).reshape(1, *shape) for b in (prop.lower, prop.upper))
    lo, hi = _inward(lo64, hi64, dtype)
    matrix, offset = _terms(prop.unsafe, dtype, device)
    per_term = matrix.shape[0] if cfg.loss is Loss.MARGIN else 1
    init = [] if cfg.init is None else list(cfg.init.reshape(-1, *shape).to(device, dtype))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = max(cfg.restarts, len(init)) * per_term
    starts = _uniform(gen, lo, hi, n)
    for i, point in enumerate(init):
        starts[i * per_term:(i + 1) * per_term] = point
    term = torch.arange(n, device=device) % per_term if per_term > 1 else None

    def score(z: Tensor) -> tuple[Tensor, Tensor]:
        v = _violations(z, matrix, offset)
        return _objective(v, cfg.loss, term), v.amin(1)

    alpha = (cfg.relative_step * (hi64 - lo64) / 2).to(dtype)  # step ∝ per-coordinate radius
    def stop(b: Tensor) -> bool:
        if cfg.early_stop and bool((b <= 0).any()):
            return True
        return deadline is not None and time.perf_counter() > deadline

    with _attack_mode(target.module):
        xs, best, taken = _pgd(target.module, starts, lambda x: torch.clamp(x, lo, hi),
                               _linf_step(alpha), score, cfg.steps, stop)
    order = best.argsort()
    pick = order[best[order] <= 0] if bool((best <= 0).any()) else order[:1]
    ok, violation, z, reasons = _recheck_property(target, prop, xs[pick], shape)
    k = int(ok.float().argmax()) if bool(ok.any()) else 0
    reason = reasons[k]
    if not bool(ok.any()) and float(best[order[0]]) > 0:
        reason = (f"no counterexample in {n} candidate(s) × {cfg.steps} steps; best violation "
                  f"{float(violation[k]):.3g}")
    elif not bool(ok.any()):
        reason = f"PGD candidates failed the concrete re-check: {reason}"
    return AttackResult(bool(ok.any()), xs[pick[k]].detach().reshape(prop.lower.shape),
                        z[k], float(violation[k]), reason, taken)
