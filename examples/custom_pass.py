"""A custom compiler pass with the public API: merge consecutive linear layers.

Two affine layers with nothing in between, ``W2 (W1 x + b1) + b2``, compute the same function as
one layer ``(W2 W1) x + (W2 b1 + b2)``. Networks contain such pairs after low-rank
factorization (a bottleneck ``Linear(128, 16) → Linear(16, 128)``) or after exporting a model
with its activation removed. For the network's outputs merging changes nothing, but for interval
bounds it matters: interval arithmetic bounds ``W2 [l, u]`` through the intermediate box, which
loses the correlation between its entries, whereas the merged layer is bounded exactly,
``|W2 W1| r ≤ |W2| |W1| r`` (Gowal et al. 2018, Eq. 6). So the pass makes box bounds tighter.

The pass is a function ``GraphModule -> GraphModule`` decorated with ``@graph_pass``; it runs
through a :class:`certfx.passes.PassManager` (which lints and recompiles the graph after each
pass), followed by ``shape_prop`` and ``mark_perturbed`` to refresh the node metadata, and the
result compiles like any canonical graph. The merged weights are new constants: use the pass for
verifying a fixed network, not inside training (the generated module would no longer share the
original parameters).

Run: ``python examples/custom_pass.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import nn

import certfx
from certfx import ops
from certfx.passes import PassManager, graph_pass, mark_perturbed, shape_prop

MODELS = Path(__file__).resolve().parent / "models"


def _constant(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor of a ``get_attr`` node (``None`` for ``None``); raises for other nodes."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return getattr(gm, str(node.target))
    raise ValueError("not a constant")


@graph_pass("merge_linear")
def merge_linear(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ``linear(linear(x, W1, b1), W2, b2)`` by ``linear(x, W2 W1, W2 b1 + b2)`` when
    the inner layer has no other user and both layers' weights are constants."""
    graph = gm.graph
    merged = 0
    for outer in list(graph.nodes):
        if outer.op != "call_function" or outer.target is not ops.linear:
            continue
        inner = outer.args[0]
        if not (isinstance(inner, fx.Node) and inner.target is ops.linear
                and len(inner.users) == 1):
            continue
        x, w1_node, b1_node = (list(inner.args) + [None])[:3]
        _, w2_node, b2_node = (list(outer.args) + [None])[:3]
        try:
            w1, b1 = _constant(gm, w1_node), _constant(gm, b1_node)
            w2, b2 = _constant(gm, w2_node), _constant(gm, b2_node)
        except ValueError:
            continue  # weights computed in the graph: leave the pair alone
        with torch.no_grad():
            weight = w2 @ w1
            bias = (w2 @ b1 if b1 is not None else torch.zeros_like(weight[:, 0]))
            bias = bias + b2 if b2 is not None else bias
        name = f"{outer.name}_merged"
        gm.register_buffer(f"{name}_weight", weight.detach().clone())
        gm.register_buffer(f"{name}_bias", bias.detach().clone())
        with graph.inserting_before(outer):
            new = graph.call_function(ops.linear, (x, graph.get_attr(f"{name}_weight"),
                                                   graph.get_attr(f"{name}_bias")))
        new.meta.update(outer.meta)
        outer.replace_all_uses_with(new)
        graph.erase_node(outer)
        graph.erase_node(inner)
        merged += 1
    graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.meta["merge_linear.merged"] = gm.meta.get("merge_linear.merged", 0) + merged
    return gm


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if "." not in name and name not in used:
            delattr(gm, name)


def factorized_mlp(seed: int = 0) -> nn.Module:
    """An MNIST MLP whose middle layer is factorized into a rank-16 bottleneck."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(),
                         nn.Linear(128, 16), nn.Linear(16, 128),  # the low-rank pair
                         nn.ReLU(), nn.Linear(128, 10)).eval()


def main() -> int:
    x = torch.from_numpy(np.load(MODELS / "demo_inputs.npy"))
    net = factorized_mlp()
    original = certfx.load(net, x[:1])
    before = len(original.graph.nodes)

    rewritten = certfx.load(factorized_mlp(), x[:1])  # a second, independent canonical graph
    rewritten = PassManager([merge_linear, shape_prop, mark_perturbed]).run(rewritten)
    after = len(rewritten.graph.nodes)
    print(f"merge_linear: merged {rewritten.meta['merge_linear.merged']} linear pair(s); "
          f"graph nodes {before} -> {after}")
    print(rewritten.code.strip())

    with torch.no_grad():
        diff = float((original(x) - rewritten(x)).abs().max())
    print(f"max |original(x) - rewritten(x)| = {diff:.2e}  (same function)")

    eps = 0.01
    spec = certfx.LinfBall(eps, 0.0, 1.0)
    widths = []
    for label, gm in (("original", original), ("merged", rewritten)):
        cm = certfx.compile(gm, domain="box", input_spec=spec)
        with torch.no_grad():
            lo, hi = cm.certified_forward(x)
        widths.append(float((hi - lo).mean()))
        print(f"{label:>8}: mean width of the box bounds on the logits at eps={eps}: "
              f"{widths[-1]:.4f}")
    print(f"bounds are {widths[0] / widths[1]:.2f}x tighter after merge_linear")
    assert diff < 1e-4 and widths[1] <= widths[0] + 1e-6
    return 0


if __name__ == "__main__":
    sys.exit(main())
