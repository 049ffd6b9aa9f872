"""Decoding one image file into an RGB picture, the same way everywhere: picture.py's steps, within
imgtrain's limits (pixels, and the memory a decode holds), and every failure a named reason."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from imgtrain.data import picture
from imgtrain.directories.files import open_regular, read_bytes
from imgtrain.errors import BadImageError, option

ON_BAD_IMAGE = ("skip", "fail")  # what --on-bad-image may say: leave the file out and name it, or stop

# Larger images are refused as likely decompression bombs (Pillow's own threshold, 89,478,485 pixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# What one decode may hold at once (picture.decode_bytes): 8 bytes a pixel, in most modes, up to the pixel limit.
MAX_DECODE_BYTES = 2**30
# Larger files are not read: an image within the pixel limit, even 16-bit RGBA and uncompressed, is smaller.
MAX_FILE_BYTES = 2**30
FORMAT_NAMES = "JPEG, PNG, PPM/PGM, BMP, TIFF and WebP"  # picture.FORMATS, as the user knows them
_MB = 2**20


class _Refused(ValueError):
    """A reason of imgtrain's own for not decoding a file: its message is the reason, as it stands."""


def _over_pixel_limit(pixels: int) -> _Refused:
    return _Refused(f"over the pixel limit: {pixels:,} pixels > {MAX_PIXELS:,} (a decompression bomb?)")


def _admit(max_bytes: int | None):
    """``picture.rgb``'s check of the opened image: the pixel limit, then what decoding it would hold."""
    limit = MAX_DECODE_BYTES if max_bytes is None else min(max_bytes, MAX_DECODE_BYTES)

    def admit(im: Image.Image):
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise _over_pixel_limit(width * height)
        need = picture.decode_bytes(im)
        if need > limit:
            raise _Refused(f"too large to decode: {width} x {height} pixels in mode {im.mode} take "
                           f"{need / _MB:,.0f} MB to decode, over the limit of {limit / _MB:,.0f} MB")
        return contextlib.nullcontext()
    return admit


@contextlib.contextmanager
def _named_failures(source):
    """Pillow's own refusals as imgtrain's reasons: one pixel-limit message (Pillow's says 89,478,485 or
    twice that), and the format of a file that is an image of a kind imgtrain does not decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _over_pixel_limit(int(found.group(1))) if found else _Refused(f"over the pixel limit ({exc})") \
                from None
        except UnidentifiedImageError:
            kind = _other_format(source)
            if kind is None:
                raise
            raise _Refused(f"not an image imgtrain reads: {kind} (it reads {FORMAT_NAMES})") from None


def _other_format(source) -> str | None:
    """The format Pillow would have taken the file for, outside picture.FORMATS (by its first bytes only)."""
    try:
        source.seek(0)
        head = source.read(16)
    except (OSError, ValueError):
        return None
    for name, (_, accept) in Image.OPEN.items():
        if name in picture.FORMATS or accept is None:
            continue
        try:
            verdict = accept(head)
        except Exception:  # an accept function that cannot judge 16 bytes
            continue
        if verdict and not isinstance(verdict, str):  # a string: "this format, but broken"
            return name
    return None


def _open_rgb(source, draft_size: int | None = None, max_bytes: int | None = None) -> Image.Image:
    with _named_failures(source):
        return picture.rgb(source, draft_size, _admit(max_bytes))


def describe_failure(exc: BaseException, size: int | None = None) -> str:
    """A short, human reason why an image could not be decoded."""
    if size == 0:
        return "empty file (0 bytes)"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"cannot be read: {exc.strerror}"  # the file system's reason: a named pipe, too large, a permission
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (no decoder recognises it)"
    text = str(exc)
    if isinstance(exc, _Refused):
        return text
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated ({text})"
    return f"cannot be decoded ({text})"


# Decoders raise many kinds of exception on hostile files (struct.error, KeyError in EXIF, ...):
# any of them means "this file cannot be decoded".
_FAILURES = (Exception,)


def load_rgb(path: Path | str, draft_size: int | None = None) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation, and return it as RGB.

    ``draft_size``: the image will be resized to at most this side, so large JPEGs may be
    decoded at a reduced scale (much faster, and the same in training and scoring).
    """
    try:
        with open_regular(path) as f:
            return _open_rgb(f, draft_size)
    except _FAILURES as exc:
        size = Path(path).stat().st_size if Path(path).is_file() else None
        reason = describe_failure(exc, size)
        error = BadImageError(f"cannot decode image {path}: {reason}",
                              f"remove or replace the file (or pass {option('on_bad_image', 'skip')} to leave it out)")
        error.reason = reason
        raise error from None


def _sent_image_error(exc: BaseException, data: bytes, name: str) -> BadImageError:
    reason = describe_failure(exc, len(data))
    error = BadImageError(f"cannot decode image {name}: {reason}", f"send an image file ({FORMAT_NAMES})")
    error.reason = reason
    return error


def decode_rgb(data: bytes, name: str, draft_size: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """``load_rgb`` for bytes in memory (an uploaded file): BadImageError naming ``name`` and the reason.
    ``max_bytes``: a lower limit than MAX_DECODE_BYTES on what decoding it may hold."""
    try:
        return _open_rgb(io.BytesIO(data), draft_size, max_bytes)
    except _FAILURES as exc:
        raise _sent_image_error(exc, data, name) from None


def decode_cost(data: bytes, name: str, draft_size: int | None = None,
                max_bytes: int | None = None) -> tuple[int, int]:
    """What ``decode_rgb`` would hold at once to decode ``data``, and the bytes of the RGB picture it returns,
    from its header alone (nothing is decoded); BadImageError, as decode_rgb's, for a file it would refuse."""
    source = io.BytesIO(data)
    try:
        with _named_failures(source):
            im = picture.open_image(source, draft_size)
            _admit(max_bytes)(im)
            return picture.decode_bytes(im), im.width * im.height * 4
    except _FAILURES as exc:
        raise _sent_image_error(exc, data, name) from None


class DecodeBudget:
    """Bytes that decoding may hold at once over all threads (the server's, for its requests).

    Each holder (a request) gets a ``hold()`` and takes, once, all it needs: ``take`` waits until that much
    is free. One that waits holds nothing, so holders never wait on each other in a circle."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._freed = threading.Condition()

    def hold(self) -> _Hold:
        return _Hold(self)


class _Hold:
    def __init__(self, budget: DecodeBudget) -> None:
        self.budget, self.taken = budget, 0

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` are free, then hold them (ValueError if they are more than the whole budget)."""
        budget = self.budget
        if nbytes > budget.limit:
            raise ValueError(f"{nbytes / _MB:,.0f} MB is over the whole budget of {budget.limit / _MB:,.0f} MB")
        with budget._freed:
            budget._freed.wait_for(lambda: budget.held + nbytes <= budget.limit)
            budget.held += nbytes
            self.taken += nbytes

    def release(self) -> None:
        with self.budget._freed:
            self.budget.held -= self.taken
            self.taken = 0
            self.budget._freed.notify_all()


@dataclass(frozen=True)
class ImageCheck:
    """What a full decode of one file found."""

    reason: str | None  # None: a good image
    width: int = 0
    height: int = 0
    sha256: str = ""


def check_image(path: Path | str) -> ImageCheck:
    """Read a file once: hash its bytes and decode it fully (not just its header).

    Regular files only (directly or through a link), and at most MAX_FILE_BYTES: a named pipe or
    a link to a device is a reason, never a read that waits or runs without end.
    """
    try:
        data = read_bytes(path, MAX_FILE_BYTES)
    except OSError as exc:
        return ImageCheck(f"cannot be read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageCheck("empty file (0 bytes)", sha256=digest)
    try:
        im = _open_rgb(io.BytesIO(data))
    except _FAILURES as exc:
        return ImageCheck(describe_failure(exc), sha256=digest)
    return ImageCheck(None, im.width, im.height, digest)
