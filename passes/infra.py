"""Pass infrastructure: the :class:`GraphPass` type, the ``graph_pass`` decorator and the
:class:`PassManager` that runs passes in order.

A pass is a named callable ``GraphModule -> GraphModule``. It may change the graph in place and
return the same module, or build a new one. After every pass the manager lints the graph,
recompiles the module, and optionally dumps the graph; a failing pass raises an error that names
it and the passes that ran before it.

Writing a custom pass:

    >>> import torch, torch.fx as fx
    >>> from certfx.passes import PassManager, graph_pass
    >>> @graph_pass("count_nodes")
    ... def count_nodes(gm: fx.GraphModule) -> fx.GraphModule:
    ...     gm.meta["node_count"] = len(gm.graph.nodes)
    ...     return gm
    >>> gm = fx.symbolic_trace(torch.nn.ReLU())
    >>> PassManager([count_nodes]).run(gm).meta["node_count"]
    3
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch.fx as fx

from certfx.errors import CertfxError, PassError

__all__ = ["GraphPass", "graph_pass", "PassManager", "clone_graph_module"]


@dataclass(frozen=True)
class GraphPass:
    """A named graph transformation.

    Attributes:
        name: shown in dumps and error messages.
        fn: ``GraphModule -> GraphModule``.
    """

    name: str
    fn: Callable[[fx.GraphModule], fx.GraphModule]

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return self.fn(gm)


def graph_pass(name: str) -> Callable[[Callable[[fx.GraphModule], fx.GraphModule]], GraphPass]:
    """Decorator turning a function ``GraphModule -> GraphModule`` into a :class:`GraphPass`."""

    def wrap(fn: Callable[[fx.GraphModule], fx.GraphModule]) -> GraphPass:
        return GraphPass(name, fn)

    return wrap


class PassManager:
    """Runs passes in order, linting and recompiling after each.

    Args:
        passes: the passes to run (:class:`GraphPass`, or any callable with a ``name``).
        dump: ``False`` (default) for no dumps; ``True`` to print each graph to stderr after its
            pass; a directory path to write ``NN_<pass>.txt`` files there; or an open text stream.
    """

    def __init__(self, passes: Sequence[GraphPass], dump: bool | str | Path | TextIO = False):
        self.passes = list(passes)
        self.dump = dump

    @property
    def names(self) -> list[str]:
        """The names of the passes, in order."""
        return [_name_of(p) for p in self.passes]

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Apply every pass to ``gm``; returns the final module.

        Raises:
            CertfxError: the pass's own error (with a note naming the pass), or
                :class:`PassError` wrapping an unexpected exception.
        """
        done: list[str] = []
        for index, graph_pass_ in enumerate(self.passes):
            name = _name_of(graph_pass_)
            try:
                result = graph_pass_(gm)
                if not isinstance(result, fx.GraphModule):
                    raise TypeError(f"returned {type(result).__name__}, not a GraphModule")
                result.graph.lint()
                result.recompile()
            except CertfxError as err:
                err.add_note(f"in pass '{name}' (passes run before it: "
                             f"{', '.join(done) if done else 'none'})")
                raise
            except Exception as err:  # an unexpected failure inside a pass
                raise PassError(name, done, err) from err
            gm = result
            done.append(name)
            self._dump(index, name, gm)
        return gm

    def _dump(self, index: int, name: str, gm: fx.GraphModule) -> None:
        if self.dump is False or self.dump is None:
            return
        text = f"# after pass {index}: {name}\n{gm.graph}\n"
        if self.dump is True:
            sys.stderr.write(text)
        elif isinstance(self.dump, (str, Path)):
            folder = Path(self.dump)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:02d}_{name}.txt").write_text(text)
        else:
            self.dump.write(text)


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph (node metadata included) that shares
    ``gm``'s parameters and buffers, so in-place passes on it leave ``gm`` untouched."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    clone = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    clone.meta.update(gm.meta)
    for old, new in zip(gm.graph.nodes, clone.graph.nodes):
        new.meta.update(old.meta)
    return clone


def _name_of(p: object) -> str:
    return str(getattr(p, "name", getattr(p, "__name__", type(p).__name__)))
