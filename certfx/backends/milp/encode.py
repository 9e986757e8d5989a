"""The MILP encoding of a canonical graph over an input box, and of an output specification.

:func:`encode` walks a canonical ``GraphModule`` (batch size 1) once, in float64, and builds a
solver-agnostic :class:`~certfx.backends.milp.problem.Problem`:

* the input is one variable per entry, bounded by the box;
* affine ops (``OpTraits.affine``) are not hand-written per op: their exact matrix is read off
  ``OpTraits.linear_part`` evaluated on basis vectors in chunks (sparse, so convolutions stay
  cheap), their constant term off the op at 0; a node's value stays an affine expression of
  earlier variables (:class:`~certfx.backends.milp.problem.Expr`) and gets variables of its own
  only where that keeps the problem sparser, or where a non-linear op needs them;
* ReLU, leaky ReLU, hardtanh, max-pool and ACE's selection node get the exact big-M encodings of Tjeng, Xiao, Tedrake
  (ICLR 2019) from :mod:`~certfx.backends.milp.nonlinear`, with ``M`` from the tightest sound
  bounds available: interval bounds of each expression over the variables' bounds, intersected
  with ``EncodeOptions.known_bounds`` (e.g. DeepPoly/CROWN bounds, see
  :mod:`~certfx.backends.milp.bounds`) and, optionally, bounds a ``tighten`` callback proves by
  LP/MILP over the layers encoded so far (layer by layer);
* partial MILP (COLT, Balunović & Vechev, ICLR 2020, Sec. 6): ``exact_layers=k`` gives binaries
  only to the last ``k`` ReLU-like layers; the non-linear ops before them keep their indicator
  variables continuous in ``[0, 1]``, which for ReLU is the triangle relaxation (at least as
  tight as the DeepPoly/zonotope constraints COLT uses for that region). COLT's own
  certification also encodes the earlier ReLUs by the triangle formulation.

:func:`term_problem` adds one term of an :class:`~certfx.specs.UnsafeRegion`: minimize ``t``
subject to ``t ≥ C_r y − d_r`` for every row ``r``; an optimum ``> 0`` proves the term empty.

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> gm = certfx.load(net, torch.zeros(1, 2))
    >>> enc = encode(gm, -torch.ones(2), torch.ones(2))
    >>> enc.problem.num_integers == enc.binaries <= 3, enc.exact, enc.sound
    (True, True, True)
    >>> lo, hi = enc.bounds["linear"]
    >>> bool((lo <= hi).all()), lo.shape
    (True, (3,))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor

from certfx import ops
from certfx.backends.milp import nonlinear as nl
from certfx.backends.milp.bounds import widened
from certfx.backends.milp.problem import Expr, Problem, ProblemBuilder
from certfx.errors import ShapeError, UnsupportedOp, UnsupportedOpsError
from certfx.specs import Conjunction

__all__ = ["EncodeOptions", "Encoding", "Tightener", "encode", "term_problem"]

# tighten(problem so far, rows to bound, their lower, their upper) -> (new lower, new upper)
Tightener = Callable[[Problem, Expr, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

_CHUNK = 1 << 22  # entries of a basis-evaluation chunk (32 MiB in float64)


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode.

    Attributes:
        exact_layers: binaries only for the last ``k`` ReLU-like layers (partial MILP); ``None``
            for all. Earlier non-linear ops are relaxed (the answer is then a proof when the
            problem is infeasible, but a solution is only a candidate).
        known_bounds: extra bounds per node name (flattened or shaped like one example), e.g.
            from a domain; intersected with the encoder's own interval bounds after widening
            by ``sqrt(eps_dtype)·(1 + |b|)`` against the rounding of whoever computed them.
        known_bounds_sound: whether ``known_bounds`` are sound; if not, the encoding is marked
            unsound and an infeasible result proves nothing.
        allow_relaxation: encode smooth monotone activations (sigmoid, tanh, …) by their sound
            linear relaxation from the shared table instead of raising; the encoding is then
            not exact.
    """

    exact_layers: int | None = None
    known_bounds: Mapping[str, tuple[Tensor | np.ndarray, Tensor | np.ndarray]] = field(
        default_factory=dict)
    known_bounds_sound: bool = True
    allow_relaxation: bool = False


@dataclass(frozen=True)
class Encoding:
    """A network encoded over an input box.

    Attributes:
        problem: variables, bounds, integrality and constraints (no objective).
        input_vars: the variable of each input entry (flattened).
        input_shape: the shape of one input (no batch dim).
        output: the flattened network output as an expression of the variables.
        bounds: sound bounds of every encoded node's flattened value, by node name.
        exact: no relaxed operation (every solution maps to a real network execution).
        sound: every bound used for big-M constants is sound (an infeasible problem is a proof).
        binaries: the number of binary variables.
        unstable: per ReLU-like node, the neurons whose input bounds straddle the kink.
        tightened: per node, the neurons whose bounds the ``tighten`` callback was asked for.
    """

    problem: Problem
    input_vars: np.ndarray
    input_shape: tuple[int, ...]
    output: Expr
    bounds: dict[str, tuple[np.ndarray, np.ndarray]]
    exact: bool
    sound: bool
    binaries: int
    unstable: dict[str, int]
    tightened: dict[str, int]


class _Encoder:
    """One walk over the graph; see :func:`encode`."""

    def __init__(self, gm: fx.GraphModule, options: EncodeOptions,
                 tighten: Tightener | None) -> None:
        self.gm, self.options, self.tighten = gm, options, tighten
        self.builder = ProblemBuilder()
        self.env: dict[fx.Node, Any] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.binaries = 0
        self.exact = True
        self.unstable: dict[str, int] = {}
        self.tightened: dict[str, int] = {}
        self.first_exact = self._first_exact_position()

    def _first_exact_position(self) -> float:
        kinked = [i for i, n in enumerate(self.gm.graph.nodes)
                  if n.op == "call_function" and n.target in nl.KINKED]
        k = self.options.exact_layers
        if k is None or k >= len(kinked):
            return 0.0
        if k < 0:
            raise ValueError(f"exact_layers must be >= 0 or None, got {k}")
        return math.inf if k == 0 else float(kinked[len(kinked) - k])

    # ---- values -------------------------------------------------------------------------------

    def _set(self, node: fx.Node, expr: Expr, shape: tuple[int, ...]) -> None:
        lo, hi = expr.interval(*self.builder.bounds())
        known = self.options.known_bounds.get(node.name)
        if known is not None:
            klo, khi = widened(known, expr.size, node.name)
            # Disjoint ranges cannot both be sound: keep the encoder's own where they cross.
            crossed = (klo > hi) | (khi < lo) | (klo > khi)
            lo = np.where(crossed, lo, np.maximum(lo, klo))
            hi = np.where(crossed, hi, np.minimum(hi, khi))
        self.env[node], self.shapes[node], self.bounds[node.name] = expr, shape, (lo, hi)

    def _value(self, node: fx.Node, subst: Mapping[fx.Node, Tensor], batch: int = 1) -> Any:
        """Call ``node``'s op with perturbed inputs replaced by ``subst`` and constants as is;
        tensors inside lists are expanded to ``batch`` (for ``concat``)."""

        def leaf(n: fx.Node, in_list: bool) -> Any:
            v = subst[n] if n in subst else self.env[n]
            if in_list and isinstance(v, Tensor) and v.shape[0] == 1 and batch > 1:
                v = v.expand(batch, *v.shape[1:])
            return v

        def conv(a: Any, in_list: bool = False) -> Any:
            if isinstance(a, fx.Node):
                return leaf(a, in_list)
            if isinstance(a, (list, tuple)):
                return type(a)(conv(x, True) for x in a)
            return a

        return node.target(*(conv(a) for a in node.args),
                           **{k: conv(v) for k, v in node.kwargs.items()})

    def _perturbed(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if isinstance(self.env.get(n), Expr)]

    # ---- affine ops ---------------------------------------------------------------------------

    def _affine(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        zeros = {p: torch.zeros((1, *self.shapes[p]), dtype=torch.float64) for p in inputs}
        base = self._value(node, zeros)
        shape, m = tuple(base.shape[1:]), int(base[0].numel())
        result = Expr.constant(base.reshape(-1).numpy())
        for p in inputs:
            r, c, v = self._jacobian(node, p, zeros, base)
            mapped = self.env[p].map(r, c, v, m)
            if mapped.nnz > self.env[p].nnz + self.env[p].size + v.size:
                # Composing made the rows denser than giving the input variables of its own.
                self.env[p] = nl.materialize(self.builder, self.env[p], *self.bounds[p.name])
                mapped = self.env[p].map(r, c, v, m)
            result = result + mapped
        self._set(node, result, shape)

    def _jacobian(self, node: fx.Node, p: fx.Node, zeros: Mapping[fx.Node, Tensor],
                  base: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The COO entries ``(out, in, value)`` of ``∂ node / ∂ p``, from basis vectors."""
        tr = ops.traits(node.target)
        in_list = any(isinstance(a, (list, tuple)) and p in a for a in node.args)
        use_lin = tr.linear_part is not None and not in_list and not node.kwargs
        lin = tr.linear_part if use_lin else None
        n, m = int(math.prod(self.shapes[p])), int(base[0].numel())
        chunk = max(1, min(n, _CHUNK // max(m, n, 1)))
        rows, cols, vals = [], [], []
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            basis = torch.zeros(k, n, dtype=torch.float64)
            basis[torch.arange(k), start + torch.arange(k)] = 1.0
            basis = basis.reshape(k, *self.shapes[p])
            if lin is not None:
                out = lin(*self._linear_args(node, p, basis, tr.perturbed_args))
            else:  # no separate linear part: f(e_i) − f(0)
                out = self._value(node, {**zeros, p: basis}, batch=k) - base
            out = out.reshape(k, m)
            i, j = out.nonzero(as_tuple=True)
            rows.append(j.numpy())
            cols.append((i + start).numpy())
            vals.append(out[i, j].numpy())
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def _linear_args(self, node: fx.Node, p: fx.Node, basis: Tensor,
                     perturbed_args: tuple[int, ...]) -> list[Any]:
        """Arguments of ``linear_part``: ``basis`` for ``p``, 0 for the other operands in
        perturbed positions (perturbed or constant), constants elsewhere."""
        args = []
        for pos, a in enumerate(node.args):
            if pos in perturbed_args:
                args.append(basis if a is p else 0.0)
            elif isinstance(a, fx.Node) and isinstance(self.env.get(a), Expr):
                raise UnsupportedOpsError("MILP encoding", [UnsupportedOp(
                    node.name, node.target.__name__, nl.where(node),
                    f"argument {pos} is perturbed but the op is affine only in "
                    f"{perturbed_args}")])
            else:
                args.append(self.env[a] if isinstance(a, fx.Node) else a)
        return args

    # ---- non-linear ops -----------------------------------------------------------------------

    def _select(self, node: fx.Node, position: int) -> None:
        """ACE's selection node: three perturbed arguments (score, chosen, other)."""
        score, chosen, other, threshold = node.args
        exact = position >= self.first_exact
        parts = []
        for a in (score, chosen, other):
            if isinstance(a, fx.Node) and isinstance(self.env.get(a), Expr):
                parts.append((self.env[a], self.bounds[a.name]))
            else:  # a constant argument: its value, as a point
                v = self.env[a] if isinstance(a, fx.Node) else torch.as_tensor(a)
                v = v.detach().to(torch.float64).reshape(-1).numpy()
                parts.append((Expr.constant(v), (v, v)))
        (s, s_b), (c, c_b), (o, o_b) = parts
        if s.size != 1:
            raise ShapeError(f"{node.name}: the selection score must be one number per "
                             f"example, got {s.size}")
        out, k = nl.encode_select(self.builder, s, s_b, c, c_b, o, o_b, float(threshold), exact)
        self.exact &= exact or k == 0
        self.binaries += k
        self._set(node, out, self.shapes[chosen] if isinstance(chosen, fx.Node)
                  else self.shapes[other])

    def _nonlinear(self, node: fx.Node, position: int) -> None:
        if node.target is ops.ace_select:
            self._select(node, position)
            return
        x = node.args[0]
        if not isinstance(x, fx.Node) or any(isinstance(self.env.get(a), Expr)
                                             for a in node.all_input_nodes if a is not x):
            raise UnsupportedOpsError("MILP encoding", [UnsupportedOp(
                node.name, node.target.__name__, nl.where(node), "only the first argument may "
                "depend on the input")])
        expr, shape = self.env[x], self.shapes[x]
        lo, hi = self.bounds[x.name]
        exact = position >= self.first_exact
        self.exact &= exact
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args[1:]]
        if node.target in nl.KINKED:
            kinks = ([0.0] if node.target is not ops.hardtanh else
                     [float(v) for v in args if math.isfinite(float(v))])
            straddle = np.zeros(lo.shape, dtype=bool)
            for kink in kinks:
                straddle |= (lo < kink) & (hi > kink)
            if self.tighten is not None and straddle.any():
                idx = np.flatnonzero(straddle)
                t_lo, t_hi = self.tighten(self.builder.build(), expr.select(idx), lo[idx],
                                          hi[idx])
                ok = t_lo <= t_hi
                lo, hi = lo.copy(), hi.copy()
                lo[idx[ok]] = np.maximum(lo[idx[ok]], t_lo[ok])
                hi[idx[ok]] = np.minimum(hi[idx[ok]], t_hi[ok])
                self.bounds[x.name] = (lo, hi)
                self.tightened[x.name] = int(idx.size)
                straddle = np.zeros(lo.shape, dtype=bool)
                for kink in kinks:
                    straddle |= (lo < kink) & (hi > kink)
            self.unstable[x.name] = int(straddle.sum())
        if node.target is ops.relu or node.target is ops.leaky_relu:
            alpha = 0.0 if node.target is ops.relu else float(args[0])
            out, k = nl.encode_relu_like(self.builder, expr, lo, hi, alpha, exact)
        elif node.target is ops.hardtanh:
            out, k = nl.encode_hardtanh(self.builder, expr, lo, hi, float(args[0]),
                                        float(args[1]), exact)
        elif node.target is ops.max_pool:
            out_shape = tuple(self._value(node, {x: torch.zeros((1, *shape),
                                                                dtype=torch.float64)}).shape[1:])
            kernel, stride, padding, dilation = (tuple(a) if a else () for a in args[:4])
            windows = nl.pool_windows(shape, out_shape, kernel, stride or kernel,
                                      padding or (0,) * len(kernel),
                                      dilation or (1,) * len(kernel))
            out, k = nl.encode_max(self.builder, expr, lo, hi, windows, exact)
            self._set(node, out, out_shape)
            self.binaries += k
            return
        else:  # a smooth activation, relaxed (check_encodable allowed it)
            out, k = nl.encode_relaxed(self.builder, expr, lo, hi, node.target, tuple(args)), 0
            self.exact = False
        self.binaries += k
        self._set(node, out, shape)

    # ---- the walk -----------------------------------------------------------------------------

    def run(self, lower: Tensor, upper: Tensor) -> Encoding:
        inputs = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        output = None
        for position, node in enumerate(self.gm.graph.nodes):
            if node.op == "placeholder":
                if node is inputs[0]:
                    lo = lower.detach().cpu().to(torch.float64).reshape(-1).numpy()
                    hi = upper.detach().cpu().to(torch.float64).reshape(-1).numpy()
                    in_vars = self.builder.add_variables(lo, hi)
                    self._set(node, Expr.variables(in_vars), tuple(lower.shape))
                elif node.name == "spec":
                    self.env[node] = None
                else:
                    raise ShapeError(f"the MILP backend takes one input; {node.name} is another")
            elif node.op == "get_attr":
                value = self.gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                value = value.detach().cpu()
                self.env[node] = value.to(torch.float64) if value.is_floating_point() else value
            elif node.op == "call_function":
                perturbed = self._perturbed(node)
                if not perturbed:  # constant folding
                    with torch.no_grad():
                        self.env[node] = self._value(node, {})
                elif node.target in nl.EXACT_OPS or not ops.traits(node.target).affine:
                    self._nonlinear(node, position)
                else:
                    self._affine(node, perturbed)
            elif node.op == "output":
                output = node.args[0]
        if isinstance(output, (tuple, list)):
            if len(output) != 1:
                raise ShapeError("the MILP backend takes networks with one output")
            output = output[0]
        out = self.env[output] if isinstance(output, fx.Node) else output
        if not isinstance(out, Expr):
            out = Expr.constant(torch.as_tensor(out, dtype=torch.float64).reshape(-1).numpy())
        return Encoding(self.builder.build(), in_vars, tuple(lower.shape), out, self.bounds,
                        self.exact, self.options.known_bounds_sound, self.binaries,
                        self.unstable, self.tightened)


def encode(gm: fx.GraphModule, lower: Tensor, upper: Tensor,
           options: EncodeOptions | None = None, tighten: Tightener | None = None) -> Encoding:
    """Encode the canonical graph ``gm`` over the input box ``[lower, upper]``.

    Args:
        gm: a canonical graph (``certfx.load``); one input, one output.
        lower, upper: the input box, shaped like one input (no batch dim).
        options: partial MILP, extra bounds, relaxation of smooth activations.
        tighten: called before each ReLU-like layer with the problem encoded so far and the
            layer's unstable pre-activations; returns sound bounds for them (see
            :func:`certfx.backends.milp.ortools.tightener`).
    """
    options = options or EncodeOptions()
    nl.check_encodable(gm, options.allow_relaxation)
    lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
    if lower.shape != upper.shape:
        raise ShapeError(f"box lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ")
    expected = gm.meta.get("certfx.input_shape")
    if expected is not None and tuple(expected) != tuple(lower.shape):
        if math.prod(expected) != lower.numel():
            raise ShapeError(f"the box has shape {tuple(lower.shape)}, the network takes "
                             f"{tuple(expected)}")
        lower, upper = lower.reshape(expected), upper.reshape(expected)
    with torch.no_grad():
        return _Encoder(gm, options, tighten).run(lower, upper)


def term_problem(encoding: Encoding, term: Conjunction,
                 cutoff: float | None = None) -> tuple[Problem, int] | None:
    """``min t`` s.t. ``t ≥ C_r y − d_r`` for every row of ``term`` (``C``: ``term.matrix``,
    ``d``: ``term.offset``, ``y``: the flattened output). Returns the problem and the index of
    ``t``. The optimum is ``max_r (C_r y − d_r)`` minimized over the input box: ``≤ 0`` exactly
    when some input's output satisfies every row.

    With a ``cutoff``, ``t ≤ cutoff`` is added (the problem is then infeasible exactly when the
    optimum exceeds ``cutoff``, and branch and bound prunes every node whose bound does), and
    ``None`` is returned when the interval bounds of the rows alone prove ``t > cutoff``.
    """
    c = term.matrix.detach().cpu().to(torch.float64).numpy()
    d = term.offset.detach().cpu().to(torch.float64).numpy()
    if c.shape[1] != encoding.output.size:
        raise ShapeError(f"the specification reads {c.shape[1]} outputs, the network has "
                         f"{encoding.output.size}")
    r, k = np.nonzero(c)
    rows = encoding.output.map(r, k, c[r, k], c.shape[0]).shift(-d)   # C y − d
    builder = ProblemBuilder(encoding.problem)
    lo, hi = rows.interval(*builder.bounds())
    t_lo, t_hi = lo.max(), hi.max()
    if cutoff is not None:
        if t_lo > cutoff:
            return None
        t_hi = min(t_hi, cutoff)
    t = builder.add_variables(np.array([t_lo]), np.array([max(t_lo, t_hi)]))
    builder.add_constraints(rows - Expr.variables(np.full(c.shape[0], t[0])), upper=0.0)
    return builder.build(objective=Expr.variables(t)), int(t[0])
