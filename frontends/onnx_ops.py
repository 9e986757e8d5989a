"""Mappings of onnx2torch's ONNX-specific modules onto certfx core ops.

onnx2torch turns most ONNX nodes into ``torch.nn`` modules (``Conv``, ``Relu``, ``MaxPool``,
constant-weight ``Gemm`` → ``nn.Linear``, …), which :mod:`certfx.frontends.torch_ops` maps; this
module maps the rest (``OnnxGemm``, ``OnnxMatMul``, Add/Sub/Mul/Div, Reshape, Transpose, Concat,
Slice, Pad, reductions, …). ONNX models may be *unbatched* (input ``[5]``), so every axis goes
through :meth:`~certfx.passes.normalize.Builder.axis` and every reshape through
:meth:`~certfx.passes.normalize.Builder.reshape_to`.

Shape arithmetic (``Shape`` → ``Gather`` → ``Concat`` → ``Reshape``) depends on the input only
through its fixed shape: a mapping whose arguments carry no perturbed tensor returns the example
value as shape metadata (``Traced(None, value)``), which later mappings read as a constant.

A ``MatMul``/``Gemm`` with a constant right factor becomes ``linear``, and a following ``Add``
of a constant vector becomes its bias, so ``x @ W + b`` is one ``linear`` node (as for
``nn.Linear``), which ``fold_batchnorm`` and ``fuse_spec`` recognise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from onnx2torch.node_converters.activations import OnnxSoftmaxV1V11
from onnx2torch.node_converters.batch_norm import OnnxBatchNorm
from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
from onnx2torch.node_converters.cast import OnnxCast
from onnx2torch.node_converters.clip import OnnxClip
from onnx2torch.node_converters.concat import OnnxConcat
from onnx2torch.node_converters.constant_of_shape import OnnxConstantOfShape
from onnx2torch.node_converters.dropout import OnnxDropoutDynamic
from onnx2torch.node_converters.expand import OnnxExpand
from onnx2torch.node_converters.flatten import OnnxFlatten
from onnx2torch.node_converters.functions import OnnxFunction
from onnx2torch.node_converters.gather import OnnxGather
from onnx2torch.node_converters.gemm import OnnxGemm
from onnx2torch.node_converters.global_average_pool import (
    OnnxGlobalAveragePool, OnnxGlobalAveragePoolWithKnownInputShape)
from onnx2torch.node_converters.identity import OnnxCopyIdentity
from onnx2torch.node_converters.matmul import OnnxMatMul
from onnx2torch.node_converters.neg import OnnxNeg
from onnx2torch.node_converters.pad import OnnxPadDynamic, OnnxPadStatic, _onnx_padding_to_torch
from onnx2torch.node_converters.range import OnnxRange
from onnx2torch.node_converters.reciprocal import OnnxReciprocal
from onnx2torch.node_converters.reduce import (OnnxReduceStaticAxes, OnnxReduceSumDynamicAxes,
                                               OnnxReduceSumStaticAxes)
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.shape import OnnxShape
from onnx2torch.node_converters.slice import OnnxSlice
from onnx2torch.node_converters.squeeze import OnnxSqueezeDynamicAxes, OnnxSqueezeStaticAxes
from onnx2torch.node_converters.transpose import OnnxTranspose
from onnx2torch.node_converters.unsqueeze import (OnnxUnsqueezeDynamicAxes,
                                                  OnnxUnsqueezeStaticAxes)
from onnx2torch.utils.common import old_style_broadcast
from torch import Tensor

from certfx import ops
from certfx.errors import ShapeError
from certfx.frontends.torch_ops import log_of, softmax
from certfx.passes.normalize import SOURCE_KEY, Builder, Traced, mapping

__all__: list[str] = []

Result = fx.Node | Traced
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
OnnxMapping = Callable[[Builder, Args, Kwargs, Any, Any], Result]


# ---- helpers --------------------------------------------------------------------------------

def _live(a: Any) -> bool:
    """Whether ``a`` is a perturbed tensor (not a constant and not shape metadata)."""
    return isinstance(a, Traced) and a.node is not None


def _any_live(a: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return any(_any_live(x) for x in a)
    if isinstance(a, dict):
        return any(_any_live(x) for x in a.values())
    return _live(a)


def _const(a: Any) -> Any:
    """The constant value of a non-perturbed argument (shape metadata included)."""
    return a.value if isinstance(a, Traced) else a


def _ints(a: Any) -> list[int] | None:
    a = _const(a)
    if a is None:
        return None
    return [int(v) for v in (a.reshape(-1).tolist() if isinstance(a, Tensor) else a)]


def _arg(args: Args, kwargs: Kwargs, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)




def _onnx_mapping(*keys: Any) -> Callable[[OnnxMapping], OnnxMapping]:
    """:func:`~certfx.passes.normalize.mapping` for modules that may also compute on shapes.

    When no argument is a perturbed tensor, the node only does shape arithmetic on values taken
    from the input's shape: its example value is returned as metadata.
    """

    def register(fn: OnnxMapping) -> OnnxMapping:
        @functools.wraps(fn)
        def wrapped(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
            if not _any_live((args, kwargs)):
                return Traced(None, out)
            return fn(b, args, kwargs, out, module)

        mapping(*keys)(wrapped)
        return fn

    return register


def _weight(b: Builder, t: Tensor) -> fx.Node:
    """A constant named after the source node: ``<node>_weight``."""
    return b.constant(t, f"{b.current.name if b.current is not None else 'matmul'}_weight")


def _align(b: Builder, x: Traced, out: Tensor) -> Traced:
    """``x`` in a form whose canonical tensor broadcasts against ``out``'s canonical tensor.

    A batched source's perturbed values all have the batch in dim 0, so a broadcast must keep
    rank and dim 0. An unbatched value of lower rank gets leading 1-dims after the batch dim.
    """
    xv = x.value
    if b.batched:
        if xv.dim() != out.dim() or xv.shape[0] != out.shape[0]:
            raise ShapeError(f"broadcasting {tuple(xv.shape)} to {tuple(out.shape)} moves the "
                             "batch dimension (dim 0); keep dim 0 as the batch")
        return x
    if xv.dim() < out.dim():
        shape = (1,) * (out.dim() - xv.dim()) + tuple(xv.shape)
        return Traced(b.call(ops.reshape, x, shape), xv.reshape(shape))
    return x


# ---- identities and casts ---------------------------------------------------------------------

@_onnx_mapping(OnnxCopyIdentity, OnnxDropoutDynamic)
def _identity(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    return Traced(args[0].node, out)


@_onnx_mapping(OnnxCast)
def _cast(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxCast) -> Result:
    if out.dtype != args[0].value.dtype:
        b.unsupported(f"Cast to {out.dtype}", "remove the cast; certfx computes in the "
                           "input's dtype")
    return Traced(args[0].node, out)


@_onnx_mapping(OnnxShape, OnnxConstantOfShape, OnnxRange)
def _shape(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    return Traced(None, out)  # the input's (fixed) shape: metadata, not a perturbed value


# ---- affine ops -------------------------------------------------------------------------------

def _matmul(b: Builder, a: Any, w: Any, out: Tensor) -> Result:
    """``a @ w`` (numpy semantics) with exactly one perturbed factor."""
    if _live(a) and _live(w):
        b.unsupported("MatMul of two perturbed tensors", "only products with a "
                           "constant factor are supported (a product needs a non-linear rule)")
    if _live(a):
        x, c = a, _const(w)
        if c.dim() == 2:  # x @ W == linear(x, W^T)
            return b.call(ops.linear, x, _weight(b, c.t().contiguous()), None)
        if c.dim() == 1:  # x @ v: dot product over the last dim
            node = b.call(ops.linear, x, _weight(b, c.reshape(1, -1)), None)
            return b.reshape_to(Traced(node, torch.matmul(x.value, c.reshape(-1, 1))), out)
        if x.value.dim() == 1:
            b.unsupported("MatMul of a vector with a stack of matrices",
                               "reshape the input to a matrix first")
        return b.call(ops.matmul, _align(b, x, out), c)
    x, c = w, _const(a)  # constant @ perturbed
    if c.dim() > 2:
        b.unsupported("MatMul of a constant stack of matrices with the input",
                           "use a 2-D constant left factor")
    mat = c if c.dim() == 2 else c.reshape(1, -1)
    if x.value.dim() == 1:  # W @ x == linear(x, W)
        node = b.call(ops.linear, x, _weight(b, mat), None)
        return node if c.dim() == 2 else b.reshape_to(Traced(node, mat @ x.value), out)
    if b.batched and x.value.dim() < 3:
        raise ShapeError("a constant @ input MatMul contracts over the batch dimension (dim 0) "
                         "of the input; transpose so that the input comes first")
    # W @ X == (X^T W^T)^T over the last two dims.
    rank = x.value.dim() + (0 if b.batched else 1)
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    t = b.call(ops.permute, x, tuple(perm))
    node = b.call(ops.permute, b.call(ops.linear, t, _weight(b, mat), None), tuple(perm))
    return node if c.dim() == 2 else b.reshape_to(Traced(node, mat @ x.value), out)


@_onnx_mapping(OnnxMatMul)
def _onnx_matmul(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    return _matmul(b, args[0], args[1], out)


def _transpose_2d(b: Builder, a: Any) -> Any:
    if not _live(a):
        return _const(a).t()
    if b.batched:
        raise ShapeError("Gemm with transA on the input moves the batch dimension (dim 0)")
    return Traced(b.call(ops.permute, a, (0, 2, 1)), a.value.t())


@_onnx_mapping(OnnxGemm)
def _gemm(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxGemm) -> Result:
    a, w = args[0], args[1]
    c = _arg(args, kwargs, 2, "input_c")
    if module.trans_a:
        a = _transpose_2d(b, a)
    if module.trans_b:
        w = _transpose_2d(b, w)
    if module.alpha != 1.0:  # fold alpha into the constant factor
        if not _live(w):
            w = _const(w) * module.alpha
        elif not _live(a):
            a = _const(a) * module.alpha
    product = torch.matmul(_const(a), _const(w))
    node = _matmul(b, a, w, product)
    if c is None:
        return node
    prod = node if isinstance(node, Traced) else Traced(node, product)
    if _live(c):
        term = c if module.beta == 1.0 else Traced(b.call(ops.mul, c, float(module.beta)),
                                                   c.value * module.beta)
        return b.call(ops.add, _align(b, prod, out), _align(b, term, out))
    bias = _const(c) * module.beta
    return _fuse_bias(b, prod, bias, out, None) or b.call(ops.add, _align(b, prod, out), bias)


def _fuse_bias(b: Builder, x: Traced, bias: Tensor, out: Tensor,
               source_index: int | None) -> fx.Node | None:
    """Make ``x + bias`` the bias of ``x``'s bias-free ``linear`` node, when nothing else
    reads that node and ``bias`` is one value per output feature."""
    node = x.node
    if (node is None or node.target is not ops.linear or node.args[2] is not None
            or node.users or x.value.dim() == 0 or tuple(out.shape) != tuple(x.value.shape)):
        return None
    if source_index is not None:  # the source value must have no other reader either
        src = b.current.args[source_index] if b.current is not None else None
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            return None
    k = x.value.shape[-1]
    if bias.numel() == 1:
        vector = bias.reshape(()).expand(k)
    elif bias.dim() >= 1 and bias.shape[-1] == k and bias.numel() == k:
        vector = bias.reshape(k)
    else:
        return None
    weight = node.args[1]
    with b.graph.inserting_before(node):
        attr = b.constant(vector.to(x.value.dtype).clone(), f"{b.current.name}_bias"
                          if b.current is not None else "bias")
    node.args = (node.args[0], weight, attr)
    if b.current is not None and SOURCE_KEY in b.current.meta:
        here = b.current.meta[SOURCE_KEY]
        node.meta[SOURCE_KEY] = f"{node.meta[SOURCE_KEY]} + {here}" if SOURCE_KEY in \
            node.meta else here
    return node


_BINARY_KIND = {torch.add: "Add", torch.sub: "Sub", torch.mul: "Mul"}


@_onnx_mapping(OnnxBinaryMathOperation)
def _binary(b: Builder, args: Args, kwargs: Kwargs, out: Any,
            module: OnnxBinaryMathOperation) -> Result:
    kind = _BINARY_KIND.get(module.math_op_function, "Div")
    x, y = args[0], args[1]
    if module.broadcast == 1 and module.axis is not None:  # opset < 7 broadcasting
        if _live(y):
            b.unsupported(f"{kind} with legacy broadcast of a perturbed tensor",
                               "upgrade the model to opset >= 7")
        y = old_style_broadcast(_const(x), _const(y), module.axis)
    if kind == "Div" and _live(y):
        return _divide_by_perturbed(b, x, y, out)
    if _live(x) and _live(y):
        # Mul of two perturbed tensors is bilinear, never the affine ``mul`` (whose rules take
        # the second factor as a constant: unsound): ``product`` (ACE App. H.5, Eq. 28–29).
        op = {"Add": ops.add, "Sub": ops.sub, "Mul": ops.product}[kind]
        return b.call(op, _align(b, x, out), _align(b, y, out))
    first = _live(x)
    live, c = (x, _const(y)) if first else (y, _const(x))
    if not isinstance(c, Tensor):
        c = torch.as_tensor(c, dtype=out.dtype)
    if kind in ("Add", "Sub") and first or kind == "Add":  # x + c, c + x, x - c: a bias?
        fused = _fuse_bias(b, live, c if kind == "Add" else -c, out, 0 if first else 1)
        if fused is not None:
            return fused
    live = _align(b, live, out)
    if kind == "Add":
        return b.call(ops.add, live, c)
    if kind == "Sub":
        return b.call(ops.sub, live, c) if first else b.call(ops.sub, c, live)
    if kind == "Mul":
        return b.call(ops.mul, live, c)
    if not torch.is_floating_point(c) or bool((c == 0).any()):
        b.unsupported("Div by zero or by an integer constant", "divide by a non-zero "
                           "floating-point constant")
    return b.call(ops.div, live, c)


def _divide_by_perturbed(b: Builder, x: Any, y: Traced, out: Tensor) -> Result:
    """``x / y`` with a perturbed divisor: ``x · (1/y)``, the reciprocal by its own rule, then a
    ``product`` when ``x`` is perturbed too, or ``mul`` by the constant ``x``."""
    if not torch.is_floating_point(y.value):
        b.unsupported("Div by an integer tensor", "divide floating-point tensors")
    inv = Traced(b.call(ops.reciprocal, y), torch.reciprocal(y.value))
    if _live(x):
        return b.call(ops.product, _align(b, x, out), _align(b, inv, out))
    c = _const(x)
    if not isinstance(c, Tensor):
        c = torch.as_tensor(c, dtype=out.dtype)
    if c.numel() == 1 and float(c) == 1.0 and tuple(inv.value.shape) == tuple(out.shape):
        return inv.node  # 1 / y
    return b.call(ops.mul, _align(b, inv, out), c)


@_onnx_mapping(OnnxReciprocal)
def _reciprocal(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    return b.call(ops.reciprocal, args[0])


@_onnx_mapping(OnnxNeg)
def _neg(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    return b.call(ops.neg, args[0])


@_onnx_mapping(OnnxBatchNorm)
def _batch_norm(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxBatchNorm) -> Result:
    x, stats = args[0], [_arg(args, kwargs, i, n) for i, n in
                         enumerate(["weight", "bias", "running_mean", "running_var"], 1)]
    if any(_live(s) for s in stats):
        b.unsupported("BatchNormalization with input-dependent parameters",
                           "make scale, bias, mean and variance constants")
    weight, bias, mean, var = (_const(s) for s in stats)
    return b.call(ops.batch_norm, x, mean, var, weight, bias, float(module.epsilon))


# ---- activations ------------------------------------------------------------------------------

@_onnx_mapping(OnnxClip)
def _clip(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxClip) -> Result:
    lo = -math.inf if module.min_val is None else float(module.min_val)
    hi = math.inf if module.max_val is None else float(module.max_val)
    return b.call(ops.hardtanh, args[0], lo, hi)


@_onnx_mapping(OnnxFunction)
def _function(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxFunction) -> Result:
    if module.function is torch.tanh:
        return b.call(ops.tanh, args[0])
    if module.function is torch.exp:
        return b.call(ops.exp, args[0])
    if module.function is torch.log:
        return log_of(b, args[0])  # log(exp(y)) = y, e.g. Log after Softmax
    name = getattr(module.function, "__name__", str(module.function)).capitalize()
    b.unsupported(name, f"certfx has no core op for {name}; add one to certfx.ops with "
                       "a rule per domain, or remove it from the model")


@_onnx_mapping(OnnxSoftmaxV1V11)
def _softmax_v1(b: Builder, args: Args, kwargs: Kwargs, out: Any,
                module: OnnxSoftmaxV1V11) -> Result:
    """(Log)Softmax before opset 13: over the input flattened from ``axis`` on."""
    x = args[0]
    rank = x.value.dim()
    axis = module.axis % rank
    if axis == rank - 1:
        return softmax(b, x, axis, log=module.is_log)
    flat_value = torch.flatten(x.value, start_dim=axis)
    flat = Traced(b.reshape_to(x, flat_value), flat_value)
    return b.reshape_to(Traced(softmax(b, flat, -1, log=module.is_log), flat_value), out)


# ---- shapes -----------------------------------------------------------------------------------

@_onnx_mapping(OnnxReshape, OnnxFlatten, OnnxSqueezeStaticAxes, OnnxSqueezeDynamicAxes,
              OnnxUnsqueezeStaticAxes, OnnxUnsqueezeDynamicAxes)
def _reshape(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    return b.reshape_to(args[0], out)


@_onnx_mapping(OnnxExpand)
def _expand(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    if out.numel() != args[0].value.numel():
        b.unsupported("Expand that broadcasts a perturbed tensor", "only shape changes "
                           "that keep every entry are supported")
    return b.reshape_to(args[0], out)


def _permute(b: Builder, x: Traced, perm: Sequence[int]) -> Result:
    rank = x.value.dim()
    dims = [int(d) % rank for d in perm]
    if b.batched:
        if dims[0] != 0:
            raise ShapeError(f"Transpose with perm {list(perm)} moves the batch dimension (dim 0)")
        return b.call(ops.permute, x, tuple(dims))
    return b.call(ops.permute, x, (0, *[d + 1 for d in dims]))


@_onnx_mapping(OnnxTranspose)
def _transpose(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxTranspose) -> Result:
    x = args[0]
    perm = module.perm if module.perm is not None else list(range(x.value.dim()))[::-1]
    return _permute(b, x, perm)


@_onnx_mapping(OnnxConcat)
def _concat(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxConcat) -> Result:
    pieces = list(args)
    rank = out.dim()
    axis = b.axis(module.axis, rank)
    if all(_live(p) for p in pieces):
        return b.call(ops.concat, pieces, axis)
    # Constant pieces cannot carry the batch: zero-pad every perturbed piece to the full size
    # along the axis and add one constant holding the constant pieces (exact: the supports are
    # disjoint).
    src_axis = module.axis % rank
    canon_rank = rank + (0 if b.batched else 1)
    full = torch.zeros_like(out)
    total, offset, acc = out.shape[src_axis], 0, None
    for piece in pieces:
        size = _const(piece).shape[src_axis]
        if _live(piece):
            pads = (0, 0) * (canon_rank - 1 - axis) + (offset, total - offset - size)
            padded = b.call(ops.pad, piece, pads, 0.0)
            acc = padded if acc is None else b.call(ops.add, acc, padded)
        else:
            full.narrow(src_axis, offset, size).copy_(_const(piece).expand_as(
                full.narrow(src_axis, offset, size)))
        offset += size
    return b.call(ops.add, acc, full)


@_onnx_mapping(OnnxSlice)
def _slice(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    x = args[0]
    starts, ends = _ints(_arg(args, kwargs, 1, "starts")), _ints(_arg(args, kwargs, 2, "ends"))
    assert starts is not None and ends is not None
    axes = _ints(_arg(args, kwargs, 3, "axes")) or list(range(len(starts)))
    steps = _ints(_arg(args, kwargs, 4, "steps")) or [1] * len(starts)
    rank = x.value.dim()
    result: Any = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            b.unsupported("Slice with a negative step", "use a positive step")
        size = x.value.shape[axis % rank]
        lo, hi, st = slice(start, end, step).indices(size)
        if (lo, hi, st) == (0, size, 1):
            continue  # the whole axis: nothing to do (also for the batch dim)
        result = Traced(b.call(ops.strided_slice, result, b.axis(axis, rank), lo, hi, st), None)
    return Traced(result.node, out)


@_onnx_mapping(OnnxGather)
def _gather(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxGather) -> Result:
    x, index = args[0], args[1]
    if _live(index) or not _live(x):
        b.unsupported("Gather with input-dependent indices", "use constant indices")
    rank = x.value.dim()
    axis = module._axis % rank
    size = x.value.shape[axis]
    idx = [int(i) % size for i in torch.as_tensor(_const(index)).reshape(-1).tolist()]
    steps = {j - i for i, j in zip(idx, idx[1:])}
    if not idx or len(steps) > 1 or (steps and min(steps) <= 0):
        b.unsupported("Gather with non-contiguous indices",
                           "only indices forming an increasing arithmetic sequence are supported")
    step = steps.pop() if steps else 1
    node = b.call(ops.strided_slice, x, b.axis(axis, rank), idx[0], idx[-1] + 1, step)
    sliced = x.value.narrow(axis, idx[0], idx[-1] + 1 - idx[0])
    sliced = sliced.index_select(axis, torch.arange(0, sliced.shape[axis], step))
    if tuple(sliced.shape) == tuple(out.shape):
        return node
    return b.reshape_to(Traced(node, sliced), out)


def _pad_common(b: Builder, x: Traced, pads: list[int], mode: str, value: float) -> Result:
    if mode != "constant":
        b.unsupported(f"Pad with mode {mode!r}", "only constant padding is supported")
    if not math.isfinite(value):
        b.unsupported(f"Pad with value {value} (asymmetric max-pool padding)",
                           "use symmetric pads in MaxPool")
    rank = x.value.dim()
    keep = rank - (1 if b.batched else 0)  # pairs that may pad: the non-batch dims
    pads = list(pads)
    while len(pads) // 2 > keep or (pads and pads[-2:] == [0, 0]):
        if pads[-2:] != [0, 0]:
            raise ShapeError("Pad pads the batch dimension (dim 0)")
        pads = pads[:-2]
    if not pads:
        return Traced(x.node, x.value)
    return b.call(ops.pad, x, tuple(pads), float(value))


@_onnx_mapping(OnnxPadStatic)
def _pad_static(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: OnnxPadStatic) -> Result:
    return _pad_common(b, args[0], [int(p) for p in module.pads], module.mode,
                       float(module.constant_value))


@_onnx_mapping(OnnxPadDynamic)
def _pad_dynamic(b: Builder, args: Args, kwargs: Kwargs, out: Any,
                 module: OnnxPadDynamic) -> Result:
    pads, value = _ints(_arg(args, kwargs, 1, "pads")), _arg(args, kwargs, 2, "constant_value")
    if _live(value):
        b.unsupported("Pad with an input-dependent value", "use a constant value")
    value = 0.0 if value is None else float(torch.as_tensor(_const(value)).reshape(-1)[0])
    assert pads is not None
    return _pad_common(b, args[0], _onnx_padding_to_torch(pads), module.mode, value)


# ---- reductions -------------------------------------------------------------------------------

def _reduce(b: Builder, x: Traced, axes: Sequence[int] | None, keepdims: bool,
            op: Callable[..., Tensor]) -> Result:
    rank = x.value.dim()
    dims = list(range(rank)) if not axes else list(axes)
    return b.call(op, x, tuple(sorted(b.axis(d, rank) for d in dims)), bool(keepdims))


@_onnx_mapping(OnnxGlobalAveragePool, OnnxGlobalAveragePoolWithKnownInputShape)
def _global_avg_pool(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    x = args[0]
    return _reduce(b, x, list(range(2, x.value.dim())), True, ops.reduce_mean)


@_onnx_mapping(OnnxReduceStaticAxes)
def _reduce_static(b: Builder, args: Args, kwargs: Kwargs, out: Any,
                   module: OnnxReduceStaticAxes) -> Result:
    op = {"ReduceMean": ops.reduce_mean, "ReduceSum": ops.reduce_sum}.get(module.operation_type)
    if op is None:
        b.unsupported(module.operation_type, "only ReduceMean and ReduceSum are "
                           "supported")
    return _reduce(b, args[0], module.axes, module.keepdims, op)


@_onnx_mapping(OnnxReduceSumStaticAxes, OnnxReduceSumDynamicAxes)
def _reduce_sum(b: Builder, args: Args, kwargs: Kwargs, out: Any, module: Any) -> Result:
    if isinstance(module, OnnxReduceSumStaticAxes):
        axes = module._axes
    else:
        axes = _ints(_arg(args, kwargs, 1, "axes"))
    if not axes and module._noop_with_empty_axes:
        return Traced(args[0].node, out)
    return _reduce(b, args[0], axes, bool(module._keepdims), ops.reduce_sum)
