"""The ``normalize`` pass: rewrite any traced FX graph into the canonical graph of core ops.

The source graph (from ``torch.fx.symbolic_trace`` or onnx2torch) is run once on an example
input. Every node whose value does not depend on the input is *folded* into a constant (parameters
and buffers of the source module are kept as the same objects, so the canonical graph shares
them); every node that does depend on the input is *mapped* onto core ops by a mapping
registered for its module class, function or method name (:data:`MAPPINGS`). The concrete values
of that example run give the mappings their shapes, so reshapes, flattens and squeezes all become
one ``reshape`` to a known per-example shape.

Every node without a mapping is collected, and all of them are reported together in one
:class:`~certfx.errors.UnsupportedOpsError`, each with its source line or ONNX node name.

Batch handling: a *batched* source has the batch in dim 0 of its input and of every value, like
the canonical graph. An *unbatched* source (ONNX models whose input is e.g. ``[5]``) has none;
the canonical graph adds it, and mappings shift every source axis by one (:meth:`Builder.axis`).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.ReLU())
    >>> gm = to_canonical(torch.fx.symbolic_trace(net), torch.zeros(1, 2, 2))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['reshape', 'linear', 'relu']
    >>> gm.m1_weight is net[1].weight
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.fx as fx
from torch import Tensor, nn

from certfx import ops
from certfx.errors import ShapeError, TraceError, UnsupportedOp, UnsupportedOpsError
from certfx.specs import check_finite

__all__ = [
    "Traced",
    "Builder",
    "MAPPINGS",
    "mapping",
    "method_key",
    "to_canonical",
    "SOURCE_KEY",
    "normalize",
]

SOURCE_KEY = "certfx.source"  # node.meta key: where the node came from (ONNX name / source line)


@dataclass(frozen=True)
class Traced:
    """A value that depends on the perturbed input.

    Attributes:
        node: the canonical node computing it, or ``None`` for non-tensor values derived from the
            input's shape (``x.size(0)``), which only shape-taking mappings may consume.
        value: its concrete value in the example run (source semantics).
    """

    node: fx.Node | None
    value: Any


Mapping = Callable[..., Any]
MAPPINGS: dict[Any, Mapping] = {}


def method_key(name: str) -> tuple[str, str]:
    """Registry key of a ``call_method`` target (``method_key("view")``)."""
    return ("method", name)


def mapping(*keys: Any) -> Callable[[Mapping], Mapping]:
    """Register a mapping for module classes, functions or ``method_key(name)`` keys.

    A mapping is called as ``fn(b, args, kwargs, out, module)`` where ``b`` is the
    :class:`Builder`, ``args``/``kwargs`` hold :class:`Traced` values for perturbed inputs and
    plain constants otherwise, ``out`` is the node's concrete output, and ``module`` the called
    module (``None`` for functions and methods). It returns a canonical ``fx.Node``, a
    :class:`Traced`, or (for identities) the incoming :class:`Traced`.
    """

    def register(fn: Mapping) -> Mapping:
        for key in keys:
            if key in MAPPINGS:
                raise ValueError(f"normalize mapping for {key!r} registered twice")
            MAPPINGS[key] = fn
        return fn

    return register


class Builder:
    """Builds the canonical graph: constants as attributes of a fresh root, core-op calls."""

    def __init__(self, batched: bool, source: nn.Module | None = None):
        self.batched = batched
        # Constants that are parameters/buffers of the source keep their qualified names.
        self._source_names: dict[int, str] = {}
        if source is not None:
            for name, t in list(source.named_parameters(remove_duplicate=False)) + list(
                    source.named_buffers(remove_duplicate=False)):
                self._source_names.setdefault(id(t), name)
        self.root = nn.Module()
        self.graph = fx.Graph()
        # id(tensor) -> (tensor, node); holding the tensor keeps its id from being reused.
        self._constants: dict[int, tuple[Tensor, fx.Node]] = {}
        self._names: set[str] = set()
        self.current: fx.Node | None = None  # the source node being mapped (for meta)

    # ---- constants -------------------------------------------------------------------------
    def constant(self, value: Tensor, hint: str = "const") -> fx.Node:
        """A ``get_attr`` node for a constant tensor; a parameter keeps its identity."""
        key = id(value)
        if key in self._constants:
            return self._constants[key][1]
        hint = self._source_names.get(key, hint)
        check_finite(value.detach(), f"model constant '{hint}'")
        name = self._unique(re.sub(r"\W+", "_", hint).strip("_") or "const")
        if isinstance(value, nn.Parameter):
            self.root.register_parameter(name, value)
        else:
            self.root.register_buffer(name, value.detach())
        node = self.graph.get_attr(name)
        self._constants[key] = (value, node)
        return node

    def _unique(self, name: str) -> str:
        if name[0].isdigit():
            name = "m" + name
        candidate, k = name, 1
        while candidate in self._names or hasattr(nn.Module, candidate):
            candidate, k = f"{name}_{k}", k + 1
        self._names.add(candidate)
        return candidate

    # ---- calls -----------------------------------------------------------------------------
    def call(self, op: Callable[..., Any], *args: Any) -> fx.Node:
        """Add ``op(*args)``; :class:`Traced` args become their nodes, tensors constants."""
        if not ops.is_core_op(op):
            raise TypeError(f"{op!r} is not a core op")
        node = self.graph.call_function(op, tuple(self._arg(a) for a in args))
        if self.current is not None:
            for key in ("stack_trace", SOURCE_KEY):
                if key in self.current.meta:
                    node.meta[key] = self.current.meta[key]
        return node

    def _arg(self, a: Any) -> Any:
        if isinstance(a, Traced):
            if a.node is None:
                raise ShapeError("a shape value derived from the input is used as a tensor")
            return a.node
        if isinstance(a, Tensor):
            return self.constant(a, f"{self.current.name if self.current else 'const'}_const")
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        return a

    def unsupported(self, what: str, hint: str) -> NoReturn:
        """Raise an :class:`UnsupportedOpsError` for the node being mapped (collected with all
        other unsupported nodes by :func:`to_canonical`)."""
        node = self.current
        raise UnsupportedOpsError("normalize", [UnsupportedOp(
            node.name if node is not None else "?", what, _where(node) if node is not None
            else "", hint)])

    # ---- axes and shapes -------------------------------------------------------------------
    def axis(self, axis: int, rank: int) -> int:
        """The canonical dim of source dim ``axis`` of a rank-``rank`` source tensor.

        Raises:
            ShapeError: when a batched source's op acts on the batch dim.
        """
        if not -rank <= axis < rank:
            raise ShapeError(f"axis {axis} out of range for a rank-{rank} tensor")
        axis %= rank
        if self.batched:
            if axis == 0:
                raise ShapeError("the op acts on the batch dimension (dim 0); certfx needs "
                                 "every op to treat examples independently")
            return axis
        return axis + 1

    def sample_shape(self, value: Tensor) -> tuple[int, ...]:
        """The per-example shape of a source value."""
        return tuple(value.shape[1:]) if self.batched else tuple(value.shape)

    def reshape_to(self, x: Traced, out: Tensor) -> fx.Node:
        """Canonical ``reshape`` of ``x`` to the shape of ``out`` (checks the batch is kept)."""
        if self.batched and (x.value.dim() == 0 or out.dim() == 0
                             or out.shape[0] != x.value.shape[0]):
            raise ShapeError(f"a reshape from {tuple(x.value.shape)} to {tuple(out.shape)} mixes "
                             "the batch dimension with the others; keep dim 0 as the batch")
        return self.call(ops.reshape, x, self.sample_shape(out))


def _where(node: fx.Node) -> str:
    """The ONNX node name or the user's source line (not torch's own frames) of a node."""
    if SOURCE_KEY in node.meta:
        return str(node.meta[SOURCE_KEY])
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    place = ""
    for k, line in enumerate(lines):
        match = re.match(r'File "([^"]+)", line (\d+)', line)
        if match and "/torch/" not in match.group(1).replace("\\", "/"):
            code = lines[k + 1] if k + 1 < len(lines) and not lines[k + 1].startswith("File ") \
                else ""
            place = f"{match.group(1)}:{match.group(2)}" + (f": {code}" if code else "")
    return place


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module" and module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    try:
        return fx.node._get_qualified_name(node.target)  # e.g. "torch.softmax"
    except Exception:  # not every callable has a qualified name
        return getattr(node.target, "__name__", str(node.target))


def _lookup(node: fx.Node, module: nn.Module | None) -> Mapping | None:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in MAPPINGS:
                return MAPPINGS[cls]
        return None
    if node.op == "call_method":
        return MAPPINGS.get(method_key(str(node.target)))
    return MAPPINGS.get(node.target)


def _concrete(a: Any) -> Any:
    if isinstance(a, Traced):
        return a.value
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    if isinstance(a, dict):
        return {k: _concrete(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_concrete(a.start), _concrete(a.stop), _concrete(a.step))
    return a


def _depends(a: Any) -> bool:
    if isinstance(a, Traced):
        return True
    if isinstance(a, (list, tuple)):
        return any(_depends(x) for x in a)
    if isinstance(a, dict):
        return any(_depends(x) for x in a.values())
    if isinstance(a, slice):
        return any(_depends(x) for x in (a.start, a.stop, a.step))
    return False


def _hint(node: fx.Node, module: nn.Module | None) -> str:
    what = _describe(node, module)
    if node.op == "call_module":
        return (f"register a mapping with @certfx.passes.mapping({what}) onto core ops, or "
                "rewrite the module with supported layers")
    return ("register a mapping with @certfx.passes.mapping(...) onto core ops of certfx.ops, "
            f"or avoid {what} in the model")


def to_canonical(source: fx.GraphModule, example_input: Tensor, batched: bool = True,
                 context: str = "normalize") -> fx.GraphModule:
    """Map a traced graph onto core ops (the ``normalize`` pass's work).

    Args:
        source: the traced module (torch.fx or onnx2torch).
        example_input: a concrete input in the source's own semantics (with a batch dim when
            ``batched``).
        batched: whether the source's tensors carry the batch in dim 0.
        context: names the model in error messages.

    Returns:
        The canonical GraphModule; ``gm.meta["certfx.input_shape"]`` holds the per-example input
        shape.

    Raises:
        UnsupportedOpsError: listing every node that has no mapping.
        TraceError: when the source graph has other than one tensor input or output.
    """
    from certfx.frontends import torch_ops  # noqa: F401  (registers the torch-level mappings)

    b = Builder(batched, source)
    env: dict[fx.Node, Any] = {}
    unsupported: list[UnsupportedOp] = []
    modules = dict(source.named_modules())
    inputs = [n for n in source.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise TraceError(f"{context}: the model takes {len(inputs)} inputs; certfx needs exactly "
                         "one input tensor")
    out_node: fx.Node | None = None

    for node in source.graph.nodes:
        b.current = node
        if node.op == "placeholder":
            x = b.graph.placeholder("x")
            env[node] = Traced(x, example_input)
            continue
        if node.op == "get_attr":
            env[node] = _fetch_attr(source, str(node.target))
            continue
        if node.op == "output":
            out_node = node
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        value = _run(source, node, module, _concrete(args), _concrete(kwargs))
        if not _depends((args, kwargs)):
            env[node] = value  # constant folding: the value does not depend on the input
            continue
        fn = _lookup(node, module)
        if fn is None:
            if not isinstance(value, Tensor):
                env[node] = Traced(None, value)  # e.g. x.shape, x.size(1): shape metadata
                continue
            unsupported.append(UnsupportedOp(node.name, _describe(node, module), _where(node),
                                             _hint(node, module)))
            # A stand-in node, so that the nodes after it are still checked (never returned).
            env[node] = Traced(b.graph.placeholder(f"unsupported_{node.name}"), value)
            continue
        try:
            result = fn(b, args, kwargs, value, module)
        except UnsupportedOpsError as err:
            unsupported.extend(err.ops)
            env[node] = Traced(b.graph.placeholder(f"unsupported_{node.name}"), value)
            continue
        env[node] = result if isinstance(result, Traced) else Traced(result, value)

    if unsupported:
        raise UnsupportedOpsError(f"{context}: cannot map the model onto certfx core ops",
                                  unsupported)
    b.current = None
    assert out_node is not None
    result = out_node.args[0]
    while isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    if not isinstance(result, fx.Node):
        raise TraceError(f"{context}: the model has several outputs; certfx needs exactly one "
                         "output tensor")
    final = env[result]
    if not isinstance(final, Traced) or final.node is None:
        raise TraceError(f"{context}: the model's output does not depend on its input")
    b.graph.output(final.node)
    gm = fx.GraphModule(b.root, b.graph, class_name="CanonicalGraph")
    gm.meta["certfx.input_shape"] = b.sample_shape(example_input)
    gm.meta["certfx.output_shape"] = b.sample_shape(final.value)
    return gm


def _fetch_attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run(source: fx.GraphModule, node: fx.Node, module: nn.Module | None, args: Any,
         kwargs: Any) -> Any:
    """Evaluate one source node on concrete values (eval semantics for dropout/batch norm)."""
    with torch.no_grad():
        if node.op == "call_module":
            assert module is not None
            was_training = module.training
            module.eval()
            try:
                return module(*args, **kwargs)
            finally:
                module.train(was_training)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, str(node.target))(*rest, **kwargs)
        target = node.target
        if target in (torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                      torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                      torch.nn.functional.alpha_dropout):
            kwargs = {**kwargs, "training": False}
        return target(*args, **kwargs)  # type: ignore[operator]


def normalize(example_input: Tensor, batched: bool = True, context: str = "normalize"):
    """The ``normalize`` pass: :func:`to_canonical` with a fixed example input."""
    from certfx.passes.infra import GraphPass

    return GraphPass("normalize", lambda gm: to_canonical(gm, example_input, batched, context))
