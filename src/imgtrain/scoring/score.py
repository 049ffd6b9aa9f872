"""Score Image Model: class probabilities and the predicted label for every image."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgtrain.data.convert import find_images
from imgtrain.data.dataset import ON_BAD_IMAGE, BadImagePolicy, ImageDataset, worker_count
from imgtrain.data.transforms import Normalize
from imgtrain.device import resolve_device
from imgtrain.directories.atomic import atomic_output_dir, check_output_writable
from imgtrain.directories.image_directory import META_FILE, ImageDirectory
from imgtrain.directories.model_directory import load_trained_model
from imgtrain.errors import InvalidDatasetError, check_choice, check_range
from imgtrain.training.precision import PRECISIONS, autocast, denormals_flushed, resolve_precision

SCORED_FILE = "scored.csv"
LABEL_COLUMN = "category"
PROBABILITY_PREFIX = "Scored Probabilities_"
SCORED_LABEL = "Scored Labels"


@dataclass
class ScoreResult:
    output: Path
    num_images: int
    labeled: bool


@dataclass
class _Rows:
    """The images to score and the non-image columns that go with them."""

    paths: list[Path]
    names: list[str]
    ids: list[int] | None
    categories: list[str] | None


def _rows(dataset: Path) -> _Rows:
    if (dataset / META_FILE).is_file():
        data = ImageDirectory.load(dataset)
        cats = None if data.labels is None else [data.categories[i] for i in data.labels]
        return _Rows([data.path(i) for i in range(len(data))], data.files, data.ids.tolist(), cats)
    found = find_images(dataset)
    if not found.items:
        raise InvalidDatasetError(f"no image found in {dataset}",
                                  "pass an ImageDirectory or a folder of images")
    paths = [p for p, _ in found.items]
    cats = [c for _, c in found.items] if found.categories else None
    return _Rows(paths, [str(p.relative_to(found.root)) for p in paths], None, cats)


def score_image_model(
    trained_model: Path | str,
    dataset: Path | str,
    output: Path | str,
    *,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int | None = None,
    precision: str = "auto",
    on_bad_image: str = "skip",
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> ScoreResult:
    """Score an ImageDirectory or a plain folder (labelled sub-folders or flat) with a trained model.

    An image that cannot be decoded is left out of the scores and named (``skip``), or stops
    the run (``fail``).
    """
    check_range("batch_size", batch_size, low=1)
    if num_workers is not None:
        check_range("num_workers", num_workers, low=0, high=64)
    check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    check_choice("precision", precision, PRECISIONS)
    model, spec = load_trained_model(trained_model)
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise InvalidDatasetError(f"{dataset} is not a directory", "pass an ImageDirectory or a folder of images")
    rows = _rows(dataset)
    check_output_writable(Path(output), overwrite=overwrite)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    model.to(dev, memory_format=torch.channels_last)
    normalize = Normalize(spec.input.mean, spec.input.std).to(dev)
    size = spec.input.image_size
    workers = worker_count(num_workers)
    images = ImageDataset(rows.paths, None, size)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=dev.type == "cuda")
    log(f"Scoring {len(rows.paths):,} images with {spec.architecture} ({spec.num_classes} classes) on {dev}, "
        f"precision {precision}")
    probabilities = np.zeros((len(rows.paths), spec.num_classes), dtype=np.float32)
    scored = np.zeros(len(rows.paths), dtype=bool)
    bad_images = BadImagePolicy(on_bad_image, images, log)
    with torch.inference_mode(), denormals_flushed():
        for batch in tqdm(loader, desc="scoring", unit="batch", leave=False,
                          disable=(not sys.stderr.isatty()) if progress is None else not progress):
            x, _, index = bad_images.filter(batch)
            if len(index):
                with autocast(precision, dev):
                    logits = model(normalize(x.to(dev, non_blocking=True)))
                probs = logits.float().softmax(dim=1)
                probabilities[index.numpy()] = probs.cpu().numpy()
                scored[index.numpy()] = True
    predicted = probabilities.argmax(axis=1)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        header = (["id"] if rows.ids is not None else []) + ["image"]
        header += [LABEL_COLUMN] if rows.categories is not None else []
        header += [PROBABILITY_PREFIX + label for label in spec.labels] + [SCORED_LABEL]
        with open(tmp / SCORED_FILE, "w", newline="", encoding="utf-8", errors="backslashreplace") as out:
            writer = csv.writer(out)
            writer.writerow(header)
            for i, name in enumerate(rows.names):
                if not scored[i]:
                    continue
                row: list = ([rows.ids[i]] if rows.ids is not None else []) + [name]
                row += [rows.categories[i]] if rows.categories is not None else []
                row += [f"{p:.6g}" for p in probabilities[i]] + [spec.labels[predicted[i]]]
                writer.writerow(row)
        meta = {"type": "DataFrameDirectory", "format": "csv", "data": SCORED_FILE,
                "label_column": LABEL_COLUMN if rows.categories is not None else None,
                "scored_label_column": SCORED_LABEL, "labels": list(spec.labels),
                "trained_model": str(Path(trained_model).resolve())}
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    return ScoreResult(Path(output), int(scored.sum()), rows.categories is not None)
