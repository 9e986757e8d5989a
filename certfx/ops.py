"""The core op set of the canonical graph, with the traits that domains derive rules from.

Every ``call_function`` node of a canonical graph calls one of the functions below. All of them
take batch-first tensors: the first argument ``x`` is ``(batch, *sample_shape)`` and every shape,
dim or permutation argument refers to the *batched* tensor (dim 0 is the batch and is never
moved, sliced or reduced).

Traits (see :class:`OpTraits`) let a domain derive rules instead of writing them:

* ``monotone``: non-decreasing in every tensor argument (ReLU, max-pool, reshape, concat, …);
  an interval rule is then ``[f(lower), f(upper)]``.
* ``affine``: ``f(x) = L(x) + b`` in its perturbed argument(s). ``linear_part`` computes ``L``
  alone (constants dropped) and ``abs_linear_part`` computes ``|L|`` (coefficients replaced by
  their absolute values), which is what the centre/radius interval rule and zonotope generators
  need.
* ``shape_only``: moves or selects entries without arithmetic (reshape, permute, slice, concat).

Example:
    >>> import torch
    >>> from certfx import ops
    >>> ops.linear(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4)).shape
    torch.Size([2, 4])
    >>> ops.traits(ops.relu).monotone
    True
"""

from __future__ import annotations

import builtins
import math  # noqa: F401 - used by a doctest
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OpTraits",
    "CORE_OPS",
    "is_core_op",
    "abs_weight",
    "traits",
    "core_op",
    # affine
    "linear",
    "matmul",
    "conv",
    "batch_norm",
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "avg_pool",
    "reduce_sum",
    "reduce_mean",
    "pad",
    "spec_linear",
    "apply_spec",
    # shape only
    "reshape",
    "permute",
    "strided_slice",
    "concat",
    # activations and pooling
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "hardtanh",
    "max_pool",
    # smooth elementwise functions and products (ACE App. H)
    "exp",
    "log",
    "reciprocal",
    "product",
    "softmax_entropy",
    # certify-or-predict selection (ACE)
    "ace_select",
]


@dataclass(frozen=True)
class OpTraits:
    """What a domain may assume about a core op.

    Attributes:
        monotone: non-decreasing in every tensor argument.
        affine: affine in its tensor argument(s).
        shape_only: only moves/selects entries (implies monotone and affine).
        elementwise: output entry i depends only on input entry i.
        linear_part: for affine ops, the op with all constant terms dropped (same signature).
        abs_linear_part: for affine ops, the op with coefficients replaced by their absolute
            values and constants dropped (same signature).
        perturbed_args: indices of arguments that may carry a perturbed tensor.
    """

    monotone: bool = False
    affine: bool = False
    shape_only: bool = False
    elementwise: bool = False
    linear_part: Callable[..., Any] | None = None
    abs_linear_part: Callable[..., Any] | None = None
    perturbed_args: tuple[int, ...] = (0,)


CORE_OPS: dict[Callable[..., Any], OpTraits] = {}


def core_op(**trait_kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a function as a core op with the given :class:`OpTraits` fields."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if fn in CORE_OPS:
            raise ValueError(f"core op {fn.__name__} registered twice")
        if trait_kwargs.get("affine"):
            # An affine op without constant terms and with non-negative coefficients (pooling,
            # sums, reshapes) is its own linear part and its own absolute linear part.
            trait_kwargs.setdefault("linear_part", fn)
            trait_kwargs.setdefault("abs_linear_part", fn)
        CORE_OPS[fn] = OpTraits(**trait_kwargs)
        return fn

    return register


def is_core_op(target: Any) -> bool:
    """Whether ``target`` is one of the core ops."""
    return target in CORE_OPS


def traits(target: Callable[..., Any]) -> OpTraits:
    """The traits of a core op (``KeyError`` for anything else)."""
    return CORE_OPS[target]


def _const(t: Any) -> Any:
    """``|t|`` for tensors and numbers."""
    return t.abs() if isinstance(t, Tensor) else abs(t)


_ABS_ATTRIBUTE = "_certfx_abs"  # per-tensor memo: (version, |w|)


def abs_weight(w: Tensor) -> Tensor:
    """``|w|`` for a weight tensor, memoized on the tensor itself when no gradient is needed.

    Bounding an affine layer needs ``|W|`` on every call; for large weights computing it costs
    about as much memory traffic as the layer itself. When autograd does not need it (frozen
    weights, or ``torch.no_grad``), the result is kept as an attribute of ``w`` together with
    ``w._version``, which every in-place update (an optimizer step, ``copy_``) increments, so a
    changed weight is never paired with a stale ``|W|``.

    Example:
        >>> w = torch.tensor([[-1.0, 2.0]])
        >>> abs_weight(w).tolist(), abs_weight(w) is abs_weight(w)
        ([[1.0, 2.0]], True)
        >>> _ = w.mul_(2)
        >>> abs_weight(w).tolist()
        [[2.0, 4.0]]
    """
    if w.requires_grad and torch.is_grad_enabled():
        return w.abs()
    cached = getattr(w, _ABS_ATTRIBUTE, None)
    if cached is not None and cached[0] == w._version:
        return cached[1]
    result = w.detach().abs()
    setattr(w, _ABS_ATTRIBUTE, (w._version, result))
    return result


# --------------------------------------------------------------------------------------------
# Affine ops. ``linear_part``/``abs_linear_part`` are given for each one.
# --------------------------------------------------------------------------------------------


def _linear_lin(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight)


def _linear_abs(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, abs_weight(weight))


@core_op(affine=True, linear_part=_linear_lin, abs_linear_part=_linear_abs)
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` over the last dim (``nn.Linear``, Gemm)."""
    return F.linear(x, weight, bias)


def _matmul_lin(x: Tensor, other: Tensor) -> Tensor:
    return torch.matmul(x, other)


def _matmul_abs(x: Tensor, other: Tensor) -> Tensor:
    return torch.matmul(x, abs_weight(other))


@core_op(affine=True, linear_part=_matmul_lin, abs_linear_part=_matmul_abs)
def matmul(x: Tensor, other: Tensor) -> Tensor:
    """``x @ other`` with a constant right factor (ONNX MatMul, ``x @ W``)."""
    return torch.matmul(x, other)


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _conv_call(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    return _CONV[weight.dim()](x, weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                               groups)


def _conv_lin(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    return _conv_call(x, weight, None, stride, padding, dilation, groups)


def _conv_abs(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    return _conv_call(x, abs_weight(weight), None, stride, padding, dilation, groups)


@core_op(affine=True, linear_part=_conv_lin, abs_linear_part=_conv_abs)
def conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
         padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """1-, 2- or 3-d convolution (by ``weight.dim()``) with symmetric zero padding."""
    return _conv_call(x, weight, bias, stride, padding, dilation, groups)


def _bn_scale(x: Tensor, var: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Per-channel scale ``γ / sqrt(var + eps)`` shaped to broadcast over ``x`` (channel dim 1)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    return scale.reshape((1, -1) + (1,) * (x.dim() - 2))


def _bn_lin(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
            eps: float) -> Tensor:
    return x * _bn_scale(x, var, weight, eps)


def _bn_abs(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
            eps: float) -> Tensor:
    return x * _bn_scale(x, var, weight, eps).abs()


@core_op(affine=True, linear_part=_bn_lin, abs_linear_part=_bn_abs)
def batch_norm(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> Tensor:
    """Eval-mode batch norm over channel dim 1: ``γ (x − μ) / sqrt(σ² + eps) + β``."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def _add_lin(x: Any, y: Any) -> Any:
    # Only perturbed operands reach this function (a domain passes 0 for constant operands).
    return x + y


@core_op(monotone=True, affine=True, linear_part=_add_lin, abs_linear_part=_add_lin,
         perturbed_args=(0, 1))
def add(x: Any, y: Any) -> Any:
    """``x + y``; either side may be a constant tensor or number."""
    return x + y


def _sub_lin(x: Any, y: Any) -> Any:
    return x - y


@core_op(affine=True, linear_part=_sub_lin, abs_linear_part=_add_lin, perturbed_args=(0, 1))
def sub(x: Any, y: Any) -> Any:
    """``x − y``; either side may be a constant tensor or number."""
    return x - y


def _mul_lin(x: Tensor, c: Any) -> Tensor:
    return x * c


def _mul_abs(x: Tensor, c: Any) -> Tensor:
    return x * _const(c)


@core_op(affine=True, linear_part=_mul_lin, abs_linear_part=_mul_abs)
def mul(x: Tensor, c: Any) -> Tensor:
    """``x * c`` with a constant ``c`` (number or broadcastable tensor)."""
    return x * c


def _div_lin(x: Tensor, c: Any) -> Tensor:
    return x / c


def _div_abs(x: Tensor, c: Any) -> Tensor:
    return x / _const(c)


@core_op(affine=True, linear_part=_div_lin, abs_linear_part=_div_abs)
def div(x: Tensor, c: Any) -> Tensor:
    """``x / c`` with a constant non-zero ``c``."""
    return x / c


def _neg_abs(x: Tensor) -> Tensor:
    return x


@core_op(affine=True, linear_part=torch.neg, abs_linear_part=_neg_abs, elementwise=True)
def neg(x: Tensor) -> Tensor:
    """``−x``."""
    return -x


@core_op(monotone=True, affine=True)
def avg_pool(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
             padding: Sequence[int], ceil_mode: bool, count_include_pad: bool) -> Tensor:
    """Average pooling over the trailing 1, 2 or 3 dims (non-negative weights: monotone)."""
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel_size)]
    return fn(x, tuple(kernel_size), tuple(stride), tuple(padding), ceil_mode,
              count_include_pad)


@core_op(monotone=True, affine=True)
def reduce_sum(x: Tensor, dims: Sequence[int], keepdim: bool) -> Tensor:
    """Sum over ``dims`` (never dim 0)."""
    return torch.sum(x, dim=tuple(dims), keepdim=keepdim)


@core_op(monotone=True, affine=True)
def reduce_mean(x: Tensor, dims: Sequence[int], keepdim: bool) -> Tensor:
    """Mean over ``dims`` (never dim 0)."""
    return torch.mean(x, dim=tuple(dims), keepdim=keepdim)


def _pad_lin(x: Tensor, pads: Sequence[int], value: float) -> Tensor:
    return F.pad(x, tuple(pads), mode="constant", value=0.0)


@core_op(monotone=True, affine=True, linear_part=_pad_lin, abs_linear_part=_pad_lin)
def pad(x: Tensor, pads: Sequence[int], value: float) -> Tensor:
    """Constant padding in ``F.pad`` order (last dim first); never pads dim 0."""
    return F.pad(x, tuple(pads), mode="constant", value=value)


def _spec_call(x: Tensor, weight: Tensor, bias: Tensor | None, spec: Tensor | None,
               abs_w: bool) -> Tensor:
    w = weight.abs() if abs_w else weight
    if spec is None:
        return F.linear(x, w, bias)
    # Fused weight C·W of shape (batch, m, in); bias C·b of shape (batch, m).
    fused_w = torch.matmul(spec, weight)
    if abs_w:
        fused_w = fused_w.abs()
    out = torch.einsum("bmi,bi->bm", fused_w, x)
    if bias is not None:
        out = out + torch.matmul(spec, bias)
    return out


def _spec_linear_lin(x: Tensor, weight: Tensor, bias: Tensor | None,
                     spec: Tensor | None) -> Tensor:
    return _spec_call(x, weight, None, spec, abs_w=False)


def _spec_linear_abs(x: Tensor, weight: Tensor, bias: Tensor | None,
                     spec: Tensor | None) -> Tensor:
    return _spec_call(x, weight, None, spec, abs_w=True)


@core_op(affine=True, linear_part=_spec_linear_lin, abs_linear_part=_spec_linear_abs)
def spec_linear(x: Tensor, weight: Tensor, bias: Tensor | None, spec: Tensor | None) -> Tensor:
    """The last linear layer with an output specification folded in: ``C (W x + b)``.

    ``spec`` is a per-example C-matrix ``(batch, m, out)``, or ``None`` for the plain layer.
    Folding ``C`` into ``W`` before bounding is tighter than bounding ``W x + b`` and then
    applying ``C`` (Gowal et al. 2018, "elision of the last layer").
    """
    return _spec_call(x, weight, bias, spec, abs_w=False)


def _apply_spec_abs(x: Tensor, spec: Tensor | None) -> Tensor:
    return x if spec is None else torch.einsum("bmk,bk->bm", spec.abs(), x.flatten(1))


@core_op(affine=True, abs_linear_part=_apply_spec_abs)
def apply_spec(x: Tensor, spec: Tensor | None) -> Tensor:
    """``C x`` for a per-example C-matrix ``(batch, m, numel)`` over the flattened output, or
    ``x`` unchanged when ``spec`` is ``None`` (used when the last op is not linear)."""
    return x if spec is None else torch.einsum("bmk,bk->bm", spec, x.flatten(1))


# --------------------------------------------------------------------------------------------
# Shape-only ops.
# --------------------------------------------------------------------------------------------


@core_op(monotone=True, affine=True, shape_only=True)
def reshape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Reshape each example to ``shape`` (the batch dim is kept)."""
    return x.reshape((x.shape[0], *shape))


@core_op(monotone=True, affine=True, shape_only=True)
def permute(x: Tensor, dims: Sequence[int]) -> Tensor:
    """Permute dims; ``dims[0]`` must be 0 (the batch stays first)."""
    return x.permute(*dims)


@core_op(monotone=True, affine=True, shape_only=True)
def strided_slice(x: Tensor, dim: int, start: int, stop: int, step: int) -> Tensor:
    """``x[..., start:stop:step, ...]`` along ``dim`` (>= 1), with ``step > 0``."""
    index = [builtins.slice(None)] * x.dim()
    index[dim] = builtins.slice(start, stop, step)
    return x[tuple(index)]


@core_op(monotone=True, affine=True, shape_only=True, perturbed_args=(0,))
def concat(xs: Sequence[Any], dim: int) -> Tensor:
    """Concatenate a list of tensors along ``dim`` (>= 1); entries may be constants."""
    return torch.cat(list(xs), dim=dim)


# --------------------------------------------------------------------------------------------
# Activations and max pooling: monotone, non-affine.
# --------------------------------------------------------------------------------------------


@core_op(monotone=True, elementwise=True)
def relu(x: Tensor) -> Tensor:
    """``max(x, 0)``."""
    return torch.relu(x)


@core_op(elementwise=True)
def leaky_relu(x: Tensor, negative_slope: float) -> Tensor:
    """``x if x >= 0 else negative_slope * x`` (monotone only for a non-negative slope)."""
    return F.leaky_relu(x, negative_slope)


@core_op(monotone=True, elementwise=True)
def sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + exp(−x))``."""
    return torch.sigmoid(x)


@core_op(monotone=True, elementwise=True)
def tanh(x: Tensor) -> Tensor:
    """Hyperbolic tangent."""
    return torch.tanh(x)


@core_op(monotone=True, elementwise=True)
def hardtanh(x: Tensor, min_val: float, max_val: float) -> Tensor:
    """``clamp(x, min_val, max_val)`` (HardTanh, ONNX Clip; ±inf for a missing side)."""
    return torch.clamp(x, min_val, max_val)


@core_op(monotone=True)
def max_pool(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool) -> Tensor:
    """Max pooling over the trailing 1, 2 or 3 dims (padding with −inf)."""
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel_size)]
    return fn(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
              ceil_mode=ceil_mode)


def pool_windows(x: Tensor, kernel: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], out_size: Sequence[int],
                 fill: float) -> Tensor:
    """The windows of :func:`max_pool` over ``x`` ``(N, C, *spatial)`` as
    ``(N, C, *out_size, K)``, padded with ``fill`` (``ceil_mode`` windows included: the right
    padding reaches the last one). Not a core op: a helper of the domains' max-pool rules.

    Example:
        >>> pool_windows(torch.arange(4.0).reshape(1, 1, 4), (2,), (2,), (0,), (1,), (2,),
        ...              0.0).tolist()
        [[[[0.0, 1.0], [2.0, 3.0]]]]
    """
    n = len(kernel)
    pads: list[int] = []
    for i in reversed(range(n)):  # F.pad lists the last dim first
        need = (out_size[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1
        pads += [padding[i], max(need - x.shape[2 + i] - padding[i], 0)]
    x = F.pad(x, pads, value=fill)
    for i in range(n):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., ::dilation[i]].narrow(2 + i, 0, out_size[i])
    return x.flatten(-n)



# --------------------------------------------------------------------------------------------
# Smooth elementwise functions, the product of two perturbed tensors and the softmax entropy
# (the building blocks of ACE's entropy selection, paper 000, Eq. 5 and App. H).
# --------------------------------------------------------------------------------------------


@core_op(monotone=True, elementwise=True)
def exp(x: Tensor) -> Tensor:
    """``e^x`` (increasing and convex)."""
    return torch.exp(x)


@core_op(monotone=True, elementwise=True)
def log(x: Tensor) -> Tensor:
    """Natural logarithm: increasing and concave on ``x > 0``; an input set reaching ``x ≤ 0``
    has no finite bounds (the rules then return NaN or infinite bounds)."""
    return torch.log(x)


@core_op(elementwise=True)
def reciprocal(x: Tensor) -> Tensor:
    """``1 / x``: decreasing on each side of 0 (convex for ``x > 0``, concave for ``x < 0``),
    unbounded on a set containing 0; not monotone, so domains write a rule for it."""
    return torch.reciprocal(x)


@core_op(elementwise=True, perturbed_args=(0, 1))
def product(x: Tensor, y: Tensor) -> Tensor:
    """``x * y`` of two perturbed tensors (broadcasting); a product with a constant is ``mul``."""
    return x * y


@core_op()
def softmax_entropy(x: Tensor) -> Tensor:
    """The entropy ``H(softmax(x))`` over dim 1 of logits ``(batch, n)``, shape ``(batch, 1)``.

    One composite op, so that domains can bound it as a whole: ``H = log Σ e^x − Σ_j x_j p_j``
    (paper 000, Eq. 5).

    Example:
        >>> round(softmax_entropy(torch.zeros(1, 4)).item(), 6) == round(math.log(4), 6)
        True
    """
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    return lse - (torch.softmax(x, dim=1) * x).sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# The selection node of certify-or-predict architectures (ACE, paper 000, Eq. 2).
# --------------------------------------------------------------------------------------------


@core_op(perturbed_args=(0, 1, 2))
def ace_select(score: Tensor, chosen: Tensor, other: Tensor, threshold: float) -> Tensor:
    """``chosen`` where ``score > threshold``, ``other`` elsewhere, per example.

    Paper 000, Eq. 2 with the selection ``g(x) = 1[score(x) > T]``: ``score`` is ``(batch, 1)``
    (a selection network's output, Sec. 4.1.1, or the negated entropy with ``T`` negated,
    Sec. 4.1.2), ``chosen`` the certification network's output and ``other`` the core
    network's, both ``(batch, *shape)``. Exactly at the threshold the core network decides.

    Example:
        >>> s = torch.tensor([[1.0], [0.0]])
        >>> ace_select(s, torch.ones(2, 2), torch.zeros(2, 2), 0.0).tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """
    ndim = max(torch.as_tensor(chosen).dim(), torch.as_tensor(other).dim())
    selected = (score > threshold).reshape(score.shape[0], *[1] * (ndim - 1))
    return torch.where(selected, chosen, other)
