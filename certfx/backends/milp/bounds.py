"""Intermediate bounds for the MILP encoding: from any bound-propagation domain, and the options
of LP/MILP tightening (solver-agnostic; the solving callback is
:func:`certfx.backends.milp.ortools.tightener`).

The big-M constants of the encoding (Tjeng et al. 2019) are the bounds of each ReLU input: the
tighter they are, the fewer neurons are unstable (no binary needed) and the tighter the LP
relaxation that branch and bound starts from. The encoder's own bounds are interval bounds of
each node's affine expression over the variables' bounds; :func:`domain_bounds` adds those of
any domain (``box``, ``deepz``, ``deeppoly``, ``crown``, ``alpha-crown``, …), computed in float64
through :func:`certfx.report.layer_bounds`, and keeps their elementwise tightest.

Example:
    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> gm = certfx.load(net, torch.zeros(1, 2))
    >>> known, notes = domain_bounds(gm, -torch.ones(2), torch.ones(2), ("box", "crown"))
    >>> sorted(known), known["linear"][0].shape, notes
    (['linear'], torch.Size([3]), [])
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor

from certfx.errors import CertfxError, ShapeError
from certfx.specs import Box

__all__ = ["Tightening", "domain_bounds", "intersect_bounds", "widened"]


class Tightening(enum.Enum):
    """Layer-by-layer tightening of unstable ReLU inputs before they are encoded.

    * ``NONE``: domain and interval bounds only.
    * ``LP``: min/max of each unstable pre-activation over the LP relaxation of the layers
      encoded so far (Singh et al. 2019's "refinement via linear programming", as in COLT).
    * ``MILP``: the same over the MILP of the layers so far, using the solver's proven bound
      when its per-neuron time limit stops it (Tjeng et al. 2019, Sec. 4.1 "progressive").
    """

    NONE = "none"
    LP = "lp"
    MILP = "milp"


Bounds = dict[str, tuple[Tensor, Tensor]]


def intersect_bounds(a: Mapping[str, tuple[Tensor, Tensor]],
                     b: Mapping[str, tuple[Tensor, Tensor]]) -> Bounds:
    """The elementwise tightest of two sets of sound bounds, node by node."""
    out: Bounds = {k: (v[0], v[1]) for k, v in a.items()}
    for k, (lo, hi) in b.items():
        if k in out:
            lo0, hi0 = out[k]
            lo, hi = torch.maximum(lo0.reshape(lo.shape).to(lo), lo), torch.minimum(
                hi0.reshape(hi.shape).to(hi), hi)
        out[k] = (lo, hi)
    return out


def widened(known: tuple[Tensor | np.ndarray, Tensor | np.ndarray], size: int,
            name: str) -> tuple[np.ndarray, np.ndarray]:
    """Known bounds as flat float64 arrays, widened by ``sqrt(eps)·(1 + |b|)`` for the ``eps``
    of the dtype they were computed in (``1.5e-8`` for float64, ``3.5e-4`` for float32): a
    margin against the rounding of whoever computed them, far below any useful tightness."""
    out = []
    for value, sign in zip(known, (-1.0, 1.0)):
        t = torch.as_tensor(value)
        margin = math.sqrt(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0
        arr = t.detach().cpu().to(torch.float64).reshape(-1).numpy()
        if arr.size != size:
            raise ShapeError(f"known bounds of {name} have {arr.size} entries, the node has "
                             f"{size}")
        out.append(arr + sign * margin * (1.0 + np.abs(arr)))
    return out[0], out[1]


def domain_bounds(gm: fx.GraphModule, lower: Tensor, upper: Tensor,
                  domains: Sequence[str]) -> tuple[Bounds, list[str]]:
    """Bounds on the input of every ReLU-like node by each domain, intersected.

    Returns the bounds keyed by the activation input's node name (each shaped like one
    example, float64) and notes on the domains that could not run on this graph (they are
    skipped; every remaining bound is sound).
    """
    from certfx.report import layer_bounds

    found: Bounds = {}
    notes: list[str] = []
    if not domains:
        return found, notes
    gm64 = copy.deepcopy(gm).to(torch.float64)
    lo = torch.as_tensor(lower, dtype=torch.float64)
    hi = torch.as_tensor(upper, dtype=torch.float64)
    shape = gm.meta.get("certfx.input_shape", tuple(lo.shape))
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    for domain in domains:
        try:
            layers = layer_bounds(gm64, domain, Box(lo, hi), ((lo + hi) / 2)[None])
        except (CertfxError, KeyError, NotImplementedError, ValueError) as err:
            notes.append(f"domain {domain} skipped: {type(err).__name__}: {err}")
            continue
        found = intersect_bounds(found, {r.node: (r.lower[0], r.upper[0]) for r in layers})
    return found, notes
