"""An image file to the RGB picture, and to the pixels, that imgtrain's networks see: Pillow and numpy alone.

Training, scoring, ``predict`` and ``serve`` all decode here, and ``imgtrain export`` writes this very
file beside the exported model as ``preprocess.py``, so that a runtime without imgtrain feeds the graph
the same pixels: ``preprocess("photo.jpg", image_size)`` gives the uint8 [H, W, 3] array it takes.

1. Open with the decoders of the formats imgtrain takes, and only those (``FORMATS``): Pillow would
   otherwise pick a decoder from the content, Ghostscript for PostScript among them.
2. A JPEG (and MPO, a phone's multi-picture JPEG) whose picture will be resized to ``draft_size`` is
   decoded at 1/2, 1/4 or 1/8 scale where it stays at least that size on each side (libjpeg's scaled
   decoding: much faster and smaller, and not the same pixels as a full decode then a resize).
3. EXIF orientation applied; 16-bit and float greyscale scaled to 8 bits (by mode: integers are
   0..65535, floats 0..1); transparent pixels composited onto white; then RGB.
4. (``squashed``) The whole picture resized to size x size, no crop: Pillow's bilinear filter,
   antialiased, ``reducing_gap=None``.

Each step keeps at most two full-size copies alive (``decode_bytes`` counts them before anything is
decoded). Nothing here imports imgtrain.
"""

from __future__ import annotations

import contextlib

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")  # the designer's: JPEG, PNG, PPM/PGM, BMP, TIFF, WebP
_DEEP = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit and 32-bit greyscale: scaled to 8 bits
_TRANSPARENT = ("RGBA", "LA", "PA")
_STATE = 2**22  # a decoder's own state and line buffers, and what the allocator adds (measured: under 2 MB)


def open_image(source, draft_size: int | None = None) -> Image.Image:
    """The file opened (its header read, nothing decoded) by a decoder of ``FORMATS``; a JPEG set to decode
    at the smallest scale that keeps ``draft_size`` on each side. Pillow's UnidentifiedImageError otherwise."""
    im = Image.open(source, formats=FORMATS)
    if draft_size and isinstance(im, JpegImagePlugin.JpegImageFile):  # MpoImageFile is one too
        im.draft("RGB", (draft_size, draft_size))
    return im


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow holds a pixel of ``mode`` in: 1 byte for 1, L and P, 2 for 16-bit, else 4 (RGB too)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_bytes(im: Image.Image) -> int:
    """The most memory ``rgb`` holds at once to decode ``im`` (an image ``open_image`` gave, not yet loaded):
    its pixels times the bytes of the copies alive together at the largest step."""
    n = _bytes_per_pixel(im.mode)
    # Decoding: the image and, while EXIF orientation is applied, the turned copy; libwebp's own RGBA
    # picture, which Pillow copies and converts, makes four.
    load = 16 if im.format == "WEBP" else 2 * n
    if im.mode in _DEEP:
        step = 3 * n + 4  # the image, numpy's copies of its bytes, and them as float32
    elif im.mode in _TRANSPARENT or "transparency" in im.info:
        step = max(n, 4) + 4  # as RGBA, and the white RGB picture it is pasted onto
    else:
        step = 0 if im.mode == "RGB" else n + 4  # the decoded image and its RGB conversion
    return im.width * im.height * max(load, step) + _STATE


def rgb(source, draft_size: int | None = None, admit=None) -> Image.Image:
    """Steps 1-3: the file's picture, in RGB. ``admit``, if given, sees the opened image before anything is
    decoded (it may raise to refuse it) and returns a context manager held while it is decoded."""
    im = open_image(source, draft_size)
    with admit(im) if admit else contextlib.nullcontext():
        # Each step rebinds ``im``, so that the copy before it is freed.
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode in _DEEP:
            im = _to_uint8(im)
        elif im.mode in _TRANSPARENT or "transparency" in im.info:
            if im.mode != "RGBA":
                im = im.convert("RGBA")
            white = Image.new("RGB", im.size, (255, 255, 255))
            white.paste(im, mask=im)  # transparent pixels become white, not whatever colour they hold
            return white
        return im if im.mode == "RGB" else im.convert("RGB")


def _to_uint8(im: Image.Image) -> Image.Image:
    """By mode, never by content: integer images are 16-bit (0..65535), float images 0..1."""
    a = np.array(im, dtype=np.float32)  # a copy of its own, to scale in place
    if im.mode == "F":
        a *= 255.0
    else:
        a /= 257.0
    np.clip(a, 0, 255, out=a)
    np.rint(a, out=a)
    return Image.fromarray(a.astype(np.uint8))  # 2-D uint8: mode L


def squashed(image: Image.Image, image_size: int) -> Image.Image:
    """Step 4: the whole picture squashed to size x size (no crop), antialiased bilinear."""
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)


def preprocess(source, image_size: int) -> np.ndarray:
    """A file (a path or a binary file object) as an exported model without a transformation takes it:
    uint8 [image_size, image_size, 3], RGB. Stack such arrays for the graph's input ``images``."""
    return np.asarray(squashed(rgb(source, draft_size=image_size), image_size))
