"""Evaluate Model (classification): accuracy, precision, recall, F1 and the confusion matrix."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgtrain.directories.atomic import atomic_output_dir, check_output_writable
from imgtrain.errors import InvalidDatasetError, NotLabeledDatasetError
from imgtrain.scoring.score import LABEL_COLUMN, PROBABILITY_PREFIX, SCORED_FILE, SCORED_LABEL

METRICS_JSON = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


def _read_scored(scored: Path) -> tuple[list[str], list[str], list[str]]:
    """Return (true labels, predicted labels, the model's label list) from a scored data set."""
    path = scored / SCORED_FILE if scored.is_dir() else scored
    hint = "pass the output of `imgtrain score-image-model`"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise InvalidDatasetError(f"{scored} holds no {SCORED_FILE}", hint) from None
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
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    truth, predicted, model_labels = _read_scored(Path(scored_dataset))
    check_output_writable(Path(output), overwrite=overwrite)
    log(f"Evaluating {len(truth):,} scored images")
    labels = model_labels + sorted(set(truth) - set(model_labels))  # unknown true labels count as errors
    metrics: dict = {"num_images": len(truth), "accuracy": float(accuracy_score(truth, predicted))}
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, labels=labels, average=average,
                                                     zero_division=0)
        metrics[f"precision_{average}"], metrics[f"recall_{average}"], metrics[f"f1_{average}"] = (
            float(p), float(r), float(f))
    p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    metrics["per_class"] = {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    counts = confusion_matrix(truth, predicted, labels=labels)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    metrics["confusion_matrix"] = {"labels": labels, "counts": counts.tolist(),
                                   "normalized": np.round(normalised, 6).tolist()}
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        _plot_confusion(counts, normalised, labels, tmp / CONFUSION_PNG)
    return metrics


def _plot_confusion(counts: np.ndarray, normalised: np.ndarray, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}):  # a label like "$5_to_$10" is text, not TeX
        _draw_confusion(plt, counts, normalised, labels, path)


def _draw_confusion(plt, counts: np.ndarray, normalised: np.ndarray, labels: list[str], path: Path) -> None:
    n = len(labels)
    side = min(20, max(4, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
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
    plt.close(fig)
