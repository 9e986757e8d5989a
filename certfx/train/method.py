"""What a certified-training method is in certfx, and the registry of methods.

A method is a loss over generated graphs: it receives the user's ``nn.Module`` once, compiles the
abstract (and, for TAPS/COLT, split) views of it with the passes, and then maps a batch
``(x, y)`` and the step's :class:`StepContext` (ε, schedule progress, random generator) to a
:class:`LossOutput`. The model stays an ordinary module and the training loop
(:mod:`certfx.train.loop`) is the same for every method.

Every hyperparameter lives in the method's ``Options`` dataclass with the paper's default; a
field's ``metadata["help"]`` becomes the help text of its ``certfx train`` flag.

Example:
    >>> get_method("ibp").Options().fast_reg
    0.5
    >>> {"standard", "pgd", "ibp", "crown-ibp", "sabr"} <= set(METHODS)
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import certfx
from certfx.domains import Interval
from certfx.errors import CertfxError
from certfx.passes.expose import expose
from certfx.specs import LinfBall

__all__ = [
    "METHODS",
    "ActivationBounds",
    "BoundsAndActivations",
    "LossOutput",
    "Method",
    "StepContext",
    "get_method",
    "option",
    "register_method",
]

METHODS: dict[str, type[Method]] = {}


def option(default: Any, help: str) -> Any:
    """A hyperparameter field with its paper default and its help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class StepContext:
    """Where training is at one optimizer step.

    Attributes:
        epoch: the epoch, from 0.
        step: the global optimizer step, from 0.
        eps: the current (annealed) training radius.
        eps_target: the final training radius.
        progress: the ε ramp's progress in ``[0, 1]`` (1 once the target is reached).
        generator: random numbers for attacks and starts, on the data's device.
    """

    epoch: int
    step: int
    eps: float
    eps_target: float
    progress: float
    generator: torch.Generator


@dataclass
class LossOutput:
    """A method's loss for one batch and the numbers it reports (averaged per epoch)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class of training methods (see the module docstring).

    Args:
        model: the network, already on its training device.
        example_input: one batch of inputs (shape and device).
        options: an instance of ``Options`` (default: the paper's settings).
        input_range: the valid input range (pixel space ``[0, 1]``).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = type(None)
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module, example_input: Tensor, options: Any = None,
                 input_range: tuple[float, float] = (0.0, 1.0)):
        self.model = model
        self.example_input = example_input[:1]
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise CertfxError(f"method '{self.name}' takes {self.Options.__name__}, got "
                              f"{type(self.options).__name__}")
        self.input_range = input_range
        self.total_epochs: int | None = None  # set by the training loop (COLT's stages)

    def loss(self, x: Tensor, y: Tensor, ctx: StepContext) -> LossOutput:
        """The training loss of a batch (differentiable w.r.t. the model's parameters)."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (COLT changes its stage here)."""

    def on_train_end(self) -> None:
        """Called when training ends (COLT unfreezes the layers it froze)."""

    def compile(self, domain: str, model: nn.Module | None = None,
                example_input: Tensor | None = None, **kwargs: Any) -> certfx.CertifiedModule:
        """``certfx.compile`` of the model (or a part of it) over the valid input range."""
        lo, hi = self.input_range
        x = self.example_input if example_input is None else example_input
        return certfx.compile(self.model if model is None else model, domain=domain,
                              input_spec=LinfBall(0.0, lo, hi), example_input=x, **kwargs)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    if not cls.name or not dataclasses.is_dataclass(cls.Options):
        raise CertfxError(f"{cls.__name__} needs a name and an Options dataclass")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise CertfxError(f"unknown training method '{name}'; choose one of "
                          f"{', '.join(sorted(METHODS))}") from None


def _load_builtin_methods() -> None:
    import certfx.train.methods  # noqa: F401 - registers the built-in methods


@dataclass
class BoundsAndActivations:
    """What :class:`ActivationBounds` returns for a batch."""

    margins: Tensor                 # lower bounds on z_y − z_j, (B, K − 1)
    activations: list[Interval]     # the box of every ReLU's input, in graph order
    first_layer_input: Interval     # the box entering the first linear/conv layer


class ActivationBounds:
    """Margin bounds of a compiled module together with the bounds of every ReLU's input and
    of the first weighted layer's input (after the model's own normalization).

    Shi et al.'s (2021) regularizers read these intermediate boxes, which the generated module
    computes anyway; :func:`certfx.passes.expose.expose` returns them alongside the output.
    """

    def __init__(self, cm: certfx.CertifiedModule):
        from certfx import ops
        nodes = [n for n in cm.network.graph.nodes if n.op == "call_function"]
        acts = [n.args[0].name for n in nodes if n.target in (ops.relu, ops.leaky_relu)]
        first = next((n.args[0].name for n in nodes if n.target in (ops.linear, ops.conv)),
                     None)
        if first is None or not acts:
            raise CertfxError("the model has no linear/conv layer followed by ReLUs, which the "
                              "IBP regularizers of Shi et al. (2021) need; use --fast-reg 0")
        self.cm = cm
        self.names = [*acts, first]
        self.module = expose(self.names)(cm.bounds)

    def __call__(self, x: Tensor, y: Tensor, eps: float | Tensor) -> BoundsAndActivations:
        """The bounds over the ε-ball around ``x`` (labels ``y``)."""
        lo, hi = self.cm.input_bounds(x, eps)
        spec = self.cm.output_spec.matrix(y, self.cm.num_outputs, dtype=x.dtype)
        out, values = self.module(lo, hi, spec)
        return BoundsAndActivations(out.lower, list(values[:-1]), values[-1])
