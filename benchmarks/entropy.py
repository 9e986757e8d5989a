"""Tightness of the zonotope entropy transformer against interval arithmetic (ACE App. H.6.1).

The experiment of ACE (paper 000) App. H.6.1: random input zonotopes over ``n`` logits,

    ŷ = a0 + A ε,   a0 ~ N(1, 3²)^n,   A ~ N(0, σ_ε²)^{n×p} (fully populated),   ε ∈ [−1, 1]^p

(Eq. 9), are pushed through bounds of the softmax entropy ``H(softmax(y))`` (Eq. 5). The
*looseness* of a transformer is ``upper − lower``; the box transformer gets the zonotope's
interval hull ("converted to a box representation with the same bounds"). The paper reports the
mean over 50 samples for each σ_ε, as curves (its Fig. 12; no numbers in the text). Rows here:

* ``zono``: :func:`certfx.domains.zonotope_rules.deepz_softmax_entropy` — the chained exp, log,
  exp and product transformers of App. H.3–H.6 (the paper's *Zono*: minimum-area slopes, with
  exp's positivity limit of Eq. 22, and each relaxation computed on its bounds met with the
  interval ones);
* ``zonoLM``: the same with the interval product (Eq. 28–30) in place of H.5 (the paper's
  *ZonoLM*);
* ``box``: interval arithmetic on Eq. 5 (:func:`~certfx.domains.interval.box_softmax_entropy`;
  the paper's *Box*);
* ``zono-graph`` / ``box-graph``: the entropy written as plain ops, ``−Σ p·log p`` with
  ``p = softmax(y)``, loaded by the torch frontend (softmax as ``exp(−log Σ_j e^{y_j − y_i})``,
  ``log(exp(·))`` cancelled, ``p·log p`` as ``product``) and interpreted with each domain's
  rules: what an ONNX model computing the entropy gets without the composite op.

``adv`` is a lower bound on the optimal looseness (the paper's *Adv*): the entropy range over
sampled points (uniform in the ε-cube, and corners) refined by projected sign-gradient ascent
and descent on ε. Every bound is checked against all these points (``sound`` = fraction of
entropies inside the bounds; anything below 100% is a bug). NaN bounds (log of an interval
reaching 0) are no bounds at all; they are counted apart, not as unsound.

The entropy always lies in ``[0, log n]``; no row intersects its bounds with that range (the
paper measures the transformers alone), so widths far above ``log n`` are vacuous.

Usage:
    python benchmarks/entropy.py [--classes 10] [--errors 10] [--sigmas 0.001 0.01 …]
                                 [--trials 50] [--samples 2000] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import certfx
from certfx import ops
from certfx.domains import get_domain
from certfx.domains.interval import box_softmax_entropy
from certfx.domains.zonotope import ErrorBlock, Zonotope, ZonotopeOptions
from certfx.domains.zonotope_rules import deepz_softmax_entropy

DEFAULT_SIGMAS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
Bounds = tuple[Tensor, Tensor]


# ---- the input zonotopes --------------------------------------------------------------------

def random_zonotopes(trials: int, classes: int, errors: int, sigma: float,
                     gen: torch.Generator, product_max_terms: int = 256) -> Zonotope:
    """ACE H.6.1: centres ``a0 ~ N(1, 3²)``, fully populated generators ``A ~ N(0, σ²)``
    (float64, one zonotope per row of the batch)."""
    center = 1 + 3 * torch.randn(trials, classes, generator=gen, dtype=torch.float64)
    gens = sigma * torch.randn(trials, errors, classes, generator=gen, dtype=torch.float64)
    return Zonotope(center, gens, (ErrorBlock("input", errors),),
                    ZonotopeOptions(product_max_terms=product_max_terms))


def logits_at(z: Zonotope, eps: Tensor) -> Tensor:
    """Points ``a0 + A ε`` for ``eps`` of shape ``(k, trials, p)``: ``(k, trials, n)``."""
    return z.center + torch.einsum("kte,ten->ktn", eps, z.generators)


def entropy_at(z: Zonotope, eps: Tensor) -> Tensor:
    """``H(softmax(a0 + A ε))`` per point, ``(k, trials)``."""
    y = logits_at(z, eps)
    return ops.softmax_entropy(y.reshape(-1, y.shape[-1])).reshape(y.shape[:2])


# ---- the lower bound on the optimal looseness (the paper's "Adv") ---------------------------

def sampled_points(z: Zonotope, samples: int, gen: torch.Generator) -> Tensor:
    """``samples`` error vectors per zonotope: half uniform in ``[−1, 1]^p``, half corners."""
    eps = torch.rand(samples, *z.generators.shape[:2], generator=gen, dtype=torch.float64)
    eps = eps * 2 - 1
    eps[: samples // 2] = eps[: samples // 2].sign()
    return eps


def attacked_points(z: Zonotope, starts: Tensor, steps: int = 30) -> Tensor:
    """Projected sign-gradient steps on ε from ``starts`` ``(k, trials, p)`` (half the starts
    maximize the entropy, half minimize it); returns the final points."""
    eps = starts.clone().requires_grad_(True)
    direction = torch.ones(starts.shape[0], 1, 1, dtype=starts.dtype)
    direction[starts.shape[0] // 2:] = -1
    for k in range(steps):
        step = 0.5 * (1 - k / steps) + 0.01
        (grad,) = torch.autograd.grad(entropy_at(z, eps).sum(), eps)
        with torch.no_grad():
            eps += step * direction * grad.sign()
            eps.clamp_(-1.0, 1.0)
    return eps.detach()


# ---- the transformers -----------------------------------------------------------------------

class EntropyOps(nn.Module):
    """The entropy as a network would write it (what an ONNX export contains)."""

    def forward(self, y: Tensor) -> Tensor:
        p = torch.softmax(y, dim=1)
        return -(p * torch.log(p)).sum(1, keepdim=True)


def graph_rules(classes: int, domain: str) -> Callable[[Any], Any]:
    """The canonical graph of :class:`EntropyOps`, interpreted with ``domain``'s rules on an
    element of that domain."""
    gm = certfx.load(EntropyOps().double(), torch.zeros(1, classes, dtype=torch.float64))
    dom = get_domain(domain)

    class Rules(fx.Interpreter):
        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            return dom.rule_for(target)(*args, **kwargs)

    return lambda element: Rules(gm).run(element)


def transformers(classes: int) -> dict[str, Callable[[Zonotope], Bounds]]:
    """Each row's bounds ``(lower, upper)`` of shape ``(trials,)`` for a batch of zonotopes."""
    zono_graph, box_graph = graph_rules(classes, "deepz"), graph_rules(classes, "box")

    def flat(element: Any) -> Bounds:
        return element.lower.reshape(-1), element.upper.reshape(-1)

    def low_memory(z: Zonotope) -> Zonotope:
        return Zonotope(z.center, z.generators, z.blocks, ZonotopeOptions(product_max_terms=0))

    return {
        # the transformers as ACE H.6.1 compares them, without the [0, log n] meet
        "zono": lambda z: flat(deepz_softmax_entropy(z, within_range=False)),
        "zonoLM": lambda z: flat(deepz_softmax_entropy(low_memory(z), within_range=False)),
        "box": lambda z: flat(box_softmax_entropy(z.concretize(), within_range=False)),
        "zono-graph": lambda z: flat(zono_graph(z)),
        "box-graph": lambda z: flat(box_graph(z.concretize())),
    }


# ---- one σ ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One transformer at one σ_ε; widths are means/medians over the trials."""

    sigma: float
    transformer: str
    mean_width: float
    median_width: float
    ratio_to_box: float  # mean width / the box's mean width
    tighter_than_box: float  # fraction of trials with a smaller width than the box
    mean_excess: float  # mean of width − adv width
    sound: float  # fraction of checked entropies inside the bounds (trials with bounds)
    no_bounds: int  # trials whose bounds are NaN (no bound at all: not counted in ``sound``)


def run_sigma(sigma: float, args: argparse.Namespace, gen: torch.Generator,
              rules: dict[str, Callable[[Zonotope], Bounds]]) -> list[Row]:
    """Draw ``args.trials`` zonotopes at ``sigma``, bound them with every rule, and measure
    widths against the box and the attacked range, and soundness on all checked points."""
    z = random_zonotopes(args.trials, args.classes, args.errors, sigma, gen)
    eps = sampled_points(z, args.samples, gen)
    starts = eps[torch.randperm(args.samples, generator=gen)[: args.starts]]
    eps = torch.cat([eps, attacked_points(z, starts)])
    h = entropy_at(z, eps)  # (k, trials)
    adv = h.amax(0) - h.amin(0)  # the paper's "Adv": a lower bound on the optimal width
    bounds = {name: rule(z) for name, rule in rules.items()}
    box_width = bounds["box"][1] - bounds["box"][0]
    rows = [Row(sigma, "adv", float(adv.mean()), float(adv.median()), float(adv.mean() /
                box_width.mean()), 1.0, 0.0, 1.0, 0)]
    for name, (lo, hi) in bounds.items():
        width = hi - lo
        has = ~(lo.isnan() | hi.isnan())
        tol = 1e-9 * (1 + h.abs())
        inside = ((h >= lo - tol) & (h <= hi + tol))[:, has]
        rows.append(Row(sigma, name, float(width.mean()), float(width.median()),
                        float(width.mean() / box_width.mean()),
                        float((width < box_width).double().mean()),
                        float((width - adv).mean()),
                        float(inside.double().mean()) if bool(has.any()) else math.nan,
                        int((~has).sum())))
    return rows


# ---- output ---------------------------------------------------------------------------------

def table(rows: list[Row], args: argparse.Namespace) -> Table:
    """The rows as a rich table, one section per σ_ε."""
    t = Table(title=f"Entropy bounds on random zonotopes (ACE App. H.6.1): {args.classes} "
                    f"classes, {args.errors} error terms, {args.trials} trials per σ_ε")
    for col in ("σ_ε", "transformer", "mean width", "median width", "÷ box", "< box",
                "width − adv", "sound"):
        t.add_column(col, justify="left" if col == "transformer" else "right", no_wrap=True)
    for r in rows:
        sound = "—" if r.transformer == "adv" or math.isnan(r.sound) else f"{100 * r.sound:.2f}%"
        if r.no_bounds:
            sound += f" (NaN in {r.no_bounds}/{args.trials})"
        style = "bold red" if r.sound < 1.0 or r.no_bounds else (
            "dim" if r.transformer == "adv" else None)
        t.add_row(f"{r.sigma:g}", r.transformer, f"{r.mean_width:.4g}", f"{r.median_width:.4g}",
                  f"{r.ratio_to_box:.3f}", f"{100 * r.tighter_than_box:.0f}%"
                  if r.transformer not in ("adv", "box") else "—",
                  f"{r.mean_excess:.4g}" if r.transformer != "adv" else "—", sound, style=style,
                  end_section=r.transformer == rows[-1].transformer)
    return t


def _strict(value: Any) -> Any:
    """NaN as ``null``, so that the JSON file is standard JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


def main() -> None:
    """Parse the arguments, run every σ_ε, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10, help="logits n (default 10)")
    parser.add_argument("--errors", type=int, default=10, help="error terms p (default 10)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS),
                        help="standard deviations σ_ε of the generators")
    parser.add_argument("--trials", type=int, default=50, help="zonotopes per σ_ε (paper: 50)")
    parser.add_argument("--samples", type=int, default=2000,
                        help="sampled points per zonotope (half corners)")
    parser.add_argument("--starts", type=int, default=64, help="starts of the attack")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the rows and settings as JSON")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rules = transformers(args.classes)
    start = time.perf_counter()
    rows = [r for sigma in args.sigmas for r in run_sigma(sigma, args, gen, rules)]
    elapsed = time.perf_counter() - start
    console = Console(width=max(Console().width, 110))
    console.print(table(rows, args))
    console.print("width = upper − lower of H(softmax(y)) (H ∈ [0, log n] = "
                  f"[0, {math.log(args.classes):.3f}]); adv = entropy range over sampled and "
                  "attacked points (a lower bound on the optimal width); sound = share of those "
                  f"entropies inside the bounds; {elapsed:.1f} s")
    if args.json is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "seconds": elapsed,
                                         "rows": [{k: _strict(v) for k, v in asdict(r).items()}
                                                  for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
