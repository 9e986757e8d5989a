"""Data for certfx: images with labels from the CSV files of the shared data folder or a user's
own copies (:func:`read_image_csv`), and MNIST / CIFAR-10 for training (:func:`load_dataset`)."""

from certfx.data.csv_images import read_image_csv
from certfx.data.datasets import DATASETS, ImageDataset, RandomCropFlip, load_dataset

__all__ = ["DATASETS", "ImageDataset", "RandomCropFlip", "load_dataset", "read_image_csv"]
