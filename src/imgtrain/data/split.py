"""Split Image Directory: two ImageDirectories from one, stratified by category and seeded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input, path_relation
from imgtrain.directories.files import NotARegularFileError, check_regular
from imgtrain.directories.image_directory import ImageDirectory, write_image_directory_files
from imgtrain.errors import InvalidDatasetError, InvalidParameterError, check_range, option
from imgtrain.seeding import as_uint32


def split_image_directory(
    source: Path | str,
    output_a: Path | str,
    output_b: Path | str,
    *,
    fraction: float = 0.9,
    random_seed: int = 1,
    overwrite: bool = False,
) -> tuple[int, int]:
    """Put ``fraction`` of each category's images in ``output_a``, the rest in ``output_b``.

    Both outputs keep the full category list, so they can serve as training and validation
    sets even when a small category ends up on one side only. Returns the two sizes.
    """
    check_range("fraction", fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    inputs = {"ImageDirectory to split": source}
    for output in (output_a, output_b):
        check_not_an_input(output, inputs)
    if path_relation(output_a, output_b):
        raise InvalidParameterError(
            f"the two outputs {output_a} and {output_b} must be two separate directories, neither inside the other",
            f"pass another {option('output_a')} or {option('output_b')}")
    data = ImageDirectory.load(source)
    if len(data) < 2:
        raise InvalidDatasetError(f"{source} holds {len(data)} image; a split needs at least 2",
                                  "add images before splitting")
    rng = np.random.default_rng(as_uint32(random_seed))
    groups = [np.arange(len(data))] if data.labels is None else [
        np.flatnonzero(data.labels == c) for c in range(len(data.categories))
    ]
    sizes = _first_output_sizes(np.array([len(g) for g in groups]), fraction, rng)
    in_a = np.zeros(len(data), dtype=bool)
    for members, size in zip(groups, sizes, strict=True):
        in_a[rng.permutation(members)[:size]] = True
    parts = (np.flatnonzero(in_a), np.flatnonzero(~in_a))
    with atomic_output_dir(output_a, overwrite=overwrite) as tmp_a, \
            atomic_output_dir(output_b, overwrite=overwrite) as tmp_b:
        for tmp, rows in zip((tmp_a, tmp_b), parts, strict=True):
            files = []
            for i in rows:
                name = data.files[i]
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    _link_or_copy(data.path(i), tmp / name)
                except FileNotFoundError:
                    raise InvalidDatasetError(f"{data.path(i)} is listed in {source} but missing",
                                              "convert the folder again") from None
                except NotARegularFileError as exc:
                    raise InvalidDatasetError(f"{data.path(i)} is listed in {source} but is {exc.strerror}",
                                              "convert the folder again") from None
                files.append(name)
            labels = None if data.labels is None else data.labels[rows]
            write_image_directory_files(tmp, files, data.categories or None, labels, data.ids[rows],
                                        infos=[data.info(i) for i in rows])
    return len(parts[0]), len(parts[1])


def _first_output_sizes(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """How many images of each category go to the first output.

    Each category gets its share rounded down or up (largest remainders first, ties in seeded
    random order) so that the total is round(N * fraction), kept between 1 and N - 1: both
    outputs get images even when every category is too small to split on its own.
    """
    quota = counts * fraction
    sizes = np.floor(quota).astype(int)
    total = min(max(round(int(counts.sum()) * fraction), 1), int(counts.sum()) - 1)
    order = np.lexsort((rng.permutation(len(counts)), sizes - quota))  # largest remainder first
    for c in order[: max(total - int(sizes.sum()), 0)]:
        sizes[c] += 1
    return sizes


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (images never change in place), copy otherwise; regular files only."""
    check_regular(src)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
