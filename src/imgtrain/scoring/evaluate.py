"""Evaluate Model (classification): accuracy, precision, recall, F1 and the confusion matrix."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input, check_output_writable
from imgtrain.directories.files import open_text
from imgtrain.errors import InvalidDatasetError, NotLabeledDatasetError
from imgtrain.scoring.table import LABEL_COLUMN, PROBABILITY_PREFIX, SCORED_FILE, SCORED_LABEL

METRICS_JSON = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


def _read_scored(scored: Path) -> tuple[list[str], list[str], list[str]]:
    """Return (true labels, predicted labels, the model's label list) from a scored data set."""
    path = scored / SCORED_FILE if scored.is_dir() else scored
    hint = "pass the output of `imgtrain score-image-model`"
    try:
        with open_text(path) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise InvalidDatasetError(f"{scored} holds no {SCORED_FILE}", hint) from None
    except OSError as exc:  # a pipe or a device in its place, a permission
        raise InvalidDatasetError(f"{path} cannot be read ({exc.strerror or exc})", hint) from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidDatasetError(f"{path} is not a readable CSV ({exc})", hint) from None
    if SCORED_LABEL not in header:
        raise InvalidDatasetError(f"{path} has no {SCORED_LABEL!r} column", hint)
    if LABEL_COLUMN not in header:
        raise NotLabeledDatasetError(
            f"{path} has no true labels (no {LABEL_COLUMN!r} column): the scored images were unlabeled",
            "score a labelled ImageDirectory or a folder with one sub-folder per category")
    if not rows:
        raise InvalidDatasetError(f"{path} holds no rows", hint)
    for n, row in enumerate(rows, 1):
        if row[LABEL_COLUMN] is None or row[SCORED_LABEL] is None:
            raise InvalidDatasetError(f"{path}: data row {n} has fewer fields than the header", hint)
    labels = [h[len(PROBABILITY_PREFIX):] for h in header if h.startswith(PROBABILITY_PREFIX)]
    return [r[LABEL_COLUMN] for r in rows], [r[SCORED_LABEL] for r in rows], labels


def evaluate_model(
    scored_dataset: Path | str,
    output: Path | str,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict:
    """Write metrics.json and confusion_matrix.png for a labelled scored data set."""
    check_not_an_input(output, {"scored dataset": scored_dataset})
    truth, predicted, model_labels = _read_scored(Path(scored_dataset))
    check_output_writable(Path(output), overwrite=overwrite)
    log(f"Evaluating {len(truth):,} scored images")
    # Labels the model does not know (in a table edited by hand) count as errors, never as a crash.
    labels = model_labels + sorted((set(truth) | set(predicted)) - set(model_labels))
    counts = confusion_matrix(truth, predicted, labels)
    metrics = classification_metrics(counts, labels)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    metrics["confusion_matrix"] = {"labels": labels, "counts": counts.tolist(),
                                   "normalized": np.round(normalised, 6).tolist()}
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        _plot_confusion(counts, normalised, labels, tmp / CONFUSION_PNG)
    return metrics


def confusion_matrix(truth: list[str], predicted: list[str], labels: list[str]) -> np.ndarray:
    """Counts of (true label, predicted label), rows and columns in the order of ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, ([index[t] for t in truth], [index[p] for p in predicted]), 1)
    return counts


def classification_metrics(counts: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, and precision, recall and F1 per class and averaged (micro, macro, weighted), from a
    confusion matrix; a ratio with nothing to divide by is 0. Computed here from the counts rather than
    with scikit-learn, whose import alone takes longer than the whole command: scikit-learn's
    ``precision_recall_fscore_support(..., zero_division=0)`` gives the same figures (a test checks it)."""
    tp = np.diag(counts).astype(float)
    predicted, support = counts.sum(axis=0).astype(float), counts.sum(axis=1).astype(float)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)

    precision, recall, f1 = ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, predicted + support)
    n = support.sum()
    metrics: dict = {"num_images": int(n), "accuracy": float(tp.sum() / n)}
    for average, (p, r, f) in {
        "micro": (ratio(tp.sum(), predicted.sum()), ratio(tp.sum(), support.sum()),
                  ratio(2 * tp.sum(), predicted.sum() + support.sum())),
        "macro": (precision.mean(), recall.mean(), f1.mean()),
        "weighted": tuple(float(v @ support / n) for v in (precision, recall, f1)),
    }.items():
        metrics[f"precision_{average}"], metrics[f"recall_{average}"], metrics[f"f1_{average}"] = (
            float(p), float(r), float(f))
    metrics["per_class"] = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    return metrics


def _plot_confusion(counts: np.ndarray, normalised: np.ndarray, labels: list[str], path: Path) -> None:
    # A Figure with the Agg canvas, not pyplot: no GUI backend to look for, and less to import.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"text.parse_math": False}):  # a label like "$5_to_$10" is text, not TeX
        n = len(labels)
        side = min(20, max(4, 0.5 * n + 2))
        fig = Figure(figsize=(side, side * 0.85))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        im = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
        ticks = np.arange(n)
        ax.set_xticks(ticks, labels, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
        ax.set_yticks(ticks, labels)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(f"Confusion matrix ({int(counts.sum()):,} images)")
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=8,
                                color="white" if normalised[i, j] > 0.5 else "black")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
