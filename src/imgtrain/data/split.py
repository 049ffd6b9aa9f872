"""Split Image Directory: two ImageDirectories from one, stratified by category and seeded.

The images go where the designer's module puts them: its split is scikit-learn's
``train_test_split`` over the images, stratified by category, ``train_size=fraction``,
``random_state=42`` (imgtrain's default seed here), and unstratified where stratifying is impossible
(a class of one image, fewer images on a side than classes). ``_designer_split`` draws the same
images with numpy alone (importing scikit-learn would take longer than most splits; a test holds
the two together). Where even that would leave an output empty, imgtrain's own rounding gives
each output at least one image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input, path_relation
from imgtrain.directories.files import NotARegularFileError, link_or_copy
from imgtrain.directories.image_directory import ImageDirectory, write_image_directory_files
from imgtrain.errors import InvalidDatasetError, InvalidParameterError, check_range, option
from imgtrain.seeding import as_uint32

DESIGNER_SEED = 42  # the designer's random_state: the default seed gives its very split


def split_image_directory(
    source: Path | str,
    output_a: Path | str,
    output_b: Path | str,
    *,
    fraction: float = 0.9,
    random_seed: int = DESIGNER_SEED,
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
    parts = _designer_split(data, fraction, as_uint32(random_seed))
    if parts is None:
        parts = _split_with_both_outputs(data, fraction, as_uint32(random_seed))
    with atomic_output_dir(output_a, overwrite=overwrite) as tmp_a, \
            atomic_output_dir(output_b, overwrite=overwrite) as tmp_b:
        for tmp, rows in zip((tmp_a, tmp_b), parts, strict=True):
            files = []
            for i in rows:
                name = data.files[i]
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    link_or_copy(data.path(i), tmp / name)
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


def _designer_split(data: ImageDirectory, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows of each output as the designer chooses them (in the source's order), or None when its
    split would leave an output empty."""
    n = len(data)
    n_a = math.floor(fraction * n)  # scikit-learn's sizes for a float train_size
    n_b = n - n_a
    if n_a == 0:
        return None
    names = None if data.labels is None else np.array([data.categories[k] for k in data.labels])
    if names is not None:
        a = designer_stratified_rows(names, n_a, n_b, seed)
        if a is not None:
            return np.sort(a), np.setdiff1d(np.arange(n), a)
    order = np.random.RandomState(seed).permutation(n)  # ShuffleSplit: the second output first
    return np.sort(order[n_b:]), np.sort(order[:n_b])


def designer_stratified_rows(names: np.ndarray, n_a: int, n_b: int, seed: int) -> np.ndarray | None:
    """The rows StratifiedShuffleSplit(train_size=n_a, test_size=n_b, random_state=seed) puts in its first
    part, or None where it refuses (a class of one, fewer rows on a side than classes)."""
    _, inverse, counts = np.unique(names, return_inverse=True, return_counts=True)
    if counts.min() < 2 or n_a < len(counts) or n_b < len(counts):
        return None
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    in_a = _apportion(counts, n_a, rng)
    _apportion(counts - in_a, n_b, rng)  # the rest, all of it: called for the random numbers it draws
    first = [members[rng.permutation(len(members))][:k] for members, k in zip(by_class, in_a, strict=True)]
    return np.concatenate(first)


def _apportion(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """``draws`` shared out in proportion to ``counts``: each share rounded down, then one more for the
    largest remainders, ties drawn at random (scikit-learn's _approximate_mode)."""
    exact = counts / counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainder = exact - shares
    for value in np.unique(remainder)[::-1]:
        if missing <= 0:
            break
        tied = np.flatnonzero(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)


def _split_with_both_outputs(data: ImageDirectory, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified and seeded, each output with at least one image (see _first_output_sizes)."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(data))] if data.labels is None else [
        np.flatnonzero(data.labels == c) for c in range(len(data.categories))
    ]
    sizes = _first_output_sizes(np.array([len(g) for g in groups]), fraction, rng)
    in_a = np.zeros(len(data), dtype=bool)
    for members, size in zip(groups, sizes, strict=True):
        in_a[rng.permutation(members)[:size]] = True
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)


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
