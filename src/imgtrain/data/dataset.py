"""Datasets that stream images from disk: memory holds paths and labels, never pixels.

Randomness is a pure function of (seed, epoch, image): the sampler hands each image index
with its own augmentation seed. Which worker process decodes an image, how many workers
there are, and whether a run was interrupted and resumed change nothing in the result.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from imgtrain.data.cache import DecodedImageCache
from imgtrain.data.transforms import Augmentation, Preparation, RandomOperations
from imgtrain.errors import BadImageError


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)``: a seeded order (or the plain one) for each epoch; with
    ``ranks`` > 1, process ``rank``'s share of it.

    Training (``shuffle``): every epoch, one permutation of all images by (seed, epoch), the same in
    every process, dealt out in equal shares: rank r takes positions r, r + ranks, ... The last
    ``size % ranks`` images of the permutation (other ones each epoch) wait for a later epoch, so
    every process takes the same number of steps, without padding with repeated images.

    In order (no ``shuffle``, for validation and scoring): every image exactly once over all
    processes, in shares that differ by one image at most.

    Class-balanced (``balance_labels``, training only): instead of a permutation, ``size`` draws
    with replacement, each one a class taken uniformly among those with images, then an image of
    that class taken uniformly: every class is seen equally often, small ones several times over.
    """

    def __init__(self, size: int, seed: int, *, shuffle: bool, rank: int = 0, ranks: int = 1,
                 balance_labels: np.ndarray | None = None) -> None:
        self.size, self.seed, self.shuffle, self.rank, self.ranks = size, seed, shuffle, rank, ranks
        self.epoch = 0
        self.by_class = None
        if balance_labels is not None:
            labels = torch.as_tensor(np.asarray(balance_labels, dtype=np.int64))
            counts = torch.bincount(labels)
            present = counts > 0
            # the images sorted by class, where each class starts in that order, and how many it has
            self.by_class = (torch.argsort(labels, stable=True), (torch.cumsum(counts, 0) - counts)[present],
                             counts[present])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _share(self) -> slice:
        end = self.size - self.size % self.ranks if self.shuffle else self.size
        return slice(self.rank, end, self.ranks)

    def __len__(self) -> int:
        return len(range(self.size)[self._share()])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.by_class is not None:
            order = self._balanced_draw(g)
        else:
            order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(2**62, (self.size,), generator=g)
        share = self._share()
        return zip(order[share].tolist(), seeds[share].tolist(), strict=True)

    def _balanced_draw(self, g: torch.Generator) -> torch.Tensor:
        """Class by class arithmetic rather than torch.multinomial over images, which stops at 2**24 of them."""
        images, starts, counts = self.by_class
        classes = torch.randint(len(counts), (self.size,), generator=g)
        within = (torch.rand(self.size, generator=g, dtype=torch.float64) * counts[classes]).long()
        return images[starts[classes] + torch.minimum(within, counts[classes] - 1)]


class ImageDataset(Dataset):
    """Yields ``(uint8 CHW image, label, index, ok)``; ``ok`` is False when decoding failed.

    An image is decoded and resized once (or read from the decoded-image cache), then
    augmented with its own seed. A bad file is reported back to the main process (which
    names it and applies the bad-image policy) instead of raising inside a worker.
    """

    def __init__(self, paths: Sequence[Path | str], labels: np.ndarray | None, image_size: int, *,
                 augment: Augmentation | RandomOperations | None = None,
                 cache: DecodedImageCache | None = None, prepare: Preparation | None = None) -> None:
        self.paths = [str(p) for p in paths]  # strings: a third of the memory of Path objects
        self.labels = labels
        self.image_size = image_size  # of what the dataset yields: prepared (and augmented) images
        self.augment = augment
        self.cache = cache
        self.prepare = prepare or Preparation(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def decoded(self, i: int) -> torch.Tensor | None:
        """Image ``i`` prepared (decoded and resized) from the cache, or decoded and put there; None if bad."""
        cached = self.cache.get(i) if self.cache is not None else None
        if cached is not None:
            return cached if cached is not False else None
        try:
            x = self.prepare.load(self.paths[i])
        except BadImageError:
            x = None
        if self.cache is not None:
            self.cache.put(i, x)
        return x

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        label = -1 if self.labels is None else int(self.labels[i])
        x = self.decoded(i)
        if x is None:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), label, i, False
        if self.augment is not None:
            try:
                x = self.augment(x, random.Random(seed))
            except ValueError:  # an image the random operations cannot take: a bad image (see ``failure``)
                return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), label, i, False
        return x, label, i, True

    def failure(self, i: int) -> BadImageError:
        """Why image ``i`` could not be had, found again in this process (workers report only that it failed):
        the decoder's reason, or the random operations' (an image smaller than a RandomCrop)."""
        path = self.paths[i]
        try:
            x = self.prepare.load(path)
        except BadImageError as exc:
            return exc
        try:
            if self.augment is not None:
                self.augment(x, random.Random(0))
        except ValueError as exc:
            reason = (f"the transformation's random operations cannot take it as its fixed ones leave it, "
                      f"{x.shape[-1]} x {x.shape[-2]} px ({str(exc).rstrip('.')})")
            error = BadImageError(f"image {path}: {reason}",
                                  "resize the images before the random operations (a Resize in the transformation), "
                                  "let RandomCrop pad them (pad_if_needed), or remove the image")
            error.reason = reason
            return error
        return BadImageError(f"cannot decode image {path}", "remove or replace the file")


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
            raise self._error(bad[0])
        for i in bad:
            if i not in self.skipped:
                self.skipped.add(i)
                self.log(f"warning: skipping image {self.dataset.paths[i]}: {self._error(i).reason}")
        return [x[ok], y[ok], index[ok]]

    def _error(self, i: int) -> BadImageError:
        return self.dataset.failure(i)
