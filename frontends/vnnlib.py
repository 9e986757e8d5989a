"""Read VNN-LIB property files into :class:`~certfx.specs.Property` objects, and read and write
counterexamples in the VNN-COMP format.

VNN-LIB is the SMT-LIB subset used by VNN-COMP: ``(declare-const X_i Real)`` declares input ``i``
(an index into the row-major flattened network input), ``(declare-const Y_j Real)`` output ``j``,
and the conjunction of all ``(assert ...)`` statements describes a *counterexample*: an input in
the box whose output satisfies the output constraints. Supported are ``<=``, ``>=``, ``=`` and
``<``, ``>`` (read as non-strict, the competition's convention: verifiers compute in floating
point, where strictness has no meaning) between linear terms (numbers such as ``-0.5`` or
``1e-3``, variables, ``+``, ``-``, ``*`` and ``/`` by constants), combined by ``and``/``or`` in
any nesting. Input constraints must bound single variables; an ``or`` over input boxes yields one
:class:`Property` per box, each with the output cases that go with it.

The two statement forms that make up nearly all of a large file, ``(declare-const X_0 Real)``
and ``(assert (<= X_0 0.5))``, are matched whole by one regular expression; everything else is
read by a small recursive-descent reader with exact rational arithmetic.

Example:
    >>> props = parse_vnnlib('''
    ...     (declare-const X_0 Real) (declare-const X_1 Real)
    ...     (declare-const Y_0 Real) (declare-const Y_1 Real)
    ...     (assert (>= X_0 -1)) (assert (<= X_0 1)) (assert (<= 0 X_1 0.5))
    ...     (assert (or (and (>= Y_1 Y_0)) (and (<= Y_0 -2))))''')
    >>> [(p.name, p.lower.tolist(), p.upper.tolist()) for p in props]
    [('<string>#0', [-1.0, 0.0], [1.0, 0.5])]
    >>> props[0].unsafe.contains(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
    [True, False]
"""

from __future__ import annotations

import gzip
import itertools
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO, NamedTuple

import torch
from torch import Tensor

from certfx.errors import InvalidValueError, ShapeError, SpecError
from certfx.specs import Conjunction, Property, UnsafeRegion, check_finite

__all__ = ["MAX_CASES", "parse_vnnlib", "read_counterexample", "read_vnnlib",
           "write_counterexample"]

MAX_CASES = 10_000
"""The most cases (conjunctions) that distributing ``and`` over ``or`` may produce."""

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_IS_NUM = re.compile(_NUM).fullmatch
_IS_VAR = re.compile(r"([XY])_(0|[1-9]\d*)").fullmatch
_OPERAND = rf"(?:[XY]_\d+|{_NUM})"
# One match per token after skipping whitespace and comments. `bound` and `decl` match whole
# statements of the two dominant forms (the fast path, no tree is built). The skip never
# backtracks: whatever follows it starts an `open`, `close`, `atom` or `end` match.
_TOKEN = re.compile(
    r"\s*(?:;[^\n]*\s*)*(?:"
    rf"(?P<bound>\(\s*assert\s+\(\s*(?P<op>[<>]=?)\s+(?P<lhs>{_OPERAND})\s+(?P<rhs>{_OPERAND})"
    r"\s*\)\s*\))"
    r"|(?P<decl>\(\s*declare-const\s+(?P<name>[^\s();]+)\s+(?P<sort>[^\s();]+)\s*\))"
    r"|(?P<open>\()|(?P<close>\))|(?P<atom>[^\s();]+)|(?P<end>\Z))")
_COMPARISONS = ("<=", ">=", "<", ">", "=")
_IGNORED = ("check-sat", "get-model", "exit", "set-logic", "set-info", "set-option")
_TERM_HINT = "terms are numbers, X_i, Y_j, (+ ...), (- ...), (* c ...) and (/ ... c)"


class _Atom(NamedTuple):
    text: str
    pos: int


class _List(NamedTuple):
    items: list[_Atom | _List]
    pos: int


_Expr = _Atom | _List
# A constraint of one case: ("x", input slot, is_upper, value, pos) for a bound on one input,
# ("y", {output index: coefficient}, bound, pos) for the row  sum_j c_j * Y_j <= bound.
_Constraint = tuple
_Case = tuple[_Constraint, ...]


def _add(*forms: dict[str, Fraction]) -> dict[str, Fraction]:
    """The sum of linear forms (variable name -> coefficient, ``""`` -> the constant)."""
    out: dict[str, Fraction] = {}
    for form in forms:
        for name, coef in form.items():
            out[name] = out.get(name, 0) + coef
    return out


def _scale(form: dict[str, Fraction], factor: Fraction) -> dict[str, Fraction]:
    return {name: coef * factor for name, coef in form.items()}


def _variables(form: dict[str, Fraction]) -> list[str]:
    """The variables with a non-zero coefficient in a linear form."""
    return [name for name, coef in form.items() if name and coef]


def _tighten(bounds: list, c: _Constraint) -> None:
    """Intersect ``[lower, upper, lower_at, upper_at]`` with the input bound ``c``."""
    _, _, upper, value, at = c
    if upper and value < bounds[1]:
        bounds[1], bounds[3] = value, at
    elif not upper and value > bounds[0]:
        bounds[0], bounds[2] = value, at


class _Reader:
    """The state of reading one file: declarations, global input box, output rows, choices."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        # Inputs are numbered by slot, their order of declaration, so that the lists below only
        # grow by appends; properties() permutes slots into X_ index order. Outputs by index.
        self.inputs: dict[str, int] = {}  # X_ name -> slot
        self.x_names: list[str] = []  # slot -> X_ name
        self.outputs: dict[str, int] = {}  # Y_ name -> index
        self.declared_at: dict[str, int] = {}
        # Per slot: [lower, upper, lower_at, upper_at], the bounds asserted outside any `or` and
        # the positions of the tokens that set them.
        self.box: list[list] = []
        self.rows: list[_Constraint] = []  # output rows asserted outside any `or`
        self.choices: list[tuple[list[_Case], int]] = []  # assertions with several cases

    def error(self, pos: int, message: str, hint: str) -> SpecError:
        """Build (not raise) a :class:`SpecError` at ``file:line:column`` of offset ``pos``, with
        the line; callers ``raise self.error(...)``, or keep it to raise later (an empty box
        that is an error only if every case of a disjunction is empty)."""
        text = self.text
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        snippet = text[start:end if end >= 0 else len(text)].strip()[:100]
        line = text.count("\n", 0, pos) + 1
        return SpecError(f"{self.source}:{line}:{pos - start + 1}: {message}; {hint}\n"
                         f"    {snippet}")

    def run(self) -> None:
        """Read every statement of the text."""
        inputs, box = self.inputs, self.box
        tokens = _TOKEN.finditer(self.text)
        for m in tokens:
            kind = m.lastgroup
            if kind == "bound":  # (assert (op a b)) with a, b variables or numbers
                op, a, b = m.group(2, 3, 4)  # op, lhs, rhs
                i = inputs.get(a)
                if i is not None and b[0] not in "XY":  # X_i op number
                    value, upper, at = float(b), op[0] == "<", m.start("rhs")
                elif (i := inputs.get(b)) is not None and a[0] not in "XY":  # number op X_i
                    value, upper, at = float(a), op[0] == ">", m.start("lhs")
                else:  # outputs, undeclared names, ...: the general reader decides
                    start = self.text.rfind("(", 0, m.start("op"))
                    self.assertion(_List([_Atom(op, m.start("op")), _Atom(a, m.start("lhs")),
                                          _Atom(b, m.start("rhs"))], start))
                    continue
                if value - value != 0.0:  # inf or nan: the literal is out of float range
                    raise self.error(at, "number out of range", "write a finite number")
                bounds = box[i]
                if upper:
                    if value < bounds[1]:
                        bounds[1], bounds[3] = value, at
                elif value > bounds[0]:
                    bounds[0], bounds[2] = value, at
            elif kind == "decl":
                self.declare(m.group("name"), m.group("sort"), m.start("name"), m.start("sort"))
            elif kind == "open":
                self.command(self.read_list(tokens, m.start("open")))
            elif kind == "end":
                break
            elif kind == "close":
                raise self.error(m.start(kind), "unbalanced ')'",
                                 "remove it or add the matching '('")
            else:
                raise self.error(m.start(kind), f"unexpected {m.group(kind)!r} outside "
                                 "parentheses", "write (declare-const ...) and (assert ...)")

    def read_list(self, tokens: Iterator[re.Match[str]], pos: int) -> _List:
        """The s-expression opened at ``pos``, read from the token iterator (no recursion)."""
        stack: list[list[_Expr]] = [[]]
        starts = [pos]
        for m in tokens:
            kind = m.lastgroup
            if kind == "atom":
                stack[-1].append(_Atom(m.group(kind), m.start(kind)))
            elif kind == "open":
                stack.append([])
                starts.append(m.start(kind))
            elif kind == "close":
                node = _List(stack.pop(), starts.pop())
                if not stack:
                    return node
                stack[-1].append(node)
            elif kind == "end":
                raise self.error(starts[-1], "unbalanced '(': it is never closed",
                                 "add the missing ')'")
            else:  # a whole (assert ...) or (declare-const ...) inside another expression
                raise self.error(m.start(kind), "a statement inside another expression",
                                 f"a ')' is probably missing before it (the expression starts "
                                 f"at line {self.text.count(chr(10), 0, pos) + 1})")
        raise AssertionError("unreachable: the token pattern ends with an `end` match")

    def head(self, node: _List) -> _Atom:
        if not node.items or not isinstance(node.items[0], _Atom):
            raise self.error(node.pos, "expected an operator after '('",
                             "write (op arguments ...)")
        return node.items[0]

    def command(self, node: _List) -> None:
        """One top-level statement read by the general reader."""
        head = self.head(node)
        args = node.items[1:]
        if head.text == "assert":
            if len(args) != 1:
                raise self.error(head.pos, "assert takes exactly one formula",
                                 "write (assert (and ...)) to assert several")
            self.assertion(args[0])
        elif head.text == "declare-const" and len(args) == 2 and all(
                isinstance(a, _Atom) for a in args):
            self.declare(args[0].text, args[1].text, args[0].pos, args[1].pos)
        elif head.text not in _IGNORED:
            raise self.error(head.pos, f"unknown or malformed command {head.text!r}",
                             "VNN-LIB files hold (declare-const X_i Real) and (assert ...)")

    def declare(self, name: str, sort: str, pos: int, sort_pos: int) -> None:
        var = _IS_VAR(name)
        if var is None:
            raise self.error(pos, f"cannot declare {name!r}", "VNN-LIB names inputs X_0, "
                             "X_1, ... and outputs Y_0, Y_1, ...")
        if sort != "Real":
            raise self.error(sort_pos, f"{name} has sort {sort!r}", "declare it as Real")
        if name in self.declared_at:
            raise self.error(pos, f"{name} is declared twice", "remove one declaration")
        self.declared_at[name] = pos
        if var.group(1) == "Y":
            self.outputs[name] = int(var.group(2))
            return
        self.inputs[name] = len(self.x_names)
        self.x_names.append(name)
        self.box.append([-math.inf, math.inf, -1, -1])

    def assertion(self, formula: _Expr) -> None:
        cases = self.cases(formula)
        if len(cases) > 1:
            self.choices.append((cases, formula.pos))
            return
        for c in cases[0]:
            if c[0] == "y":
                self.rows.append(c)
            else:
                _tighten(self.box[c[1]], c)

    def cases(self, node: _Expr) -> list[_Case]:
        """The formula in disjunctive normal form: a list of cases, each a conjunction."""
        if isinstance(node, _Atom):
            raise self.error(node.pos, f"expected a constraint, got {node.text!r}",
                             "write a comparison such as (<= X_0 1) or (and ...)/(or ...)")
        op, args = self.head(node), node.items[1:]
        if op.text in ("and", "or"):
            if not args:
                raise self.error(op.pos, f"({op.text}) without arguments",
                                 "give it at least one constraint")
            parts = [self.cases(a) for a in args]
            if op.text == "or":
                return [c for part in parts for c in part]
            # Single-case parts are joined once (no quadratic tuple copying for long `and`s).
            out: list[_Case] = [tuple(c for part in parts if len(part) == 1 for c in part[0])]
            for part in parts:
                if len(part) > 1:
                    out = self.product(out, part, op.pos)
            return out
        if op.text in _COMPARISONS:
            return [self.compare(op, args)]
        raise self.error(op.pos, f"unknown operator {op.text!r}",
                         "formulas use and, or, <=, >=, <, >, =")

    def product(self, left: list[_Case], right: list[_Case], pos: int) -> list[_Case]:
        """``left AND right`` distributed into cases, refusing an exponential blow-up."""
        if len(left) * len(right) > MAX_CASES:
            raise self.error(pos, f"distributing 'and' over 'or' gives {len(left) * len(right)}"
                             f" cases (more than {MAX_CASES})", "split the property into "
                             "several files or write it in disjunctive normal form")
        return [a + b for a in left for b in right]

    def compare(self, op: _Atom, args: list[_Expr]) -> _Case:
        """``(op t1 t2 ...)`` (chains compare neighbours) as constraints ``form <= 0``."""
        if len(args) < 2:
            raise self.error(op.pos, f"{op.text} needs at least two operands",
                             f"write ({op.text} X_0 1)")
        terms = [self.linear(a) for a in args]
        out = []
        for left, right in itertools.pairwise(terms):
            if op.text in ("<=", "<", "="):
                out.append(self.constraint(_add(left, _scale(right, Fraction(-1))), op.pos))
            if op.text in (">=", ">", "="):
                out.append(self.constraint(_add(right, _scale(left, Fraction(-1))), op.pos))
        return tuple(c for c in out if c is not None)

    def linear(self, node: _Expr) -> dict[str, Fraction]:
        """A term as a linear form, exactly (variable name -> coefficient, ``""`` -> constant)."""
        if isinstance(node, _Atom):
            if _IS_NUM(node.text):
                if math.isinf(float(node.text)):
                    raise self.error(node.pos, "number out of range", "write a finite number")
                return {"": Fraction(node.text)}
            if node.text in self.inputs or node.text in self.outputs:
                return {node.text: Fraction(1)}
            if _IS_VAR(node.text):
                raise self.error(node.pos, f"undeclared variable {node.text}",
                                 f"declare it first with (declare-const {node.text} Real)")
            raise self.error(node.pos, f"unknown symbol {node.text!r} where a term is expected",
                             _TERM_HINT)
        op = self.head(node)
        if op.text not in ("+", "-", "*", "/"):
            raise self.error(op.pos, f"unknown operator {op.text!r} in a term", _TERM_HINT)
        if len(node.items) < 2:
            raise self.error(op.pos, f"({op.text}) without arguments", _TERM_HINT)
        forms = [self.linear(a) for a in node.items[1:]]
        if op.text == "+":
            return _add(*forms)
        if op.text == "-":  # unary negation, or the first minus all others
            if len(forms) == 1:
                return _scale(forms[0], Fraction(-1))
            return _add(forms[0], *(_scale(f, Fraction(-1)) for f in forms[1:]))
        if op.text == "/":
            if len(forms) < 2:
                raise self.error(op.pos, "(/) needs a dividend and a divisor", _TERM_HINT)
            for f, arg in zip(forms[1:], node.items[2:]):
                if _variables(f):
                    raise self.error(arg.pos, "non-linear term: division by a variable",
                                     "divide only by constants")
                if not f.get("", 0):
                    raise self.error(arg.pos, "division by zero", "divide by a non-zero constant")
            return _scale(forms[0], math.prod((1 / f[""] for f in forms[1:]), start=Fraction(1)))
        factor, term = Fraction(1), None  # "*": at most one factor may hold variables
        for f, arg in zip(forms, node.items[1:]):
            if not _variables(f):
                factor *= f.get("", 0)
            elif term is None:
                term = f
            else:
                raise self.error(arg.pos, "non-linear term: a product of variables",
                                 "only constant coefficients such as (* 2.5 X_0) are supported")
        return {"": factor} if term is None else _scale(term, factor)

    def constraint(self, form: dict[str, Fraction], pos: int) -> _Constraint | None:
        """``form <= 0`` as an input bound or an output row; ``None`` when it always holds."""
        const = form.pop("", Fraction(0))
        coef = {name: form[name] for name in _variables(form)}
        xs = [name for name in coef if name in self.inputs]
        if xs and len(xs) < len(coef):
            raise self.error(pos, "a constraint that mixes inputs X_i and outputs Y_j",
                             "only bounds on inputs and linear constraints on outputs are "
                             "supported")
        if len(xs) > 1:
            raise self.error(pos, f"general linear input constraint over {', '.join(xs)} is "
                             "unsupported", "bound single inputs only, as in (<= X_0 0.5)")
        if xs:  # k * X + const <= 0
            k = coef[xs[0]]
            return ("x", self.inputs[xs[0]], k > 0, self.to_float(-const / k, pos), pos)
        if coef:
            return ("y", {self.outputs[n]: self.to_float(c, pos) for n, c in coef.items()},
                    self.to_float(-const, pos), pos)
        # A comparison of constants: true is dropped, false becomes the impossible row 0 <= -1.
        return None if const <= 0 else ("y", {}, -1.0, pos)

    def to_float(self, value: Fraction, pos: int) -> float:
        try:
            return float(value)  # correctly rounded
        except OverflowError:
            raise self.error(pos, "number out of range", "write a finite number") from None

    def properties(self, name: str, input_shape: Sequence[int] | None,
                   dtype: torch.dtype) -> list[Property]:
        """Check the declarations and bounds, expand the choices, and build the properties."""
        x_index = [int(n[2:]) for n in self.x_names]
        for indices, letter in ((x_index, "X"), (list(self.outputs.values()), "Y")):
            if not indices:
                raise SpecError(f"{self.source}: no {letter}_ variables are declared; declare "
                                f"them with (declare-const {letter}_0 Real) and so on")
            if max(indices) >= len(indices):  # the indices are unique: 0..n-1, or a gap
                top = f"{letter}_{max(indices)}"
                missing = min(set(range(len(indices))) - set(indices))
                raise self.error(self.declared_at[top], f"{top} is declared but "
                                 f"{letter}_{missing} is not", "declare every index from 0")
        for slot, bounds in enumerate(self.box):
            if bounds[0] > bounds[1]:
                raise self.empty(slot, bounds, "")
        cases: list[_Case] = [()]
        for choice, pos in self.choices:
            cases = self.product(cases, choice, pos)
        groups: dict[tuple, list[Conjunction]] = {}  # input box changes -> its output cases
        conflict = None
        for case in cases:
            box: dict[int, list] = {}  # the bounds that this case changes, per slot
            for c in case:
                if c[0] == "x":
                    _tighten(box.setdefault(c[1], list(self.box[c[1]])), c)
            empty = next((slot for slot, b in box.items() if b[0] > b[1]), None)
            if empty is not None:  # an impossible case (its input box is empty) is dropped
                conflict = conflict or self.empty(empty, box[empty], "every case is impossible; "
                                                  "e.g. ")
                continue
            key = tuple(sorted((slot, b[0], b[1]) for slot, b in box.items()
                               if b[:2] != self.box[slot][:2]))
            rows = self.rows + [c for c in case if c[0] == "y"]
            groups.setdefault(key, []).append(_conjunction(rows, len(self.outputs), dtype))
        if not groups:
            raise conflict
        n = len(self.box)
        shape = (n,) if input_shape is None else tuple(input_shape)
        if math.prod(shape) != n:
            raise ShapeError(f"{self.source}: {n} input variables do not fit input_shape "
                             f"{shape}; pass the network's input shape without the batch")
        order = torch.tensor(x_index).argsort()  # order[i]: the slot of X_i
        base = torch.tensor([v for b in self.box for v in b[:2]], dtype=torch.float64).view(n, 2)
        out = []
        for k, (key, terms) in enumerate(groups.items()):
            bounds = base.clone()
            for slot, low, high in key:
                bounds[slot, 0], bounds[slot, 1] = low, high
            bad = (~torch.isfinite(bounds)).nonzero()
            if len(bad):
                slot, side = bad[0].tolist()
                var = self.x_names[slot]
                raise self.error(self.declared_at[var], f"{var} has no {('lower', 'upper')[side]}"
                                 f" bound", f"add (assert ({('>=', '<=')[side]} {var} ...)); "
                                 "every input needs finite bounds")
            # index_select, not bounds[order]: advanced indexing is far slower here
            lower, upper = bounds.index_select(0, order).T.contiguous()
            out.append(Property(_narrow(lower, dtype, up=False).reshape(shape),
                                _narrow(upper, dtype, up=True).reshape(shape),
                                UnsafeRegion(tuple(terms)), f"{name}#{k}"))
        return out

    def empty(self, slot: int, bounds: list, prefix: str) -> SpecError:
        """Build (not raise) the error for an input whose lower bound exceeds its upper bound:
        kept by :meth:`properties` until it knows whether any case survives."""
        return self.error(max(bounds[2], bounds[3]), f"{prefix}{self.x_names[slot]} has lower "
                          f"bound {bounds[0]!r} > upper bound {bounds[1]!r}",
                          "fix the bounds; the input box is empty")


def _narrow(t: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``t`` (float64) in ``dtype``, rounded up or down so that boxes and unsafe regions only
    grow: verifying a slightly larger set stays sound."""
    out = t.to(dtype)
    if dtype == torch.float64:
        return out
    back = out.to(torch.float64)
    wrong = back < t if up else back > t
    if bool(wrong.any()):
        limit = torch.full_like(out, math.inf if up else -math.inf)
        out = torch.where(wrong, torch.nextafter(out, limit), out)
    return out


def _conjunction(rows: list[_Constraint], n_out: int, dtype: torch.dtype) -> Conjunction:
    """Output rows ``("y", {j: c_j}, bound, pos)`` as ``matrix @ y <= offset``."""
    matrix = torch.zeros(len(rows), n_out, dtype=torch.float64)
    offset = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    for k, (_, coef, _, _) in enumerate(rows):
        for j, c in coef.items():
            matrix[k, j] = c
    return Conjunction(matrix.to(dtype), _narrow(offset, dtype, up=True))


def parse_vnnlib(text: str, name: str = "<string>", input_shape: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float64, *, source: str | None = None
                 ) -> list[Property]:
    """Read VNN-LIB text (see the module docstring for the supported subset).

    The conjunction of all assertions is expanded into cases (``and`` distributed over ``or``,
    at most :data:`MAX_CASES`); cases whose input box is empty are dropped, and the others are
    grouped by input box. The SMT-LIB commands ``check-sat``, ``get-model``, ``exit``,
    ``set-logic``, ``set-info`` and ``set-option`` are ignored.

    Args:
        text: the file's content.
        name: properties are named ``f"{name}#{i}"``; also the file name in error messages.
        input_shape: the shape of one network input (no batch dim) for the boxes' ``lower`` and
            ``upper``; ``None`` keeps them flat, ``(number of X_i,)``.
        dtype: floating-point type of boxes and constraints; narrower than float64, the box is
            rounded outward and constraint offsets upward, so the sets only grow.
        source: the file name for error messages, when it differs from ``name``.

    Returns:
        One property per distinct input box (several when an ``or`` chooses between boxes); an
        input is a counterexample of the file when it is one of some property.

    Raises:
        SpecError: malformed text, unsupported constraints, an input without finite bounds or
            with lower > upper; the message gives ``file:line:column`` and what to do.
        ShapeError: ``input_shape`` does not hold the number of declared inputs.
    """
    if not dtype.is_floating_point:
        raise InvalidValueError(f"dtype must be a floating-point type, got {dtype}")
    reader = _Reader(text, source or name)
    try:
        reader.run()
    except RecursionError:
        raise SpecError(f"{source or name}: formulas nested too deeply to read; flatten "
                        "them") from None
    return reader.properties(name, input_shape, dtype)


def read_vnnlib(path: str | Path, input_shape: Sequence[int] | None = None,
                dtype: torch.dtype = torch.float64) -> list[Property]:
    """Read a ``.vnnlib`` file (gzip-compressed files too) into properties named
    ``f"{path.name}#{i}"``; see :func:`parse_vnnlib` for the arguments and errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # VNN-COMP ships many properties as .vnnlib.gz
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")  # a byte-order mark is dropped
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read VNN-LIB file {path}: {e}; check the path and that it is "
                        "a (possibly gzipped) text file") from e
    return parse_vnnlib(text, path.name, input_shape, dtype, source=str(path))


_CE_ENTRY = re.compile(rf"\(\s*([XY])_(\d+)\s+({_NUM})\s*\)")


def read_counterexample(path: str | Path) -> tuple[Tensor, Tensor]:
    """Read a VNN-COMP counterexample ``((X_0 v) ... (Y_0 v) ...)``.

    ``;`` comments and a leading ``sat`` line (the results-file form) are allowed.

    Returns:
        ``(x, y)``: float64 vectors of the flattened input and the output.

    Raises:
        SpecError: the file is missing, malformed, repeats or skips an index.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read counterexample {path}: {e}") from e
    body = re.sub(r";[^\n]*", " ", text)
    body = re.sub(r"^\s*sat\b", " ", body)
    entries = _CE_ENTRY.findall(body)
    if not entries or not re.fullmatch(r"\s*(?:\(\s*\)\s*)?", _CE_ENTRY.sub(" ", body)):
        raise SpecError(f"{path}: not a VNN-COMP counterexample; expected ((X_0 value) ... "
                        "(Y_0 value) ...)")
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for letter, index, value in entries:
        if int(index) in values[letter]:
            raise SpecError(f"{path}: {letter}_{index} appears twice; keep one value")
        values[letter][int(index)] = float(value)
    out = []
    for letter, got in values.items():
        missing = next((i for i in range(len(got)) if i not in got), None)
        if missing is not None or not got:
            raise SpecError(f"{path}: {letter}_{missing or 0} is missing; a counterexample gives "
                            "every input X_i and output Y_j")
        out.append(torch.tensor([got[i] for i in range(len(got))], dtype=torch.float64))
    return out[0], out[1]


def write_counterexample(target: str | Path | IO[str], x: Tensor, y: Tensor) -> None:
    """Write ``((X_0 v)\\n(X_1 v)\\n ... (Y_0 v) ...)`` for one input ``x`` and its output
    ``y`` (any shapes, flattened row-major), each value printed so that it reads back exactly.

    A VNN-COMP results file is ``sat`` on the first line followed by this text: write ``"sat\\n"``
    to the stream first. Nothing is written when a value is not finite.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> write_counterexample(out, torch.tensor([0.5, -1.0]), torch.tensor([[2.0]]))
        >>> print(out.getvalue(), end="")
        ((X_0 0.5)
        (X_1 -1.0)
        (Y_0 2.0))
    """
    xs, ys = (torch.as_tensor(t).detach().flatten().to("cpu", torch.float64) for t in (x, y))
    check_finite(xs, "counterexample input")
    check_finite(ys, "counterexample output")
    lines = [f"(X_{i} {v!r})" for i, v in enumerate(xs.tolist())]
    lines += [f"(Y_{j} {v!r})" for j, v in enumerate(ys.tolist())]
    text = "(" + "\n".join(lines) + ")\n"
    if hasattr(target, "write"):
        target.write(text)
    else:
        Path(target).write_text(text)
