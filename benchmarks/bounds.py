"""Speed of the generated box bounds against a plain forward pass (``make bench``).

For each network the script times, in the same run and on the same batch:

* inference (``torch.no_grad``): the model's forward pass, and ``certified_forward(x, y=y)``
  (lower bounds on the margins, box domain) compiled from a frozen copy of the model, so that
  eval-mode batch norm is folded into the preceding layer as it would be for verification;
* training (grad enabled): forward + backward of the cross-entropy loss, and
  ``certified_forward`` + backward of the IBP loss ``log(1 + Σ exp(−margin))``, compiled from the
  trainable model (batch norm kept as an affine op so gradients reach its parameters).

Each measurement is the median of ``--repeats`` runs after ``--warmup`` runs, baseline and
certified runs alternating (CUDA is synchronized around every run). The ratios ``certified / plain`` are printed; nothing is
asserted. Networks:

* ``mlp``: the MNIST MLP 784-256-256-10, batch 32;
* ``cnn7``: CNN7 of Shi et al. (2021) as used by SABR (Müller et al. 2023) and TAPS, on CIFAR-10
  ``3×32×32``, batch 8: conv 64, 64, 128, 128, 128 (3×3, strides 1, 1, 2, 1, 1, padding 1), each
  followed by batch norm and ReLU, then linear 512, batch norm, ReLU, linear 10, with the
  CIFAR-10 normalization inside the graph.

Usage:
    python benchmarks/bounds.py [--device cpu cuda] [--repeats 30] [--models mlp cnn7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certfx

from networks import cnn7, mnist_mlp  # noqa: E402  (benchmarks/ is the script's folder)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    eps: float


CASES = {
    "mlp": Case("mlp 784-256-256-10", lambda: mnist_mlp()[1:], (1, 28, 28), 32, 0.1),
    "cnn7": Case("cnn7 (CIFAR-10)", cnn7, (3, 32, 32), 8, 2 / 255),
}


def paired_median_ms(baseline: Callable[[], object], candidate: Callable[[], object],
                     device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of ``baseline()`` and ``candidate()``, measured alternately, so a
    slow phase of a shared machine affects both alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        baseline()
        candidate()
    sync()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((baseline, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            fn()
            sync()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def ibp_loss(margins: Tensor) -> Tensor:
    zeros = torch.zeros_like(margins[:, :1])
    return torch.logsumexp(torch.cat([zeros, -margins], 1), 1).mean()


def bench(case: Case, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    net = case.make().to(device)
    for m in net.modules():  # realistic batch-norm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.rand(case.batch, *case.input_shape, device=device)
    y = torch.randint(0, 10, (case.batch,), device=device)
    example = x[:1]
    spec = certfx.LinfBall(case.eps, 0.0, 1.0)

    frozen = copy.deepcopy(net)
    for p in frozen.parameters():
        p.requires_grad_(False)
    cm_inference = certfx.compile(frozen, domain="box", input_spec=spec, example_input=example)
    cm_training = certfx.compile(net, domain="box", input_spec=spec, example_input=example)

    def plain() -> None:
        net(x)

    def bound() -> None:
        cm_inference.certified_forward(x, y=y)

    def plain_train() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    def bound_train() -> None:
        net.zero_grad(set_to_none=True)
        ibp_loss(cm_training.certified_forward(x, y=y)).backward()

    result = {}
    with torch.no_grad():
        result["fwd"], result["cert"] = paired_median_ms(plain, bound, device, warmup, repeats)
    result["fwd_bwd"], result["cert_bwd"] = paired_median_ms(plain_train, bound_train, device,
                                                             warmup, repeats)
    assert any(p.grad is not None for p in net.parameters())  # gradients reached the model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=None,
                        help="devices to run on (default: cpu, and cuda when available)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES),
                        help="networks to time (default: all)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs (median reported)")
    args = parser.parse_args()
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    header = (f"{'network':<20} {'device':<6} {'batch':>5} | {'forward':>9} {'certified':>9} "
              f"{'ratio':>6} | {'fwd+bwd':>9} {'cert+bwd':>9} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        case = CASES[name]
        for dev in devices:
            device = torch.device(dev)
            r = bench(case, device, args.warmup, args.repeats)
            print(f"{case.name:<20} {dev:<6} {case.batch:>5} | {r['fwd']:>7.3f}ms "
                  f"{r['cert']:>7.3f}ms {r['cert'] / r['fwd']:>5.2f}x | {r['fwd_bwd']:>7.3f}ms "
                  f"{r['cert_bwd']:>7.3f}ms {r['cert_bwd'] / r['fwd_bwd']:>5.2f}x", flush=True)
    print("inference columns under torch.no_grad; fwd+bwd columns: loss + backward "
          "(cross-entropy vs. IBP loss); medians of --repeats runs")


if __name__ == "__main__":
    main()
