"""Data for certfx: images with labels from the CSV files of the shared data folder or a user's
own copies (:func:`read_image_csv`), and MNIST / CIFAR-10 / digits for training
(:func:`load_dataset`, :func:`batches`, :class:`RandomCropFlip`)."""

from certfx.data.augment import RandomCropFlip, batches
from certfx.data.csv_images import read_image_csv
from certfx.data.datasets import (
    DATASETS,
    DatasetInfo,
    ImageDataset,
    data_dirs,
    load_dataset,
    read_cifar_batch,
    read_idx,
    shared_data_dir,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "RandomCropFlip",
    "batches",
    "data_dirs",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
    "read_image_csv",
    "shared_data_dir",
]
