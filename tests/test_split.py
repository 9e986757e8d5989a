"""The split pass: cut points of sequential and DAG graphs, exact composition, shared parameters,
``relus=k`` semantics, clear errors, and sound bounds from compiling the two halves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import certfx
from certfx import ops
from certfx.errors import CertfxError, InvalidValueError
from certfx.passes.infra import clone_graph_module
from certfx.passes.shape_prop import SHAPE_KEY
from certfx.passes.split import cut_points, split
from certfx.specs import Box, LinfBall
from tests.models import cnn_bn_maxpool, mlp, normalized, residual


class Concat(nn.Module):
    """Two branches concatenated: a DAG whose cuts are before the fork and after the join."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x * 2.0)
        return self.head(torch.cat([self.a(h), torch.relu(self.b(h))], dim=1))


def concat() -> nn.Module:
    return Concat().eval()


CASES = {mlp: (12,), cnn_bn_maxpool: (1, 8, 8), residual: (3, 6, 6), normalized: (2, 6, 6),
         concat: (4,)}


def load(make) -> tuple[nn.Module, torch.fx.GraphModule, torch.Tensor]:
    net = make()
    shape = CASES[make]
    return net, certfx.load(net, torch.zeros(1, *shape)), torch.rand(4, *shape)


def relu_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.target is ops.relu]


@pytest.mark.parametrize("make", list(CASES), ids=lambda f: f.__name__)
def test_every_cut_composes_exactly(make):
    net, gm, x = load(make)
    points = cut_points(gm)
    assert points
    for p in points:
        extractor, classifier, cut = split(gm, at=p.node)
        assert cut == p
        extractor.graph.lint()
        classifier.graph.lint()
        z = extractor(x)
        assert tuple(z.shape[1:]) == cut.shape == classifier.meta["certfx.input_shape"]
        assert extractor.meta["certfx.output_shape"] == cut.shape
        assert extractor.meta["certfx.input_shape"] == gm.meta["certfx.input_shape"]
        assert classifier.meta["certfx.output_shape"] == gm.meta["certfx.output_shape"]
        assert torch.equal(classifier(z), gm(x))
        torch.testing.assert_close(classifier(z), net(x), atol=1e-5, rtol=1e-5)


def test_cut_points_of_a_sequential_network():
    _, gm, _ = load(mlp)
    points = cut_points(gm)
    assert [(p.node, p.relus_after) for p in points] == [
        ("reshape", 2), ("linear", 2), ("relu", 1), ("linear_1", 1), ("relu_1", 0)]
    assert [p.shape for p in points] == [(12,), (16,), (16,), (16,), (16,)]
    assert "linear_1" in str(points[3]) and "1 ReLU layer(s) after" in str(points[3])


def test_only_nodes_outside_the_residual_block_are_cut_points():
    _, gm, _ = load(residual)
    # x is read by the skip connection's add: nothing between x and the add is a cut
    points = cut_points(gm)
    assert [(p.node, p.relus_after) for p in points] == [("add", 1), ("relu_1", 0), ("reshape", 0)]
    assert "tests/models.py:" in points[0].source  # the user's source line, from the trace


def test_cut_points_of_a_dag_with_concat():
    _, gm, _ = load(concat)
    names = [p.node for p in cut_points(gm)]
    # before the fork (mul, relu) and from the join (concat) on; never inside a branch
    assert names == ["mul", "relu", "concat", "relu_2"]


def test_shapes_without_shape_prop_meta():
    _, gm, _ = load(cnn_bn_maxpool)
    bare = clone_graph_module(gm)
    for n in bare.graph.nodes:
        n.meta.pop(SHAPE_KEY, None)
    assert cut_points(bare) == cut_points(gm)
    assert all(SHAPE_KEY not in n.meta for n in bare.graph.nodes)  # gm's meta left alone


@pytest.mark.parametrize("k", [1, 2, 3])
def test_relus_k_puts_the_last_k_relus_in_the_classifier(k):
    _, gm, x = load(cnn_bn_maxpool)
    extractor, classifier, cut = split(gm, relus=k)
    assert cut.relus_after == k
    assert len(relu_names(classifier)) == k and len(relu_names(extractor)) == 3 - k
    # the cut is the k-th last ReLU's input: the classifier starts with that ReLU, and the
    # extractor outputs the pre-activation (the embedding TAPS bounds by a box)
    first = next(n for n in classifier.graph.nodes if n.op == "call_function")
    assert first.target is ops.relu and first.args[0].op == "placeholder"
    pre = next(n for n in gm.graph.nodes if n.name == relu_names(gm)[-k]).args[0]
    assert cut.node == pre.name
    assert torch.equal(classifier(extractor(x)), gm(x))


def test_leaky_relu_counts_as_a_relu_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.Sigmoid(),
                        nn.Linear(4, 2))
    gm = certfx.load(net, torch.zeros(1, 3))
    assert [p.relus_after for p in cut_points(gm)] == [1, 0, 0, 0]
    assert split(gm, relus=1).cut.node == "linear"


def test_halves_share_the_models_parameters():
    net, gm, x = load(mlp)
    extractor, classifier, _ = split(gm, relus=1)
    assert extractor.get_parameter("m1_weight") is net[1].weight
    assert classifier.get_parameter("m5_weight") is net[5].weight
    assert extractor.get_parameter("m3_bias") is net[3].bias
    params = {id(p) for p in net.parameters()}
    assert {id(p) for p in [*extractor.parameters(), *classifier.parameters()]} == params
    classifier(extractor(x)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    before = classifier(extractor(x)).detach()
    with torch.no_grad():
        net[1].weight.mul_(1.5)
        net[5].bias.add_(1.0)
    after = classifier(extractor(x))
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, net(x))


def test_a_node_inside_a_residual_block_is_refused_with_the_valid_cuts():
    _, gm, _ = load(residual)
    with pytest.raises(InvalidValueError) as info:
        split(gm, at="relu")
    message = str(info.value)
    assert "cannot cut at='relu'" in message
    assert "'x' (before it) is still used after it by 'add'" in message
    assert "valid cut points:" in message
    for line in ("add (shape (3, 6, 6), 1 ReLU layer(s) after", "relu_1 (shape (3, 6, 6), 0",
                 "reshape (shape (108,), 0"):
        assert line in message
    # relus=2: the second-last ReLU's input (batch_norm) is inside the block
    with pytest.raises(CertfxError, match=r"relus=2, at 'batch_norm' \(the input of ReLU 'relu'\)"
                                          r".*still used after it by 'add'.*valid cut points"):
        split(gm, relus=2)
    assert split(gm, relus=1).cut.node == "add"


def test_a_node_inside_a_branch_is_refused():
    _, gm, _ = load(concat)
    with pytest.raises(InvalidValueError, match=r"cannot cut at='linear'.*parallel branch"):
        split(gm, at="linear")
    with pytest.raises(InvalidValueError, match=r"relus=2.*'relu_1'"):
        split(gm, relus=2)


def test_bad_requests_list_the_options():
    _, gm, _ = load(mlp)
    with pytest.raises(InvalidValueError, match="exactly one"):
        split(gm)
    with pytest.raises(InvalidValueError, match="exactly one"):
        split(gm, relus=1, at="relu")
    for k in (0, -1, 3):
        with pytest.raises(InvalidValueError, match=rf"relus={k}: the network has 2 ReLU layer"
                                                    r"\(s\), choose 1..2 \(for a classifier "
                                                    r"without ReLU, use at='relu_1'\).*valid cut"):
            split(gm, relus=k)
    with pytest.raises(InvalidValueError, match="no node of that name.*valid cut points"):
        split(gm, at="nope")
    with pytest.raises(InvalidValueError, match="network's output, so the classifier would be"):
        split(gm, at="linear_2")
    with pytest.raises(InvalidValueError, match="network's output"):
        split(gm, at="output")
    with pytest.raises(InvalidValueError, match="network's input, so the extractor would be"):
        split(gm, at="x")
    with pytest.raises(InvalidValueError, match="'m1_weight': it is a constant"):
        split(gm, at="m1_weight")
    _, plain, _ = load(normalized)  # sigmoid and tanh only
    with pytest.raises(InvalidValueError, match=r"has 0 ReLU layer\(s\)"):
        split(plain, relus=1)


def test_onnx_node_names_name_cuts():
    pytest.importorskip("onnx2torch")
    from onnx import TensorProto, helper, numpy_helper

    rng = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(*s, generator=rng).numpy(), n)
             for n, s in [("w1", (6, 4)), ("b1", (6,)), ("w2", (3, 6)), ("b2", (3,))]]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="act1"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    gm = certfx.load(model)
    points = cut_points(gm)
    assert [p.source for p in points] == ["ONNX node 'fc1' (Gemm)", "ONNX node 'act1' (Relu)"]
    extractor, classifier, cut = split(gm, at="act1")
    assert cut == points[1] and split(gm, relus=1).cut == points[0]
    x = torch.rand(3, 4)
    assert torch.equal(classifier(extractor(x)), gm(x))
    assert "from ONNX node 'fc1' (Gemm)" in str(points[0])


@pytest.mark.parametrize("make,k", [(mlp, 1), (cnn_bn_maxpool, 2), (residual, 1), (concat, 1)],
                         ids=["mlp", "cnn_bn_maxpool", "residual", "concat"])
def test_box_bounds_of_the_halves_compose_soundly(make, k):
    net, gm, x = load(make)
    extractor, classifier, _ = split(gm, relus=k)
    eps = 0.05
    z_lo, z_hi = certfx.compile(extractor, "box", LinfBall(eps)).certified_forward(x)
    cm = certfx.compile(classifier, "box", Box(z_lo, z_hi))
    lo, hi = cm.certified_forward((z_lo + z_hi) / 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            xs = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
            z, out = extractor(xs), net(xs)
            assert ((z_lo <= z + 1e-5) & (z <= z_hi + 1e-5)).all()
            assert ((lo <= out + 1e-5) & (out <= hi + 1e-5)).all()
    # IBP is compositional: box after box at the cut is exactly box over the whole network
    whole_lo, whole_hi = certfx.compile(gm, "box", LinfBall(eps)).certified_forward(x)
    torch.testing.assert_close((lo, hi), (whole_lo, whole_hi), atol=1e-5, rtol=1e-5)


def test_extractor_compiles_for_deepz_and_keeps_gradients():
    net, gm, x = load(cnn_bn_maxpool)
    extractor, classifier, _ = split(gm, relus=1)
    z_lo, z_hi = certfx.compile(extractor, "deepz", LinfBall(0.02)).certified_forward(x)
    classifier((z_lo + z_hi) / 2).sum().backward()
    assert net[0].weight.grad is not None and net[-1].weight.grad is not None
