"""Class imbalance: how many images each class has, the balanced loss weights, and what a run says about them.

Two remedies, chosen with ``--class-weights`` and ``--sampler`` (see the README, "Imbalanced classes"):
weighting each class's loss by the inverse of its share, or drawing every class equally often.
"""

from __future__ import annotations

import numpy as np

from imgtrain.errors import shown

SHOWN = 12  # classes listed one by one at the start of a run; with more, the range
IMBALANCED = 3.0  # the largest class over the smallest from which the start of a run suggests balancing


def class_counts(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes)


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's 'balanced' weights, images / (classes x the class's images): a class with a tenth of
    the images weighs ten times as much, and the weights average 1 over the images. A class with no
    training images (it may still have validation images) weighs 1."""
    weights = np.ones(len(counts))
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def imbalance(counts: np.ndarray) -> float:
    """The largest class's images over the smallest's (classes with none left out)."""
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def without_images(labels: list[str], counts: np.ndarray) -> list[str]:
    """The classes with no images in ``counts``."""
    return [label for label, n in zip(labels, counts, strict=True) if n == 0]


def ratio(x: float) -> str:
    """1.5, 20, 1,234: a ratio as people write it, never in scientific notation."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def describe(labels: list[str], training: np.ndarray, validation: np.ndarray) -> str:
    """``classes (training/validation images): cat 900/100, dog 90/10; imbalance 10:1``."""
    if len(labels) <= SHOWN:
        listed = ", ".join(f"{shown(label)} {t:,}/{v:,}"
                           for label, t, v in zip(labels, training, validation, strict=True))
        text = f"classes (training/validation images): {listed}"
    else:
        present = np.flatnonzero(training > 0)
        low, high = present[np.argmin(training[present])], int(np.argmax(training))
        empty = len(labels) - len(present)
        text = (f"{len(labels):,} classes: from {training[low]:,} training images ({shown(labels[low])}) to "
                f"{training[high]:,} ({shown(labels[high])})" + (f", {empty:,} with none" if empty else ""))
    return f"{text}; imbalance {ratio(imbalance(training))}:1"


def record(labels: list[str], training: np.ndarray, validation: np.ndarray) -> dict[str, dict[str, int]]:
    """The counts as the model's spec keeps them: ``{label: {"training": n, "validation": m}}``."""
    return {label: {"training": int(t), "validation": int(v)}
            for label, t, v in zip(labels, training, validation, strict=True)}
