"""Decoding one image file into an RGB picture, the same way everywhere."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgtrain.directories.files import open_regular, read_bytes
from imgtrain.errors import BadImageError, option

ON_BAD_IMAGE = ("skip", "fail")  # what --on-bad-image may say: leave the file out and name it, or stop

# Larger images are refused as likely decompression bombs (Pillow's own threshold).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Larger files are not read: an image within the pixel limit, even 16-bit RGBA and uncompressed, is smaller.
MAX_FILE_BYTES = 2**30



def _open_rgb(source, draft_size: int | None = None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"over the pixel limit: {width} x {height} = {width * height:,} pixels > "
                                 f"{MAX_PIXELS:,} (a decompression bomb?)")
            if draft_size and im.format == "JPEG":
                # libjpeg decodes straight at 1/2, 1/4 or 1/8 scale, still at least draft_size on each side.
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit and float greyscale: scale to 8 bits instead of clipping to white.
                im = _to_uint8(im)
            elif im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                # Transparent pixels become white, not whatever colour they happen to hold.
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            return im.convert("RGB")


def describe_failure(exc: BaseException, size: int | None = None) -> str:
    """A short, human reason why an image could not be decoded."""
    if size == 0:
        return "empty file (0 bytes)"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"cannot be read: {exc.strerror}"  # the file system's reason: a named pipe, too large, a permission
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (no decoder recognises it)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"over the pixel limit ({exc})"
    text = str(exc)
    if "pixel limit" in text:
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


def decode_rgb(data: bytes, name: str, draft_size: int | None = None) -> Image.Image:
    """``load_rgb`` for bytes in memory (an uploaded file): BadImageError naming ``name`` and the reason."""
    try:
        return _open_rgb(io.BytesIO(data), draft_size)
    except _FAILURES as exc:
        reason = describe_failure(exc, len(data))
        error = BadImageError(f"cannot decode image {name}: {reason}", "send an image file (JPEG, PNG, ...)")
        error.reason = reason
        raise error from None


def _to_uint8(im: Image.Image) -> Image.Image:
    """By mode, never by content: integer images are 16-bit (0..65535), float images 0..1."""
    import numpy as np

    a = np.asarray(im, dtype=np.float64)
    a = a * 255.0 if im.mode == "F" else a / 257.0
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), mode="L")


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
