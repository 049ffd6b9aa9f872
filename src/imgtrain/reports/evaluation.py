"""Evaluate Model's report: the figures, the confusion matrix, per-class precision, recall and F1,
and the worst mistakes (wrong with the highest confidence), with their images."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgtrain.errors import some
from imgtrain.reports import plots
from imgtrain.reports.page import Page, figure_png

WORST_SHOWN = 16
THUMBNAIL = 200  # px


@dataclass
class Mistake:
    image: str  # as the scored table names it
    path: Path | None  # where the file is, if it can be found
    truth: str
    predicted: str
    probability: float  # of the predicted label
    original: str | None = None  # its path before convert


def worst_mistakes(truth: list[str], predicted: list[str], confidence: np.ndarray, images: list[str],
                   root: Path | None, originals: list[str] | None = None, shown: int = WORST_SHOWN) -> list[Mistake]:
    """The wrong answers given with the highest probability, most confident first."""
    wrong = [i for i, (t, p) in enumerate(zip(truth, predicted, strict=True)) if t != p]
    wrong.sort(key=lambda i: -np.nan_to_num(confidence[i], nan=-np.inf))  # a probability missing: last
    return [Mistake(images[i], _find(images[i], root), truth[i], predicted[i], float(confidence[i]),
                    originals[i] if originals else None) for i in wrong[:shown]]


def _find(image: str, root: Path | None) -> Path | None:
    """The image's file: under the folder Score Image Model recorded, or an absolute path. Never guessed from
    the current folder (names such as image/0_12.png would find another data set's image)."""
    candidate = root / image if root is not None else Path(image)
    return candidate if candidate.is_absolute() and candidate.is_file() else None


def unknown_labels_note(metrics: dict) -> str:
    """What the true labels the model does not know mean for the figures, in a sentence naming them."""
    unknown = metrics["unknown_true_labels"]
    images = sum(metrics["per_class"][label]["support"] for label in unknown)
    return (f"{images:,} of {metrics['num_images']:,} scored images have a true label the model does not know "
            f"({some(unknown)}): the model can never give it, so they all count as errors; evaluate a model "
            "trained on these classes, or check that the images were scored by the model meant")


def thumbnail(path: Path | None) -> bytes | None:
    """A small PNG of the image, decoded as imgtrain decodes (a file that is gone or bad gives None)."""
    from imgtrain.data.decode import load_rgb
    from imgtrain.errors import BadImageError

    if path is None:
        return None
    try:
        image = load_rgb(path, draft_size=THUMBNAIL)
    except (BadImageError, OSError):
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def evaluation_page(metrics: dict, mistakes: list[Mistake], title: str = "Evaluation report",
                    confusion_png: bytes | None = None, overlays: list[tuple[Mistake, bytes]] = ()) -> Page:
    """``confusion_png``: the confusion matrix already drawn (else it is drawn here). ``overlays``: where the
    model looked for some of the mistakes (scoring/explain.py), drawn under them."""
    page = Page(title)
    matrix = metrics["confusion_matrix"]
    labels, counts = matrix["labels"], np.array(matrix["counts"])
    page.paragraph(f"{metrics['num_images']:,} scored images, {len(labels):,} classes.", css="lead")
    page.cards([(f"{metrics['accuracy']:.2%}", "accuracy"), (f"{metrics['precision_macro']:.4f}", "macro precision"),
                (f"{metrics['recall_macro']:.4f}", "macro recall"), (f"{metrics['f1_macro']:.4f}", "macro F1"),
                (f"{metrics['f1_weighted']:.4f}", "weighted F1")])
    averaged = metrics["macro_average_classes"]
    absent = [label for label in labels if label not in averaged]
    page.paragraph(f"Macro figures are the unweighted mean over the {len(averaged):,} classes among the true or the "
                   "predicted labels (scikit-learn's default)" + (
                       f"; the model's {len(absent):,} other classes ({some(absent)}) have no image here and were "
                       "never given." if absent else "."), css="note")
    if metrics.get("unknown_true_labels"):
        page.paragraph(f"Warning: {unknown_labels_note(metrics)}.")
    page.heading("Confusion matrix", "confusion")
    page.figure(confusion_png or figure_png(plots.confusion(counts, np.array(matrix["normalized"]), labels)),
                "Rows are the true classes, columns the predicted ones; colour is the share of the true class.",
                "the confusion matrix", "confusion-figure")
    page.heading("Per class", "per-class")
    per_class = metrics["per_class"]
    page.table(["class", "precision", "recall", "F1", "images"],
               [(label, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", f"{c['support']:,}")
                for label, c in per_class.items()], numeric=(False, True, True, True, True))
    page.heading("Worst mistakes", "mistakes")
    if not mistakes:
        page.paragraph("No mistakes: every image got its true label.")
        return page
    page.paragraph(f"The {len(mistakes)} wrong answers given with the highest probability, most confident first.")
    page.gallery((thumbnail(m.path), [m.image] + ([f"(was {m.original})"] if m.original else [])
                  + [f"true: {m.truth}", f"predicted: {m.predicted} ({m.probability:.1%})"]) for m in mistakes)
    if overlays:
        page.heading("Where the model looked", "explanations")
        page.paragraph(f"The {len(overlays)} worst mistakes, each beside a saliency map of the class the model "
                       "chose (red: what raised its score most; `imgtrain explain` draws them for any images).")
        for m, png in overlays:
            page.figure(png, m.image, m.image)
    return page
