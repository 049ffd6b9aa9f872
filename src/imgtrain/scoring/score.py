"""Score Image Model: class probabilities and the predicted label for every image; and ``predict``,
the same for Python code, returning the answers instead of writing a table."""

from __future__ import annotations

import csv
import glob
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgtrain.allocator import reuse_large_blocks
from imgtrain.data.convert import find_images, is_image_file
from imgtrain.data.dataset import BadImagePolicy, ImageDataset, SeededSampler
from imgtrain.data.decode import ON_BAD_IMAGE
from imgtrain.data.loading import make_loader
from imgtrain.deploy.engines import ENGINES, ScoringModel, device_for, load_engine, open_model
from imgtrain.directories import dataframe_directory
from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input, check_output_writable
from imgtrain.directories.files import file_sha256
from imgtrain.directories.image_directory import META_FILE, ImageDirectory
from imgtrain.distributed import ALONE, World, join_world, leave_world, rank_device
from imgtrain.errors import InvalidDatasetError, check_choice, check_range, option
from imgtrain.models.trained import TrainedModel
from imgtrain.precision import PRECISIONS, denormals_flushed
from imgtrain.progress import bar
from imgtrain.scoring.table import (
    IMAGE_ROOT,
    LABEL_COLUMN,
    ORIGINAL_COLUMN,
    PROBABILITY_PREFIX,
    SCORED_FILE,
    SCORED_LABEL,
    TRAINED_MODEL,
    WEIGHTS_SHA256,
)
from imgtrain.threads import Threads, parse_threads, worker_count

_DATASET_HINT = "pass an ImageDirectory, a folder of images, or image files (paths or glob patterns)"

Images = Path | str | Sequence[Path | str]  # what score and predict take


@dataclass
class ScoreResult:
    output: Path
    num_images: int
    labeled: bool


@dataclass
class Prediction:
    """One image's answer: the most probable label, its probability, and every label's."""

    image: str
    label: str
    probability: float
    probabilities: dict[str, float]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k most probable labels with their probabilities, most probable first."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:k]


@dataclass
class _Rows:
    """The images to score and the non-image columns that go with them."""

    paths: list[Path]
    names: list[str]  # as the user knows them: relative to the folder given, or as given
    ids: list[int] | None = None
    categories: list[str] | None = None
    originals: list[str] | None = None  # the path each image had before convert
    given: tuple[Path, ...] = ()  # the folders and files named (globs expanded), for the output check
    root: Path = field(default_factory=Path.cwd)  # where the names start from


def _rows(images: Images) -> _Rows:
    """An ImageDirectory or a folder (alone), or any number of image files, folders and glob patterns."""
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise InvalidDatasetError("no images were given", _DATASET_HINT)
    if len(items) == 1 and Path(items[0]).is_dir():
        return _folder_rows(Path(items[0]))
    paths: list[Path] = []
    given: list[Path] = []
    for item in items:
        path = Path(item)
        if path.exists() or path.is_symlink():
            found = [path]  # a file named directly is tried whatever its suffix; decoding names a bad one
        elif glob.has_magic(str(item)):
            found = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            found = [p for p in found if p.is_dir() or is_image_file(p)]  # as the shell would, less non-images
            if not found:
                raise InvalidDatasetError(f"no image file or folder matches {item}", _DATASET_HINT)
        else:
            raise InvalidDatasetError(f"{item} does not exist", _DATASET_HINT)
        for p in found:
            if p.is_dir():
                if (p / META_FILE).exists():
                    raise InvalidDatasetError(f"{p} is an ImageDirectory: it is scored on its own",
                                              "score it alone, or the files separately")
                paths += [image for image, _ in find_images(p).items]
            else:
                paths.append(p)
        given += found
    return _Rows(paths, [str(p) for p in paths], given=tuple(given))


def _folder_rows(folder: Path) -> _Rows:
    if (folder / META_FILE).exists():
        data = ImageDirectory.load(folder)
        cats = None if data.labels is None else [data.categories[i] for i in data.labels]
        return _Rows([data.path(i) for i in range(len(data))], data.files, data.ids.tolist(), cats, data.originals,
                     given=(folder,), root=data.root)
    found = find_images(folder)
    if not found.items:
        raise InvalidDatasetError(f"no image found in {folder}", _DATASET_HINT)
    paths = [p for p, _ in found.items]
    cats = [c for _, c in found.items] if found.categories else None
    return _Rows(paths, [str(p.relative_to(found.root)) for p in paths], categories=cats, given=(folder,),
                 root=found.root)


def _probabilities(
    model: ScoringModel, paths: list[Path], *, batch_size: int, device: torch.device, num_workers: int | None,
    precision: str, engine: str | None, on_bad_image: str, threads: int | str | None, progress: bool | None,
    log: Callable[[str], None], world: World = ALONE,
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Every image's class probabilities, and which images could be decoded (the others stay zero).

    Under torchrun each process scores its share (every image exactly once) and rank 0 gets every
    row back in the input's order; the other ranks get (None, None).
    """
    threads = Threads(parse_threads(threads), log)
    if device.type == "cpu":
        reuse_large_blocks()  # each batch's activations from reused memory, not fresh pages (allocator.py)
    with threads, denormals_flushed():
        run = load_engine(engine, model, device=device, precision=precision, threads=threads.current,
                          batch_size=batch_size, log=log)
    images = ImageDataset(paths, None, model.image_size, prepare=model.preparation)
    share = SeededSampler(len(paths), 0, shuffle=False, rank=world.rank, ranks=world.size)
    workers = min(worker_count(num_workers, processes=world.local_size),
                  len(share) // batch_size)  # a worker per batch at most
    loader = make_loader(images, batch_size=batch_size, workers=workers, device=device, sampler=share)
    log(f"Scoring {len(paths):,} images with {model.architecture} ({model.num_classes} classes) on "
        f"{device}, engine {run.describe()}, {threads.describe()}"
        + (f", {world.size} processes ({world.backend})" if world.size > 1 else ""))
    # SeededSampler deals the images in order: this process's share is images rank, rank + size, ...,
    # and image i is row (i - rank) // size of its arrays.
    mine = np.arange(world.rank, len(paths), world.size)
    probabilities = np.zeros((len(mine), model.num_classes), dtype=np.float32)
    scored = np.zeros(len(mine), dtype=bool)
    bad_images = BadImagePolicy(on_bad_image, images, world.own_log(log))  # each names the bad ones it meets
    shown = bar(what="scoring", total=len(paths), show=progress if world.is_main else False)
    with torch.inference_mode(), threads, denormals_flushed(), shown:
        for batch in loader:
            threads.step()
            x, _, index = bad_images.filter(batch)
            if len(index):
                rows = (index.numpy() - world.rank) // world.size
                probabilities[rows] = run(x)
                scored[rows] = True
            shown.update(len(batch[2]) * world.size)  # the processes go at one pace: count them all
    return world.gather_rows(mine, probabilities, len(paths)), world.gather_rows(mine, scored, len(paths))


def _check_options(batch_size: int, num_workers: int | None, on_bad_image: str, precision: str,
                   threads: int | str | None, engine: str | None) -> None:
    check_range("batch_size", batch_size, low=1)
    if engine is not None:
        check_choice("engine", engine, ENGINES)
    if num_workers is not None:
        check_range("num_workers", num_workers, low=0, high=64)
    check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    check_choice("precision", precision, PRECISIONS)
    parse_threads(threads)  # a bad value (or IMGTRAIN_THREADS) is named before any work


def score_image_model(
    trained_model: TrainedModel | Path | str,
    dataset: Images,
    output: Path | str,
    *,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int | None = None,
    precision: str = "auto",
    engine: str | None = None,
    on_bad_image: str = "skip",
    top_k: int | None = None,
    threads: int | str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> ScoreResult:
    """Score images with a trained model and write scored.csv.

    ``dataset``: an ImageDirectory, a folder (labelled sub-folders or flat), or image files and
    glob patterns (one or a list). An image that cannot be decoded is left out of the scores and
    named (``skip``), or stops the run (``fail``). ``top_k`` adds the K most probable labels.
    """
    _check_options(batch_size, num_workers, on_bad_image, precision, threads, engine)
    rows = _rows(dataset)
    model = trained_model if isinstance(trained_model, TrainedModel | ScoringModel) else None
    given = Path(model.path if model else trained_model)
    files = [given, given.with_suffix(".bin")] if given.suffix == ".xml" else [given]  # OpenVINO's weights too
    check_not_an_input(output, {"trained model": files, "dataset": rows.given})
    model = open_model(model or trained_model)
    labels = model.labels
    if top_k is not None:
        check_range("top_k", top_k, low=1, high=len(labels),
                    hint=f"pass {option('top_k')} from 1 to {len(labels)}, the number of labels")
    dev = device_for(device, engine, model)
    world = join_world(dev)
    try:
        with world.speaking_for_the_others():
            world.on_main(lambda: check_output_writable(Path(output), overwrite=overwrite))
            probabilities, scored = _probabilities(
                model, rows.paths, batch_size=batch_size, device=rank_device(dev, world), num_workers=num_workers,
                precision=precision, engine=engine, on_bad_image=on_bad_image, threads=threads, progress=progress,
                log=log if world.is_main else lambda message: None, world=world)
            return world.on_main(lambda: _write_scores(output, rows, model, probabilities, scored, top_k, overwrite))
    finally:
        leave_world(world)


def _write_scores(output: Path | str, rows: _Rows, model: ScoringModel, probabilities: np.ndarray,
                  scored: np.ndarray, top_k: int | None, overwrite: bool) -> ScoreResult:
    labels = model.labels
    if not scored.any():
        raise InvalidDatasetError(f"none of the {len(rows.paths):,} images could be decoded",
                                  "see the warnings above for each file's reason")
    order = np.argsort(-probabilities, axis=1, kind="stable")
    kept = np.flatnonzero(scored)
    columns: dict[str, list] = {}
    if rows.ids is not None:
        columns["id"] = [rows.ids[i] for i in kept]
    columns["image"] = [rows.names[i] for i in kept]
    if rows.originals is not None:
        columns[ORIGINAL_COLUMN] = [rows.originals[i] for i in kept]
    if rows.categories is not None:
        columns[LABEL_COLUMN] = [rows.categories[i] for i in kept]
    for j, label in enumerate(labels):
        columns[PROBABILITY_PREFIX + label] = probabilities[kept, j].tolist()
    columns[SCORED_LABEL] = [labels[order[i, 0]] for i in kept]
    for k in range(top_k or 0):
        columns[f"Top {k + 1} Label"] = [labels[order[i, k]] for i in kept]
        columns[f"Top {k + 1} Probability"] = [float(probabilities[i, order[i, k]]) for i in kept]
    probability_columns = {PROBABILITY_PREFIX + label for label in labels} | {
        name for name in columns if name.startswith("Top ") and name.endswith(" Probability")}
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        with open(tmp / SCORED_FILE, "w", newline="", encoding="utf-8", errors="backslashreplace") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            for values in zip(*columns.values(), strict=True):
                writer.writerow([f"{v:.6g}" if name in probability_columns else v
                                 for name, v in zip(columns, values, strict=True)])
        # The same table as the designer's Score Model writes it, so that its Evaluate Model reads ours.
        dataframe_directory.write(tmp, dataframe_directory.Table(
            columns,
            {dataframe_directory.TRUE_LABELS: LABEL_COLUMN} if rows.categories is not None else {},
            {**{PROBABILITY_PREFIX + label: PROBABILITY_PREFIX + label for label in labels},
             dataframe_directory.ASSIGNED_LABELS: SCORED_LABEL},
            {"csv": SCORED_FILE, "labels": list(labels), TRAINED_MODEL: str(model.path.resolve()),
             WEIGHTS_SHA256: file_sha256(model.identity), IMAGE_ROOT: str(rows.root.absolute())}))
    return ScoreResult(Path(output), int(scored.sum()), rows.categories is not None)


def predict(
    trained_model: TrainedModel | Path | str,
    images: Images,
    *,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int | None = 0,
    precision: str = "auto",
    engine: str | None = None,
    on_bad_image: str = "fail",
    threads: int | str | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> list[Prediction]:
    """Predict the label of images with a trained model, in Python.

    ``trained_model``: a trained model directory, or a model loaded once with ``load_trained_model``
    (faster for repeated calls; predicting moves its network to ``device``). ``images``: one image
    file, a list of them, glob patterns, a folder or an ImageDirectory. Returns one Prediction per
    image, in order::

        >>> [(p.image, p.label, round(p.probability, 2)) for p in predict("model", "cat.jpg")]
        [('cat.jpg', 'cat', 0.97)]

    An image that cannot be decoded raises BadImageError naming it (``on_bad_image="skip"``
    leaves it out instead). Images are decoded in this process unless ``num_workers`` is set.
    """
    _check_options(batch_size, num_workers, on_bad_image, precision, threads, engine)
    rows = _rows(images)
    model = open_model(trained_model)
    probabilities, scored = _probabilities(
        model, rows.paths, batch_size=batch_size, device=device_for(device, engine, model), num_workers=num_workers,
        precision=precision, engine=engine, on_bad_image=on_bad_image, threads=threads, progress=False, log=log)
    answers = []
    for i in np.flatnonzero(scored):
        best = int(probabilities[i].argmax())
        answers.append(Prediction(str(rows.paths[i]), model.labels[best], float(probabilities[i, best]),
                                  dict(zip(model.labels, map(float, probabilities[i]), strict=True))))
    return answers
