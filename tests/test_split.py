"""Split Image Directory: stratified, seeded, both halves keep every category."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_labelled_folder, run_cli
from imgtrain import ImageDirectory, convert_to_image_directory, split_image_directory
from imgtrain.data.split import designer_stratified_rows
from imgtrain.errors import InvalidDatasetError, NotInRangeValueError


@pytest.fixture
def unbalanced(tmp_path):
    src = make_labelled_folder(tmp_path / "src", per_class=20, classes=("dark", "mid"))
    make_labelled_folder(src, per_class=1, classes=("bright",))  # a one-image category
    convert_to_image_directory(src, tmp_path / "all")
    return tmp_path / "all"


def _designer(whole: ImageDirectory, fraction: float, seed: int, stratify: bool) -> tuple[set, set]:
    """The ids the designer's Split Image Directory puts on each side: scikit-learn's train_test_split."""
    from sklearn.model_selection import train_test_split

    names = [whole.categories[k] for k in whole.labels]
    a, b = train_test_split(whole.ids, train_size=fraction, random_state=seed, stratify=names if stratify else None)
    return set(a.tolist()), set(b.tolist())


def test_the_designers_split_and_every_category_kept(tmp_path, unbalanced):
    """A one-image category cannot be stratified: the designer splits without, and so does imgtrain."""
    n_a, n_b = split_image_directory(unbalanced, tmp_path / "a1", tmp_path / "b1", fraction=0.7, random_seed=3)
    a, b = ImageDirectory.load(tmp_path / "a1"), ImageDirectory.load(tmp_path / "b1")
    whole = ImageDirectory.load(unbalanced)
    assert (n_a, n_b) == (len(a), len(b)) == (28, 13)
    assert (set(a.ids.tolist()), set(b.ids.tolist())) == _designer(whole, 0.7, 3, stratify=False)
    assert a.categories == b.categories == ["bright", "dark", "mid"]
    assert a.ids.tolist() == sorted(a.ids.tolist())  # listed in the source's order
    by_id = {int(i): k for k, i in enumerate(whole.ids)}
    for part in (a, b):  # every file is there with the bytes and the recorded size and sha256 of the original
        for k, i in enumerate(part.ids):
            assert part.path(k).read_bytes() == whole.path(by_id[int(i)]).read_bytes()
            assert part.info(k) == whole.info(by_id[int(i)]) and set(part.info(k)) == {"width", "height", "sha256",
                                                                                "original_path"}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=60), st.floats(0.05, 0.95), st.integers(0, 2**32 - 1))
def test_the_same_rows_as_scikit_learn(classes, fraction, seed):
    """imgtrain draws the designer's split with numpy alone: the same rows as scikit-learn's, stratified or not."""
    from sklearn.model_selection import train_test_split

    names = np.array([f"class {c}" for c in classes])
    n_a = math.floor(fraction * len(names))
    ours = designer_stratified_rows(names, n_a, len(names) - n_a, seed)
    try:
        theirs, _ = train_test_split(np.arange(len(names)), train_size=fraction, random_state=seed, stratify=names)
    except ValueError:
        assert ours is None or n_a == 0
        return
    assert ours is not None and sorted(ours.tolist()) == sorted(theirs.tolist())


def test_the_designers_numbers_by_default(tmp_path):
    """The issue's case: 0.8 of 216 images is 172 and 44 in the designer (stratified, random_state 42)."""
    src = make_labelled_folder(tmp_path / "src", per_class=72)
    convert_to_image_directory(src, tmp_path / "all", log=lambda m: None)
    assert split_image_directory(tmp_path / "all", tmp_path / "a", tmp_path / "b", fraction=0.8) == (172, 44)
    a, b = ImageDirectory.load(tmp_path / "a"), ImageDirectory.load(tmp_path / "b")
    assert (set(a.ids.tolist()), set(b.ids.tolist())) == _designer(ImageDirectory.load(tmp_path / "all"), 0.8, 42,
                                                                   stratify=True)
    assert np.bincount(b.labels).tolist() == [15, 15, 14] or sorted(np.bincount(b.labels).tolist()) == [14, 15, 15]


def test_seeded(tmp_path, unbalanced):
    ids = []
    for run, seed in enumerate([5, 5, 6]):
        split_image_directory(unbalanced, tmp_path / f"a{run}", tmp_path / f"b{run}", random_seed=seed)
        ids.append(sorted(ImageDirectory.load(tmp_path / f"b{run}").ids.tolist()))
    assert ids[0] == ids[1] != ids[2]


def test_errors(tmp_path, unbalanced):
    with pytest.raises(NotInRangeValueError, match="fraction"):
        split_image_directory(unbalanced, tmp_path / "a", tmp_path / "b", fraction=1.0)
    single = make_labelled_folder(tmp_path / "one", per_class=1, classes=("dark",))
    convert_to_image_directory(single, tmp_path / "one-dir")
    with pytest.raises(InvalidDatasetError, match="at least 2"):
        split_image_directory(tmp_path / "one-dir", tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli(tmp_path, unbalanced):
    r = run_cli("split-image-directory", unbalanced, "--fraction", "0.5", "--output-a", tmp_path / "x",
                "--output-b", tmp_path / "y")
    assert "Split into" in r.stdout
    bad = run_cli("split-image-directory", unbalanced, "--fraction", "0", "--output-a", tmp_path / "p",
                  "--output-b", tmp_path / "q", check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: NotInRangeValueError: parameter --fraction is 0.0, allowed: (0, 1)")
