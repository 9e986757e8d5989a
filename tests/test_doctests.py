"""Run every docstring example of the installed ``certfx`` package (``certfx.passes`` and
``certfx.frontends`` included) as a test."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import certfx
import certfx.frontends
import certfx.passes

# certfx.passes and certfx.frontends live in their own folders (see pyproject.toml)
PACKAGES = (certfx, certfx.frontends, certfx.passes)


def _modules() -> list[str]:
    """Every module of the packages, subpackages (domains, verify, backends, …) included."""
    names = {pkg.__name__ for pkg in PACKAGES}
    for pkg in PACKAGES:
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
    return sorted(n for n in names if not n.endswith("__main__"))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
