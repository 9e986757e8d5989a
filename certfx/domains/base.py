"""The abstract-domain protocol and the rule registry that every domain file fills.

A :class:`Domain` maps each core op (a function of :mod:`certfx.ops`) to a *rule*: a plain
function taking the same arguments as the op, with abstract elements in place of the perturbed
tensors, and returning an element. Rules are registered with :meth:`Domain.rule`; ops without an
explicit rule get one *derived from their traits* by the domain's derivers (for instance the
interval domain's ``[f(l), f(u)]`` for monotone ops). Derived rules are ordinary module-level
functions of the domain's module, so generated code can import them by name.

Example:
    >>> from certfx.domains import get_domain
    >>> from certfx import ops
    >>> box = get_domain("box")
    >>> box.rule_for(ops.relu).__name__
    'box_relu'
    >>> get_domain("ibp") is box
    True
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from certfx.errors import CertfxError
from certfx.ops import CORE_OPS, OpTraits

__all__ = [
    "Domain",
    "Rule",
    "Deriver",
    "register_domain",
    "get_domain",
    "available_domains",
    "expose_to_codegen",
]

Rule = Callable[..., Any]
# A deriver returns a rule for an op from its traits, or None when the traits do not suffice.
Deriver = Callable[[Callable[..., Any], OpTraits], Rule | None]


@dataclass
class Domain:
    """One abstract domain: its name, element type, input rule and op rules.

    Attributes:
        name: canonical name (``"box"``).
        aliases: other accepted names (``"interval"``, ``"ibp"``).
        element: the element class the rules return.
        input_rule: builds the element of the input set from ``(lower, upper)`` tensors.
        module: the module that holds the rules (derived rules are added to it).
        prefix: prefix of rule function names (``box_linear``).
        derivers: tried in order for ops without an explicit rule.
        options: the frozen dataclass of the domain's options, if it has any; its fields are
            keyword arguments of ``input_rule`` (``lower`` writes them into the generated code).
        lowering: for domains that are not one forward rule per node (back-substitution), a
            function ``(GraphModule, options or None) -> GraphModule`` generating the whole
            bound module; ``passes.lower`` then delegates to it.
        ball_input: the input rule also takes ``ball=(center, radius)``, the ℓ2 ball of an
            ``L2Ball`` input spec (``lower`` adds a ``ball`` input to the generated module).
    """

    name: str
    element: type
    input_rule: Rule
    module: str
    prefix: str
    aliases: tuple[str, ...] = ()
    derivers: list[Deriver] = field(default_factory=list)
    options: type | None = None
    rules: dict[Callable[..., Any], Rule] = field(default_factory=dict)
    lowering: Callable[[Any, Any], Any] | None = None
    ball_input: bool = False

    def rule(self, *ops: Callable[..., Any]) -> Callable[[Rule], Rule]:
        """Decorator registering a rule for one or more core ops.

        Raises:
            ValueError: when an op already has an explicit rule in this domain.
        """

        def register(fn: Rule) -> Rule:
            for op in ops:
                if op not in CORE_OPS:
                    raise ValueError(f"{op!r} is not a core op of certfx.ops")
                if op in self.rules:
                    raise ValueError(f"domain {self.name}: {op.__name__} already has a rule")
                self.rules[op] = fn
            expose_to_codegen(fn)
            return fn

        return register

    def derive_missing(self) -> None:
        """Give every core op without an explicit rule a trait-derived one, if possible.

        Each derived rule becomes a module-level function ``<prefix>_<op>`` of ``self.module``,
        so generated code that names it can be imported again (``certfx compile -o``).
        """
        namespace = sys.modules[self.module].__dict__
        for op, op_traits in CORE_OPS.items():
            if op in self.rules:
                continue
            for deriver in self.derivers:
                fn = deriver(op, op_traits)
                if fn is not None:
                    name = f"{self.prefix}_{op.__name__}"
                    fn.__name__ = fn.__qualname__ = name
                    fn.__module__ = self.module
                    fn.__doc__ = f"{self.name} rule for ``{op.__name__}``, derived from its traits."
                    namespace[name] = fn
                    self.rules[op] = fn
                    expose_to_codegen(fn)
                    break

    def rule_for(self, op: Callable[..., Any]) -> Rule | None:
        """The rule for ``op``, or ``None`` when this domain cannot handle it."""
        return self.rules.get(op)

    def supports(self, op: Callable[..., Any]) -> bool:
        """Whether this domain has a rule (explicit or derived) for ``op``."""
        return op in self.rules


def expose_to_codegen(fn: Callable[..., Any]) -> None:
    """Let generated code call ``fn`` by its plain name (``box_relu``) and let
    ``GraphModule.to_folder`` write the matching import line.

    This uses torch.fx's registry of custom builtins, which reserves the name so no node can
    shadow it. Without that registry (a future torch), code falls back to FX's mangled names.
    """
    try:
        from torch.fx.graph import _register_custom_builtin
    except ImportError:  # pragma: no cover - depends on the torch version
        return
    _register_custom_builtin(fn.__name__, f"from {fn.__module__} import {fn.__name__}", fn)


_DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Add a domain to the registry under its name and aliases (each name once)."""
    expose_to_codegen(domain.input_rule)
    for key in (domain.name, *domain.aliases):
        if key in _DOMAINS and _DOMAINS[key] is not domain:
            raise ValueError(f"domain name {key!r} registered twice")
        _DOMAINS[key] = domain
    return domain


def available_domains() -> list[str]:
    """Canonical names of the registered domains."""
    _load_builtin_domains()
    return sorted({d.name for d in _DOMAINS.values()})


def get_domain(name: str) -> Domain:
    """The domain called ``name`` (or one of its aliases), case-insensitive.

    Raises:
        CertfxError: for an unknown name; the message lists the known ones.
    """
    _load_builtin_domains()
    key = name.lower().strip()
    if key not in _DOMAINS:
        known = ", ".join(sorted(_DOMAINS))
        raise CertfxError(f"unknown domain {name!r}; choose one of: {known}")
    return _DOMAINS[key]


def _load_builtin_domains() -> None:
    """Import the built-in domain modules (each registers itself on import)."""
    import certfx.domains.interval  # noqa: F401
    import certfx.domains.zonotope  # noqa: F401
    import certfx.domains.crown  # noqa: F401
    import certfx.domains.lipschitz  # noqa: F401
