"""The exact MILP backend: complete verification and exact bounds of piecewise-linear networks.

* :mod:`~certfx.backends.milp.problem`: solver-agnostic problems (sparse expressions,
  variables, constraints) as numpy data;
* :mod:`~certfx.backends.milp.encode` (with :mod:`~certfx.backends.milp.nonlinear`): the
  canonical graph and an output specification to a problem (Tjeng, Xiao, Tedrake 2019; partial
  MILP as in COLT, Balunović & Vechev 2020, Sec. 6);
* :mod:`~certfx.backends.milp.bounds`: intermediate bounds from any domain, tightening options;
* :mod:`~certfx.backends.milp.ortools`: solving with OR-Tools (SCIP by default);
* :mod:`~certfx.backends.milp.verify`: :func:`verify_property` and :func:`output_bounds`.

Example:
    >>> import torch, certfx
    >>> from certfx.backends.milp import output_bounds
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[1.0], [-1.0]])), net[0].bias.zero_()
    ...     _ = net[2].weight.copy_(torch.tensor([[1.0, 1.0]])), net[2].bias.zero_()
    >>> gm = certfx.load(net, torch.zeros(1, 1))   # |x| on [-1, 2]
    >>> b = output_bounds(gm, torch.tensor([-1.0]), torch.tensor([2.0]))
    >>> [round(float(v), 6) for v in (b.lower[0], b.upper[0])]
    [0.0, 2.0]
"""

from certfx.backends.milp.bounds import Tightening, domain_bounds
from certfx.backends.milp.encode import EncodeOptions, Encoding, encode, term_problem
from certfx.backends.milp.nonlinear import check_encodable
from certfx.backends.milp.ortools import Optimum, Session, Solver, SolveStatus, maximize, minimize
from certfx.backends.milp.problem import Expr, Problem, ProblemBuilder
from certfx.backends.milp.verify import (MilpOptions, MilpResult, MilpStats, MilpStatus,
                                         OutputBounds, TermResult, encode_property,
                                         output_bounds, verify_property)

__all__ = [
    "verify_property",
    "output_bounds",
    "encode_property",
    "MilpOptions",
    "MilpResult",
    "MilpStats",
    "MilpStatus",
    "TermResult",
    "OutputBounds",
    "Tightening",
    "domain_bounds",
    "encode",
    "term_problem",
    "check_encodable",
    "EncodeOptions",
    "Encoding",
    "Solver",
    "SolveStatus",
    "Session",
    "Optimum",
    "minimize",
    "maximize",
    "Expr",
    "Problem",
    "ProblemBuilder",
]
