"""Decoding one image file into an RGB picture, the same way everywhere."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgtrain.errors import InvalidDatasetError


class BadImageError(InvalidDatasetError):
    """An image file that cannot be decoded; the message names the file."""


def load_rgb(path: Path | str) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation, and return it as RGB."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit and float greyscale: scale to 8 bits instead of clipping to white.
                im = _to_uint8(im)
            elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Transparent pixels become white, not whatever colour they happen to hold.
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(
            f"cannot decode image {path}: {exc}",
            "remove or replace the file, then convert the folder again",
        ) from None


def _to_uint8(im: Image.Image) -> Image.Image:
    import numpy as np

    a = np.asarray(im, dtype=np.float64)
    if a.max(initial=0) > 255:  # 16-bit range: map 0..65535 onto 0..255
        a = a / 257.0
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), mode="L")


def probe_image(path: Path | str) -> str | None:
    """Return why the file is not a readable image, or None when its header is fine."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if width < 1 or height < 1:
        return "image has no pixels"
    return None
