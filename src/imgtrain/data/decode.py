"""Decoding one image file into an RGB picture, the same way everywhere: picture.py's steps, within
imgtrain's limits, and every failure a named reason.

The limits are checked on the file's bytes and header, before anything is decoded:

- pixels: ``MAX_PIXELS``, Pillow's decompression-bomb threshold;
- memory: what decoding would hold at its peak (``Opened.peak``: the decoder's own buffers, the image, and
  the copies picture.py's steps make), at most ``MAX_DECODE_BYTES`` or the lower limit a caller gives;
- work that is neither: a JPEG's markers before its picture (Pillow keeps each one it reads, and reads
  what lies between them a byte at a time), and its scans (libjpeg passes over the whole picture for
  each, however few bytes the scan takes).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, UnidentifiedImageError

from imgtrain.data import picture
from imgtrain.directories.files import read_bytes
from imgtrain.errors import BadImageError, option

ON_BAD_IMAGE = ("skip", "fail")  # what --on-bad-image may say: leave the file out and name it, or stop

# Larger images are refused as likely decompression bombs (Pillow's own threshold, 89,478,485 pixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# What one decode may hold at once (``Opened.peak``): 4 to 8 bytes a pixel in most modes, up to the pixel limit.
MAX_DECODE_BYTES = 2**30
# Larger files are not read: an image within the pixel limit, even 16-bit RGBA and uncompressed, is smaller.
MAX_FILE_BYTES = 2**30
# A JPEG's scans, at most: a progressive JPEG has about 10 (libjpeg writes 10 for colour, 24 for CMYK), and
# NVIDIA's nvImageCodec refuses more than 256 for the same reason.
MAX_SCANS = 256
# Markers before a JPEG's first scan, at most (a camera's JPEG has a few dozen, an ICC profile in many APP2
# markers some more), and the junk and padding bytes between them.
MAX_MARKERS = 1000
_MAX_SKIPPED = 2**16
_NAMES = list(picture.FORMATS.values())
FORMAT_NAMES = ", ".join(_NAMES[:-1]) + " and " + _NAMES[-1]  # "JPEG, PNG, ... and WebP"
_OURS = (*picture.FORMATS, "MPO")  # Pillow's JPEG decoder opens a phone's multi-picture JPEG as MPO
_STATE = 2**22  # a decoder's own state and line buffers, and what the allocator adds (measured: under 2 MB)
_MB = 2**20


class _Refused(ValueError):
    """A reason of imgtrain's own for not decoding a file: its message is the reason, as it stands."""


def _over_pixel_limit(pixels: int) -> _Refused:
    return _Refused(f"over the pixel limit: {pixels:,} pixels > {MAX_PIXELS:,} (a decompression bomb?)")


class Opened:
    """An image file opened by picture.py's decoders and checked against imgtrain's limits; nothing decoded yet.

    ``peak``: the most memory decoding it holds at once; ``picture``: what the RGB picture it gives holds.
    ``rgb()`` decodes it, once (it keeps nothing of it). Both raise BadImageError, named as ``bad`` names it."""

    def __init__(self, data: bytes, draft_size: int | None, limit: int,
                 bad: Callable[[BaseException], BadImageError]) -> None:
        self._data, self._bad = data, bad
        try:
            with _named_failures(data):
                self.image, self.peak = _open(data, draft_size, limit)
        except _FAILURES as exc:
            raise bad(exc) from None
        self.picture = self.image.width * self.image.height * _bytes_per_pixel("RGB")

    def rgb(self) -> Image.Image:
        try:
            with _named_failures(self._data):
                return picture.to_rgb(self._given())  # no reference kept here: each step frees the copy before it
        except _FAILURES as exc:
            raise self._bad(exc) from None

    def _given(self) -> Image.Image:
        image, self.image = self.image, None
        return image


def _open(data: bytes, draft_size: int | None, limit: int) -> tuple[Image.Image, int]:
    """The image opened and drafted, and what decoding it holds at its peak; _Refused past a limit."""
    first_scan = _first_scan(data) if data[:3] == b"\xff\xd8\xff" else 0  # before Pillow reads the markers
    im = picture.open_image(io.BytesIO(data))
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise _over_pixel_limit(width * height)
    buffers = 0  # what the decoder holds beside the image
    if isinstance(im, JpegImagePlugin.JpegImageFile):
        scans = data.count(b"\xff\xda")  # every scan starts so; a few more such bytes may stand in the metadata
        if scans > MAX_SCANS:
            raise _Refused(f"a JPEG of over {MAX_SCANS} scans ({scans:,} start-of-scan markers): decoding passes "
                           "over the whole picture for each (a progressive JPEG has about 10)")
        if im.info.get("progressive") or first_scan < im.layers:
            buffers = _coefficients(im.layer, width, height)  # at the full size, whatever the draft
        picture.draft(im, draft_size)
    elif im.format == "TIFF" and getattr(im, "use_load_libtiff", False):
        buffers = _tiff_chunk(im)
    elif im.format == "PNG":
        buffers = 16 * width  # the row being inflated and the one before it, at up to 8 bytes a pixel
    elif im.format == "WEBP":
        buffers = len(data) + 12 * width * height  # the file, libwebp's canvases, and Pillow's copy
    if im.tile and im.tile[0][0] in Image.DECODERS:  # a decoder written in Python (plain PPM, RLE BMP, ...)
        buffers = 2 * _bytes_per_pixel(im.mode) * width * height + 32 * ImageFile.SAFEBLOCK
    peak = _peak(im, buffers, data)
    if peak > limit:
        raise _Refused(f"too large to decode: {im.width} x {im.height} pixels in mode {im.mode} take "
                       f"{peak / _MB:,.0f} MB to decode, over the limit of {limit / _MB:,.0f} MB")
    return im, peak


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow holds a pixel of ``mode`` in: 1 byte for 1, L and P, 2 for 16-bit, else 4 (RGB too)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _peak(im: Image.Image, buffers: int, data: bytes) -> int:
    """The most memory ``picture.to_rgb`` holds at once to decode ``im`` (opened, drafted, not yet loaded),
    ``buffers`` being what its decoder holds beside the image: the copies alive together at the largest step."""
    n = _bytes_per_pixel(im.mode)
    image = n * im.width * im.height
    pixels = im.width * im.height
    load = image + buffers
    turn = 2 * image if _may_turn(im, data) else image  # EXIF orientation: the image and its turned copy
    if im.mode in picture.DEEP:
        step = (3 * n + 4) * pixels  # the image, numpy's copy of its bytes, them as float32, and the 8-bit result
    elif im.mode in picture.TRANSPARENT or "transparency" in im.info:
        step = (max(n, 4) + 4) * pixels  # as RGBA, and the white RGB picture it is pasted onto
    else:
        step = 0 if im.mode == "RGB" else (n + 4) * pixels  # the decoded image and its RGB conversion
    return max(load, turn, step) + _STATE


def _may_turn(im: Image.Image, data: bytes) -> bool:
    """Whether EXIF orientation may turn the picture, from the header alone. A PNG may hold its EXIF or XMP
    after the pixels (and Pillow decodes it all to find them), so one that holds any metadata may turn."""
    if im.format == "PNG":
        if any(key in im.info for key in ("exif", "Raw profile type exif", "XML:com.adobe.xmp")):
            return True
        pixels = data.find(b"IDAT")
        return any(data.find(kind, pixels) >= 0 for kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"))
    return im.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)


def _first_scan(data: bytes) -> int:
    """A JPEG's markers walked up to its first scan, before Pillow reads them: more than MAX_MARKERS of them,
    or more than 64 KiB of junk and padding between them, are refused. The components that scan codes (0 if
    none is found: Pillow will name what is wrong)."""
    at, skipped = 2, 0
    for _ in range(MAX_MARKERS):
        found = data.find(b"\xff", at)
        if found < 0:
            return 0
        code = _PADDING.match(data, found).end()  # the marker's code, after any 0xFF padding
        skipped += code - 1 - at
        if skipped > _MAX_SKIPPED:
            raise _Refused(f"a JPEG with over {_MAX_SKIPPED:,} bytes of junk or padding between its markers")
        if code + 3 >= len(data):
            return 0
        marker, at = data[code], code + 1
        if marker == 0xDA:  # start of scan: length, then the number of components
            return data[at + 2]
        if marker == 0xD9:  # end of image, and no scan
            return 0
        if marker not in _WITHOUT_LENGTH:
            at += int.from_bytes(data[at:at + 2], "big")
    raise _Refused(f"a JPEG with over {MAX_MARKERS:,} markers before its picture (a camera's has a few dozen)")


_PADDING = re.compile(rb"\xff+")
_WITHOUT_LENGTH = {0x00, 0x01, *range(0xD0, 0xD9)}  # a stuffed 0, TEM, RSTn, SOI


def _coefficients(layers: list, width: int, height: int) -> int:
    """libjpeg's buffer of the whole picture's DCT coefficients, which it keeps for a progressive JPEG (or one
    whose first scan leaves components out), whatever the scale it outputs: 2 bytes for each of a block's
    64, each component in blocks of 8 x 8 of its own samples, rounded up to its sampling factors."""
    h_max = max(h for _, h, _, _ in layers)
    v_max = max(v for _, _, v, _ in layers)
    return sum((-(-width * h // (8 * h_max)) + h) * (-(-height * v // (8 * v_max)) + v) * 128
               for _, h, v, _ in layers)


def _tiff_chunk(im: Image.Image) -> int:
    """What libtiff and Pillow hold to decode a compressed TIFF: one strip or tile as the tags size it (a tile
    may be far larger than the picture), and for YCbCr, which libtiff converts, its rows in RGBA."""
    tags = im.tag_v2
    width, height = tags.get(256, 0), tags.get(257, 0)
    bits = tags.get(258, (1,))
    sample = -(-tags.get(277, 1) * max(bits if isinstance(bits, tuple) else (bits,)) // 8)
    if 322 in tags:  # tiles
        chunk_width, chunk_height = tags[322], tags.get(323, 0)
    else:
        chunk_width, chunk_height = width, min(tags.get(278, height), height)
    if tags.get(259) in (6, 7):  # JPEG inside: a progressive one keeps its coefficients, 2 bytes a sample
        sample *= 3
    rgba = max(width, chunk_width) * chunk_height * 4 if 6 in (tags.get(259), tags.get(262)) else 0
    return chunk_width * chunk_height * sample + rgba


@contextmanager
def _named_failures(data: bytes):
    """Pillow's own refusals as imgtrain's reasons: one pixel-limit message (Pillow's says 89,478,485 or
    twice that), and what a file is that no decoder of picture.FORMATS opened."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _over_pixel_limit(int(found.group(1))) if found else _Refused(f"over the pixel limit ({exc})") \
                from None
        except UnidentifiedImageError as exc:
            reason = _unidentified(data)
            if reason is None:
                raise exc from None
            raise _Refused(reason) from None


def _unidentified(data: bytes) -> str | None:
    """Why no decoder of picture.FORMATS opened the file: what Pillow's decoder of the format it looks like
    said, or the other format Pillow's own detection takes it for. None: no decoder recognises it."""
    for name in picture.FORMATS:
        factory, accept = Image.OPEN[name]
        if accept is not None and accept(data[:16]):
            try:
                factory(io.BytesIO(data)).close()
            except Exception as exc:
                cause = exc.__cause__ or exc
                if name == "TIFF" and isinstance(cause, KeyError):
                    why = f"compression {cause}, which it has no decoder for"
                elif isinstance(cause, (struct.error, EOFError)):
                    why = "its header is cut short"
                else:
                    why = str(exc)
                return f"a {picture.FORMATS[name]} file that Pillow cannot read ({why})"
    kind = _other_format(data)
    return None if kind is None else f"not an image imgtrain reads: {kind} (it reads {FORMAT_NAMES})"


def _other_format(data: bytes) -> str | None:
    """The format, outside picture.FORMATS, that Pillow's own detection takes the file for (from its first
    64 KiB: headers only, nothing decoded)."""
    Image.init()
    others = [name for name in Image.OPEN if name not in _OURS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data[:2**16]), formats=others) as im:
                return im.format
    except Exception:
        return None


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


def _limit(max_bytes: int | None) -> int:
    return MAX_DECODE_BYTES if max_bytes is None else min(max_bytes, MAX_DECODE_BYTES)


def load_rgb(path: Path | str, draft_size: int | None = None) -> Image.Image:
    """Decode an image file fully, apply its EXIF orientation, and return it as RGB.

    ``draft_size``: the image will be resized to at most this side, so large JPEGs may be
    decoded at a reduced scale (much faster, and the same in training and scoring).
    """
    def bad(exc: BaseException) -> BadImageError:
        reason = describe_failure(exc, None if data is None else len(data))
        error = BadImageError(f"cannot decode image {path}: {reason}",
                              f"remove or replace the file (or pass {option('on_bad_image', 'skip')} to leave it out)")
        error.reason = reason
        return error

    data = None
    try:
        data = read_bytes(path, MAX_FILE_BYTES)
    except OSError as exc:
        raise bad(exc) from None
    return Opened(data, draft_size, MAX_DECODE_BYTES, bad).rgb()


def open_sent(data: bytes, name: str, draft_size: int | None = None, max_bytes: int | None = None) -> Opened:
    """Bytes in memory (an uploaded file) opened and checked: BadImageError naming ``name`` and the reason, now
    or when decoded. ``max_bytes``: a lower limit than MAX_DECODE_BYTES on what decoding it may hold."""
    def bad(exc: BaseException) -> BadImageError:
        reason = describe_failure(exc, len(data))
        error = BadImageError(f"cannot decode image {name}: {reason}", f"send an image file ({FORMAT_NAMES})")
        error.reason = reason
        return error

    return Opened(data, draft_size, _limit(max_bytes), bad)


def decode_rgb(data: bytes, name: str, draft_size: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """``load_rgb`` for bytes in memory: ``open_sent``, then decoded."""
    return open_sent(data, name, draft_size, max_bytes).rgb()


def decode_cost(data: bytes, name: str, draft_size: int | None = None,
                max_bytes: int | None = None) -> tuple[int, int]:
    """What ``decode_rgb`` would hold at once to decode ``data``, and the bytes of the RGB picture it returns,
    from its header alone (nothing is decoded); BadImageError, as decode_rgb's, for a file it would refuse."""
    opened = open_sent(data, name, draft_size, max_bytes)
    return opened.peak, opened.picture


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
    try:
        im = decode_rgb(data, str(path))
    except BadImageError as exc:
        return ImageCheck(exc.reason, sha256=digest)
    return ImageCheck(None, im.width, im.height, digest)
