"""Tightness reports: bounds per layer, unstable ReLUs, and domains side by side.

The bounds of an intermediate node are those the domain itself computes there for the whole
graph (for DeepPoly/CROWN the intermediate bounds its relaxations use, for forward domains the
element at that node; α-CROWN's are CROWN's); where a domain's module does not hold them by
name, those of the *prefix* graph that ends at the node, compiled for the same domain. A
ReLU-like neuron is *unstable* when its input's bounds straddle 0 (``lower < 0 < upper``): the
neurons a relaxation must over-approximate, and the usual measure of a domain's precision.

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> gm = certfx.load(net, torch.zeros(1, 3))
    >>> layers = layer_bounds(gm, "box", certfx.LinfBall(0.1), torch.rand(2, 3))
    >>> [(r.node, r.op, r.neurons) for r in layers]
    [('linear', 'relu', 4)]
    >>> 0 <= layers[0].unstable <= 8
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from rich.table import Table
from torch import Tensor

from certfx import ops
from certfx.compile import compile as compile_model
from certfx.domains.interval import Interval
from certfx.errors import CertfxError
from certfx.passes.expose import expose
from certfx.specs import InputSpec, Margin

__all__ = [
    "LayerBounds",
    "DomainReport",
    "layer_bounds",
    "compare_domains",
    "prefix_graph",
    "comparison_tables",
]

# Activations whose inputs are counted as stable/unstable (kink at 0).
_KINKED = (ops.relu, ops.leaky_relu)


@dataclass(frozen=True)
class LayerBounds:
    """Bounds on the input of one activation node, over a batch.

    Attributes:
        node: the name of the activation's input node.
        op: the activation (``relu``, …).
        neurons: neurons per example.
        lower, upper: the bounds, ``(batch, *shape)``.
        unstable: neurons with ``lower < 0 < upper``, summed over the batch.
    """

    node: str
    op: str
    neurons: int
    lower: Tensor
    upper: Tensor
    unstable: int


@dataclass(frozen=True)
class DomainReport:
    """One domain's results on a batch: logit bounds, margin bounds, unstable neurons, time."""

    domain: str
    lower: Tensor
    upper: Tensor
    margins: Tensor | None
    layers: list[LayerBounds]
    seconds: float

    @property
    def mean_width(self) -> float:
        """Mean width of the logit bounds."""
        return float((self.upper - self.lower).mean())

    @property
    def certified(self) -> int | None:
        """Inputs whose margin lower bounds are all positive (``None`` without labels)."""
        return None if self.margins is None else int((self.margins > 0).all(1).sum())


def prefix_graph(gm: fx.GraphModule, node_name: str) -> fx.GraphModule:
    """The canonical graph cut after ``node_name``: its output is that node's value."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    target = None
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        if n.op == "placeholder" and n.name == "spec":
            continue
        env[n] = graph.node_copy(n, env.__getitem__)
        if n.name == node_name:
            target = n
            break
    if target is None:
        raise KeyError(f"no node named {node_name!r} before the output")
    graph.output(env[target])
    graph.eliminate_dead_code()
    prefix = fx.GraphModule(gm, graph, class_name="PrefixGraph")
    prefix.meta.update(gm.meta)
    prefix.meta["certfx.output_shape"] = tuple(target.meta["certfx.shape"])
    return prefix


def _kinked_inputs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(activation, its input) for every ReLU-like node, in graph order."""
    return [(n, n.args[0]) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _KINKED and isinstance(n.args[0], fx.Node)]


def layer_bounds(gm: fx.GraphModule, domain: str, input_spec: InputSpec,
                 x: Tensor) -> list[LayerBounds]:
    """Bounds on the input of every ReLU-like node of a canonical graph, by ``domain``.

    The bounds are read off the domain's module for the whole graph (``expose``): the values
    it computes at those nodes anyway. Where a node's value is not there under its name (α-CROWN
    optimizes inside a submodule), the prefix graph ending at the node is compiled instead.
    """
    pairs = _kinked_inputs(gm)
    if not pairs:
        return []
    values = _exposed_values(gm, domain, input_spec, x, [pre.name for _, pre in pairs])
    reports = []
    with torch.no_grad():
        for k, (act, pre) in enumerate(pairs):
            bounds = values[k] if values is not None else compile_model(
                prefix_graph(gm, pre.name), domain=domain,
                input_spec=input_spec).certified_forward(x)
            lower, upper = bounds.lower, bounds.upper
            unstable = int(((lower < 0) & (upper > 0)).sum())
            neurons = int(lower[0].numel()) if lower.shape[0] else 0
            reports.append(LayerBounds(pre.name, act.target.__name__, neurons, lower, upper,
                                       unstable))
    return reports


def _exposed_values(gm: fx.GraphModule, domain: str, input_spec: InputSpec, x: Tensor,
                    names: list[str]) -> list[Interval] | None:
    """The interval bounds ``domain``'s module for ``gm`` computes at the nodes ``names``
    (zonotopes concretized), or ``None`` when its module does not hold them under those names."""
    cm = compile_model(gm, domain=domain, input_spec=input_spec)
    lo, hi = cm.input_bounds(x, None)
    # α-CROWN keeps CROWN's intermediate bounds in its ``intermediate`` submodule
    for candidate in (cm.bounds, getattr(cm.bounds, "intermediate", None)):
        if not isinstance(candidate, fx.GraphModule):
            continue
        try:
            module = expose(names)(candidate)
        except CertfxError:
            continue
        with torch.no_grad():
            _, values = module(lo, hi, **cm._ball_kwargs(x, None))
        intervals = [v.concretize() if hasattr(v, "concretize") else v for v in values]
        if all(isinstance(v, Interval) for v in intervals):
            return intervals
    return None


def compare_domains(gm: fx.GraphModule, domains: list[str], input_spec: InputSpec, x: Tensor,
                    y: Tensor | None = None, output_spec: Margin | None = None,
                    with_layers: bool = True) -> list[DomainReport]:
    """Run every domain on the batch ``x`` (and labels ``y``) and collect a report each."""
    results = []
    for domain in domains:
        cm = compile_model(gm, domain=domain, input_spec=input_spec, output_spec=output_spec)
        with torch.no_grad():
            start = time.perf_counter()
            logits = cm.certified_forward(x)
            margins = cm.certified_forward(x, y=y) if y is not None else None
            seconds = time.perf_counter() - start
        layers = layer_bounds(gm, domain, input_spec, x) if with_layers else []
        results.append(DomainReport(cm.domain, logits.lower, logits.upper, margins, layers,
                                    seconds))
    return results


# ---- rich tables for the command line -------------------------------------------------------

def comparison_tables(reports: list[DomainReport]) -> list[Table]:
    """Two tables: a summary per domain, and unstable neurons per layer, domains side by side."""
    summary = Table(title="domains compared on the same inputs", title_justify="left")
    for column in ("domain", "time", "mean logit width", "certified", "unstable (all layers)"):
        summary.add_column(column, justify="left" if column == "domain" else "right")
    for r in reports:
        certified = "-" if r.certified is None else f"{r.certified}/{r.lower.shape[0]}"
        summary.add_row(r.domain, f"{r.seconds * 1e3:.1f} ms", f"{r.mean_width:.4g}", certified,
                        str(sum(layer.unstable for layer in r.layers)))
    tables = [summary]
    if reports and reports[0].layers:
        per_layer = Table(title="unstable neurons per layer (summed over the inputs)",
                          title_justify="left")
        per_layer.add_column("layer (activation input)")
        per_layer.add_column("neurons", justify="right")
        for r in reports:
            per_layer.add_column(r.domain, justify="right")
        for k, layer in enumerate(reports[0].layers):
            per_layer.add_row(f"{layer.node} → {layer.op}", str(layer.neurons),
                              *[str(r.layers[k].unstable) for r in reports])
        tables.append(per_layer)
    return tables
