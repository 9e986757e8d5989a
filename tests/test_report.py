"""Tightness reports: per-layer bounds from prefix graphs, unstable counts, domain comparison
(library and `certfx bounds --compare/--layers`), and compile leaving its input graph intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import certfx
from certfx.cli import main
from certfx.report import compare_domains, layer_bounds, prefix_graph
from tests.models import NETWORKS


def test_compile_does_not_modify_the_graph_it_is_given() -> None:
    make, shape = NETWORKS["mlp"]
    gm = certfx.load(make(), torch.zeros(1, *shape))
    before = [(n.name, n.target) for n in gm.graph.nodes]
    certfx.compile(gm, domain="box")
    assert [(n.name, n.target) for n in gm.graph.nodes] == before


def test_prefix_graph_computes_the_intermediate_value() -> None:
    make, shape = NETWORKS["mlp"]
    net = make()
    gm = certfx.load(net, torch.zeros(1, *shape))
    first_linear = next(n.name for n in gm.graph.nodes if n.target is certfx.ops.linear)
    x = torch.rand(3, *shape)
    torch.testing.assert_close(prefix_graph(gm, first_linear)(x), net[1](net[0](x)))


def test_layer_bounds_match_box_intermediate_bounds_and_count_unstable() -> None:
    make, shape = NETWORKS["mlp"]
    net = make()
    gm = certfx.load(net, torch.zeros(1, *shape))
    x = torch.rand(4, *shape)
    spec = certfx.LinfBall(0.1)
    layers = layer_bounds(gm, "box", spec, x)
    assert [layer.neurons for layer in layers] == [16, 16]
    lo, hi = spec.bounds(x)
    # The first layer's box bounds, by hand: W c + b ± |W| r.
    w, b = net[1].weight, net[1].bias
    c, r = ((hi + lo) / 2).flatten(1), ((hi - lo) / 2).flatten(1)
    torch.testing.assert_close(layers[0].lower, c @ w.T + b - r @ w.abs().T)
    assert layers[0].unstable == int(((layers[0].lower < 0) & (layers[0].upper > 0)).sum())


def test_compare_domains_report() -> None:
    make, shape = NETWORKS["cnn_bn_maxpool"]
    gm = certfx.load(make(), torch.zeros(1, *shape))
    x, y = torch.rand(2, *shape), torch.tensor([0, 1])
    reports = compare_domains(gm, ["box", "ibp"], certfx.LinfBall(0.01), x, y)
    assert [r.domain for r in reports] == ["box", "box"]
    assert reports[0].certified is not None and reports[0].mean_width >= 0
    assert len(reports[0].layers) == 3  # three ReLUs


def test_cli_compare_and_layers(tmp_path, capsys) -> None:
    model = str(Path(__file__).resolve().parents[1] / "examples/models/demo_cnn.onnx")
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32))
    assert main(["bounds", model, "--eps", "0.02", "--input", str(inputs), "--compare",
                 "box,interval", "--y", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "domains compared" in out and "unstable neurons per layer" in out
    assert main(["bounds", model, "--eps", "0.02", "--input", str(inputs), "--layers"]) == 0
    assert "conv → relu" in capsys.readouterr().out
    assert main(["bounds", model, "--eps", "0.02", "--input", str(inputs), "--compare",
                 "box,nope"]) == 2
    assert "unknown domain 'nope'" in capsys.readouterr().err


def test_layer_bounds_of_back_substitution_are_the_domains_own_and_match_prefix_graphs() -> None:
    """CROWN's per-layer bounds come from the whole graph's module (no prefix compiled). Where
    intervals leave a neuron unstable they are the prefix graph's full back-substitution met with
    the intervals; elsewhere they may be the looser interval bounds, but with the same sign."""
    make, shape = NETWORKS["mlp"]
    gm = certfx.load(make(), torch.zeros(1, *shape))
    x, spec = torch.rand(4, *shape), certfx.LinfBall(0.1)
    box_layers = layer_bounds(gm, "box", spec, x)
    for domain in ("crown", "alpha-crown"):
        for layer, box in zip(layer_bounds(gm, domain, spec, x), box_layers):
            prefix = certfx.compile(prefix_graph(gm, layer.node), domain="crown",
                                    input_spec=spec).certified_forward(x)
            open_ = (box.lower < 0) & (box.upper > 0)
            torch.testing.assert_close(layer.lower[open_],
                                       torch.maximum(prefix.lower, box.lower)[open_])
            torch.testing.assert_close(layer.upper[open_],
                                       torch.minimum(prefix.upper, box.upper)[open_])
            assert ((layer.lower < 0) & (layer.upper > 0)).eq(
                (prefix.lower < 0) & (prefix.upper > 0)).all()


def test_cli_compare_back_substitution_on_a_wide_convolution(tmp_path, capsys) -> None:
    """The demo CNN's first conv has 6,272 neurons: a prefix graph ending there would need a
    dense output pass over the budget; the whole graph's module has the bounds already."""
    model = str(Path(__file__).resolve().parents[1] / "examples/models/demo_cnn.onnx")
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32))
    assert main(["bounds", model, "--eps", "0.02", "--input", str(inputs), "--compare",
                 "box,crown"]) == 0
    assert "crown" in capsys.readouterr().out
