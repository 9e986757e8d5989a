"""Compiler passes over canonical graphs, and the API for writing your own.

A pass is a :class:`GraphPass` (use the :func:`graph_pass` decorator); a :class:`PassManager`
runs a list of them, linting and recompiling after each. Mappings from PyTorch/ONNX constructs to
core ops are registered with :func:`mapping` (see :mod:`certfx.passes.normalize`).
"""

from certfx.passes.check_support import check_support
from certfx.passes.expose import expose
from certfx.passes.fold_batchnorm import fold_batchnorm
from certfx.passes.fuse_spec import fuse_spec
from certfx.passes.infra import GraphPass, PassManager, graph_pass
from certfx.passes.insert_ace import Entropy, SelectionNet, insert_ace
from certfx.passes.lower import lower
from certfx.passes.mark_perturbed import PERTURBED_KEY, mark_perturbed
from certfx.passes.normalize import (MAPPINGS, Traced, mapping, method_key, normalize,
                                     to_canonical)
from certfx.passes.shape_prop import SHAPE_KEY, shape_prop
from certfx.passes.split import CutPoint, Split, cut_points, split

__all__ = [
    "GraphPass",
    "PassManager",
    "graph_pass",
    "check_support",
    "expose",
    "fold_batchnorm",
    "fuse_spec",
    "lower",
    "mark_perturbed",
    "shape_prop",
    "split",
    "insert_ace",
    "Entropy",
    "SelectionNet",
    "cut_points",
    "CutPoint",
    "Split",
    "to_canonical",
    "normalize",
    "mapping",
    "method_key",
    "MAPPINGS",
    "Traced",
    "PERTURBED_KEY",
    "SHAPE_KEY",
    "default_pipeline",
]


def default_pipeline(normalize_pass: GraphPass, dump: object = False) -> PassManager:
    """The passes every loaded model goes through: ``normalize`` (given, as it needs the
    example input), ``fold_batchnorm``, ``shape_prop``, ``mark_perturbed``."""
    return PassManager([normalize_pass, fold_batchnorm, shape_prop, mark_perturbed],
                       dump=dump)  # type: ignore[arg-type]
