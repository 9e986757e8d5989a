"""Data loaders (shared files, idx, CIFAR batches, CSV), augmentation, and the model zoo."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import certfx
from certfx.data import RandomCropFlip, load_dataset
from certfx.data.datasets import read_idx
from certfx.errors import CertfxError, InvalidValueError
from certfx.models import MODELS, build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_mnist_idx_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28))
    labels = rng.integers(0, 10, size=7)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    ds = load_dataset("mnist", "test", path=tmp_path, limit=5)
    assert ds.images.shape == (5, 1, 28, 28) and ds.labels.tolist() == labels[:5].tolist()
    assert torch.allclose(ds.images[:, 0] * 255, torch.tensor(images[:5], dtype=torch.float32))
    with pytest.raises(CertfxError, match="holds no mnist train data.*idx3"):
        load_dataset("mnist", "train", path=tmp_path)


def test_idx_errors_are_named(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(CertfxError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 3)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(CertfxError, match="truncated"):
        read_idx(tmp_path / "short")


def test_cifar_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(4, 3072)).astype(np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [3, 1, 4, 1]}, f)
    ds = load_dataset("cifar10", "test", path=tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [3, 1, 4, 1]
    # CIFAR's rows are channel-major: the first 1024 values are the red plane
    assert torch.allclose(ds.images[0, 0].flatten() * 255, torch.tensor(
        data[0, :1024], dtype=torch.float32))


def test_bad_requests():
    with pytest.raises(InvalidValueError, match="unknown data set 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(InvalidValueError, match="split"):
        load_dataset("mnist", "valid")
    with pytest.raises(CertfxError, match="does not exist"):
        load_dataset("mnist", path="/nonexistent/mnist.csv")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_shared_files():
    train = load_dataset("mnist", "train", limit=200)
    assert train.images.shape == (200, 1, 28, 28)
    assert len(set(train.labels.tolist())) == 10  # the class-sorted file is shuffled
    test = load_dataset("mnist", "test")
    assert len(test) == 1000 and test.labels[:3].tolist() == [7, 2, 1]
    assert 0 <= float(test.images.min()) and float(test.images.max()) <= 1
    assert load_dataset("cifar10", "test").images.shape == (100, 3, 32, 32)
    with pytest.raises(CertfxError, match="--data"):
        load_dataset("cifar10", "train")


def test_crop_and_flip():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    out = RandomCropFlip(size=6, padding=2)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    same = RandomCropFlip(size=6, padding=0, flip=False)(x, torch.Generator())
    assert torch.equal(same, x)  # no padding, no flip: the identity
    flipped = RandomCropFlip(size=6, padding=0)(x, torch.Generator().manual_seed(3))
    for i in range(2):  # each image is itself or its mirror image
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    a = RandomCropFlip(6, 2)(x, torch.Generator().manual_seed(5))
    b = RandomCropFlip(6, 2)(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dataset, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_every_model_builds_traces_and_bounds(name, dataset, shape):
    net = build_model(name, dataset).eval()
    x = torch.rand(2, *shape)
    assert net(x).shape == (2, 10)
    cm = certfx.compile(net, "box", certfx.LinfBall(0.001), example_input=x[:1])
    lo, hi = cm.certified_forward(x)
    out = net(x)
    assert (lo <= out + 1e-4).all() and (out <= hi + 1e-4).all()


def test_the_normalization_is_inside_the_model():
    net = build_model("small_cnn", "mnist")
    assert isinstance(net[0], certfx.models.Normalize)
    assert float(net[0].mean.flatten()[0]) == pytest.approx(0.1307)
    with pytest.raises(InvalidValueError, match="unknown model"):
        build_model("vgg")
