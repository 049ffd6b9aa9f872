"""Choosing the training image size from the images themselves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

SAMPLE = 200
MIN_SIZE, MAX_SIZE = 32, 224


def auto_image_size(paths: Sequence[Path]) -> int:
    """The median shorter side of up to 200 images, rounded up to a multiple of 32, in [32, 224].

    28 px digits train at 32 px instead of being blown up to 224; photos train at 224,
    the size ImageNet weights were made for. Only headers are read.
    """
    step = max(1, len(paths) // SAMPLE)
    sides = []
    for path in paths[::step][:SAMPLE]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    if not sides:
        return MAX_SIZE
    median = sorted(sides)[len(sides) // 2]
    return int(min(MAX_SIZE, max(MIN_SIZE, math.ceil(median / 32) * 32)))
