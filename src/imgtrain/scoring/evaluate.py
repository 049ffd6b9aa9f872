"""Evaluate Model (classification): accuracy, precision, recall, F1, the confusion matrix, and a report."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from imgtrain.directories import dataframe_directory
from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input, check_output_writable, path_relation
from imgtrain.directories.files import open_text, read_text
from imgtrain.directories.model_directory import weights_sha256
from imgtrain.errors import ImgtrainError, InvalidDatasetError, NotLabeledDatasetError
from imgtrain.reports import plots
from imgtrain.reports.evaluation import Mistake, evaluation_page, unknown_labels_note, worst_mistakes
from imgtrain.reports.page import REPORT_FILE, figure_png
from imgtrain.scoring.table import (
    IMAGE_ROOT,
    LABEL_COLUMN,
    META_FILE,
    ORIGINAL_COLUMN,
    PROBABILITY_PREFIX,
    SCORED_FILE,
    SCORED_LABEL,
    TRAINED_MODEL,
    WEIGHTS_SHA256,
)

METRICS_JSON = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


@dataclass
class ScoredTable:
    """What Evaluate Model reads of a scored data set."""

    truth: list[str]
    predicted: list[str]
    labels: list[str]  # the model's, in its order
    images: list[str]  # as the table names them
    confidence: np.ndarray  # the probability of each predicted label
    originals: list[str] | None  # the images' paths before convert, when recorded
    root: Path | None  # the folder the image names are relative to, when recorded


def read_scored(scored: Path) -> ScoredTable:
    """imgtrain's scored.csv, or a DataFrameDirectory in Parquet such as the designer's Score Model writes."""
    hint = "pass the output of `imgtrain score-image-model` or of the designer's Score Model"
    if scored.is_dir() and not (scored / SCORED_FILE).exists() and dataframe_directory.is_dataframe_directory(scored):
        table = dataframe_directory.read(scored, hint)
        path, columns = scored / dataframe_directory.DATA_FILE, table.columns
        label_column = table.label_columns.get(dataframe_directory.TRUE_LABELS, LABEL_COLUMN)
        scored_label = table.score_columns.get(dataframe_directory.ASSIGNED_LABELS, SCORED_LABEL)
    else:
        path = scored / SCORED_FILE if scored.is_dir() else scored
        columns = _csv_columns(path, hint)
        label_column, scored_label = LABEL_COLUMN, SCORED_LABEL
    if scored_label not in columns:
        raise InvalidDatasetError(f"{path} has no {scored_label!r} column", hint)
    if label_column not in columns:
        raise NotLabeledDatasetError(
            f"{path} has no true labels (no {label_column!r} column): the scored images were unlabeled",
            "score a labelled ImageDirectory or a folder with one sub-folder per category")
    n = len(columns[scored_label])
    if not n:
        raise InvalidDatasetError(f"{path} holds no rows", hint)
    truth, predicted = ([_label(v) for v in columns[name]] for name in (label_column, scored_label))
    for name, values in ((label_column, truth), (scored_label, predicted)):
        if None in values:
            raise InvalidDatasetError(f"{path}: data row {values.index(None) + 1} has no {name!r}", hint)
    labels = [h[len(PROBABILITY_PREFIX):] for h in columns if h.startswith(PROBABILITY_PREFIX)]
    if "image" in columns:
        images = [str(v or "") for v in columns["image"]]
    else:  # the designer's table names its rows by id only
        images = [f"id {v}" for v in columns["id"]] if "id" in columns else [""] * n
    confidence = [_number(columns.get(PROBABILITY_PREFIX + p, [None] * n)[i]) for i, p in enumerate(predicted)]
    return ScoredTable(truth, predicted, labels, images, np.array(confidence),
                       [str(v) for v in columns[ORIGINAL_COLUMN]] if ORIGINAL_COLUMN in columns else None,
                       _image_root(path.parent))


def _label(value) -> str | None:
    """A label as a table holds it, as text: numbers the same whichever type their column has (the designer's
    tables hold an integer truth column beside float scored labels), an integral float as its integer; NaN, as
    None, is missing."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return None if value is None else str(value)


def _csv_columns(path: Path, hint: str) -> dict[str, list]:
    try:
        with open_text(path) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise InvalidDatasetError(f"{path.parent} holds no {SCORED_FILE}", hint) from None
    except OSError as exc:  # a pipe or a device in its place, a permission
        raise InvalidDatasetError(f"{path} cannot be read ({exc.strerror or exc})", hint) from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidDatasetError(f"{path} is not a readable CSV ({exc})", hint) from None
    for n, row in enumerate(rows, 1):
        if any(row.get(h) is None for h in header):
            raise InvalidDatasetError(f"{path}: data row {n} has fewer fields than the header", hint)
    return {h: [r[h] for r in rows] for h in header}


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def scoring_record(scored: Path) -> dict:
    """What Score Image Model recorded of a scored data set (a folder, or its scored.csv): the model that scored
    it, its weights' sha256, the image root; {} for a table another tool wrote."""
    return _meta(scored if scored.is_dir() else scored.parent)


def _meta(folder: Path) -> dict:
    """The scored folder's _meta.yaml: Score Image Model's keys under ``extension`` (older versions kept them
    at the top), {} where there is none or it cannot be read."""
    try:
        meta = yaml.safe_load(read_text(folder / META_FILE))
    except (OSError, yaml.YAMLError, InvalidDatasetError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    extension = meta.get("extension")
    return {**meta, **extension} if isinstance(extension, dict) else meta


def _image_root(folder: Path) -> Path | None:
    """Where the scored images' names start from, as Score Image Model recorded it in _meta.yaml."""
    root = _meta(folder).get(IMAGE_ROOT)
    return Path(root) if isinstance(root, str) else None


def not_the_scoring_model(scored: Path, model: Path) -> str | None:
    """Why ``model`` is not the model that scored ``scored`` (Score Image Model records the sha256 of its
    weights), or None when it is, or when nothing was recorded (the designer's table, an older one)."""
    record = scoring_record(scored)
    digest = record.get(WEIGHTS_SHA256)
    if not isinstance(digest, str) or weights_sha256(model) == digest:
        return None
    recorded = record.get(TRAINED_MODEL)
    if isinstance(recorded, str) and path_relation(recorded, model) == "is":
        return f"the model {model} has changed since it scored {scored} (other weights)"
    return f"{scored} was scored by another model ({recorded if isinstance(recorded, str) else 'unknown'}), not {model}"


def _overlays(folder: Path, mistakes: list[Mistake], log: Callable[[str], None]) -> list:
    """Where the model that scored the images (as _meta.yaml names it) looked for the worst mistakes, when
    imgtrain[explain] is installed and the model is still there."""
    import importlib.util

    model = _meta(folder).get(TRAINED_MODEL)
    if not mistakes or not isinstance(model, str) or not Path(model).is_dir() \
            or importlib.util.find_spec("captum") is None:
        return []
    try:
        changed = not_the_scoring_model(folder, Path(model))
    except (ImgtrainError, OSError):
        return []  # the model is no longer readable there
    if changed:
        log(f"warning: {changed}: the report leaves out where the model looked at its mistakes")
        return []
    from imgtrain.scoring.explain import mistake_overlays

    return mistake_overlays(model, mistakes)


def evaluate_model(
    scored_dataset: Path | str,
    output: Path | str,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict:
    """Write metrics.json, confusion_matrix.png and report.html for a labelled scored data set."""
    check_not_an_input(output, {"scored dataset": scored_dataset})
    table = read_scored(Path(scored_dataset))
    check_output_writable(Path(output), overwrite=overwrite)
    log(f"Evaluating {len(table.truth):,} scored images")
    metrics = metrics_of(table)
    if metrics["unknown_true_labels"]:
        log(f"warning: {unknown_labels_note(metrics)}")
    matrix = metrics["confusion_matrix"]
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        confusion = figure_png(plots.confusion(np.array(matrix["counts"]), np.array(matrix["normalized"]),
                                               matrix["labels"]))
        (tmp / CONFUSION_PNG).write_bytes(confusion)
        mistakes = mistakes_of(table)
        overlays = _overlays(Path(scored_dataset), mistakes, log)
        evaluation_page(metrics, mistakes, confusion_png=confusion, overlays=overlays).write(tmp / REPORT_FILE)
        if overlays:
            log(f"The report shows where the model looked for {len(overlays)} of the worst mistakes")
    return metrics


def metrics_of(table: ScoredTable) -> dict:
    """metrics.json's figures for a scored table."""
    # Labels the model does not know (images of other classes, a table edited by hand) count as errors, never
    # as a crash; true labels among them are named (``unknown_true_labels``), since no answer can be right.
    labels = table.labels + sorted((set(table.truth) | set(table.predicted)) - set(table.labels))
    counts = confusion_matrix(table.truth, table.predicted, labels)
    metrics = classification_metrics(counts, labels)
    known = set(table.labels)
    metrics["unknown_true_labels"] = sorted(set(table.truth) - known) if known else []
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    metrics["confusion_matrix"] = {"labels": labels, "counts": counts.tolist(),
                                   "normalized": np.round(normalised, 6).tolist()}
    return metrics


def mistakes_of(table: ScoredTable) -> list[Mistake]:
    return worst_mistakes(table.truth, table.predicted, table.confidence, table.images, table.root, table.originals)


def confusion_matrix(truth: list[str], predicted: list[str], labels: list[str]) -> np.ndarray:
    """Counts of (true label, predicted label), rows and columns in the order of ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, ([index[t] for t in truth], [index[p] for p in predicted]), 1)
    return counts


MACRO_RULE = "unweighted mean over the classes among the true or the predicted labels (scikit-learn's default)"


def classification_metrics(counts: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, and precision, recall and F1 per class and averaged (micro, macro, weighted), from a
    confusion matrix; a ratio with nothing to divide by is 0. Computed here from the counts rather than
    with scikit-learn, whose import alone takes longer than the whole command: scikit-learn's
    ``precision_recall_fscore_support(truth, predicted, average=..., zero_division=0)`` gives the same
    figures (a test checks it).

    Macro averages take the classes among the true or the predicted labels, as scikit-learn does by default
    (and the designer): a class of the model with no image in the data and never predicted has no precision
    or recall to average, and counting it as 0 would make a 10-class model that is right on every image of
    2 classes score a macro F1 of 0.2. The classes averaged are listed (``macro_average_classes``); per
    class, every label is there, those with no image with support 0."""
    tp = np.diag(counts).astype(float)
    predicted, support = counts.sum(axis=0).astype(float), counts.sum(axis=1).astype(float)
    present = (predicted + support) > 0

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)

    precision, recall, f1 = ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, predicted + support)
    n = support.sum()
    metrics: dict = {"num_images": int(n), "accuracy": float(tp.sum() / n)}
    for average, (p, r, f) in {
        "micro": (ratio(tp.sum(), predicted.sum()), ratio(tp.sum(), support.sum()),
                  ratio(2 * tp.sum(), predicted.sum() + support.sum())),
        "macro": (precision[present].mean(), recall[present].mean(), f1[present].mean()),
        "weighted": tuple(float(v @ support / n) for v in (precision, recall, f1)),
    }.items():
        metrics[f"precision_{average}"], metrics[f"recall_{average}"], metrics[f"f1_{average}"] = (
            float(p), float(r), float(f))
    metrics["macro_average_classes"] = [label for label, p in zip(labels, present, strict=True) if p]
    metrics["macro_average_rule"] = MACRO_RULE
    metrics["per_class"] = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    return metrics

