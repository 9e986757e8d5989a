"""Data for certfx: images with labels from the CSV files of the shared data folder or a user's
own copies (:func:`read_image_csv`)."""

from certfx.data.csv_images import read_image_csv

__all__ = ["read_image_csv"]
