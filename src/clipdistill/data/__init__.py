"""Datasets: one in-memory model (:class:`PairedDataset`) and one loading entry point."""

from clipdistill.data.dataset import (
    Caption,
    DatasetError,
    ImageRecord,
    MissingImagesError,
    PairedDataset,
    make_dataset,
)
from clipdistill.data.loading import load_dataset

__all__ = [
    "Caption",
    "DatasetError",
    "ImageRecord",
    "MissingImagesError",
    "PairedDataset",
    "load_dataset",
    "make_dataset",
]
