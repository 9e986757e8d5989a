"""``certfx train`` end to end on a tiny CSV data set (no shared folder needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import certfx
from certfx.cli import main


@pytest.fixture
def mnist_csv(tmp_path):
    """60 28×28 'images' (label first, pixels 0..255) whose class is a bright stripe."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = i % 3
        img = rng.integers(100, 140, size=(28, 28))
        img[:, label * 9:label * 9 + 6] = 250
        rows.append(",".join(map(str, [label, *img.flatten().tolist()])))
    path = tmp_path / "tiny.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def run(args: list[str]) -> int:
    return main(["train", *args])


def common(csv, out):
    return ["--dataset", "mnist", "--data", str(csv), "--test-data", str(csv), "--test-limit",
            "12", "--model", "cnn3", "--eps", "0.05", "--epochs", "2", "--batch-size", "20",
            "--cert", "box", "--pgd-eval-steps", "5", "--pgd-eval-restarts", "1", "--out",
            str(out)]


def test_train_writes_every_artifact_and_resumes(mnist_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*common(mnist_csv, out), "--method", "sabr", "--lambda-ratio", "0.3"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["method"] == "sabr"
    assert record["config"]["options"]["lambda_ratio"] == 0.3
    assert len(record["history"]) == 2
    ev = record["evaluation"]
    assert 0 <= ev["certified"] <= ev["pgd"] <= ev["natural"] <= 1
    for name in ("checkpoint.pt", "model.pt", "model.onnx"):
        assert (out / name).is_file()
    # the ONNX model loads back into certfx and computes what the trained model computes
    net = certfx.models.build_model("cnn3", "mnist")
    net.load_state_dict(torch.load(out / "model.pt"))
    x = torch.rand(2, 1, 28, 28)
    gm = certfx.load(out / "model.onnx")
    assert torch.allclose(gm(x), net.eval()(x), atol=1e-4)
    # a second run with the same --out resumes after the last epoch: nothing left to train
    assert run([*common(mnist_csv, out), "--method", "sabr", "--lambda-ratio", "0.3"]) == 0
    assert len(json.loads((out / "run.json").read_text())["history"]) == 2


def test_taps_reports_its_proxy(mnist_csv, tmp_path):
    out = tmp_path / "taps"
    assert run([*common(mnist_csv, out), "--method", "taps", "--split-relus", "1"]) == 0
    assert "taps_accuracy" in json.loads((out / "run.json").read_text())["evaluation"]


def test_a_user_model_file(mnist_csv, tmp_path):
    model_file = tmp_path / "mine.py"
    model_file.write_text("import torch\n"
                          "def make():\n"
                          "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
                          "        torch.nn.Linear(784, 20), torch.nn.ReLU(),\n"
                          "        torch.nn.Linear(20, 10))\n")
    args = common(mnist_csv, tmp_path / "mine")
    args[args.index("--model") + 1] = f"{model_file}:make"
    assert run([*args, "--method", "ibp"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--method", "ibp", "--lambda-ratio", "0.3"], "--lambda-ratio not an option of method 'ibp'"),
    (["--method", "ibp", "--eps", "-1"], "eps"),
    (["--method", "ibp", "--model", "nope"], "unknown model 'nope'"),
    (["--method", "ibp", "--decay-epochs", "a,b"], "--decay-epochs"),
])
def test_bad_flags_are_named(mnist_csv, tmp_path, capsys, extra, message):
    assert run([*common(mnist_csv, tmp_path / "bad"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "run.json").exists()


def test_missing_data_says_how_to_fix(tmp_path, capsys):
    assert run(["--dataset", "cifar10", "--eps", "0.01", "--epochs", "1"]) == 2
    assert "--data" in capsys.readouterr().err


def test_help_lists_every_method_option(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--lambda-ratio", "--w-taps", "--connector-c", "--epochs-per-stage",
                 "--fast-reg", "--beta-start"):
        assert flag in out
