"""Choosing the training image size from the images themselves."""

from __future__ import annotations

import math

from PIL import Image

from imgtrain.directories.files import open_regular
from imgtrain.directories.image_directory import ImageDirectory

SAMPLE = 200
MIN_SIZE, MAX_SIZE = 32, 224


def auto_image_size(data: ImageDirectory) -> int:
    """The median shorter side of up to 200 images, rounded up to a multiple of 32, in [32, 224].

    28 px digits train at 32 px instead of being blown up to 224; photos train at 224,
    the size ImageNet weights were made for. Sizes come from images.lst when it records
    them, else from the files' headers.
    """
    step = max(1, len(data) // SAMPLE)
    rows = range(0, len(data), step)[:SAMPLE]
    if data.sizes is not None:
        sides = [int(min(data.sizes[i])) for i in rows]
    else:
        sides = []
        for i in rows:
            try:
                with open_regular(data.path(i)) as f, Image.open(f) as im:
                    sides.append(min(im.size))
            except Exception:  # not readable: decoding will name it later
                continue
    if not sides:
        return MAX_SIZE
    median = sorted(sides)[len(sides) // 2]
    return int(min(MAX_SIZE, max(MIN_SIZE, math.ceil(median / 32) * 32)))
