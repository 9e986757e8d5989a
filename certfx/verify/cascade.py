"""The verification cascade: attack, then ever more precise bounds, then MILP, per property.

For each :class:`~certfx.specs.Property` (an input box and an unsafe output region, a
disjunction of conjunctions ``C y <= d``) the stages run in order, each only on what is still
open, and the first definite answer ends the property:

* ``attack``: PGD (:func:`~certfx.verify.attacks.pgd_property`) with the cheap ``attack``
  settings; once the bound stages have failed, a stronger ``retry_attack`` runs before
  ``split``/``milp``. A counterexample is reported only after a concrete re-check: a float64
  forward of the network and, for an ONNX model, onnxruntime on the original file. Answer:
  *falsified*.
* bound stages (``box``, ``deepz``, ``deeppoly``, ``crown``, ``alpha-crown``, any registered
  domain): lower bounds of every open term's rows ``C_r y − d_r`` over the box. A term is empty
  when some row's bound exceeds the tolerance; terms shown empty stay closed for later stages.
  Every term empty: *verified*.
* ``split``: branch and bound; it gets ``split_share`` of the time left when MILP follows and
  can encode the network exactly (with sigmoid or tanh, MILP relaxes them no tighter than the
  branches' bounds, so ``split`` gets all the time and MILP only what it leaves). For
  inputs of at most :data:`~certfx.verify.split.MAX_INPUTS` values, bisecting the input box
  (:mod:`certfx.verify.split`) with the ``split_domain``'s bounds; an unsafe point it meets is
  re-checked like an attack's. For larger inputs, splitting unstable neurons
  (:mod:`certfx.verify.relu_split`, α,β-CROWN style), which only ever proves.
* ``milp``: the exact MILP backend (:mod:`certfx.backends.milp`) on the remaining time, its
  counterexamples re-checked the same way.

Floating point: bounds are computed in ``dtype`` (float32 by default, float64 on request). A
row counts as positive only when its lower bound exceeds ``tolerance`` — by default ``1e-5``
in float32 and ``1e-9`` in float64, a margin far above the rounding error of the bound
computations on the networks of VNN-COMP (sums of a few thousand products of values of order
one) — so a true margin in ``(0, tolerance]`` is answered *unknown*, never wrongly verified.
Results name the dtype and tolerance.

Example:
    >>> import torch, certfx
    >>> from certfx.specs import Property, UnsafeRegion
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())  # y = relu(x)
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.eye(2)); _ = net[0].bias.zero_()
    >>> x = torch.tensor([0.6, 0.4])  # class 0
    >>> verifier = Verifier(net, example_input=x[None])
    >>> props = [Property(x - 0.05, x + 0.05, UnsafeRegion.misclassified(0, 2), "near"),
    ...          Property(x - 0.5, x + 0.5, UnsafeRegion.misclassified(0, 2), "far")]
    >>> [r.verdict.value for r in map(verifier.verify, props)]
    ['verified', 'falsified']
"""

from __future__ import annotations

import copy
import enum
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from certfx.compile import LOWER_ONLY_KEY, CertifiedModule
from certfx.compile import compile as compile_model
from certfx.domains import available_domains, get_domain
from certfx.domains.crown import AlphaCrownOptions, optimization_deadline
from certfx.errors import (CertfxError, InvalidValueError, ShapeError, SpecError,
                           UnsupportedOpsError)
from certfx.specs import Box, Property
from certfx.verify.attacks import Loss, PGDConfig, pgd_property, recheck
from certfx.verify.relu_split import AlphaCrownBranches, relu_split_verify, splittable
from certfx.verify.split import MAX_INPUTS, split_verify

__all__ = ["Verdict", "CascadeOptions", "PropertyResult", "Verifier", "DEFAULT_METHODS",
           "default_tolerance", "combined_verdict"]

DEFAULT_METHODS = ("attack", "box", "deepz", "crown", "alpha-crown", "split", "milp")
_SPECIAL = ("attack", "split", "milp")


class Verdict(enum.Enum):
    """The answer for one property."""

    VERIFIED = "verified"    # no input in the box has an output in the unsafe region
    FALSIFIED = "falsified"  # a re-checked counterexample
    UNKNOWN = "unknown"      # every stage ran out of precision
    TIMEOUT = "timeout"      # the time limit ended the cascade first


def default_tolerance(dtype: torch.dtype) -> float:
    """The margin a bound must exceed to count as positive (see the module docstring)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


@dataclass(frozen=True)
class CascadeOptions:
    """Settings of :class:`Verifier`.

    Attributes:
        methods: the stages in order (``attack``, domain names, ``milp``).
        timeout: seconds per property (all stages together).
        dtype: ``torch.float32`` or ``torch.float64`` for every bound computation.
        tolerance: a bound must exceed this to prove a row (``None``: by dtype).
        attack: the PGD settings of the first attack.
        retry_attack: a stronger attack run after the bound stages (``None``: none).
        split_domain: the domain bounding the input pieces of ``split`` (neuron splitting
            always uses alpha-crown: it needs its intermediate bounds and slopes).
        split_share: the share of the time left that ``split`` gets when ``milp`` follows.
        milp: :class:`~certfx.backends.milp.MilpOptions` (its time limit is replaced by what is
            left of ``timeout``); ``None`` for the defaults.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    timeout: float = 60.0
    dtype: torch.dtype = torch.float32
    tolerance: float | None = None
    attack: PGDConfig = PGDConfig(steps=20, restarts=3)
    retry_attack: PGDConfig | None = PGDConfig(steps=200, restarts=100, loss=Loss.CE, seed=1)
    split_domain: str = "crown"
    split_share: float = 0.5
    milp: Any = None

    def __post_init__(self) -> None:
        if not self.methods:
            raise InvalidValueError("no verification methods chosen; pass e.g. "
                                    f"{','.join(DEFAULT_METHODS)}")
        known = set(available_domains()) | set(_SPECIAL)
        unknown = [m for m in self.methods if m not in known and not _is_domain(m)]
        if unknown:
            raise InvalidValueError(f"unknown verification method(s) {unknown}; choose from "
                                    f"{', '.join(sorted(known))}")
        if not (self.timeout > 0) or math.isinf(self.timeout):
            raise InvalidValueError(f"timeout must be a positive number of seconds, got "
                                    f"{self.timeout}")
        if self.dtype not in (torch.float32, torch.float64):
            raise InvalidValueError(f"dtype must be float32 or float64, got {self.dtype}")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise InvalidValueError(f"tolerance must be >= 0, got {self.tolerance}")

    @property
    def margin_tolerance(self) -> float:
        """The tolerance in force."""
        return default_tolerance(self.dtype) if self.tolerance is None else self.tolerance


def _is_domain(name: str) -> bool:
    try:
        get_domain(name)
    except (KeyError, ValueError, CertfxError):
        return False
    return True


@dataclass
class PropertyResult:
    """What the cascade found for one property.

    Attributes:
        name: the property's name.
        verdict: the answer.
        stage: the stage that decided it (``None`` for unknown/timeout).
        seconds: total time.
        stage_seconds: time per stage that ran.
        open_terms: per stage, the terms still open after it.
        counterexample: the re-checked input ``(*input_shape)`` when falsified.
        output: its float64 output (flattened).
        dtype, tolerance: the floating-point settings of the bounds.
        notes: anything worth knowing (re-check failures, MILP notes).
    """

    name: str
    verdict: Verdict
    stage: str | None
    seconds: float
    stage_seconds: dict[str, float]
    open_terms: dict[str, int]
    counterexample: Tensor | None
    output: Tensor | None
    dtype: str
    tolerance: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {"name": self.name, "verdict": self.verdict.value, "stage": self.stage,
                "seconds": round(self.seconds, 6),
                "stage_seconds": {k: round(v, 6) for k, v in self.stage_seconds.items()},
                "open_terms": self.open_terms, "dtype": self.dtype,
                "tolerance": self.tolerance, "notes": self.notes,
                "counterexample": None if self.counterexample is None
                else self.counterexample.flatten().tolist(),
                "output": None if self.output is None else self.output.flatten().tolist()}


class Verifier:
    """Runs the cascade on properties of one network (domains are compiled once, lazily).

    Args:
        model: an ONNX path, an ``nn.Module`` (with ``example_input``) or a canonical graph.
        example_input: one input batch for an ``nn.Module``.
        options: the cascade's settings.
    """

    def __init__(self, model: Any, example_input: Tensor | None = None,
                 options: CascadeOptions | None = None):
        from certfx.frontends import load

        self.options = options or CascadeOptions()
        self.onnx_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
        canonical = load(model, example_input)
        self.graph: fx.GraphModule = copy.deepcopy(canonical).to(self.options.dtype)
        self.graph64: fx.GraphModule = copy.deepcopy(canonical).to(torch.float64)
        self.input_shape = tuple(canonical.meta["certfx.input_shape"])
        self.num_outputs = math.prod(canonical.meta["certfx.output_shape"])
        self.milp_exact = _milp_exact(canonical)
        self._compiled: dict[str, CertifiedModule] = {}

    # -- stages ---------------------------------------------------------------------------
    def _bounds(self, domain: str) -> CertifiedModule:
        if domain not in self._compiled:
            self._compiled[domain] = compile_model(self.graph, domain=domain)
        return self._compiled[domain]

    def _open_after_bounds(self, domain: str, prop: Property, lower: Tensor, upper: Tensor,
                           open_terms: list[int]) -> list[int]:
        """The terms of ``open_terms`` that ``domain`` cannot show empty."""
        cm = self._bounds(domain)
        terms = [prop.unsafe.terms[i] for i in open_terms]
        dtype = self.options.dtype
        spec = torch.cat([t.matrix.to(dtype) for t in terms]).unsqueeze(0)
        offset = torch.cat([t.offset.to(dtype) for t in terms])
        with torch.no_grad():
            if cm.bounds.meta.get(LOWER_ONLY_KEY):
                rows = cm.bounds(lower, upper, spec, bound_upper=False).lower[0]
            else:
                rows = cm.bounds(lower, upper, spec).lower[0]
        proven = (rows - offset) > self.options.margin_tolerance  # NaN compares False
        still, first = [], 0
        for index, term in zip(open_terms, terms):
            count = term.matrix.shape[0]
            if not bool(proven[first:first + count].any()):
                still.append(index)
            first += count
        return still

    def _confirm(self, x: Tensor, prop: Property, notes: list[str]
                 ) -> tuple[Tensor, Tensor] | None:
        """``x`` in float64 and its float64 output when ``x`` is a counterexample for the
        network *and* (for an ONNX model) for onnxruntime on the original file; else
        ``None``."""
        x64 = x.detach().to(torch.float64).reshape(1, *self.input_shape)
        with torch.no_grad():
            y = self.graph64(x64).reshape(1, -1)
        if not bool(prop.is_counterexample(x64, y)[0]):
            notes.append("a candidate counterexample failed the float64 re-check")
            return None
        if self.onnx_path is not None and not recheck(self.onnx_path, prop, x64):
            notes.append("a candidate counterexample failed the onnxruntime re-check")
            return None
        return x64.reshape(self.input_shape), y[0]

    def _attack(self, prop: Property, config: PGDConfig, notes: list[str], deadline: float
                ) -> tuple[Tensor, Tensor] | None:
        result = pgd_property(self.graph, prop, config, deadline=deadline)
        return self._confirm(result.x, prop, notes) if result.found else None

    def _split(self, prop: Property, lower: Tensor, upper: Tensor, open_terms: list[int],
               seconds: float, notes: list[str]
               ) -> tuple[Verdict | None, tuple[Tensor, Tensor] | None]:
        if lower.numel() > MAX_INPUTS:
            return self._relu_split(prop, lower, upper, open_terms, seconds, notes), None
        cm = self._bounds(self.options.split_domain)

        def bound_rows(lo: Tensor, hi: Tensor, spec: Tensor) -> Tensor:
            if cm.bounds.meta.get(LOWER_ONLY_KEY):
                return cm.bounds(lo, hi, spec, bound_upper=False).lower
            return cm.bounds(lo, hi, spec).lower

        out = split_verify(bound_rows, self.graph, lower, upper, prop.unsafe, open_terms,
                           self.options.margin_tolerance, time.perf_counter() + seconds)
        notes.append(f"split: {out.boxes} boxes bounded, {out.status}")
        if out.status == "verified":
            return Verdict.VERIFIED, None
        if out.status == "candidate" and out.x is not None:
            witness = self._confirm(out.x, prop, notes)
            if witness is not None:
                return Verdict.FALSIFIED, witness
        return None, None

    def _relu_split(self, prop: Property, lower: Tensor, upper: Tensor, open_terms: list[int],
                    seconds: float, notes: list[str]) -> Verdict | None:
        try:
            bounds = self._bounds("alpha-crown").bounds
            key = "alpha-crown, optimize_intermediate"  # the root's bounds (AlphaCrownBranches)
            if key not in self._compiled:
                self._compiled[key] = compile_model(
                    self.graph, domain="alpha-crown",
                    domain_options=AlphaCrownOptions(optimize_intermediate=True))
        except CertfxError as err:
            notes.append(f"split skipped: {str(err).splitlines()[0]}")
            return None
        if not splittable(bounds):
            notes.append("split skipped: no relaxed neuron to split")
            return None
        branches = AlphaCrownBranches(bounds, root=self._compiled[key].bounds)
        out = relu_split_verify(branches, lower, upper, prop.unsafe, open_terms,
                                self.options.margin_tolerance, time.perf_counter() + seconds)
        notes.append(f"split: {out.branches} neuron branches bounded, {out.status}")
        return Verdict.VERIFIED if out.status == "verified" else None

    def _milp(self, prop: Property, seconds: float, notes: list[str]
              ) -> tuple[Verdict | None, tuple[Tensor, Tensor] | None]:
        from certfx.backends.milp import MilpOptions, MilpStatus, verify_property

        # smooth activations (sigmoid, tanh) get a sound relaxation: then "infeasible" is still
        # a proof, and a solution only a candidate for the concrete re-check
        options = replace(self.options.milp or MilpOptions(allow_relaxation=True),
                          time_limit=max(seconds, 0.01))
        try:
            result = verify_property(self.graph64, prop, options)
        except UnsupportedOpsError as err:
            notes.append(f"milp skipped: {str(err).splitlines()[0]}")
            return None, None
        notes.extend(result.stats.notes)
        if result.status is MilpStatus.FALSIFIED and result.counterexample is not None:
            witness = self._confirm(result.counterexample, prop, notes)
            return (Verdict.FALSIFIED, witness) if witness is not None else (None, None)
        if result.status is MilpStatus.VERIFIED:
            return Verdict.VERIFIED, None
        if result.status is MilpStatus.TIMEOUT:
            return Verdict.TIMEOUT, None
        return None, None

    # -- the cascade ----------------------------------------------------------------------
    def check(self, prop: Property) -> None:
        """Raise a clear error when ``prop`` does not fit the network."""
        size = math.prod(self.input_shape)
        if prop.lower.numel() != size:
            raise ShapeError(f"property '{prop.name}' constrains {prop.lower.numel()} inputs, "
                             f"but the network takes {size} {self.input_shape}")
        if prop.unsafe.num_outputs != self.num_outputs:
            raise SpecError(f"property '{prop.name}' constrains {prop.unsafe.num_outputs} "
                            f"outputs, but the network has {self.num_outputs}")

    def verify(self, prop: Property,
               on_stage: Callable[[str], None] | None = None) -> PropertyResult:
        """Run the cascade on one property (``on_stage(name)`` is called as each starts)."""
        self.check(prop)
        options = self.options
        start = time.perf_counter()
        deadline = start + options.timeout
        dtype = options.dtype
        lower = prop.lower.to(dtype).reshape(1, *self.input_shape)
        upper = prop.upper.to(dtype).reshape(1, *self.input_shape)
        Box(lower, upper)  # validates the box once more after the cast
        open_terms = list(range(len(prop.unsafe.terms)))
        stage_seconds: dict[str, float] = {}
        remaining: dict[str, int] = {}
        notes: list[str] = []
        verdict, decided_by, witness = Verdict.UNKNOWN, None, None
        stages = list(options.methods)
        if "attack" in stages and options.retry_attack is not None:
            # the stronger attack goes right after the last bound stage
            last_bound = max((i for i, m in enumerate(stages) if m not in _SPECIAL), default=-1)
            stages.insert(max(last_bound, stages.index("attack")) + 1, "retry-attack")
        for stage in stages:
            left = deadline - time.perf_counter()
            if left <= 0:
                verdict = Verdict.TIMEOUT
                break
            if on_stage is not None:
                on_stage(stage)
            began = time.perf_counter()
            if stage in ("attack", "retry-attack"):
                config = options.attack if stage == "attack" else options.retry_attack
                witness = self._attack(prop, config, notes, deadline)
                outcome = Verdict.FALSIFIED if witness is not None else None
            elif stage == "split":
                share = options.split_share if "milp" in stages[stages.index(stage):] \
                    and self.milp_exact else 1.0
                with optimization_deadline(began + left * share):
                    outcome, witness = self._split(prop, lower, upper, open_terms, left * share,
                                                   notes)
            elif stage == "milp":
                outcome, witness = self._milp(prop, left, notes)
            else:  # α-CROWN's Adam steps stop at the deadline (with sound bounds so far)
                with optimization_deadline(deadline):
                    open_terms = self._open_after_bounds(stage, prop, lower, upper, open_terms)
                remaining[stage] = len(open_terms)
                outcome = None if open_terms else Verdict.VERIFIED
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - began
            if outcome is Verdict.TIMEOUT:
                verdict = Verdict.TIMEOUT
                break
            if outcome is not None:
                verdict, decided_by = outcome, stage
                break
        else:
            if time.perf_counter() > deadline:
                verdict = Verdict.TIMEOUT
        x, y = witness if (verdict is Verdict.FALSIFIED and witness) else (None, None)
        return PropertyResult(prop.name, verdict, decided_by, time.perf_counter() - start,
                              stage_seconds, remaining, x, y, str(dtype).replace("torch.", ""),
                              options.margin_tolerance, notes)

    def verify_all(self, props: Iterable[Property],
                   on_stage: Callable[[str], None] | None = None) -> list[PropertyResult]:
        """:meth:`verify` on every property, in order."""
        return [self.verify(p, on_stage) for p in props]


def _milp_exact(graph: fx.GraphModule) -> bool:
    """Whether the MILP backend encodes ``graph`` exactly (no relaxed smooth activation)."""
    from certfx.backends.milp.nonlinear import check_encodable

    try:
        check_encodable(graph)
    except UnsupportedOpsError:
        return False
    return True


def combined_verdict(results: Sequence[PropertyResult]) -> Verdict:
    """The answer for a file of several properties (VNN-LIB's top-level disjunction over
    input boxes): falsified if any is, verified if all are, else timeout if any timed out."""
    verdicts = {r.verdict for r in results}
    if Verdict.FALSIFIED in verdicts:
        return Verdict.FALSIFIED
    if verdicts == {Verdict.VERIFIED}:
        return Verdict.VERIFIED
    return Verdict.TIMEOUT if Verdict.TIMEOUT in verdicts else Verdict.UNKNOWN
