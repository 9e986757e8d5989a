"""Certified training at CPU scale: the papers' orderings on the shared MNIST data.

Each method trains the same small CNN (``tiny_cnn`` below; same seed, same number of epochs and batch size, the
paper schedule of TAPS App. D scaled to the run: ε = 0 in the first 1/70, a smooth ramp over the
next 20/70, learning-rate decay at 50/70 and 60/70) on the 5,000 shared MNIST training images and
is evaluated on the 1,000 shared test images at the training ε:

* natural accuracy;
* PGD accuracy: 50-step PGD with 3 restarts (margin loss), each break re-checked;
* certified accuracy by IBP (``box``) and by CROWN (``crown``, back-substitution to the input).

Training time is reported in seconds and as a ratio to standard training measured in the same run.

``--precision N`` adds TAPS App. D's approximation-precision experiment: a small network is
trained with IBP, SABR and TAPS (TAPS uses a small CNN3; on two CPU cores exact MILP needs a
smaller one, an MLP 784-50-50-10, whose classifier part is its last ReLU layer and FC); on the first ``N``
test images the *maximum margin loss* ``max_{x'∈B^ε(x)} max_{j≠y} z_j − z_y`` is computed exactly
(MILP, :mod:`certfx.backends.milp`) and estimated by IBP, PGD (50 steps, 3 restarts), SABR's
small box (λ = 0.4) and TAPS (IBP to the last ReLU's input, multi-estimator PGD after it). The
table gives each estimate's mean error and mean absolute error against the exact value (positive
= over-approximation).

``--colt-cert N`` also certifies each method's network on the first ``N`` test images COLT's way
(``evaluate(cert="colt")``: α-CROWN, then partial MILP on the last one and two ReLU layers,
``--milp-time`` seconds per image), next to CROWN on the same images.

The papers' claims checked here (README, "Certified training"): SABR and TAPS reach higher
natural accuracy than IBP at similar or better certified accuracy (SABR paper ``002`` Table 1,
TAPS paper ``001`` Table 1).

Usage:
    python benchmarks/training.py [--methods standard,pgd,ibp,...] [--epochs 10]
        [--eps 0.1] [--model tiny_cnn] [--train-limit 5000] [--test-limit 1000]
        [--batch-size 100] [--colt-cert N] [--milp-time S] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from certfx.data import load_dataset
from certfx.models import build_model, conv_net, mlp
from certfx.train import TrainConfig, Trainer, evaluate, get_method

ALL = ("standard", "pgd", "ibp", "crown-ibp", "sabr", "taps", "staps", "colt")


def shuffled(dataset, limit: int | None, seed: int = 0):
    """The first ``limit`` examples of a random permutation (the 5k file is sorted by class)."""
    order = torch.randperm(dataset.images.shape[0], generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit else order
    return dataset.images[order], dataset.labels[order]


def tiny_cnn():
    """The benchmark's CNN: conv 4 4×4/2, conv 8 4×4/2 (padding 1), FC 10 — 1,176 ReLUs, so
    that COLT's zonotope regions fit a 2-core CPU."""
    return conv_net("mnist", [(4, 4, 2, 1), (8, 4, 2, 1)], [])


def make_model(name: str):
    return tiny_cnn() if name == "tiny_cnn" else build_model(name, "mnist")


def run_method(method: str, args, x, y, xt, yt) -> dict:
    torch.manual_seed(args.seed)
    model = make_model(args.model)
    config = TrainConfig(method=method, eps=args.eps, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         dataset="mnist")
    start = time.perf_counter()
    history = Trainer(model, x, y, config).fit()
    seconds = time.perf_counter() - start
    row = {"method": method, "train_seconds": round(seconds, 1),
           "final_loss": history[-1]["loss"],
           "options": {k: str(v) for k, v in vars(get_method(method).Options()).items()}}
    r = evaluate(model, xt, yt, args.eps, cert="crown", pgd_steps=50, pgd_restarts=3,
                 batch_size=250)
    box = evaluate(model, xt, yt, args.eps, cert="box", pgd_steps=0, pgd_restarts=1,
                   batch_size=250)  # PGD comes from the strong attack above
    row.update(natural=r.natural, pgd=r.pgd, box=box.certified, crown=r.certified,
               eval_seconds=r.seconds)
    if args.colt_cert:  # COLT's certification (Sec. 6-7) on the first test images
        n = args.colt_cert
        same = evaluate(model, xt[:n], yt[:n], args.eps, cert="crown", pgd_steps=50,
                        pgd_restarts=3, batch_size=250)
        colt = evaluate(model, xt[:n], yt[:n], args.eps, cert="colt", pgd_steps=50,
                        pgd_restarts=3, batch_size=250, cascade_timeout=args.milp_time)
        row["colt_cert"] = {"examples": n, "pgd": colt.pgd, "crown": same.certified,
                            "colt": colt.certified, "seconds": colt.seconds}
    console_row = {k: row[k] for k in ("method", "natural", "pgd", "box", "crown",
                                       "train_seconds", "colt_cert") if k in row}
    print(console_row, flush=True)
    return row


def exact_max_margin_loss(model, x, y, eps: float, time_limit: float) -> tuple[float, bool]:
    """``max_{x'} max_{j≠y} z_j − z_y`` over the ball by MILP; and whether every solve was
    optimal (else the best proven bound is used, which over-estimates)."""
    import certfx
    from certfx.backends.milp import MilpOptions, Session
    from certfx.backends.milp.verify import encode_property
    from certfx.specs import Margin

    C = Margin().matrix(y.view(1), 10, x.dtype)[0]  # rows z_y − z_j
    spec = torch.nn.Linear(10, 9, bias=False)
    spec.weight.data.copy_(C)
    gm = certfx.load(torch.nn.Sequential(model, spec).eval(), x[None])
    lo, hi = (x - eps).clamp(0, 1)[None].double(), (x + eps).clamp(0, 1)[None].double()
    options = MilpOptions(time_limit=time_limit)
    enc, _ = encode_property(gm, lo, hi, options)
    session = Session(enc.problem, options.solver, scip_parameters=options.scip_parameters)
    worst, exact = -float("inf"), True
    for j in range(9):
        r = session.optimize(enc.output.select(np.array([j])), False, time_limit)
        exact &= r.value is not None and r.bound is not None and abs(r.value - r.bound) < 1e-4
        worst = max(worst, -(r.bound if r.bound is not None else float("-inf")))
    return worst, exact


def precision(args, x, y, xt, yt, console) -> list[dict]:
    """TAPS App. D: worst-case loss estimates against MILP on a tiny CNN3."""
    from certfx.train.pgd import margin_objective, pgd_box
    from certfx.train.sabr import sabr_box

    rows = []
    for method in ("ibp", "sabr", "taps"):
        torch.manual_seed(args.seed)
        model = mlp("mnist", (50, 50))
        config = TrainConfig(method=method, eps=args.eps, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        Trainer(model, x, y, config).fit()
        model.eval()
        # init="default": building a method must not re-initialize the trained network
        probe = get_method("taps")(model, xt[:1], get_method("taps").Options(init="default"))
        ibp = get_method("ibp")(model, xt[:1], get_method("ibp").Options(init="default"))
        errors: dict[str, list[float]] = {k: [] for k in ("ibp", "pgd", "sabr", "taps")}
        inexact = 0
        for i in range(args.precision):
            xi, yi = xt[i:i + 1], yt[i:i + 1]
            exact, optimal = exact_max_margin_loss(model, xi[0], yi[0], args.eps,
                                                   args.milp_time)
            inexact += not optimal
            with torch.no_grad():
                m_ibp = ibp.box(xi, yi, args.eps).margins
            lo, hi = (xi - args.eps).clamp(0, 1), (xi + args.eps).clamp(0, 1)
            xa = pgd_box(model, lo, hi, yi, steps=50, restarts=3, step_size=0.1,
                         objective=margin_objective)
            with torch.no_grad():
                pgd_value = float(margin_objective(model(xa), yi))
            centre, tau = sabr_box(model, xi, yi, args.eps, 0.4, (0.0, 1.0), 50, 0.1, 3, None)
            with torch.no_grad():
                m_sabr = ibp.box(centre, yi, tau).margins
            m_taps = probe.taps_margins(xi, yi, args.eps).detach()
            for key, value in (("ibp", -float(m_ibp.min())), ("pgd", pgd_value),
                               ("sabr", -float(m_sabr.min())), ("taps", -float(m_taps.min()))):
                errors[key].append(value - exact)
            print(f"  {method} net, image {i}: exact {exact:.3f} (optimal: {optimal}), errors "
                  + ", ".join(f"{k} {v[-1]:+.3f}" for k, v in errors.items()), flush=True)
        row = {"trained_with": method, "examples": args.precision, "inexact_milp": inexact}
        for key, errs in errors.items():
            e = np.array(errs)
            row[key] = {"mean": round(float(e.mean()), 4), "mae": round(float(np.abs(e).mean()),
                                                                          4)}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(ALL))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--model", default="tiny_cnn", help="tiny_cnn or a certfx.models name")
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", type=int, default=0,
                        help="examples for the worst-case-loss precision experiment (0: skip)")
    parser.add_argument("--milp-time", type=float, default=10.0,
                        help="seconds per MILP solve in the precision experiment, and per image "
                             "with --colt-cert")
    parser.add_argument("--colt-cert", type=int, default=0, metavar="N",
                        help="also certify the first N test images COLT's way (α-CROWN, then "
                             "partial MILP; --milp-time seconds per image)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    x, y = shuffled(load_dataset("mnist", "train"), args.train_limit)
    test = load_dataset("mnist", "test", limit=args.test_limit)
    xt, yt = test.images, test.labels
    console = Console()
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        console.print(f"training {method} …")
        rows.append(run_method(method, args, x, y, xt, yt))
    base = next((r["train_seconds"] for r in rows if r["method"] == "standard"), None)
    table = Table(title=f"{args.model}, MNIST {x.shape[0]}/{xt.shape[0]}, eps = {args.eps}, "
                        f"{args.epochs} epochs")
    for col in ("method", "natural", "PGD", "certified (box)", "certified (crown)",
                "train s", "× standard"):
        table.add_column(col, justify="right")
    for r in rows:
        ratio = f"{r['train_seconds'] / base:.1f}" if base else "-"
        table.add_row(r["method"], f"{100 * r['natural']:.1f}", f"{100 * r['pgd']:.1f}",
                      f"{100 * r['box']:.1f}", f"{100 * r['crown']:.1f}",
                      f"{r['train_seconds']:.0f}", ratio)
    if rows:
        console.print(table)
    precision_rows = precision(args, x, y, xt, yt, console) if args.precision else []
    if precision_rows:
        ptable = Table(title=f"max-margin-loss estimate − MILP exact, MLP 50×2, {args.precision} "
                             f"test images (mean / mean abs)")
        for col in ("trained with", "IBP", "PGD", "SABR", "TAPS", "MILP not optimal"):
            ptable.add_column(col, justify="right")
        for r in precision_rows:
            ptable.add_row(r["trained_with"], *(f"{r[k]['mean']:+.3f} / {r[k]['mae']:.3f}"
                                                for k in ("ibp", "pgd", "sabr", "taps")),
                           str(r["inexact_milp"]))
        console.print(ptable)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "precision": precision_rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
