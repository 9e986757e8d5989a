"""End-to-end tests of the interval lowering on small networks built in PyTorch: the canonical
graph computes the module's function, the generated bounds are sound (sampling), equal the
textbook IBP bounds, are differentiable and share the model's parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certfx
from certfx import ops
from tests.models import NETWORKS


def _compile(name: str, eps: float = 0.05, device: str | torch.device = "cpu"):
    make, shape = NETWORKS[name]
    net = make().to(device)
    cm = certfx.compile(net, domain="box", input_spec=certfx.LinfBall(eps, 0.0, 1.0),
                        example_input=torch.zeros(1, *shape, device=device))
    return net, cm, shape


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("batch", [1, 5])
def test_canonical_graph_matches_module(name: str, batch: int) -> None:
    make, shape = NETWORKS[name]
    net = make()
    gm = certfx.load(net, torch.zeros(2, *shape))
    assert all(ops.is_core_op(n.target) for n in gm.graph.nodes if n.op == "call_function")
    x = torch.rand(batch, *shape)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_bounds_are_sound_by_sampling(name: str, device: torch.device) -> None:
    torch.manual_seed(3)
    net, cm, shape = _compile(name, eps=0.05, device=device)
    x = torch.rand(4, *shape, device=device)
    lo, hi = cm.certified_forward(x)
    y = net(x).argmax(1)
    margins = cm.certified_forward(x, y=y)
    n = 500
    for i in range(x.shape[0]):
        xl, xh = cm.input_bounds(x[i:i + 1])
        u = torch.rand(n, *shape, device=device)
        u[: n // 2] = (u[: n // 2] < 0.5).to(u.dtype)  # corners
        pts = xl + u * (xh - xl)
        out = net(pts)
        assert bool((out >= lo[i] - 1e-5).all() and (out <= hi[i] + 1e-5).all())
        true_margin = out[:, y[i]].unsqueeze(1) - out
        true_margin = torch.cat([true_margin[:, :y[i]], true_margin[:, y[i] + 1:]], 1)
        assert bool((true_margin >= margins[i] - 1e-5).all())


def _textbook_ibp(net: nn.Sequential, lo: torch.Tensor, hi: torch.Tensor):
    """Interval bound propagation written out per layer (Gowal et al. 2018, Eq. 6)."""
    for layer in net:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            mu, r = (hi + lo) / 2, (hi - lo) / 2
            if isinstance(layer, nn.Linear):
                mu, r = layer(mu), F.linear(r, layer.weight.abs())
            else:
                mu = layer(mu)
                r = F.conv2d(r, layer.weight.abs(), None, layer.stride, layer.padding)
            lo, hi = mu - r, mu + r
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            shape = (1, -1) + (1,) * (lo.dim() - 2)
            s = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).view(shape)
            t = layer.bias.view(shape) - layer.running_mean.view(shape) * s
            lo, hi = torch.minimum(lo * s, hi * s) + t, torch.maximum(lo * s, hi * s) + t
        else:  # ReLU, MaxPool, Flatten: monotone
            lo, hi = layer(lo), layer(hi)
    return lo, hi


@pytest.mark.parametrize("name", ["mlp", "cnn_bn_maxpool"])
def test_equals_textbook_ibp(name: str) -> None:
    net, cm, shape = _compile(name, eps=0.03)
    x = torch.rand(6, *shape)
    lo, hi = cm.certified_forward(x)
    ref_lo, ref_hi = _textbook_ibp(net, *cm.input_bounds(x))
    torch.testing.assert_close(lo, ref_lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(hi, ref_hi, rtol=0, atol=1e-6)


def test_margin_bounds_use_the_fused_last_layer() -> None:
    """Margins from the C-fused last layer are at least as tight as logit-interval differences
    (and strictly tighter somewhere on a random net)."""
    net, cm, shape = _compile("mlp", eps=0.1)
    x = torch.rand(8, *shape)
    y = torch.randint(0, 5, (8,))
    fused = cm.certified_forward(x, y=y)
    lo, hi = cm.certified_forward(x)
    naive = lo.gather(1, y[:, None]) - hi
    naive = torch.stack([torch.cat([naive[i, :y[i]], naive[i, y[i] + 1:]]) for i in range(8)])
    assert bool((fused >= naive - 1e-5).all())
    assert bool((fused > naive + 1e-4).any())


def test_zero_eps_gives_the_point_output() -> None:
    net, cm, shape = _compile("residual", eps=0.0)
    x = torch.rand(3, *shape)
    lo, hi = cm.certified_forward(x)
    torch.testing.assert_close(lo, net(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hi, net(x), atol=1e-5, rtol=1e-5)


def test_eps_override_and_per_example_eps() -> None:
    net, cm, shape = _compile("mlp", eps=0.0)
    x = torch.rand(2, *shape)
    wide = cm.certified_forward(x, eps=0.1)
    per = cm.certified_forward(x, eps=torch.tensor([0.0, 0.1]).view(2, 1, 1))
    torch.testing.assert_close(per.upper[1], wide.upper[1])
    torch.testing.assert_close(per.upper[0], net(x)[0], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_model_parameters(device: torch.device) -> None:
    net, cm, shape = _compile("cnn_bn_maxpool", eps=0.02, device=device)
    x = torch.rand(4, *shape, device=device)
    loss = -cm.certified_forward(x, y=torch.tensor([0, 1, 2, 3], device=device)).mean()
    loss.backward()
    conv = net[0]
    assert conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0)
    assert net[1].weight.grad is not None  # batch norm stays an affine op for trainable nets
    # The generated module shares the very parameter objects.
    assert any(p is conv.weight for p in cm.bounds.parameters())


def test_generated_code_is_plain_and_on_input_device(device: torch.device) -> None:
    net, cm, shape = _compile("residual", device=device)
    assert "box_relu" in cm.code and "box_conv" in cm.code
    lo, hi = cm.certified_forward(torch.rand(2, *shape, device=device))
    assert lo.device.type == device.type


def test_torch_compile_of_generated_module() -> None:
    net, cm, shape = _compile("mlp")
    x = torch.rand(3, *shape)
    lo_ref, hi_ref = cm.certified_forward(x)
    compiled = torch.compile(cm.bounds, backend="eager")
    out = compiled(*cm.input_bounds(x))
    torch.testing.assert_close(out.lower, lo_ref)
    torch.testing.assert_close(out.upper, hi_ref)
