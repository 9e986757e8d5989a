"""Tightness and smoothness of CROWN-IBP's lower slopes (thesis ``004``, Sec. 3.3, Fig. 3.7,
3.9 and 3.10) at CPU scale on the shared MNIST data.

The same small CNN is trained at ε = 0.1 (6 epochs on the 5,000 shared images, the ε ramp over
the middle epochs) with IBP and with CROWN-IBP at β = 1 throughout (the CROWN-IBP bound alone)
under different lower slopes for unstable ReLUs: adaptive (CROWN-IBP, the thesis' (p, q) =
(0, 1)), the (p, q)-random variants (0, 0), (0, 0.5), (1, 1), and the one-step slopes of
Eq. 3.3.24. During the ε ramp the **non-smoothness** of the loss landscape is measured as in
Fig. 3.7: the ℓ2 distance and the cosine distance between consecutive loss gradients (w.r.t.
the parameters). After training, each model's natural and certified (CROWN) accuracy at ε are
reported, and on the one-step model the **tightness** measure of Fig. 3.10 — the mean over test
images of Σ_m of the worst-case margin loss bounds ``−s̄_m`` (lower is tighter) — for one-step,
adaptive and uniform-random slopes.

Usage:
    python benchmarks/smooth_crown_ibp.py [--eps 0.1] [--epochs 6] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from certfx.data import load_dataset
from certfx.models import conv_net
from certfx.train import TrainConfig, Trainer, evaluate, get_method

VARIANTS = {
    "IBP": ("ibp", {}),
    "CROWN-IBP adaptive (0, 1)": ("crown-ibp", {"lower_slopes": "adaptive"}),
    "random (0, 0)": ("crown-ibp", {"lower_slopes": "random", "slope_p": 0.0, "slope_q": 0.0}),
    "random (0, 0.5)": ("crown-ibp", {"lower_slopes": "random", "slope_p": 0.0,
                                      "slope_q": 0.5}),
    "random (1, 1)": ("crown-ibp", {"lower_slopes": "random", "slope_p": 1.0, "slope_q": 1.0}),
    "one-step (Eq. 3.3.24)": ("crown-ibp", {"lower_slopes": "one-step"}),
}


def shuffled(dataset, limit: int | None, seed: int = 0):
    order = torch.randperm(dataset.images.shape[0], generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit else order
    return dataset.images[order], dataset.labels[order]


def model():
    return conv_net("mnist", [(4, 4, 2, 1), (8, 4, 2, 1)], [64])


def train(name: str, x, y, args) -> tuple[torch.nn.Module, dict]:
    method, extra = VARIANTS[name]
    torch.manual_seed(args.seed)
    net = model()
    options = dict(extra)
    if method == "crown-ibp":  # β = 1 throughout: the CROWN-IBP bound alone (thesis Sec. 3.3.1)
        options.update(beta_start=1.0, beta_end=1.0)
    opts = get_method(method).Options(**options) if options else None
    cfg = TrainConfig(method=method, options=opts, eps=args.eps, epochs=args.epochs,
                      batch_size=100, lr=5e-4, seed=args.seed, dataset="mnist")
    previous: list[torch.Tensor] = []
    l2, cosine = [], []

    def on_event(event: str, data: dict) -> None:
        if event != "step" or not 0 < data["eps"] < args.eps:  # the ramp only
            return
        grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        if previous:
            g0 = previous[0]
            l2.append(float((grad - g0).norm()))
            cosine.append(float(1 - torch.nn.functional.cosine_similarity(grad, g0, dim=0)))
        previous[:] = [grad.clone()]

    start = time.perf_counter()
    Trainer(net, x, y, cfg, callback=on_event).fit()
    seconds = time.perf_counter() - start
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    return net.eval(), {"grad_l2_distance": mean(l2), "grad_cosine_distance": mean(cosine),
                        "train_seconds": round(seconds, 1)}


def tightness(net, xt, yt, eps: float) -> dict:
    """Mean over images of Σ_m −s̄_m (margin lower bounds negated; lower is tighter)."""
    from certfx.domains.crown import BacksubOptions
    from certfx.domains.linear import Slopes

    method = get_method("crown-ibp")(net, xt[:1], get_method("crown-ibp").Options(
        lower_slopes="one-step"))
    out = {}
    torch.manual_seed(0)
    with torch.no_grad():
        out["adaptive"] = float(-method.crown_ibp.certified_forward(xt, yt, eps=eps).sum(1)
                                .mean())
    one = method.one_step_margins(xt, yt, eps).detach()
    out["one-step"] = float(-one.sum(1).mean())
    uniform = method.compile("crown-ibp", domain_options=BacksubOptions(Slopes.random(0.5,
                                                                                      0.5)))
    with torch.no_grad():
        out["random (0.5, 0.5)"] = float(-uniform.certified_forward(xt, yt, eps=eps).sum(1)
                                         .mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    x, y = shuffled(load_dataset("mnist", "train"), 5000)
    xt, yt = shuffled(load_dataset("mnist", "test"), args.test_limit)
    rows = []
    nets = {}
    for name in VARIANTS:
        net, row = train(name, x, y, args)
        r = evaluate(net, xt, yt, args.eps, cert="crown", pgd_steps=20, pgd_restarts=1)
        row.update(variant=name, natural=r.natural, pgd=r.pgd, certified=r.certified)
        print(row, flush=True)
        rows.append(row)
        nets[name] = net
    tight = tightness(nets["one-step (Eq. 3.3.24)"], xt, yt, args.eps)
    table = Table(title=f"CROWN-IBP lower slopes, MNIST, ε = {args.eps}, {args.epochs} epochs")
    for col in ("variant", "grad ℓ2 dist.", "grad cos dist.", "natural", "PGD",
                "certified (CROWN)", "train s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["variant"], f"{r['grad_l2_distance']:.3f}",
                      f"{r['grad_cosine_distance']:.3f}", f"{100 * r['natural']:.1f}",
                      f"{100 * r['pgd']:.1f}", f"{100 * r['certified']:.1f}",
                      f"{r['train_seconds']:.0f}")
    Console().print(table)
    print("tightness on the one-step model (mean Σ_m −s̄_m, lower is tighter):", tight)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "tightness": tight}, indent=1))


if __name__ == "__main__":
    main()
