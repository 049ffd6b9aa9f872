"""Feeding batches to the model: DataLoaders, the decoded-image caches and when to use them.

One place for what training, scoring and bench/ share: worker processes decode while the
cache fills; once it holds every image, a CPU run reads it in its own process (the workers would
only take cores from the model), while a GPU run keeps its workers, pinned memory and
non-blocking copies, so that augmentation never starves the GPU.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from imgtrain.data.cache import DecodedImageCache
from imgtrain.data.dataset import ImageDataset, SeededSampler

CACHE_PREFIX = "cache-"


def make_loader(images: ImageDataset, *, batch_size: int, workers: int, device: torch.device,
                sampler: SeededSampler | None = None, drop_last: bool = False,
                persistent: bool = False) -> DataLoader:
    """A DataLoader as imgtrain runs them: pinned memory for a GPU, four batches ahead per worker.

    Its workers' seeds come from a generator of its own: a DataLoader draws them from torch's global one
    otherwise, whenever an iteration starts (each epoch without workers, once with persistent ones), and
    that is the stream a run's dropout masks come from (seeding.seed_rank), which then depended on the
    number of workers, the cache and where a run was resumed. Nothing of imgtrain draws from the
    workers' seeds: augmentation is seeded per image (SeededSampler)."""
    return DataLoader(images, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=persistent and workers > 0, pin_memory=device.type == "cuda",
                      drop_last=drop_last, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(0), worker_init_fn=_end_quietly_on_sigterm)


def _end_quietly_on_sigterm(worker: int) -> None:
    """A worker process ends quietly on SIGTERM, whoever sends it. torch's workers end so only when their own
    process sends it; from anyone else (``kill`` of the process group, GNU timeout, systemd, SLURM: every
    process at once) they died of the signal, and the main process, unwinding from its own SIGTERM, raised
    'DataLoader worker is killed by signal' over it, with tracebacks. The main process says why it stopped."""
    signal.signal(signal.SIGTERM, lambda number, frame: os._exit(0))


class Feeder:
    """One data set's batches, epoch after epoch, in the sampler's order for that epoch."""

    def __init__(self, images: ImageDataset, sampler: SeededSampler, *, batch_size: int, workers: int,
                 device: torch.device, drop_last: bool = False, source: str = "the data set") -> None:
        self.images, self.sampler, self.source = images, sampler, source  # source: where the images come from
        self.batch_size, self.workers, self.device, self.drop_last = batch_size, workers, device, drop_last
        self._loader: DataLoader | None = None
        self._inline = False

    def epoch(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        cache = self.images.cache
        inline = self.workers == 0 or (self.device.type == "cpu" and cache is not None and cache.complete())
        if self._loader is None or inline != self._inline:
            self._loader = None  # ends the persistent workers of the loader before
            self._loader = make_loader(self.images, batch_size=self.batch_size, workers=0 if inline else self.workers,
                                       device=self.device, sampler=self.sampler, drop_last=self.drop_last,
                                       persistent=True)
            self._inline = inline
        return self._loader


def cache_name(name: str, image_size: int, any_shape: bool = False) -> str:
    return f"{CACHE_PREFIX}{name}-{'any-' if any_shape else ''}{image_size}"


def remove_caches(folder: Path, keep: list[str] = ()) -> None:
    """Delete the decoded-image caches in ``folder`` but those named in ``keep`` (from cache_name), such
    as the caches of an earlier attempt at another image size, or with --no-cache on resume."""
    for file in folder.glob(f"{CACHE_PREFIX}*"):
        if file.stem not in keep:
            file.unlink(missing_ok=True)


def open_caches(folder: Path, caches: dict[str, tuple[int, int, bool]], *, make: bool, shared: bool,
                barrier: Callable[[], None], log: Callable[[str], None]) -> dict[str, DecodedImageCache | None]:
    """One decoded-image cache per named data set in ``folder`` (``caches``: name -> (images, side,
    any_shape), see DecodedImageCache), where it fits on the disk.

    ``make``: this process makes the files (one process of a run); the others (``shared``: on the
    same machine) open them after ``barrier``. Not ``shared`` (ranks on other machines), they go
    without, since a memory map is coherent only on one machine.
    """
    opened: dict[str, DecodedImageCache | None] = dict.fromkeys(caches)
    if make:
        remove_caches(folder, keep=[cache_name(name, *spec[1:]) for name, spec in caches.items()])
        for name, (count, size, any_shape) in caches.items():
            opened[name] = DecodedImageCache.create_if_it_fits(folder / cache_name(name, size, any_shape), count,
                                                               size, log, any_shape=any_shape)
    barrier()
    if not make and shared:
        for name, (count, size, any_shape) in caches.items():
            opened[name] = DecodedImageCache.open_existing(folder / cache_name(name, size, any_shape), count, size,
                                                           any_shape=any_shape)
    return opened


def fill_cache(images: ImageDataset, workers: int, log: Callable[[str], None] = lambda message: None,
               what: str = "images") -> None:
    """Decode every image the cache does not hold yet, with ``workers`` processes, before a CPU run's first epoch.

    On a CPU the model's threads and the decoding workers share the same cores: decoding while the first epoch
    trains made its steps wait for threads the workers had taken (measured: the first epoch of 3,750 digits
    trained at 256 img/s, the next ones at 337). Decoded first, on every core, the first epoch is as fast as the
    others, for the same decoding work. A GPU run keeps decoding beside its steps, which run on the GPU."""
    cache = images.cache
    if cache is None or workers == 0:
        return
    undecided = cache.undecided()  # a resumed run's cache is full, or holds what was decoded before it stopped
    if len(undecided) == 0:
        return
    log(f"decoding {len(undecided):,} {what} into the cache with {workers} processes")
    loader = DataLoader(torch.utils.data.Subset(_Decoding(images), undecided.tolist()), batch_size=64,
                        num_workers=workers, collate_fn=_nothing, generator=torch.Generator().manual_seed(0),
                        worker_init_fn=_end_quietly_on_sigterm)
    for _ in loader:
        pass


class _Decoding(torch.utils.data.Dataset):
    """Each image decoded into the cache (or marked bad there), nothing returned."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> None:
        self.images.decoded(i)


def _nothing(batch: list) -> None:
    return None
