"""The certfx demo (``make demo``): load, inspect, compile and certify a bundled MNIST CNN.

Steps, each printed as it runs (a few seconds on a laptop CPU):

1. ``certfx inspect --check``: the canonical graph of ``examples/models/demo_cnn.onnx`` and a
   comparison with onnxruntime (skipped when onnxruntime is not installed);
2. ``certfx.load`` + ``certfx.compile(..., domain="box")`` and an excerpt of the generated code;
3. bounds and margin certification of the 8 bundled MNIST test digits at several ε (in pixel
   space; the normalization is inside the graph), with a sampling check of soundness;
4. ``certfx compile -o`` to a temporary folder, and a check that the exported module computes
   the same bounds;
5. ``certfx verify``: robustness of the 8 digits at ε = 0.15, where box alone certifies none,
   through the verification cascade (attack, bound domains, input splitting, MILP), with a JSON
   record per property.

It reads only files in ``examples/models/`` (made by ``examples/make_demo_model.py``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table

import certfx
from certfx.cli import main as certfx_cli
from certfx.export import import_exported

MODELS = Path(__file__).resolve().parent / "models"
MODEL = MODELS / "demo_cnn.onnx"
EPSILONS = (0.01, 0.03, 0.05, 0.1, 0.15)


def step_inspect(console: Console) -> None:
    """Step 1: the CLI's view of the canonical graph."""
    console.print(Rule("1. certfx inspect: the canonical graph"))
    argv = ["inspect", str(MODEL)]
    if importlib.util.find_spec("onnxruntime") is not None:
        argv.append("--check")
    console.print(f"$ certfx {' '.join(argv)}", style="bold cyan")
    status = certfx_cli(argv)
    if status != 0:
        raise SystemExit(f"certfx inspect failed with status {status}")


def step_compile(console: Console) -> certfx.CertifiedModule:
    """Step 2: the Python API, and the generated bound computation."""
    console.print(Rule("2. certfx.compile: generated bound code (box domain)"))
    start = time.perf_counter()
    network = certfx.load(MODEL)
    cm = certfx.compile(network, domain="box",
                        input_spec=certfx.LinfBall(eps=0.0, lower=0.0, upper=1.0))
    console.print(f"loaded and compiled in {time.perf_counter() - start:.2f} s; "
                  f"input (B, {', '.join(map(str, cm.input_shape))}), "
                  f"output (B, {', '.join(map(str, cm.output_shape))})")
    lines = cm.code.strip().splitlines()
    excerpt = "\n".join(lines[:12] + [f"    # … {len(lines) - 12} more lines"])
    console.print(Syntax(excerpt, "python", theme="ansi_dark", word_wrap=True))
    return cm


def step_certify(console: Console, cm: certfx.CertifiedModule) -> dict[float, int]:
    """Step 3: bounds, margins and a sampling check at several ε."""
    console.print(Rule("3. certified_forward: margin certification of 8 MNIST digits"))
    x = torch.from_numpy(np.load(MODELS / "demo_inputs.npy"))
    y = torch.from_numpy(np.load(MODELS / "demo_labels.npy"))
    with torch.no_grad():
        pred = cm(x).argmax(1)
    console.print(f"labels      {y.tolist()}\npredictions {pred.tolist()} "
                  f"({int((pred == y).sum())}/{len(y)} correct)")
    table = Table(title="certified robustness, box domain (ε in pixel space)",
                  title_justify="left")
    for header in ("ε", "certified", "smallest margin bound", "mean logit width",
                   "sampled points outside bounds", "bound time"):
        table.add_column(header, justify="right")
    results: dict[float, int] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cm.certified_forward(x, y=y)  # warm-up, so that the times below are steady-state
    for eps in EPSILONS:
        with torch.no_grad():
            start = time.perf_counter()
            margins = cm.certified_forward(x, y=y, eps=eps)
            lo, hi = cm.certified_forward(x, eps=eps)
            elapsed = time.perf_counter() - start
            # Soundness spot check: the network on random points of each ball stays in bounds.
            xl, xh = cm.input_bounds(x, eps)
            u = torch.rand((64, *x.shape), generator=gen)
            out = cm((xl + u * (xh - xl)).reshape(-1, *cm.input_shape)).reshape(64, *lo.shape)
            outside = int(((out < lo - 1e-5) | (out > hi + 1e-5)).sum())
        certified = (margins > 0).all(1) & (pred == y)
        results[eps] = int(certified.sum())
        table.add_row(f"{eps:g}", f"{results[eps]}/{len(y)}", f"{float(margins.min()):.3f}",
                      f"{float((hi - lo).mean()):.3f}", str(outside),
                      f"{elapsed * 1e3:.1f} ms")
    console.print(table)
    return results


def step_export(console: Console, cm: certfx.CertifiedModule) -> float:
    """Step 4: ``certfx compile -o`` and the exported module's bounds."""
    console.print(Rule("4. certfx compile -o: an importable bound module"))
    x = torch.from_numpy(np.load(MODELS / "demo_inputs.npy"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo_box"
        argv = ["compile", str(MODEL), "--domain", "box", "-o", str(out), "--eps", "0.05"]
        console.print(f"$ certfx {' '.join(argv)}", style="bold cyan")
        if certfx_cli(argv) != 0:
            raise SystemExit("certfx compile failed")
        console.print("files: " + ", ".join(sorted(p.name for p in out.iterdir())))
        exported = import_exported(out, "CertifiedBounds")
        xl, xh = cm.input_bounds(x, 0.05)
        with torch.no_grad():
            theirs = exported(xl, xh)
            ours = cm.certified_forward(x, eps=0.05)
        diff = max(float((theirs.lower - ours.lower).abs().max()),
                   float((theirs.upper - ours.upper).abs().max()))
    console.print(f"exported module vs certified_forward: max |difference| = {diff:.3g}")
    return diff


def step_verify(console: Console) -> dict[str, int]:
    """Step 5: the verification cascade end to end."""
    console.print(Rule("5. certfx verify: attack, bounds and MILP per property"))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "verify.json"
        argv = ["verify", str(MODEL), "--eps", "0.15", "--data", str(MODELS / "demo_data.csv"),
                "--timeout", "30", "--json", str(report)]
        console.print(f"$ certfx {' '.join(argv)}", style="bold cyan")
        if certfx_cli(argv) != 0:
            raise SystemExit("certfx verify failed")
        records = json.loads(report.read_text())["properties"]
    counts: dict[str, int] = {}
    for record in records:
        counts[record["verdict"]] = counts.get(record["verdict"], 0) + 1
    return counts


def main() -> int:
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    start = time.perf_counter()
    step_inspect(console)
    cm = step_compile(console)
    results = step_certify(console, cm)
    diff = step_export(console, cm)
    verdicts = step_verify(console)
    console.print(Rule("summary"))
    summary = ", ".join(f"ε={eps:g}: {n}/8" for eps, n in results.items())
    console.print(f"certified (box): {summary}")
    console.print(f"exported module matches: {'yes' if diff == 0 else f'max diff {diff:.3g}'}")
    console.print("verify at ε=0.15: " + ", ".join(f"{k} {v}" for k, v in sorted(
        verdicts.items())))
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
