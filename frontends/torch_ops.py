"""Mappings of PyTorch modules, functions and tensor methods onto certfx core ops.

Each mapping receives the :class:`~certfx.passes.normalize.Builder`, the node's arguments
(:class:`~certfx.passes.normalize.Traced` for input-dependent values, constants otherwise) and
the node's concrete output from the example run; see :func:`certfx.passes.normalize.mapping`.
ONNX-specific modules of onnx2torch are mapped in :mod:`certfx.frontends.onnx_ops`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from certfx import ops
from certfx.errors import ShapeError
from certfx.passes.normalize import Builder, Traced, mapping, method_key

__all__: list[str] = []




def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _pair(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


# ---- identities -----------------------------------------------------------------------------

@mapping(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
         F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
         method_key("contiguous"), method_key("clone"), method_key("detach"),
         method_key("float"), torch.clone)
def _identity(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any) -> Traced:
    x = args[0]
    if not isinstance(x, Traced):
        b.unsupported("identity of a constant", "internal: constant not folded")
    return Traced(x.node, out)


@mapping(method_key("to"), method_key("type"))
def _to(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any) -> Traced:
    if isinstance(out, Tensor) and out.dtype != args[0].value.dtype:
        b.unsupported(f"dtype conversion to {out.dtype}",
                           "remove the cast; certfx computes in the input's dtype")
    return Traced(args[0].node, out)


# ---- affine layers --------------------------------------------------------------------------

@mapping(nn.Linear)
def _linear_module(b: Builder, args: tuple, kwargs: dict, out: Any, module: nn.Linear):
    return b.call(ops.linear, args[0], module.weight, module.bias)


@mapping(F.linear)
def _linear_fn(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x, w, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if isinstance(w, Traced) or isinstance(bias, Traced):
        b.unsupported("linear with an input-dependent weight",
                           "only constant weights are supported")
    return b.call(ops.linear, x, w, bias)


@mapping(torch.matmul, operator.matmul, method_key("matmul"), torch.mm, method_key("mm"))
def _matmul(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x, w = args[0], args[1]
    if isinstance(x, Traced) and not isinstance(w, Traced) and w.dim() >= 1:
        if w.dim() == 1:  # x @ v: a dot product over the last dim
            return b.reshape_to(Traced(b.call(ops.matmul, x, w.unsqueeze(1)), out), out)
        if w.dim() == 2 and x.value.dim() >= 2 or (not b.batched and w.dim() == 2):
            return b.call(ops.matmul, x, w)
    b.unsupported("matmul", "only input @ constant matrix is supported; a product of "
                       "two perturbed tensors needs a non-linear domain rule")


def _conv(b: Builder, x: Traced, weight: Tensor, bias: Tensor | None, stride: Any,
          padding: Any, dilation: Any, groups: int, out: Tensor):
    n = weight.dim() - 2
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": PyTorch pads symmetrically only for odd effective kernels
            eff = [d * (k - 1) for d, k in zip(_pair(dilation, n), weight.shape[2:])]
            if any(e % 2 for e in eff):
                b.unsupported("conv with padding='same' and an even kernel",
                                   "use explicit padding plus F.pad")
            padding = [e // 2 for e in eff]
    return b.call(ops.conv, x, weight, bias, _pair(stride, n), _pair(padding, n),
                  _pair(dilation, n), int(groups))


@mapping(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(b: Builder, args: tuple, kwargs: dict, out: Any, module: nn.Conv2d):
    x = args[0]
    if module.padding_mode != "zeros" and any(p for p in _pair(module.padding, 1)):
        b.unsupported(f"conv with padding_mode={module.padding_mode!r}",
                           "use padding_mode='zeros'")
    return _conv(b, x, module.weight, module.bias, module.stride, module.padding,
                 module.dilation, module.groups, out)


@mapping(F.conv1d, F.conv2d, F.conv3d)
def _conv_fn(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults = [None, None, None, 1, 0, 1, 1]
    v = [_arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    return _conv(b, v[0], v[1], v[2], v[3], v[4], v[5], v[6], out)


@mapping(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(b: Builder, args: tuple, kwargs: dict, out: Any, module: nn.BatchNorm2d):
    if module.running_mean is None or module.running_var is None:
        b.unsupported("batch norm without running statistics",
                           "construct it with track_running_stats=True")
    return b.call(ops.batch_norm, args[0], module.running_mean, module.running_var,
                  module.weight, module.bias, float(module.eps))


# ---- elementwise arithmetic -----------------------------------------------------------------

@mapping(operator.add, operator.iadd, torch.add, method_key("add"), method_key("add_"))
def _add(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x, y = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:
        if isinstance(y, Traced):
            y = Traced(b.call(ops.mul, y, float(alpha)), None)
        else:
            y = y * alpha
    return b.call(ops.add, x, y)


@mapping(operator.sub, operator.isub, torch.sub, method_key("sub"), method_key("sub_"))
def _sub(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    if kwargs.get("alpha", 1) != 1:
        b.unsupported("sub with alpha", "write x - alpha * y")
    return b.call(ops.sub, args[0], args[1])


def _live(a: Any) -> bool:
    """Whether ``a`` is a perturbed tensor (not a constant and not shape metadata such as
    ``x.size(1)``, which is a fixed number)."""
    return isinstance(a, Traced) and a.node is not None


def _constant(a: Any) -> Any:
    return a.value if isinstance(a, Traced) else a


@mapping(operator.mul, operator.imul, torch.mul, torch.multiply, method_key("mul"),
         method_key("mul_"), method_key("multiply"))
def _mul(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x, y = args[0], _arg(args, kwargs, 1, "other")
    if _live(x) and _live(y):
        # Both factors perturbed: x·y is bilinear, not affine. It must never become ``mul``
        # (whose rules treat the second factor as a constant: unsound); ``product`` has the
        # corner rule in the box (ACE Eq. 28–29) and ACE App. H.5 in the zonotope domain.
        return b.call(ops.product, x, y)
    if not _live(x):
        x, y = y, x
    return b.call(ops.mul, x, _constant(y))


@mapping(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide,
         method_key("div"), method_key("div_"), method_key("divide"), method_key("true_divide"))
def _div(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x, y = args[0], _arg(args, kwargs, 1, "other")
    if kwargs.get("rounding_mode") is not None:
        b.unsupported("division with rounding", "only true division is supported")
    if _live(y):  # x / y = x · (1/y): the reciprocal's rule, then a product or a constant factor
        inv = Traced(b.call(ops.reciprocal, y), None)
        if _live(x):
            return b.call(ops.product, x, inv)
        x = _constant(x)
        return inv.node if _is_one(x) else b.call(ops.mul, inv, x)
    c = torch.as_tensor(_constant(y))
    if bool((c == 0).any()):
        b.unsupported("division by zero", "the divisor constant contains 0")
    return b.call(ops.div, x, _constant(y))


def _is_one(c: Any) -> bool:
    return isinstance(c, (int, float)) and c == 1


@mapping(operator.neg, torch.neg, method_key("neg"))
def _neg(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return b.call(ops.neg, args[0])


# ---- activations ----------------------------------------------------------------------------

@mapping(nn.ReLU, F.relu, torch.relu, method_key("relu"), method_key("relu_"))
def _relu(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return b.call(ops.relu, args[0])


@mapping(nn.LeakyReLU, F.leaky_relu)
def _leaky_relu(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    slope = module.negative_slope if module is not None else _arg(args, kwargs, 1,
                                                                   "negative_slope", 0.01)
    return b.call(ops.leaky_relu, args[0], float(slope))


@mapping(nn.Sigmoid, torch.sigmoid, F.sigmoid, method_key("sigmoid"))
def _sigmoid(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return b.call(ops.sigmoid, args[0])


@mapping(nn.Tanh, torch.tanh, F.tanh, method_key("tanh"))
def _tanh(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return b.call(ops.tanh, args[0])


@mapping(torch.exp, method_key("exp"))
def _exp(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return b.call(ops.exp, args[0])


def log_of(b: Builder, x: Traced) -> fx.Node:
    """``log x``, with ``log(exp(y)) = y`` taken literally: the logarithm of a (log-)softmax
    output (:func:`softmax`) then costs no relaxation at all."""
    if x.node is not None and x.node.target is ops.exp:
        return x.node.args[0]  # type: ignore[return-value]
    return b.call(ops.log, x)


@mapping(torch.log, method_key("log"))
def _log(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return log_of(b, args[0])


@mapping(torch.reciprocal, method_key("reciprocal"))
def _reciprocal(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return b.call(ops.reciprocal, args[0])


def softmax(b: Builder, x: Traced, dim: int, log: bool = False) -> fx.Node:
    """(Log-)softmax of ``x`` along its source dim ``dim`` in core ops.

    With ``S_i = Σ_j e^{x_j − x_i}`` (``S_i ≥ 1``: the term ``j = i`` is exactly 1)::

        log p_i = −log S_i,    p_i = e^{x_i} / Σ_j e^{x_j} = exp(−log S_i)

    (the log-sum-exp form of ACE Eq. 5, shifted by ``x_i`` instead of a constant). All
    differences ``x_j − x_i`` come from one ``linear`` node, exact in every domain, so the box
    keeps the correlation between numerator and denominator, and every relaxation sees positive
    inputs (``S_i ≥ 1``; exp's zonotope relaxation is positive, ACE Eq. 22), so ``p`` and
    ``log p`` have finite bounds — up to rounding: with differences near ±70 a zonotope's lower
    bound ``c − Σ|g|`` of ``S_i`` can round below 0, and log's bounds are then NaN. It costs
    ``n²`` entries per softmax of size ``n``.
    """
    rank = x.value.dim()
    axis = b.axis(dim, rank)
    shape = list(b.sample_shape(x.value))  # canonical per-example shape; dim k ↔ shape[k − 1]
    last = len(shape)  # canonical index of the last dim
    n = shape[axis - 1]
    perm: tuple[int, ...] | None = None
    cur: Any = x
    if axis != last:  # move the axis last (a swap: its own inverse)
        order = list(range(last + 1))
        order[axis], order[last] = order[last], order[axis]
        perm = tuple(order)
        shape[axis - 1], shape[last - 1] = shape[last - 1], shape[axis - 1]
        cur = Traced(b.call(ops.permute, x, perm), None)
    eye = torch.eye(n, dtype=x.value.dtype)
    diffs = (eye.unsqueeze(0) - eye.unsqueeze(1)).reshape(n * n, n)  # row i·n + j: e_j − e_i
    d = b.call(ops.linear, cur, diffs, None)
    e = b.call(ops.reshape, b.call(ops.exp, d), (*shape, n))
    s = b.call(ops.reduce_sum, e, (last + 1,), False)  # S_i
    result = b.call(ops.neg, b.call(ops.log, s))  # log p_i
    if perm is not None:
        result = b.call(ops.permute, result, perm)
    # The softmax ends in ``exp``, so that a following ``log`` cancels it (:func:`log_of`).
    return result if log else b.call(ops.exp, result)


def _softmax_dim(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any) -> int:
    dim = module.dim if module is not None else _arg(args, kwargs, 1, "dim")
    if dim is None:
        b.unsupported("softmax without an explicit dim", "pass dim=...")
    if isinstance(out, Tensor) and out.dtype != args[0].value.dtype:
        b.unsupported(f"softmax with dtype {out.dtype}",
                      "remove the dtype argument; certfx computes in the input's dtype")
    return int(dim)


@mapping(nn.Softmax, F.softmax, torch.softmax, method_key("softmax"))
def _softmax(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return softmax(b, args[0], _softmax_dim(b, args, kwargs, out, module))


@mapping(nn.LogSoftmax, F.log_softmax, torch.log_softmax, method_key("log_softmax"))
def _log_softmax(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return softmax(b, args[0], _softmax_dim(b, args, kwargs, out, module), log=True)


@mapping(nn.Hardtanh, F.hardtanh, nn.ReLU6, F.relu6)
def _hardtanh(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    if module is not None:
        lo, hi = module.min_val, module.max_val
    elif b.current is not None and b.current.target is F.relu6:
        lo, hi = 0.0, 6.0
    else:
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    return b.call(ops.hardtanh, args[0], float(lo), float(hi))


@mapping(torch.clamp, torch.clip, method_key("clamp"), method_key("clip"))
def _clamp(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    if isinstance(lo, (Tensor, Traced)) or isinstance(hi, (Tensor, Traced)):
        b.unsupported("clamp with tensor bounds", "use scalar min/max")
    return b.call(ops.hardtanh, args[0], -math.inf if lo is None else float(lo),
                  math.inf if hi is None else float(hi))


# ---- shapes ---------------------------------------------------------------------------------

@mapping(nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze,
         torch.unsqueeze, method_key("view"), method_key("reshape"), method_key("flatten"),
         method_key("squeeze"), method_key("unsqueeze"), method_key("view_as"),
         method_key("reshape_as"), method_key("expand_as"), method_key("expand"))
def _reshape(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    if out.numel() != x.value.numel():
        b.unsupported("expand that broadcasts a perturbed tensor",
                           "only shape changes that keep every entry are supported")
    return b.reshape_to(x, out)


@mapping(method_key("permute"), torch.permute)
def _permute(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
    return _permute_dims(b, x, list(dims))


def _permute_dims(b: Builder, x: Traced, dims: list[int]):
    rank = x.value.dim()
    dims = [d % rank for d in dims]
    if b.batched:
        if dims[0] != 0:
            raise ShapeError("a permutation moves the batch dimension (dim 0)")
        return b.call(ops.permute, x, tuple(dims))
    return b.call(ops.permute, x, (0, *[d + 1 for d in dims]))


@mapping(method_key("transpose"), torch.transpose, method_key("t"), torch.t)
def _transpose(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    rank = x.value.dim()
    d0, d1 = (args[1], args[2]) if len(args) >= 3 else (0, 1)
    dims = list(range(rank))
    dims[d0 % rank], dims[d1 % rank] = dims[d1 % rank], dims[d0 % rank]
    return _permute_dims(b, x, dims)


@mapping(torch.cat, torch.concat, torch.concatenate)
def _cat(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    xs = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0)
    return b.call(ops.concat, xs, b.axis(dim, out.dim()))


@mapping(operator.getitem)
def _getitem(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x, index = args
    if not isinstance(x, Traced) or isinstance(x.value, (tuple, list, torch.Size)):
        # Indexing into a shape (x.shape[1]) or a tuple of values: no tensor op.
        value = x.value[index] if isinstance(x, Traced) else x[index]
        if isinstance(value, Tensor):
            b.unsupported("indexing a tuple of tensors", "return single tensors")
        return Traced(None, value)
    return slice_by_index(b, x, index, out)


def slice_by_index(b: Builder, x: Traced, index: Any, out: Tensor):
    """Map ``x[index]`` (slices with step > 0, ints, ``...``, ``None``) onto strided slices and
    one final reshape."""
    if not isinstance(index, tuple):
        index = (index,)
    rank = x.value.dim()
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (rank - n_real))
        elif i is not None:
            expanded.append(i)
    node: Any = x
    for dim, i in enumerate(expanded):
        if isinstance(i, Tensor) or isinstance(i, Traced) or isinstance(i, (list, bool)):
            b.unsupported("advanced (tensor/list) indexing", "use slices and ints")
        if isinstance(i, slice) and i == slice(None):
            continue
        size = x.value.shape[dim]
        if isinstance(i, int):
            start, stop, step = (i % size), (i % size) + 1, 1
        else:
            start, stop, step = i.indices(size)
            if step <= 0:
                b.unsupported("slice with a negative step", "use a positive step")
        canonical = b.axis(dim, rank)
        node = Traced(b.call(ops.strided_slice, node, canonical, start, stop, step), None)
    result = node.node if isinstance(node, Traced) else node
    cur_shape = _sliced_shape(x.value, expanded)
    if tuple(out.shape) != cur_shape:
        return b.reshape_to(Traced(result, torch.empty(cur_shape)), out)
    return result


def _sliced_shape(value: Tensor, expanded: list[Any]) -> tuple[int, ...]:
    index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in expanded)
    return tuple(value[index].shape)


@mapping(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
         nn.ConstantPad3d, F.pad)
def _pad(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    if module is not None:
        pads, value = module.padding, float(getattr(module, "value", 0.0))
    else:
        pads = _arg(args, kwargs, 1, "pad")
        mode = _arg(args, kwargs, 2, "mode", "constant")
        value = _arg(args, kwargs, 3, "value", 0.0)
        if mode != "constant":
            b.unsupported(f"pad mode {mode!r}", "only constant padding is supported")
        value = 0.0 if value is None else float(value)
    pads = tuple(int(p) for p in pads)
    if len(pads) // 2 > x.value.dim() - (1 if b.batched else 0):
        raise ShapeError("padding touches the batch dimension")
    return b.call(ops.pad, x, pads, value)


# ---- pooling and reductions -----------------------------------------------------------------

@mapping(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)
def _max_pool(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    n = out.dim() - 2
    if module is not None:
        if module.return_indices:
            b.unsupported("max pool returning indices", "set return_indices=False")
        k, s, p, d, c = (module.kernel_size, module.stride, module.padding, module.dilation,
                         module.ceil_mode)
    else:
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"]
        k, s, p, d, c = (_arg(args, kwargs, i, nm, dflt) for i, (nm, dflt) in
                         enumerate(zip(names, [None, None, None, 0, 1, False])) if i > 0)
        if _arg(args, kwargs, 6, "return_indices", False):
            b.unsupported("max pool returning indices", "set return_indices=False")
    s = k if s is None or s == [] else s
    return b.call(ops.max_pool, x, _pair(k, n), _pair(s, n), _pair(p, n), _pair(d, n), bool(c))


@mapping(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    n = out.dim() - 2
    if module is not None:
        if getattr(module, "divisor_override", None):
            b.unsupported("avg pool with divisor_override", "remove divisor_override")
        k, s, p, c, inc = (module.kernel_size, module.stride, module.padding, module.ceil_mode,
                           module.count_include_pad)
    else:
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
        k, s, p, c, inc = (_arg(args, kwargs, i, nm, dflt) for i, (nm, dflt) in
                           enumerate(zip(names, [None, None, None, 0, False, True])) if i > 0)
        if _arg(args, kwargs, 6, "divisor_override", None):
            b.unsupported("avg pool with divisor_override", "remove divisor_override")
    s = k if s is None or s == [] else s
    return b.call(ops.avg_pool, x, _pair(k, n), _pair(s, n), _pair(p, n), bool(c), bool(inc))


@mapping(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, F.adaptive_avg_pool1d,
         F.adaptive_avg_pool2d)
def _adaptive_avg_pool(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    x = args[0]
    in_sizes, out_sizes = x.value.shape[2:], out.shape[2:]
    if any(i % o for i, o in zip(in_sizes, out_sizes)):
        b.unsupported("adaptive avg pool with non-dividing sizes",
                           "choose an output size that divides the input size")
    k = tuple(i // o for i, o in zip(in_sizes, out_sizes))
    return b.call(ops.avg_pool, x, k, k, (0,) * len(k), False, True)


def _reduce(b: Builder, args: tuple, kwargs: dict, out: Any, op: Any):
    x = args[0]
    dims = _arg(args, kwargs, 1, "dim")
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    rank = x.value.dim()
    if dims is None:
        dims = list(range(rank))
        if b.batched:
            raise ShapeError("a reduction over all dims includes the batch dimension")
    dims = [dims] if isinstance(dims, int) else list(dims)
    return b.call(op, x, tuple(b.axis(d, rank) for d in dims), keepdim)


@mapping(torch.mean, method_key("mean"))
def _mean(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return _reduce(b, args, kwargs, out, ops.reduce_mean)


@mapping(torch.sum, method_key("sum"))
def _sum(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any):
    return _reduce(b, args, kwargs, out, ops.reduce_sum)


@mapping(method_key("size"), method_key("dim"), getattr)
def _shape_value(b: Builder, args: tuple, kwargs: dict, out: Any, module: Any) -> Traced:
    if isinstance(out, Tensor):
        b.unsupported("attribute access returning a tensor", "avoid it in forward")
    return Traced(None, out)
