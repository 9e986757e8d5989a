"""Run only the first chunks of every chunked back-substitution pass, to measure a slow bound
computation's peak memory and to extrapolate its time (``domains.py --max-chunks``).

A chunked pass (:func:`certfx.domains.linear.lin_pass_bounds`) forms coefficient tensors of the
same size in every chunk, so the peak memory of its first chunks is that of the whole pass. The
time of the whole pass is estimated as (time per chunk run) × (chunks it needs). The bounds of a
probed pass fall back to the node's interval bounds (sound, looser), so widths from a probed run
are not the domain's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from certfx.domains.interval import Interval
from certfx.domains.linear import chunk_rows, lin_pass_bounds


class _Stop(Exception):
    pass


@dataclass
class ProbeLog:
    """Per probed pass: (chunks needed, chunks run, seconds)."""

    passes: list[tuple[int, int, float]] = field(default_factory=list)

    def extrapolated_extra_seconds(self) -> float:
        """The time the chunks not run would have taken."""
        return sum(s / run * (needed - run) for needed, run, s in self.passes if run)


def _limited(max_chunks: int, log: ProbeLog) -> Callable[..., Interval]:
    def probe(backward_pass: Any, intervals: Interval, shape: tuple[int, ...],
              unstable_only: bool, rows_per_chunk: int, *captured: Any,
              row_width: int = 0) -> Interval:
        lower, upper = intervals.lower.flatten(1), intervals.upper.flatten(1)
        rows = (int(((lower < 0) & (upper > 0)).sum(1).max()) if unstable_only
                else lower.shape[1])
        step = chunk_rows(rows_per_chunk, row_width, lower.shape[0])
        needed, run = math.ceil(rows / step), [0]

        def counted(*args: Any) -> Any:
            if run[0] == max_chunks:
                raise _Stop
            run[0] += 1
            return backward_pass(*args)

        start = time.perf_counter()
        try:
            result = lin_pass_bounds(counted, intervals, shape, unstable_only, rows_per_chunk,
                                     *captured, row_width=row_width)
        except _Stop:
            result = intervals
        log.passes.append((needed, run[0], time.perf_counter() - start))
        return result

    return probe


@contextmanager
def max_chunks(module: fx.GraphModule, limit: int) -> Iterator[ProbeLog]:
    """Within the block, every chunked pass of ``module`` (and its submodules) runs at most
    ``limit`` chunks; yields the log."""
    log = ProbeLog()
    probe = _limited(limit, log)
    changed = []
    for sub in module.modules():
        if isinstance(sub, fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "call_function" and node.target is lin_pass_bounds:
                    node.target = probe
                    changed.append((sub, node))
            sub.recompile()
    try:
        yield log
    finally:
        for sub, node in changed:
            node.target = lin_pass_bounds
        for sub in {id(s): s for s, _ in changed}.values():
            sub.recompile()
