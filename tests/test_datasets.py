"""Data sets: idx and CIFAR-10 pickle parsing (round trips through tiny files), the shared files,
the search order, limits, errors, and the crop/flip augmentation and batching."""

from __future__ import annotations

import gzip
import itertools
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from certfx.data import (
    DATASETS,
    ImageDataset,
    RandomCropFlip,
    batches,
    datasets,
    load_dataset,
    read_cifar_batch,
    read_idx,
)
from certfx.errors import CertfxError, DataError, DataNotFoundError, InvalidValueError, ShapeError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared() -> Path:
    """The shared data folder beside the repository; the test is skipped without it."""
    if not (SHARED / "mnbab_mnist_test_1000.csv").is_file():
        pytest.skip(f"no shared data folder at {SHARED}")
    return SHARED


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTFX_DATA", raising=False)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes (gzip-compressed for a ``.gz`` name)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist(folder: Path, prefix: str, n: int, seed: int, gz: bool = False):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
    return x, y


def write_cifar_batch(path: Path, n: int, seed: int):
    rng = np.random.default_rng(seed)
    data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels.tolist()}, f)
    return data, labels


# ---- idx (MNIST) ---------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["", "raw", "MNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path: Path, sub: str, gz: bool) -> None:
    x, y = write_mnist(tmp_path / sub, "train", 5, seed=0, gz=gz)
    _, yt = write_mnist(tmp_path / sub, "t10k", 3, seed=1, gz=gz)
    train = load_dataset("mnist", "train", path=tmp_path)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.shape == (5, 1, 28, 28)
    torch.testing.assert_close(train.images[:, 0], torch.as_tensor(x / 255.0, dtype=torch.float32))
    assert train.labels.tolist() == y.tolist()
    test = load_dataset("mnist", "test", path=tmp_path, limit=2)
    assert test.labels.tolist() == yt[:2].tolist() and test.split == "test"
    assert read_idx(tmp_path / sub / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}").shape == (3,)


def test_idx_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x01" + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)
    with pytest.raises(DataError, match="single idx file"):
        load_dataset("mnist", path=bad)
    write_mnist(tmp_path / "m", "train", 4, seed=0)
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(DataError, match="expected \\(N, 28, 28\\) images and N labels"):
        load_dataset("mnist", path=tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.full(4, 12))
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_dataset("mnist", path=tmp_path / "m")


# ---- CIFAR-10 python batches -----------------------------------------------------------------

def test_cifar_pickle_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    parts = [write_cifar_batch(folder / f"data_batch_{i}", 2, seed=i) for i in range(1, 6)]
    data, labels = write_cifar_batch(folder / "test_batch", 3, seed=9)
    for where in (tmp_path, folder):  # the folder itself or the one holding it
        train = load_dataset("cifar10", "train", path=where)
        assert train.images.shape == (10, 3, 32, 32)
        assert train.labels.tolist() == np.concatenate([p[1] for p in parts]).tolist()
    test = load_dataset("cifar10", "test", path=folder)
    # rows are channel-major: R plane (32×32 row-major), then G, then B
    i, c, h, w = 2, 1, 5, 30
    assert test.images[i, c, h, w].item() == pytest.approx(data[i, c * 1024 + h * 32 + w] / 255)
    assert test.labels.tolist() == labels.tolist()
    one = load_dataset("cifar10", path=folder / "test_batch")  # a single batch file
    assert torch.equal(one.images, test.images)
    x, y = read_cifar_batch(folder / "data_batch_3")
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == parts[2][1].tolist()


def test_cifar_errors(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batch(folder / "data_batch_1", 2, seed=0)
    with pytest.raises(DataNotFoundError, match="lacks data_batch_2, data_batch_3"):
        load_dataset("cifar10", "train", path=tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", "test", path=folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 2]}, f)
    with pytest.raises(DataError, match="CIFAR-100"):
        load_dataset("cifar10", "test", path=folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]}, f)
    with pytest.raises(DataError, match="\\(N, 3072\\) uint8"):
        load_dataset("cifar10", "test", path=folder)


# ---- the shared files and the search order -----------------------------------------------------

@pytest.mark.parametrize(("name", "split", "n"), [("mnist", "train", 5000),
                                                  ("mnist", "test", 1000),
                                                  ("cifar10", "test", 100)])
def test_shared_files(shared: Path, no_env: None, name: str, split: str, n: int) -> None:
    data = load_dataset(name, split)
    assert len(data) == n and data.images.shape[1:] == DATASETS[name].input_shape
    assert data.images.dtype == torch.float32 and 0 <= data.images.min() < data.images.max() <= 1
    assert data.labels.min() == 0 and data.labels.max() == 9
    assert Path(data.source).parent == shared and data.name == name and data.split == split


def test_shared_limit_keeps_every_class_and_the_order(shared: Path, no_env: None) -> None:
    few = load_dataset("mnist", "train", limit=100)
    assert len(few) == 100 and set(few.labels.tolist()) == set(range(10))  # sorted file shuffled
    full = load_dataset("mnist", "test")
    first = load_dataset("mnist", "test", limit=7)
    assert torch.equal(first.images, full.images[:7]) and torch.equal(first.labels, full.labels[:7])
    # the eran file is the first 100 rows of the mn-bab file
    eran = load_dataset("mnist", path=shared / "eran_mnist_test_100.csv")
    assert torch.equal(eran.images, full.images[:100])


def test_certfx_data_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, y = write_mnist(tmp_path, "t10k", 4, seed=3)
    monkeypatch.setenv("CERTFX_DATA", str(tmp_path))
    data = load_dataset("mnist", "test")
    assert data.labels.tolist() == y.tolist() and data.source == str(tmp_path)
    monkeypatch.setattr(datasets, "shared_data_dir", lambda: None)
    tmp = re.escape(str(tmp_path))
    with pytest.raises(DataNotFoundError, match=f"no MNIST training data found in '{tmp}'"):
        load_dataset("mnist", "train")  # the folder has only the test split


def test_a_folder_of_our_csv_files(shared: Path, tmp_path: Path) -> None:
    (tmp_path / "eran_cifar10_test_100.csv").write_bytes(
        (shared / "eran_cifar10_test_100.csv").read_bytes())
    data = load_dataset("cifar10", "test", path=tmp_path, limit=5)
    assert data.images.shape == (5, 3, 32, 32)


def test_nothing_found_says_what_to_do(no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "shared_data_dir", lambda: None)
    with pytest.raises(DataNotFoundError, match="--data PATH\\): a cifar-10-batches-py") as err:
        load_dataset("cifar10", "train")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, CertfxError)
    unset = "no MNIST test data found: \\$CERTFX_DATA is unset.*--test-data PATH.*MNIST idx"
    with pytest.raises(DataNotFoundError, match=unset):
        load_dataset("mnist", "test")


def test_no_cifar_training_set_in_the_shared_folder(shared: Path, no_env: None) -> None:
    only = "for CIFAR-10 it holds only the test file eran_cifar10_test_100.csv"
    with pytest.raises(DataNotFoundError, match=only):
        load_dataset("cifar10", "train")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match="choose one of mnist, cifar10, digits"):
        load_dataset("svhn")
    with pytest.raises(InvalidValueError, match="'train' or 'test'"):
        load_dataset("mnist", "valid")
    with pytest.raises(InvalidValueError, match="limit must be >= 1"):
        load_dataset("mnist", limit=0)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("mnist", path=tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="holds no mnist train data; expected a folder"):
        load_dataset("mnist", path=tmp_path)
    csv = tmp_path / "wrong.csv"
    csv.write_text("1," + ",".join(["0"] * 10) + "\n")
    with pytest.raises(ShapeError, match="needs 784 pixels"):
        load_dataset("mnist", path=csv)
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(128, 256)) * 10)
    with pytest.raises(DataError, match="not a text CSV"):
        load_dataset("mnist", path=binary)


def test_digits() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(DataNotFoundError, match="pip install scikit-learn"):
            load_dataset("digits")
        return
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test", limit=50)
    assert train.images.shape == (1500, 1, 8, 8) and len(test) == 50
    assert train.images.max() == 1.0 and set(train.labels.tolist()) == set(range(10))
    mean, std = DATASETS["digits"].mean[0], DATASETS["digits"].std[0]
    assert float(train.images.mean()) == pytest.approx(mean, abs=0.01)
    assert float(train.images.std()) == pytest.approx(std, abs=0.01)


def test_image_dataset_is_a_torch_dataset() -> None:
    data = ImageDataset(torch.rand(5, 1, 2, 2), torch.arange(5), "toy", "test", "memory")
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    assert [y.tolist() for _, y in loader] == [[0, 1], [2, 3], [4]]
    assert repr(data) == ("ImageDataset(name='toy', split='test', n=5, shape=(1, 2, 2), "
                          "source='memory')")


# ---- augmentation and batches ----------------------------------------------------------------

def _windows(padded: torch.Tensor, size: int) -> list[torch.Tensor]:
    span = padded.shape[-1] - size + 1
    return [padded[..., i:i + size, j:j + size] for i in range(span) for j in range(span)]


@pytest.mark.parametrize("mode", ["edge", "zeros"])
def test_crop_is_a_window_of_the_padded_image(mode: str) -> None:
    x = torch.rand(40, 3, 6, 6)
    aug = RandomCropFlip(size=6, padding=2, flip=False, padding_mode=mode)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate" if mode == "edge" else "constant")
    seen = set()
    for k in range(len(x)):
        hits = [i for i, w in enumerate(_windows(padded[k], 6)) if torch.equal(w, out[k])]
        assert hits, f"image {k} is not a crop of its padded image"
        seen.add(hits[0])
    assert len(seen) > 5  # the offsets vary


def test_flip_preserves_the_pixels() -> None:
    x = torch.rand(64, 3, 5, 5)
    out = RandomCropFlip(size=5, padding=0)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, x, strict=True))
    assert 10 < sum(flipped) < 54  # about half
    torch.testing.assert_close(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    same = RandomCropFlip(size=5, padding=0, flip=False)(x, torch.Generator().manual_seed(0))
    assert torch.equal(same, x)


def test_crop_flip_is_deterministic_with_a_generator() -> None:
    x = torch.rand(8, 3, 32, 32)
    aug = RandomCropFlip()  # TAPS App. D.2: pad 2, crop 32, flip
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(6)))
    assert aug(x).shape == x.shape  # the global generator


def test_crop_flip_errors() -> None:
    with pytest.raises(ShapeError, match="batch"):
        RandomCropFlip(4, 0)(torch.rand(3, 4, 4))
    with pytest.raises(ShapeError, match="larger than the padded image"):
        RandomCropFlip(9, 1)(torch.rand(1, 3, 4, 4))
    with pytest.raises(InvalidValueError, match="padding_mode"):
        RandomCropFlip(padding_mode="reflect")


def test_batches() -> None:
    data = ImageDataset(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10), "t", "train", "m")
    assert [y.tolist() for _, y in batches(data, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(y) for _, y in batches(data, 4, drop_last=True)] == [4, 4]
    runs = [[y.tolist() for _, y in batches(data, 3, shuffle=True,
                                            generator=torch.Generator().manual_seed(s))]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    assert sorted(itertools.chain(*runs[0])) == list(range(10))
    for x, y in batches((data.images, data.labels), 4, augment=lambda x, g: x + 100):
        assert torch.equal(x.flatten(), y.float() + 100)  # images stay paired with labels
    with pytest.raises(InvalidValueError):
        batches(data, 0)


def test_augment_and_batches_on_the_device(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    data = ImageDataset(torch.rand(6, 3, 8, 8, device=device), torch.arange(6, device=device),
                        "t", "train", "m")
    aug = RandomCropFlip(size=8, padding=2)
    out = [(x, y) for x, y in batches(data, 4, shuffle=True, generator=gen, augment=aug)]
    assert [x.shape[0] for x, _ in out] == [4, 2] and out[0][0].device.type == device.type
    cpu = RandomCropFlip(size=8, padding=2)(data.images, torch.Generator().manual_seed(0))
    assert cpu.device.type == device.type  # a CPU generator works for a batch on the device
