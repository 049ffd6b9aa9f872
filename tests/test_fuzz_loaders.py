"""Fuzzing the ImageDirectory and model-directory loaders with malformed and hostile files.

Whatever the files hold, opening them either works or raises one of imgtrain's named
errors: never another exception, never a file read from outside the directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgtrain import ImageDirectory, load_trained_model
from imgtrain.errors import ImgtrainError

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
names = st.sampled_from(["image/0_0.png", "../../etc/passwd", "/etc/passwd", "image", "", "x/../../y", "C:\\x",
                         "image/../_meta.yaml", "\x00", "image/9_9.png"])
rows = st.fixed_dictionaries({"image_info": st.fixed_dictionaries({"file_name": names | json_values},
                                                                 optional={"width": json_values,
                                                                           "height": json_values,
                                                                           "sha256": json_values})},
                             optional={"category": st.sampled_from(["bright", "dark", "mid", "cow"]) | json_values,
                                       "id": json_values})
file_contents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: yaml.safe_dump(v).encode()),
)


@contextmanager
def _copy_of(source: Path, tmp_path_factory):
    """A fresh copy of `source` for one example, deleted after it: hundreds of examples, one copy on disk."""
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as scratch:
        root = Path(scratch) / source.name
        shutil.copytree(source, root)
        yield root


def _opens_or_names_the_error(open_it) -> None:
    try:
        open_it()
    except ImgtrainError:
        pass


@FUZZ
@given(target=st.sampled_from(["_meta.yaml", "images.lst", "_schema.json"]), content=file_contents)
def test_image_directory_files_with_any_content(tmp_path_factory, image_dirs, target, content):
    with _copy_of(image_dirs["val"], tmp_path_factory) as root:
        (root / target).write_bytes(content)
        _opens_or_names_the_error(lambda: ImageDirectory.load(root))


@FUZZ
@example(lines=[{"image_info": {"file_name": "image/0\x00.png"}, "category": "dark"}])
@given(lines=st.lists(rows, min_size=1, max_size=4))
def test_image_lists_with_hostile_rows(tmp_path_factory, image_dirs, lines):
    with _copy_of(image_dirs["val"], tmp_path_factory) as root:
        (root / "images.lst").write_text("".join(json.dumps(r) + "\n" for r in lines))
        try:
            data = ImageDirectory.load(root)
        except ImgtrainError:
            return
        for i in range(len(data)):  # whatever was accepted stays inside the directory
            assert data.path(i).resolve().is_relative_to(root.resolve())


@FUZZ
@given(target=st.sampled_from(["_meta.yaml", "model_spec.yaml", "model.safetensors", "index_to_label.csv"]),
       content=file_contents)
def test_model_directory_files_with_any_content(tmp_path_factory, trained_model, target, content):
    with _copy_of(trained_model, tmp_path_factory) as root:
        (root / target).write_bytes(content)
        _opens_or_names_the_error(lambda: load_trained_model(root))


@FUZZ
@example(changes={"pretrained": "image/0_0.png", "weights": "\x00"})  # found on a GPU machine's hypothesis
@given(changes=st.dictionaries(st.sampled_from(["architecture", "pretrained", "options", "trained", "labels",
                                                "input", "weights", "flavor", "training", "versions"]),
                               json_values | names, min_size=1, max_size=3))
def test_model_specs_with_hostile_fields(tmp_path_factory, trained_model, changes):
    with _copy_of(trained_model, tmp_path_factory) as root:
        spec = yaml.safe_load((root / "model_spec.yaml").read_text())
        spec.update(changes)
        (root / "model_spec.yaml").write_text(yaml.safe_dump(spec))
        _opens_or_names_the_error(lambda: load_trained_model(root))
