"""The verification cascade and ``certfx verify``: answers checked against exhaustive search on
tiny networks, re-checked counterexamples, the VNN-COMP result format, bad inputs, and the
shared VNN-COMP ``test`` benchmark."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import certfx
from certfx import cli
from certfx.frontends.vnnlib import read_counterexample, read_vnnlib
from certfx.specs import Conjunction, Property, UnsafeRegion
from certfx.verify import CascadeOptions, Verdict, Verifier, combined_verdict

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp"
DEMO = ROOT / "examples" / "models"


def _net(seed: int, widths: tuple[int, ...] = (2, 6, 6, 2)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _grid_min(net: nn.Module, lo: torch.Tensor, hi: torch.Tensor, row: torch.Tensor,
              steps: int = 201) -> float:
    """``min row·net(x)`` over a dense grid of the 2-d box (an upper bound on the true min)."""
    axes = [torch.linspace(float(lo[i]), float(hi[i]), steps, dtype=torch.float64)
            for i in range(2)]
    grid = torch.cartesian_prod(*axes)
    with torch.no_grad():
        return float((net(grid) @ row).min())


@pytest.mark.parametrize("seed", range(6))
def test_answers_agree_with_dense_search(seed: int) -> None:
    """Verified only where no grid point is unsafe; falsified only with a real counterexample;
    on these tiny networks the cascade always decides."""
    net = _net(seed)
    verifier = Verifier(net, example_input=torch.zeros(1, 2, dtype=torch.float64),
                        options=CascadeOptions(timeout=20))
    centre = torch.rand(2, dtype=torch.float64)
    label = int(net(centre[None]).argmax())
    for radius in (0.01, 0.1, 0.5):
        prop = Property(centre - radius, centre + radius,
                        UnsafeRegion.misclassified(label, 2), f"r{radius}")
        result = verifier.verify(prop)
        row = prop.unsafe.terms[0].matrix[0]  # y_label − y_other
        worst = _grid_min(net, prop.lower, prop.upper, row)
        assert result.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED), result
        if result.verdict is Verdict.VERIFIED:
            assert worst > 0, (radius, worst)
        else:
            x = result.counterexample.reshape(1, 2)
            assert bool(prop.is_counterexample(x, net(x)))
            assert result.output is not None


def test_conjunctive_and_disjunctive_regions() -> None:
    """A term is empty when one of its rows is; the property needs every term empty."""
    net = nn.Sequential(nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2, dtype=torch.float64))
        net[0].bias.zero_()
    verifier = Verifier(net, example_input=torch.zeros(1, 2, dtype=torch.float64))
    lo, hi = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    # y0 >= 2 (impossible) or (y0 <= 0.5 and y1 <= 0.5) (possible)
    impossible = Conjunction(-eye[:1], torch.tensor([-2.0], dtype=torch.float64))
    possible = Conjunction(eye, torch.tensor([0.5, 0.5], dtype=torch.float64))
    both_rows = Conjunction(torch.stack([-eye[0], eye[0]]),  # y0 >= 0.9 and y0 <= 0.1
                            torch.tensor([-0.9, 0.1], dtype=torch.float64))
    cases = {(impossible,): Verdict.VERIFIED, (impossible, possible): Verdict.FALSIFIED,
             (both_rows,): Verdict.UNKNOWN}
    for terms, expected in cases.items():
        methods = ("attack", "box") if expected is Verdict.UNKNOWN else CascadeOptions().methods
        verifier.options = CascadeOptions(methods=methods, retry_attack=None)
        result = verifier.verify(Property(lo, hi, UnsafeRegion(terms)))
        assert result.verdict is expected, (terms, result)


def test_input_splitting_proves_what_single_bounds_cannot() -> None:
    """|x| <= 1 on [−1, 1]: box alone gives 2; splitting proves y < 1.5."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[2].bias.zero_()
    region = UnsafeRegion((Conjunction(torch.tensor([[-1.0]]), torch.tensor([-1.5])),))
    prop = Property(torch.tensor([-1.0]), torch.tensor([1.0]), region)
    alone = Verifier(net, torch.zeros(1, 1), CascadeOptions(methods=("box",)))
    assert alone.verify(prop).verdict is Verdict.UNKNOWN
    split = Verifier(net, torch.zeros(1, 1), CascadeOptions(methods=("split",),
                                                            split_domain="box"))
    result = split.verify(prop)
    assert result.verdict is Verdict.VERIFIED and result.stage == "split"


def _split_boxes(net: nn.Module, threshold: float) -> tuple[str, int]:
    """Input splitting with box bounds of ``y < threshold`` over ``[−1, 1]²``."""
    from certfx.verify.split import split_verify
    cm = certfx.compile(net, domain="box", example_input=torch.zeros(1, 2))
    region = UnsafeRegion((Conjunction(torch.tensor([[-1.0]]), torch.tensor([-threshold])),))
    out = split_verify(lambda lo, hi, spec: cm.bounds(lo, hi, spec).lower, net,
                       -torch.ones(1, 2), torch.ones(1, 2), region, [0], tolerance=1e-6,
                       deadline=time.perf_counter() + 30, max_boxes=2_000)
    return out.status, out.boxes


def _abs_of_second_input(dead_zone: float) -> nn.Module:
    """``relu(x₁ − z) + relu(−x₁ − z)``: ``x₀`` is ignored; zero gradient for ``|x₁| < z``."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
        net[0].bias.fill_(-dead_zone)
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[2].bias.zero_()
    return net


def test_input_splitting_bisects_the_coordinate_that_matters_when_the_centre_is_dead() -> None:
    """At the centre both ReLUs are inactive, so its gradient is zero; the smear averaged over
    random points in the box still finds ``x₁``: one bisection at ``x₁ = 0`` proves
    ``y ≤ 0.8 < 0.9`` (3 boxes). Bisecting ``x₀``, which the centre's gradient cannot rule out,
    never ends."""
    assert _split_boxes(_abs_of_second_input(0.2), 0.9) == ("verified", 3)


def test_input_splitting_falls_back_to_relative_width_where_every_gradient_is_zero() -> None:
    """``relu(x₁) − relu(x₁) = 0`` has zero gradient everywhere but box bounds ``±width(x₁)``;
    only bisecting ``x₁`` helps, and the relative-width fallback gets to it."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[2].bias.zero_()
    status, boxes = _split_boxes(net, 0.3)
    assert status == "verified" and boxes < 100, (status, boxes)


def test_milp_shares_the_time_with_split_only_where_it_encodes_the_network_exactly() -> None:
    """With sigmoid the MILP relaxes it (no tighter than the branches' bounds): ``split`` then
    gets all the time left instead of ``split_share``."""
    x = torch.zeros(1, 2)
    relu = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    sigmoid = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 2))
    assert Verifier(relu, x).milp_exact and not Verifier(sigmoid, x).milp_exact


def test_float64_results_name_their_precision_and_timeouts_are_reported() -> None:
    net = _net(0, (2, 30, 30, 30, 2))
    options = CascadeOptions(dtype=torch.float64, timeout=1e-6)
    verifier = Verifier(net.float(), torch.zeros(1, 2), options)
    prop = Property(torch.zeros(2), torch.ones(2), UnsafeRegion.misclassified(0, 2))
    result = verifier.verify(prop)
    assert result.verdict is Verdict.TIMEOUT and result.dtype == "float64"
    assert result.tolerance == pytest.approx(1e-9)


def test_combined_verdict_of_a_files_properties() -> None:
    def r(v: Verdict) -> object:
        return type("R", (), {"verdict": v})()

    assert combined_verdict([r(Verdict.VERIFIED), r(Verdict.FALSIFIED)]) is Verdict.FALSIFIED
    assert combined_verdict([r(Verdict.VERIFIED)] * 2) is Verdict.VERIFIED
    assert combined_verdict([r(Verdict.VERIFIED), r(Verdict.TIMEOUT)]) is Verdict.TIMEOUT
    assert combined_verdict([r(Verdict.UNKNOWN), r(Verdict.VERIFIED)]) is Verdict.UNKNOWN


# ---- the command ------------------------------------------------------------------------------

def _run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_dataset_robustness_writes_json(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.json"
    status, text, _ = _run(["verify", DEMO / "demo_cnn.onnx", "--eps", "0.02", "--data",
                            DEMO / "demo_data.csv", "--limit", "3", "--timeout", "20",
                            "--json", out], capsys)
    assert status == 0 and "3 properties" in text
    records = json.loads(out.read_text())["properties"]
    assert len(records) == 3
    assert all(r["verdict"] in ("verified", "falsified", "unknown", "timeout") for r in records)
    assert all(r["dtype"] == "float32" for r in records)


VNNLIB = """; a tiny property: output 0 must stay below output 1
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 0.0))
(assert (<= X_0 1.0))
(assert (>= X_1 0.0))
(assert (<= X_1 1.0))
(assert (>= Y_0 Y_1))
"""


def _onnx_identity(path: Path, shift: float) -> None:
    """y = (x0 + shift, x1 + 1): y0 >= y1 happens only when shift > 0."""
    net = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.copy_(torch.tensor([shift, 1.0]))
    torch.onnx.export(net, (torch.zeros(1, 2),), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})


@pytest.mark.parametrize("shift, answer", [(0.5, "sat"), (-0.5, "unsat")])
def test_cli_vnncomp_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  shift: float, answer: str) -> None:
    model, spec, results = tmp_path / "net.onnx", tmp_path / "p.vnnlib", tmp_path / "res.txt"
    _onnx_identity(model, shift)
    spec.write_text(VNNLIB)
    status, _, err = _run(["verify", model, spec, "--timeout", "10", "--results", results],
                          capsys)
    assert status == 0, err
    text = results.read_text()
    assert text.splitlines()[0] == answer
    if answer == "sat":
        body = tmp_path / "cex.txt"
        body.write_text(text.split("\n", 1)[1])
        x, y = read_counterexample(body)
        prop = read_vnnlib(spec)[0]
        assert bool(prop.is_counterexample(x[None], y[None]))


def test_cli_bad_inputs_write_nothing(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, results = tmp_path / "net.onnx", tmp_path / "res.txt"
    _onnx_identity(model, 0.5)
    bad = tmp_path / "bad.vnnlib"
    bad.write_text(VNNLIB.replace("(assert (>= Y_0 Y_1))", "(assert (>= Y_0 Y_1)"))
    three = tmp_path / "three.vnnlib"
    three.write_text(VNNLIB.replace("(declare-const X_1 Real)",
                                    "(declare-const X_1 Real)\n(declare-const X_2 Real)\n"
                                    "(assert (>= X_2 0.0))\n(assert (<= X_2 1.0))"))
    spec = tmp_path / "p.vnnlib"
    spec.write_text(VNNLIB)
    for argv, fragment in (
            ([model, bad], "bad.vnnlib:"),
            ([model, three], "input"),
            ([model, spec, "--timeout", "0"], "timeout"),
            ([model, spec, "--methods", "box,nonsense"], "nonsense"),
            ([model, "--eps", "-0.1", "--data", DEMO / "demo_data.csv"], "eps"),
            ([model, spec, "--eps", "0.1"], "either"),
            ([DEMO / "demo_cnn.onnx", spec], "input")):
        status, _, err = _run(["verify", *argv, "--results", results], capsys)
        assert status == 2, (argv, err)
        assert fragment in err and len(err.strip().splitlines()) == 1, err
        assert not results.exists()


# ---- VNN-COMP instances nobody here wrote -----------------------------------------------------

@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks/vnncomp is not present")
def test_vnncomp_test_benchmark_answers() -> None:
    """Every instance of vnncomp2021/test gets its known answer."""
    rows = [r for r in csv.DictReader((SHARED / "ground_truth.csv").open())
            if r["benchmark"] == "vnncomp2021/test"]
    assert rows
    for row in rows:
        verifier = Verifier(SHARED / row["onnx"], options=CascadeOptions(timeout=30))
        props = read_vnnlib(SHARED / row["vnnlib"], input_shape=verifier.input_shape)
        verdict = combined_verdict(verifier.verify_all(props))
        expected = {"sat": Verdict.FALSIFIED, "unsat": Verdict.VERIFIED}[row["expected"]]
        assert verdict is expected, row




def test_tolerance_decides_what_counts_as_proven() -> None:
    """A bound must exceed the tolerance: with one larger than any margin nothing is proven."""
    net = nn.Sequential(nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2, dtype=torch.float64))
        net[0].bias.zero_()
    x = torch.tensor([0.8, 0.2], dtype=torch.float64)
    prop = Property(x - 0.05, x + 0.05, UnsafeRegion.misclassified(0, 2))  # margin >= 0.5
    for tolerance, expected in ((1e-9, Verdict.VERIFIED), (10.0, Verdict.UNKNOWN)):
        options = CascadeOptions(methods=("box", "crown"), dtype=torch.float64,
                                 tolerance=tolerance)
        result = Verifier(net, x[None], options).verify(prop)
        assert result.verdict is expected and result.tolerance == tolerance


def test_cli_mean_std_puts_the_normalization_in_front(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """y = x + (0.5, 1) reaches y0 >= y1 on [0, 1]² (sat); y = x/4 + (0.5, 1) cannot (unsat)."""
    model, results, spec = tmp_path / "net.onnx", tmp_path / "res.txt", tmp_path / "p.vnnlib"
    _onnx_identity(model, 0.5)
    spec.write_text(VNNLIB)
    status, _, err = _run(["verify", model, spec, "--timeout", "10", "--results", results,
                           "--mean", "0", "--std", "4"], capsys)
    assert status == 0, err
    assert results.read_text().strip() == "unsat"
    for extra, fragment in ((["--mean", "0"], "go together"),
                            (["--mean", "0,0,0", "--std", "1,1,1"], "channel"),
                            (["--mean", "a", "--std", "1"], "--mean"),
                            (["--mean", "0", "--std", "0"], "std > 0")):
        status, _, err = _run(["verify", model, spec, "--results", tmp_path / "x.txt", *extra],
                              capsys)
        assert status == 2 and fragment in err, (extra, err)
