"""Complete verification of a :class:`~certfx.specs.Property` by MILP, and exact output bounds.

:func:`verify_property` encodes the network over the property's input box
(:func:`~certfx.backends.milp.encode.encode`, with domain bounds and optional LP/MILP
tightening), then for each term of the unsafe region minimizes ``t = max_r (C_r y − d_r)``
(:func:`~certfx.backends.milp.encode.term_problem`):

* the term is empty when the solver proves ``t > tolerance``: by default ``t ≤ tolerance`` is
  added to the problem (:func:`~certfx.backends.milp.encode.term_problem`'s ``cutoff``, so
  branch and bound prunes every node whose LP bound exceeds it) and the solver's
  "infeasible" is the proof; with ``optimize_margin=True`` ``t`` is minimized to optimality and
  its proven lower bound must exceed ``tolerance``. The default ``tolerance = 1e-5`` absorbs
  the solvers' feasibility tolerances (SCIP accepts constraint violations up to ``1e-6``,
  relative for large rows, and integrality violations up to ``1e-6``, so its proofs concern a
  slightly larger problem computed in floating point); a true optimum in ``(0, tolerance]`` is
  answered ``unknown``, never wrongly ``verified``. ``verified`` additionally needs sound
  intermediate bounds (``Encoding.sound``) and a solver whose proofs are about the real-valued
  problem (SCIP, HiGHS; not CP-SAT, which discretizes continuous variables);
* a solution with ``t ≤ 0`` is a candidate: its input is clipped into the box and the network
  re-run concretely in float64; only if :meth:`Property.is_counterexample` holds is the answer
  ``falsified`` (with that input). A candidate failing the re-check (a solution at the
  boundary, or one using a relaxed partial-MILP layer) makes the term ``unknown``. SCIP stops
  at the first solution with ``t ≤ −tolerance``; if that one fails the re-check, the term is
  solved once more to optimality and its most violating solution re-checked.

The answer is ``falsified`` as soon as one term has a re-checked counterexample, ``verified``
when every term is proven empty, else ``timeout`` (the budget ran out) or ``unknown``.

Example:
    >>> import torch, certfx
    >>> from certfx.specs import Property, UnsafeRegion
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> gm = certfx.load(net, torch.zeros(1, 2))
    >>> x = torch.tensor([0.3, -0.2])
    >>> label = int(net(x[None]).argmax())
    >>> prop = Property(x - 1e-3, x + 1e-3, UnsafeRegion.misclassified(label, 2))
    >>> verify_property(gm, prop, MilpOptions(domains=())).status.value
    'verified'
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor

from certfx.backends.milp.bounds import Tightening, domain_bounds, intersect_bounds
from certfx.backends.milp.encode import EncodeOptions, Encoding, encode, term_problem
from certfx.backends.milp.ortools import (SCIP_PARAMETERS, Optimum, Session, Solver, SolveStatus,
                                          tightener)
from certfx.specs import Property

__all__ = ["MilpStatus", "MilpOptions", "TermResult", "MilpStats", "MilpResult",
           "OutputBounds", "verify_property", "encode_property", "output_bounds"]


class MilpStatus(enum.Enum):
    """The answer for a whole property."""

    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class MilpOptions:
    """Options of :func:`verify_property` and :func:`output_bounds`.

    Attributes:
        solver: the OR-Tools backend (SCIP by default; see :mod:`~certfx.backends.milp.ortools`).
        time_limit: wall-clock budget in seconds for everything (bounds, tightening, solves).
        domains: domains whose intermediate bounds tighten the big-M constants.
        tightening: LP/MILP tightening of unstable neurons, layer by layer.
        tighten_time_per_neuron: seconds per min/max solve during tightening.
        exact_layers: partial MILP: binaries only for the last ``k`` ReLU-like layers.
        tolerance: a term is verified when its proven bound exceeds this (see module doc).
        bound_margin: proven tightened bounds are widened by ``margin·(1 + |b|)``.
        known_bounds: extra intermediate bounds by node name.
        known_bounds_sound: whether ``known_bounds`` are sound (else never ``verified``).
        allow_relaxation: relax smooth activations instead of raising.
        optimize_margin: minimize ``t`` to optimality (its value and bound are then reported)
            instead of stopping at the first decisive solution or proof.
        scip_parameters: extra SCIP settings (default: no cutting-plane rounds, see
            :data:`~certfx.backends.milp.ortools.SCIP_PARAMETERS`).
    """

    solver: Solver = Solver.SCIP
    time_limit: float = 60.0
    domains: tuple[str, ...] = ("crown",)
    tightening: Tightening = Tightening.NONE
    tighten_time_per_neuron: float = 1.0
    exact_layers: int | None = None
    tolerance: float = 1e-5
    bound_margin: float = 1e-6
    known_bounds: Mapping[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    known_bounds_sound: bool = True
    allow_relaxation: bool = False
    optimize_margin: bool = False
    scip_parameters: str = SCIP_PARAMETERS


@dataclass(frozen=True)
class TermResult:
    """One term of the unsafe region: ``outcome`` in ``empty`` (proven), ``counterexample``,
    ``candidate_failed`` (re-check failed), ``timeout``, ``unknown``; ``value``/``bound`` of
    ``min t``."""

    index: int
    outcome: str
    value: float | None
    bound: float | None
    seconds: float
    nodes: int


@dataclass(frozen=True)
class MilpStats:
    """What was solved: problem size, bounds, per-term results and notes."""

    solver: str
    variables: int
    constraints: int
    binaries: int
    unstable: dict[str, int]
    tightened: dict[str, int]
    exact: bool
    sound: bool
    encode_seconds: float
    terms: list[TermResult]
    notes: list[str]


@dataclass(frozen=True)
class MilpResult:
    """The answer: ``status``, a re-checked ``counterexample`` input ``(1, *input_shape)`` and
    its float64 ``output`` when falsified, the total ``seconds`` and ``stats``."""

    status: MilpStatus
    counterexample: Tensor | None
    output: Tensor | None
    seconds: float
    stats: MilpStats


def encode_property(gm: fx.GraphModule, lower: Tensor, upper: Tensor,
                    options: MilpOptions, deadline: float | None = None,
                    ) -> tuple[Encoding, list[str]]:
    """The encoding over ``[lower, upper]`` with the options' bounds and tightening."""
    known, notes = domain_bounds(gm, lower, upper, options.domains)
    known = intersect_bounds(known, options.known_bounds)
    tighten = None
    if options.tightening is not Tightening.NONE:
        tighten = tightener(options.tightening is Tightening.MILP,
                            options.tighten_time_per_neuron, options.solver
                            if options.solver is not Solver.CP_SAT else Solver.SCIP,
                            deadline, options.bound_margin, options.scip_parameters)
    enc_options = EncodeOptions(options.exact_layers, known, options.known_bounds_sound,
                                options.allow_relaxation)
    return encode(gm, lower, upper, enc_options, tighten), notes


def verify_property(gm: fx.GraphModule, prop: Property,
                    options: MilpOptions | None = None) -> MilpResult:
    """Decide ``prop`` for the canonical graph ``gm`` by MILP (see the module docstring)."""
    options = options or MilpOptions()
    start = time.perf_counter()
    deadline = start + options.time_limit
    enc, notes = encode_property(gm, prop.lower, prop.upper, options, deadline)
    encode_seconds = time.perf_counter() - start
    net64 = copy.deepcopy(gm).to(torch.float64)
    lo = prop.lower.detach().to(torch.float64).reshape(1, *enc.input_shape)
    hi = prop.upper.detach().to(torch.float64).reshape(1, *enc.input_shape)
    terms: list[TermResult] = []
    found: tuple[Tensor, Tensor] | None = None
    trusted = options.solver is not Solver.CP_SAT
    cutoff = None if options.optimize_margin else options.tolerance
    for i, term in enumerate(prop.unsafe.terms):
        left = deadline - time.perf_counter()
        if left <= 0:
            terms.append(TermResult(i, "timeout", None, None, 0.0, 0))
            continue
        built = term_problem(enc, term, cutoff)
        if built is None:  # interval bounds alone prove t > tolerance
            terms.append(TermResult(i, "empty", None, options.tolerance, 0.0, 0))
            continue
        session = Session(built[0], options.solver, scip_parameters=options.scip_parameters)
        r = session.optimize(time_limit=left, primal_stop=None if options.optimize_margin
                             else -options.tolerance)
        if _candidate(r) and (cex := _recheck(r.solution, enc, net64, prop, lo, hi)) is None \
                and r.status is SolveStatus.FEASIBLE and deadline > time.perf_counter():
            # The first solution below -tolerance failed the re-check: try the most violating.
            r = session.optimize(time_limit=deadline - time.perf_counter())
        outcome, bound = "unknown", r.bound if trusted else None
        if _candidate(r):
            found = _recheck(r.solution, enc, net64, prop, lo, hi)
            outcome = "counterexample" if found is not None else "candidate_failed"
            if found is None:
                notes.append(f"term {i}: solver solution with t = {r.value:.3g} failed the "
                             f"concrete re-check" + ("" if enc.exact else
                                                     " (relaxed layers: expected)"))
        elif trusted and r.status is SolveStatus.INFEASIBLE and cutoff is not None:
            outcome, bound = "empty", cutoff  # no point with t <= tolerance
        elif bound is not None and bound > options.tolerance:
            outcome = "empty"
        elif r.status is SolveStatus.INFEASIBLE:
            notes.append(f"term {i}: {r.solver} reported infeasible; not taken as a proof" +
                         ("" if trusted else " (CP-SAT solves a discretized problem)"))
        elif time.perf_counter() >= deadline - 0.05:
            outcome = "timeout"
        elif r.status is SolveStatus.ERROR:
            notes.append(f"term {i}: {r.solver} failed")
        terms.append(TermResult(i, outcome, r.value, bound, r.seconds, r.nodes))
        if found is not None:
            break
    if found is not None:
        status = MilpStatus.FALSIFIED
    elif terms and all(t.outcome == "empty" for t in terms):
        status = MilpStatus.VERIFIED if enc.sound else MilpStatus.UNKNOWN
        if not enc.sound:
            notes.append("every term is empty, but under intermediate bounds not known to be "
                         "sound")
    elif any(t.outcome == "timeout" for t in terms):
        status = MilpStatus.TIMEOUT
    else:
        status = MilpStatus.UNKNOWN
    stats = MilpStats(options.solver.value, enc.problem.num_variables,
                      enc.problem.num_constraints, enc.binaries, enc.unstable, enc.tightened,
                      enc.exact, enc.sound, encode_seconds, terms, notes)
    cex, out = (found if found is not None else (None, None))
    return MilpResult(status, cex, out, time.perf_counter() - start, stats)


def _candidate(r: Optimum) -> bool:
    """A solution with ``t ≤ 0``: the solver's claim of a counterexample."""
    return r.solution is not None and r.value is not None and r.value <= 0


def _recheck(solution: np.ndarray, enc: Encoding, net64: fx.GraphModule, prop: Property,
             lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor] | None:
    """The solution's input, clipped into the box, with its float64 output, if it really is a
    counterexample."""
    x = torch.from_numpy(solution[enc.input_vars]).reshape(lo.shape)
    x = torch.minimum(torch.maximum(x, lo), hi)
    with torch.no_grad():
        y = net64(x).reshape(1, -1)
    return (x, y) if bool(prop.is_counterexample(x, y)[0]) else None


@dataclass(frozen=True)
class OutputBounds:
    """Per flattened output: ``lower``/``upper`` proven by the solver, and ``lower_attained``/
    ``upper_attained``, the values at the best solutions found (attained by real inputs when the
    encoding is exact); ``nan`` where a solve gave nothing."""

    lower: np.ndarray
    upper: np.ndarray
    lower_attained: np.ndarray
    upper_attained: np.ndarray
    encoding: Encoding


def output_bounds(gm: fx.GraphModule, lower: Tensor, upper: Tensor,
                  options: MilpOptions | None = None) -> OutputBounds:
    """Min and max of every output over the box ``[lower, upper]`` (``options.time_limit`` per
    solve; the encoding's own bounds and tightening follow ``options``)."""
    options = options or MilpOptions(domains=())
    enc, _ = encode_property(gm, lower, upper, options)
    session = Session(enc.problem, options.solver, scip_parameters=options.scip_parameters)
    n = enc.output.size
    found = np.full((4, n), np.nan)
    for j in range(n):
        row = enc.output.select(np.array([j]))
        for k, maximize in enumerate((False, True)):
            r = session.optimize(row, maximize, options.time_limit)
            if r.bound is not None:
                found[k, j] = r.bound
            if r.value is not None:
                found[2 + k, j] = r.value
    return OutputBounds(found[0], found[1], found[2], found[3], enc)
