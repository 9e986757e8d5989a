"""Zonotope (DeepZ) rules beyond affine maps and activations: max-pool, the product of two
zonotopes (ACE App. H.5), the softmax-entropy composite (ACE App. H.6) and ACE's selection node.

They register themselves on the ``deepz`` domain of :mod:`certfx.domains.zonotope`, which
imports this module before deriving its remaining rules.

Example:
    >>> import torch
    >>> from certfx.domains.zonotope import deepz_input
    >>> x = deepz_input(torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 1.0]]))
    >>> sq = deepz_product(x, x)    # x·x: H.5 keeps x² ≥ 0 on [−1, 1] (the box: [−1, 1])
    >>> [round(v, 4) for v in sq.lower.flatten().tolist()]
    [1.0, 0.0]
    >>> [round(v, 4) for v in sq.upper.flatten().tolist()]
    [4.0, 1.0]
    >>> h = entropy_bounds(deepz_input(torch.zeros(1, 3), torch.full((1, 3), 0.1)))
    >>> bool(h.lower <= math.log(3) <= h.upper)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.interval import (Interval, box_product, box_softmax_entropy, entropy_range,
                                     entropy_shift, selection_decision)
from certfx.domains.zonotope import DEEPZ, Zonotope, align, extend, relax

__all__ = ["deepz_max_pool", "deepz_product", "deepz_softmax_entropy", "entropy_bounds",
           "deepz_ace_select"]


# ---- max pooling ----------------------------------------------------------------------------

@DEEPZ.rule(ops.max_pool)
def deepz_max_pool(x: Zonotope, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool) -> Zonotope:
    """Max-pool: exact where one input dominates its window, a fresh box term otherwise.

    In a window with bounds ``[l_i, u_i]``, let ``i*`` maximize ``l_i``. If
    ``l_{i*} ≥ max_{j≠i*} u_j`` then ``max_j x_j = x_{i*}`` for every point: the output is
    ``x_{i*}``'s affine form, shared terms included. Otherwise the output is bounded by the box
    ``[max_j l_j, max_j u_j]`` as a new error term (a sound relaxation that drops correlations).
    """
    args = (kernel_size, stride, padding, dilation)
    out_size = ops.max_pool(x.center, *args, ceil_mode).shape[2:]
    lower_w = ops.pool_windows(x.lower, *args, out_size, -math.inf)
    upper_w = ops.pool_windows(x.upper, *args, out_size, -math.inf)
    low, arg = lower_w.max(-1)
    high = upper_w.amax(-1)
    others = upper_w.scatter(-1, arg.unsqueeze(-1), -math.inf).amax(-1)
    exact = low >= others
    # Flat spatial position of i* in each window, to gather the centre and generators there.
    b, e, c = x.generators.shape[:3]
    spatial = x.center.shape[2:]
    index = torch.arange(math.prod(spatial), device=x.center.device).view(1, 1, *spatial)
    pos = ops.pool_windows(index, *args, out_size, 0).expand(b, c, *out_size, -1)
    pos = pos.gather(-1, arg.unsqueeze(-1)).flatten(2)  # (b, c, n_out)
    at = x.center.flatten(2).gather(2, pos).view(b, c, *out_size)
    gens = x.generators.flatten(3).gather(3, pos.unsqueeze(1).expand(b, e, c, -1))
    gens = gens.view(b, e, c, *out_size)
    center = torch.where(exact, at, (low + high) / 2)
    gens = torch.where(exact.unsqueeze(1), gens, 0.0)
    radius = torch.where(exact, 0.0, (high - low) / 2)
    return extend(center, gens, x.blocks, radius, "max_pool", x.options)


# ---- product of two zonotopes (ACE App. H.5) -------------------------------------------------

def _product(x: Zonotope | Tensor, y: Zonotope | Tensor, x_bounds: Interval | None = None,
             y_bounds: Interval | None = None) -> Zonotope:
    """``x ⊙ y`` (ACE Eq. 23–30); ``x_bounds``/``y_bounds`` may tighten the interval fallback."""
    if not isinstance(x, Zonotope):
        x, y, x_bounds, y_bounds = y, x, y_bounds, x_bounds
    if not isinstance(y, Zonotope):  # a constant factor: affine
        per_error = y.unsqueeze(1) if y.dim() == x.center.dim() else y  # batch dim: skip E
        return Zonotope(x.center * y, x.generators * per_error, x.blocks, x.options)
    options = x.options
    blocks, (ga, gb) = align(x, y)
    if ga.shape[1] > options.product_max_terms:
        # ACE Eq. 28–30: the interval product of the concretizations as a fresh zonotope.
        box = box_product(x.concretize() if x_bounds is None else x_bounds,
                          y.concretize() if y_bounds is None else y_bounds)
        center = box.center
        return extend(center, center.new_zeros(center.shape[0], 0, *center.shape[1:]), (),
                      box.radius, "product", options)
    a0, b0 = x.center, y.center
    # Eq. 23: x·y = a0 b0 + (a0 B + b0 A) ε + εᵀ A Bᵀ ε.
    linear = a0.unsqueeze(1) * gb + b0.unsqueeze(1) * ga
    # Eq. 24–26: Σ_i a_i b_i ε_i² ∈ ½Σ a_i b_i ± ½Σ|a_i b_i| and the cross terms
    # Σ_{i<j} (a_i b_j + a_j b_i) ε_i ε_j ∈ ±Σ_{i<j} |a_i b_j + a_j b_i|. With the symmetric
    # S = A Bᵀ + B Aᵀ (S_ii = 2 a_i b_i): Σ_{i<j}|S_ij| = ½(Σ_ij |S_ij| − 2Σ_i|a_i b_i|).
    outer = ga.unsqueeze(2) * gb.unsqueeze(1)  # (batch, q, q, *shape)
    diag = ga * gb
    full = (outer + outer.transpose(1, 2)).abs().sum((1, 2))
    mid = diag.sum(1) / 2
    rad = full / 2 - diag.abs().sum(1) / 2  # Eq. 25
    # The quadratic part is also (Aε)(Bε) ∈ ±r_A r_B; the intersection of both is sound.
    cap = ga.abs().sum(1) * gb.abs().sum(1)
    low, high = torch.maximum(mid - rad, -cap), torch.minimum(mid + rad, cap)
    center, radius = a0 * b0 + (low + high) / 2, (high - low) / 2  # Eq. 27
    # Per neuron, keep the interval product (Eq. 30) where it is narrower. Sound: each neuron's
    # new term is its own, so the neurons' forms need no common value of it.
    box = box_product(x.concretize() if x_bounds is None else x_bounds,
                      y.concretize() if y_bounds is None else y_bounds)
    use_box = box.radius < linear.abs().sum(1) + radius
    return extend(torch.where(use_box, box.center, center),
                  torch.where(use_box.unsqueeze(1), 0.0, linear), blocks,
                  torch.where(use_box, box.radius, radius), "product", options)


@DEEPZ.rule(ops.product)
def deepz_product(x: Zonotope | Tensor, y: Zonotope | Tensor) -> Zonotope:
    """The Hadamard product of two zonotopes, ACE App. H.5: exact linear part, the quadratic
    part in one new term per neuron (Eq. 23–27), or per neuron the interval product (Eq. 30)
    where that is narrower; with more than ``product_max_terms`` error terms the interval
    product throughout (Eq. 28–30)."""
    return _product(x, y)


# ---- softmax entropy (ACE App. H.6) ----------------------------------------------------------

def _meet(z: Zonotope, box: Interval) -> Interval:
    """The intersection of ``z``'s concretization with other valid bounds ``box``."""
    return Interval(torch.maximum(z.lower, box.lower), torch.minimum(z.upper, box.upper))


@DEEPZ.rule(ops.softmax_entropy)
def deepz_softmax_entropy(x: Zonotope, within_range: bool = True) -> Zonotope:
    """The entropy of ``softmax(x)`` for logits ``(batch, n)`` as a ``(batch, 1)`` zonotope.

    ACE App. H.6 chains the transformers along Eq. 5 (paper 000)::

        s = x − c;  e = exp(s);  L = log Σ_i e_i;  p = exp(s − L);  H = c + L − Σ_j x_j p_j

    (``c`` = :func:`~certfx.domains.interval.entropy_shift`), adding ``3n + 1`` error terms.
    Every relaxation is computed on the intersection of the zonotope's concretization with the
    interval-arithmetic bound of the same quantity (a reduced product: both are valid bounds on
    the concrete values, so the transformers stay sound). In particular ``Σ_i e_i`` is bounded
    below by ``Σ_i e^{l_i − c} > 0``, so the logarithm always gets a positive interval, and
    ``s_j − L = log p_j ≤ 0`` caps the input of the second exp (so ``p_j ≤ 1``). With
    ``within_range`` the result is also met with ``[0, log n]`` where it overshoots (those
    examples get the met box as a fresh term); ``False`` keeps the transformer's own zonotope
    (ACE H.6.1 compares the transformers that way).
    """
    box = x.concretize()
    c = entropy_shift(box)
    s = Zonotope(x.center - c, x.generators, x.blocks, x.options)
    s_box = Interval(box.lower - c, box.upper - c)
    e = relax(ops.exp, s, s_box)
    total = Zonotope(e.center.sum(1, keepdim=True), e.generators.sum(2, keepdim=True), e.blocks,
                     e.options)
    total_box = _meet(total, Interval(torch.exp(s_box.lower).sum(1, keepdim=True),
                                      torch.exp(s_box.upper).sum(1, keepdim=True)))
    lse = relax(ops.log, total, total_box)
    lse_box = _meet(lse, Interval(torch.log(total_box.lower), torch.log(total_box.upper)))
    blocks, (g_s, g_lse) = align(s, lse)
    t = Zonotope(s.center - lse.center, g_s - g_lse, blocks, x.options)
    t_box = _meet(t, Interval(s_box.lower - lse_box.upper,
                              (s_box.upper - lse_box.lower).clamp_max(0.0)))
    p = relax(ops.exp, t, t_box)
    p_box = _meet(p, Interval(torch.exp(t_box.lower), torch.exp(t_box.upper)))
    q = _product(x, p, box, p_box)
    blocks, (g_lse, g_q) = align(lse, q)
    center = c + lse.center - q.center.sum(1, keepdim=True)
    h = Zonotope(center, g_lse - g_q.sum(2, keepdim=True), blocks, x.options)
    if not within_range:
        return h
    # Every entropy of n outcomes lies in [0, log n]: where the chain overshoots, the met box
    # as a fresh term (per example; the others keep their affine form).
    met = entropy_range(h.concretize(), x.center.shape[1])
    over = (met.lower > h.lower) | (met.upper < h.upper)
    if not bool(over.any()):
        return h
    return extend(torch.where(over, met.center, h.center),
                  torch.where(over.unsqueeze(1), 0.0, h.generators), h.blocks,
                  torch.where(over, met.radius, 0.0), "entropy_range", x.options)


def entropy_bounds(x: Zonotope | Interval, within_range: bool = True) -> Zonotope | Interval:
    """Bounds on ``H(softmax(x))`` per example, ``(batch, 1)``: ACE's zonotope transformer for
    a :class:`Zonotope`, interval arithmetic for an :class:`Interval`; ``within_range``: met
    with ``[0, log n]``."""
    if isinstance(x, Interval):
        return box_softmax_entropy(x, within_range)
    return deepz_softmax_entropy(x, within_range)


# ---- ACE's selection node (paper 000, Eq. 2) -------------------------------------------------

def _constant_zonotope(v: Zonotope | Tensor, like: Zonotope) -> Zonotope:
    if isinstance(v, Zonotope):
        return v
    center = torch.as_tensor(v).expand_as(like.center)
    return Zonotope(center, center.new_zeros(center.shape[0], 0, *center.shape[1:]), (),
                    like.options)


@DEEPZ.rule(ops.ace_select)
def deepz_ace_select(score: Zonotope | Tensor, chosen: Zonotope | Tensor,
                     other: Zonotope | Tensor, threshold: float) -> Zonotope:
    """``chosen`` where ``score > T``, ``other`` elsewhere (paper 000, Eq. 2; Sec. 4.2).

    Per example: where the score's bounds decide the selection for every point of the set, the
    decided branch's affine form is the output's, its error terms shared (exact); where they do
    not, either branch may answer, and the output is the box hull of both branches'
    concretizations as fresh terms (sound, drops correlations).
    """
    like = next(v for v in (chosen, other, score) if isinstance(v, Zonotope))
    c, o = _constant_zonotope(chosen, like), _constant_zonotope(other, like)
    score_bounds = score.concretize() if isinstance(score, Zonotope) else score
    d = selection_decision(score_bounds, threshold, c.center.dim())
    blocks, (g_c, g_o) = align(c, o)
    lower = torch.minimum(c.lower, o.lower)
    upper = torch.maximum(c.upper, o.upper)
    center = torch.where(d.selected, c.center,
                         torch.where(d.rejected, o.center, (lower + upper) / 2))
    gens = torch.where(d.selected.unsqueeze(1), g_c,
                       torch.where(d.rejected.unsqueeze(1), g_o, 0.0))
    radius = torch.where(d.undecided, (upper - lower) / 2, 0.0)
    return extend(center, gens, blocks, radius, "ace_select", like.options)
