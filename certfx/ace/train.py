"""Training ACE's selection (paper 000, Sec. 4.1): selection labels and the selection network.

* :func:`selection_labels` — Eq. 3: ``y_s = cert(B_ε(x), h_b, y)``, 1 where the certification
  network is correct and certified on the ball by the chosen domain (or, as in App. F's
  comparison, where it resists PGD: ``by="adversarial"``);
* :func:`selection_network` — the paper's default selection network (Sec. 4.1.1): the
  certification network's features (frozen, a copy: training it leaves the certification
  network untouched) followed by a trainable linear layer with two outputs (reject, select);
* :func:`train_selection` — trains it as a binary classification task on ``(x, y_s)`` with any
  method of :mod:`certfx.train` (IBP by default, the paper's choice; COLT, SABR, … work too),
  so the selection is itself certifiably robust. The composed score is ``select − reject``.

Example:
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> cert = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                            torch.nn.Linear(8, 3))
    >>> x, y = torch.rand(64, 1, 2, 2), torch.randint(0, 3, (64,))
    >>> ys = selection_labels(cert, x, y, eps=0.01, domain="box")
    >>> ys.dtype, ys.shape
    (torch.int64, torch.Size([64]))
    >>> sel = train_selection(cert, x, ys, eps=0.01, epochs=1, batch_size=32)
    >>> sel(x).shape
    torch.Size([64, 2])
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn

from certfx.errors import InvalidValueError

__all__ = ["selection_labels", "selection_network", "train_selection", "LABEL_SOURCES"]

LABEL_SOURCES = ("certified", "adversarial", "natural")


def selection_labels(cert: Any, x: Tensor, y: Tensor, eps: float, domain: str = "box",
                     by: str = "certified", batch_size: int = 256,
                     valid: tuple[float, float] = (0.0, 1.0), pgd_steps: int = 20) -> Tensor:
    """``y_s`` (Eq. 3) per example, as ``int64`` 0/1.

    Args:
        cert: the certification network (module, ONNX path or canonical graph).
        by: ``"certified"`` (Eq. 3, with ``domain``), ``"adversarial"`` (correct and not broken
            by PGD, App. F's surrogate) or ``"natural"`` (correct).
    """
    import certfx
    from certfx.specs import LinfBall
    from certfx.verify import PGDConfig, pgd_ball

    if by not in LABEL_SOURCES:
        raise InvalidValueError(f"by must be one of {', '.join(LABEL_SOURCES)}, got {by!r}")
    gm = certfx.load(cert, x[:1])
    cm = certfx.compile(gm, domain, input_spec=LinfBall(eps, *valid)) if by == "certified" \
        else None
    labels = []
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad():
            ok = gm(xb).argmax(1) == yb
            if cm is not None:
                ok &= (cm.certified_forward(xb, yb) > 1e-5).all(1)
        if by == "adversarial" and eps > 0:
            ok &= ~pgd_ball(gm, xb, yb, eps, config=PGDConfig(steps=pgd_steps, restarts=1),
                            lower=valid[0], upper=valid[1]).found.to(ok.device)
        labels.append(ok.long())
    return torch.cat(labels)


def selection_network(cert: Any, example_input: Tensor, at: str | None = None) -> fx.GraphModule:
    """A canonical graph: a frozen copy of ``cert``'s features (the input of its last linear
    layer, or the node ``at``), flattened, then a trainable ``Linear(features, 2)``."""
    import certfx
    from certfx import ops
    from certfx.passes.insert_ace import _Composer, feature_node
    from certfx.passes.mark_perturbed import mark_perturbed
    from certfx.passes.shape_prop import SHAPE_KEY, shape_prop

    gm = copy.deepcopy(certfx.load(cert, example_input))
    for p in gm.parameters():
        p.requires_grad_(False)
    node = feature_node(gm, at)
    # Make the feature node the copy's output, so that inlining stops there.
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (node,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    c = _Composer()
    feat, _ = c.inline(gm, "features")
    shape = tuple(gm.meta["certfx.input_shape"]) if node.op == "placeholder" else \
        tuple(node.meta[SHAPE_KEY])
    width = 1
    for d in shape:
        width *= int(d)
    if len(shape) != 1:
        feat = c.graph.call_function(ops.reshape, (feat, (width,)))
    c.root.add_module("head", nn.Linear(width, 2))
    logits = c.graph.call_function(ops.linear, (feat, c.parameter_node("head.weight"),
                                                c.parameter_node("head.bias")))
    c.graph.output(logits)
    sel = fx.GraphModule(c.root, c.graph, class_name="SelectionNet")
    sel.meta.update({"certfx.input_shape": tuple(gm.meta["certfx.input_shape"]),
                     "certfx.output_shape": (2,)})
    return mark_perturbed(shape_prop(sel))


def train_selection(cert: Any, x: Tensor, labels: Tensor, eps: float, method: str = "ibp",
                    epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
                    at: str | None = None, network: nn.Module | None = None, seed: int = 0,
                    device: str = "cpu", callback: Any = None) -> nn.Module:
    """Train a selection network on ``(x, labels)`` (Sec. 4.1.1) with ``method`` of
    :mod:`certfx.train` at radius ``eps``; returns it (two outputs: reject, select).

    ``network`` replaces the default head-on-features network (any ``nn.Module`` with two
    outputs). Methods that re-initialize weights (IBP's Shi initialization) keep PyTorch's
    default here, so the frozen features stay the certification network's.
    """
    from certfx.train import Trainer, TrainConfig, get_method

    if labels.shape[0] != x.shape[0]:
        raise InvalidValueError(f"{x.shape[0]} inputs but {labels.shape[0]} selection labels")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise InvalidValueError("selection labels must be 0 (core) or 1 (certification)")
    model = network if network is not None else selection_network(cert, x[:1], at)
    options_cls = get_method(method).Options
    names = {f for f in options_cls.__dataclass_fields__}
    options = options_cls(init="default") if "init" in names else None
    config = TrainConfig(method=method, options=options, eps=eps, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed)
    Trainer(model, x, labels, config, device=device, callback=callback).fit()
    return model.eval()
