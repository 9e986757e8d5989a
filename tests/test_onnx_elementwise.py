"""ONNX models with Exp, Log, Reciprocal, Softmax/LogSoftmax and Mul/Div of two perturbed
tensors: exported from tiny torch modules (``torch.onnx.export(..., dynamo=False)``) or built
with ``onnx.helper``, loaded with ``certfx.load``, compared with onnxruntime, and bounded soundly
by ``box`` and ``deepz`` (onnxruntime's outputs on sampled inputs, half of them corners of the
input box, lie inside the certified bounds). A product of two perturbed tensors must become
``product``, never the affine ``mul`` (whose rules take the second factor as a constant)."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
import torch.nn.functional as F
from torch import Tensor, nn

import certfx
from certfx import ops
from certfx.reference import compare_with_onnx, run_onnx

DOMAINS = ("box", "deepz")


# ---- helpers ----------------------------------------------------------------------------------

def export(net: nn.Module, shape: tuple[int, ...], path: Path, opset: int | None = None) -> Path:
    """``net`` as an ONNX file with a symbolic batch dim (the TorchScript exporter)."""
    buffer = io.BytesIO()
    kwargs = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net.eval(), (torch.zeros(1, *shape),), buffer, dynamo=False,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, **kwargs)
        except Exception as err:  # pragma: no cover - depends on the torch build
            pytest.skip(f"torch.onnx.export is unavailable: {err}")
    path.write_bytes(buffer.getvalue())
    return path


def onnx_ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def core_ops(gm: torch.fx.GraphModule) -> set[Callable]:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def assert_no_perturbed_factor(gm: torch.fx.GraphModule) -> None:
    """Every ``mul``/``div`` multiplies by a constant (a ``get_attr`` or a number)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (ops.mul, ops.div):
            factor = n.args[1]
            assert not isinstance(factor, torch.fx.Node) or factor.op == "get_attr", n.format_node()


def assert_sound(path: Path, domain: str, eps: float, lower: float, upper: float,
                 x: Tensor, n: int = 400, tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """onnxruntime's outputs on ``n`` points of each input box (half of them corners) lie in
    the bounds of ``domain``; returns the bounds."""
    cm = certfx.compile(path, domain=domain, input_spec=certfx.LinfBall(eps, lower, upper))
    lo, hi = (t.detach() for t in cm.certified_forward(x))
    assert bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()), (domain, lo, hi)
    gen = torch.Generator().manual_seed(0)
    for i in range(x.shape[0]):
        xl, xh = cm.input_bounds(x[i:i + 1])
        u = torch.rand(n, *x.shape[1:], generator=gen)
        u[: n // 2] = (u[: n // 2] < 0.5).float()
        out = run_onnx(path, xl + u * (xh - xl)).reshape(n, *lo.shape[1:])
        assert bool((out >= lo[i] - tol).all()), (domain, float((lo[i] - out).max()))
        assert bool((out <= hi[i] + tol).all()), (domain, float((out - hi[i]).max()))
    return lo, hi


def load_and_check(path: Path, low: float = 0.0, high: float = 1.0,
                   atol: float = 1e-5) -> torch.fx.GraphModule:
    gm = certfx.load(path)
    assert compare_with_onnx(gm, path, samples=8, low=low, high=high) < atol
    assert_no_perturbed_factor(gm)
    return gm


# ---- models -----------------------------------------------------------------------------------

class ExpLog(nn.Module):
    """Exp, Log (of a positive input) and Reciprocal."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        e = torch.exp(self.fc(x))
        return torch.cat([torch.log(e + 1.0), torch.reciprocal(e + 0.5), e.exp().log()], 1)


class Products(nn.Module):
    """Mul of two branches, a square, a broadcast product, Div by a perturbed tensor (with a
    perturbed and a constant dividend) and Div by a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.a(x), self.b(x)
        s = x.sum(1, keepdim=True) + 2.0  # in [2, 5] on [0, 1]^3: positive
        return torch.cat([h * g, h * h, h * s, h / s, 3.0 / s, g / 4.0, 1 / (g * g + 1)], 1)


class Entropy(nn.Module):
    """The softmax entropy in plain ops: -Σ p log p and -Σ p log_softmax."""

    def __init__(self, classes: int = 5, log_softmax: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)
        self.log_softmax = log_softmax

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc(x)
        p = torch.softmax(z, dim=1)
        logp = torch.log_softmax(z, dim=1) if self.log_softmax else torch.log(p)
        return -(p * logp).sum(1, keepdim=True)


class SoftmaxMiddle(nn.Module):
    """Softmax over a dim that is not the last (a transpose around the pairwise form)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x * 2.0, dim=1) + torch.log_softmax(x, dim=2)


# ---- tests ------------------------------------------------------------------------------------

def test_exp_log_reciprocal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export(ExpLog(), (3,), tmp_path / "explog.onnx")
    assert {"Exp", "Log", "Reciprocal"} <= onnx_ops(path)
    gm = load_and_check(path)
    assert {ops.exp, ops.log, ops.reciprocal} <= core_ops(gm)
    # log(exp(y)) is y: two Log nodes in the file, one log in the graph (for log(e + 1)).
    assert sum(n.target is ops.log for n in gm.graph.nodes) == 1
    x = torch.rand(3, 3)
    widths = {d: assert_sound(path, d, 0.1, 0.0, 1.0, x) for d in DOMAINS}
    assert all(float((hi - lo).min()) >= 0 for lo, hi in widths.values())


def test_products_and_divisions(tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = export(Products(), (3,), tmp_path / "products.onnx")
    assert {"Mul", "Div"} <= onnx_ops(path)
    gm = load_and_check(path)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.product) == 5  # h·g, h·h, h·s, h·(1/s), g·g
    assert targets.count(ops.reciprocal) == 3  # 1/s for h/s and 3/s, 1/(g² + 1)
    x = torch.rand(4, 3)
    for domain in DOMAINS:
        assert_sound(path, domain, 0.05, 0.0, 1.0, x)


def test_square_keeps_sign_information_in_deepz(tmp_path: Path) -> None:
    """``h·h`` for ``h = x1 − x2 = ε1/2 − ε2/2 ∈ [−1, 1]``: the box's corner products give
    ``[−1, 1]``; ACE H.5 keeps the shared terms: ``Σ a_i b_i ε_i² ∈ ½·½ ± ½·½`` and the cross
    term ``2·a_1 b_2 ε_1 ε_2 ∈ ±½`` (Eq. 24–26), so ``[−½, 1]``."""
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0]]))

    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = net

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return h * h

    path = export(Square(), (2,), tmp_path / "square.onnx")
    load_and_check(path)
    x = torch.full((1, 2), 0.5)
    box_lo, box_hi = assert_sound(path, "box", 0.5, 0.0, 1.0, x)
    z_lo, z_hi = assert_sound(path, "deepz", 0.5, 0.0, 1.0, x)
    assert float(box_lo) == pytest.approx(-1.0) and float(box_hi) == pytest.approx(1.0)
    assert float(z_lo) == pytest.approx(-0.5) and float(z_hi) == pytest.approx(1.0)


@pytest.mark.parametrize("log_softmax", [False, True])
def test_softmax_entropy_as_onnx_ops(tmp_path: Path, log_softmax: bool) -> None:
    torch.manual_seed(2)
    net = Entropy(5, log_softmax)
    path = export(net, (3,), tmp_path / "entropy.onnx")
    expected = {"Softmax", "Mul", "ReduceSum", "Neg", "LogSoftmax" if log_softmax else "Log"}
    assert expected <= onnx_ops(path)
    gm = load_and_check(path, low=-1.0, high=1.0)
    assert ops.product in core_ops(gm)
    x = torch.rand(3, 3)
    z = net.fc(x)
    torch.testing.assert_close(gm(x), ops.softmax_entropy(z), atol=1e-5, rtol=1e-5)
    for domain in DOMAINS:
        lo, hi = assert_sound(path, domain, 0.05, 0.0, 1.0, x)
        # Informative bounds: within [0 − slack, log 5 + slack] and not vacuous.
        assert float(lo.min()) > -1.0 and float(hi.max()) < math.log(5) + 1.0, (domain, lo, hi)


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_over_a_middle_dim(tmp_path: Path, opset: int) -> None:
    path = export(SoftmaxMiddle(), (3, 4), tmp_path / "middle.onnx", opset=opset)
    gm = load_and_check(path, low=-2.0, high=2.0)
    assert ops.permute in core_ops(gm) or opset == 11
    x = torch.rand(2, 3, 4)
    for domain in DOMAINS:
        assert_sound(path, domain, 0.1, 0.0, 1.0, x, n=200)


def _helper_model(nodes: list[onnx.NodeProto], shape: list, path: Path,
                  opset: int = 13) -> Path:
    graph = helper.make_graph(nodes, "elementwise",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("shape", [["N", 4], [4]], ids=["batched", "unbatched"])
def test_helper_built_mul_div_of_the_input(tmp_path: Path, shape: list) -> None:
    """``x·x``, ``x / (x + 1)`` and ``exp(x)·log(x + 1)`` on a batched and an unbatched input."""
    one = helper.make_node("Constant", [], ["one"],
                           value=helper.make_tensor("c", TensorProto.FLOAT, [], [1.0]))
    nodes = [one,
             helper.make_node("Mul", ["x", "x"], ["sq"], name="sq"),
             helper.make_node("Add", ["x", "one"], ["x1"], name="x1"),
             helper.make_node("Div", ["x", "x1"], ["q"], name="q"),
             helper.make_node("Exp", ["x"], ["e"], name="e"),
             helper.make_node("Log", ["x1"], ["l"], name="l"),
             helper.make_node("Mul", ["e", "l"], ["el"], name="el"),
             helper.make_node("Add", ["sq", "q"], ["s"], name="s"),
             helper.make_node("Add", ["s", "el"], ["y"], name="y")]
    path = _helper_model(nodes, shape, tmp_path / "helper.onnx")
    gm = load_and_check(path)
    assert [n.target for n in gm.graph.nodes].count(ops.product) == 3
    x = torch.rand(3, 4)
    for domain in DOMAINS:
        assert_sound(path, domain, 0.2, 0.0, 1.0, x)


def test_div_by_a_constant_stays_affine(tmp_path: Path) -> None:
    two = helper.make_node("Constant", [], ["two"],
                           value=helper.make_tensor("c", TensorProto.FLOAT, [], [2.0]))
    path = _helper_model([two, helper.make_node("Div", ["x", "two"], ["y"])], ["N", 3],
                         tmp_path / "div.onnx")
    gm = load_and_check(path)
    assert core_ops(gm) == {ops.div}


class TorchLevel(nn.Module):
    """The same ops through the torch frontend: aliases, methods, shape metadata as a factor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        p = F.softmax(h, dim=-1)
        ent = -(p * p.log()).sum(1, keepdim=True)
        q = torch.divide(h, x.sum(1, keepdim=True) + 1.0)
        return torch.cat([ent, torch.multiply(h, q), h.exp() * x.shape[1], h.log_softmax(1)], 1)


def test_torch_frontend_softmax_products_and_aliases() -> None:
    torch.manual_seed(3)
    net = TorchLevel()
    gm = certfx.load(net, torch.zeros(1, 3))
    assert_no_perturbed_factor(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.product) == 3 and ops.reciprocal in targets
    x = torch.rand(3, 3)
    torch.testing.assert_close(gm(x), net(x), atol=1e-5, rtol=1e-5)
    for domain in DOMAINS:
        cm = certfx.compile(net, domain=domain, input_spec=certfx.LinfBall(0.05),
                            example_input=torch.zeros(1, 3))
        lo, hi = (t.detach() for t in cm.certified_forward(x))
        for i in range(3):
            xl, xh = cm.input_bounds(x[i:i + 1])
            u = torch.rand(300, 3)
            u[:150] = (u[:150] < 0.5).float()
            out = net(xl + u * (xh - xl)).detach()
            assert bool((out >= lo[i] - 1e-4).all() and (out <= hi[i] + 1e-4).all()), domain


def test_opset11_softmax_flattens_from_its_axis(tmp_path: Path) -> None:
    """Softmax-11 with ``axis=1`` on ``(N, 3, 4)`` normalizes over all 12 entries of an example
    (onnx2torch's ``OnnxSoftmaxV1V11``); LogSoftmax-11 likewise."""
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=1),
             helper.make_node("LogSoftmax", ["x"], ["q"], axis=1),
             helper.make_node("Add", ["p", "q"], ["y"])]
    path = _helper_model(nodes, ["N", 3, 4], tmp_path / "softmax11.onnx", opset=11)
    gm = load_and_check(path, low=-2.0, high=2.0)
    assert ops.reshape in core_ops(gm)
    x = torch.rand(2, 3, 4)
    for domain in DOMAINS:
        assert_sound(path, domain, 0.1, 0.0, 1.0, x, n=200)
