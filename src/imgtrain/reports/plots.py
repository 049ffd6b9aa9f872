"""The reports' plots, as matplotlib Figures made without pyplot (no GUI backend to look for)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from imgtrain.errors import shown

BEST, STOPPED = "#2ca02c", "#d62728"  # the best epoch's line, and the early stop's


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def curves(history: list[dict], best_epoch: int, stopped_epoch: int, epochs: int):
    """Loss, accuracy, learning rate and images/s per epoch, the best epoch (and an early stop) marked."""
    import matplotlib

    epoch = [h["epoch"] for h in history]

    def column(name: str) -> list[float]:
        return [math.nan if h.get(name) is None else float(h[name]) for h in history]

    with matplotlib.rc_context({"text.parse_math": False}):
        fig = _figure(11, 7)
        (loss, accuracy), (rate, speed) = fig.subplots(2, 2)
        loss.plot(epoch, column("train_loss"), "o-", label="training")
        loss.plot(epoch, column("validation_loss"), "o-", label="validation")
        loss.set_title("Loss")
        finite = [v for v in column("train_loss") + column("validation_loss") if math.isfinite(v) and v > 0]
        if finite and max(finite) > 100 * min(finite):  # a first epoch far above the rest would flatten them
            loss.set_yscale("log")
            loss.set_title("Loss (log scale)")
        accuracy.plot(epoch, [1 - e for e in column("train_error")], "o-", label="training")
        accuracy.plot(epoch, column("validation_top1_accuracy"), "o-", label="validation top-1")
        if any(not math.isnan(v) for v in column("validation_top5_accuracy")):
            accuracy.plot(epoch, column("validation_top5_accuracy"), "o--", label="validation top-5")
        accuracy.set_title("Accuracy")
        accuracy.set_ylim(top=1.02)
        rate.plot(epoch, column("learning_rate"), "o-", color="#9467bd")
        rate.set_title("Learning rate (head, at the epoch's start)")
        rate.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        speed.bar(epoch, column("train_images_per_second"), color="#8c8c8c")
        speed.set_title("Training images / s")
        for ax in (loss, accuracy, rate, speed):
            ax.axvline(best_epoch, color=BEST, linestyle="--", linewidth=1.5, label=f"best epoch ({best_epoch})")
            if stopped_epoch < epochs:
                ax.axvline(stopped_epoch, color=STOPPED, linestyle=":", linewidth=1.5,
                           label=f"early stop ({stopped_epoch} of {epochs})")
            ax.set_xlabel("epoch")
            ax.set_xticks(epoch if len(epoch) <= 20 else ax.get_xticks())
            ax.grid(alpha=0.3)
        loss.legend()
        accuracy.legend(loc="lower right")
    return fig


def confusion(counts: np.ndarray, normalised: np.ndarray, labels: Sequence[str]):
    """The confusion matrix, coloured by the share of each true class, with counts written in (30 classes or fewer)."""
    import matplotlib

    labels = [shown(label) for label in labels]  # a line break or an escape sequence as its characters, '' visible
    with matplotlib.rc_context({"text.parse_math": False}):  # a label like "$5_to_$10" is text, not TeX
        n = len(labels)
        side = min(20, max(4, 0.5 * n + 2))
        fig = _figure(side, side * 0.85)
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
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 8) -> bytes:
    """Images (H x W x 3 uint8) in a grid, each titled, as PNG bytes: the training images as the model sees
    them. Drawn with Pillow, not matplotlib: every training run makes one, and this takes milliseconds."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    cell = max(96, max((max(im.shape[:2]) for im in images), default=96))
    title, gap = 16, 6
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + title + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (image, name) in enumerate(zip(images, titles, strict=False)):
        x, y = gap + (k % columns) * (cell + gap), gap + (k // columns) * (cell + title + gap)
        picture = Image.fromarray(image)
        scale = cell / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.NEAREST if scale >= 2 else Image.BILINEAR)
        sheet.paste(picture, (x + (cell - picture.width) // 2, y + title))
        name = shown(name)
        text = name if len(name) <= 16 else name[:15] + "…"
        draw.text((x + cell // 2, y + title // 2), text, fill="black", font=font, anchor="mm")
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()
