"""Back-substitution through convolutional chains with *patches*: local coefficients only.

The bounds of a neuron ``(c, h, w)`` of a convolutional layer depend, at every earlier layer, on
a window of that layer only — its receptive field. Dense coefficients (``linear_backward``)
store the whole layer for every neuron; for CNN7 that is 64·32·32 entries per neuron and layer,
nearly all zero. Here a row's coefficients at a node of shape ``(C, H, W)`` are a patch
``(C, K_h, K_w)`` anchored at the start neuron's position ``(h, w)``: it covers the node's
positions ``h·S − P … h·S − P + K − 1`` (per spatial dim), with the *cumulative* stride ``S``,
padding ``P`` and size ``K`` of the convolutions between the node and the start (the patches
mode of auto_LiRPA, Xu et al. 2020, "Automatic perturbation analysis for scalable certified
robustness and beyond", App. A; its code is not used here).

Backward through the ops of such a chain, per row (``A``: the patch, ``⋆ᵀ``: transposed conv):

* ``conv`` with weight ``W``, stride ``s``, padding ``p``, bias ``b``: ``A ← A ⋆ᵀ W`` (a
  ``conv_transpose2d`` of the patch, size ``(K − 1)s + k``), ``S ← S·s``, ``P ← P·s + p``, and
  the bias enters as ``Σ_c (Σ_{pos} A_c)·b_c``. Patch entries that fall on the padding of the
  layer below are zeroed (the padding is a constant 0, not a neuron).
* an activation with relaxation lines ``α_l z + β_l ≤ f(z) ≤ α_u z + β_u`` (maps over the
  layer): CROWN's sign split, with the maps cut to the patch (``unfold`` at the same
  ``K, S, P``).
* an elementwise affine op ``f(z) = f(0) + (f(1) − f(0))·z`` (batch norm, normalization):
  likewise, with slope ``f(1) − f(0)`` and offset ``f(0)``.

At the input the patch meets the box ``c ± r`` cut to the patch: ``⟨A, c⟩ − ⟨|A|, r⟩ + bias``.
The results equal the dense backward pass's (a test checks it); only memory and time change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from certfx.domains.base import expose_to_codegen
from certfx.domains.interval import Interval
from certfx.domains.relaxations import LinearRelaxation

__all__ = ["ConvStep", "ElementwiseStep", "patch_rows", "patch_size", "lin_fill"]

# A step of the chain, from the start node back to the input (plain tuples: they are printed
# into generated code):
#   ("conv", stride, padding, kernel, in_shape)  values: weight, bias (or None)
#   ("relax", in_shape)                  values: a LinearRelaxation on the node's input
#   ("affine", in_shape)                 values: f(0), f(1) over the node's shape
ConvStep = tuple[str, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int, int]]
ElementwiseStep = tuple[str, tuple[int, int, int]]


def lin_fill(like: Tensor, shape: tuple[int, ...], value: float) -> Tensor:
    """A ``(1, *shape)`` tensor of ``value`` in the dtype and on the device of ``like``."""
    return torch.full((1, *shape), value, dtype=like.dtype, device=like.device)


def _cut(maps: Tensor, size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
         grid: tuple[int, int], pos: Tensor) -> Tensor:
    """The patches of ``maps`` ``(N, C, H, W)`` (``N`` = 1 or the batch) at the anchors ``pos``
    ``(b, R)`` (flat positions in the start's ``grid``): ``(max(N, b), R, C, K_h, K_w)``; zero
    where a patch leaves the map."""
    n, c, h, w = maps.shape
    need_h = max(0, (grid[0] - 1) * stride[0] - padding[0] + size[0] - h)
    need_w = max(0, (grid[1] - 1) * stride[1] - padding[1] + size[1] - w)
    padded = F.pad(maps, (padding[1], need_w, padding[0], need_h))
    cols = F.unfold(padded, tuple(size), stride=tuple(stride))  # (N, C·K_h·K_w, L_h·L_w)
    lh = (padded.shape[2] - size[0]) // stride[0] + 1
    lw = (padded.shape[3] - size[1]) // stride[1] + 1
    cols = cols.reshape(n, -1, lh, lw)[:, :, :grid[0], :grid[1]].flatten(2).transpose(1, 2)
    b = max(n, pos.shape[0])
    index = pos.expand(b, -1).unsqueeze(-1).expand(-1, -1, cols.shape[2])
    picked = cols.expand(b, -1, -1).gather(1, index)
    return picked.reshape(b, pos.shape[1], c, *size)


def patch_rows(start: Tensor, shape: tuple[int, int, int], box: Interval,
               plan: tuple[Any, ...], *values: Any) -> Tensor:
    """The concretized rows ``(batch, 2c)`` of the unit rows ``[e_i; −e_i]`` of the neurons
    ``start`` (``(batch | 1, c)`` flat indices into ``shape``), pushed back through the chain
    ``plan`` (see the module docstring) to the input box."""
    channels, h0, w0 = shape
    grid = (h0, w0)
    channel, pos = start // (h0 * w0), start % (h0 * w0)
    eye = torch.zeros(*start.shape, channels, dtype=box.lower.dtype, device=box.lower.device)
    eye.scatter_(2, channel.unsqueeze(2), 1.0)
    coef = torch.cat([eye, -eye], 1)[..., None, None]  # (b, R, C, 1, 1)
    pos = torch.cat([pos, pos], 1)
    bias = coef.new_zeros(coef.shape[:2])
    size, stride, padding = (1, 1), (1, 1), (0, 0)
    remaining = list(values)
    for step in plan:
        if step[0] == "conv":
            _, s, p, _, in_shape = step
            weight, conv_bias = remaining.pop(0), remaining.pop(0)
            if conv_bias is not None:
                bias = bias + (coef.sum((-2, -1)) * conv_bias).sum(-1)
            b, rows = coef.shape[:2]
            flat = coef.reshape(b * rows, *coef.shape[2:])
            coef = F.conv_transpose2d(flat, weight, stride=s)
            size = tuple((k - 1) * si + kw for k, si, kw in zip(size, s, weight.shape[2:]))
            padding = tuple(pa * si + pi for pa, si, pi in zip(padding, s, p))
            stride = tuple(st * si for st, si in zip(stride, s))
            coef = coef.reshape(b, rows, *coef.shape[1:])
            inside = _cut(coef.new_ones(1, 1, *in_shape[1:]), size, stride, padding, grid, pos)
            coef = coef * inside
            continue
        if step[0] == "relax":
            r: LinearRelaxation = remaining.pop(0)
            lines = [getattr(r, f).squeeze(1) for f in
                     ("lower_slope", "lower_bias", "upper_slope", "upper_bias")]
        else:  # elementwise affine: slope f(1) − f(0), offset f(0)
            f0, f1 = remaining.pop(0), remaining.pop(0)
            lines = [f1 - f0, f0, f1 - f0, f0]
        in_shape = step[1]
        lines = [_cut(m.expand(m.shape[0], *in_shape), size, stride, padding, grid, pos)
                 for m in lines]
        positive = coef.clamp(min=0)
        negative = coef - positive
        bias = bias + (positive * lines[1] + negative * lines[3]).flatten(2).sum(-1)
        coef = positive * lines[0] + negative * lines[2]
    center, radius = box.center_radius()
    c = _cut(center, size, stride, padding, grid, pos)
    r = _cut(radius, size, stride, padding, grid, pos)
    value = (coef * c).flatten(2).sum(-1) - (coef.abs() * r).flatten(2).sum(-1)
    return value + bias


def patch_size(plan: tuple[Any, ...]) -> int:
    """The largest patch (entries per row) the chain forms: sets the rows per chunk."""
    size, largest = (1, 1), 1
    for step in plan:
        if step[0] == "conv":
            _, s, _, kernel, _ = step
            size = tuple((k - 1) * si + kw for k, si, kw in zip(size, s, kernel))
        largest = max(largest, math.prod(size) * step[-1][0])
    return largest


for _fn in (lin_fill, patch_rows):
    expose_to_codegen(_fn)
