"""Composed ACE models as ONNX files: written for any runtime, read back as ACE graphs.

:func:`export_ace` writes the composed graph with standard ONNX ops (the selection becomes
``Greater`` and ``Where``, the entropy ``ReduceLogSumExp``/``Softmax``/…), so onnxruntime or any
other runtime runs it as one model. It also names three intermediate tensors — the core output,
the certification output and the selection score — and records them with the selection and
threshold in the model's ``metadata_props`` (key ``certfx.ace``).

:func:`load_ace` reads such a file back: it cuts the core network, the certification network
and (for a selection network) the score out of the ONNX graph with ``onnx.utils.extract_model``,
loads each through the ONNX frontend, and composes them again with
:func:`~certfx.passes.insert_ace` — the same canonical graph, with the selection node every domain
and the MILP backend handle.

Example:
    >>> import tempfile, torch
    >>> from certfx.passes import Entropy, insert_ace
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> ace = insert_ace(net, net, Entropy(0.6), example_input=torch.zeros(1, 3))
    >>> path = tempfile.mkdtemp() + "/ace.onnx"
    >>> export_ace(ace, path)
    >>> back = load_ace(path)
    >>> x = torch.rand(5, 3)
    >>> torch.allclose(back(x), ace(x), atol=1e-6), back.meta["certfx.ace"]["threshold"]
    (True, 0.6)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx

from certfx.errors import ModelLoadError

__all__ = ["export_ace", "load_ace", "METADATA_KEY"]

METADATA_KEY = "certfx.ace"
_PARTS = ("core", "cert", "score")


def export_ace(ace: fx.GraphModule, path: str | os.PathLike[str], opset: int = 17) -> None:
    """Write a composed graph (:func:`~certfx.passes.insert_ace`) as ``path`` (ONNX), with the
    ACE metadata; nothing is written on failure."""
    import onnx

    from certfx.passes.insert_ace import ace_parts
    from certfx.passes.infra import clone_graph_module

    info = ace_parts(ace)
    gm = clone_graph_module(ace)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], *(nodes[info[p]] for p in _PARTS)),)
    gm.recompile()
    names = ["y", *(f"ace_{p}" for p in _PARTS)]
    x = torch.zeros(1, *ace.meta["certfx.input_shape"],
                    dtype=next((p.dtype for p in ace.parameters()), torch.float32))
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=dest.parent if dest.parent.exists() else None)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(gm, (x,), tmp, input_names=["x"], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in ["x", *names]},
                              opset_version=opset, dynamo=False)
        model = onnx.load(tmp)
        keep = [o for o in model.graph.output if o.name == "y"]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        meta = {"select": info["select"], "threshold": info["threshold"],
                **{p: f"ace_{p}" for p in _PARTS}}
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_ace(path: str | os.PathLike[str]) -> fx.GraphModule:
    """The composed graph of an ONNX file written by :func:`export_ace`.

    Raises:
        ModelLoadError: the file is missing, not ONNX, or not an ACE model written by certfx.
    """
    import onnx

    from certfx.passes import Entropy, SelectionNet, insert_ace

    if not Path(path).exists():
        raise ModelLoadError(f"file '{path}' does not exist; check the path")
    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise ModelLoadError(f"'{path}' is not a readable ONNX file: {err}") from err
    meta = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    if meta is None:
        raise ModelLoadError(f"'{path}' is not an ACE model written by certfx (no "
                             f"'{METADATA_KEY}' metadata); compose one with 'certfx ace "
                             "compose', or load a plain network with certfx.load")
    info = json.loads(meta)
    inputs = [i.name for i in model.graph.input]
    with tempfile.TemporaryDirectory() as tmp:
        parts = {}
        for p in _PARTS if info["select"] == "selnet" else ("core", "cert"):
            part = os.path.join(tmp, f"{p}.onnx")
            try:
                onnx.utils.extract_model(str(path), part, inputs, [info[p]])
            except Exception as err:
                raise ModelLoadError(f"'{path}': cannot extract the {p} network "
                                     f"({info[p]}): {err}") from err
            parts[p] = part
        selection = Entropy(info["threshold"]) if info["select"] == "entropy" else \
            SelectionNet(info["threshold"], network=parts["score"])
        return insert_ace(parts["core"], parts["cert"], selection)
