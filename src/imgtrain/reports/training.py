"""A trained model's report: how training went, on what data, seen how, with which parameters."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

from imgtrain.directories.model_directory import DESIGNER, METRICS_FILE, ModelSpec, load_model_spec
from imgtrain.reports import plots
from imgtrain.reports.page import Page, figure_png

TRAINING_IMAGES = "training_images.png"  # the grid of augmented training images, kept in the model directory
SHOWN_CLASSES = 200  # rows of the class table; the rest are summed up
_NOT_PARAMETERS = ("class_counts", "bad_images", "bad_image_counts", "run_id")


def read_history(model: Path) -> list[dict]:
    """metrics.csv's rows as numbers (an empty cell, such as top-5 with few classes, is None)."""
    with open(model / METRICS_FILE, newline="", encoding="utf-8") as f:
        return [{k: (int(v) if k == "epoch" else float(v) if v != "" else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def training_page_of(model: Path, title: str | None = None, log: Callable[[str], None] = lambda m: None) -> Page:
    """The report of a trained model directory, from its files. One without a readable training history (the
    designer's Train PyTorch Model records none; metrics.csv removed or damaged) gets what it has, and ``log``
    a warning saying what is missing."""
    model = Path(model)
    spec = load_model_spec(model, need_trained=True)
    title = title or f"Training report: {model.name}"
    if spec.made_by == DESIGNER:
        missing = f"{model} holds no training history ({METRICS_FILE}): Azure ML designer, which made it, records none"
    elif not (model / METRICS_FILE).is_file():
        missing = f"{model / METRICS_FILE} is missing"
    else:
        images = model / TRAINING_IMAGES
        try:
            return training_page(spec, read_history(model), images.read_bytes() if images.is_file() else None, title)
        except (KeyError, IndexError, TypeError, ValueError, OSError, csv.Error) as exc:
            missing = (f"the training record of {model} ({METRICS_FILE}, and the training section of its spec) "
                       f"cannot be read ({type(exc).__name__}: {str(exc)[:100]})")
    log(f"warning: {missing}; the report shows the model's parameters, classes and input (and the evaluation, "
        "given a scored data set), without curves or per-epoch figures")
    return summary_page(spec, missing, title)


def summary_page(spec: ModelSpec, missing: str, title: str) -> Page:
    """What a model without a training history tells of itself: architecture, classes, input, parameters."""
    page = Page(title)
    start = "fine-tuned from ImageNet weights" if spec.pretrained else "trained from scratch"
    page.paragraph(f"{spec.architecture}, {start}, {spec.num_classes:,} classes. No training curves: {missing}.",
                   css="lead")
    _data_summary(page, spec.labels, spec.training)
    page.heading("Parameters", "parameters")
    page.table(["parameter", "value"], _parameters(spec))
    return page


def training_page(spec: ModelSpec, history: list[dict], training_images: bytes | None, title: str) -> Page:
    """``history``: metrics.csv's rows; ``training_images``: the PNG of the augmented training images."""
    t = spec.training
    best, stopped, epochs = t["best_epoch"], t["stopped_epoch"], t["epochs"]
    if not all(type(n) is int for n in (best, stopped, epochs)) or not 1 <= best <= min(stopped, len(history)):
        raise ValueError(f"best epoch {best!r} of {stopped!r} stopped and {len(history)} recorded")
    page = Page(title)
    start = "fine-tuned from ImageNet weights" if spec.pretrained else "trained from scratch"
    page.paragraph(f"{spec.architecture}, {start}, on {t['training_images']:,} images in {spec.num_classes:,} "
                   f"classes, validated on {t['validation_images']:,}. Best epoch {best} of {stopped}"
                   + (f" (stopped early; up to {epochs} were allowed)." if stopped < epochs else "."), css="lead")
    best_row = history[best - 1]
    page.cards([(f"{best_row['validation_top1_accuracy']:.2%}", "validation top-1 (best epoch)"),
                (f"{best_row['validation_loss']:.4f}", "validation loss (best epoch)"),
                (f"{best} / {stopped}", "best / last epoch"),
                (f"{sum(h['seconds'] for h in history):,.0f} s", "training time"),
                (f"{t.get('image_size')} px", "image size")])

    page.heading("Curves", "curves")
    page.figure(figure_png(plots.curves(history, best, stopped, epochs)),
                f"Per epoch: the weights of epoch {best} (green) are the ones kept"
                + (f"; training stopped early after epoch {stopped} (red)." if stopped < epochs else "."),
                "loss, accuracy, learning rate and images per second per epoch", "curves-figure")
    _data_summary(page, spec.labels, t)
    if training_images is not None:
        page.heading("Training images as the model sees them", "images")
        page.figure(training_images,
                    f"The first images of epoch 1 after resizing to {t.get('image_size')} px and augmentation "
                    f"({t.get('augmentation')}), labelled with their class: an augmentation that destroys "
                    "the label (flipped digits, cropped-out objects) shows here.",
                    "a grid of augmented training images", "images-figure")
    page.heading("Parameters", "parameters")
    page.table(["parameter", "value"], _parameters(spec))
    return page


def _parameters(spec: ModelSpec) -> list[tuple]:
    return [("architecture", spec.architecture), ("pretrained", spec.pretrained),
            *((f"option {k}", v) for k, v in spec.options.items()),
            *((k, _value(v)) for k, v in spec.training.items() if k not in _NOT_PARAMETERS),
            ("input", f"{spec.input.image_size} px, resize {spec.input.resize}, mean {spec.input.mean}, "
                      f"std {spec.input.std}"),
            *((f"version of {k}", v) for k, v in spec.versions.items())]


def _value(v: object) -> object:
    return f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v


def _data_summary(page: Page, labels: list[str], t: dict) -> None:
    page.heading("Data", "data")
    counts = t.get("class_counts")
    if counts:
        total = sum(c["training"] for c in counts.values()) or 1
        rows = [(label, f"{c['training']:,}", f"{c['training'] / total:.1%}", f"{c['validation']:,}")
                for label, c in counts.items()]
        if len(rows) > SHOWN_CLASSES:
            rest = rows[SHOWN_CLASSES:]
            rows = rows[:SHOWN_CLASSES] + [(f"... {len(rest):,} more classes", "", "", "")]
        page.paragraph(f"Class weights: {t.get('class_weights', 'none')}; sampler: {t.get('sampler', 'uniform')}.")
        page.table(["class", "training images", "share", "validation images"], rows, numeric=(False, True, True, True))
    else:
        page.paragraph(f"{len(labels):,} classes: {', '.join(labels[:50])}" + (" ..." if len(labels) > 50 else ""))
    bad = t.get("bad_images") or {}
    counts = t.get("bad_image_counts") or {which: len(paths) for which, paths in bad.items()}
    left_out = [(which, path) for which in ("training", "validation") for path in bad.get(which, [])]
    if left_out:
        total = sum(counts.values())
        page.paragraph(f"{total:,} image(s) could not be decoded and were left out"
                       + (f" (the first {len(left_out):,} are named)" if total > len(left_out) else "") + ":")
        page.table(["data", "image"], left_out)
    elif bad:
        page.paragraph("No image that training met was bad (a run that resumed counts those met since).")
