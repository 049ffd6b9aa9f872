"""Convert to Image Directory: folders, archives, wrapper folders, and what it refuses."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_image, make_labelled_folder, run_cli
from imgtrain import ImageDirectory, convert_to_image_directory
from imgtrain.errors import InvalidDatasetError, OutputExistsError


def test_labelled_folder_becomes_designer_layout(tmp_path, labelled_folder):
    result = convert_to_image_directory(labelled_folder, tmp_path / "out")
    assert result.summary() == "Found 36 images in 3 categories"
    out = tmp_path / "out"
    assert yaml.safe_load((out / "_meta.yaml").read_text()) == {
        "type": "ImageDirectory", "extension": {}, "image_list": "images.lst",
        "samples": "_samples.json", "schema": "_schema.json"}
    rows = [json.loads(line) for line in (out / "images.lst").read_text().splitlines()]
    assert len(rows) == 36 and (rows[0]["category"], rows[0]["id"]) == ("bright", 0)
    # files keep their bytes and suffix, named {category id}_{running id}{suffix}
    first_src = sorted((labelled_folder / "bright").iterdir())[0]
    assert (out / "image/0_0.png").read_bytes() == first_src.read_bytes()
    with Image.open(first_src) as im:
        size = im.size
    assert rows[0]["image_info"] == {"file_name": "image/0_0.png", "width": size[0], "height": size[1],
                                     "sha256": hashlib.sha256(first_src.read_bytes()).hexdigest(),
                                     "original_path": f"bright/{first_src.name}"}  # the name it came with
    schema = json.loads((out / "_schema.json").read_text())
    cats = schema["columnAttributes"][2]["properties"]["categories"]
    assert cats == [{"id": 0, "name": "bright"}, {"id": 1, "name": "dark"}, {"id": 2, "name": "mid"}]
    samples = json.loads((out / "_samples.json").read_text())
    assert len(samples) == 3 and samples[0]["category"] == "bright" and len(samples[0]["image"]) > 100
    data = ImageDirectory.load(out)
    assert data.categories == ["bright", "dark", "mid"] and np.bincount(data.labels).tolist() == [12, 12, 12]
    assert not list(tmp_path.glob(".imgtrain-tmp-*")), "no temporary folder is left behind"


def _archive(folder: Path, path: Path) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(folder.rglob("*")):
                zf.write(f, Path("wrapper") / f.relative_to(folder))
            zf.writestr("__MACOSX/._junk.png", b"not an image")
    else:
        mode = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2"}[path.suffix]
        with tarfile.open(path, mode) as tf:
            tf.add(folder, arcname="wrapper/inner")
    return path


@pytest.mark.parametrize("name", ["data.zip", "data.tar", "data.tar.gz", "data.tgz", "data.tar.bz2"])
def test_archives_with_wrapper_folders(tmp_path, labelled_folder, name):
    archive = _archive(labelled_folder, tmp_path / name)
    result = convert_to_image_directory(archive, tmp_path / "out")
    assert (result.num_images, result.categories) == (36, ["bright", "dark", "mid"])
    if name.endswith(".zip"):  # Apple's metadata beside the wrapper folder: passed over, and listed
        assert json.loads((tmp_path / "out" / "audit.json").read_text())["ignored"]["hidden"] == [f"{archive}:__MACOSX"]
    assert not (tmp_path / "out" / ".extracted").exists()


def test_flat_folder_is_unlabeled_and_odd_entries_are_ignored(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "wrap" / "flat"
    for i, ext in enumerate(["PNG", "Jpg", "jpeg", "TIFF"]):
        make_image(src / f"img{i}.{ext}", 100, rng)
    make_image(src / ".hidden.png", 100, rng)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    result = convert_to_image_directory(tmp_path / "wrap", tmp_path / "out")
    assert (result.num_images, result.categories) == (4, [])
    assert [Path(f).name for f, _ in result.skipped] == ["broken.png"]
    data = ImageDirectory.load(tmp_path / "out")
    # the original suffixes, as the designer keeps them
    assert data.labels is None and sorted(Path(f).suffix for f in data.files) == [".Jpg", ".PNG", ".TIFF", ".jpeg"]
    assert "category" not in (tmp_path / "out" / "images.lst").read_text()


def test_no_image_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "a.txt").write_text("x")
    with pytest.raises(InvalidDatasetError, match="no valid image"):
        convert_to_image_directory(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".imgtrain-tmp-*"))


def test_existing_output_is_kept_unless_overwrite(tmp_path, labelled_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        convert_to_image_directory(labelled_folder, out)
    assert (out / "precious.txt").read_text() == "keep me"
    convert_to_image_directory(labelled_folder, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "_meta.yaml").exists()


def test_unsafe_archive_entries_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../escape.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    with pytest.raises(InvalidDatasetError, match="escape.png"):
        convert_to_image_directory(tmp_path / "evil.tar", tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../../escape.png", b"abc")
    with pytest.raises(InvalidDatasetError, match="escape.png"):
        convert_to_image_directory(tmp_path / "evil.zip", tmp_path / "out")
    assert not (tmp_path.parent / "escape.png").exists() and not (tmp_path / "out").exists()


def test_cli_reports_what_it_found(tmp_path):
    src = make_labelled_folder(tmp_path / "src", per_class=3, classes=("dark", "bright"))
    (src / "empty").mkdir()
    shutil.copytree(src / "dark", src / "__MACOSX")
    result = run_cli("convert-to-image-directory", src, "--output", tmp_path / "out")
    assert "Found 6 images in 2 categories" in result.stdout
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["ignored"]["hidden"] == [str(src / "__MACOSX")]
    failed = run_cli("convert-to-image-directory", tmp_path / "missing", "--output", tmp_path / "o2", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"error: InvalidDatasetError: {tmp_path / 'missing'} does not exist. pass an existing folder or archive"]


def test_every_error_is_one_line_whatever_it_quotes(tmp_path):
    """tarfile's own message has a line per decompression it tried, and a file name may hold a line break: the CLI
    prints one line all the same (a second line could pass for another message)."""
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    r = run_cli("convert", tmp_path / "junk.tar.gz", "--output", tmp_path / "out", check=False)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: InvalidDatasetError: {tmp_path / 'junk.tar.gz'} is not a valid tar archive (neither gzip, bzip2 nor "
        "xz compressed, nor a plain tar). check that the file downloaded completely"], r.stderr
    for name, shown in [("two\nlines", "two lines"), ("tab\vand\u2028more", "tab and more"),
                        ("\x1b[31mred", "\\x1b[31mred")]:  # a terminal's escape sequence is shown, never run
        r = run_cli("convert", tmp_path / name, "--output", tmp_path / "out", check=False)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert f"{shown} does not exist" in r.stderr and "\x1b" not in r.stderr, r.stderr
