"""The decoded-image cache: images at training size, as uint8, in a memory-mapped file.

The first epoch decodes and resizes every image once and stores the result; later epochs
read it back instead of decoding again. Memory stays bounded (the operating system pages
the file in and out); the file lives in the run's work directory and goes with it. Its disk
blocks are reserved when it is made, so a disk that fills up later (another program, a
checkpoint) cannot kill the run with SIGBUS while an image is written into the mapping.
Augmentation is applied after the cache, so every epoch still sees new random crops.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

MAX_CACHE_BYTES = 64 * 2**30
_EMPTY, _FILLED, _BAD = 0, 1, 2


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
    for file in (path.with_suffix(".pixels"), path.with_suffix(".state")):
        file.unlink(missing_ok=True)


class DecodedImageCache:
    """``count`` images of 3 x size x size uint8, shared by the DataLoader worker processes."""

    def __init__(self, path: Path, count: int, size: int, *, reserve: bool = True) -> None:
        self.pixels_path, self.state_path = path.with_suffix(".pixels"), path.with_suffix(".state")
        self.count, self.size = count, size
        if reserve:
            for file, nbytes in ((self.pixels_path, self.nbytes(count, size)), (self.state_path, count)):
                _reserve(file, nbytes)
        self._opened_by: int | None = None

    @staticmethod
    def nbytes(count: int, size: int) -> int:
        return count * 3 * size * size

    @classmethod
    def create_if_it_fits(cls, path: Path, count: int, size: int, log) -> DecodedImageCache | None:
        need = cls.nbytes(count, size)
        pixels = path.with_suffix(".pixels")
        reused = need if pixels.exists() and pixels.stat().st_size == need else 0
        free = shutil.disk_usage(path.parent).free + reused  # a resumed run's cache is reused in place
        if need > min(MAX_CACHE_BYTES, free // 2):
            log(f"decoded-image cache off: it would take {need / 2**30:.1f} GiB "
                f"(limit {min(MAX_CACHE_BYTES, free // 2) / 2**30:.1f} GiB)")
            _unlink(path)
            return None
        try:
            return cls(path, count, size)
        except OSError as e:  # the disk filled up since it was measured, or cannot reserve space
            log(f"decoded-image cache off: cannot reserve {need / 2**30:.1f} GiB in {path.parent} ({e.strerror})")
            _unlink(path)
            return None

    @classmethod
    def open_existing(cls, path: Path, count: int, size: int) -> DecodedImageCache | None:
        """The cache another process of the run made (None when it made none): filled by whichever
        process decodes an image first; every process stores the same bytes for it."""
        pixels, state = path.with_suffix(".pixels"), path.with_suffix(".state")
        try:
            if pixels.stat().st_size != cls.nbytes(count, size) or state.stat().st_size != count:
                return None
        except OSError:
            return None
        return cls(path, count, size, reserve=False)

    def _open(self) -> None:
        # Each process maps the files itself (DataLoader workers may be forked or spawned).
        if self._opened_by != os.getpid():
            shape = (self.count, 3, self.size, self.size)
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r+", shape=shape)
            self._state = np.memmap(self.state_path, dtype=np.uint8, mode="r+", shape=(self.count,))
            self._opened_by = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_pixels", "_state", "_opened_by"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _opened_by=None)

    def get(self, i: int) -> torch.Tensor | bool | None:
        """The cached image, False when the file is known to be bad, None when not cached yet."""
        self._open()
        state = self._state[i]
        if state == _FILLED:
            return torch.from_numpy(np.array(self._pixels[i]))
        return False if state == _BAD else None

    def put(self, i: int, image: torch.Tensor | None) -> None:
        """Store a prepared image, or None to remember that the file cannot be decoded."""
        self._open()
        if image is not None:
            self._pixels[i] = image.numpy()
        self._state[i] = _FILLED if image is not None else _BAD

    def complete(self) -> bool:
        self._open()
        return bool(np.count_nonzero(self._state) == self.count)

    def remove(self) -> None:
        self._opened_by = None
        self.__dict__.pop("_pixels", None)
        self.__dict__.pop("_state", None)
        self.pixels_path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
