"""The VNN-LIB reader: hand-written cases for every construct and error, agreement of the unsafe
region with a direct evaluation, counterexample I/O, and every VNN-COMP file in ``shared/``."""

from __future__ import annotations

import csv
import doctest
import functools
import gzip
import io
import math
from pathlib import Path

import pytest
import torch

from certfx.errors import ShapeError, SpecError
from certfx.frontends import vnnlib
from certfx.frontends.vnnlib import (parse_vnnlib, read_counterexample, read_vnnlib,
                                     write_counterexample)

ROOT = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp"


def _decls(n_in: int, n_out: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(n_out))


def _box(n_in: int, lo: float = -1.0, hi: float = 1.0) -> str:
    return "".join(f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))\n" for i in range(n_in))


def _rows(region) -> list[tuple[list[list[float]], list[float]]]:
    return [(t.matrix.tolist(), t.offset.tolist()) for t in region.terms]


def test_module_docstring_examples() -> None:
    result = doctest.testmod(vnnlib, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ---- constructs -----------------------------------------------------------------------------

def test_bounds_numbers_comments_and_declaration_order() -> None:
    text = """; a comment with (parentheses) and (assert (<= X_0 -100))
    (declare-const Y_0 Real) (declare-const X_2 Real)  ; declared out of order
    (declare-const X_0 Real)
    (declare-const X_1 Real)
    (assert (>= X_0 -0.5)) (assert (< X_0 1e-3))      ; < and > read as <= and >=
    (assert (<= 2 X_1)) (assert (> 3.25E+1 X_1))       ; number op variable
    (assert ( <= X_2 .5 ))(assert(>= X_2 -1))
    (assert (<= X_2 7))                                ; looser bound: ignored
    (assert (<= Y_0 -1))"""
    (prop,) = parse_vnnlib(text)
    assert prop.name == "<string>#0"
    assert prop.lower.dtype == torch.float64
    assert prop.lower.tolist() == [-0.5, 2.0, -1.0]
    assert prop.upper.tolist() == [1e-3, 32.5, 0.5]
    assert _rows(prop.unsafe) == [([[1.0]], [-1.0])]


def test_linear_terms() -> None:
    text = _decls(2, 3) + """
    (assert (<= (* 2 X_0) 1)) (assert (>= (* X_0 -4) -8))   ; X_0 <= 0.5, X_0 <= 2
    (assert (>= (- X_0) 1))                                  ; X_0 <= -1 ... wins
    (assert (>= (+ X_0 3) 0))                                ; X_0 >= -3
    (assert (<= 0 X_1 (/ 1 4)))                              ; chain: 0 <= X_1 <= 0.25
    (assert (<= (+ Y_0 (* 2 Y_1) (- 3)) (- Y_2 0.5)))        ; y0 + 2 y1 - y2 <= 2.5
    (assert (>= (- Y_0 Y_1 Y_2) (/ Y_2 -2)))                 ; -y0 + y1 + 0.5 y2 <= 0
    (assert (= Y_1 (+ (* 0 Y_0) 1.5)))                       ; = gives two rows"""
    (prop,) = parse_vnnlib(text)
    assert prop.lower.tolist() == [-3.0, 0.0] and prop.upper.tolist() == [-1.0, 0.25]
    (term,) = prop.unsafe.terms
    assert term.matrix.tolist() == [[1, 2, -1], [-1, 1, 0.5], [0, 1, 0], [0, -1, 0]]
    assert term.offset.tolist() == [2.5, 0, 1.5, -1.5]


def test_constant_comparisons() -> None:
    always = parse_vnnlib(_decls(1, 1) + _box(1) + "(assert (<= 1 2)) (assert (<= Y_0 0))")
    assert _rows(always[0].unsafe) == [([[1.0]], [0.0])]
    never = parse_vnnlib(_decls(1, 1) + _box(1) + "(assert (> 1 2))")
    assert not never[0].unsafe.contains(torch.randn(50, 1) * 100).any()


def test_without_output_constraints_every_output_is_unsafe() -> None:
    (prop,) = parse_vnnlib(_decls(1, 2) + _box(1))
    assert prop.unsafe.contains(torch.randn(5, 2)).all()


def test_single_disjunct_or_with_inputs() -> None:  # the test_small/test_tiny form
    text = _decls(1, 1) + "(assert (or\n (and (>= X_0 -1) (<= X_0 1) (>= Y_0 100))\n))"
    (prop,) = parse_vnnlib(text)
    assert prop.lower.tolist() == [-1.0] and prop.upper.tolist() == [1.0]
    assert _rows(prop.unsafe) == [([[-1.0]], [-100.0])]


def test_input_disjunction_times_output_disjunction() -> None:  # the ACAS Xu property 6 form
    text = _decls(2, 3) + """(assert (>= X_1 0)) (assert (<= X_1 1))
    (assert (or (and (<= X_0 0.7) (>= X_0 -0.1))
                (and (<= X_0 -0.2) (>= X_0 -0.5))))
    (assert (or (and (<= Y_1 Y_0)) (and (<= Y_2 Y_0))))"""
    props = parse_vnnlib(text, name="p6")
    assert [p.name for p in props] == ["p6#0", "p6#1"]
    assert [p.lower.tolist() for p in props] == [[-0.1, 0.0], [-0.5, 0.0]]
    assert [p.upper.tolist() for p in props] == [[0.7, 1.0], [-0.2, 1.0]]
    for p in props:
        assert _rows(p.unsafe) == [([[-1, 1, 0]], [0]), ([[-1, 0, 1]], [0])]


def test_disjuncts_mixing_inputs_and_outputs() -> None:
    text = _decls(1, 2) + """(assert (or
        (and (>= X_0 0) (<= X_0 1) (<= Y_0 Y_1))
        (and (>= X_0 2) (<= X_0 3) (<= Y_1 Y_0))
        (and (<= X_0 1) (>= X_0 0) (<= Y_0 -5))))
    (assert (<= Y_1 10))"""
    props = parse_vnnlib(text)
    assert [(p.lower.item(), p.upper.item()) for p in props] == [(0, 1), (2, 3)]
    # cases with the same box share one property; the global output row joins every case
    assert _rows(props[0].unsafe) == [([[0, 1], [1, -1]], [10, 0]), ([[0, 1], [1, 0]], [10, -5])]
    assert _rows(props[1].unsafe) == [([[0, 1], [-1, 1]], [10, 0])]


def test_and_distributes_over_nested_or_and_drops_impossible_cases() -> None:
    text = _decls(1, 2) + _box(1) + """(assert (and
        (or (<= X_0 -0.5) (>= X_0 0.5) (>= X_0 2))
        (or (<= Y_0 0) (and (<= Y_1 0) (>= Y_1 -1)))))"""
    props = parse_vnnlib(text)
    assert [(p.lower.item(), p.upper.item()) for p in props] == [(-1, -0.5), (0.5, 1)]
    for p in props:
        assert _rows(p.unsafe) == [([[1, 0]], [0]), ([[0, 1], [0, -1]], [0, 1])]


def test_case_expansion_is_bounded() -> None:
    ors = " ".join(f"(or (<= Y_0 {k}) (<= Y_1 {k}))" for k in range(14))  # 2**14 cases
    with pytest.raises(SpecError, match=r"<string>:\d+:\d+: distributing 'and' over 'or'"):
        parse_vnnlib(_decls(1, 2) + _box(1) + f"(assert (and {ors}))")
    separate = "".join(f"(assert (or (<= Y_0 {k}) (<= Y_1 {k})))\n" for k in range(14))
    with pytest.raises(SpecError, match="more than 10000"):
        parse_vnnlib(_decls(1, 2) + _box(1) + separate)


def test_input_shape_dtype_and_outward_rounding() -> None:
    text = _decls(6, 1) + _box(6, 0.1, 0.7) + "(assert (<= Y_0 0.1))"
    (prop,) = parse_vnnlib(text, input_shape=(1, 2, 3), dtype=torch.float32)
    assert prop.lower.shape == (1, 2, 3) and prop.lower.dtype == torch.float32
    assert (prop.lower.double() <= 0.1).all() and (prop.upper.double() >= 0.7).all()
    assert prop.unsafe.terms[0].offset.double().item() >= 0.1
    with pytest.raises(ShapeError, match="6 input variables"):
        parse_vnnlib(text, input_shape=(2, 2))


def test_read_file_gzip_and_names(tmp_path: Path) -> None:
    text = _decls(1, 1) + _box(1) + "(assert (<= Y_0 0))"
    (tmp_path / "prop.vnnlib").write_text(text)
    (tmp_path / "prop.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    assert read_vnnlib(tmp_path / "prop.vnnlib")[0].name == "prop.vnnlib#0"
    assert read_vnnlib(str(tmp_path / "prop.vnnlib.gz"))[0].upper.tolist() == [1.0]
    (tmp_path / "bad.vnnlib").write_text(text + "\n(assert (<= Y_0 Z))")
    with pytest.raises(SpecError, match=r"bad\.vnnlib:6:17: unknown symbol 'Z'"):
        read_vnnlib(tmp_path / "bad.vnnlib")
    with pytest.raises(SpecError, match="cannot read"):
        read_vnnlib(tmp_path / "missing.vnnlib")


# ---- errors ---------------------------------------------------------------------------------

BASE = _decls(2, 2) + _box(2)  # 8 lines; the cases below start on line 9
ERRORS = [
    ("(assert (<= Y_0 1)", "9:1: unbalanced '(': it is never closed"),
    ("(assert (<= Y_0 1)))", "9:20: unbalanced ')'"),
    ("(assert (or (foo Y_0 1)))", "9:14: unknown operator 'foo'"),
    ("(assert (<= (sin Y_0) 1))", "9:14: unknown operator 'sin' in a term"),
    ("(assert (<= X_7 1))", "9:13: undeclared variable X_7"),
    ("\n  (assert (<= Y_2 Y_0))", "10:15: undeclared variable Y_2"),
    ("(assert (<= (* Y_0 Y_1) 1))", "9:20: non-linear term: a product of variables"),
    ("(assert (<= (/ 1 Y_1) 1))", "9:18: non-linear term: division by a variable"),
    ("(assert (<= X_0 -5))", "9:17: X_0 has lower bound -1.0 > upper bound -5.0"),
    ("(assert (<= (+ X_0 X_1) 1))", "9:10: general linear input constraint over X_0, X_1"),
    ("(assert (<= X_0 Y_0))", "9:10: a constraint that mixes inputs X_i and outputs Y_j"),
    ("(assert (<= Y_0 1e999))", "9:17: number out of range"),
    ("(assert (<= X_1 -1e999))", "9:17: number out of range"),
    ("(assert (<= Y_0 1) (<= Y_1 1))", "9:2: assert takes exactly one formula"),
    ("(assert (<= Y_0))", "9:10: <= needs at least two operands"),
    ("(assert Y_0)", "9:9: expected a constraint, got 'Y_0'"),
    ("(assert (and))", "9:10: (and) without arguments"),
    ("(assert (<= Y_0 1)\n(assert (<= Y_1 1))", "10:1: a statement inside another expression"),
    ("X_0", "9:1: unexpected 'X_0' outside parentheses"),
    ("(push 1)", "9:2: unknown or malformed command 'push'"),
    ("(declare-const X_0 Real)", "9:16: X_0 is declared twice"),
    ("(declare-const X_5 Real)", "9:16: X_5 is declared but X_2 is not"),
    ("(declare-const Z Real)", "9:16: cannot declare 'Z'"),
    ("(declare-const X_2 Int)", "9:20: X_2 has sort 'Int'"),
    ("(declare-const X_2 Real)", "9:16: X_2 has no lower bound"),
    ("(declare-const X_2 Real) (assert (>= X_2 0))", "9:16: X_2 has no upper bound"),
    ("(assert (or (and (>= X_0 2)) (and (<= X_0 -2))))", "9:19: every case is impossible"),
]


@pytest.mark.parametrize("tail, message", ERRORS, ids=[m.split(": ")[1][:40] for _, m in ERRORS])
def test_errors_name_line_column_and_hint(tail: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_vnnlib(BASE + tail, name="spec")
    assert str(info.value).startswith(f"spec:{message}")
    assert "; " in str(info.value).split("\n")[0]  # a hint follows the message


def test_deep_nesting_and_byte_order_mark(tmp_path: Path) -> None:
    deep = "(+ " * 5000 + "Y_0" + ")" * 5000
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_vnnlib(BASE + f"(assert (<= {deep} 1))")
    (tmp_path / "bom.vnnlib").write_text("\ufeff" + BASE + "(check-sat)", encoding="utf-8")
    assert read_vnnlib(tmp_path / "bom.vnnlib")[0].upper.tolist() == [1.0, 1.0]


def test_declarations_of_both_kinds_are_required() -> None:
    with pytest.raises(SpecError, match="no Y_ variables"):
        parse_vnnlib(_decls(1, 0) + _box(1))
    with pytest.raises(SpecError, match="no X_ variables"):
        parse_vnnlib(_decls(0, 1))


# ---- semantics: the unsafe region against a direct evaluation --------------------------------

def test_robustness_property_agrees_with_direct_evaluation() -> None:
    label, k = 3, 10
    text = _decls(4, k) + _box(4, 0.0, 0.5) + "(assert (or\n" + "".join(
        f"  (and (>= Y_{j} Y_{label}))\n" for j in range(k) if j != label) + "))"
    (prop,) = parse_vnnlib(text)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2000, k, generator=gen, dtype=torch.float64)
    y[:200, label] = y[:200].max(1).values  # many ties with the largest other logit
    y[:100, label] += 1e-9
    want = (y[:, [j for j in range(k) if j != label]] >= y[:, label:label + 1]).any(1)
    assert torch.equal(prop.unsafe.contains(y), want)
    assert 0 < int(want.sum()) < len(y)
    x = torch.rand(2000, 4, generator=gen, dtype=torch.float64)
    inside = (x <= 0.5).all(1)
    assert torch.equal(prop.is_counterexample(x, y), inside & want)


def test_targeted_conjunction_agrees_with_direct_evaluation() -> None:  # marabou-cifar10 form
    target, k = 1, 5
    text = _decls(1, k) + _box(1) + "".join(
        f"(assert (>= Y_{target} Y_{j}))\n" for j in range(k) if j != target)
    (prop,) = parse_vnnlib(text)
    y = torch.randn(3000, k, generator=torch.Generator().manual_seed(1))
    y[::7, target] += 2.0
    want = (y[:, target:target + 1] >= y).all(1)
    assert torch.equal(prop.unsafe.contains(y), want) and want.any()


# ---- counterexamples ------------------------------------------------------------------------

def test_counterexample_round_trip(tmp_path: Path) -> None:
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(2))  # float32, any shape
    y = torch.tensor([1e-30, -0.0, 12345.678, -2.5e20], dtype=torch.float64)
    write_counterexample(tmp_path / "ce", x, y)
    text = (tmp_path / "ce").read_text()
    assert text.startswith("((X_0 ") and text.endswith(")\n") and text.count("\n") == 10
    got_x, got_y = read_counterexample(tmp_path / "ce")
    assert torch.equal(got_x, x.flatten().double()) and torch.equal(got_y, y)
    stream = io.StringIO()
    stream.write("sat\n")  # the VNN-COMP results-file form
    write_counterexample(stream, torch.tensor([0.5]), torch.tensor([-1.0]))
    assert stream.getvalue() == "sat\n((X_0 0.5)\n(Y_0 -1.0))\n"
    (tmp_path / "res").write_text("; comment\n" + stream.getvalue())
    assert [t.tolist() for t in read_counterexample(tmp_path / "res")] == [[0.5], [-1.0]]


@pytest.mark.parametrize("text, message", [
    ("unsat\n", "not a VNN-COMP counterexample"),
    ("((X_0 1) (Y_0 2) junk)", "not a VNN-COMP counterexample"),
    ("((X_0 1) (X_0 2) (Y_0 2))", "X_0 appears twice"),
    ("((X_1 1) (Y_0 2))", "X_0 is missing"),
    ("((X_0 1))", "Y_0 is missing"),
])
def test_malformed_counterexamples(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "ce").write_text(text)
    with pytest.raises(SpecError, match=message):
        read_counterexample(tmp_path / "ce")


def test_write_counterexample_refuses_non_finite_values() -> None:
    stream = io.StringIO()
    with pytest.raises(Exception, match="NaN"):
        write_counterexample(stream, torch.tensor([float("nan")]), torch.tensor([0.0]))
    assert stream.getvalue() == ""


# ---- every VNN-COMP file in shared/ ---------------------------------------------------------

def _table(name: str) -> list[dict[str, str]]:
    with open(ROOT / name, newline="") as f:
        return list(csv.DictReader(f))


BENCHMARKS = sorted({p.parent.relative_to(ROOT).parts[:2] for p in ROOT.rglob("*.vnnlib")}
                    ) if ROOT.is_dir() else []
needs_shared = pytest.mark.skipif(not BENCHMARKS, reason=f"no VNN-COMP files under {ROOT}")


@functools.cache
def _properties(path: Path) -> list:
    return read_vnnlib(path)


@functools.cache
def _onnx_sizes(path: Path) -> tuple[int, int]:
    """The element counts of a model's input and output (symbolic batch dims count as 1)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {w.name for w in graph.initializer}
    inp = next(i for i in graph.input if i.name not in weights)
    return tuple(math.prod(max(d.dim_value, 1) for d in v.type.tensor_type.shape.dim)
                 for v in (inp, graph.output[0]))


@needs_shared
@pytest.mark.parametrize("bench", ["/".join(b) for b in BENCHMARKS])
def test_shared_vnnlib_files_parse_and_fit_their_models(bench: str) -> None:
    files = sorted((ROOT / bench).rglob("*.vnnlib"))
    for path in files:
        for prop in _properties(path):
            assert prop.lower.shape == prop.upper.shape and (prop.lower <= prop.upper).all()
    instances = {(r["onnx"], r["vnnlib"]) for r in _table("ground_truth.csv")
                 if r["benchmark"] == bench}
    assert instances
    for onnx_path, vnnlib_path in sorted(instances):
        n_in, n_out = _onnx_sizes(ROOT / onnx_path)
        for prop in _properties(ROOT / vnnlib_path):
            assert prop.lower.numel() == n_in, (onnx_path, vnnlib_path)
            assert prop.unsafe.num_outputs == n_out, (onnx_path, vnnlib_path)


@needs_shared
@pytest.mark.parametrize("bench", ["/".join(b) for b in BENCHMARKS])
def test_shared_counterexamples_are_counterexamples(bench: str) -> None:
    rows = [r for r in _table("ground_truth_detail.csv")
            if r["benchmark"] == bench and r["counterexample"]]
    for row in rows:
        x, y = read_counterexample(ROOT / row["counterexample"])
        props = _properties(ROOT / row["vnnlib"])
        assert any(bool(p.is_counterexample(x[None], y[None], tolerance=1e-4))
                   for p in props), row["counterexample"]


@needs_shared
def test_every_shared_counterexample_belongs_to_a_checked_benchmark() -> None:
    rows = [r for r in _table("ground_truth_detail.csv") if r["counterexample"]]
    assert rows and {r["benchmark"] for r in rows} <= {"/".join(b) for b in BENCHMARKS}
