"""``split``: cut a canonical graph into a feature extractor and a classifier.

Certified training methods that treat the two parts of a network differently (TAPS bounds the
extractor and attacks the classifier, paper ``001`` Sec. 3; COLT attacks latent layers, paper
``003`` Sec. 4) need the network as ``classifier(extractor(x))``. A node ``v`` is a **cut point**
when the part of the graph after ``v`` needs nothing computed from the input before ``v`` except
``v`` itself: for every input-dependent node ``u`` at or before ``v`` that a node after ``v``
reads, ``u = v``. Constants (parameters, folded values) may be read on both sides. Inside a
residual block the block's input is still read by the skip connection, so no node there is a cut.

``split(gm, relus=k)`` puts the last ``k`` ReLU layers into the classifier: it cuts at the input
of the ``k``-th ReLU from the end, so the extractor outputs that ReLU's pre-activation — the
embedding TAPS bounds by a box (its Fig. 2). ``split(gm, at=name)`` cuts after the named node.
Both halves are GraphModules reading the very parameters of ``gm`` (training one trains the
model) and carry the meta keys that :func:`certfx.compile` reads, so each can be compiled.

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
    ...                           torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> gm = certfx.load(net, torch.zeros(1, 4))
    >>> [(c.node, c.relus_after) for c in cut_points(gm)]
    [('linear', 2), ('relu', 1), ('linear_1', 1), ('relu_1', 0)]
    >>> extractor, classifier, cut = split(gm, relus=1)
    >>> cut.node, cut.shape
    ('linear_1', (8,))
    >>> x = torch.rand(5, 4)
    >>> torch.allclose(classifier(extractor(x)), net(x))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import fx

from certfx import ops
from certfx.errors import CertfxError

__all__ = ["CutPoint", "Split", "cut_points", "split"]

ACTIVATIONS = (ops.relu, ops.leaky_relu)
_META = ("certfx.shape", "certfx.dtype", "certfx.perturbed")


@dataclass(frozen=True)
class CutPoint:
    """A node where the graph can be cut.

    Attributes:
        node: the node's name (the extractor's output, the classifier's input).
        relus_after: ReLU (and leaky ReLU) layers after it, i.e. in the classifier.
        shape: the per-example shape of its value.
        source: where it comes from in the user's model, when the frontend recorded it.
    """

    node: str
    relus_after: int
    shape: tuple[int, ...]
    source: str = ""

    def __str__(self) -> str:
        return f"{self.node} (shape {self.shape}, {self.relus_after} ReLU layer(s) after)"


class Split(NamedTuple):
    """The two halves and where they were cut."""

    extractor: fx.GraphModule
    classifier: fx.GraphModule
    cut: CutPoint


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    dependent: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    return dependent


def _computations(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _blocker(gm: fx.GraphModule, v: fx.Node, dependent: set[fx.Node]) -> tuple[fx.Node,
                                                                               fx.Node] | None:
    """An input-dependent node ``u ≠ v`` at or before ``v`` read after ``v``, with its reader."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for u in gm.graph.nodes:
        if order[u] > order[v]:
            break
        if u is v or u not in dependent:
            continue
        for user in u.users:
            if order[user] > order[v] and user.op != "output":
                return u, user
    return None


def cut_points(gm: fx.GraphModule) -> list[CutPoint]:
    """Every valid cut of ``gm`` in graph order (the module docstring says which are valid)."""
    dependent = _input_dependent(gm)
    nodes = _computations(gm)
    relu_positions = [i for i, n in enumerate(nodes) if n.target in ACTIVATIONS]
    last = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    out = []
    for i, v in enumerate(nodes):
        if v not in dependent or v is last or _blocker(gm, v, dependent) is not None:
            continue
        out.append(CutPoint(v.name, sum(p > i for p in relu_positions),
                            tuple(v.meta.get("certfx.shape", ())),
                            str(v.meta.get("certfx.source", ""))))
    return out


def _subgraph(gm: fx.GraphModule, inputs: dict[fx.Node, str], output: fx.Node,
              name: str) -> fx.GraphModule:
    """The nodes ``output`` depends on, with each node of ``inputs`` replaced by a placeholder."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def copy(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n in inputs:
            env[n] = graph.placeholder(inputs[n])
        else:
            for a in n.all_input_nodes:
                copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        env[n].meta.update({k: v for k, v in n.meta.items() if k in _META})
        return env[n]

    graph.output(copy(output))
    out = fx.GraphModule(gm, graph, class_name=name)
    out.graph.lint()
    return out


def split(gm: fx.GraphModule, *, relus: int | None = None, at: str | None = None) -> Split:
    """Cut ``gm`` into ``(extractor, classifier)`` (see the module docstring).

    Raises:
        CertfxError: not exactly one of ``relus``/``at``; no such node or ReLU count; a node
            that is not a cut point (the message lists the valid ones).
    """
    if (relus is None) == (at is None):
        raise CertfxError("split needs exactly one of relus=k (ReLU layers in the classifier) "
                          "or at=NODE")
    points = cut_points(gm)
    listing = "; ".join(map(str, points)) or "none"
    nodes = {n.name: n for n in gm.graph.nodes}
    if relus is not None:
        acts = [n for n in _computations(gm) if n.target in ACTIVATIONS]
        if not 1 <= relus <= len(acts):
            raise CertfxError(f"relus={relus}: the network has {len(acts)} ReLU layer(s); choose "
                              f"1..{len(acts)}. Valid cut points: {listing}")
        v = acts[-relus].args[0]
        why = f"the input of ReLU '{acts[-relus].name}' (relus={relus})"
    else:
        if at not in nodes:
            raise CertfxError(f"no node named '{at}'. Valid cut points: {listing}")
        v, why = nodes[at], f"node '{at}'"
    cut = next((p for p in points if p.node == v.name), None)
    if cut is None:
        blocker = _blocker(gm, v, _input_dependent(gm))
        reason = (f": '{blocker[0].name}' before it is still read by '{blocker[1].name}' after "
                  f"it (e.g. a residual connection)" if blocker else
                  " (it is the input, the output or input-independent)")
        raise CertfxError(f"cannot cut the network at {why}, '{v.name}'{reason}. Valid cut "
                          f"points: {listing}")
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    extractor = _subgraph(gm, {placeholder: placeholder.name}, v, "Extractor")
    classifier = _subgraph(gm, {v: "z"}, output, "Classifier")
    extractor.meta.update(gm.meta)
    extractor.meta["certfx.output_shape"] = cut.shape
    classifier.meta.update(gm.meta)
    classifier.meta["certfx.input_shape"] = cut.shape
    return Split(extractor, classifier, cut)
