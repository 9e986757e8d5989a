"""End-to-end certification of ACE models (paper 000, Sec. 4.2) and their accuracies for any
threshold.

For one composed graph (:func:`certfx.passes.insert_ace`) and a test set, :func:`collect` records
per example everything that does not depend on the threshold ``T``:

* the selection score on the clean input, ``s(x)``, and sound bounds ``[s_l, s_u]`` on it over
  the ε-ball, from a domain (box or DeepZ for the entropy, any domain for a selection network);
* each branch's clean prediction, whether PGD (with restarts, re-checked concretely) breaks it,
  and whether the certification network is certified (the core network only when asked: the
  paper assumes its certification fails).

With ``g(x) = 1[s(x) > t]`` (``t = T`` for a selection network, ``t = −T`` for the entropy, whose
score is ``−H``), :meth:`AceRecords.at` then derives, without re-running anything (Sec. 4.2's
last paragraph):

1. the branch that answers on ``x``: the certification network iff ``s(x) > t``;
2. the *reachable* branches over the ball: the certification network unless ``s_u ≤ t``, the
   core network unless ``s_l > t`` — the selection is certified when only one is reachable;
3. **certified**: correct on ``x`` and certified for every reachable branch (so with the core
   never certified: selected, selection certified, certification network certified);
4. **adversarial** (App. E, the conservative variant the issue asks for: every branch not proven
   unreachable is attacked): correct on ``x`` and no reachable branch broken by its own attack;
5. **natural**: the answering branch is correct.

Example:
    >>> import torch
    >>> from certfx.passes import Entropy, insert_ace
    >>> torch.manual_seed(0) is not None
    True
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> ace = insert_ace(net, net, Entropy(1.0), example_input=torch.zeros(1, 4))
    >>> x, y = torch.rand(20, 4), torch.randint(0, 3, (20,))
    >>> rec = collect(ace, x, y, eps=0.01, domain="deepz", pgd_steps=5, pgd_restarts=1)
    >>> r = rec.at(1.0)
    >>> r.certified <= r.adversarial <= r.natural
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, fx

from certfx.errors import InvalidValueError

__all__ = ["AceRecords", "AceAccuracy", "collect", "SCORE_DOMAINS"]

# Domains that bound the entropy score (back-substitution has no relaxation of it).
SCORE_DOMAINS = {"entropy": ("box", "deepz"),
                 "selnet": ("box", "deepz", "deeppoly", "crown", "crown-ibp", "alpha-crown")}
# A margin counts as proven only above this (the cascade's float32 tolerance).
MARGIN_TOLERANCE = 1e-5


@dataclass(frozen=True)
class AceAccuracy:
    """Accuracies of the composed model at one threshold, in ``[0, 1]``."""

    threshold: float
    natural: float
    adversarial: float
    certified: float
    selected: float            # fraction answered by the certification network
    selection_certified: float  # fraction whose selection holds over the whole ball

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class AceRecords:
    """Per-example, threshold-independent results (see the module docstring); all ``(n,)``."""

    select: str
    eps: float
    domain: str
    score: Tensor
    score_lower: Tensor
    score_upper: Tensor
    cert_correct: Tensor
    core_correct: Tensor
    cert_robust: Tensor     # correct and not broken by PGD
    core_robust: Tensor
    cert_certified: Tensor
    core_certified: Tensor  # all False unless certify_core was asked

    def select_threshold(self, threshold: float) -> float:
        """``t`` of ``g(x) = 1[s(x) > t]`` for the user's threshold ``T``."""
        return -threshold if self.select == "entropy" else threshold

    def decide(self, threshold: float) -> dict[str, Tensor]:
        """Per example: ``answer_cert`` (the branch on ``x``), ``cert_reachable``,
        ``core_reachable``, ``natural``, ``adversarial``, ``certified`` (booleans)."""
        t = self.select_threshold(threshold)
        answer_cert = self.score > t
        cert_reachable = self.score_upper > t
        core_reachable = self.score_lower <= t
        natural = torch.where(answer_cert, self.cert_correct, self.core_correct)
        adversarial = natural & (~cert_reachable | self.cert_robust) & \
            (~core_reachable | self.core_robust)
        certified = natural & (~cert_reachable | self.cert_certified) & \
            (~core_reachable | self.core_certified)
        return {"answer_cert": answer_cert, "cert_reachable": cert_reachable,
                "core_reachable": core_reachable, "natural": natural,
                "adversarial": adversarial, "certified": certified}

    def at(self, threshold: float) -> AceAccuracy:
        """The composed model's accuracies at threshold ``T``."""
        d = self.decide(threshold)

        def mean(v: Tensor) -> float:
            return round(float(v.float().mean()), 4)

        return AceAccuracy(threshold, mean(d["natural"]), mean(d["adversarial"]),
                           mean(d["certified"]), mean(d["answer_cert"]),
                           mean(d["cert_reachable"] ^ d["core_reachable"]))

    def branch(self, name: str) -> dict[str, float]:
        """Accuracies of one network alone (``"cert"`` or ``"core"``)."""
        correct, robust, cert = (getattr(self, f"{name}_{k}") for k in
                                 ("correct", "robust", "certified"))
        return {"natural": round(float(correct.float().mean()), 4),
                "adversarial": round(float(robust.float().mean()), 4),
                "certified": round(float((cert & correct).float().mean()), 4)}

    def save(self, path: str) -> None:
        """Write the records (a ``torch.save`` of plain tensors) for later sweeps."""
        torch.save({k: v for k, v in vars(self).items()}, path)

    @staticmethod
    def load(path: str) -> AceRecords:
        """Read records written by :meth:`save` (``certfx ace certify --records``)."""
        from pathlib import Path

        if not Path(path).exists():
            raise InvalidValueError(f"records file '{path}' does not exist; write one with "
                                    "'certfx ace certify ... --records FILE'")
        try:
            data = torch.load(path, weights_only=True)
            return AceRecords(**data)
        except Exception as err:
            raise InvalidValueError(f"'{path}' is not a records file of 'certfx ace certify "
                                    f"--records' ({type(err).__name__}: {err})") from err


def collect(ace: fx.GraphModule, x: Tensor, y: Tensor, eps: float, domain: str = "deepz",
            score_domain: str | None = None, pgd_steps: int = 40, pgd_restarts: int = 1,
            certify_core: bool = False, valid: tuple[float, float] = (0.0, 1.0),
            batch_size: int = 128) -> AceRecords:
    """Certify and attack both branches and the selection of a composed graph (Sec. 4.2).

    Args:
        ace: a graph from :func:`~certfx.passes.insert_ace`.
        x, y: test inputs ``(n, *input_shape)`` and labels ``(n,)``.
        eps: the ℓ∞ radius (pixel space); the ball is clipped to ``valid``.
        domain: the domain certifying the classification networks.
        score_domain: the domain bounding the selection score (default: ``domain`` when it can
            bound the score, else ``deepz``).
        pgd_steps, pgd_restarts: the attack on each branch (the paper: 40 steps).
        certify_core: also try to certify the core network (the paper assumes it fails).
    """
    import certfx
    from certfx.passes.insert_ace import ace_parts, ace_subgraph
    from certfx.specs import LinfBall
    from certfx.verify import PGDConfig, pgd_ball

    info = ace_parts(ace)
    if not eps >= 0 or math.isinf(eps):
        raise InvalidValueError(f"eps must be a finite radius >= 0, got {eps}")
    if x.shape[0] != y.shape[0]:
        raise InvalidValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    allowed = SCORE_DOMAINS[info["select"]]
    score_domain = score_domain or (domain if domain in allowed else "deepz")
    if score_domain not in allowed:
        raise InvalidValueError(f"the {info['select']} selection score can be bounded by "
                                f"{', '.join(allowed)}, not {score_domain!r}")
    spec = LinfBall(eps, *valid)
    parts = {p: ace_subgraph(ace, p) for p in ("score", "cert", "core")}
    score_cm = certfx.compile(parts["score"], score_domain, input_spec=spec)
    cert_cm = certfx.compile(parts["cert"], domain, input_spec=spec)
    core_cm = certfx.compile(parts["core"], domain, input_spec=spec) if certify_core else None
    config = PGDConfig(steps=pgd_steps, restarts=pgd_restarts)
    out: dict[str, list[Tensor]] = {}

    def put(key: str, value: Tensor) -> None:
        out.setdefault(key, []).append(value.detach().cpu())

    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad():
            put("score", parts["score"](xb).reshape(-1))
            lo, hi = score_cm.certified_forward(xb)
            put("score_lower", lo.reshape(-1))
            put("score_upper", hi.reshape(-1))
        for name, cm in (("cert", cert_cm), ("core", core_cm)):
            net = parts[name]
            with torch.no_grad():
                correct = net(xb).argmax(1) == yb
            broken = pgd_ball(net, xb, yb, eps, config=config, lower=valid[0],
                              upper=valid[1]).found.to(correct.device) if eps > 0 else \
                torch.zeros_like(correct)
            put(f"{name}_correct", correct)
            put(f"{name}_robust", correct & ~broken)
            if cm is None:
                put(f"{name}_certified", torch.zeros_like(correct))
            else:
                with torch.no_grad():
                    margins = cm.certified_forward(xb, yb)
                put(f"{name}_certified", correct & (margins > MARGIN_TOLERANCE).all(1))
    fields: dict[str, Any] = {k: torch.cat(v) for k, v in out.items()}
    return AceRecords(info["select"], float(eps), domain, **fields)
