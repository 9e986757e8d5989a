"""The PyTorch frontend: every supported construct maps onto core ops and the canonical graph
computes the same function; bad models fail with a clear error naming the place."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certfx
from certfx import ops
from certfx.errors import InvalidValueError, ModelLoadError, ShapeError, TraceError, \
    UnsupportedOpsError


class Lambda(nn.Module):
    def __init__(self, fn, **params: torch.Tensor):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_buffer(k, v)

    def forward(self, x):
        return self.fn(self, x)


torch.manual_seed(0)
W = torch.randn(5, 4)

CONSTRUCTS = {
    "functional_linear": (lambda s, x: F.linear(x, s.w, s.b), (4,), {"w": W, "b": torch.randn(5)}),
    "matmul_const": (lambda s, x: x @ s.w, (3, 5), {"w": W}),
    "torch_matmul_vec": (lambda s, x: torch.matmul(x, s.v), (3, 4), {"v": torch.randn(4)}),
    "conv1d": (lambda s, x: F.conv1d(x, s.w, None, 2, 1, 1, 1), (2, 9), {"w": torch.randn(3, 2, 3)}),
    "conv2d_groups_dilation": (lambda s, x: F.conv2d(x, s.w, s.b, (1, 2), (2, 1), (2, 1), 2),
                               (4, 7, 7), {"w": torch.randn(6, 2, 3, 3), "b": torch.randn(6)}),
    "conv2d_same": (lambda s, x: F.conv2d(x, s.w, padding="same"), (2, 5, 5),
                    {"w": torch.randn(3, 2, 3, 3)}),
    "add_sub_const": (lambda s, x: (x + 1.5) - s.c + (2.0 - x), (4,), {"c": torch.randn(4)}),
    "add_two": (lambda s, x: torch.add(torch.relu(x), x, alpha=2.0), (4,), {}),
    "mul_div_neg": (lambda s, x: -(x * s.c) / 3.0 * 2 + x.mul(0.5).div(s.c), (4,),
                    {"c": torch.tensor([1.0, -2.0, 0.5, 3.0])}),
    "activations": (lambda s, x: torch.cat([F.leaky_relu(x, 0.2), torch.sigmoid(x), x.tanh(),
                                            F.hardtanh(x, -0.3, 0.4), F.relu6(x * 4),
                                            x.clamp(min=0.1), torch.clip(x, -0.2, 0.2)], 1),
                    (4,), {}),
    "reshapes": (lambda s, x: x.view(-1, 2, 6).permute(0, 2, 1).transpose(1, 2).flatten(1)
                 .unsqueeze(1).squeeze(1).reshape(x.shape[0], 3, 4), (12,), {}),
    "slicing": (lambda s, x: x[:, 1:, ::2][..., 1] + x[:, :-1, 0], (3, 5), {}),
    "concat": (lambda s, x: torch.cat([x, x * 2 + s.c], dim=-1), (3,), {"c": torch.randn(3)}),
    "pad": (lambda s, x: F.pad(x, (1, 2, 0, 1), value=0.25), (2, 3, 3), {}),
    "pools": (lambda s, x: F.max_pool2d(x, 3, 2, 1) + F.avg_pool2d(x, 3, 2, 1), (2, 6, 6), {}),
    "max_pool_ceil": (lambda s, x: F.max_pool2d(x, 2, 2, ceil_mode=True), (1, 5, 5), {}),
    "adaptive_avg": (lambda s, x: F.adaptive_avg_pool2d(x, 1).flatten(1), (3, 4, 4), {}),
    "mean_sum": (lambda s, x: x.mean(dim=(2, 3)) + torch.sum(x, 2).sum(-1, keepdim=True).mean(-1),
                 (2, 3, 4), {}),
    "dropout_identity": (lambda s, x: F.dropout(x, 0.5, training=s.training).contiguous(), (4,), {}),
    "normalization": (lambda s, x: (x - s.mean) / s.std, (3, 2, 2),
                      {"mean": torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1),
                       "std": torch.tensor([0.5, 0.2, 0.3]).view(3, 1, 1)}),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_construct_maps_to_core_ops_exactly(name: str) -> None:
    fn, shape, params = CONSTRUCTS[name]
    net = Lambda(fn, **params).eval()
    gm = certfx.load(net, torch.zeros(2, *shape))
    assert all(ops.is_core_op(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert not [n for n in gm.graph.nodes if n.op in ("call_module", "call_method")]
    for batch in (1, 4):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), net.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_construct_bounds_are_sound(name: str) -> None:
    fn, shape, params = CONSTRUCTS[name]
    net = Lambda(fn, **params).eval()
    cm = certfx.compile(net, input_spec=certfx.LinfBall(0.3, None, None),
                        example_input=torch.zeros(1, *shape))
    x = torch.randn(2, *shape)
    lo, hi = cm.certified_forward(x)
    pts = x.repeat(300, *([1] * len(shape))) + (torch.rand(600, *shape) * 2 - 1) * 0.3
    out = net(pts).reshape(300, 2, *lo.shape[1:])
    assert bool((out >= lo - 1e-5).all() and (out <= hi + 1e-5).all())


def test_modules_map_to_core_ops() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.LeakyReLU(0.1), nn.ZeroPad2d(1),
                        nn.AvgPool2d(2), nn.Dropout(0.3), nn.Identity(), nn.Flatten(),
                        nn.Linear(18, 4), nn.Sigmoid(), nn.Tanh(), nn.Hardtanh(), nn.ReLU6(),
                        nn.Unflatten(1, (2, 2)), nn.Flatten(), nn.BatchNorm1d(4)).eval()
    gm = certfx.load(net, torch.zeros(1, 1, 6, 6))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.batch_norm in targets  # trainable: kept as an affine op, not folded
    x = torch.rand(3, 1, 6, 6)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)


def test_batch_norm_folds_for_frozen_models() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8, 3), nn.BatchNorm1d(3)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net.requires_grad_(False)
    gm = certfx.load(net, torch.zeros(1, 1, 4, 4))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.batch_norm not in targets
    x = torch.rand(5, 1, 4, 4)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_data_dependent_control_flow_names_the_line() -> None:
    with pytest.raises(TraceError) as info:
        certfx.load(DataDependent(), torch.zeros(1, 3))
    message = str(info.value)
    assert "test_torch_frontend.py" in message and "x.sum() > 0" in message
    assert "torch.where" in message


class TwoUnsupported(nn.Module):
    def forward(self, x):
        h = torch.sqrt(x)
        return torch.sin(h) * torch.cos(x)


def test_every_unsupported_node_is_listed_at_once() -> None:
    with pytest.raises(UnsupportedOpsError) as info:
        certfx.load(TwoUnsupported(), torch.zeros(1, 3))
    names = [o.op for o in info.value.ops]
    assert len(info.value.ops) == 3, names  # sqrt, sin and cos
    assert all("test_torch_frontend.py" in o.where for o in info.value.ops)
    assert "in pass 'normalize'" in "".join(getattr(info.value, "__notes__", []))


def test_bad_inputs_give_clear_errors() -> None:
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ModelLoadError, match="example_input"):
        certfx.load(net)
    with pytest.raises(ShapeError, match="batch dimension"):
        certfx.load(net, torch.zeros(3))
    with pytest.raises(ShapeError, match="rejects an input"):
        certfx.load(net, torch.zeros(1, 4))
    with pytest.raises(InvalidValueError, match="NaN"):
        certfx.load(net, torch.full((1, 3), math.nan))
    bad = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        bad[0].weight[0, 0] = math.inf
    with pytest.raises(InvalidValueError, match="weight"):
        certfx.load(bad, torch.zeros(1, 3))
    with pytest.raises(ModelLoadError, match="cannot load"):
        certfx.load(42)
