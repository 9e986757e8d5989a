"""The model zoo: every model builds for every data set, traces through certfx, has sound box
bounds, the papers' layer shapes, and its normalization inside the graph (ε in pixel space)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import certfx
from certfx import ops
from certfx.data import DATASETS
from certfx.errors import InvalidValueError, ShapeError
from certfx.models import MODELS, Normalize, build_model, conv_net

COMBOS = [(m, d) for m in MODELS for d in DATASETS]  # every combination works


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: one intra-op thread avoids OpenMP's synchronization cost,
    which on a busy two-core machine makes these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize_batch_norm(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that eval-mode batch norm is not the identity."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize(("name", "dataset"), COMBOS)
def test_builds_traces_and_box_bounds_contain_outputs(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    net = _randomize_batch_norm(build_model(name, dataset))
    assert isinstance(net[0], Normalize)
    shape = DATASETS[dataset].input_shape
    x = torch.rand(2, *shape) * 0.9 + 0.05
    gm = certfx.load(net, torch.zeros(1, *shape))
    assert all(ops.is_core_op(n.target) for n in gm.graph.nodes if n.op == "call_function")
    eps = 0.01
    cm = certfx.compile(gm, domain="box", input_spec=certfx.LinfBall(eps), example_input=x)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 10)
        torch.testing.assert_close(gm(x), out, rtol=1e-4, atol=1e-4)
        bounds = cm.certified_forward(x)
        inside = net((x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1))
    for y in (out, inside):
        assert bool((bounds.lower <= y + 1e-4).all()) and bool((y <= bounds.upper + 1e-4).all())


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_normalization_is_the_first_op_of_the_graph(dataset: str) -> None:
    info = DATASETS[dataset]
    net = build_model("small_cnn", dataset)
    assert isinstance(net[0], Normalize)
    gm = certfx.load(net, torch.zeros(1, *info.input_shape))
    sub, div = [n for n in gm.graph.nodes if n.op == "call_function"][:2]
    assert sub.target is ops.sub and div.target is ops.div and div.args[0] is sub
    assert sub.args[0].op == "placeholder"
    mean = gm.get_buffer(sub.args[1].target).flatten().tolist()
    std = gm.get_buffer(div.args[1].target).flatten().tolist()
    assert mean == pytest.approx(info.mean) and std == pytest.approx(info.std)


def test_eps_is_in_pixel_space() -> None:
    """Box bounds of the model at ε equal those of its layers after Normalize at ε / std around
    the normalized input (interval arithmetic is exact for a per-channel affine map)."""
    torch.manual_seed(1)
    net = build_model("cnn3", "cifar10", width=2).eval()
    inner = nn.Sequential(*list(net)[1:])
    std = torch.tensor(DATASETS["cifar10"].std).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32) * 0.5 + 0.25  # far from 0 and 1: no clipping
    eps = 0.02
    outer = certfx.compile(net, "box", certfx.LinfBall(eps), example_input=x)
    z = net[0](x)
    normed = certfx.compile(inner, "box", certfx.LinfBall(eps / std, None, None),
                            example_input=z)
    a, b = outer.certified_forward(x), normed.certified_forward(z)
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.upper, b.upper, rtol=1e-4, atol=1e-4)


def _relus(net: nn.Module, shape: tuple[int, ...]) -> int:
    """The number of ReLU outputs for one input."""
    count = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + o[0].numel()))
             for m in net.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return count[0]


def _layers(net: nn.Module) -> list[tuple[int, ...]]:
    """``(out, kernel, stride, padding)`` of the convolutions and ``(out,)`` of the linears."""
    return [(m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
            if isinstance(m, nn.Conv2d) else (m.out_features,)
            for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_architectures_follow_the_papers() -> None:
    # ACE App. A, Table 3 (padding 1 as in ACE's code)
    assert _layers(build_model("conv2", "cifar10")) == [(32, 4, 2, 1), (32, 4, 2, 1), (200,), (10,)]
    assert _layers(build_model("conv3", "cifar10")) == [
        (32, 3, 1, 1), (32, 4, 2, 1), (128, 4, 2, 1), (250,), (10,)]
    assert _layers(build_model("conv5", "cifar10")) == [
        (64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1), (512,),
        (10,)]
    # COLT paper, Sec. 6: 2 convolutions (32, 128; 4×4/2), FC 150
    colt = build_model("colt_conv3", "cifar10")
    assert _layers(colt) == [(32, 4, 2, 1), (128, 4, 2, 1), (150,), (10,)]
    assert _relus(colt, (3, 32, 32)) == 16 * 16 * 32 + 8 * 8 * 128 + 150
    # CNN7 (SABR / TAPS App. D.3): 7 layers, all but the last followed by BN and ReLU
    cnn7 = build_model("cnn7", "mnist")
    assert len(_layers(cnn7)) == 7
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cnn7.modules()) == 6
    assert _relus(cnn7, (1, 28, 28)) == 2 * 64 * 28 * 28 + 3 * 128 * 14 * 14 + 512
    plain = build_model("cnn7", "cifar10", batch_norm=False, width=8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    # TAPS's CNN3 (its code's cnn_3layer) and the tiny one of its MILP experiment
    assert _layers(build_model("cnn3", "mnist")) == [(16, 5, 2, 2), (32, 4, 2, 1), (10,)]
    assert _layers(build_model("cnn3", "mnist", width=1)) == [(1, 5, 2, 2), (2, 4, 2, 1), (10,)]
    assert _layers(build_model("small_cnn", "mnist")) == [
        (16, 4, 2, 1), (32, 4, 2, 1), (100,), (10,)]
    assert _layers(build_model("mlp", "digits", widths=(7, 5))) == [(7,), (5,), (10,)]
    assert build_model("mlp", "mnist")[2].in_features == 784
    assert build_model("conv2", "digits")[1].in_channels == 1


def test_bad_names_and_options_fail_clearly() -> None:
    with pytest.raises(InvalidValueError, match="choose one of mlp, cnn3"):
        build_model("lenet", "mnist")
    with pytest.raises(InvalidValueError, match="unknown data set 'svhn'.*mnist, cifar10"):
        build_model("cnn3", "svhn")
    with pytest.raises(InvalidValueError, match="no option depth; it takes width"):
        build_model("cnn3", "mnist", depth=3)
    with pytest.raises(InvalidValueError, match="takes no options"):
        build_model("conv2", "mnist", width=3)
    with pytest.raises(ShapeError, match="would output 0×0"):
        conv_net("digits", [(4, 4, 4, 0), (4, 4, 4, 0)], [])
