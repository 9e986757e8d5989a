"""Hand-written backward rules for the commonest affine ops.

Each computes what the rule derived from the op traits (:mod:`certfx.domains.linear_backward`,
``vmap(vjp(linear_part))``) computes — ``A_in = Lᵀ A`` and ``b += ⟨A, f(0)⟩`` — without the
per-call cost of functorch's transforms (about 0.4 ms on a CPU, as much as a small layer), or
with per-example constants (the specification ops, ``concat``). The elementwise ones fall back
to the derived rule when broadcasting expands their input. ``tests/test_linear_rules.py``
checks each against the derived rule.

Example:
    >>> import torch
    >>> a = LinearBounds(torch.tensor([[[1.0, -2.0]]]), torch.zeros(1, 1))
    >>> out = back_linear(a, Var((1,)), torch.tensor([[3.0], [1.0]]), torch.tensor([1.0, 1.0]))
    >>> out.coef.tolist(), out.bias.tolist()     # (1·3 − 2·1) x + (1 − 2)
    ([[[1.0]]], [[-1.0]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from certfx import ops
from certfx.domains.base import Rule
from certfx.domains.linear import LinearBounds, Var
from certfx.domains.linear_backward import BACK, _derive_affine, _dot_const, _terms

__all__ = ["back_linear", "back_reshape", "back_add", "back_sub", "back_mul", "back_div",
           "back_neg", "back_batch_norm", "back_conv", "back_spec_linear", "back_apply_spec",
           "back_concat"]


@BACK.rule(ops.linear)
def back_linear(a: LinearBounds, x: Var, weight: Tensor, bias: Tensor | None = None
                ) -> LinearBounds:
    """``z = W x + b``: ``A_in = A W``, ``b += A b_W``."""
    out_bias = a.bias
    if bias is not None:  # over the last dim; summed over any leading dims of the node
        out_bias = out_bias + (a.coef @ bias).reshape(*a.coef.shape[:2], -1).sum(-1)
    return LinearBounds(torch.matmul(a.coef, weight), out_bias)


@BACK.rule(ops.reshape)
def back_reshape(a: LinearBounds, x: Var, shape: tuple[int, ...]) -> LinearBounds:
    """A reshape of the value is the same reshape of every row's coefficients."""
    return LinearBounds(a.coef.reshape(*a.coef.shape[:2], *x.shape), a.bias)


def _derived(op: Callable[..., Any]) -> Rule:
    rule = _derive_affine(op, ops.traits(op))
    assert rule is not None
    return rule


def _aligned(c: Any, coef: Tensor) -> Any:
    """A constant operand aligned with coefficients ``(B, R, *shape)``: one with a batch dim
    (as many dims as the batched value) gets a row dim after it."""
    if isinstance(c, Tensor) and c.dim() == coef.dim() - 1:
        return c.unsqueeze(1)
    return c


def _same_shape(a: LinearBounds, *xs: Any) -> bool:
    """Whether every ``Var`` has the op's output shape (no broadcasting expands it)."""
    out = tuple(a.coef.shape[2:])
    return all(tuple(x.shape) == out for x in xs if isinstance(x, Var))


def _const_term(a: LinearBounds, c: Any) -> Tensor:
    """``⟨A, c⟩`` for a constant operand ``c`` broadcast to the op's output."""
    if not isinstance(c, Tensor):
        return a.coef.flatten(2).sum(-1) * c
    return _dot_const(a.coef, c if c.dim() == a.coef.dim() - 1 else c.unsqueeze(0))


@BACK.rule(ops.add)
def back_add(a: LinearBounds, x: Any, y: Any) -> Any:
    """``x + y``: the coefficients go to each perturbed operand, a constant into the bias."""
    if not _same_shape(a, x, y):
        return _derived(ops.add)(a, x, y)
    if isinstance(x, Var) and isinstance(y, Var):
        return _terms(a.bias, [a.coef, a.coef])
    return LinearBounds(a.coef, a.bias + _const_term(a, y if isinstance(x, Var) else x))


@BACK.rule(ops.sub)
def back_sub(a: LinearBounds, x: Any, y: Any) -> Any:
    """``x − y``: ``A`` to ``x``, ``−A`` to ``y``; a constant operand into the bias."""
    if not _same_shape(a, x, y):
        return _derived(ops.sub)(a, x, y)
    if isinstance(x, Var) and isinstance(y, Var):
        return _terms(a.bias, [a.coef, -a.coef])
    if isinstance(x, Var):
        return LinearBounds(a.coef, a.bias - _const_term(a, y))
    return LinearBounds(-a.coef, a.bias + _const_term(a, x))


@BACK.rule(ops.mul)
def back_mul(a: LinearBounds, x: Var, c: Any) -> LinearBounds:
    """``x · c``: ``A_in = A · c``."""
    if not _same_shape(a, x):
        return _derived(ops.mul)(a, x, c)
    return LinearBounds(a.coef * _aligned(c, a.coef), a.bias)


@BACK.rule(ops.div)
def back_div(a: LinearBounds, x: Var, c: Any) -> LinearBounds:
    """``x / c``: ``A_in = A / c``."""
    if not _same_shape(a, x):
        return _derived(ops.div)(a, x, c)
    return LinearBounds(a.coef / _aligned(c, a.coef), a.bias)


@BACK.rule(ops.neg)
def back_neg(a: LinearBounds, x: Var) -> LinearBounds:
    """``−x``: ``A_in = −A``."""
    return LinearBounds(-a.coef, a.bias)


@BACK.rule(ops.batch_norm)
def back_batch_norm(a: LinearBounds, x: Var, mean: Tensor, var: Tensor,
                    weight: Tensor | None, bias: Tensor | None, eps: float) -> LinearBounds:
    """``s (x − μ) + β`` per channel with ``s = γ / sqrt(σ² + eps)``: ``A_in = A s`` and
    ``b += Σ_c (Σ_pixels A_c)(β − μ s)_c``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    coef = a.coef
    per_channel = coef.reshape(*coef.shape[:3], -1).sum(-1)  # (batch, R, C)
    view = (1, 1, -1) + (1,) * (coef.dim() - 3)
    return LinearBounds(coef * scale.reshape(view), a.bias + per_channel @ shift)


@BACK.rule(ops.conv)
def back_conv(a: LinearBounds, x: Var, weight: Tensor, bias: Tensor | None,
              stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
              groups: int) -> LinearBounds:
    """The transposed convolution ``Wᵀ A`` (what the derived rule computes too, without its
    wasted forward pass at the zero input), and ``b += Σ_c (Σ_pixels A_c) bias_c``."""
    coef = a.coef
    batch, rows = coef.shape[:2]
    grad_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
                  3: torch.nn.grad.conv3d_input}[weight.dim() - 2]
    flat = coef.reshape(batch * rows, *coef.shape[2:])
    new = grad_input((batch * rows, *x.shape), weight, flat, tuple(stride), tuple(padding),
                     tuple(dilation), groups)
    out_bias = a.bias
    if bias is not None:
        out_bias = out_bias + coef.flatten(3).sum(-1) @ bias
    return LinearBounds(new.reshape(batch, rows, *x.shape), out_bias)


def _apply_spec_rows(coef: Tensor, spec: Tensor | None) -> Tensor:
    """Rows over the specified quantities ``C z`` → rows over ``z``: ``A C``."""
    return coef if spec is None else torch.matmul(coef, spec)


@BACK.rule(ops.spec_linear)
def back_spec_linear(a: LinearBounds, x: Var, weight: Tensor, bias: Tensor | None,
                     spec: Tensor | None) -> LinearBounds:
    """``q = C (W x + b)``: rows ``A`` over ``q`` become ``(A C) W`` over ``x`` with bias
    ``(A C) b``. Starting the backward pass with ``A = I`` here is the specification entering
    as the initial coefficients, the tight way (no bounds on the logits are formed)."""
    over_logits = _apply_spec_rows(a.coef, spec)  # (batch, R, K)
    out_bias = a.bias if bias is None else a.bias + over_logits @ bias
    return LinearBounds(over_logits @ weight, out_bias)


@BACK.rule(ops.apply_spec)
def back_apply_spec(a: LinearBounds, x: Var, spec: Tensor | None) -> LinearBounds:
    """``q = C vec(x)``: rows ``A C`` over ``x`` (reshaped to its shape)."""
    coef = _apply_spec_rows(a.coef, spec)
    return LinearBounds(coef.reshape(*coef.shape[:2], *x.shape), a.bias)


@BACK.rule(ops.concat)
def back_concat(a: LinearBounds, xs: list[Any], dim: int) -> Any:
    """Split the coefficients along ``dim``; constant pieces go into the bias."""
    sizes = [x.shape[dim - 1] if isinstance(x, Var) else x.shape[dim] for x in xs]
    pieces = a.coef.split(sizes, dim=dim + 1)  # coefficient dims: (batch, R, *node_shape)
    bias = a.bias
    coefs = []
    for piece, x in zip(pieces, xs):
        if isinstance(x, Var):
            coefs.append(piece)
        else:
            bias = bias + _dot_const(piece, x)
    return _terms(bias, coefs)
