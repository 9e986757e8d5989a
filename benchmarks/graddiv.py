"""GradDiv at CPU scale: a randomized MNIST network under EOT-PGD, with and without GradDiv.

Two copies of one randomized CNN (RSE-style Gaussian noise kept on at test time: σ = 0.2 on the
input pixels and 0.1 before the other weighted layers, the thesis' RSE setting, Sec. 2.2.4) are
trained with the ``graddiv`` method on the shared MNIST training images, under the same budget
(seed, epochs, batch size, the same training attack and the same ``n = 3`` draws per input):

* ``λ = 0``: PGD adversarial training of the randomized network (the baseline);
* ``λ > 0``: the same plus ``λ·R_GradDiv`` (Eq. 2.2.20; default GradDiv-κ, λ = 1, the thesis'
  choice for MNIST), with its warm-up and ramp-up (Table A.1, scaled to the run).

Both are evaluated on the first shared MNIST test images:

* natural accuracy of the expected softmax over 20 draws (the thesis' 20-model ensemble);
* accuracy under EOT-PGD (Eq. 2.2.8) with the thesis' settings: ``n = 20`` draws, ``m = 20``
  steps, ``α = ε/4`` (ℓ∞), judged by the expected softmax over 20 fresh draws;
* accuracy under plain PGD: certfx's :func:`~certfx.verify.ball_attacks.pgd_ball` (one draw per
  step; 20 steps, ``α = ε/4``, cross-entropy), judged the same way;
* the mean sample MRL ``ρ̂`` of 20 sampled loss gradients at clean test points (Sec. 2.2.3),
  the quantity GradDiv is meant to lower.

The thesis' claims checked here (Sec. 2.2.4, Table A.2, Figs. 2.4 and 2.6): GradDiv lowers the
concentration of the sampled gradients and raises accuracy under EOT-PGD at large ε, at a small
cost in natural accuracy.

Usage:
    python benchmarks/graddiv.py [--epochs 8] [--eps-train 0.3] [--eps 0.1,0.2,0.3]
        [--regularizer kappa] [--reg-weight 1.0] [--train-limit 5000] [--test-limit 300]
        [--batch-size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
from torch import nn

from certfx.data import load_dataset
from certfx.models import Normalize
from certfx.random_layers import GaussianNoise
from certfx.train import TrainConfig, Trainer
from certfx.train.graddiv import GradDivOptions, mean_resultant_length, sample_gradients
from certfx.verify.attacks import Loss, PGDConfig
from certfx.verify.ball_attacks import pgd_ball
from certfx.verify.eot import EOTConfig, eot_accuracy, eot_pgd

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def randomized_cnn() -> nn.Sequential:
    """Noise 0.2 on the pixels, then Wong & Kolter's small CNN (conv 16 4×4/2, conv 32 4×4/2,
    FC 100, FC 10) with noise 0.1 before each later weighted layer."""
    return nn.Sequential(
        GaussianNoise(0.2), Normalize(MNIST_MEAN, MNIST_STD),
        nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), GaussianNoise(0.1),
        nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(), GaussianNoise(0.1),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(), GaussianNoise(0.1), nn.Linear(100, 10))


def shuffled(images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int = 0):
    """The first ``limit`` examples of a fixed random permutation."""
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit else order
    return images[order], labels[order]


def train(reg_weight: float, args: argparse.Namespace, x: torch.Tensor,
          y: torch.Tensor) -> tuple[nn.Module, float, dict]:
    torch.manual_seed(args.seed)
    net = randomized_cnn()
    options = GradDivOptions(regularizer=args.regularizer, reg_weight=reg_weight)
    config = TrainConfig(method="graddiv", options=options, eps=args.eps_train,
                         epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                         eps_warmup=0, eps_ramp=args.eps_ramp, eps_shape="linear",
                         decay_epochs=(args.epochs // 2,), decay_factor=0.1, seed=args.seed)
    start = time.perf_counter()
    history = Trainer(net, x, y, config).fit()
    return net.eval(), time.perf_counter() - start, history[-1]


def mrl(net: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 20) -> float:
    """The mean over ``x`` of the sample MRL of ``samples`` loss gradients per point."""
    torch.manual_seed(1)
    grads, _ = sample_gradients(net, x, y, samples, create_graph=False)
    return float(mean_resultant_length(grads).mean())


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: list[float],
             seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    row = {"natural": eot_accuracy(net, x, y, samples=20)}
    for eps in eps_list:
        torch.manual_seed(seed)
        xa = eot_pgd(net, x, y, eps, EOTConfig(samples=20, steps=20, step_size=0.25,
                                               seed=seed)).x_adv
        row[f"eot {eps:g}"] = eot_accuracy(net, xa, y, samples=20)
        torch.manual_seed(seed)
        xp = pgd_ball(net, x, y, eps, config=PGDConfig(
            steps=20, restarts=1, step_size=0.25, loss=Loss.CE, early_stop=False,
            seed=seed)).x_adv
        row[f"pgd {eps:g}"] = eot_accuracy(net, xp, y, samples=20)
    row["mrl"] = mrl(net, x[:100], y[:100])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eps-train", type=float, default=0.3)
    parser.add_argument("--eps-ramp", type=float, default=3.0,
                        help="epochs of the linear ε ramp (from 0) of the training attack")
    parser.add_argument("--eps", default="0.1,0.2,0.3", help="evaluation radii (ℓ∞)")
    parser.add_argument("--regularizer", default="kappa")
    parser.add_argument("--reg-weight", type=float, default=1.0)
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    eps_list = [float(e) for e in args.eps.split(",")]

    train_set, test_set = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    x, y = shuffled(train_set.images, train_set.labels, args.train_limit, args.seed)
    xt, yt = test_set.images[:args.test_limit], test_set.labels[:args.test_limit]

    rows = []
    for label, weight in (("PGD-trained, λ = 0", 0.0),
                          (f"+ GradDiv-{args.regularizer}, λ = {args.reg_weight:g}",
                           args.reg_weight)):
        net, seconds, last = train(weight, args, x, y)
        start = time.perf_counter()
        row = evaluate(net, xt, yt, eps_list, args.seed)
        row.update(label=label, train_s=seconds, eval_s=time.perf_counter() - start,
                   train_mrl=last["mrl"], train_kappa=last["kappa_over_p"])
        rows.append(row)
        print(f"[{label}] trained {seconds:.0f} s, evaluated {row['eval_s']:.0f} s",
              file=sys.stderr, flush=True)

    cols = ["natural"] + [f"eot {e:g}" for e in eps_list] + [f"pgd {e:g}" for e in eps_list]
    head = (["model"] + ["natural"] + [f"EOT-PGD ε={e:g}" for e in eps_list]
            + [f"PGD ε={e:g}" for e in eps_list] + ["test ρ̂", "train ρ̂ / κ̂/p", "train s"])
    print(f"\nMNIST, {len(x)} training / {len(xt)} test images, randomized small CNN (RSE noise "
          f"0.2/0.1), {args.epochs} epochs, ε_train = {args.eps_train:g}; accuracy (%) of the "
          "expected softmax over 20 draws; EOT-PGD n = 20, m = 20, α = ε/4; PGD: one draw per "
          "step, m = 20, α = ε/4; ρ̂: mean MRL of 20 sampled gradients on 100 test points; "
          "train ρ̂, κ̂/p: last epoch's mean (3 draws)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = ([r["label"]] + [f"{100 * r[c]:.1f}" for c in cols]
                 + [f"{r['mrl']:.3f}", f"{r['train_mrl']:.3f} / {r['train_kappa']:.3f}",
                    f"{r['train_s']:.0f}"])
        print("| " + " | ".join(cells) + " |")
    print("\ncommand: OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
