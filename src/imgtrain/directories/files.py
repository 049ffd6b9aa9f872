"""Reading input files without hanging: regular files only, and never more than a limit.

A folder of images may hold anything: a named pipe (opening it waits for a writer that never
comes), a link to ``/dev/zero`` (reading it never ends), a socket. Every reader of user data
opens files here: the file is checked before it is opened (opening some devices has effects),
opened without blocking, and checked again on the open descriptor.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


class NotARegularFileError(OSError):
    """The path is a named pipe, a device, a socket or a folder, not a file with bytes to read."""

    def __init__(self, path: Path | str, mode: int) -> None:
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", str(path))


class FileTooLargeError(OSError):
    """The file is larger than the reader's limit; it was not read."""

    def __init__(self, path: Path | str, limit: int) -> None:
        super().__init__(errno.EFBIG, f"larger than {limit / 2**30:g} GiB, not read", str(path))


def check_regular(path: Path | str) -> os.stat_result:
    """Stat ``path`` (following links) and raise NotARegularFileError unless it is a regular file."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFileError(path, st.st_mode)
    return st


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Hard-link when possible (images and cached outputs never change in place), copy otherwise; regular files
    only. Also a ``copy_function`` for ``shutil.copytree``."""
    check_regular(src)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def open_regular(path: Path | str) -> BinaryIO:
    """Open a regular file (directly or through a link) for reading in binary mode."""
    check_regular(path)
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no named pipes in folders to fear
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode  # swapped for a pipe since the check?
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(path, mode)
        if nonblocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path: Path | str, limit: int | None = None) -> bytes:
    """The bytes of a regular file; FileTooLargeError past ``limit`` bytes (a sparse or growing file)."""
    with open_regular(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise FileTooLargeError(path, limit)
    return data


def file_sha256(path: Path | str) -> str:
    """The sha256 of a regular file's bytes, read in blocks."""
    import hashlib

    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_text(path: Path | str) -> str:
    """The UTF-8 text of a regular file (UnicodeDecodeError, a ValueError, when it is not UTF-8)."""
    return read_bytes(path).decode("utf-8")


def open_text(path: Path | str) -> io.TextIOWrapper:
    """A regular file opened as UTF-8 text, for reading line by line or as CSV."""
    return io.TextIOWrapper(open_regular(path), encoding="utf-8", newline="")
