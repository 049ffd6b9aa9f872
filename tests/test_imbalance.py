"""Class imbalance: --class-weights and --sampler, what they do, what a run records, and that they help."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import run_cli
from imgtrain import (
    convert_to_image_directory,
    evaluate_model,
    load_trained_model,
    resnet,
    score_image_model,
    train_pytorch_model,
)
from imgtrain.data.dataset import ImageDataset, SeededSampler
from imgtrain.data.transforms import Normalize, memory_format
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.training.balance import balanced_weights, describe
from imgtrain.training.loop import evaluate


def test_balanced_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 50 + [1] * 5 + [2] * 20)
    counts = np.bincount(labels)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert np.allclose(balanced_weights(counts), expected)
    assert balanced_weights(np.array([10, 0, 5]))[1] == 1.0  # a class with no training image


def test_the_counts_read_as_people_write_them():
    labels = [f"c{i}" for i in range(20)]
    counts = np.array([0] + [3] + [4000] * 18)
    assert describe(labels, counts, counts) == ("20 classes: from 3 training images (c1) to 4,000 (c2), 1 with "
                                                "none; imbalance 1,333:1")


def test_balanced_sampler_draws_every_class_equally_and_is_seeded():
    labels = np.array([0] * 1000 + [1] * 100 + [2] * 10 + [3] * 0)  # 100:10:1, and an empty class
    draw = SeededSampler(len(labels), 7, shuffle=True, balance_labels=labels)
    draw.set_epoch(1)
    first = [i for i, _ in draw]
    assert len(first) == len(labels)
    per_class = Counter(int(labels[i]) for i in first)
    assert set(per_class) == {0, 1, 2}
    assert all(abs(n - len(labels) / 3) < 0.1 * len(labels) / 3 for n in per_class.values()), per_class
    assert len({i for i in first if labels[i] == 2}) == 10  # the 10 small-class images, each many times over
    assert [i for i, _ in draw] == first  # the same seed and epoch: the same draw
    draw.set_epoch(2)
    assert [i for i, _ in draw] != first
    # shared out over two processes: equal halves of the same draw
    halves = []
    for rank in range(2):
        share = SeededSampler(len(labels), 7, shuffle=True, rank=rank, ranks=2, balance_labels=labels)
        share.set_epoch(1)
        halves.append([i for i, _ in share])
    assert halves[0] == first[0::2] and halves[1] == first[1::2]


def test_a_class_without_training_images_is_a_warning_naming_it(tmp_path, image_dirs):
    """A split can leave a small class's only images in the validation data: the run said "imbalance 1:1"
    (the classes it has images of) and trained a model that never answers that class."""
    from imgtrain.directories.image_directory import write_image_directory_files

    class Said(Exception):
        pass

    train = ImageDirectory.load(image_dirs["train"])
    root = tmp_path / "train"
    kept = [i for i in range(len(train)) if train.categories[train.labels[i]] != "bright"]
    for i in kept:
        (root / train.files[i]).parent.mkdir(parents=True, exist_ok=True)
        (root / train.files[i]).write_bytes(train.path(i).read_bytes())
    write_image_directory_files(root, [train.files[i] for i in kept], train.categories,
                                [train.labels[i] for i in kept], ids=[train.ids[i] for i in kept])
    said: list[str] = []

    def log(message: str) -> None:
        said.append(message)
        if message.startswith("warning"):
            raise Said

    with pytest.raises(Said):
        train_pytorch_model(image_dirs["untrained"], root, image_dirs["val"], tmp_path / "m", epochs=1, batch_size=8,
                            image_size=32, num_workers=0, log=log)
    assert said[-1] == (f"warning: 1 of the 3 classes have no images in the training data {root} (bright): the "
                        "model learns never to answer them; give them training images, or leave them out of the data")
    assert "bright 0/" in said[-2]


def _grey(path: Path, level: float, rng: np.random.Generator) -> None:
    pixels = np.clip(rng.normal(level, 12, size=(24, 24, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> dict[str, Path]:
    """Two overlapping classes of grey images (each image's brightness drawn around its class's),
    20:1 in the training data and 1:1 in the validation data: trained on the raw counts, a model
    leans towards the large class and misses most of the small one."""
    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(3)
    for split, counts in {"train": {"large": 200, "small": 10}, "val": {"large": 40, "small": 40}}.items():
        for name, n in counts.items():
            for k in range(n):
                _grey(root / f"{split}-src" / name / f"{k:03d}.png", rng.normal({"large": 110, "small": 146}[name],
                                                                                 20), rng)
        convert_to_image_directory(root / f"{split}-src", root / split, log=lambda m: None)
    resnet(root / "untrained", model_name="resnet18", pretrained=False)
    return {"train": root / "train", "val": root / "val", "untrained": root / "untrained", "root": root}


def _macro_recall(d: dict[str, Path], name: str, **choice) -> tuple[float, list[str]]:
    lines: list[str] = []
    model = d["root"] / name
    train_pytorch_model(d["untrained"], d["train"], d["val"], model, epochs=3, batch_size=16, image_size=32,
                        num_workers=0, device="cpu", log=lines.append, **choice)  # re-evaluated on the CPU below
    score_image_model(model, d["val"], d["root"] / f"{name}-scored", log=lambda m: None)
    metrics = evaluate_model(d["root"] / f"{name}-scored", d["root"] / f"{name}-evaluation", log=lambda m: None)
    return metrics["recall_macro"], lines


def test_balancing_beats_the_raw_counts_on_macro_recall(imbalanced):
    raw, said = _macro_recall(imbalanced, "none")
    weighted, said_weighted = _macro_recall(imbalanced, "weights", class_weights="balanced")
    sampled, _ = _macro_recall(imbalanced, "sampler", sampler="balanced")
    print(f"macro recall: none {raw:.3f}, --class-weights balanced {weighted:.3f}, --sampler balanced {sampled:.3f}")
    assert weighted > raw + 0.1 and sampled > raw + 0.1, (raw, weighted, sampled)  # measured: 0.50, 0.75, 0.69
    # the start of the run shows the counts and the choice, and suggests balancing when it is off
    assert any("classes (training/validation images): large 200/40, small 10/40; imbalance 20:1" in line
               for line in said), said
    assert any(line.startswith("note: the largest class has 20 times") for line in said), said
    assert not any(line.startswith("note:") for line in said_weighted)
    trained = load_trained_model(imbalanced["root"] / "weights")
    spec = trained.spec
    assert spec.training["class_weights"] == "balanced" and spec.training["sampler"] == "uniform"
    # The validation loss is evened out by the validation data's own counts: on this 1:1 set every weight
    # is 1, so the best epoch's recorded loss is the plain loss of the saved weights.
    val = ImageDirectory.load(imbalanced["val"])
    loader = DataLoader(ImageDataset([val.path(i) for i in range(len(val))], val.labels, 32), batch_size=16)
    cpu = torch.device("cpu")
    normalize = Normalize(spec.input.mean, spec.input.std, memory_format(cpu, 32))  # in training's layout
    plain = evaluate(trained.network, loader, normalize, cpu,
                     precision=spec.training["precision"]).loss  # as training evaluated it (bf16 where native)
    assert plain == pytest.approx(spec.training["best_validation_loss"], rel=1e-4)
    assert spec.training["class_counts"] == {"large": {"training": 200, "validation": 40},
                                             "small": {"training": 10, "validation": 40}}


def test_both_at_once_warns_and_a_wrong_choice_is_named(imbalanced, tmp_path):
    d = imbalanced
    r = run_cli("train", "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data",
                d["val"], "--output", tmp_path / "m", "--sampler", "balance", check=False)
    assert r.returncode == 2 and "invalid choice: 'balance'" in r.stderr and "did you mean balanced?" in r.stderr
    lines: list[str] = []
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "both", epochs=1, batch_size=16,
                        image_size=32, num_workers=0, class_weights="balanced", sampler="balanced", log=lines.append)
    assert any(line.startswith("warning: class_weights='balanced' and sampler='balanced' both even out")
               for line in lines), lines
    assert torch.isfinite(torch.tensor(load_trained_model(tmp_path / "both").spec.training["best_validation_loss"]))
