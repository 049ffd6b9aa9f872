"""The DataFrameDirectory: a table in the designer's format, as its Score Model writes and Evaluate Model reads.

Layout (the designer's; imgtrain writes it beside its own ``scored.csv``)::

    _meta.yaml             type: DataFrameDirectory, extension: {...}, format: Parquet, data: _data.parquet,
                           schema: schema/_schema.json, samples: _samples.json, visualization: _data.visualization
    _data.parquet          the table
    schema/_schema.json    columnAttributes (name, type, elementType), labelColumns, scoreColumns
    _samples.json          the first rows, as JSON objects
    _data.visualization    a JSON summary of the table (column names and types, the row count, the first rows)

imgtrain keeps its own keys (where the images are, which model scored them) under ``extension``, which
the designer leaves to the writer. A table is columns of plain values: strings, integers and floats.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imgtrain.directories.files import open_regular, read_text
from imgtrain.errors import InvalidDatasetError, MissingDependencyError

META_FILE = "_meta.yaml"
KIND = "DataFrameDirectory"
DATA_FILE = "_data.parquet"
SCHEMA_FILE = "schema/_schema.json"
SAMPLES_FILE = "_samples.json"
VISUALIZATION_FILE = "_data.visualization"
TRUE_LABELS = "True Labels"  # the schema's labelColumns key of the true label column
ASSIGNED_LABELS = "Multi Class Assigned Labels"  # the schema's scoreColumns key of the predicted label column
_SAMPLES = 3
_PARQUET_HINT = "install it with `pip install pyarrow` (imgtrain's install brings it)"


@dataclass
class Table:
    """Columns of equal length, in order; the schema's label and score columns by their role."""

    columns: dict[str, list]
    label_columns: dict[str, str] = field(default_factory=dict)  # role -> column, e.g. {"True Labels": "category"}
    score_columns: dict[str, str] = field(default_factory=dict)
    extension: dict = field(default_factory=dict)  # the writer's own keys, from _meta.yaml

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


def is_dataframe_directory(folder: Path) -> bool:
    """Whether ``folder``'s _meta.yaml says DataFrameDirectory (a cheap look; reading checks the rest)."""
    try:
        meta = yaml.safe_load(read_text(folder / META_FILE))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(meta, dict) and meta.get("type") == KIND


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingDependencyError("reading and writing the designer's tables (Parquet) needs pyarrow",
                                     _PARQUET_HINT) from None
    return pyarrow


def _kind(values: list) -> tuple[str, str]:
    """The designer's column type and element type name for a column of plain values."""
    if all(isinstance(v, bool) for v in values):
        return "Boolean", "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "Numeric", "int64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "Numeric", "float64"
    return "String", "object"


def write(folder: Path, table: Table) -> None:
    """Write ``table`` into ``folder`` (which exists) as a DataFrameDirectory."""
    pa = _pyarrow()
    kinds = {name: _kind(values) for name, values in table.columns.items()}
    arrays = {name: pa.array(values, type={"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
                             .get(kinds[name][1], pa.string()))
              for name, values in table.columns.items()}
    pa.parquet.write_table(pa.table(arrays), folder / DATA_FILE)
    schema = {
        "columnAttributes": [
            {"name": name, "type": kind, "isFeature": name not in table.label_columns.values()
             and name not in table.score_columns.values(),
             "elementType": {"typeName": element, "isNullable": False}}
            for name, (kind, element) in kinds.items()],
        "featureChannels": {},
        "labelColumns": table.label_columns,
        "scoreColumns": table.score_columns,
    }
    (folder / SCHEMA_FILE).parent.mkdir(exist_ok=True)
    (folder / SCHEMA_FILE).write_text(json.dumps(schema, indent=2), encoding="utf-8")
    rows = [{name: _json_value(values[i]) for name, values in table.columns.items()}
            for i in range(min(_SAMPLES, len(table)))]
    (folder / SAMPLES_FILE).write_text(json.dumps(rows), encoding="utf-8")
    summary = {"numberOfRows": len(table), "numberOfColumns": len(table.columns),
               "columns": [{"name": n, "type": k, "elementType": e} for n, (k, e) in kinds.items()],
               "data": [[_json_value(values[i]) for values in table.columns.values()]
                        for i in range(min(100, len(table)))]}
    (folder / VISUALIZATION_FILE).write_text(json.dumps(summary), encoding="utf-8")
    meta = {"type": KIND, "extension": table.extension, "format": "Parquet", "data": DATA_FILE,
            "samples": SAMPLES_FILE, "schema": SCHEMA_FILE, "visualization": VISUALIZATION_FILE}
    (folder / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read(folder: Path, hint: str) -> Table:
    """The table of a DataFrameDirectory in Parquet (the designer's or imgtrain's); named errors for the rest."""
    try:
        meta = yaml.safe_load(read_text(folder / META_FILE))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InvalidDatasetError(f"{folder / META_FILE} cannot be read ({exc})", hint) from None
    if not isinstance(meta, dict) or meta.get("type") != KIND:
        raise InvalidDatasetError(f"{folder} is not a DataFrameDirectory (its {META_FILE} says "
                                  f"type: {meta.get('type') if isinstance(meta, dict) else None!r})", hint)
    data = meta.get("data") or DATA_FILE
    if str(meta.get("format", "Parquet")).lower() != "parquet" or not isinstance(data, str):
        raise InvalidDatasetError(f"{folder}: a DataFrameDirectory in format {meta.get('format')!r} "
                                  "(imgtrain reads Parquet)", hint)
    path = folder / data
    if not path.resolve().is_relative_to(folder.resolve()):
        raise InvalidDatasetError(f"{folder / META_FILE} names a data file outside the directory: {data}", hint)
    pa = _pyarrow()
    try:
        with open_regular(path) as f:
            arrow = pa.parquet.read_table(f)
    except FileNotFoundError:
        raise InvalidDatasetError(f"{folder} holds no {data}, the table its {META_FILE} names", hint) from None
    except OSError as exc:
        raise InvalidDatasetError(f"{path} cannot be read ({exc.strerror or exc})", hint) from None
    except (pa.ArrowException, ValueError) as exc:
        raise InvalidDatasetError(f"{path} is not a readable Parquet file ({exc})", hint) from None
    schema = _schema(folder / str(meta.get("schema") or SCHEMA_FILE))
    extension = meta.get("extension")
    return Table({name: arrow.column(name).to_pylist() for name in arrow.column_names},
                 _names(schema.get("labelColumns")), _names(schema.get("scoreColumns")),
                 extension if isinstance(extension, dict) else {})


def _schema(path: Path) -> dict:
    """The schema's roles, or none: the table's column names then decide."""
    try:
        schema = json.loads(read_text(path))
    except (OSError, ValueError):
        return {}
    return schema if isinstance(schema, dict) else {}


def _names(roles) -> dict[str, str]:
    return {k: v for k, v in roles.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(roles, dict) else {}
