"""Solving :class:`~certfx.backends.milp.problem.Problem` s with OR-Tools (the only module that
imports ``ortools``).

A problem becomes an ``MPModelProto`` (numpy arrays straight into repeated fields) and is
loaded into ``pywraplp`` once per :class:`Session`; each :meth:`Session.optimize` then only swaps
the objective, so the layer-wise bound tightening reuses the loaded model.

Solvers (:class:`Solver`):

* ``SCIP`` (default): LP-based branch and bound on the real-valued problem; its dual bound is
  a proof (up to its tolerances, see :mod:`certfx.backends.milp.verify`). Runs single-threaded
  and supports stopping at the first solution better than a value (SCIP's ``limits/primal``),
  which :func:`~certfx.backends.milp.verify.verify_property` uses to stop at the first
  decisive counterexample.
* ``HIGHS``: also LP-based and sound; no early stop.
* ``CP_SAT``: OR-Tools' CP-SAT takes only integer linear models; through ``pywraplp`` it
  scales every real coefficient and puts continuous variables on a grid (``mip_var_scaling``,
  set here to :data:`CP_SAT_SCALING`; with the default of 1 the ReLU models are rejected as
  invalid), so its "infeasible" and its bound describe a *different* (discretized) problem.
  Its bound is therefore never reported (``Optimum.bound`` is ``None``), its solutions are
  only candidates that the caller must re-check, and it never yields ``verified``. It is also
  far slower on these real-valued problems.
* ``GLOP``: OR-Tools' simplex, for LPs (relaxations and LP bound tightening).

Measured (OR-Tools 9.15, SCIP 10.0, HiGHS 1.12; VNN-COMP 2021 ``mnist-net_256x2``, CROWN
intermediate bounds, 120 s budget per property, one core): ``prop_0_0.03`` (unsat): SCIP 2.1 s,
HiGHS 2.7 s, CP-SAT no proof (4.1 s, its "infeasible" untrusted); ``prop_7_0.03`` (sat): SCIP
10.8 s, HiGHS 55.8 s, CP-SAT timeout; ``prop_0_0.05`` (sat): SCIP 12.5 s, HiGHS and CP-SAT
timeout (HiGHS and CP-SAT ran while the other core was busy; SCIP ran alone). SCIP is the
default.

Example:
    >>> import numpy as np
    >>> from certfx.backends.milp.problem import Expr, ProblemBuilder
    >>> b = ProblemBuilder()
    >>> v = b.add_variables(np.zeros(2), np.ones(2), integer=np.array([False, True]))
    >>> obj = Expr.build(np.array([0, 0]), v, np.array([1.0, 1.0]), np.zeros(1))   # v0 + v1
    >>> b.add_constraints(obj, upper=np.array([1.5]))
    >>> r = maximize(b.build(), obj)
    >>> r.status.name, round(r.value, 6), round(r.bound, 6), r.solution.round(6).tolist()
    ('OPTIMAL', 1.5, 1.5, [0.5, 1.0])
    >>> round(maximize(b.build().relaxed(), obj, solver=Solver.GLOP).value, 6)
    1.5
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import linear_solver_pb2, pywraplp

from certfx.backends.milp.encode import Tightener
from certfx.backends.milp.problem import Expr, Problem

__all__ = ["SCIP_PARAMETERS", "Solver", "SolveStatus", "Optimum", "Session", "to_proto", "solve",
           "minimize", "maximize", "tightener"]


class Solver(enum.Enum):
    """The OR-Tools backend; see the module docstring for which to use."""

    SCIP = "scip"
    HIGHS = "highs"
    CP_SAT = "cp-sat"
    GLOP = "glop"


_NAMES = {Solver.SCIP: "SCIP", Solver.HIGHS: "HIGHS", Solver.CP_SAT: "CP_SAT",
          Solver.GLOP: "GLOP"}
# Solvers whose bound is a (floating-point) proof about the real-valued problem.
_TRUSTED = (Solver.SCIP, Solver.HIGHS, Solver.GLOP)
# No cutting-plane rounds: on ReLU networks with dense first-layer rows, SCIP's default
# separation spends tens of seconds at the root for little bound improvement (measured on the
# VNN-COMP 2021 mnistfc 256x2 network: 18.4 s with default cuts, 2.1 s with 5 root rounds,
# 0.95 s with none, for the same proof of infeasibility).
SCIP_PARAMETERS = "separating/maxrounds = 0\nseparating/maxroundsroot = 0\n"
CP_SAT_SCALING = 1e6  # CP-SAT's mip_var_scaling: grid points per unit of a continuous variable
_NO_LIMIT = 1e7  # seconds


class SolveStatus(enum.Enum):
    """The outcome of one solve."""

    OPTIMAL = "optimal"          # solution proven optimal (within the solver's gap tolerance)
    FEASIBLE = "feasible"        # a solution, stopped by a limit
    INFEASIBLE = "infeasible"
    UNBOUNDED = "unbounded"
    NO_SOLUTION = "no_solution"  # stopped by a limit before any solution
    ERROR = "error"


@dataclass(frozen=True)
class Optimum:
    """The result of one optimization.

    Attributes:
        status: see :class:`SolveStatus`.
        value: the objective at the best solution found (``None`` without one).
        bound: a proven bound on the optimum: a lower bound when minimizing, an upper bound when
            maximizing; ``None`` when there is none or the solver's bound is not trusted.
        solution: the best solution's variable values.
        seconds: wall-clock time of the solve.
        nodes: branch-and-bound nodes (0 for LPs).
        solver: the solver's name.
    """

    status: SolveStatus
    value: float | None
    bound: float | None
    solution: np.ndarray | None
    seconds: float
    nodes: int
    solver: str


def to_proto(problem: Problem) -> linear_solver_pb2.MPModelProto:
    """The problem as an OR-Tools ``MPModelProto`` (without objective)."""
    model = linear_solver_pb2.MPModelProto()
    for lo, hi, integer in zip(problem.lower.tolist(), problem.upper.tolist(),
                               problem.integer.tolist()):
        model.variable.add(lower_bound=lo, upper_bound=hi, is_integer=integer)
    ptr = np.searchsorted(problem.rows, np.arange(problem.num_constraints + 1))
    cols, vals = problem.cols.tolist(), problem.vals.tolist()
    for i, (lo, hi) in enumerate(zip(problem.row_lower.tolist(), problem.row_upper.tolist())):
        a, b = int(ptr[i]), int(ptr[i + 1])
        model.constraint.add(lower_bound=lo, upper_bound=hi, var_index=cols[a:b],
                             coefficient=vals[a:b])
    return model


class Session:
    """A problem loaded into one solver, optimized for one objective after another.

    Args:
        problem: the constraints (its objective, if any, is the default of :meth:`optimize`).
        solver: which backend.
        threads: solver threads (SCIP is single-threaded anyway).
        verbose: print the solver's log.
        scip_parameters: SCIP settings in its ``.set`` format, one per line.
    """

    def __init__(self, problem: Problem, solver: Solver = Solver.SCIP, threads: int = 1,
                 verbose: bool = False, scip_parameters: str = SCIP_PARAMETERS) -> None:
        if solver is Solver.GLOP and problem.num_integers:
            raise ValueError("GLOP solves LPs only; pass problem.relaxed()")
        self.problem, self.solver, self._scip = problem, solver, scip_parameters
        self._mp = pywraplp.Solver.CreateSolver(_NAMES[solver])
        if self._mp is None:
            raise RuntimeError(f"OR-Tools was built without {_NAMES[solver]}")
        error = self._mp.LoadModelFromProto(to_proto(problem))
        if error:
            raise RuntimeError(f"OR-Tools rejected the model: {error}")
        self._vars = self._mp.variables()
        self._mp.SetNumThreads(threads)
        if solver is Solver.CP_SAT:
            # CP-SAT turns continuous variables into integers on a grid of this resolution; the
            # default (1) makes ReLU problems invalid or meaningless.
            self._mp.SetSolverSpecificParametersAsString(
                f"mip_var_scaling: {CP_SAT_SCALING}, mip_max_bound: 1e9")
        if verbose:
            self._mp.EnableOutput()
        else:
            self._mp.SuppressOutput()

    def optimize(self, objective: Expr | None = None, maximize: bool | None = None,
                 time_limit: float | None = None, primal_stop: float | None = None) -> Optimum:
        """Optimize a one-row ``objective`` (default: the problem's).

        Args:
            objective: the expression to optimize.
            maximize: the sense (default: the problem's).
            time_limit: seconds (``None``: no limit).
            primal_stop: SCIP only: stop once a solution at least this good is found.

        (SCIP's ``limits/dual`` would stop at a proven bound as well, but OR-Tools 9.15 reports
        that stop as an error without the bound; :func:`~certfx.backends.milp.encode.term_problem`
        caps the objective variable instead, which prunes the same nodes.)
        """
        objective = self.problem.objective if objective is None else objective
        maximize = self.problem.maximize if maximize is None else maximize
        obj = self._mp.Objective()
        obj.Clear()
        if objective is not None:
            for col, val in zip(objective.cols.tolist(), objective.vals.tolist()):
                obj.SetCoefficient(self._vars[col], val)
            obj.SetOffset(float(objective.const[0]))
        obj.SetOptimizationDirection(bool(maximize))
        # The limit persists in the solver: always set it (no limit: a practically infinite one).
        limit = _NO_LIMIT if time_limit is None else min(time_limit, _NO_LIMIT)
        self._mp.SetTimeLimit(max(1, int(math.ceil(limit * 1000))))
        if self.solver is Solver.SCIP:
            never = math.inf if maximize else -math.inf
            primal = never if primal_stop is None else primal_stop
            self._mp.SetSolverSpecificParametersAsString(
                f"limits/primal = {_scip_number(primal)}\n{self._scip}")
        start = time.perf_counter()
        code = self._mp.Solve()
        seconds = time.perf_counter() - start
        return self._result(code, seconds, bool(maximize))

    def _result(self, code: int, seconds: float, maximize: bool) -> Optimum:
        name = _NAMES[self.solver]
        has_solution = code in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)
        status = {pywraplp.Solver.OPTIMAL: SolveStatus.OPTIMAL,
                  pywraplp.Solver.FEASIBLE: SolveStatus.FEASIBLE,
                  pywraplp.Solver.INFEASIBLE: SolveStatus.INFEASIBLE,
                  pywraplp.Solver.UNBOUNDED: SolveStatus.UNBOUNDED,
                  pywraplp.Solver.NOT_SOLVED: SolveStatus.NO_SOLUTION}.get(code,
                                                                           SolveStatus.ERROR)
        value = solution = bound = None
        if has_solution:
            response = linear_solver_pb2.MPSolutionResponse()
            self._mp.FillSolutionResponseProto(response)
            solution = np.asarray(response.variable_value, dtype=np.float64)
            value = float(self._mp.Objective().Value())
        nodes = int(self._mp.nodes()) if self.problem.num_integers else 0
        if self.solver in _TRUSTED and status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE,
                                                  SolveStatus.NO_SOLUTION):
            raw = (value if (status is SolveStatus.OPTIMAL and not self.problem.num_integers)
                   else float(self._mp.Objective().BestBound()))
            if raw is not None and math.isfinite(raw):
                bound = raw
            if status is SolveStatus.OPTIMAL and bound is not None and value is not None:
                # A MIP's "optimal" is optimal up to the relative gap; keep the weaker of both.
                bound = min(bound, value) if not maximize else max(bound, value)
        return Optimum(status, value, bound, solution, seconds, nodes, name)


def _scip_number(x: float) -> str:
    return "1e+20" if x == math.inf else "-1e+20" if x == -math.inf else repr(float(x))


def solve(problem: Problem, solver: Solver = Solver.SCIP, time_limit: float | None = None,
          primal_stop: float | None = None) -> Optimum:
    """Optimize ``problem.objective`` in ``problem``'s sense."""
    return Session(problem, solver).optimize(time_limit=time_limit, primal_stop=primal_stop)


def minimize(problem: Problem, objective: Expr, solver: Solver = Solver.SCIP,
             time_limit: float | None = None) -> Optimum:
    """``min objective`` over ``problem``'s constraints."""
    return Session(problem, solver).optimize(objective, False, time_limit)


def maximize(problem: Problem, objective: Expr, solver: Solver = Solver.SCIP,
             time_limit: float | None = None) -> Optimum:
    """``max objective`` over ``problem``'s constraints."""
    return Session(problem, solver).optimize(objective, True, time_limit)


def tightener(mip: bool, time_per_neuron: float, solver: Solver = Solver.SCIP,
              deadline: float | None = None, margin: float = 1e-6,
              scip_parameters: str = SCIP_PARAMETERS) -> Tightener:
    """A ``tighten`` callback for :func:`~certfx.backends.milp.encode.encode`.

    For each row it minimizes and maximizes the row over the problem encoded so far (its LP
    relaxation, solved by GLOP, when ``mip`` is false) and keeps only *proven* bounds: the
    solver's dual bound (for an LP, its optimum), widened by ``margin·(1 + |b|)`` against the
    solver's feasibility tolerances. A row whose solve yields no proven bound keeps its old one.
    Stops (keeping the old bounds) at the ``time.perf_counter()`` ``deadline``.
    """

    def tighten(problem: Problem, rows: Expr, lower: np.ndarray,
                upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lower, upper = lower.copy(), upper.copy()
        lp = not (mip and problem.num_integers)
        session = Session(problem.relaxed() if lp else problem, Solver.GLOP if lp else solver,
                          scip_parameters=scip_parameters)
        for i in range(rows.size):
            for maximize_ in (False, True):
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    return lower, upper
                limit = time_per_neuron if left is None else min(time_per_neuron, left)
                r = session.optimize(rows.select(np.array([i])), maximize_, limit)
                if r.bound is None:
                    continue
                b = r.bound + (margin * (1 + abs(r.bound)) * (1 if maximize_ else -1))
                if maximize_:
                    upper[i] = min(upper[i], b)
                else:
                    lower[i] = max(lower[i], b)
        return lower, upper

    return tighten
