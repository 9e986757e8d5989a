"""ℓ2 robustness at CPU scale (thesis ``004``, Sec. 3.2, Table 3.2) on the shared MNIST data.

Trains the same MLP (784-256-256-10, normalization inside) on the 5,000 shared MNIST training
images with

* standard training;
* IBP at the ℓ2 radius through its circumscribing box (``LinfBall(ε₂)``);
* BCP (Eq. 3.2.13, ε and λ ramped together);

and evaluates each on the 1,000 test images at ℓ2 radii ``--eval-eps``: natural accuracy, ℓ2-PGD
accuracy (50 steps, 3 restarts, each break re-checked), and certified accuracy by

* the global Lipschitz bound: ``z_y − z_j − ε·Π_k‖W_k‖₂·‖w_y − w_j‖₂ > 0`` (exact spectral norms);
* IBP on the circumscribing box (``box``);
* CROWN with the dual-norm concretization (``crown``: ``⟨A, x⟩ − ε‖A‖₂``);
* BCP (``bcp``).

The thesis' claims checked: BCP certifies more than the global Lipschitz bound and more than IBP
for ℓ2 (Table 3.2, Fig. 3.3).

Usage:
    python benchmarks/l2.py [--eps 1.58] [--epochs 10] [--eval-eps 0.5,1.0,1.58]
        [--test-limit 1000] [--json benchmarks/results/l2.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import certfx
from certfx.data import load_dataset
from certfx.models import mlp
from certfx.specs import L2Ball
from certfx.train import TrainConfig, Trainer
from certfx.verify import PGDConfig, pgd_ball
from certfx.verify.attacks import Norm


def shuffled(dataset, limit: int | None, seed: int = 0):
    order = torch.randperm(dataset.images.shape[0], generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit else order
    return dataset.images[order], dataset.labels[order]


def lipschitz_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float):
    """Margin lower bounds from the global Lipschitz constant of the layers before the last."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    scale = 1.0
    for m in model.modules():  # the normalization: (x − mean)/std scales distances by 1/std
        if hasattr(m, "std") and isinstance(getattr(m, "std"), torch.Tensor):
            scale = scale / float(m.std.min())
    lip = scale * torch.prod(torch.stack([torch.linalg.matrix_norm(m.weight, ord=2)
                                          for m in linears[:-1]]))
    w = linears[-1].weight
    z = model(x)
    diffs = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, K, n)
    bound = z.gather(1, y.view(-1, 1)) - z - eps * lip * diffs.norm(dim=2)
    mask = torch.ones_like(bound, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    return bound[mask].view(x.shape[0], -1)


def evaluate(model, xt, yt, eps: float) -> dict:
    model.eval()
    out = {}
    with torch.no_grad():
        correct = model(xt).argmax(1) == yt
    out["natural"] = float(correct.float().mean())
    broken = pgd_ball(model, xt, yt, eps, norm=Norm.L2,
                      config=PGDConfig(steps=50, restarts=3)).found
    out["pgd"] = float((correct & ~broken).float().mean())
    with torch.no_grad():
        out["lipschitz"] = float((correct & (lipschitz_margins(model, xt, yt, eps) > 1e-5)
                                  .all(1)).float().mean())
    for domain in ("box", "crown", "bcp"):
        start = time.perf_counter()
        cm = certfx.compile(model, domain, input_spec=L2Ball(eps), example_input=xt[:1])
        proven = torch.zeros_like(correct)
        for s in range(0, xt.shape[0], 250):
            with torch.no_grad():
                m = cm.certified_forward(xt[s:s + 250], yt[s:s + 250])
            proven[s:s + 250] = (m > 1e-5).all(1)
        out[domain] = float((correct & proven).float().mean())
        out[f"{domain}_seconds"] = round(time.perf_counter() - start, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, default=1.58, help="training ℓ2 radius")
    p.add_argument("--eval-eps", default="0.5,1.0,1.58")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--methods", default="standard,ibp,bcp")
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    console = Console()
    x, y = shuffled(load_dataset("mnist", "train"), args.train_limit)
    xt, yt = shuffled(load_dataset("mnist", "test"), args.test_limit)
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        torch.manual_seed(args.seed)
        model = mlp("mnist", [256, 256])
        cfg = TrainConfig(method=method, eps=args.eps, epochs=args.epochs, batch_size=100,
                          lr=1e-3, seed=args.seed, dataset="mnist")
        start = time.perf_counter()
        Trainer(model, x, y, cfg).fit()
        seconds = round(time.perf_counter() - start, 1)
        for eps in [float(e) for e in args.eval_eps.split(",")]:
            r = {"method": method, "train_eps": args.eps, "eps": eps, "train_seconds": seconds,
                 **evaluate(model, xt, yt, eps)}
            print(r, flush=True)
            rows.append(r)
    table = Table(title=f"ℓ2 robustness, MLP 784-256-256-10, trained at ε₂ = {args.eps} for "
                        f"{args.epochs} epochs; {args.test_limit} test images")
    for col in ("trained with", "ε₂", "natural", "PGD-ℓ2", "cert: Lipschitz", "cert: IBP box",
                "cert: CROWN (ℓ2)", "cert: BCP", "train s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], f"{r['eps']:g}", *(f"{100 * r[k]:.1f}" for k in
                      ("natural", "pgd", "lipschitz", "box", "crown", "bcp")),
                      f"{r['train_seconds']:.0f}")
    console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
