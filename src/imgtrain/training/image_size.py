"""Choosing the training image size from the images themselves."""

from __future__ import annotations

import math

from imgtrain.data.picture import open_image
from imgtrain.directories.files import open_regular
from imgtrain.directories.image_directory import ImageDirectory

SAMPLE = 200
MIN_SIZE, MAX_SIZE = 32, 224


def auto_image_size(data: ImageDirectory) -> int:
    """The median shorter side of up to 200 images, rounded up to a multiple of 32, in [32, 224].

    28 px digits train at 32 px instead of being blown up to 224; photos train at 224,
    the size ImageNet weights were made for. Sizes come from the files' headers (200 header
    reads), never from images.lst's width and height, which a tool that rewrote the images
    (the designer's Apply Image Transformation) leaves stale.
    """
    step = max(1, len(data) // SAMPLE)
    sides = []
    for i in range(0, len(data), step)[:SAMPLE]:
        try:
            with open_regular(data.path(i)) as f, open_image(f) as im:
                sides.append(min(im.size))
        except Exception:  # not readable: decoding will name it later
            continue
    if not sides:
        return MAX_SIZE
    median = sorted(sides)[len(sides) // 2]
    return int(min(MAX_SIZE, max(MIN_SIZE, math.ceil(median / 32) * 32)))
