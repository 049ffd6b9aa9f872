"""An image file to the RGB picture, and to the pixels, that imgtrain's networks see: Pillow and numpy alone.

Training, scoring, ``predict`` and ``serve`` all decode here, and ``imgtrain export`` writes this very
file beside the exported model as ``preprocess.py``, so that a runtime without imgtrain feeds the graph
the same pixels: ``preprocess("photo.jpg", image_size)`` gives the uint8 [H, W, 3] array it takes.

1. Open with the decoders of the formats imgtrain takes, and only those (Pillow would otherwise pick a
   decoder from the content, Ghostscript for PostScript among them): Image.open(file, formats=FORMATS).
2. A JPEG (and MPO, a phone's multi-picture JPEG) whose picture will be resized to draft_size is set to
   Image.draft('RGB', (draft_size, draft_size)): decoded at 1/2, 1/4 or 1/8 scale where it stays at least
   that size on each side (libjpeg's scaled decoding: much faster and smaller, and not the same pixels as a
   full decode then a resize).
3. EXIF orientation applied (ImageOps.exif_transpose); 16-bit and float greyscale scaled to 8 bits by mode,
   never by content (integers are 0..65535: divided by 257, floats 0..1: multiplied by 255, then rounded);
   transparent pixels (an alpha channel, or a transparency key, at 16 bits too) composited onto white; then
   converted to RGB.
4. The whole picture resized to image_size x image_size, no crop, with Pillow's antialiased bilinear filter:
   resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None).

Each step keeps at most two full-size copies alive; imgtrain (data/decode.py) counts what a decode
holds from the file's header, and refuses what would hold too much, before anything is decoded.
Nothing here imports imgtrain.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

# The designer's formats: Pillow's names for them, and the user's.
FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "PPM": "PPM/PGM", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP"}
DEEP = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit and 32-bit greyscale: scaled to 8 bits
TRANSPARENT = ("RGBA", "LA", "PA")
# Set by `imgtrain export` in the preprocess.py of a model trained with a transformation: its operations,
# which preprocess() does not apply (see there).
TRANSFORMATION = None


def open_image(source, draft_size: int | None = None) -> Image.Image:
    """The file opened (its header read, nothing decoded) by a decoder of ``FORMATS``, and ``draft``-ed.
    Pillow's UnidentifiedImageError for anything else."""
    im = Image.open(source, formats=tuple(FORMATS))
    draft(im, draft_size)
    return im


def draft(im: Image.Image, draft_size: int | None) -> None:
    """Step 2: a JPEG (an MPO too) set to decode at the smallest scale that keeps ``draft_size`` on each side."""
    if draft_size and isinstance(im, JpegImagePlugin.JpegImageFile):  # MpoImageFile is one too
        im.draft("RGB", (draft_size, draft_size))


def rgb(source, draft_size: int | None = None) -> Image.Image:
    """Steps 1-3: the file's picture, in RGB."""
    return to_rgb(open_image(source, draft_size))


def to_rgb(im: Image.Image) -> Image.Image:
    """Step 3: an image ``open_image`` gave, decoded and made RGB."""
    # Each step rebinds ``im``, so that the copy before it is freed.
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode in DEEP:
        return _to_uint8(im).convert("RGB")
    if im.mode in TRANSPARENT or "transparency" in im.info:
        if im.mode != "RGBA":
            im = im.convert("RGBA")
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im)  # transparent pixels become white, not whatever colour they hold
        return white
    return im if im.mode == "RGB" else im.convert("RGB")


def _to_uint8(im: Image.Image) -> Image.Image:
    """By mode, never by content: integer images are 16-bit (0..65535), float images 0..1. Pixels of the
    transparency key (compared at 16 bits) become white."""
    a = np.array(im, dtype=np.float32)  # a copy of its own, to scale in place
    key = im.info.get("transparency")
    clear = a == key if isinstance(key, int) else None
    if im.mode == "F":
        a *= 255.0
    else:
        a /= 257.0
    np.clip(a, 0, 255, out=a)
    np.rint(a, out=a)
    if clear is not None:
        a[clear] = 255.0
    return Image.fromarray(a.astype(np.uint8))  # 2-D uint8: mode L


def squashed(image: Image.Image, image_size: int) -> Image.Image:
    """Step 4: the whole picture squashed to size x size (no crop), antialiased bilinear."""
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)


def preprocess(source, image_size: int) -> np.ndarray:
    """A file (a path or a binary file object) as an exported model without a transformation takes it:
    uint8 [image_size, image_size, 3], RGB. Stack such arrays for the graph's input ``images``."""
    if TRANSFORMATION:
        raise ValueError(f"this model was trained with a transformation, {TRANSFORMATION}, which preprocess() "
                         "does not apply (it squashes the whole picture, as a model without one takes it): decode "
                         "with rgb(source, draft_size), then apply those torchvision.transforms.v2 operations to "
                         "the uint8 image, as the metadata's 'resize' says")
    return np.asarray(squashed(rgb(source, draft_size=image_size), image_size))
