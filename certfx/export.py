"""Exporting generated modules: write a GraphModule to a folder any Python process can import.

``torch.fx.GraphModule.to_folder`` writes ``module.py``, ``state_dict.pt`` and ``__init__.py``,
but ``module.py`` loads the weights from the absolute path it was written to and imports only
the functions registered as FX custom builtins. :func:`export_module` calls ``to_folder`` in a
temporary folder next to the destination and then

* loads ``state_dict.pt`` (and any pickled submodule) relative to ``module.py``'s ``__file__``,
  onto the CPU (``load_state_dict`` then copies into the module's tensors);
* adds an import line for every global the generated code uses that the file does not define
  yet (rule functions such as ``certfx.domains.interval.box_relu``, core ops called on constant
  nodes such as ``certfx.ops.reshape``), derived from ``gm.graph.python_code(...).globals``;
* prepends a module docstring (``header``) and writes any extra files (a report);
* imports the written module once and builds it, as a check;

and only then moves the folder into place, so a failure leaves nothing behind.

Example:
    >>> import tempfile, torch, certfx
    >>> cm = certfx.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), domain="box",
    ...                     example_input=torch.zeros(1, 2))
    >>> folder = export_module(cm.bounds, tempfile.mkdtemp() + "/out", module_name="Bounds")
    >>> sorted(p.name for p in folder.iterdir())
    ['__init__.py', 'module.py', 'state_dict.pt']
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import types
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.fx as fx

from certfx.errors import CertfxError

__all__ = ["export_module", "import_exported"]

# Globals that the file written by ``to_folder`` defines itself.
_PREAMBLE_NAMES = frozenset({"torch", "inf", "nan", "NoneType", "device", "fx_pytree", "pytree"})


def export_module(gm: fx.GraphModule, folder: str | os.PathLike[str], *,
                  module_name: str = "CertifiedBounds", header: str = "",
                  extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``gm`` to ``folder`` as an importable package, atomically.

    Args:
        gm: the module to export (typically ``CertifiedModule.bounds``).
        folder: the destination. It must not exist, be empty, or hold an earlier export (a
            folder with a ``module.py``), which is then replaced.
        module_name: the class name in ``module.py`` (a Python identifier).
        header: text for ``module.py``'s docstring (how to use the module).
        extra_files: ``{file name: text}`` written next to ``module.py``.

    Returns:
        The destination folder.

    Raises:
        CertfxError: a bad destination or module name, or a module that cannot be exported.
    """
    if not module_name.isidentifier():
        raise CertfxError(f"module name {module_name!r} is not a Python identifier")
    dest = Path(folder).expanduser().absolute()
    _check_destination(dest)
    _check_attributes(gm)
    created = _make_parents(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        gm.to_folder(tmp, module_name)
        module_py = tmp / "module.py"
        module_py.write_text(_make_portable(module_py.read_text(), tmp, gm, header))
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in {"module.py", "__init__.py", "state_dict.pt"}:
                raise CertfxError(f"extra file name {name!r} must be a plain, new file name")
            (tmp / name).write_text(text)
        import_exported(tmp, module_name)  # check: the written module imports and builds
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                pass
        raise
    return dest


def import_exported(folder: str | os.PathLike[str], module_name: str = "CertifiedBounds") -> Any:
    """Import ``module.py`` of an exported folder under a unique name; return an instance of
    its class ``module_name``."""
    path = Path(folder) / "module.py"
    unique = f"_certfx_export_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(unique, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for odd paths
        raise CertfxError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
        return getattr(module, module_name)()
    finally:
        sys.modules.pop(unique, None)


# ---- checks ------------------------------------------------------------------------------------

def _check_destination(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise CertfxError(f"output path {dest} exists and is not a folder; choose another path")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "module.py").is_file():
        raise CertfxError(f"output folder {dest} is not empty and holds no earlier export; "
                          "choose a new or empty folder")
    if dest.parent.exists() and not dest.parent.is_dir():
        raise CertfxError(f"{dest.parent} is not a folder")


def _check_attributes(gm: fx.GraphModule) -> None:
    """Every ``get_attr`` must be a parameter, buffer or submodule: ``to_folder`` saves no
    other attributes."""
    saved = set(gm.state_dict(keep_vars=True)) | {name for name, _ in gm.named_modules()}
    missing = [str(n.target) for n in gm.graph.nodes
               if n.op == "get_attr" and str(n.target) not in saved]
    if missing:
        raise CertfxError(f"cannot export: attribute(s) {', '.join(missing)} are neither "
                          "parameters nor buffers; register them with register_buffer")


def _make_parents(parent: Path) -> list[Path]:
    created: list[Path] = []
    for path in reversed([parent, *parent.parents]):
        if not path.exists():
            path.mkdir()
            created.append(path)
    return created


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- rewriting module.py ---------------------------------------------------------------------

def _make_portable(text: str, tmp: Path, gm: fx.GraphModule, header: str) -> str:
    """Paths relative to ``__file__``, CPU weights, and the missing imports (see module doc)."""
    # to_folder writes r'<folder>/<file>' (Path division for pickled submodules).
    path_re = re.compile(r"r'" + re.escape(str(tmp)) + r"[/\\]([^'/\\]+)'")
    text = path_re.sub(lambda m: f"_os.path.join(_HERE, {m.group(1)!r})", text)
    state = "torch.load(_os.path.join(_HERE, 'state_dict.pt'))"
    if state not in text:
        raise CertfxError("unexpected to_folder output (no state_dict load line); the torch "
                          "version may have changed GraphModule.to_folder")
    text = text.replace(state, "torch.load(_os.path.join(_HERE, 'state_dict.pt'), "
                               "map_location='cpu', weights_only=True)")
    imports = _missing_imports(gm, text)
    doc = header.strip().replace('"""', "'''")
    prologue = (f'"""{doc}\n"""\n' if doc else "") + (
        "import os as _os\n\n_HERE = _os.path.dirname(_os.path.abspath(__file__))\n")
    return prologue + "\n".join(imports) + ("\n" if imports else "") + text


def _missing_imports(gm: fx.GraphModule, text: str) -> list[str]:
    """Import lines for the generated code's globals that ``text`` does not define."""
    lines: list[str] = []
    defined = set(_PREAMBLE_NAMES)
    for line in text.splitlines():
        match = re.match(r"from \S+ import (\w+)$", line.strip())
        if match:
            defined.add(match.group(1))
    for name, obj in gm.graph.python_code(root_module="self").globals.items():
        if name in defined or getattr(builtins, name, object()) is obj:
            continue
        lines.append(_import_line(name, obj))
    return lines


def _import_line(name: str, obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return f"import {obj.__name__} as {name}"
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and "." not in qualname and "<" not in qualname:
        try:
            found = getattr(importlib.import_module(module), qualname, None)
        except ImportError:
            found = None
        if found is obj:
            return (f"from {module} import {qualname}" if qualname == name
                    else f"from {module} import {qualname} as {name}")
    raise CertfxError(f"cannot export: the generated code uses {name} = {obj!r}, which cannot "
                      "be imported by name; define it at module level")
