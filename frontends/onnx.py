"""The ONNX frontend: read, check and convert an ONNX model into a source graph for ``normalize``.

:func:`onnx_source` turns an ``onnx.ModelProto`` or an ``.onnx`` path into the onnx2torch
``GraphModule`` plus what ``normalize`` needs to know about it: an example input in the model's
own semantics and whether dim 0 of that input is a batch. On the way it

* rejects missing, corrupt and invalid files (:class:`~certfx.errors.ModelLoadError`) and NaN/inf
  weights (:class:`~certfx.errors.InvalidValueError`);
* decides the batch convention from the input shape: rank >= 2 with dim 0 equal to 1 or symbolic
  is *batched* (the example has batch 1); rank 1, or a fixed dim 0 > 1, is one *unbatched*
  example, to which the canonical graph adds a batch dim;
* upgrades old opsets that onnx2torch has no converter for (Flatten-1, Dropout-7, …) with the
  ONNX version converter, and lists every node that still cannot be converted in one
  :class:`~certfx.errors.UnsupportedOpsError`;
* records each node's ONNX name and op type in ``node.meta["certfx.source"]`` so that later
  errors point at the ONNX node, and freezes all weights (ONNX weights are constants, so
  ``fold_batchnorm`` may fold them).

The onnx2torch modules are mapped onto core ops in :mod:`certfx.frontends.onnx_ops`.

Example:
    >>> import onnx
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> import numpy as np
    >>> w = numpy_helper.from_array(np.ones((3, 2), np.float32), "W")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "tiny",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    >>> source, example, batched, name = onnx_source(model)
    >>> tuple(example.shape), batched, name
    ((1, 3), True, 'tiny')
    >>> [n.meta["certfx.source"] for n in source.graph.nodes if n.op == "call_module"]
    ["ONNX node 'fc' (MatMul)"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper
from torch import Tensor, nn

from certfx.errors import (ModelLoadError, ShapeError, UnsupportedOp,
                           UnsupportedOpsError)
from certfx.frontends import onnx_ops  # noqa: F401  (registers the onnx2torch mappings)
from certfx.passes.normalize import SOURCE_KEY
from certfx.specs import check_finite

__all__ = ["onnx_source"]

# Opsets to convert to, in order, when onnx2torch has no converter for a node at the model's own
# opset. 13 is the opset onnx2torch covers best; the others are fallbacks.
UPGRADE_OPSETS: tuple[int, ...] = (13, 17, 15, 11)

# Ops whose converters exist but assume a (N, C, *spatial) input; an unbatched input cannot
# reach them with its examples in dim 0.
_LAYOUT_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool",
                         "GlobalMaxPool", "BatchNormalization", "InstanceNormalization", "LpPool",
                         "LRN"})

# Optional extra outputs of single-output ops (their names, for messages).
_OPTIONAL_OUTPUTS = {"Dropout": "mask", "MaxPool": "Indices", "BatchNormalization": "running_mean"}


def onnx_source(obj: Any) -> tuple[fx.GraphModule, Tensor, bool, str]:
    """Load, check and convert an ONNX model for ``normalize``.

    Args:
        obj: an ``onnx.ModelProto`` or a path (``str`` / ``os.PathLike``) to an ``.onnx`` file.

    Returns:
        ``(source, example_input, batched, name)``: the onnx2torch ``GraphModule`` with frozen
        weights and ``certfx.source`` node metadata; a zero input in the ONNX model's own
        semantics (shape ``(1, *rest)`` when batched, the full input shape otherwise); whether
        dim 0 of the input is the batch; a display name for messages.

    Raises:
        ModelLoadError: missing or corrupt file, a model failing ``onnx.checker``, other than
            one input or one output, a non-float input.
        ShapeError: symbolic dims other than the batch dim, or an input without a shape.
        InvalidValueError: NaN or inf in an initializer or a ``Constant`` node.
        UnsupportedOpsError: every node onnx2torch cannot convert, at once.
    """
    model, name = _read(obj)
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # onnx raises ValidationError and a few others
        raise ModelLoadError(f"{name}: the ONNX model is invalid ({type(err).__name__}: "
                             f"{_first_line(err)}); re-export it or repair it so that "
                             "onnx.checker.check_model passes") from err
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as err:
        raise ModelLoadError(f"{name}: ONNX shape inference failed ({type(err).__name__}: "
                             f"{_first_line(err)})") from err
    _check_finite_weights(model, name)
    input_info = _single_input(model, name)
    _single_output(model, name)
    example, batched = _example_input(input_info, name)
    if not batched:
        _check_layout_ops(model, name, tuple(example.shape))
    _drop_unused_outputs(model, name)
    model = _convertible(model, name)
    source = _convert(model, name)
    for p in source.parameters():
        p.requires_grad_(False)
    return source, example, batched, name


# ---- reading and checking ---------------------------------------------------------------------

def _read(obj: Any) -> tuple[onnx.ModelProto, str]:
    if isinstance(obj, onnx.ModelProto):
        return obj, obj.graph.name or "ONNX model"
    if not isinstance(obj, (str, os.PathLike)):
        raise ModelLoadError(f"cannot read an ONNX model from a {type(obj).__name__}; pass an "
                             "onnx.ModelProto or a path to an .onnx file")
    path = Path(obj)
    if not path.exists():
        raise ModelLoadError(f"ONNX file '{path}' does not exist; check the path")
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is not a file; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # DecodeError, RuntimeError, …
        raise ModelLoadError(f"'{path}' is not a readable ONNX model ({type(err).__name__}: "
                             f"{_first_line(err)}); the file is corrupt or not in ONNX "
                             "protobuf format") from err
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"'{path}' holds no ONNX graph; the file is corrupt or not an "
                             "ONNX model")
    return model, path.name


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_finite_weights(model: onnx.ModelProto, name: str) -> None:
    """NaN/inf in initializers or ``Constant`` values make every bound meaningless."""
    tensors: list[tuple[str, onnx.TensorProto]] = [
        (f"initializer '{t.name}'", t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        what = f"Constant node '{node.name or node.output[0]}'"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append((what, attr.t))
            elif attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS):
                values = [attr.f] if attr.type == onnx.AttributeProto.FLOAT else attr.floats
                check_finite(torch.tensor(list(values), dtype=torch.float64),
                             f"{name}: ONNX {what}")
    for what, proto in tensors:
        if proto.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                   onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        try:
            array = numpy_helper.to_array(proto)
        except Exception as err:
            raise ModelLoadError(f"{name}: cannot read the {what} ({_first_line(err)})") from err
        check_finite(torch.from_numpy(array.astype("float64", copy=False)),
                     f"{name}: ONNX {what}")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _single_input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
        raise ModelLoadError(f"{name}: the model has {len(inputs)} inputs ({names}); certfx "
                             "needs exactly one input tensor (fold the others into constants "
                             "or concatenate them into one input)")
    return inputs[0]


def _single_output(model: onnx.ModelProto, name: str) -> None:
    outputs = list(model.graph.output)
    if len(outputs) != 1:
        names = ", ".join(f"'{o.name}'" for o in outputs) or "none"
        raise ModelLoadError(f"{name}: the model has {len(outputs)} outputs ({names}); certfx "
                             "needs exactly one output tensor (remove the others from "
                             "graph.output)")


def _example_input(info: onnx.ValueInfoProto, name: str) -> tuple[Tensor, bool]:
    """A zero input in the model's semantics and whether its dim 0 is the batch."""
    tensor_type = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        raise ShapeError(f"{name}: input '{info.name}' has no shape; give it a fixed shape "
                         "such as [1, 3, 32, 32] in the ONNX file")
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dtype: torch.dtype | None = torch.from_numpy(np.zeros(0, np_dtype)).dtype
    except Exception:  # no numpy equivalent (strings, bfloat16, …)
        dtype = None
    if dtype is None or not dtype.is_floating_point:
        raise ModelLoadError(f"{name}: input '{info.name}' has element type "
                             f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}; certfx "
                             "needs a floating-point input")
    dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in tensor_type.shape.dim]
    if not dims:
        raise ShapeError(f"{name}: input '{info.name}' is a scalar; certfx needs an input "
                         "tensor of rank >= 1")
    symbolic = [i for i, d in enumerate(dims) if isinstance(d, str) or d <= 0]
    batch_dim = len(dims) >= 2 and (0 in symbolic or dims[0] == 1)
    spatial = [i for i in symbolic if not (batch_dim and i == 0)]
    if spatial:
        shown = [str(d) for d in dims]
        raise ShapeError(
            f"{name}: input '{info.name}' has shape [{', '.join(shown)}] with dynamic spatial "
            f"dims {spatial}; fix the shape with onnx.tools.update_model_dims."
            "update_inputs_outputs_dims(model, {input: [1, ...]}, {output: [...]}) or re-export "
            "the model with a fixed input size (only dim 0, the batch, may be symbolic)")
    if batch_dim:
        return torch.zeros((1, *[int(d) for d in dims[1:]]), dtype=dtype), True
    return torch.zeros(tuple(int(d) for d in dims), dtype=dtype), False


def _check_layout_ops(model: onnx.ModelProto, name: str, shape: tuple[int, ...]) -> None:
    bad = [UnsupportedOp(node.name or node.op_type, node.op_type, _where(node),
                         f"the model's input {list(shape)} has no batch dim (dim 0 is "
                         f"{shape[0]} and fixed), but {node.op_type} needs an (N, C, ...) input; "
                         "re-export the model with dim 0 equal to 1 or symbolic")
           for node in model.graph.node if node.op_type in _LAYOUT_OPS]
    if bad:
        raise UnsupportedOpsError(f"load {name}", bad)


def _where(node: onnx.NodeProto) -> str:
    return f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"


def _drop_unused_outputs(model: onnx.ModelProto, name: str) -> None:
    """Remove the unused optional outputs (dropout mask, max-pool indices, batch-norm running
    statistics) of ``model``'s nodes, in place.

    onnx2torch converts these nodes to single-output modules but, for a node that declares
    several outputs, indexes the module's result as a tuple, which would take the first row of
    the batch instead.
    """
    used = {value for node in model.graph.node for value in node.input}
    used.update(output.name for output in model.graph.output)
    bad = []
    for node in model.graph.node:
        if node.op_type not in _OPTIONAL_OUTPUTS or len(node.output) < 2:
            continue
        if any(out in used for out in node.output[1:]):
            bad.append(UnsupportedOp(node.name or node.op_type, node.op_type, _where(node),
                                     f"its optional output '{_OPTIONAL_OUTPUTS[node.op_type]}' "
                                     "is used; certfx supports only the main output"))
            continue
        del node.output[1:]
    if bad:
        raise UnsupportedOpsError(f"load {name}", bad)


# ---- conversion -------------------------------------------------------------------------------

def _version(model: onnx.ModelProto, domain: str) -> int:
    """The opset version of ``domain`` ("" and "ai.onnx" are the same domain)."""
    default = {"": "ai.onnx", "ai.onnx": ""}
    for entry in model.opset_import:
        if entry.domain == domain or entry.domain == default.get(domain):
            return int(entry.version)
    return 1


def _unconvertible(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes without an onnx2torch converter (or with a known-broken one) at the model's opset."""
    from onnx2torch.node_converters import get_converter

    bad = []
    for node in model.graph.node:
        version = _version(model, node.domain)
        try:
            get_converter(domain=node.domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            bad.append(node)
            continue
        # onnx2torch's Slice-1 module reads attributes it never sets; Slice-10+ works.
        if node.op_type == "Slice" and node.domain in ("", "ai.onnx") and version < 10:
            bad.append(node)
    return bad


def _convertible(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model itself, or its version-converted copy when onnx2torch lacks converters."""
    bad = _unconvertible(model)
    if not bad:
        return model
    current = _version(model, "")
    for target in UPGRADE_OPSETS:
        if target == current:
            continue
        try:
            converted = onnx.version_converter.convert_version(model, target)
        except Exception:  # the converter lacks an adapter for some node
            continue
        if not _unconvertible(converted):
            return onnx.shape_inference.infer_shapes(converted)
    raise UnsupportedOpsError(f"load {name}", [
        UnsupportedOp(node.name or node.op_type, f"{node.op_type} (opset {current})",
                      _where(node), "onnx2torch has no converter for it, also not after "
                      f"converting the model to opsets {list(UPGRADE_OPSETS)}; replace the op "
                      "or register a converter with onnx2torch.node_converters.add_converter")
        for node in bad])


def _convert(model: onnx.ModelProto, name: str) -> fx.GraphModule:
    import onnx2torch
    from onnx2torch.onnx_graph import OnnxGraph

    try:
        source = onnx2torch.convert(model)
    except Exception as err:
        failures = _converter_failures(model)
        if failures:
            raise UnsupportedOpsError(f"load {name}", failures) from err
        raise ModelLoadError(f"{name}: onnx2torch cannot convert the model "
                             f"({type(err).__name__}: {_first_line(err)})") from err
    nodes = OnnxGraph(model.graph).nodes  # onnx2torch's module names -> ONNX nodes
    _flatten_sequentials(source)
    for node in source.graph.nodes:
        if node.op == "call_module":
            onnx_node = nodes.get(str(node.target).split(".")[0])
            if onnx_node is not None:
                node.meta[SOURCE_KEY] = _where(onnx_node.proto)
        elif node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
            # getitem on a multi-output node: the place is the producing node's
            if SOURCE_KEY in node.args[0].meta:
                node.meta[SOURCE_KEY] = node.args[0].meta[SOURCE_KEY]
    return source


def _converter_failures(model: onnx.ModelProto) -> list[UnsupportedOp]:
    """Run every node's onnx2torch converter alone to name all failing nodes at once."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    graph = OnnxGraph(model.graph)
    failures = []
    for onnx_node in graph.nodes.values():
        proto = onnx_node.proto
        try:
            converter = get_converter(domain=proto.domain, operation_type=proto.op_type,
                                      version=_version(model, proto.domain))
            converter(onnx_node, graph)
        except Exception as err:
            failures.append(UnsupportedOp(proto.name or proto.op_type, proto.op_type,
                                          _where(proto), f"onnx2torch cannot convert it "
                                          f"({_first_line(err)}); change the node's attributes "
                                          "or replace the op"))
    return failures


def _flatten_sequentials(gm: fx.GraphModule) -> None:
    """Replace calls of ``nn.Sequential`` (padding + conv/pool, made by onnx2torch for
    asymmetric pads) by calls of its children, so each child meets its own mapping."""
    modules = dict(gm.named_modules())
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)),
                                                       nn.Sequential):
            continue
        seq = modules[str(node.target)]
        value: Any = node.args[0]
        with gm.graph.inserting_before(node):
            for child_name, _ in seq.named_children():
                value = gm.graph.call_module(f"{node.target}.{child_name}", (value,))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()

