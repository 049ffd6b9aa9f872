"""The decoded-image cache: images at training size, as uint8, in a memory-mapped file.

The first epoch decodes and resizes every image once and stores the result; later epochs
read it back instead of decoding again. Memory stays bounded (the operating system pages
the file in and out); the file lives in the run's work directory and goes with it. Its disk
blocks are reserved when it is made, so a disk that fills up later (another program, a
checkpoint) cannot kill the run with SIGBUS while an image is written into the mapping.
Augmentation is applied after the cache, so every epoch still sees new random crops.

Images are squares of one size, or (``any_shape``, for a transformation whose random crops must see
each picture as its fixed operations leave it) pictures of any shape up to twice that square's
pixels, their height and width kept beside them; a larger one is not kept, and is decoded each time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

MAX_CACHE_BYTES = 64 * 2**30
_EMPTY, _FILLED, _BAD, _TOO_LARGE = 0, 1, 2, 3
_FILES = (".pixels", ".state", ".shapes")


def _reserve(file: Path, nbytes: int) -> None:
    """Make `file` exactly `nbytes` long with every block allocated, keeping what it already holds
    when its size is right (a resumed run); raises OSError when the disk has no room."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != nbytes:
            os.ftruncate(fd, 0)
        if hasattr(os, "posix_fallocate") and nbytes:
            os.posix_fallocate(fd, 0, nbytes)
        else:  # macOS, Windows: a sparse file, its blocks allocated as it fills
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    for suffix in _FILES:
        path.with_suffix(suffix).unlink(missing_ok=True)


class DecodedImageCache:
    """``count`` images of 3 x size x size uint8 (``any_shape``: 3 x h x w, h x w <= 2 x size x size),
    shared by the DataLoader worker processes."""

    def __init__(self, path: Path, count: int, size: int, *, reserve: bool = True, any_shape: bool = False) -> None:
        self.pixels_path, self.state_path = path.with_suffix(".pixels"), path.with_suffix(".state")
        self.shapes_path = path.with_suffix(".shapes") if any_shape else None
        self.count, self.size, self.any_shape = count, size, any_shape
        self.slot = 3 * size * size * (2 if any_shape else 1)  # bytes an image may take
        if reserve:
            for file, nbytes in self._files().items():
                _reserve(file, nbytes)
        self._opened_by: int | None = None

    def _files(self) -> dict[Path, int]:
        """Each file of the cache, and its size in bytes."""
        files = {self.pixels_path: self.count * self.slot, self.state_path: self.count}
        if self.shapes_path is not None:
            files[self.shapes_path] = self.count * 8  # height and width, int32
        return files

    @staticmethod
    def nbytes(count: int, size: int, any_shape: bool = False) -> int:
        return count * 3 * size * size * (2 if any_shape else 1)

    @classmethod
    def create_if_it_fits(cls, path: Path, count: int, size: int, log, *,
                          any_shape: bool = False) -> DecodedImageCache | None:
        need = cls.nbytes(count, size, any_shape)
        pixels = path.with_suffix(".pixels")
        reused = need if pixels.exists() and pixels.stat().st_size == need else 0
        free = shutil.disk_usage(path.parent).free + reused  # a resumed run's cache is reused in place
        if need > min(MAX_CACHE_BYTES, free // 2):
            log(f"decoded-image cache off: it would take {need / 2**30:.1f} GiB "
                f"(limit {min(MAX_CACHE_BYTES, free // 2) / 2**30:.1f} GiB)")
            _unlink(path)
            return None
        try:
            return cls(path, count, size, any_shape=any_shape)
        except OSError as e:  # the disk filled up since it was measured, or cannot reserve space
            log(f"decoded-image cache off: cannot reserve {need / 2**30:.1f} GiB in {path.parent} ({e.strerror})")
            _unlink(path)
            return None

    @classmethod
    def open_existing(cls, path: Path, count: int, size: int, *, any_shape: bool = False) -> DecodedImageCache | None:
        """The cache another process of the run made (None when it made none): filled by whichever
        process decodes an image first; every process stores the same bytes for it."""
        cache = cls(path, count, size, reserve=False, any_shape=any_shape)
        try:
            if any(file.stat().st_size != nbytes for file, nbytes in cache._files().items()):
                return None
        except OSError:
            return None
        return cache

    def _open(self) -> None:
        # Each process maps the files itself (DataLoader workers may be forked or spawned).
        if self._opened_by != os.getpid():
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r+", shape=(self.count, self.slot))
            self._state = np.memmap(self.state_path, dtype=np.uint8, mode="r+", shape=(self.count,))
            if self.shapes_path is not None:
                self._shapes = np.memmap(self.shapes_path, dtype=np.int32, mode="r+", shape=(self.count, 2))
            self._opened_by = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_pixels", "_state", "_shapes", "_opened_by"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _opened_by=None)

    def get(self, i: int) -> torch.Tensor | bool | None:
        """The cached image, False when the file is known to be bad, None when not cached (yet)."""
        self._open()
        state = self._state[i]
        if state == _FILLED:
            height, width = self._shapes[i] if self.any_shape else (self.size, self.size)
            return torch.from_numpy(np.array(self._pixels[i, :3 * height * width])).view(3, height, width)
        return False if state == _BAD else None

    def put(self, i: int, image: torch.Tensor | None) -> None:
        """Store a prepared image, or None to remember that the file cannot be decoded."""
        self._open()
        if image is not None and image.numel() > self.slot:
            self._state[i] = _TOO_LARGE  # decoded again each time
            return
        if image is not None:
            if not self.any_shape and tuple(image.shape) != (3, self.size, self.size):
                raise ValueError(f"a {tuple(image.shape)} image in a cache of 3 x {self.size} x {self.size}")
            self._pixels[i, :image.numel()] = image.numpy().reshape(-1)
            if self.any_shape:
                self._shapes[i] = image.shape[-2:]
        self._state[i] = _FILLED if image is not None else _BAD

    def complete(self) -> bool:
        """Whether every image is read from the cache (or known to be bad): no image is decoded any more."""
        self._open()
        return bool(np.count_nonzero((self._state == _FILLED) | (self._state == _BAD)) == self.count)

    def undecided(self) -> np.ndarray:
        """The indices of the images never put here yet (neither stored, nor known bad or too large)."""
        self._open()
        return np.flatnonzero(self._state == _EMPTY)

    def remove(self) -> None:
        self._opened_by = None
        for key in ("_pixels", "_state", "_shapes"):
            self.__dict__.pop(key, None)
        for file in self._files():
            file.unlink(missing_ok=True)
