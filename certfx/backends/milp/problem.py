"""Solver-agnostic linear and mixed-integer programs as plain numpy data.

An :class:`Expr` holds the values of one graph node as affine functions of the problem's
variables, ``value[i] = Σ_j A[i, j] v_j + c[i]``, with ``A`` as a coalesced COO matrix sorted by
``(row, col)``. A :class:`ProblemBuilder` collects variables (bounds, integrality) and
constraints ``lower ≤ expr ≤ upper``; :meth:`ProblemBuilder.build` freezes them into a
:class:`Problem`, which the solver layer (:mod:`certfx.backends.milp.ortools`) translates.
Nothing here imports a solver.

Example:
    >>> import numpy as np
    >>> b = ProblemBuilder()
    >>> v = b.add_variables(np.array([0.0, -1.0]), np.array([1.0, 1.0]))
    >>> x = Expr.variables(v)
    >>> s = x.select(np.array([0])) + x.select(np.array([1])).scale(2.0)   # v0 + 2 v1
    >>> s.interval(*b.bounds())
    (array([-2.]), array([3.]))
    >>> b.add_constraints(s, upper=np.array([1.0]))
    >>> p = b.build(objective=s, maximize=True)
    >>> p.num_variables, p.num_constraints, p.violation(np.array([1.0, 0.5]))
    (2, 1, 1.0)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

__all__ = ["Expr", "Problem", "ProblemBuilder"]

_F = np.float64
_I = np.int64
_EXPAND_LIMIT = 1 << 25  # products expanded at once by Expr.map (256 MiB of float64)
_DENSE_LIMIT = 1 << 26   # rows × variables of Expr.map's dense accumulator


def _coalesce(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort COO entries by (row, col), sum duplicates and drop exact zeros."""
    if rows.size == 0:
        return rows.astype(_I), cols.astype(_I), vals.astype(_F)
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    new = np.empty(rows.size, dtype=bool)
    new[0] = True
    new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    starts = np.flatnonzero(new)
    vals = np.add.reduceat(vals, starts)
    rows, cols = rows[starts], cols[starts]
    keep = vals != 0.0
    return rows[keep].astype(_I), cols[keep].astype(_I), vals[keep].astype(_F)


@dataclass(frozen=True)
class Expr:
    """Affine functions of the variables, one per row: ``A v + const``.

    Attributes:
        rows, cols, vals: the COO entries of ``A`` (sorted by row then column, no duplicates).
        const: the constant of each row, shape ``(size,)``.
    """

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    const: np.ndarray

    @property
    def size(self) -> int:
        """The number of rows (neurons)."""
        return int(self.const.shape[0])

    @property
    def nnz(self) -> int:
        """The number of non-zero coefficients."""
        return int(self.vals.shape[0])

    @staticmethod
    def build(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
              const: np.ndarray) -> Expr:
        """An expression from unsorted COO entries (duplicates are summed)."""
        r, c, v = _coalesce(np.asarray(rows), np.asarray(cols), np.asarray(vals, dtype=_F))
        return Expr(r, c, v, np.asarray(const, dtype=_F).copy())

    @staticmethod
    def variables(index: np.ndarray) -> Expr:
        """Row ``i`` is the variable ``index[i]``."""
        index = np.asarray(index, dtype=_I)
        return Expr.build(np.arange(index.size), index, np.ones(index.size), np.zeros(index.size))

    @staticmethod
    def constant(values: np.ndarray) -> Expr:
        """Constant rows."""
        empty = np.zeros(0, dtype=_I)
        return Expr(empty, empty, np.zeros(0), np.asarray(values, dtype=_F).reshape(-1).copy())

    @staticmethod
    def stack(parts: Sequence[Expr]) -> Expr:
        """The rows of ``parts`` one after another."""
        offsets = np.cumsum([0] + [p.size for p in parts])
        return Expr(np.concatenate([p.rows + o for p, o in zip(parts, offsets)]).astype(_I),
                    np.concatenate([p.cols for p in parts]).astype(_I),
                    np.concatenate([p.vals for p in parts]).astype(_F),
                    np.concatenate([p.const for p in parts]).astype(_F))

    def __add__(self, other: Expr) -> Expr:
        if self.size != other.size:
            raise ValueError(f"cannot add expressions of {self.size} and {other.size} rows")
        return Expr.build(np.concatenate([self.rows, other.rows]),
                          np.concatenate([self.cols, other.cols]),
                          np.concatenate([self.vals, other.vals]), self.const + other.const)

    def __neg__(self) -> Expr:
        return Expr(self.rows, self.cols, -self.vals, -self.const)

    def __sub__(self, other: Expr) -> Expr:
        return self + (-other)

    def scale(self, factor: float | np.ndarray) -> Expr:
        """Multiply row ``i`` by ``factor[i]`` (or every row by a number)."""
        f = np.broadcast_to(np.asarray(factor, dtype=_F), (self.size,))
        return Expr.build(self.rows, self.cols, self.vals * f[self.rows], self.const * f)

    def shift(self, offset: float | np.ndarray) -> Expr:
        """Add ``offset`` to the constants."""
        return Expr(self.rows, self.cols, self.vals, self.const + offset)

    def pointers(self) -> np.ndarray:
        """CSR row pointers: the entries of row ``i`` are ``pointers[i]:pointers[i + 1]``."""
        return np.searchsorted(self.rows, np.arange(self.size + 1))

    def select(self, index: np.ndarray) -> Expr:
        """The rows ``index`` (in that order; repeats allowed)."""
        index = np.asarray(index, dtype=_I).reshape(-1)
        ptr = self.pointers()
        starts, counts = ptr[index], ptr[index + 1] - ptr[index]
        total = int(counts.sum())
        first = np.repeat(np.cumsum(counts) - counts, counts)
        gather = np.repeat(starts, counts) + (np.arange(total) - first)
        return Expr(np.repeat(np.arange(index.size, dtype=_I), counts), self.cols[gather],
                    self.vals[gather], self.const[index])

    def map(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, size: int) -> Expr:
        """``J @ self`` for the sparse matrix ``J`` of shape ``(size, self.size)`` in COO form.

        Every entry ``J[i, k]`` is expanded over the entries of row ``k`` of ``self``; the
        products are summed per ``(i, column)`` by ``np.bincount`` on a dense index when
        ``size × variables`` is moderate (the usual case), else through ``torch.sparse.mm``.
        """
        rows, cols = np.asarray(rows, _I), np.asarray(cols, _I)
        vals = np.asarray(vals, _F)
        const = np.bincount(rows, weights=vals * self.const[cols], minlength=size)
        ptr = self.pointers()
        counts = ptr[cols + 1] - ptr[cols]
        total = int(counts.sum())
        num_vars = int(self.cols.max()) + 1 if self.nnz else 1
        if total > _EXPAND_LIMIT or size * num_vars > _DENSE_LIMIT:
            return self._map_torch(rows, cols, vals, size, const)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        gather = np.repeat(ptr[cols], counts) + (np.arange(total) - first)
        key = np.repeat(rows, counts) * num_vars + self.cols[gather]
        dense = np.bincount(key, weights=np.repeat(vals, counts) * self.vals[gather],
                            minlength=size * num_vars)
        nz = np.flatnonzero(dense)
        return Expr(nz // num_vars, nz % num_vars, dense[nz], const)

    def _map_torch(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, size: int,
                   const: np.ndarray) -> Expr:
        num_vars = int(self.cols.max()) + 1 if self.nnz else 1
        with warnings.catch_warnings():  # torch's notes that sparse support is in beta
            warnings.simplefilter("ignore", UserWarning)
            jac = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])),
                                          torch.from_numpy(vals), (size, self.size),
                                          check_invariants=False)
            mat = torch.sparse_coo_tensor(torch.from_numpy(np.stack([self.rows, self.cols])),
                                          torch.from_numpy(self.vals), (self.size, num_vars),
                                          check_invariants=False)
            prod = torch.sparse.mm(jac, mat).coalesce()
        r, c = prod.indices().numpy()
        return Expr.build(r, c, prod.values().numpy(), const)

    def interval(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Elementwise bounds over the box ``lower ≤ v ≤ upper`` of the variables:
        ``c + A⁺ l + A⁻ u`` and ``c + A⁺ u + A⁻ l``."""
        pos = self.vals > 0
        lo_terms = np.where(pos, self.vals * lower[self.cols], self.vals * upper[self.cols])
        hi_terms = np.where(pos, self.vals * upper[self.cols], self.vals * lower[self.cols])
        lo = self.const + np.bincount(self.rows, weights=lo_terms, minlength=self.size)
        hi = self.const + np.bincount(self.rows, weights=hi_terms, minlength=self.size)
        return lo, hi

    def evaluate(self, values: np.ndarray) -> np.ndarray:
        """The rows' values at a variable assignment."""
        return self.const + np.bincount(self.rows, weights=self.vals * values[self.cols],
                                        minlength=self.size)

    def plain_variables(self) -> np.ndarray:
        """Per row, the variable ``j`` if the row is exactly ``1·v_j + 0``, else ``-1``."""
        counts = np.bincount(self.rows, minlength=self.size)
        ptr = self.pointers()[:-1]
        single = (counts == 1) & (self.const == 0.0)
        single[single] &= self.vals[ptr[single]] == 1.0
        out = np.full(self.size, -1, dtype=_I)
        out[single] = self.cols[ptr[single]]
        return out


@dataclass(frozen=True)
class Problem:
    """``min``/``max`` of ``objective`` subject to variable bounds, integrality and
    ``row_lower ≤ A v ≤ row_upper`` (``A`` in COO form; ``±inf`` for a missing side).

    Attributes:
        lower, upper: variable bounds.
        integer: which variables must be integral.
        rows, cols, vals: the constraint matrix.
        row_lower, row_upper: the constraint bounds.
        objective: a one-row :class:`Expr`, or ``None`` for a feasibility problem.
        maximize: the objective's sense.
    """

    lower: np.ndarray
    upper: np.ndarray
    integer: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    objective: Expr | None = None
    maximize: bool = False

    @property
    def num_variables(self) -> int:
        return int(self.lower.shape[0])

    @property
    def num_constraints(self) -> int:
        return int(self.row_lower.shape[0])

    @property
    def num_integers(self) -> int:
        return int(self.integer.sum())

    def relaxed(self) -> Problem:
        """The LP relaxation: integrality dropped (bounds kept)."""
        return replace(self, integer=np.zeros_like(self.integer))

    def with_objective(self, objective: Expr, maximize: bool = False) -> Problem:
        """The same constraints with another (one-row) objective."""
        if objective.size != 1:
            raise ValueError(f"an objective has one row, got {objective.size}")
        return replace(self, objective=objective, maximize=maximize)

    def violation(self, values: np.ndarray) -> float:
        """The largest violation of a bound, a constraint or integrality at ``values``."""
        act = np.bincount(self.rows, weights=self.vals * values[self.cols],
                          minlength=self.num_constraints)
        worst = [np.max(self.lower - values, initial=0.0),
                 np.max(values - self.upper, initial=0.0),
                 np.max(self.row_lower - act, initial=0.0),
                 np.max(act - self.row_upper, initial=0.0),
                 np.max(np.abs(values - np.round(values))[self.integer], initial=0.0)]
        return float(max(worst))


class ProblemBuilder:
    """Collects variables and constraints; :meth:`build` freezes them into a :class:`Problem`.

    Args:
        base: start from the variables and constraints of an existing problem.
    """

    def __init__(self, base: Problem | None = None) -> None:
        self._var: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._con: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._num_vars = 0
        self._num_rows = 0
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        if base is not None:
            self._var.append((base.lower, base.upper, base.integer))
            self._con.append((base.rows, base.cols, base.vals, base.row_lower, base.row_upper))
            self._num_vars, self._num_rows = base.num_variables, base.num_constraints

    @property
    def num_variables(self) -> int:
        return self._num_vars

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The current variable bounds ``(lower, upper)``."""
        if self._cache is None:
            lo = np.concatenate([v[0] for v in self._var]) if self._var else np.zeros(0)
            hi = np.concatenate([v[1] for v in self._var]) if self._var else np.zeros(0)
            self._cache = (lo, hi)
        return self._cache

    def add_variables(self, lower: np.ndarray, upper: np.ndarray,
                      integer: bool | np.ndarray = False) -> np.ndarray:
        """New variables with the given bounds; returns their indices."""
        lower = np.asarray(lower, dtype=_F).reshape(-1)
        upper = np.asarray(upper, dtype=_F).reshape(-1)
        if lower.shape != upper.shape:
            raise ValueError("variable lower and upper bounds differ in shape")
        if np.any(lower > upper):
            raise ValueError("a variable has lower > upper bound")
        flags = np.broadcast_to(np.asarray(integer, dtype=bool), lower.shape).copy()
        index = np.arange(self._num_vars, self._num_vars + lower.size, dtype=_I)
        self._var.append((lower, upper, flags))
        self._num_vars += lower.size
        self._cache = None
        return index

    def add_constraints(self, expr: Expr, lower: np.ndarray | float | None = None,
                        upper: np.ndarray | float | None = None) -> None:
        """``lower ≤ expr ≤ upper`` row by row (``None``: that side is unbounded)."""
        n = expr.size
        lo = np.full(n, -np.inf) if lower is None else np.broadcast_to(
            np.asarray(lower, dtype=_F), (n,))
        hi = np.full(n, np.inf) if upper is None else np.broadcast_to(
            np.asarray(upper, dtype=_F), (n,))
        self._con.append((expr.rows + self._num_rows, expr.cols, expr.vals,
                          lo - expr.const, hi - expr.const))
        self._num_rows += n

    def build(self, objective: Expr | None = None, maximize: bool = False) -> Problem:
        """The problem so far (the builder stays usable)."""
        lo, hi = self.bounds()
        integer = (np.concatenate([v[2] for v in self._var]) if self._var
                   else np.zeros(0, dtype=bool))

        def cat(k: int, dtype: type) -> np.ndarray:
            return (np.concatenate([c[k] for c in self._con]).astype(dtype) if self._con
                    else np.zeros(0, dtype=dtype))

        return Problem(lo, hi, integer, cat(0, _I), cat(1, _I), cat(2, _F), cat(3, _F),
                       cat(4, _F), objective, maximize)
