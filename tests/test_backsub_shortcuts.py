"""Shortcuts of the generated back-substitution passes, each checked against the long way:
unit rows through a linear layer by a gather (``lin_weight_rows``), passes that stop at the
normalized input (whose values are exactly its box), and chunks sized to a working set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import certfx
import certfx.domains.linear as linear
from certfx.domains.linear import Var, chunk_rows, lin_unit_rows, lin_weight_rows
from certfx import ops
from certfx.domains.linear_backward import BACK
from certfx.models import Normalize
from certfx.specs import L2Ball


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_rows_equal_unit_rows_through_the_linear_layer(shared: bool,
                                                              with_bias: bool) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(7, 5), (torch.randn(7) if with_bias else None)
    index = (torch.tensor([[4, 0, 6]]) if shared else torch.tensor([[1, 2, 3], [6, 5, 0]]))
    like = torch.zeros(2, 7)
    fast = lin_weight_rows(index, weight, bias)
    slow = BACK.rule_for(ops.linear)(lin_unit_rows(index, (7,), like), Var((5,)), weight, bias)
    torch.testing.assert_close(fast.coef, slow.coef)
    torch.testing.assert_close(fast.bias, slow.bias)


def _normalized_mlp(folded: bool) -> nn.Module:
    """An MLP on normalized images, or the same function with the normalization folded into
    the first layer: ``W ((x − m) / s) + b = (W / s) x + (b − W m / s)``."""
    torch.manual_seed(1)
    mean, std = torch.tensor([0.3, 0.5]), torch.tensor([0.2, 0.4])
    first = nn.Linear(2 * 3 * 3, 12)
    rest = [nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)]
    if not folded:
        return nn.Sequential(Normalize(mean.tolist(), std.tolist()), nn.Flatten(), first, *rest)
    per_input_mean = mean.repeat_interleave(9)
    per_input_std = std.repeat_interleave(9)
    merged = nn.Linear(18, 12)
    with torch.no_grad():
        merged.weight.copy_(first.weight / per_input_std)
        merged.bias.copy_(first.bias - first.weight @ (per_input_mean / per_input_std))
    return nn.Sequential(nn.Flatten(), merged, *rest)


@pytest.mark.parametrize("domain", ["crown", "deeppoly", "alpha-crown"])
def test_passes_stop_at_the_normalized_input_with_the_same_bounds(domain: str) -> None:
    x, spec = torch.rand(5, 2, 3, 3), certfx.LinfBall(0.15)
    cms = [certfx.compile(_normalized_mlp(folded), domain=domain, input_spec=spec,
                          example_input=x[:1]) for folded in (False, True)]
    normalized, folded = (cm.certified_forward(x) for cm in cms)
    torch.testing.assert_close(normalized.lower, folded.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalized.upper, folded.upper, rtol=1e-5, atol=1e-5)
    assert "back_div(" not in cms[0].code and "lin_concretize(" in cms[0].code


def test_l2_inputs_still_go_back_to_the_input() -> None:
    """An ℓ2 ball is not the box of the normalized input: its passes run to the input."""
    x = torch.rand(2, 2, 3, 3)
    cm = certfx.compile(_normalized_mlp(False), domain="crown", input_spec=L2Ball(0.3),
                        example_input=x[:1])
    assert "back_div(" in cm.code
    lower, upper = cm.certified_forward(x)
    assert bool((lower <= upper).all())


def test_working_set_chunks_give_the_same_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    x, spec = torch.rand(6, 2, 3, 3), certfx.LinfBall(0.2)
    cm = certfx.compile(_normalized_mlp(False), domain="crown", input_spec=spec,
                        example_input=x[:1])
    results = []
    for entries in (1, 1 << 30):  # one row vector per example and chunk / everything at once
        monkeypatch.setattr(linear, "_CHUNK_ENTRIES", entries)
        monkeypatch.setattr(linear, "_MIN_ROW_VECTORS", 1)
        results.append(cm.certified_forward(x))
    torch.testing.assert_close(results[0].lower, results[1].lower)
    torch.testing.assert_close(results[0].upper, results[1].upper)


def test_chunk_rows() -> None:
    assert chunk_rows(100, 0, 32) == 100  # no width: the budget alone
    assert chunk_rows(100, 784, 32) == (1 << 20) // (2 * 784 * 32)  # the working set
    assert chunk_rows(5, 784, 32) == 5  # never above the memory budget
    assert chunk_rows(1000, 1 << 22, 1) == 256  # at least 512 row vectors…
    assert chunk_rows(100, 1 << 22, 1) == 100  # …within the budget
