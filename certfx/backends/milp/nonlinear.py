"""MILP encodings of the non-affine core ops: ReLU, leaky ReLU, hardtanh, max-pool, and (on
request) a sound LP relaxation of smooth monotone activations.

Every encoder takes the input :class:`~certfx.backends.milp.problem.Expr` ``x`` with sound
elementwise bounds ``l ≤ x ≤ u`` and returns the output's ``Expr``, adding variables and
constraints to a :class:`~certfx.backends.milp.problem.ProblemBuilder`. With ``exact=True`` the
indicator variables are binary and the encoding is exact on ``[l, u]`` (Tjeng, Xiao, Tedrake,
"Evaluating Robustness of Neural Networks with Mixed Integer Programming", ICLR 2019, Sec. 3
and App. A); with ``exact=False`` they are continuous in ``[0, 1]``, which for (leaky) ReLU is
exactly the triangle relaxation (Ehlers 2017): eliminating ``a`` from the big-M rows below
leaves the chord ``y ≤ u (x − l) / (u − l)``.

Example:
    >>> import numpy as np
    >>> from certfx.backends.milp.problem import Expr, ProblemBuilder
    >>> b = ProblemBuilder()
    >>> lo, hi = np.array([-1.0, 1.0, -3.0]), np.array([2.0, 2.0, -1.0])
    >>> x = Expr.variables(b.add_variables(lo, hi))
    >>> y, binaries = encode_relu_like(b, x, lo, hi)
    >>> binaries, b.build().num_constraints   # one unstable neuron: 1 binary, 3 rows
    (1, 3)
    >>> y.interval(*b.bounds())   # stable ones are x itself and the constant 0
    (array([0., 1., 0.]), array([2., 2., 0.]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from certfx import ops
from certfx.backends.milp.problem import Expr, ProblemBuilder
from certfx.errors import UnsupportedOp, UnsupportedOpsError

__all__ = ["KINKED", "EXACT_OPS", "check_encodable", "where", "materialize", "encode_relu_like",
           "encode_hardtanh", "encode_max", "encode_relaxed", "encode_select", "pool_windows"]


# Piecewise-linear activations counted as "layers" for partial MILP and tightening.
KINKED = (ops.relu, ops.leaky_relu, ops.hardtanh)
EXACT_OPS = (*KINKED, ops.max_pool, ops.ace_select)


def where(node: fx.Node) -> str:
    """The last source line of a node's stack trace (empty if none)."""
    trace = node.stack_trace or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check_encodable(gm: fx.GraphModule, allow_relaxation: bool = False) -> None:
    """Raise :class:`~certfx.errors.UnsupportedOpsError` listing every node the MILP encoding
    cannot take."""
    from certfx.domains.relaxations import RELAXATIONS

    bad = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if n.op != "call_function" or not ops.is_core_op(n.target):
            bad.append(UnsupportedOp(n.name, f"{n.op} {name}", where(n),
                                     "the MILP backend takes canonical graphs (certfx.load)"))
            continue
        tr = ops.traits(n.target)
        relaxable = tr.elementwise and tr.monotone and n.target in RELAXATIONS
        if tr.affine or n.target in EXACT_OPS or (allow_relaxation and relaxable):
            continue
        hint = ("no exact MILP encoding; pass allow_relaxation=True for a sound relaxation "
                "(then only verified/unknown answers)" if relaxable else
                "no MILP encoding (supported: affine ops, relu, leaky_relu, hardtanh, max_pool, "
                "ace_select)")
        bad.append(UnsupportedOp(n.name, name, where(n), hint))
    if bad:
        raise UnsupportedOpsError("MILP encoding", bad)


def materialize(builder: ProblemBuilder, x: Expr, lower: np.ndarray,
                upper: np.ndarray) -> Expr:
    """``x`` as one variable per row: a row that is already ``1·v_j`` keeps ``v_j``; any other
    row gets a new variable ``z`` in ``[lower, upper]`` with the equality ``z = row``."""
    plain = x.plain_variables()
    need = np.flatnonzero(plain < 0)
    if need.size:
        z = builder.add_variables(lower[need], upper[need])
        builder.add_constraints(Expr.variables(z) - x.select(need), 0.0, 0.0)
        plain[need] = z
    return Expr.variables(plain)


def _reorder(parts: list[tuple[np.ndarray, Expr]], size: int) -> Expr:
    """Rows ``parts[k][1]`` placed at positions ``parts[k][0]`` of a ``size``-row result."""
    positions = np.concatenate([p for p, _ in parts]).astype(np.int64)
    stacked = Expr.stack([e for _, e in parts])
    inverse = np.empty(size, dtype=np.int64)
    inverse[positions] = np.arange(size)
    return stacked.select(inverse)


def encode_relu_like(builder: ProblemBuilder, x: Expr, lower: np.ndarray, upper: np.ndarray,
                     alpha: float = 0.0, exact: bool = True) -> tuple[Expr, int]:
    """``y = x`` where ``x ≥ 0`` and ``α x`` elsewhere (ReLU: ``α = 0``); returns ``(y, number
    of binaries)``.

    Stable neurons need no variable: ``l ≥ 0`` gives ``y = x`` and ``u ≤ 0`` gives ``y = α x``.
    An unstable one (``l < 0 < u``) gets ``y`` and an indicator ``a`` (``a = 1`` ⇔ ``x ≥ 0``).
    For ``0 ≤ α ≤ 1`` (``f`` convex, Tjeng et al. 2019, Eq. 5 with ``α = 0``)::

        y ≥ x,   y ≥ α x,   y ≤ x − (1 − α) l (1 − a),   y ≤ α x + (1 − α) u a

    (``a = 1`` forces ``y = x ≥ α x``, i.e. ``x ≥ 0``; ``a = 0`` forces ``y = α x ≥ x``).
    Any other slope uses the sign indicator directly: ``x ≤ u a``, ``x ≥ l (1 − a)``,
    ``|y − x| ≤ |1 − α| |l| (1 − a)``, ``|y − α x| ≤ |1 − α| u a``.
    """
    n = x.size
    active = np.flatnonzero(lower >= 0)
    inactive = np.flatnonzero((upper <= 0) & (lower < 0))
    unstable = np.flatnonzero((lower < 0) & (upper > 0))
    parts: list[tuple[np.ndarray, Expr]] = [(active, x.select(active))]
    if alpha == 0.0:
        parts.append((inactive, Expr.constant(np.zeros(inactive.size))))
    else:
        parts.append((inactive, x.select(inactive).scale(alpha)))
    if unstable.size == 0:
        return _reorder(parts, n), 0
    l, u = lower[unstable], upper[unstable]  # noqa: E741 (the papers' l, u)
    xv = materialize(builder, x.select(unstable), l, u)
    ylo, yhi = np.minimum(alpha * l, 0.0), np.maximum(alpha * l, u)
    y = Expr.variables(builder.add_variables(ylo, yhi))
    a = Expr.variables(builder.add_variables(np.zeros(l.size), np.ones(l.size), integer=exact))
    if 0.0 <= alpha <= 1.0:
        builder.add_constraints(y - xv, lower=0.0)                                  # y ≥ x
        if alpha > 0.0:
            builder.add_constraints(y - xv.scale(alpha), lower=0.0)                 # y ≥ α x
        c = 1.0 - alpha
        builder.add_constraints(y - xv - a.scale(c * l), upper=-c * l)   # y ≤ x − c l (1 − a)
        builder.add_constraints(y - xv.scale(alpha) - a.scale(c * u), upper=0.0)  # ≤ αx + c u a
    else:
        c = abs(1.0 - alpha)
        builder.add_constraints(xv - a.scale(u), upper=0.0)                         # x ≤ u a
        builder.add_constraints(xv + a.scale(l), lower=l)                     # x ≥ l (1 − a)
        m = c * np.abs(l)
        builder.add_constraints(y - xv + a.scale(m), upper=m)            # y − x ≤ m (1 − a)
        builder.add_constraints(y - xv - a.scale(m), lower=-m)           # y − x ≥ −m (1 − a)
        builder.add_constraints(y - xv.scale(alpha) - a.scale(c * u), upper=0.0)
        builder.add_constraints(y - xv.scale(alpha) + a.scale(c * u), lower=0.0)
    parts.append((unstable, y))
    return _reorder(parts, n), int(unstable.size) if exact else 0


def encode_hardtanh(builder: ProblemBuilder, x: Expr, lower: np.ndarray, upper: np.ndarray,
                    min_val: float, max_val: float, exact: bool = True) -> tuple[Expr, int]:
    """``clamp(x, min_val, max_val)`` as ``b − relu(b − (a + relu(x − a)))`` with two ReLU
    encodings (a missing side, ``±inf``, is skipped)."""
    binaries = 0
    if np.isfinite(min_val):
        r, k = encode_relu_like(builder, x.shift(-min_val), lower - min_val, upper - min_val,
                                0.0, exact)
        x, binaries = r.shift(min_val), binaries + k
        lower, upper = np.maximum(lower, min_val), np.maximum(upper, min_val)
    if np.isfinite(max_val):
        r, k = encode_relu_like(builder, (-x).shift(max_val), max_val - upper, max_val - lower,
                                0.0, exact)
        x, binaries = (-r).shift(max_val), binaries + k
    return x, binaries


def pool_windows(in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 kernel_size: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...]) -> np.ndarray:
    """For max pooling of one example ``(C, *spatial)``: the flat input indices of each output's
    window, ``(outputs, kernel_numel)``, with ``-1`` for padding (which is ``−inf``).

    Example:
        >>> pool_windows((1, 2, 3), (1, 1, 2), (2, 2), (2, 2), (0, 0), (1, 1)).tolist()
        [[0, 1, 3, 4], [2, -1, 5, -1]]
    """
    index = torch.arange(int(np.prod(in_shape)), dtype=torch.float64).reshape(1, *in_shape)
    windows = ops.pool_windows(index, kernel_size, stride, padding, dilation, out_shape[1:],
                               fill=-1.0)
    return windows.reshape(int(np.prod(out_shape)), -1).numpy().astype(np.int64)


def encode_max(builder: ProblemBuilder, x: Expr, lower: np.ndarray, upper: np.ndarray,
               windows: np.ndarray, exact: bool = True) -> tuple[Expr, int]:
    """``y_j = max_{i ∈ windows[j]} x_i`` (Tjeng et al. 2019, Eq. 6); returns ``(y, binaries)``.

    Candidates whose upper bound is below the largest lower bound in the window can never be the
    maximum and are pruned; one remaining candidate makes ``y_j`` that input. Otherwise, with one
    indicator ``a_i`` per candidate, ``Σ a_i = 1``, ``y ≥ x_i`` and
    ``y ≤ x_i + (U_{−i} − l_i)(1 − a_i)`` where ``U_{−i}`` is the largest upper bound of the
    other candidates; ``y ∈ [max_i l_i, max_i u_i]`` covers the pruned inputs.
    """
    singles, single_src = [], []
    multi: list[tuple[int, np.ndarray]] = []
    for j, window in enumerate(windows):
        cand = window[window >= 0]
        top = lower[cand].max()
        keep = cand[upper[cand] >= top]
        if keep.size == 1:
            singles.append(j)
            single_src.append(int(keep[0]))
        else:
            multi.append((j, keep))
    parts = [(np.asarray(singles, dtype=np.int64), x.select(np.asarray(single_src, np.int64)))]
    if not multi:
        return _reorder(parts, windows.shape[0]), 0
    used = np.unique(np.concatenate([k for _, k in multi]))
    var_of = np.full(x.size, -1, dtype=np.int64)
    var_of[used] = materialize(builder, x.select(used), lower[used], upper[used]).cols
    ylo = np.array([lower[k].max() for _, k in multi])
    yhi = np.array([upper[k].max() for _, k in multi])
    yv = builder.add_variables(ylo, yhi)
    sizes = np.array([k.size for _, k in multi])
    av = builder.add_variables(np.zeros(sizes.sum()), np.ones(sizes.sum()), integer=exact)
    owner = np.repeat(np.arange(len(multi)), sizes)              # pair p belongs to output owner
    cand = np.concatenate([k for _, k in multi])
    big = np.concatenate([_others_max(upper[k]) - lower[k] for _, k in multi])
    pairs = np.arange(cand.size)
    ones = np.ones(cand.size)
    # y_j − x_i ≥ 0
    builder.add_constraints(Expr.build(np.r_[pairs, pairs], np.r_[yv[owner], var_of[cand]],
                                       np.r_[ones, -ones], np.zeros(cand.size)), lower=0.0)
    # y_j − x_i + M a_i ≤ M
    builder.add_constraints(Expr.build(np.r_[pairs, pairs, pairs],
                                       np.r_[yv[owner], var_of[cand], av],
                                       np.r_[ones, -ones, big], np.zeros(cand.size)), upper=big)
    # Σ_i a_i = 1
    builder.add_constraints(Expr.build(owner, av, ones, np.zeros(len(multi))), 1.0, 1.0)
    parts.append((np.array([j for j, _ in multi], dtype=np.int64), Expr.variables(yv)))
    return _reorder(parts, windows.shape[0]), int(sizes.sum()) if exact else 0


def _others_max(u: np.ndarray) -> np.ndarray:
    """``max_{k ≠ i} u_k`` for every ``i`` (at least two entries)."""
    order = np.argsort(u)
    first, second = u[order[-1]], u[order[-2]]
    out = np.full(u.shape, first)
    out[order[-1]] = second
    return out


def encode_relaxed(builder: ProblemBuilder, x: Expr, lower: np.ndarray, upper: np.ndarray,
                   fn: Callable[..., Any], args: tuple[Any, ...]) -> Expr:
    """A sound (not exact) encoding of a monotone elementwise activation ``fn`` from the shared
    relaxation table: ``y ∈ [fn(l), fn(u)]`` and ``a_l x + b_l ≤ y ≤ a_u x + b_u``."""
    from certfx.domains.relaxations import linear_relaxation

    lo_t, hi_t = torch.from_numpy(lower), torch.from_numpy(upper)
    r = linear_relaxation(fn, lo_t, hi_t, *args)
    with torch.no_grad():
        f_lo, f_hi = fn(lo_t[None], *args)[0].numpy(), fn(hi_t[None], *args)[0].numpy()
    fields = [t.detach().to(torch.float64).expand_as(lo_t).numpy() for t in
              (r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias)]
    if not all(np.isfinite(f).all() for f in (f_lo, f_hi, *fields)):
        raise ValueError(f"{fn.__name__} has no finite relaxation on the input bounds")
    xv = materialize(builder, x, lower, upper)
    y = Expr.variables(builder.add_variables(f_lo, f_hi))
    builder.add_constraints(y - xv.scale(fields[0]), lower=fields[1])
    builder.add_constraints(y - xv.scale(fields[2]), upper=fields[3])
    return y


def encode_select(builder: ProblemBuilder, score: Expr, score_bounds: tuple[np.ndarray, np.ndarray],
                  chosen: Expr, chosen_bounds: tuple[np.ndarray, np.ndarray], other: Expr,
                  other_bounds: tuple[np.ndarray, np.ndarray], threshold: float,
                  exact: bool = True) -> tuple[Expr, int]:
    """ACE's selection ``y = chosen if s > T else other`` (paper 000, Eq. 2) for one example;
    returns ``(y, number of binaries)``.

    Where the score's bounds decide (``l_s > T`` or ``u_s ≤ T``) ``y`` is that branch, with no
    variable. Otherwise an indicator ``δ`` (``δ = 1``: the certification network answers) with
    the big-M constraints, ``M`` from the branches' bounds ``[l_c, u_c]``, ``[l_o, u_o]``::

        s − T ≥ (l_s − T)(1 − δ),        s − T ≤ (u_s − T) δ,
        (1 − δ)(l_o − u_c) ≤ y − c ≤ (1 − δ)(u_o − l_c),
        δ (l_c − u_o) ≤ y − o ≤ δ (u_c − l_o).

    ``δ = 1`` forces ``y = c`` and ``s ≥ T``; ``δ = 0`` forces ``y = o`` and ``s ≤ T``. At
    ``s = T`` exactly both are allowed: a superset of the network's behaviour (sound for
    verification; a counterexample is re-checked concretely anyway).
    """
    (sl, su), (cl, cu), (ol, ou) = score_bounds, chosen_bounds, other_bounds
    if float(sl.min()) > threshold:
        return chosen, 0
    if float(su.max()) <= threshold:
        return other, 0
    n = chosen.size
    d_index = builder.add_variables(np.zeros(1), np.ones(1), integer=exact)
    d = Expr.variables(d_index)
    dn = Expr.variables(np.repeat(d_index, n))
    builder.add_constraints(score - d.scale(-(sl - threshold)), lower=sl)      # s − T ≥ (l−T)(1−δ)
    builder.add_constraints(score - d.scale(su - threshold), upper=threshold)  # s − T ≤ (u−T)δ
    y = Expr.variables(builder.add_variables(np.minimum(cl, ol), np.maximum(cu, ou)))
    low_c, high_c = ol - cu, ou - cl
    builder.add_constraints(y - chosen + dn.scale(low_c), lower=low_c)    # ≥ (1−δ)(l_o − u_c)
    builder.add_constraints(y - chosen + dn.scale(high_c), upper=high_c)  # ≤ (1−δ)(u_o − l_c)
    builder.add_constraints(y - other - dn.scale(cl - ou), lower=0.0)     # ≥ δ(l_c − u_o)
    builder.add_constraints(y - other - dn.scale(cu - ol), upper=0.0)     # ≤ δ(u_c − l_o)
    return y, 1 if exact else 0
