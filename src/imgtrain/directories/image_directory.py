"""The ImageDirectory: the designer's on-disk image data set, read and written.

Layout (the designer's, so directories it made are read and ours are read by it)::

    _meta.yaml      type: ImageDirectory, image_list, schema, samples
    images.lst      one JSON object a line: {"image_info": {"file_name": ...}, "category": ..., "id": ...};
                    imgtrain adds width, height, sha256 and original_path to image_info (keys the designer
                    ignores and keeps)
    _schema.json    column attributes; the category list (ids and names) is the label map
    _samples.json   the first 3 rows with the image bytes in base64
    image/          the image files

Only the list of file names and label indices is held in memory, never the images.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from imgtrain.directories.files import open_text, read_bytes, read_text
from imgtrain.errors import InvalidDatasetError, NotLabeledDatasetError

META_FILE = "_meta.yaml"
IMAGE_LIST = "images.lst"
SCHEMA_FILE = "_schema.json"
SAMPLES_FILE = "_samples.json"
IMAGE_FOLDER = "image"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_HINT = "make it with `imgtrain convert-to-image-directory`"


@dataclass(frozen=True)
class ImageDirectory:
    """An image data set on disk: file paths, optional labels, and the category list."""

    root: Path
    files: list[str]  # relative to root, as written in images.lst
    ids: np.ndarray  # int64, the designer's running id of each image
    labels: np.ndarray | None  # int64 index into categories, or None when unlabeled
    categories: list[str] = field(default_factory=list)
    sizes: np.ndarray | None = None  # (n, 2) width and height, when every row records them
    digests: list[str] | None = None  # sha256 of each file's bytes, when every row records it
    originals: list[str] | None = None  # each image's path in the folder or archive it was converted from

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def info(self, i: int) -> dict:
        """The image_info fields besides file_name that this directory records for image i."""
        info: dict = {}
        if self.sizes is not None:
            info["width"], info["height"] = int(self.sizes[i][0]), int(self.sizes[i][1])
        if self.digests is not None:
            info["sha256"] = self.digests[i]
        if self.originals is not None:
            info["original_path"] = self.originals[i]
        return info

    def require_labels(self, what: str) -> np.ndarray:
        if self.labels is None:
            raise NotLabeledDatasetError(
                f"{what} {self.root} has no categories",
                "convert a folder with one sub-folder per category",
            )
        return self.labels

    @classmethod
    def load(cls, root: Path | str) -> ImageDirectory:
        """Read an ImageDirectory made by imgtrain or by the designer."""
        root = Path(root)
        meta = _read_meta(root)
        list_path = _inside(root, meta.get("image_list", IMAGE_LIST), "image_list")
        schema_path = _inside(root, meta.get("schema", SCHEMA_FILE), "schema")
        categories = _categories_from_schema(schema_path)
        index = {name: i for i, name in enumerate(categories)}
        files: list[str] = []
        ids: list[int] = []
        labels: list[int] = []
        sizes: list[tuple] = []
        digests: list = []
        originals: list = []
        try:
            with open_text(list_path) as lines:
                for n, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    name, image_id, info, category = _parse_row(line, n, list_path)
                    _inside(root, name, f"{IMAGE_LIST} line {n}")
                    files.append(name)
                    ids.append(image_id)
                    sizes.append((info.get("width"), info.get("height")))
                    digests.append(info.get("sha256"))
                    originals.append(info.get("original_path"))
                    if categories:
                        if not isinstance(category, str) or category not in index:
                            raise InvalidDatasetError(
                                f"{list_path} line {n}: category {category!r} is not in the schema's "
                                f"categories {categories}", _HINT)
                        labels.append(index[category])
        except FileNotFoundError:
            raise InvalidDatasetError(f"{list_path} is missing", _HINT) from None
        except UnicodeDecodeError as exc:
            raise InvalidDatasetError(f"{list_path} is not UTF-8 text ({exc.reason})", _HINT) from None
        except OSError as exc:  # a pipe or a device in its place, a permission
            raise InvalidDatasetError(f"{list_path} cannot be read ({exc.strerror or exc})", _HINT) from None
        if not files:
            raise InvalidDatasetError(f"{root} holds no images (its {IMAGE_LIST} is empty)", _HINT)
        return cls(
            root=root,
            files=files,
            ids=np.asarray(ids, dtype=np.int64),
            labels=np.asarray(labels, dtype=np.int64) if categories else None,
            categories=categories,
            sizes=np.asarray(sizes, dtype=np.int64) if all(
                isinstance(w, int) and isinstance(h, int) for w, h in sizes) else None,
            digests=digests if all(isinstance(d, str) for d in digests) else None,
            originals=originals if all(isinstance(o, str) for o in originals) else None,
        )


def _parse_row(line: str, n: int, list_path: Path) -> tuple[str, int, dict, object]:
    """One images.lst line: file name, id, image_info, category (checked by the caller)."""
    try:
        row = json.loads(line)
        info = row["image_info"]
        name = info["file_name"]
        image_id = int(row.get("id", n - 1))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise InvalidDatasetError(f"{list_path} line {n} is not an image entry ({exc!r})", _HINT) from None
    if not isinstance(name, str) or not isinstance(info, dict):
        raise InvalidDatasetError(f"{list_path} line {n}: file_name is not a string", _HINT)
    return name, image_id, info, row.get("category")


def _read_meta(root: Path) -> dict:
    meta_path = root / META_FILE
    if not root.is_dir():
        raise InvalidDatasetError(f"{root} is not a directory", _HINT)
    if not meta_path.exists():
        raise InvalidDatasetError(f"{root} is not an ImageDirectory (no {META_FILE})", _HINT)
    try:
        meta = yaml.safe_load(read_text(meta_path))
    except (yaml.YAMLError, ValueError) as exc:  # ValueError covers UnicodeDecodeError
        raise InvalidDatasetError(f"{meta_path} is not valid YAML ({exc})", _HINT) from None
    except OSError as exc:
        raise InvalidDatasetError(f"{meta_path} cannot be read ({exc.strerror or exc})", _HINT) from None
    if not isinstance(meta, dict) or meta.get("type") != "ImageDirectory":
        kind = meta.get("type") if isinstance(meta, dict) else None
        raise InvalidDatasetError(f"{root} is not an ImageDirectory (its type is {kind!r})", _HINT)
    return meta


def _inside(root: Path, name: object, what: str) -> Path:
    """A file name from a meta file as a path, refusing names that leave the directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidDatasetError(f"{root}: {what} is not a file name", _HINT)
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or ":" in parts.parts[0]:
        raise InvalidDatasetError(f"{root}: {what} {name!r} points outside the directory", _HINT)
    return root / name


def _categories_from_schema(schema_path: Path) -> list[str]:
    """The category names in the order of their ids; empty when the data set is unlabeled."""
    try:
        schema = json.loads(read_text(schema_path))
        columns = schema["columnAttributes"]
        column = next((c for c in columns if isinstance(c, dict) and c.get("name") == "category"), None)
        if column is None:
            return []
        raw = (column.get("properties") or {}).get("categories") or []
        names = [str(c["name"]) for c in sorted(raw, key=lambda c: int(c["id"]))]
    except FileNotFoundError:
        raise InvalidDatasetError(f"{schema_path} is missing", _HINT) from None
    except OSError as exc:
        raise InvalidDatasetError(f"{schema_path} cannot be read ({exc.strerror or exc})", _HINT) from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise InvalidDatasetError(f"{schema_path} is not a valid schema ({exc!r})", _HINT) from None
    if len(set(names)) != len(names):
        raise InvalidDatasetError(f"{schema_path}: duplicate category names", _HINT)
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidDatasetError(f"{schema_path}: category {name!r} is not valid Unicode text", _HINT) from None
    return names


def write_image_directory_files(
    root: Path,
    files: Sequence[str],
    categories: Sequence[str] | None,
    labels: Iterable[int] | None,
    ids: Iterable[int] | None = None,
    infos: Sequence[dict] | None = None,
) -> None:
    """Write the meta files of an ImageDirectory whose images already sit under ``root``.

    ``infos`` adds fields to each row's image_info (width, height, sha256).
    """
    root = Path(root)
    ids = list(range(len(files))) if ids is None else [int(i) for i in ids]
    labels = None if labels is None else [int(i) for i in labels]
    rows = []
    for k, name in enumerate(files):
        row: dict = {"image_info": {"file_name": name, **(infos[k] if infos else {})}}
        if categories and labels is not None:
            row["category"] = categories[labels[k]]
        row["id"] = ids[k]
        rows.append(row)
    with open(root / IMAGE_LIST, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    columns: list[dict] = [
        {"name": "image", "type": "Bytes", "isFeature": True,
         "elementType": {"typeName": "bytes", "isNullable": False},
         "properties": {"mime_type": "image/png", "image_ref": "image_info"}},
        {"name": "id", "type": "Numeric", "isFeature": False,
         "elementType": {"typeName": "int64", "isNullable": False}},
    ]
    if categories:
        columns.append(
            {"name": "category", "type": "String", "isFeature": False,
             "elementType": {"typeName": "str", "isNullable": False},
             "properties": {"annotation_type": "COCO_classification",
                            "categories": [{"id": i, "name": c} for i, c in enumerate(categories)]}}
        )
    (root / SCHEMA_FILE).write_text(json.dumps({"columnAttributes": columns}, indent=2), encoding="utf-8")
    samples = []
    for row in rows[:3]:
        sample = {"image": base64.b64encode(read_bytes(root / row["image_info"]["file_name"])).decode()}
        sample.update({k: row[k] for k in ("id", "category") if k in row})
        samples.append(sample)
    (root / SAMPLES_FILE).write_text(json.dumps(samples), encoding="utf-8")
    meta = {"type": "ImageDirectory", "extension": {}, "image_list": IMAGE_LIST,
            "samples": SAMPLES_FILE, "schema": SCHEMA_FILE}
    (root / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
