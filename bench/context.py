"""What the sections share: the configuration, the prepared data and models, and earlier sections' results."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import fixtures
from measure import REPO, Run, med, run_measured

BENCH = Path(__file__).resolve().parent
TTA_PEERS = ("timm", "ultralytics", "fastai")  # the `tta` section's peers (bench/tta_peers.py), --peers' names


@dataclass(frozen=True)
class Case:
    """One training configuration compared between imgtrain and the baseline."""

    model: str  # imgtrain architecture name, which is also the torchvision builder's name
    image_size: int
    data: str  # "mnist" (28x28 grey PNG digits) or "photos" (400x300 RGB JPEG)
    train_images: int
    val_images: int

    def __post_init__(self) -> None:
        k = self.num_classes
        if self.train_images % k or self.val_images % k or self.train_images < 16:
            raise ValueError(f"{self.name}: the training and validation counts must be multiples of the {k} "
                             "classes (so that the stratified split is exact), with at least 16 training images")

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.image_size} px"

    @property
    def slug(self) -> str:
        return f"{self.model}-{self.image_size}"

    @property
    def family(self) -> str:
        return "densenet" if self.model.startswith("densenet") else "resnet"

    @property
    def num_classes(self) -> int:
        return 10 if self.data == "mnist" else len(fixtures.PHOTO_CLASSES)


@dataclass
class Config:
    quick: bool
    reps: int  # repetitions of every timed command (the tables give the median)
    epochs: int  # epochs of every throughput training run
    cases: tuple[Case, ...]
    compute_steps: int  # timed steps of the compute-only loop (224 px cases use a third)
    matmul_reps: int
    datawait_batches: int  # at most this many batches of one epoch in the instrumented loop
    score_images: int
    convert_images: int
    parity_images: int  # MNIST digits for the fp32/bf16 comparison (5,000 = all)
    parity_epochs: int
    imgtrain_recipe: str  # "designer": imgtrain with SGD and no augmentation, the baseline's work; "defaults"
    imgtrain_extra: tuple[str, ...] = ()  # more train-pytorch-model arguments for the throughput runs
    parity_seeds: tuple[int, ...] = (1,)  # training seeds of the fp32/bf16 comparison (one run each)
    compare_with: str | None = None  # a git revision whose code the start-up, shared-CPU and serve sections also run
    peers: tuple[str, ...] = TTA_PEERS  # the peers the `tta` section runs (those available)
    timm_train_py: Path | None = None  # timm's train.py (not in its wheel), else the cache's or downloaded

    @classmethod
    def full(cls) -> Config:
        """About 20 minutes on an otherwise idle 2-core CPU (AVX-512), plus about a minute the first time,
        to generate the images."""
        return cls(quick=False, reps=3, epochs=2, cases=(
            Case("resnet18", 64, "mnist", 1600, 400),
            Case("resnet18", 224, "photos", 200, 50),
            Case("densenet121", 64, "mnist", 800, 200),
        ), compute_steps=6, matmul_reps=7, datawait_batches=30, score_images=2000, convert_images=100_000,
            parity_images=5000, parity_epochs=5, imgtrain_recipe="designer", parity_seeds=(1, 2, 3))

    @classmethod
    def smoke(cls) -> Config:
        """A smoke test of every code path: a couple of minutes, numbers not meaningful."""
        return cls(quick=True, reps=1, epochs=1, cases=(
            Case("resnet18", 64, "mnist", 40, 20),
            Case("resnet18", 224, "photos", 20, 10),
            Case("densenet121", 64, "mnist", 20, 10),
        ), compute_steps=2, matmul_reps=3, datawait_batches=3, score_images=64, convert_images=2000,
            parity_images=300, parity_epochs=1, imgtrain_recipe="designer")

    def imgtrain_recipe_args(self) -> list[str]:
        if self.imgtrain_recipe == "designer":
            return ["--optimizer", "sgd", "--augmentation", "none", *self.imgtrain_extra]
        return list(self.imgtrain_extra)


@dataclass
class TrainCase:
    """Every repetition of one case, both sides."""

    case: Case
    imgtrain_runs: list[Run] = field(default_factory=list)
    imgtrain_metrics: list[list[dict]] = field(default_factory=list)  # metrics.csv of each repetition
    imgtrain_log: dict[str, str] = field(default_factory=dict)  # precision and workers, from its stderr
    baseline_runs: list[Run] = field(default_factory=list)
    baseline_epochs: list[list[dict]] = field(default_factory=list)
    last_model: Path | None = None

    def imgtrain_rates(self) -> list[float]:
        return [steady_rate(rows) for rows in self.imgtrain_metrics]

    def baseline_rates(self) -> list[float]:
        return [steady_rate(rows) for rows in self.baseline_epochs]

    def imgtrain_rate(self) -> float | None:
        return med(self.imgtrain_rates())

    def baseline_rate(self) -> float | None:
        return med(self.baseline_rates())


def steady_rate(epochs: list[dict]) -> float:
    """Training images/s once warm: the mean over epochs 2.. (epoch 1 pays start-up), or epoch 1 alone."""
    rates = [float(e["train_images_per_second"]) for e in epochs]
    return mean(rates[1:]) if len(rates) > 1 else rates[0]


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def parse_training_log(stderr: str) -> dict[str, str]:
    """What imgtrain's start-up line says about precision and data workers."""
    found = {}
    for key, pattern in (("precision", r"precision (\S+?),"), ("workers", r"(\d+) data workers")):
        match = re.search(pattern, stderr)
        found[key] = match.group(1) if match else "?"
    return found


class Context:
    def __init__(self, config: Config, cache: Path, work: Path) -> None:
        self.config, self.cache, self.work = config, cache, work
        self.python = sys.executable
        self.env = {**os.environ, "IMGTRAIN_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.train_results: dict[str, TrainCase] = {}
        self.memory: list[tuple[str, list[Run]]] = []  # (what, its runs), from every section
        self._directories: dict[str, tuple[Path, Path]] = {}
        self._untrained: dict[str, Path] = {}

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # --- commands ---------------------------------------------------------------------------------------

    def imgtrain(self, *args: object, check: bool = True) -> Run:
        return run_measured([self.python, "-m", "imgtrain", *map(str, args)], env=self.env, cwd=REPO, check=check)

    def script(self, name: str, *args: object) -> Run:
        return run_measured([self.python, str(BENCH / name), *map(str, args)], env=self.env, cwd=REPO)

    def train_imgtrain(self, case: Case, untrained: Path, train: Path, val: Path, output: Path,
                       *extra: object) -> tuple[Run, list[dict]]:
        epochs = self.config.epochs
        run = self.imgtrain(
            "train-pytorch-model", "--untrained-model", untrained, "--training-data", train,
            "--validation-data", val, "--output", output, "--overwrite", "--epochs", epochs,
            "--patience", epochs, "--image-size", case.image_size, "--batch-size", 16,
            *self.config.imgtrain_recipe_args(), *extra)
        return run, read_metrics(output / "metrics.csv")

    def train_baseline(self, case: Case, train: Path, val: Path, result_json: Path) -> tuple[Run, list[dict]]:
        run = self.script("baseline_train.py", "--training-data", train, "--validation-data", val,
                          "--model", case.model, "--image-size", case.image_size, "--epochs", self.config.epochs,
                          "--batch-size", 16, "--json", result_json)
        return run, json.loads(result_json.read_text())["epochs"]

    # --- data and models -------------------------------------------------------------------------------

    def image_directories(self, source: Path, name: str, train: int, val: int) -> tuple[Path, Path]:
        """Convert ``source`` and split it into training and validation ImageDirectories (stratified, seed 1)."""
        if name not in self._directories:
            root = self.work / "data" / name
            self.imgtrain("convert-to-image-directory", source, "--output", root / "all", "--overwrite")
            self.imgtrain("split-image-directory", root / "all", "--fraction", f"{train / (train + val):.6f}",
                          "--random-seed", 1, "--output-a", root / "train", "--output-b", root / "val",
                          "--overwrite")
            self._directories[name] = (root / "train", root / "val")
        return self._directories[name]

    def case_data(self, case: Case) -> tuple[Path, Path]:
        count = case.train_images + case.val_images
        if case.data == "mnist":
            source = fixtures.mnist_folder(self.cache, count)
        else:
            source = fixtures.photo_folder(self.cache, count)
        return self.image_directories(source, f"{case.data}-{case.train_images}-{case.val_images}",
                                      case.train_images, case.val_images)

    def untrained(self, model: str) -> Path:
        if model not in self._untrained:
            family = "densenet" if model.startswith("densenet") else "resnet"
            path = self.work / "untrained" / model
            self.imgtrain(family, "--model-name", model, "--no-pretrained", "--output", path, "--overwrite")
            self._untrained[model] = path
        return self._untrained[model]

    def scoring_model(self) -> tuple[Path, Case]:
        """A trained model for scoring: section 1's MNIST ResNet if it ran, else one trained for 1 epoch now."""
        mnist = [c for c in self.config.cases if c.data == "mnist"] or list(self.config.cases)
        case = next((c for c in mnist if c.family == "resnet"), mnist[0])
        trained = self.train_results.get(case.slug)
        if trained and trained.last_model:
            return trained.last_model, case
        train, val = self.case_data(case)
        output = self.work / "score" / "model"
        self.imgtrain("train-pytorch-model", "--untrained-model", self.untrained(case.model), "--training-data",
                      train, "--validation-data", val, "--output", output, "--overwrite", "--epochs", 1,
                      "--image-size", case.image_size)
        return output, case
