"""``split``: cut a canonical graph into a feature extractor and a classifier.

Certified training methods that treat the two parts of a network differently (TAPS bounds the
extractor by IBP and attacks the classifier, paper ``001`` Sec. 3; COLT attacks latent layers,
paper ``003`` Sec. 4) need the network as ``classifier(extractor(x))``. A node ``v`` is a **cut
point** when the part of the graph after ``v`` needs nothing computed from the input before ``v``
except ``v`` itself (constants, i.e. parameters and values computed from them only, may be read
on both sides). Inside a residual block the block's input is still read by the skip connection,
and inside parallel branches the other branch is still open, so no node there is a cut point.
The input itself and the output value are not cut points (one half would be empty).

``split(gm, relus=k)`` puts the last ``k`` ReLU layers into the classifier: it cuts at the
*input* of the ``k``-th ReLU from the end, so the extractor outputs that ReLU's pre-activation,
the embedding TAPS bounds by a box (its Fig. 2). ReLU layers are the ``relu`` and ``leaky_relu``
nodes (:data:`ACTIVATIONS`), counted as nodes: two ReLUs on parallel branches count twice.
``split(gm, at=name)`` cuts after the named node: an FX node name, or for an ONNX model the name
of an ONNX node (the cut is after the last core op it became). Both halves are GraphModules that
read the very parameters of ``gm`` (training either one trains the model) and carry the meta keys
that :func:`certfx.compile` reads, so each half can be compiled on its own.

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
    >>> torch.equal(classifier(extractor(x)), gm(x))
    True
    >>> extractor.get_parameter("m0_weight") is net[0].weight
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import fx

from certfx import ops
from certfx.errors import InvalidValueError
from certfx.passes.infra import clone_graph_module
from certfx.passes.mark_perturbed import PERTURBED_KEY
from certfx.passes.normalize import SOURCE_KEY, _where
from certfx.passes.shape_prop import DTYPE_KEY, SHAPE_KEY, shape_prop

__all__ = ["ACTIVATIONS", "CutPoint", "Split", "cut_points", "split"]

# The activations counted as ReLU layers (relus_after, split(relus=k)).
ACTIVATIONS = (ops.relu, ops.leaky_relu)


@dataclass(frozen=True)
class CutPoint:
    """A node where the graph can be cut.

    Attributes:
        node: the node's FX name (the extractor's output, the classifier's input).
        relus_after: ReLU (and leaky ReLU) nodes after it, i.e. in the classifier.
        shape: the per-example shape of its value.
        source: where it comes from (ONNX node name, or the user's source line), if recorded.
    """

    node: str
    relus_after: int
    shape: tuple[int, ...]
    source: str = ""

    def __str__(self) -> str:
        where = f", from {self.source}" if self.source else ""
        return f"{self.node} (shape {self.shape}, {self.relus_after} ReLU layer(s) after{where})"


class Split(NamedTuple):
    """The two halves, ``classifier(extractor(x)) == gm(x)``, and where they were cut."""

    extractor: fx.GraphModule
    classifier: fx.GraphModule
    cut: CutPoint


class _Scan(NamedTuple):
    nodes: list[fx.Node]  # live, input-dependent nodes in graph order (the input first)
    blockers: list[tuple[fx.Node, fx.Node] | None]  # per node: why it is no cut, or None
    output: fx.Node  # the output node


def _scan(gm: fx.GraphModule) -> _Scan:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    live: set[fx.Node] = set()  # what the output needs; dead code never blocks a cut
    stack = [output]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    dependent: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    nodes = [n for n in gm.graph.nodes if n in live and n in dependent and n is not output]
    position = {n: i for i, n in enumerate(nodes)}
    position[output] = len(nodes)
    # The dominance criterion. Cutting after v splits the graph order into a prefix ending at v
    # and a suffix. It is a valid cut iff no edge u -> w joins an input-dependent u != v of the
    # prefix to a w of the suffix: then every path from the input to the output passes through v
    # (v dominates the output), the extractor is what v depends on, and the suffix recomputes
    # gm(x) from v and constants alone. One sweep finds every cut: `reach` is the edge seen so
    # far (from nodes strictly before v) that reaches furthest ahead; v is blocked iff it ends
    # after v.
    blockers: list[tuple[fx.Node, fx.Node] | None] = []
    reach: tuple[fx.Node, fx.Node] | None = None
    for i, v in enumerate(nodes):
        blockers.append(reach if reach is not None and position[reach[1]] > i else None)
        for w in v.users:
            if w in position and (reach is None or position[w] > position[reach[1]]):
                reach = (v, w)
    return _Scan(nodes, blockers, output)


def _shapes(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[str, tuple[int, ...]]:
    """Per-example shapes: from ``shape_prop``'s meta, else by running ``shape_prop`` on a copy."""
    if any(SHAPE_KEY not in n.meta for n in nodes):
        copy = shape_prop(clone_graph_module(gm))
        return {old.name: tuple(new.meta[SHAPE_KEY]) for old, new
                in zip(gm.graph.nodes, copy.graph.nodes) if SHAPE_KEY in new.meta}
    return {n.name: tuple(n.meta[SHAPE_KEY]) for n in nodes}


def _source(n: fx.Node) -> str:
    return _where(n) if SOURCE_KEY in n.meta or "stack_trace" in n.meta else ""


def _cuts(gm: fx.GraphModule, scan: _Scan) -> list[CutPoint]:
    shapes = _shapes(gm, scan.nodes)
    final = scan.output.args[0]
    relus_after = sum(n.target in ACTIVATIONS for n in scan.nodes)
    points = []
    for v, blocker in zip(scan.nodes, scan.blockers):
        relus_after -= v.target in ACTIVATIONS
        if blocker is None and v.op != "placeholder" and v is not final:
            points.append(CutPoint(v.name, relus_after, shapes[v.name], _source(v)))
    return points


def cut_points(gm: fx.GraphModule) -> list[CutPoint]:
    """Every valid cut of ``gm`` in graph order (the module docstring says which are valid)."""
    return _cuts(gm, _scan(gm))


def _why_not(scan: _Scan, v: fx.Node) -> str:
    if v.op == "placeholder":
        return "it is the network's input, so the extractor would be empty"
    if v is scan.output.args[0] or v.op == "output":
        return "it is the network's output, so the classifier would be empty"
    if v not in scan.nodes:
        return "it is a constant, or the output does not use it"
    blocker = scan.blockers[scan.nodes.index(v)]
    assert blocker is not None
    u, w = blocker
    return (f"the value of '{u.name}' (before it) is still used after it by '{w.name}' "
            "(a skip connection or a parallel branch passes it by)")


def _find(gm: fx.GraphModule, scan: _Scan, at: str) -> fx.Node | None:
    """The FX node named ``at``, else the last live node made from the ONNX node named ``at``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    if at in by_name:
        return by_name[at]
    from_onnx = [n for n in scan.nodes if f"ONNX node '{at}' (" in str(n.meta.get(SOURCE_KEY))]
    return from_onnx[-1] if from_onnx else None


def _subgraph(gm: fx.GraphModule, inputs: dict[fx.Node, str], result: fx.Node,
              name: str) -> fx.GraphModule:
    """The nodes ``result`` depends on, each node of ``inputs`` becoming a placeholder."""
    needed: set[fx.Node] = set()
    stack = [result]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            if n not in inputs:
                stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n, label in inputs.items():
        env[n] = graph.placeholder(label)
        env[n].meta.update({k: n.meta[k] for k in (SHAPE_KEY, DTYPE_KEY) if k in n.meta})
        env[n].meta[PERTURBED_KEY] = True
    for n in gm.graph.nodes:  # graph order is a topological order
        if n in needed and n not in inputs:
            if n.op == "placeholder":
                raise AssertionError(f"split: '{name}' reads the input past the cut")
            env[n] = graph.node_copy(n, lambda a: env[a])  # copies n.meta too
    out = graph.output(env[result])
    out.meta.update({k: result.meta[k] for k in (SHAPE_KEY, DTYPE_KEY, PERTURBED_KEY)
                     if k in result.meta})
    # With gm as root, get_attr targets are copied by reference: the parameters are shared.
    module = fx.GraphModule(gm, graph, class_name=name)
    module.graph.lint()
    module.meta.update(gm.meta)
    return module


def split(gm: fx.GraphModule, *, relus: int | None = None, at: str | None = None) -> Split:
    """Cut ``gm`` into ``(extractor, classifier, cut)`` (see the module docstring).

    Args:
        gm: a canonical graph (:func:`certfx.load`).
        relus: put the last ``relus`` ReLU layers into the classifier (cut at the input of the
            ``relus``-th ReLU from the end: the extractor outputs its pre-activation).
        at: cut after this node (FX node name, or ONNX node name for ONNX models).

    Raises:
        InvalidValueError: not exactly one of ``relus``/``at``; no such node; ``relus`` out of
            range; a node that is not a cut point. The message lists the valid cut points.
    """
    if (relus is None) == (at is None):
        raise InvalidValueError("split needs exactly one of relus=k (the number of ReLU layers "
                                "in the classifier) or at=NODE (cut after that node)")
    scan = _scan(gm)
    points = _cuts(gm, scan)
    listing = "valid cut points:\n  " + ("\n  ".join(map(str, points)) or "none")
    if relus is not None:
        acts = [n for n in scan.nodes if n.target in ACTIVATIONS]
        if not 1 <= relus <= len(acts):
            last = (f" (for a classifier without ReLU, use at='{acts[-1].name}')"
                    if acts and any(p.node == acts[-1].name for p in points) else "")
            raise InvalidValueError(f"split relus={relus}: the network has {len(acts)} ReLU "
                                    f"layer(s), choose 1..{len(acts)}{last}; {listing}")
        v = acts[-relus].args[0]
        assert isinstance(v, fx.Node)
        what = f"relus={relus}, at '{v.name}' (the input of ReLU '{acts[-relus].name}')"
    else:
        found = _find(gm, scan, str(at))
        if found is None:
            raise InvalidValueError(f"split at='{at}': the graph has no node of that name "
                                    f"(FX or ONNX node name); {listing}")
        v, what = found, f"at='{at}'" + (f" (node '{found.name}')" if found.name != at else "")
    cut = next((p for p in points if p.node == v.name), None)
    if cut is None:
        raise InvalidValueError(f"split cannot cut {what}: {_why_not(scan, v)}; {listing}")
    placeholder = scan.nodes[0]
    extractor = _subgraph(gm, {placeholder: placeholder.name}, v, "Extractor")
    extractor.meta["certfx.output_shape"] = cut.shape
    classifier = _subgraph(gm, {v: "z"}, scan.output.args[0], "Classifier")
    classifier.meta["certfx.input_shape"] = cut.shape
    return Split(extractor, classifier, cut)
