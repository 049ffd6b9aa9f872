"""Datasets that stream images from disk: memory holds paths and labels, never pixels.

Randomness is a pure function of (seed, epoch, image): the sampler hands each image index
with its own augmentation seed. Which worker process decodes an image, how many workers
there are, and whether a run was interrupted and resumed change nothing in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from imgtrain.data.decode import BadImageError, load_rgb


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)``: a seeded order (or the plain one) for each epoch."""

    def __init__(self, size: int, seed: int, *, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(2**62, (self.size,), generator=g)
        return zip(order.tolist(), seeds.tolist(), strict=True)


class ImageDataset(Dataset):
    """Yields ``(uint8 CHW image, label, index, ok)``; ``ok`` is False when decoding failed.

    A bad file is reported back to the main process (which names it and applies the
    bad-image policy) instead of raising inside a DataLoader worker.
    """

    def __init__(self, paths: Sequence[Path | str], labels: np.ndarray | None, transform: Callable,
                 image_size: int) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        label = -1 if self.labels is None else int(self.labels[i])
        try:
            image = load_rgb(self.paths[i])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(image)
            ok = True
        except BadImageError:
            x = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            ok = False
        return x, label, i, ok


ON_BAD_IMAGE = ("skip", "fail")


class BadImagePolicy:
    """Applies --on-bad-image to a batch. ``fail`` raises naming the file; ``skip`` drops the
    image from the batch and names it once. Never a silently substituted image."""

    def __init__(self, policy: str, dataset: ImageDataset, log: Callable[[str], None]) -> None:
        self.policy, self.dataset, self.log = policy, dataset, log
        self.skipped: set[int] = set()

    def filter(self, batch: list) -> list:
        x, y, index, ok = batch
        if bool(ok.all()):
            return [x, y, index]
        bad = [int(i) for i in index[~ok]]
        if self.policy == "fail":
            load_rgb(self.dataset.paths[bad[0]])  # raises BadImageError with the decoder's reason
            raise BadImageError(f"cannot decode image {self.dataset.paths[bad[0]]}", "remove or replace the file")
        for i in bad:
            if i not in self.skipped:
                self.skipped.add(i)
                self.log(f"warning: skipping image {self.dataset.paths[i]}: it cannot be decoded")
        return [x[ok], y[ok], index[ok]]
