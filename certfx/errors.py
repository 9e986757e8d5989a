"""The certfx error hierarchy: every bad input raises a subclass of :class:`CertfxError`.

Each message says what was wrong and what to do about it; the CLI prints it as one line and
exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CertfxError",
    "ModelLoadError",
    "TraceError",
    "UnsupportedOpsError",
    "UnsupportedOp",
    "ShapeError",
    "InvalidValueError",
    "SpecError",
    "PassError",
    "DataError",
    "DataNotFoundError",
]


class CertfxError(Exception):
    """Base class of all errors certfx raises on purpose."""


class ModelLoadError(CertfxError):
    """A model file is missing, corrupt, or has a form certfx cannot take (several inputs, …)."""


class TraceError(CertfxError):
    """``torch.fx`` could not trace a module (data-dependent control flow, …)."""


@dataclass(frozen=True)
class UnsupportedOp:
    """One node that certfx (or a chosen domain) cannot handle.

    Attributes:
        node: the FX node name.
        op: what the node computes (module class, function or ONNX op type).
        where: the ONNX node name or the source line that produced it.
        hint: what to add or change so that it is supported.
    """

    node: str
    op: str
    where: str
    hint: str

    def __str__(self) -> str:
        where = f" at {self.where}" if self.where else ""
        return f"{self.node}: {self.op}{where} — {self.hint}"


class UnsupportedOpsError(CertfxError):
    """Some nodes are not supported; *all* of them are listed at once."""

    def __init__(self, context: str, ops: list[UnsupportedOp]):
        self.context = context
        self.ops = list(ops)
        lines = "\n  ".join(str(o) for o in self.ops)
        super().__init__(f"{context}: {len(self.ops)} unsupported node(s):\n  {lines}")


class ShapeError(CertfxError):
    """An input's shape does not match the model, or a model has no single fixed shape."""


class InvalidValueError(CertfxError):
    """NaN/inf in inputs or weights, negative ε, lower > upper, and similar bad values."""


class DataError(CertfxError):
    """A data set file is corrupt or does not hold what was asked for (shape, labels, values)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No data where it was looked for; the message lists the places and how to pass a copy."""


class SpecError(CertfxError):
    """A malformed input or output specification."""


class PassError(CertfxError):
    """A compiler pass failed; the message names the pass and the passes run before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.before = list(before)
        done = ", ".join(before) if before else "none"
        super().__init__(
            f"pass '{pass_name}' failed (passes run before it: {done}): "
            f"{type(cause).__name__}: {cause}"
        )
