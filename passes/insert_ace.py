"""``insert_ace``: compose a core network, a certification network and a selection mechanism
into one canonical graph (ACE, paper ``000``, Eq. 2).

The composed network computes, per example, ::

    y(x) = cert(x)  if g(x) = 1   else   core(x),        g(x) = 1[score(x) > T]

with the selection node :func:`certfx.ops.ace_select`, a core op that every domain (box, DeepZ,
back-substitution) and the MILP backend handle, so the composition can be compiled, verified and
exported like any other network. Two selection mechanisms (Sec. 4.1):

* :class:`SelectionNet` — a selection network's output (Sec. 4.1.1): by default a linear *head*
  on the certification network's features (the input of its last linear layer), or a separate
  network on ``x``. A network with two outputs is read as (reject, select) logits and its score
  is their difference; one output is the score itself.
* :class:`Entropy` — the entropy of ``softmax(cert(x))`` below ``T`` selects the certification
  network (Sec. 4.1.2). The graph computes ``score = −H`` against ``−T`` with the
  :func:`~certfx.ops.softmax_entropy` op, which the box and zonotope domains bound by ACE's
  App. H transformers (back-substitution has no relaxation for it).

All parameters are shared with the given networks: training the composed graph trains them.

Example:
    >>> import torch, certfx
    >>> torch.manual_seed(0) is not None
    True
    >>> core = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> cert = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.rand(6, 4)
    >>> ace = insert_ace(core, cert, Entropy(threshold=1.0), example_input=x[:1])
    >>> use_cert = torch.special.entr(cert(x).softmax(1)).sum(1, keepdim=True) < 1.0
    >>> torch.allclose(ace(x), torch.where(use_cert, cert(x), core(x)))
    True
    >>> ace.meta["certfx.ace"]["select"], ace.meta["certfx.ace"]["threshold"]
    ('entropy', 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from certfx import ops
from certfx.errors import InvalidValueError, ShapeError
from certfx.passes.mark_perturbed import mark_perturbed
from certfx.passes.shape_prop import SHAPE_KEY, shape_prop

__all__ = ["ACE_KEY", "Entropy", "SelectionNet", "insert_ace", "feature_node", "ace_parts",
           "ace_subgraph"]

# gm.meta[ACE_KEY]: how the graph was composed ({"select": "entropy"|"selnet", "threshold": T,
# "score": name of the score node, "cert": name of the certification output, "core": …}).
ACE_KEY = "certfx.ace"


@dataclass(frozen=True)
class Entropy:
    """Select the certification network where ``H(softmax(cert(x))) < threshold``."""

    threshold: float


@dataclass(frozen=True)
class SelectionNet:
    """Select the certification network where the selection score exceeds ``threshold``.

    Attributes:
        threshold: ``T`` of ``g(x) = 1[score(x) > T]``.
        network: a separate selection network on ``x`` (an ``nn.Module``, ONNX path or canonical
            graph) with one output (the score) or two (reject/select logits: the score is
            ``select − reject``); or ``None`` to use ``head``.
        head: a linear layer on the certification network's features (``None`` with no
            ``network``: a new ``nn.Linear(features, 2)``, the paper's default, Sec. 4.1.1).
        at: the certification network's node whose output are the features; default: the input
            of its last linear layer (:func:`feature_node`).
    """

    threshold: float
    network: Any = None
    head: nn.Linear | None = None
    at: str | None = None


def _canonical(model: Any, example_input: Tensor | None, role: str) -> fx.GraphModule:
    from certfx.frontends import load

    try:
        return load(model, example_input)
    except Exception as err:  # name the role: three models are loaded here
        raise type(err)(f"the {role} network: {err}") from err


def feature_node(gm: fx.GraphModule, at: str | None = None) -> fx.Node:
    """The node whose output are ``gm``'s features: ``at`` by name, or the input of the last
    ``linear`` layer.

    Raises:
        InvalidValueError: no such node, or no final linear layer to find the features by.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    if at is not None:
        if at not in nodes or nodes[at].op not in ("call_function", "placeholder"):
            valid = [n.name for n in gm.graph.nodes if n.op == "call_function"]
            raise InvalidValueError(f"the certification network has no node {at!r}; its nodes "
                                    f"are {', '.join(valid)}")
        return nodes[at]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    cur = out
    while isinstance(cur, fx.Node) and cur.op == "call_function":
        if cur.target is ops.linear:
            return cur.args[0]
        if not ops.traits(cur.target).shape_only:
            break
        cur = cur.args[0]
    raise InvalidValueError("the certification network does not end in a linear layer, so its "
                            "features cannot be found; pass SelectionNet(at=NODE) or a separate "
                            "selection network")


class _Composer:
    """Copies graphs into one, under attribute prefixes, sharing one input placeholder."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.x = self.graph.placeholder("x")

    def inline(self, gm: fx.GraphModule, prefix: str, stop: fx.Node | None = None
               ) -> tuple[fx.Node, dict[fx.Node, fx.Node]]:
        """Copy ``gm``'s nodes (up to its output, or up to ``stop``); returns the copy of the
        output value and the node map."""
        self.root.add_module(prefix, gm)
        env: dict[fx.Node, fx.Node] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = self.x
                continue
            if n.op == "output":
                value = n.args[0]
                if isinstance(value, (tuple, list)):
                    if len(value) != 1:
                        raise ShapeError(f"the {prefix} network has {len(value)} outputs; ACE "
                                         "composes networks with one")
                    value = value[0]
                return env[value], env
            new = self.graph.node_copy(n, lambda a: env[a])
            if n.op == "get_attr":
                new.target = f"{prefix}.{n.target}"
            env[n] = new
        raise ShapeError(f"the {prefix} network has no output")

    def constant(self, name: str, value: Tensor) -> fx.Node:
        self.root.register_buffer(name, value)
        return self.graph.get_attr(name)

    def parameter_node(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)


def insert_ace(core: Any, cert: Any, selection: Entropy | SelectionNet,
               example_input: Tensor | None = None) -> fx.GraphModule:
    """The canonical graph of ``select ? cert(x) : core(x)`` (paper 000, Eq. 2).

    Args:
        core: the core network (accurate; never certified unless asked), anything
            :func:`certfx.load` takes.
        cert: the certification network, same input and output shapes as ``core``.
        selection: :class:`Entropy` or :class:`SelectionNet`.
        example_input: one input batch, needed for ``nn.Module`` arguments.

    Raises:
        ShapeError: the networks disagree on the input or output shape, or the selection network
            has neither one nor two outputs.
        InvalidValueError: a non-finite threshold, or a feature node that does not exist.
    """
    if not isinstance(selection, (Entropy, SelectionNet)):
        raise InvalidValueError(f"selection must be Entropy(T) or SelectionNet(T, …), got "
                                f"{type(selection).__name__}")
    threshold = float(selection.threshold)
    if not torch.isfinite(torch.tensor(threshold)):
        raise InvalidValueError(f"the selection threshold must be finite, got {threshold}")
    core_gm = _canonical(core, example_input, "core")
    cert_gm = _canonical(cert, example_input, "certification")
    for what in ("input", "output"):
        a, b = (g.meta[f"certfx.{what}_shape"] for g in (core_gm, cert_gm))
        if tuple(a) != tuple(b):
            raise ShapeError(f"the core network's {what} shape {tuple(a)} differs from the "
                             f"certification network's {tuple(b)}; ACE composes networks on the "
                             "same inputs and labels")
    c = _Composer()
    core_out, _ = c.inline(core_gm, "core")
    cert_out, cert_env = c.inline(cert_gm, "cert")
    g = c.graph
    if isinstance(selection, Entropy):
        entropy = g.call_function(ops.softmax_entropy, (cert_out,))
        score = g.call_function(ops.neg, (entropy,))
        select_threshold, kind = -threshold, "entropy"
    else:
        score = _selection_score(c, cert_gm, cert_env, selection, example_input)
        select_threshold, kind = threshold, "selnet"
    out = g.call_function(ops.ace_select, (score, cert_out, core_out, select_threshold))
    g.output(out)
    gm = fx.GraphModule(c.root, g, class_name="ACE")
    gm.meta.update({"certfx.input_shape": tuple(core_gm.meta["certfx.input_shape"]),
                    "certfx.output_shape": tuple(core_gm.meta["certfx.output_shape"])})
    gm = mark_perturbed(shape_prop(gm))
    score_shape = tuple(score.meta[SHAPE_KEY])
    if score_shape != (1,):
        raise ShapeError(f"the selection score must be one number per example, got shape "
                         f"{score_shape}")
    gm.meta[ACE_KEY] = {"select": kind, "threshold": threshold, "score": score.name,
                        "cert": cert_out.name, "core": core_out.name}
    return gm


def _selection_score(c: _Composer, cert_gm: fx.GraphModule, cert_env: dict[fx.Node, fx.Node],
                     selection: SelectionNet, example_input: Tensor | None) -> fx.Node:
    """The score node of a :class:`SelectionNet`: a separate network's output, or a linear head
    on the certification network's features."""
    g = c.graph
    if selection.network is not None:
        sel_gm = _canonical(selection.network, example_input, "selection")
        out, _ = c.inline(sel_gm, "select")
        width = tuple(sel_gm.meta["certfx.output_shape"])
    else:
        feat_node = feature_node(cert_gm, selection.at)
        feat = cert_env.get(feat_node, c.x)
        shape = tuple(cert_gm.meta["certfx.input_shape"]) if feat_node.op == "placeholder" \
            else tuple(feat_node.meta[SHAPE_KEY])
        n_features = int(torch.tensor(shape).prod())
        if len(shape) != 1:
            feat = g.call_function(ops.reshape, (feat, (n_features,)))
        head = selection.head if selection.head is not None else nn.Linear(n_features, 2)
        if head.in_features != n_features:
            raise ShapeError(f"the selection head takes {head.in_features} features but the "
                             f"certification network's features at {feat_node.name} have "
                             f"{n_features}")
        c.root.add_module("select_head", head)
        bias = c.parameter_node("select_head.bias") if head.bias is not None else None
        out = g.call_function(ops.linear, (feat, c.parameter_node("select_head.weight"), bias))
        width = (head.out_features,)
    if width == (1,):
        return out
    if width == (2,):  # (reject, select) logits: score = select − reject
        diff = c.constant("select_margin", torch.tensor([[-1.0, 1.0]]))
        return g.call_function(ops.linear, (out, diff, None))
    raise ShapeError(f"a selection network needs one output (the score) or two (reject/select "
                     f"logits), this one has shape {width}")


def ace_parts(gm: fx.GraphModule) -> dict[str, Any]:
    """What :func:`insert_ace` recorded about a composed graph (raises for any other graph)."""
    info = gm.meta.get(ACE_KEY)
    if info is None:
        raise InvalidValueError("this graph was not composed by insert_ace (no ACE selection "
                                "node); build one with certfx.passes.insert_ace")
    return dict(info)


def ace_subgraph(gm: fx.GraphModule, part: str) -> fx.GraphModule:
    """The part ``"score"``, ``"cert"`` or ``"core"`` of a composed graph as a canonical graph of
    its own (sharing the parameters), e.g. to bound the selection score alone (Sec. 4.2, step 2).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
        >>> ace = insert_ace(net, net, Entropy(0.5), example_input=torch.zeros(1, 2))
        >>> score = ace_subgraph(ace, "score")
        >>> score.meta["certfx.output_shape"]
        (1,)
    """
    info = ace_parts(gm)
    if part not in ("score", "cert", "core"):
        raise InvalidValueError(f"part must be 'score', 'cert' or 'core', got {part!r}")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.name == info[part]:
            graph.output(env[n])
            break
    graph.eliminate_dead_code()
    sub = fx.GraphModule(gm, graph, class_name=f"ACE_{part}")
    for old in gm.graph.nodes:
        if old in env and env[old].graph is graph:
            env[old].meta.update(old.meta)
    sub.meta.update({"certfx.input_shape": tuple(gm.meta["certfx.input_shape"]),
                     "certfx.output_shape": tuple(env[next(
                         n for n in gm.graph.nodes if n.name == info[part])].meta[SHAPE_KEY])})
    return sub
