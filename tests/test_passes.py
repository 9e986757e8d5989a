"""Pass infrastructure and the individual passes: lint after each pass, errors that name the
pass and its predecessors, dumps, and each pass's contract (FX-style: apply, lint, compare)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.fx as fx
from torch import nn

import certfx
from certfx import ops
from certfx.errors import InvalidValueError, PassError, ShapeError, SpecError, \
    UnsupportedOpsError
from certfx.passes import (PassManager, check_support, fold_batchnorm, fuse_spec, graph_pass,
                           lower, mark_perturbed, shape_prop)
from tests.models import NETWORKS


def _load(name: str = "cnn_bn_maxpool") -> fx.GraphModule:
    make, shape = NETWORKS[name]
    return certfx.load(make(), torch.zeros(1, *shape))


@graph_pass("explode")
def explode(gm: fx.GraphModule) -> fx.GraphModule:
    raise RuntimeError("boom")


@graph_pass("identity")
def identity(gm: fx.GraphModule) -> fx.GraphModule:
    return gm


def test_pass_error_names_the_pass_and_its_predecessors() -> None:
    with pytest.raises(PassError) as info:
        PassManager([identity, shape_prop, explode, identity]).run(_load())
    assert info.value.pass_name == "explode"
    assert info.value.before == ["identity", "shape_prop"]
    assert "boom" in str(info.value)


def test_a_pass_that_breaks_the_graph_is_caught_by_lint() -> None:
    @graph_pass("break_order")
    def break_order(gm: fx.GraphModule) -> fx.GraphModule:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        first.prepend(out.args[0])  # use before definition
        return gm

    with pytest.raises(PassError, match="break_order"):
        PassManager([break_order]).run(_load("mlp"))


def test_dump_after_every_pass(tmp_path) -> None:
    stream = io.StringIO()
    PassManager([shape_prop, mark_perturbed], dump=stream).run(_load("mlp"))
    assert "# after pass 0: shape_prop" in stream.getvalue()
    assert "# after pass 1: mark_perturbed" in stream.getvalue()
    PassManager([shape_prop, mark_perturbed], dump=tmp_path).run(_load("mlp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_shape_prop.txt",
                                                          "01_mark_perturbed.txt"]


def test_shape_prop_and_mark_perturbed() -> None:
    gm = _load("residual")
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            assert n.meta["certfx.perturbed"] is False
        else:
            assert n.meta["certfx.perturbed"] is True
            assert n.meta["certfx.shape"] is not None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta["certfx.shape"] == (6,)


def test_fold_batchnorm_preserves_the_function() -> None:
    make, shape = NETWORKS["cnn_bn_maxpool"]
    net = make().requires_grad_(False)
    gm = certfx.load(net, torch.zeros(1, *shape))
    assert ops.batch_norm not in [n.target for n in gm.graph.nodes]
    x = torch.rand(4, *shape)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)
    # Re-running the pass changes nothing.
    again = PassManager([fold_batchnorm]).run(gm)
    torch.testing.assert_close(again(x), net(x), rtol=1e-5, atol=1e-5)


def test_fuse_spec_computes_c_times_output() -> None:
    make, shape = NETWORKS["mlp"]
    net = make()
    gm = PassManager([fuse_spec]).run(certfx.load(net, torch.zeros(1, *shape)))
    assert ops.spec_linear in [n.target for n in gm.graph.nodes]
    x, c = torch.rand(3, *shape), torch.randn(3, 2, 5)
    torch.testing.assert_close(gm(x, c), torch.einsum("bmk,bk->bm", c, net(x)), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(gm(x), net(x))


def test_fuse_spec_without_a_final_linear_layer() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    gm = PassManager([fuse_spec]).run(certfx.load(net, torch.zeros(1, 3)))
    assert ops.apply_spec in [n.target for n in gm.graph.nodes]
    x, c = torch.rand(2, 3), torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x, c), torch.einsum("bmk,bk->bm", c, net(x)))


def test_check_support_lists_every_foreign_node() -> None:
    @graph_pass("insert_foreign")
    def insert_foreign(gm: fx.GraphModule) -> fx.GraphModule:
        for n in list(gm.graph.nodes):
            if n.target is ops.relu:
                with gm.graph.inserting_after(n):
                    new = gm.graph.call_function(torch.exp, (n,))
                n.replace_all_uses_with(new)
                new.args = (n,)
        return gm

    gm = PassManager([insert_foreign]).run(_load("mlp"))
    with pytest.raises(UnsupportedOpsError) as info:
        PassManager([check_support("box")]).run(gm)
    assert len(info.value.ops) == 2  # both inserted nodes, at once
    assert all("not a core op" in o.hint for o in info.value.ops)


def test_lower_generates_a_module_without_graph_walking() -> None:
    gm = _load("residual")
    bounds = PassManager([lower("box")]).run(gm)
    assert "box_input(lower, upper)" in bounds.code
    assert bounds.meta["certfx.domain"] == "box"
    assert "Interpreter" not in bounds.code


def test_unknown_domain_lists_the_known_ones() -> None:
    with pytest.raises(certfx.CertfxError, match=r"choose one of: .*\bbox\b.*\bdeepz\b"):
        certfx.get_domain("zonotopey")


def test_spec_errors() -> None:
    with pytest.raises(InvalidValueError, match="eps must be >= 0"):
        certfx.LinfBall(-0.1)
    with pytest.raises(InvalidValueError, match="NaN"):
        certfx.LinfBall(math.nan)
    with pytest.raises(InvalidValueError, match="lower > upper"):
        certfx.LinfBall(0.1, lower=1.0, upper=0.0)
    with pytest.raises(InvalidValueError, match="lower > upper"):
        certfx.Box(torch.ones(3), torch.zeros(3))
    with pytest.raises(ShapeError):
        certfx.Box(torch.ones(3), torch.ones(4))
    with pytest.raises(SpecError, match="labels must lie"):
        certfx.Margin().matrix(torch.tensor([5]), 3)


def test_certified_forward_input_errors() -> None:
    make, shape = NETWORKS["mlp"]
    cm = certfx.compile(make(), example_input=torch.zeros(1, *shape),
                        input_spec=certfx.LinfBall(0.1))
    with pytest.raises(ShapeError, match="add the batch dim"):
        cm.certified_forward(torch.zeros(*shape))
    with pytest.raises(ShapeError, match="does not match"):
        cm.certified_forward(torch.zeros(1, 5, 5))
    with pytest.raises(InvalidValueError, match="NaN"):
        cm.certified_forward(torch.full((1, *shape), math.nan))
    with pytest.raises(ShapeError, match="labels"):
        cm.certified_forward(torch.zeros(2, *shape), y=torch.tensor([0]))


def test_box_input_spec() -> None:
    make, shape = NETWORKS["mlp"]
    net = make()
    lo, hi = torch.zeros(*shape), torch.full(shape, 0.2)
    cm = certfx.compile(net, input_spec=certfx.Box(lo, hi), example_input=torch.zeros(1, *shape))
    out_lo, out_hi = cm.certified_forward(torch.zeros(2, *shape))
    pts = lo + torch.rand(400, *shape) * (hi - lo)
    out = net(pts)
    assert bool((out >= out_lo[0] - 1e-5).all() and (out <= out_hi[0] + 1e-5).all())


def test_check_support_rejects_perturbed_constant_arguments() -> None:
    """``mul(x, x)`` would be bounded as x times a constant: unsound, so it is rejected."""
    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    gm = certfx.load(Double(), torch.zeros(1, 3))
    mul = next(n for n in gm.graph.nodes if n.target is ops.mul)
    mul.args = (mul.args[0], mul.args[0])
    gm.recompile()
    with pytest.raises(UnsupportedOpsError, match="ops.product"):
        check_support("box")(gm)
