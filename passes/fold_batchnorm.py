"""The ``fold_batchnorm`` pass: fold eval-mode batch norm into the preceding conv or linear.

``BN(W x + b) = s ⊙ (W x + b − μ) + β`` with ``s = γ / sqrt(σ² + eps)``, so the pair is the single
affine layer with weight ``s ⊙ W`` (scaled per output channel) and bias ``s ⊙ (b − μ) + β``.
The fold creates new constants, so it only applies where the conv/linear weight and the batch
norm parameters are frozen (``requires_grad=False``, as for ONNX models): a trainable model keeps
``batch_norm`` as an affine op, so gradients still reach its parameters. A batch norm with no
foldable producer stays as the affine ``batch_norm`` op, which every domain handles.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    >>> for p in net.parameters(): _ = p.requires_grad_(False)
    >>> from certfx.frontends import load
    >>> gm = load(net, torch.zeros(1, 1, 5, 5))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['conv']
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from certfx import ops
from certfx.passes.infra import graph_pass

__all__ = ["fold_batchnorm"]


def _const(gm: fx.GraphModule, arg: object) -> Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return getattr(gm, str(arg.target))
    return None


def _frozen(*tensors: Tensor | None) -> bool:
    return all(t is None or not t.requires_grad for t in tensors)


@graph_pass("fold_batchnorm")
def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every foldable ``batch_norm`` into its producer (see module docstring)."""
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not ops.batch_norm:
            continue
        producer = bn.args[0]
        if (not isinstance(producer, fx.Node) or producer.target not in (ops.conv, ops.linear)
                or len(producer.users) != 1):
            continue
        mean, var, gamma, beta = (_const(gm, a) for a in bn.args[1:5])
        weight, bias = _const(gm, producer.args[1]), _const(gm, producer.args[2])
        if mean is None or var is None or weight is None:
            continue
        if not _frozen(gamma, beta, weight, bias):
            continue
        eps = float(bn.args[5])
        with torch.no_grad():
            scale = torch.rsqrt(var + eps) * (gamma if gamma is not None else 1.0)
            new_w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
            old_b = bias if bias is not None else torch.zeros_like(mean)
            new_b = (old_b - mean) * scale + (beta if beta is not None else 0.0)
        base = str(producer.name)
        w_name, b_name = _fresh(gm, f"{base}_folded_weight"), _fresh(gm, f"{base}_folded_bias")
        gm.register_buffer(w_name, new_w)
        gm.register_buffer(b_name, new_b)
        with gm.graph.inserting_before(producer):
            w_node, b_node = gm.graph.get_attr(w_name), gm.graph.get_attr(b_name)
        producer.args = (producer.args[0], w_node, b_node, *producer.args[3:])
        bn.replace_all_uses_with(producer)
        gm.graph.erase_node(bn)
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm


def _fresh(gm: fx.GraphModule, name: str) -> str:
    candidate, k = name, 1
    while hasattr(gm, candidate):
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        if name not in used:
            delattr(gm, name)
    for name in list(gm._parameters):
        if name not in used:
            delattr(gm, name)
