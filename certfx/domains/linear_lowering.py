"""The lowering of the back-substitution domains: backward passes emitted as plain tensor code.

Unlike a forward domain (one rule call per node), a back-substitution domain needs, for every
node whose bounds it uses, a whole *backward pass*: a chain of backward-rule calls from that node
to the input. This module plans those passes on the canonical graph at compile time and emits
them, unrolled, into a new GraphModule, so that nothing walks a graph at run time:

1. **Which bounds are needed.** Every relaxed op (activation, max-pool) needs the bounds of its
   input. With ``IntermediateBounds.INTERVAL`` (CROWN-IBP, Zhang et al. 2020, Sec. 3) they come
   from interval propagation. With ``IntermediateBounds.BACKSUB`` (DeepPoly/CROWN) such a node
   gets them from a backward pass to the input, intersected with the interval bounds that the
   (already intersected) bounds of its inputs give — both are sound, and the interval ones are
   sometimes tighter (CROWN's relaxation of a sigmoid loses against its exact range). No
   backward pass is needed where interval arithmetic is exact: at the output of a relaxed op
   (``[f(l), f(u)]`` is exact per neuron given its input's bounds) and at a node reached from
   the input through affine ops of which at most one mixes coordinates (a box maps exactly
   through one affine map and through any diagonal ones).
2. **One backward pass per such node and one for the output**, visiting its ancestors in reverse
   topological order and summing the terms of nodes with several users (residual blocks). A
   node's pass is a generated submodule (``self.backward_<node>``) that
   :func:`~certfx.domains.linear.lin_pass_bounds` runs in chunks of rows within the coefficient
   budget, only over the neurons intervals leave unstable (when only ReLU-like ops read the
   node); through a chain of convolutions it keeps each row's receptive field only
   (:mod:`~certfx.domains.linear_patches`).

The generated ``forward(lower, upper, spec=None, slopes=None, bound_upper=True)`` returns an
:class:`~certfx.domains.interval.Interval` on the outputs (with ``spec``: on ``C·output``);
with ``bound_upper=False`` the output's pass bounds only from below (half the rows; the upper
bounds are then ``+inf``) — all that margin certification and certified training need.
``splits`` restricts the bounds of the relaxed ops' inputs to a branch of a branch and bound
(:func:`~certfx.domains.linear.lin_restrict`; which nodes, in ``meta[SPLIT_KEY]``); every later
bound is computed from the restricted ones.
Variants for α-CROWN take the lower slopes as extra inputs (see :mod:`certfx.domains.crown`).

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> gm = emit_backsub(certfx.load(net, torch.zeros(1, 2)), IntermediateBounds.BACKSUB)
    >>> print(gm.code.split("def forward")[1].split(":")[0])
    (self, lower, upper, slopes = None, bound_upper = True, ball = None, splits = None, multipliers = None)
    >>> "back_relu(" in gm.code and "lin_concretize(" in gm.code
    True
"""

from __future__ import annotations

import enum
import inspect
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from certfx import ops
from certfx.compile import LOWER_ONLY_KEY
from certfx.domains.base import get_domain
from certfx.domains.linear import (
    Slopes,
    Var,
    lin_add,
    lin_concretize,
    lin_identity,
    lin_input,
    lin_intersect,
    lin_output_bounds,
    lin_output_start,
    lin_pass_bounds,
    lin_lagrange,
    lin_restrict,
    lin_slopes,
    lin_unit_rows,
    lin_split,
    lin_weight_rows,
)
from certfx.domains.linear_backward import BACK, RELAX, RELAX_WEIGHTED, has_free_slope
from certfx.domains.linear_patches import lin_fill, patch_rows, patch_size
from certfx.domains.relaxations import RELAXATIONS, linear_relaxation
from certfx.errors import CertfxError, UnsupportedOp, UnsupportedOpsError

__all__ = ["IntermediateBounds", "AlphaScope", "emit_backsub", "ALPHA_KEY", "SPLIT_KEY",
           "DEFAULT_MAX_COEFFICIENTS", "RuleTracer"]

PERTURBED_KEY = "certfx.perturbed"  # as written by passes.mark_perturbed / shape_prop
SHAPE_KEY = "certfx.shape"
ALPHA_KEY = "certfx.alpha"  # meta of α modules: [(placeholder name, rows or None)]
# meta: per entry of ``splits`` (the relaxed ops' inputs the output's pass needs, in graph
# order) ``(node name, kinked: only ReLU-like ops read it)``, or None if not restricted (input)
SPLIT_KEY = "certfx.split_nodes"

# Affine ops that keep a box a box exactly (diagonal maps, selections, embeddings).
_DIAGONAL = {ops.mul, ops.div, ops.neg, ops.batch_norm, ops.add, ops.sub}
_SELECTING = {ops.reshape, ops.permute, ops.strided_slice, ops.pad, ops.concat}


class RuleTracer(fx.Tracer):
    """Traces generated code with every function exposed to codegen as a leaf.

    Unpickling a GraphModule re-traces its code (``torch.fx`` stores code, not graphs); the
    rule functions take abstract elements, not proxies, so they must stay calls. Generated
    modules name this tracer, so that α-CROWN's submodules survive ``torch.save``/export.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from torch.fx.graph import _custom_builtins

        leaves = tuple(b.obj for b in _custom_builtins.values() if inspect.isfunction(b.obj))
        kwargs["autowrap_functions"] = (*kwargs.get("autowrap_functions", ()), *leaves)
        super().__init__(*args, **kwargs)


class IntermediateBounds(enum.Enum):
    """Where the bounds of relaxed ops' inputs come from."""

    BACKSUB = "backsub"    # DeepPoly / CROWN: a backward pass to the input per node
    INTERVAL = "interval"  # CROWN-IBP: interval propagation


class AlphaScope(enum.Enum):
    """Which backward passes take their free lower slopes as inputs (α-CROWN)."""

    NONE = "none"
    FINAL = "final"  # the output's pass only
    ALL = "all"      # every pass


def _perturbed(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "call_function") \
        and bool(n.meta.get(PERTURBED_KEY, True))


def _inputs(n: fx.Node) -> list[fx.Node]:
    """The perturbed arguments of ``n`` in order of appearance (lists flattened)."""
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) if _perturbed(a) else None)
    return found


def _relaxed(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in RELAX


_KINKED = {ops.relu, ops.leaky_relu}  # relaxations exact for neurons of fixed sign
# activations whose relaxation is elementwise with finite lines (patches can carry them)
_ELEMENTWISE_RELAXED = {ops.relu, ops.leaky_relu, ops.hardtanh, ops.sigmoid, ops.tanh}


class _SubPass:
    """A backward pass emitted into a graph of its own, run by :func:`lin_pass_bounds` a chunk
    of rows at a time: its first input is the chunk's neuron indices; values of the main graph
    it reads (relaxations, weights, the input box) become further inputs, in order of first
    use."""

    def __init__(self) -> None:
        self.g = fx.Graph()
        self.start = self.g.placeholder("start")
        self.captured: dict[fx.Node, fx.Node] = {}

    def _capture(self, n: fx.Node) -> fx.Node:
        if n.graph is self.g:
            return n
        if n not in self.captured:
            self.captured[n] = self.g.placeholder(n.name)
        return self.captured[n]

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str,
             kwargs: dict[str, Any] | None = None) -> fx.Node:
        args, kwargs = fx.node.map_arg((args, kwargs or {}), self._capture)
        return self.g.create_node("call_function", fn, args, kwargs, name=name)

    def module(self, rows: fx.Node, name: str) -> fx.GraphModule:
        self.g.output(rows)
        self.g._tracer_cls = RuleTracer
        return fx.GraphModule(torch.nn.Module(), self.g, class_name=f"BackwardPass_{name}")


class _Emitter:
    """Builds one generated graph; see :func:`emit_backsub`."""

    def __init__(self, gm: fx.GraphModule, intermediate: IntermediateBounds, slopes: Slopes,
                 alpha: AlphaScope, bounds_inputs: bool, max_coefficients: int,
                 use_patches: bool = True, input_is_box: bool = True):
        self.gm, self.mode, self.alpha_scope = gm, intermediate, alpha
        self.max_coefficients = max_coefficients
        self.use_patches = use_patches
        # Interval propagation is exact through one affine layer from a *box*; an input set that
        # is also an ℓ2 ball (L2Ball specs) needs the backward pass there too.
        self.input_is_box = input_is_box
        self.too_big: list[str] = []  # backward passes over the coefficient budget
        self.bounds_inputs = bounds_inputs
        self.nodes = list(gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output").args[0]
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}       # constants of the canonical graph
        self.bounds: dict[fx.Node, fx.Node] = {}  # Interval of a node's value
        self.relax: dict[tuple[fx.Node, str], fx.Node] = {}
        self.alphas: list[tuple[str, int | None]] = []
        self.slope_nodes: list[fx.Node] = []
        self.starts: dict[str, fx.Node] = {}  # backward pass name -> its start node
        self.submodules: dict[str, fx.GraphModule] = {}  # passes run in chunks, by attribute
        self.lower = self.g.placeholder("lower")
        self.upper = self.g.placeholder("upper")
        self.final_inputs = self.relax_inputs(self._ancestors(self.output))
        if bounds_inputs:  # placeholders without defaults come first
            for p in self.final_inputs:
                self.bounds[p] = self.g.placeholder(f"bounds_{p.name}")
        for extra in placeholders[1:]:
            self.env[extra] = self.g.placeholder(extra.name, default_value=extra.meta.get(
                "certfx.default", None))
        self.spec = next((self.env[p] for p in placeholders[1:] if p.name == "spec"), None)
        given = self.g.placeholder("slopes", default_value=None)
        self.bound_upper = self.g.placeholder("bound_upper", default_value=True)
        # an ℓ2 ball (center, radius) the input set also lies in (L2Ball input specs)
        self.ball = self.g.placeholder("ball", default_value=None)
        # a branch: restrictions of the relaxed ops' inputs (lin_restrict; given bounds come
        # restricted) and their Lagrange multipliers in the output's pass (lin_lagrange)
        self.splits = self.g.placeholder("splits", default_value=None)
        self.multipliers = self.g.placeholder("multipliers", default_value=None)
        self.restricted: set[fx.Node] = (set(self.final_inputs) - {self.input} if bounds_inputs
                                         else set())  # the nodes splits[k] restricts
        self.slopes = self._call(lin_slopes, (given, slopes), "slopes")
        self.box = self._call(lin_input, (self.lower, self.upper, self.ball), "x")
        self.bounds[self.input] = self.box

    # -- small helpers --------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str,
              kwargs: dict[str, Any] | None = None) -> fx.Node:
        return self.g.create_node("call_function", fn, args, kwargs or {}, name=name)

    def _const(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda a: self.env[a])

    def _ancestors(self, start: fx.Node) -> set[fx.Node]:
        seen, todo = {start}, [start]
        while todo:
            for p in _inputs(todo.pop()):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    def _exact_by_intervals(self, n: fx.Node) -> bool:
        """Whether interval propagation from the input to ``n`` is exact (module docstring)."""
        return self._from_input_box(n, mixing=1)

    def _box_image(self, n: fx.Node) -> bool:
        """Whether the values of ``n`` are exactly the box of its interval bounds: the input box
        mapped by elementwise affine ops and selections, each of which maps a box onto a box
        (the input's normalization, flattening)."""
        return self._from_input_box(n, mixing=0)

    def _from_input_box(self, n: fx.Node, mixing: int) -> bool:
        """Whether ``n`` is reached from an input *box* (ℓ∞ inputs only) by affine ops of one
        input, of which at most ``mixing`` are not diagonal or selecting."""
        if not self.input_is_box:
            return False
        cur = n
        while cur is not self.input:
            inputs = _inputs(cur)
            if _relaxed(cur) or len(inputs) != 1 or not ops.traits(cur.target).affine:
                return False
            same_shape = cur.meta.get(SHAPE_KEY) == inputs[0].meta.get(SHAPE_KEY)
            if not (cur.target in _SELECTING or (cur.target in _DIAGONAL and same_shape)):
                mixing -= 1
            if mixing < 0:
                return False
            cur = inputs[0]
        return True

    # -- planning -------------------------------------------------------------------------
    def relax_inputs(self, within: set[fx.Node]) -> list[fx.Node]:
        """Inputs of the relaxed nodes in ``within``, in graph order (no repeats)."""
        found = {p for n in within if _relaxed(n) for p in _inputs(n)}
        return [n for n in self.nodes if n in found]

    def plan(self) -> dict[fx.Node, str]:
        """``node -> "interval" | "both"`` (intervals intersected with a backward pass) for
        every node whose bounds are needed."""
        relaxed_inputs = set(self.relax_inputs({n for n in self.nodes if _perturbed(n)}))
        needed = set(relaxed_inputs)  # grows by the inputs of interval rules
        method: dict[fx.Node, str] = {}
        for n in reversed(self.nodes):
            if n not in needed or n is self.input:
                continue
            by_intervals = (self.mode is IntermediateBounds.INTERVAL or _relaxed(n)
                            or n not in relaxed_inputs or self._exact_by_intervals(n))
            method[n] = "interval" if by_intervals else "both"
            needed.update(_inputs(n))
        return method

    # -- emission -------------------------------------------------------------------------
    def emit(self, result: str) -> fx.Graph:
        """``result``: ``"bounds"`` (the output's Interval), ``"intermediate"`` (the tuple of
        bounds the output's pass uses) or ``"bounds+slopes"`` (α modules)."""
        # given the bounds a pass needs, still compute the (exact, cheap) boxes a pass may stop
        # at (see _backsub); unused ones are dropped as dead code
        method = ({n: "interval" for n in self.nodes if _perturbed(n) and n is not self.input
                   and self._box_image(n)} if self.bounds_inputs else self.plan())
        for n in self.nodes:
            if n.op == "get_attr":
                self.env[n] = self.g.get_attr(str(n.target))
            elif n.op == "call_function" and not _perturbed(n):
                self.env[n] = self.g.create_node("call_function", n.target,
                                                 self._const(n.args), self._const(n.kwargs),
                                                 name=n.name)
            elif n in method:
                self._emit_bounds(n, method[n])
                if n in self.final_inputs:
                    self.restricted.add(n)
                    self.bounds[n] = self._call(
                        lin_restrict, (self.bounds[n], self.splits,
                                       self.final_inputs.index(n)), f"{n.name}_split")
        if result == "intermediate":
            self.g.output(tuple(self.bounds[p] for p in self.final_inputs))
            return self.g
        shape = self._shape(self.output)
        start = self._call(lin_output_start, (self.lower, self.spec, shape, self.bound_upper),
                           "out_start")
        rows = self._backsub(self.output, start, "out", lagrange=True)
        out = self._call(lin_output_bounds, (rows, self.spec, shape, self.bound_upper), "out")
        if result == "bounds+slopes+intermediate":  # α-β branch and bound's root
            self.g.output((out, tuple(self.slope_nodes),
                           tuple(self.bounds[p] for p in self.final_inputs)))
        else:
            self.g.output(out if result == "bounds" else (out, tuple(self.slope_nodes)))
        return self.g

    def _shape(self, n: fx.Node) -> tuple[int, ...]:
        shape = n.meta.get(SHAPE_KEY) or self.gm.meta.get("certfx.output_shape")
        return tuple(shape)

    def _emit_bounds(self, n: fx.Node, how: str) -> None:
        rule = get_domain("box").rule_for(n.target)
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.bounds[a]
                                       if _perturbed(a) else self.env[a])
        intervals = self._call(rule, args, n.name if how == "interval" else f"{n.name}_ibp",
                               kwargs)
        if how == "interval":
            self.bounds[n] = intervals
            return
        shape = tuple(n.meta[SHAPE_KEY])
        if self.alpha_scope is AlphaScope.ALL:  # slopes per row of this pass: all rows at once
            start = self._call(lin_identity, (self.lower, shape), f"{n.name}_start")
            rows = self._backsub(n, start, n.name)
            backsub = self._call(lin_split, (rows, shape), f"{n.name}_backsub")
            self.bounds[n] = self._call(lin_intersect, (backsub, intervals), n.name)
            return
        sub = _SubPass()
        plan = self._patch_plan(n)
        if plan is not None:  # a convolutional chain: local coefficients (linear_patches)
            steps, values = plan
            rows = sub.call(patch_rows, (sub.start, shape, self.box, steps, *values),
                            f"{n.name}_rows")
            widest = patch_size(steps)
        elif self._weight_rows(n):  # the unit rows through the linear layer: a gather
            x, weight, bias = (list(n.args) + [n.kwargs.get("bias")])[:3]
            start = sub.call(lin_weight_rows, (sub.start, self._const(weight), self._const(bias)),
                             f"{n.name}_start")
            rows = self._backsub(n, start, n.name, sub.call, entry=x)
            widest = max(math.prod(self._shape(p)) for p in self._ancestors(x))
        else:
            start = sub.call(lin_unit_rows, (sub.start, shape, self.lower), f"{n.name}_start")
            rows = self._backsub(n, start, n.name, sub.call)
            widest = max(math.prod(self._shape(p)) for p in self._ancestors(n))
        attr = f"backward_{n.name}"
        self.submodules[attr] = sub.module(rows, n.name)
        chunk = max(1, self.max_coefficients // (2 * widest))
        unstable_only = all(u.target in _KINKED for u in n.users if _perturbed(u))
        self.bounds[n] = self._call(
            lin_pass_bounds, (self.g.get_attr(attr), intervals, shape, unstable_only, chunk,
                              *sub.captured), n.name, {"row_width": widest})

    def _weight_rows(self, n: fx.Node) -> bool:
        """Whether ``n`` is a linear layer on a perturbed vector with constant weights, whose
        pass can start at its input (:func:`lin_weight_rows`)."""
        if n.target is not ops.linear or len(self._shape(n)) != 1:
            return False
        x, weight, *rest = n.args
        bias = rest[0] if rest else n.kwargs.get("bias")
        return (_perturbed(x) and not _perturbed(weight)
                and not (isinstance(bias, fx.Node) and _perturbed(bias)))

    def _patch_plan(self, n: fx.Node) -> tuple[tuple[Any, ...], list[Any]] | None:
        """The steps and values of :func:`~certfx.domains.linear_patches.patch_rows` from
        ``n`` back to the input when that path is a chain of 2-d convolutions, elementwise
        activations and elementwise affine ops on ``(C, H, W)`` tensors; else ``None``."""
        if not self.use_patches or len(self._shape(n)) != 3:
            return None
        self.starts[n.name] = n
        steps: list[Any] = []
        values: list[Any] = []
        cur = n
        while cur is not self.input:
            inputs = _inputs(cur)
            if len(inputs) != 1 or cur.args[0] is not inputs[0] \
                    or len(self._shape(inputs[0])) != 3:
                return None
            in_shape = self._shape(inputs[0])
            if cur.target is ops.conv:
                weight, bias, stride, padding, dilation, groups = cur.args[1:7]
                if weight.op != "get_attr" or groups != 1 or tuple(dilation) != (1, 1) \
                        or len(stride) != 2:
                    return None
                kernel = tuple(_attribute(self.gm, weight.target).shape[2:])
                steps.append(("conv", tuple(stride), tuple(padding), kernel, in_shape))
                values += [self._const(weight), self._const(bias)]
            elif _relaxed(cur) and cur.target in _ELEMENTWISE_RELAXED:
                steps.append(("relax", in_shape))
                values.append(self._relaxation(cur, n.name))
            elif cur.target in _DIAGONAL and self._shape(cur) == in_shape:
                consts = (self._const(cur.args[1:]), self._const(cur.kwargs))
                f = [self.g.create_node(
                    "call_function", cur.target,
                    (self._call(lin_fill, (self.lower, in_shape, v), f"{cur.name}_at_{v:g}"),
                     *consts[0]), consts[1], name=f"{cur.name}_of_{v:g}") for v in (0.0, 1.0)]
                steps.append(("affine", in_shape))
                values += f
            else:
                return None
            cur = inputs[0]
        return tuple(steps), values

    def _relaxation(self, r: fx.Node, start: str) -> fx.Node:
        """The relaxation of ``r`` used by the pass named ``start`` (shared unless α)."""
        op_args = self._const(tuple(r.args[1:])) if len(_inputs(r)) == 1 else ()
        free = self.alpha_scope is not AlphaScope.NONE and has_free_slope(r.target, *op_args)
        final = self.starts[start] is self.output
        per_pass = free and (self.alpha_scope is AlphaScope.ALL or final)
        key = (r, start if per_pass else "")
        if key in self.relax:
            return self.relax[key]
        kwargs: dict[str, Any] = {"slopes": self.slopes}
        name = f"{r.name}_relax"
        if per_pass:
            alpha = self.g.placeholder(f"alpha_{start}_{r.name}", default_value=None)
            rows = None if final else 2 * math.prod(self._shape(self.starts[start]))
            self.alphas.append((alpha.name, rows))
            kwargs["alpha"] = alpha
            name = f"{r.name}_relax_{start}"
        fn = RELAX_WEIGHTED[r.target] if per_pass else RELAX[r.target]
        args = fx.node.map_arg(r.args, lambda v: self.bounds[v] if _perturbed(v)
                               else self.env[v])  # the bounds of every perturbed factor
        node = self._call(fn, args, name, kwargs)
        if per_pass:
            self.slope_nodes.append(self._call(getattr, (node, "weight"), f"{name}_weight"))
        self.relax[key] = node
        return node

    def _check_size(self, start: fx.Node, ancestors: set[fx.Node]) -> None:
        """Dense coefficients of a pass hold ``rows × numel(node)`` entries per example at each
        node it visits; record passes whose largest exceeds the budget."""
        rows = 2 * math.prod(self._shape(start))
        sizes = {n: rows * math.prod(self._shape(n)) for n in ancestors if n.meta.get(SHAPE_KEY)}
        worst = max(sizes, key=sizes.__getitem__, default=None)
        if worst is not None and sizes[worst] > self.max_coefficients:
            self.too_big.append(
                f"the bounds of {start.name} ({rows // 2} neurons) need {sizes[worst]:.3g} "
                f"coefficients per example at {worst.name} "
                f"({sizes[worst] * 4 / 2**30:.3g} GiB in float32)")

    def _backsub(self, start: fx.Node, a0: fx.Node, name: str,
                 call: Callable[..., fx.Node] | None = None,
                 entry: fx.Node | None = None, lagrange: bool = False) -> fx.Node:
        """Emit the backward pass from ``start`` to the input, given the linear bounds ``a0``
        of ``start`` over the node ``entry`` (default ``start`` itself); returns the concretized
        rows. ``call`` emits into another graph (a :class:`_SubPass`, whose memory the chunking
        bounds); by default into the main one, checking the size.

        The pass stops early at a node whose values are exactly its interval box
        (:meth:`_box_image`, e.g. the normalized input) once every row's coefficients are on that
        node alone: concretizing there gives the same bounds as at the input, without carrying
        the coefficients through the normalization. With ``lagrange`` (the output's pass), the
        rows take a branch's split constraints at each restricted node (:func:`lin_lagrange`)."""
        self.starts[name] = start
        entry = start if entry is None else entry
        ancestors = self._ancestors(entry)
        if call is None:
            call = self._call
            self._check_size(start, ancestors)
        pending: dict[fx.Node, fx.Node] = {entry: a0}
        for n in reversed(self.nodes):
            if n not in ancestors or n is self.input or n not in pending:
                continue
            a = pending.pop(n)
            if lagrange and n in self.restricted:
                a = call(lin_lagrange, (a, self.multipliers, self.splits,
                                        self.final_inputs.index(n)), f"{name}_lagrange_{n.name}")
            if not pending and n in self.bounds and self._box_image(n):
                return call(lin_concretize, (a, self.bounds[n]), f"{name}_rows")
            inputs = _inputs(n)
            rule = BACK.rule_for(n.target)
            at = f"{name}_at_{inputs[0].name}"
            if _relaxed(n) and len(inputs) == 1:
                terms = [call(rule, (a, self._relaxation(n, name)), at)]
            elif _relaxed(n):  # a product: one term per factor
                res = call(rule, (a, self._relaxation(n, name)), f"{name}_from_{n.name}")
                terms = [call(operator.getitem, (res, k), f"{name}_at_{p.name}")
                         for k, p in enumerate(inputs)]
            else:
                # Perturbed arguments become Vars (canonical graphs pass them positionally).
                args, kwargs = fx.node.map_arg(
                    (n.args, n.kwargs), lambda v: Var(tuple(v.meta[SHAPE_KEY]))
                    if _perturbed(v) else self.env[v])
                res = call(rule, (a, *args), at if len(inputs) == 1
                                 else f"{name}_from_{n.name}", kwargs)
                terms = [res] if len(inputs) == 1 else [
                    call(operator.getitem, (res, k), f"{name}_at_{p.name}")
                    for k, p in enumerate(inputs)]
            for p, term in zip(inputs, terms):
                pending[p] = term if p not in pending else call(
                    lin_add, (pending[p], term), f"{name}_at_{p.name}")
        return call(lin_concretize, (pending[self.input], self.box), f"{name}_rows")


def _check_relaxations(gm: fx.GraphModule) -> None:
    """Reject relaxed nodes whose constant arguments the relaxation cannot take (a leaky ReLU
    slope outside ``[0, 1]``), all at once, before any code is generated."""
    problems = []
    for n in gm.graph.nodes:
        if not (_perturbed(n) and n.op == "call_function" and n.target in RELAXATIONS):
            continue
        try:
            linear_relaxation(n.target, torch.tensor([-1.0]), torch.tensor([1.0]), *n.args[1:])
        except (ValueError, TypeError) as err:
            problems.append(UnsupportedOp(n.name, n.target.__name__, "", f"{err}; use the "
                                          "box or zonotope domain for this network"))
    if problems:
        raise UnsupportedOpsError("back-substitution cannot relax these nodes", problems)


DEFAULT_MAX_COEFFICIENTS = 1 << 24  # per example: 64 MiB of float32 coefficients


def _attribute(root: torch.nn.Module, target: str) -> Any:
    """The attribute at the dotted path ``target`` of ``root``."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def emit_backsub(gm: fx.GraphModule, intermediate: IntermediateBounds,
                 slopes: Slopes = Slopes(), alpha: AlphaScope = AlphaScope.NONE,
                 bounds_inputs: bool = False, result: str = "bounds",
                 class_name: str = "CrownBounds",
                 max_coefficients: int = DEFAULT_MAX_COEFFICIENTS,
                 use_patches: bool = True, input_is_box: bool = True) -> fx.GraphModule:
    """Generate the back-substitution bound module of a canonical graph.

    Args:
        gm: a canonical graph (after ``mark_perturbed`` and ``shape_prop``; usually with the
            specification folded in by ``fuse_spec``).
        intermediate: how the bounds of relaxed ops' inputs are computed.
        slopes: the default of the generated ``slopes`` argument.
        alpha: which passes take lower slopes ``alpha_<pass>_<node>`` as inputs (default None:
            the ``slopes`` policy); their ``(name, rows)`` are listed in ``meta[ALPHA_KEY]``
            (``rows`` None: twice the number of specified outputs).
        bounds_inputs: take the bounds the output's pass needs as inputs ``bounds_<node>``
            instead of computing them.
        result: ``"bounds"``, ``"intermediate"`` (return those bounds), ``"bounds+slopes"``
            (also return the lower slopes used for every α input, in order) or
            ``"bounds+slopes+intermediate"`` (and then the bounds of the relaxed ops' inputs).
        class_name: the generated class's name.
        max_coefficients: the largest coefficient tensor (entries per example) a backward pass
            may form; the dense coefficients of a pass from a node of ``N`` neurons hold
            ``2N × numel`` entries at every node it visits.
        use_patches: intermediate passes through convolutional chains keep local coefficients
            (:mod:`~certfx.domains.linear_patches`); same bounds, far less memory and time.
        input_is_box: ``False`` when the input set may also be an ℓ2 ball (``ball`` input):
            no intermediate bound is taken from intervals alone then.

    Raises:
        CertfxError: when a backward pass would exceed ``max_coefficients`` (all listed).
    """
    _check_relaxations(gm)
    emitter = _Emitter(gm, intermediate, slopes, alpha, bounds_inputs, max_coefficients,
                       use_patches, input_is_box)
    graph = emitter.emit(result)
    if emitter.too_big:
        raise CertfxError(
            "back-substitution with dense coefficients is too large for this network:\n  "
            + "\n  ".join(emitter.too_big) + f"\n(limit {max_coefficients:.3g} per example). "
            "Use domain 'crown-ibp' (intermediate bounds by intervals), or raise "
            "max_coefficients in the domain options if the memory is there.")
    graph.eliminate_dead_code()
    graph._tracer_cls = RuleTracer  # see RuleTracer
    # the root: the canonical graph's attributes (shared, not copied) and the chunked passes
    attrs = {str(n.target): emitter.submodules.get(str(n.target)) or _attribute(gm, n.target)
             for n in graph.nodes if n.op == "get_attr"}
    out = fx.GraphModule(attrs, graph, class_name=class_name)
    out.meta.update(gm.meta)
    out.meta[ALPHA_KEY] = list(emitter.alphas)
    out.meta[LOWER_ONLY_KEY] = result != "intermediate"
    out.meta[SPLIT_KEY] = [(p.name, all(u.target in _KINKED for u in p.users if _perturbed(u)))
                           if p in emitter.restricted else None for p in emitter.final_inputs]
    return out
