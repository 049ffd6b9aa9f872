"""Init Image Transformation and Apply Image Transformation: the designer's format both ways, the modes,
seeded random operations, real grayscale, and named errors for what is not a transformation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from imgtrain.data.transformation import apply_image_transformation, init_image_transformation
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.errors import InvalidTransformationDirectoryError


def test_init_writes_the_designers_files(tmp_path):
    init_image_transformation(tmp_path / "defaults")
    assert json.loads((tmp_path / "defaults" / "_transforms.json").read_text()) == [
        ["Resize", 256], ["CenterCrop", 224], ["RandomHorizontalFlip", {}]]
    assert (tmp_path / "defaults" / "_meta.yaml").read_text() == (
        "type: TransformationDirectory\nextension: {}\ntransform_type: Image\n")
    # the designer's own example, from the command line
    run_cli("init-image-transformation", "--size", "40", "--crop-size", "32", "--pad", "--padding", "2",
            "--color-jitter", "--random-rotation", "--random-rotation-degrees", "10", "--output", tmp_path / "t")
    assert json.loads((tmp_path / "t" / "_transforms.json").read_text()) == [
        ["Resize", 40], ["CenterCrop", 32], ["Pad", 2], ["ColorJitter", {}], ["RandomHorizontalFlip", {}],
        ["RandomRotation", 10]]
    r = run_cli("init-image-transformation", "--no-resize", "--no-center-crop", "--no-random-horizontal-flip",
                "--output", tmp_path / "none")
    assert json.loads((tmp_path / "none" / "_transforms.json").read_text()) == []
    assert r.stdout.strip() == f"Image transformation (no operation) written to {tmp_path / 'none'}"
    r = run_cli("init-image-transformation", "--random-rotation-degrees", "200", "--output", tmp_path / "x",
                check=False)
    assert r.returncode == 1 and "--random-rotation-degrees is 200" in r.stderr and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    """An ImageDirectory of 6 colourful, asymmetric images (a red left half, a blue right half)."""
    from imgtrain import convert_to_image_directory

    root = tmp_path_factory.mktemp("coloured")
    for k in range(6):
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[:, :32] = (220, 30, 30)
        pixels[:, 32:] = (30, 30, 200 - 10 * k)
        path = root / "src" / ("a" if k % 2 else "b") / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    convert_to_image_directory(root / "src", root / "images", log=lambda m: None)
    return root


def _pixels(directory, i: int) -> np.ndarray:
    data = ImageDirectory.load(directory)
    return np.asarray(Image.open(data.path(i)))


def test_apply_keeps_ids_and_categories_and_drops_random_operations_at_inference(coloured, tmp_path):
    t = tmp_path / "t"
    init_image_transformation(t, size=32, crop_size=24, random_horizontal_flip=True, random_vertical_flip=True)
    source = ImageDirectory.load(coloured / "images")
    inference = apply_image_transformation(t, coloured / "images", tmp_path / "inference", mode="inference",
                                           log=lambda m: None)
    assert inference.ids.tolist() == source.ids.tolist() and inference.categories == source.categories
    assert inference.labels.tolist() == source.labels.tolist()
    assert all(f.endswith(".png") for f in inference.files)
    for i in range(len(inference)):
        pixels = _pixels(tmp_path / "inference", i)
        assert pixels.shape == (24, 24, 3) and inference.sizes[i].tolist() == [24, 24]
        assert pixels[12, 2, 0] > 150 and pixels[12, 21, 2] > 100  # red stays left, blue right: nothing flipped
    # training: seeded flips, some images flipped, the same files again with the same seed
    first = apply_image_transformation(t, coloured / "images", tmp_path / "train1", random_seed=3,
                                       log=lambda m: None)
    again = apply_image_transformation(t, coloured / "images", tmp_path / "train2", random_seed=3,
                                       log=lambda m: None)
    assert first.digests == again.digests
    flipped = [_pixels(tmp_path / "train1", i)[12, 2, 0] < 100 for i in range(len(first))]
    assert any(flipped) and not all(flipped)


def test_grayscale_really_converts_and_designer_modes_are_understood(coloured, tmp_path):
    t = tmp_path / "t"
    run_cli("init-image-transformation", "--no-resize", "--no-center-crop", "--grayscale", "--output", t)
    apply_image_transformation(t, coloured / "images", tmp_path / "grey", mode="For inference", log=lambda m: None)
    pixels = _pixels(tmp_path / "grey", 0).astype(int)
    assert pixels.shape == (48, 64, 3) and (pixels[..., 0] == pixels[..., 1]).all() and pixels.std() > 10


def test_what_is_not_a_transformation_is_a_named_error(coloured, tmp_path):
    t = tmp_path / "t"
    init_image_transformation(t)
    for path, message in [(coloured / "images", r"is not a TransformationDirectory \(its type is 'ImageDirectory'\)"),
                          (tmp_path / "missing", "does not exist")]:
        with pytest.raises(InvalidTransformationDirectoryError, match=message):
            apply_image_transformation(path, coloured / "images", tmp_path / "o", log=lambda m: None)
    for content, message in [
        ('[["os.system", "rm -rf /"]]', "'os.system' is not an image operation imgtrain knows"),
        ('[["Resize", "256"]]', r"Resize's argument is '256', not a number >= 0 \(size\)"),
        ('[["Resize", {"interpolation": "__import__"}]]', "Resize takes no 'interpolation'"),
        ('[["RandomHorizontalFlip", 0.5]]', "not an object"),
        ('{"Resize": 256}', "not a list"),
        ("not json", "cannot be read"),
    ]:
        (t / "_transforms.json").write_text(content)
        with pytest.raises(InvalidTransformationDirectoryError, match=message):
            apply_image_transformation(t, coloured / "images", tmp_path / "o", log=lambda m: None)
    assert not (tmp_path / "o").exists()
    r = run_cli("apply-image-transformation", "--transformation", coloured / "images", "--dataset",
                coloured / "images", "--output", tmp_path / "o", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: InvalidTransformationDirectoryError: ")
    assert len(r.stderr.strip().splitlines()) == 1
    help_text = run_cli("apply-image-transformation", "--help").stdout
    assert "inference: drops the random ones (RandomResizedCrop" in " ".join(help_text.split())
