"""The designer's ImageDirectory layout: read one it made, and refuse malformed ones by name."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from conftest import make_image
from imgtrain import ImageDirectory, split_image_directory
from imgtrain.errors import InvalidDatasetError


def write_designer_directory(root, rng):
    """An ImageDirectory exactly as the designer writes it (contract: designer-modules.md)."""
    (root / "image").mkdir(parents=True)
    rows = [("image/0_0.png", "cat", 0), ("image/0_1.jpg", "cat", 1), ("image/1_2.png", "dog", 2),
            ("image/1_3.png", "dog", 3)]
    for name, category, _ in rows:
        make_image(root / name, 40 if category == "cat" else 215, rng)
    (root / "_meta.yaml").write_text("type: ImageDirectory\nextension: {}\nimage_list: images.lst\n"
                                     "samples: _samples.json\nschema: _schema.json\n")
    (root / "images.lst").write_text("".join(
        json.dumps({"image_info": {"file_name": n, "width": 30, "height": 30}, "category": c, "id": i}) + "\n"
        for n, c, i in rows))
    (root / "_schema.json").write_text(json.dumps({"columnAttributes": [
        {"name": "image", "type": "Bytes", "isFeature": True,
         "elementType": {"typeName": "bytes", "isNullable": False},
         "properties": {"mime_type": "image/png", "image_ref": "image_info"}},
        {"name": "id", "type": "Numeric", "isFeature": False,
         "elementType": {"typeName": "int64", "isNullable": False}},
        {"name": "category", "type": "String", "isFeature": False,
         "elementType": {"typeName": "str", "isNullable": False},
         "properties": {"annotation_type": "COCO_classification",
                        "categories": [{"id": 1, "name": "dog"}, {"id": 0, "name": "cat"}]}}]}))
    (root / "_samples.json").write_text(json.dumps([
        {"image": base64.b64encode((root / n).read_bytes()).decode(), "id": i, "category": c}
        for n, c, i in rows[:3]]))
    return root


def test_reads_designer_directory_and_round_trips(tmp_path):
    import numpy as np

    src = write_designer_directory(tmp_path / "designer", np.random.default_rng(0))
    data = ImageDirectory.load(src)
    assert data.categories == ["cat", "dog"]  # ordered by the schema's ids
    assert data.labels.tolist() == [0, 0, 1, 1] and data.ids.tolist() == [0, 1, 2, 3]
    split_image_directory(src, tmp_path / "a", tmp_path / "b", fraction=0.5)
    for part in ("a", "b"):
        out = tmp_path / part
        assert yaml.safe_load((out / "_meta.yaml").read_text())["type"] == "ImageDirectory"
        schema = json.loads((out / "_schema.json").read_text())
        assert [c["name"] for c in schema["columnAttributes"]] == ["image", "id", "category"]
        assert schema["columnAttributes"][0] == json.loads((src / "_schema.json").read_text())["columnAttributes"][0]
        again = ImageDirectory.load(out)
        assert again.categories == ["cat", "dog"] and sorted(again.labels.tolist()) == [0, 1]
        samples = json.loads((out / "_samples.json").read_text())
        assert base64.b64decode(samples[0]["image"]) == again.path(0).read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "_meta.yaml").unlink(), "no _meta.yaml"),
    (lambda r: (r / "_meta.yaml").write_text("type: [unclosed"), "not valid YAML"),
    (lambda r: (r / "_meta.yaml").write_text("type: ModelDirectory\n"), "its type is 'ModelDirectory'"),
    (lambda r: (r / "_schema.json").write_text("{"), "not a valid schema"),
    (lambda r: (r / "_schema.json").unlink(), "_schema.json is missing"),
    (lambda r: (r / "images.lst").write_text("not json\n"), "line 1 is not an image entry"),
    (lambda r: (r / "images.lst").write_text(
        '{"image_info": {"file_name": "../../etc/passwd"}, "category": "cat", "id": 0}\n'), "points outside"),
    (lambda r: (r / "images.lst").write_text(
        '{"image_info": {"file_name": "image/0_0.png"}, "category": "cow", "id": 0}\n'), "'cow' is not in"),
    (lambda r: (r / "images.lst").write_text(""), "holds no images"),
    (lambda r: (r / "_meta.yaml").write_text(
        "type: ImageDirectory\nimage_list: /etc/passwd\nschema: _schema.json\n"), "points outside"),
])
def test_malformed_directories_give_named_errors(tmp_path, damage, message):
    import numpy as np

    root = write_designer_directory(tmp_path / "d", np.random.default_rng(0))
    damage(root)
    with pytest.raises(InvalidDatasetError, match=message):
        ImageDirectory.load(root)
