"""Tests of the ``certfx`` command: every subcommand's success path, its help, and its error
paths (one ``certfx: error:`` line, exit status 2, no traceback, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import certfx
from certfx import cli
from certfx.export import import_exported

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "demo_cnn.onnx"
INPUTS = ROOT / "examples" / "models" / "demo_inputs.npy"
LABELS = ROOT / "examples" / "models" / "demo_labels.npy"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("certfx: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def in_process_bounds(eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    cm = certfx.compile(certfx.load(MODEL), domain="box", input_spec=certfx.LinfBall(eps))
    with torch.no_grad():
        lo, hi = cm.certified_forward(torch.from_numpy(np.load(INPUTS)))
    return lo, hi


# ---- help ------------------------------------------------------------------------------------

def test_main_help_lists_subcommands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    for word in ("inspect", "compile", "bounds", "--debug", "--version", "examples:",
                 "exit status"):
        assert word in out


@pytest.mark.parametrize("sub, options", [
    ("inspect", ["--check", "--samples", "--tol", "--dump-passes", "--debug"]),
    ("compile", ["--domain", "--output", "--print", "--eps", "--lower", "--upper", "--debug"]),
    ("bounds", ["--eps", "--input", "--domain", "--labels", "--y", "--json", "--lower",
                "--upper", "--batch-size", "--debug"]),
])
def test_subcommand_help_is_complete(sub: str, options: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run([sub, "--help"], capsys)
    assert status == 0
    assert "example:" in out and "MODEL" in out
    for option in options:
        assert option in out
    # every option has help text: no option line ends without a description
    parser = cli.build_parser()
    subparser = parser._subparsers._group_actions[0].choices[sub]  # type: ignore[union-attr]
    assert all(a.help for a in subparser._actions)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--version"], capsys)
    assert status == 0 and out.strip() == f"certfx {certfx.__version__}"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([], capsys)[0] == 2
    assert run(["bounds", MODEL, "--input", INPUTS], capsys)[0] == 2  # --eps missing
    assert run(["frobnicate"], capsys)[0] == 2


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_prints_the_canonical_graph(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["inspect", MODEL], capsys)
    assert status == 0, err
    for text in ("placeholder", "conv", "max_pool", "B×1×28×28", "B×8×14×14", "B×10",
                 "ONNX node '/1/Conv' (Conv)", "= 0.1307", "8×1×3×3", "23 nodes"):
        assert text in out, text


def test_inspect_check_against_onnxruntime(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    status, out, _ = run(["inspect", MODEL, "--check", "--samples", "2"], capsys)
    assert status == 0 and "OK" in out


def test_inspect_check_fails_above_tolerance(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    import certfx.reference

    monkeypatch.setattr(certfx.reference, "compare_with_onnx", lambda *a, **k: 0.5)
    status, out, _ = run(["inspect", MODEL, "--check"], capsys)
    assert status == 1 and "FAILED" in out


def test_inspect_dump_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, _ = run(["inspect", MODEL, "--dump-passes", tmp_path / "dump"], capsys)
    assert status == 0
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names and names[0].startswith("00_") and any("shape_prop" in n for n in names)


# ---- compile ---------------------------------------------------------------------------------

def test_compile_writes_an_importable_folder(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out" / "demo_box"
    status, out, err = run(["compile", MODEL, "--domain", "box", "-o", out_dir, "--eps",
                            "0.05"], capsys)
    assert status == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "__init__.py", "module.py", "report.json", "state_dict.pt"]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["domain"] == "box" and report["input_shape"] == [1, 28, 28]
    assert report["ops"]["conv"] == 2 and report["nodes"] == 23
    assert report["input_spec"] == {"eps": 0.05, "lower": 0.0, "upper": 1.0}
    assert str(tmp_path) not in (out_dir / "module.py").read_text()  # no absolute paths
    assert [p.name for p in out_dir.parent.iterdir()] == ["demo_box"]  # no temporary left
    module = import_exported(out_dir)
    x = torch.from_numpy(np.load(INPUTS))
    got = module((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1))
    lo, hi = in_process_bounds(0.05)
    torch.testing.assert_close(got.lower, lo)
    torch.testing.assert_close(got.upper, hi)


def test_compile_print(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["compile", MODEL, "--print"], capsys)
    assert status == 0
    assert "def forward(self, lower, upper, spec = None)" in out and "box_relu" in out


def test_compile_replaces_an_earlier_export(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "m"
    assert run(["compile", MODEL, "-o", out_dir], capsys)[0] == 0
    (out_dir / "stale.txt").write_text("old")
    assert run(["compile", MODEL, "-o", out_dir], capsys)[0] == 0
    assert not (out_dir / "stale.txt").exists() and (out_dir / "module.py").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_compile_errors_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "new" / "m"
    status, _, err = run(["compile", MODEL, "--domain", "zonotope-x", "-o", out_dir], capsys)
    assert_one_line_error(status, err, "unknown domain")
    status, _, err = run(["compile", MODEL, "--eps", "-1", "-o", out_dir], capsys)
    assert_one_line_error(status, err, "eps must be >= 0")
    status, _, err = run(["compile", MODEL], capsys)
    assert_one_line_error(status, err, "nothing to do")
    # a failure while exporting: no folder, no temporary, no created parents
    import certfx.export

    def broken(*args: object, **kwargs: object) -> None:
        raise certfx.errors.CertfxError("simulated failure")

    monkeypatch.setattr(certfx.export, "import_exported", broken)
    status, _, err = run(["compile", MODEL, "-o", out_dir], capsys)
    assert_one_line_error(status, err, "simulated failure")
    assert list(tmp_path.iterdir()) == []


def test_compile_refuses_a_foreign_folder(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    status, _, err = run(["compile", MODEL, "-o", tmp_path], capsys)
    assert_one_line_error(status, err, "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---- bounds ----------------------------------------------------------------------------------

def test_bounds_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "b.json"
    status, out, err = run(["bounds", MODEL, "--eps", "0.05", "--input", INPUTS, "--labels",
                            LABELS, "--json", out_json, "--batch-size", "3"], capsys)
    assert status == 0, err
    data = json.loads(out_json.read_text())
    assert set(data) == {"lower", "upper", "labels", "margin_lower", "certified"}
    lo, hi = in_process_bounds(0.05)
    np.testing.assert_allclose(data["lower"], lo.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data["upper"], hi.numpy(), rtol=1e-6, atol=1e-6)
    assert len(data["margin_lower"]) == 8 and len(data["margin_lower"][0]) == 9
    assert data["labels"] == np.load(LABELS).tolist()
    assert data["certified"] == [min(m) > 0 for m in data["margin_lower"]]
    assert f"certified {sum(data['certified'])}/8 inputs" in out
    assert "out9" in out and "wrote" in out


def test_bounds_without_labels_pt_input_single_example(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    x = torch.from_numpy(np.load(INPUTS))
    torch.save(x[0], tmp_path / "one.pt")  # (1, 28, 28): no batch dim
    out_json = tmp_path / "b.json"
    status, out, _ = run(["bounds", MODEL, "--eps", "0.01", "--input", tmp_path / "one.pt",
                          "--json", out_json], capsys)
    assert status == 0
    data = json.loads(out_json.read_text())
    assert set(data) == {"lower", "upper"} and len(data["lower"]) == 1
    assert all(lo <= hi for lo, hi in zip(data["lower"][0], data["upper"][0]))
    assert "certified" not in out and "┃ label" not in out


def test_bounds_inline_labels(capsys: pytest.CaptureFixture[str]) -> None:
    labels = [str(v) for v in np.load(LABELS).tolist()]
    status, out, _ = run(["bounds", MODEL, "--eps", "0.01", "--input", INPUTS, "--y", *labels],
                         capsys)
    assert status == 0 and "certified 8/8 inputs at eps=0.01" in out


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    x = np.load(INPUTS)
    files = {"wrong_shape": tmp_path / "wrong.npy", "nan": tmp_path / "nan.npy",
             "pixels": tmp_path / "pixels.npy", "corrupt": tmp_path / "corrupt.npy",
             "corrupt_onnx": tmp_path / "corrupt.onnx", "text": tmp_path / "x.txt"}
    np.save(files["wrong_shape"], np.zeros((2, 3, 28, 28), np.float32))
    nan = x.copy()
    nan[1, 0, 5, 5] = np.nan
    np.save(files["nan"], nan)
    np.save(files["pixels"], x * 255)
    files["corrupt"].write_bytes(b"not numpy")
    files["corrupt_onnx"].write_bytes(b"not onnx")
    files["text"].write_text("0.5")
    return files


@pytest.mark.parametrize("case, argv, fragment", [
    ("missing model", ["bounds", "nope.onnx", "--eps", "0.1", "--input", INPUTS],
     "does not exist"),
    ("missing input", ["bounds", MODEL, "--eps", "0.1", "--input", "nope.npy"],
     "does not exist"),
    ("negative eps", ["bounds", MODEL, "--eps", "-0.1", "--input", INPUTS], "eps must be >= 0"),
    ("nan eps", ["bounds", MODEL, "--eps", "nan", "--input", INPUTS], "eps is NaN"),
    ("wrong shape", ["bounds", MODEL, "--eps", "0.1", "--input", "{wrong_shape}"],
     "the model takes (N, 1, 28, 28)"),
    ("nan input", ["bounds", MODEL, "--eps", "0.1", "--input", "{nan}"], "NaN"),
    ("out of range", ["bounds", MODEL, "--eps", "0.1", "--input", "{pixels}"],
     "outside the valid input range"),
    ("corrupt input", ["bounds", MODEL, "--eps", "0.1", "--input", "{corrupt}"],
     "cannot read input file"),
    ("text input", ["bounds", MODEL, "--eps", "0.1", "--input", "{text}"], ".npy or .pt"),
    ("label count", ["bounds", MODEL, "--eps", "0.1", "--input", INPUTS, "--y", "1", "2"],
     "2 labels"),
    ("label range", ["bounds", MODEL, "--eps", "0.1", "--input", INPUTS, "--y",
                     *["11"] * 8], "labels must lie in [0, 9]"),
    ("unknown domain", ["bounds", MODEL, "--eps", "0.1", "--input", INPUTS, "--domain", "x"],
     "unknown domain"),
    ("not onnx", ["inspect", "{nan}"], "must be an .onnx file"),
    ("corrupt onnx", ["inspect", "{corrupt_onnx}"], "not a readable ONNX model"),
    ("bad batch size", ["bounds", MODEL, "--eps", "0.1", "--input", INPUTS, "--batch-size",
                        "0"], "--batch-size"),
])
def test_bounds_errors(case: str, argv: list[str], fragment: str, tmp_path: Path,
                       bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out.json"
    argv = [str(a).format(**bad_files) for a in argv]
    if argv[0] == "bounds":
        argv += ["--json", str(out_json)]
    status, _, err = run(argv, capsys)
    assert_one_line_error(status, err, fragment)
    assert not out_json.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json")]


def test_json_into_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(["bounds", MODEL, "--eps", "0.1", "--input", INPUTS, "--json",
                          tmp_path / "no" / "b.json"], capsys)
    assert_one_line_error(status, err, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--debug", "bounds", MODEL, "--eps", "-1", "--input", INPUTS],
                 ["bounds", MODEL, "--eps", "-1", "--input", INPUTS, "--debug"]):
        status, _, err = run(argv, capsys)
        assert status == 2 and "Traceback" in err and "InvalidValueError" in err
        assert err.strip().splitlines()[-1].startswith("certfx: error: ")


def test_internal_errors_exit_3(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(certfx, "load", broken)
    status, _, err = run(["inspect", MODEL], capsys)
    assert status == 3 and "internal error: RuntimeError: boom" in err
    assert "Traceback" not in err


def test_python_dash_m_in_a_subprocess(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "certfx", "inspect", str(MODEL)],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and "max_pool" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "certfx", "bounds", "missing.onnx", "--eps",
                          "0.1", "--input", str(INPUTS)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "certfx: error: ONNX file 'missing.onnx' does not exist; check the path"]


def test_unsupported_ops_are_all_listed_on_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
         helper.make_node("Sqrt", ["h"], ["e"], name="the_sqrt"),
         helper.make_node("Softplus", ["e"], ["y"], name="the_softplus")], "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                ir_version=8), path)
    out_dir = tmp_path / "out"
    status, _, err = run(["compile", path, "-o", out_dir], capsys)
    assert_one_line_error(status, err, "2 unsupported node(s)", "the_sqrt", "the_softplus")
    assert not out_dir.exists()
