"""Datasets that stream images from disk: memory holds paths and labels, never pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from imgtrain.data.decode import BadImageError, load_rgb


class ImageDataset(Dataset):
    """Yields ``(uint8 CHW image, label, index, ok)``; ``ok`` is False when decoding failed.

    A bad file is reported back to the main process (which names it) instead of raising
    inside a DataLoader worker, where the error would arrive wrapped in a traceback.
    """

    def __init__(self, paths: Sequence[Path | str], labels: np.ndarray | None, transform: Callable,
                 image_size: int) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        label = -1 if self.labels is None else int(self.labels[i])
        try:
            x = self.transform(load_rgb(self.paths[i]))
            ok = True
        except BadImageError:
            x = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            ok = False
        return x, label, i, ok


def raise_for_bad_images(ok: torch.Tensor, index: torch.Tensor, dataset: ImageDataset) -> None:
    if not bool(ok.all()):
        i = int(index[~ok][0])
        load_rgb(dataset.paths[i])  # raises BadImageError naming the file and the reason
        raise BadImageError(f"cannot decode image {dataset.paths[i]}", "remove or replace the file")
