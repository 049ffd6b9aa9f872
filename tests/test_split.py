"""Split Image Directory: stratified, seeded, both halves keep every category."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_labelled_folder, run_cli
from imgtrain import ImageDirectory, convert_to_image_directory, split_image_directory
from imgtrain.errors import InvalidDatasetError, NotInRangeValueError


@pytest.fixture
def unbalanced(tmp_path):
    src = make_labelled_folder(tmp_path / "src", per_class=20, classes=("dark", "mid"))
    make_labelled_folder(src, per_class=1, classes=("bright",))  # a one-image category
    convert_to_image_directory(src, tmp_path / "all")
    return tmp_path / "all"


def test_stratified_and_keeps_categories(tmp_path, unbalanced):
    n_a, n_b = split_image_directory(unbalanced, tmp_path / "a1", tmp_path / "b1", fraction=0.7, random_seed=3)
    a, b = ImageDirectory.load(tmp_path / "a1"), ImageDirectory.load(tmp_path / "b1")
    assert (n_a, n_b) == (len(a), len(b)) == (29, 12)
    assert a.categories == b.categories == ["bright", "dark", "mid"]
    assert np.bincount(a.labels, minlength=3).tolist() == [1, 14, 14]
    assert np.bincount(b.labels, minlength=3).tolist() == [0, 6, 6]
    assert not set(a.ids) & set(b.ids) and len(set(a.ids) | set(b.ids)) == 41
    whole = ImageDirectory.load(unbalanced)
    by_id = {int(i): k for k, i in enumerate(whole.ids)}
    for part in (a, b):  # every file is there with the bytes and the recorded size and sha256 of the original
        for k, i in enumerate(part.ids):
            assert part.path(k).read_bytes() == whole.path(by_id[int(i)]).read_bytes()
            assert part.info(k) == whole.info(by_id[int(i)]) and set(part.info(k)) == {"width", "height", "sha256",
                                                                                "original_path"}


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
