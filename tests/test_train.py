"""Train PyTorch Model: input checks, determinism, early stopping, the trained model directory."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_labelled_folder, run_cli
from imgtrain import convert_to_image_directory, load_trained_model, train_pytorch_model
from imgtrain.data.dataset import ImageDataset
from imgtrain.data.transforms import Normalize, memory_format
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.errors import (
    InvalidDatasetError,
    InvalidModelDirectoryError,
    InvalidParameterError,
    NotInRangeValueError,
    NotLabeledDatasetError,
    OutputExistsError,
)
from imgtrain.training.loop import evaluate

QUIET = {"log": lambda m: None}


def train(dirs, out, **kw):
    args = {"epochs": 2, "batch_size": 8, "image_size": 32, "num_workers": 0, **kw}
    return train_pytorch_model(dirs["untrained"], dirs["train"], dirs["val"], out, **args, **QUIET)


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    make_labelled_folder(root / "src", per_class=4, classes=("dark",))
    convert_to_image_directory(root / "src" / "dark", root / "dir", log=lambda m: None)
    return root / "dir"


def test_input_errors_name_the_problem(tmp_path, image_dirs, unlabeled):
    d = image_dirs
    with pytest.raises(InvalidModelDirectoryError, match="not a model directory"):
        train_pytorch_model(d["train"], d["train"], d["val"], tmp_path / "o", **QUIET)
    with pytest.raises(NotLabeledDatasetError, match="training data .* has no categories"):
        train_pytorch_model(d["untrained"], unlabeled, d["val"], tmp_path / "o", **QUIET)
    with pytest.raises(NotLabeledDatasetError, match="validation data"):
        train_pytorch_model(d["untrained"], d["train"], unlabeled, tmp_path / "o", **QUIET)
    other = make_labelled_folder(tmp_path / "other", per_class=2, classes=("dark", "mid"))
    (other / "dark").rename(other / "black")
    convert_to_image_directory(other, tmp_path / "other-dir", log=lambda m: None)
    with pytest.raises(InvalidDatasetError, match=r"missing: \['bright', 'dark'\]; extra: \['black'\]"):
        train_pytorch_model(d["untrained"], d["train"], tmp_path / "other-dir", tmp_path / "o", **QUIET)
    n = len(ImageDirectory.load(d["train"]))
    for name, value, allowed in [("epochs", 0, "[1, inf)"), ("batch_size", n + 1, f"[2, {n}]"),
                                 ("batch_size", 1, f"[2, {n}]"), ("learning_rate", 0.0, "(0, inf)"),
                                 ("patience", 0, "[1, inf)")]:
        with pytest.raises(NotInRangeValueError, match=rf"parameter {name} is .*allowed: {re.escape(allowed)}"):
            train(d, tmp_path / "o", **{name: value})
    with pytest.raises(InvalidParameterError, match="is not known" if torch.cuda.is_available() else "no CUDA GPU"):
        train(d, tmp_path / "o", device="cuda" if not torch.cuda.is_available() else "tpu")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        train(d, tmp_path / "taken")
    assert not (tmp_path / "o").exists()


def test_cli_errors_are_one_line(tmp_path, image_dirs, cli_in_process):
    d = image_dirs
    common = ["--training-data", d["train"], "--validation-data", d["val"], "--output", tmp_path / "o"]
    cases = [
        (["--untrained-model", d["train"], *common], "error: InvalidModelDirectoryError: "),
        (["--untrained-model", d["untrained"], *common, "--batch-size", "10000"],
         "error: NotInRangeValueError: parameter --batch-size is 10000, allowed: [2, 27]. pass a batch size from 2 "
         "(BatchNorm needs two images a batch) to 27, the number of training images"),
        (["--untrained-model", d["untrained"], *common, "--learning-rate", "nan"],
         "error: NotInRangeValueError: parameter --learning-rate is nan, allowed: a number"),
        (["--untrained-model", d["untrained"], *common, "--image-size", "16"],  # the line `imgtrain ui` shows too
         "error: NotInRangeValueError: parameter --image-size is 16, allowed: [32, 4,096]. pass an image size from 32 "
         "(DenseNet and ResNet shrink images 32-fold) to 4096"),
        (["--untrained-model", d["untrained"], *common, "--learning-rate", "-1"],
         "error: NotInRangeValueError: parameter --learning-rate is -1.0"),
    ]
    for n, (args, start) in enumerate(cases):  # the first in a process of its own, the others by its main() here
        command = ("train-pytorch-model", *args)
        r = run_cli(*command, check=False) if n == 0 else cli_in_process(*command)
        assert r.returncode == 1 and r.stderr.startswith(start), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_trained_directory_is_complete_and_self_describing(trained_model, image_dirs):
    files = sorted(p.name for p in trained_model.iterdir())
    assert files == ["_meta.yaml", "index_to_label.csv", "metrics.csv", "metrics.jsonl", "model.safetensors",
                     "model_spec.yaml", "report.html", "training_images.png"]
    spec = load_trained_model(trained_model).spec
    assert spec.labels == ["bright", "dark", "mid"] and spec.input.image_size == 32
    assert spec.input.mean == [0.485, 0.456, 0.406]
    assert spec.training["epochs"] == 3 and spec.training["batch_size"] == 8
    assert spec.versions["torch"] == torch.__version__.split("+")[0]  # as installed, without the local tag
    with open(trained_model / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "learning_rate", "train_images_per_second", "train_loss", "train_error",
                             "validation_loss", "validation_top1_accuracy", "validation_top5_accuracy",
                             "data_wait_fraction", "seconds"]
    assert len(rows) == spec.training["stopped_epoch"] == 3
    # the learning rate each epoch starts at: linear to zero at the last step (no warm-up by default)
    assert spec.training["lr_schedule"] == "linear"
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3], rel=1e-4)
    best = min(rows, key=lambda r: float(r["validation_loss"]))
    assert int(best["epoch"]) == spec.training["best_epoch"]
    assert float(best["validation_top1_accuracy"]) > 0.9  # shades of grey are easy
    assert all(r["validation_top5_accuracy"] == "" for r in rows)  # 3 classes: top-5 would say nothing
    assert (trained_model / "index_to_label.csv").read_text().splitlines() == [
        ",label", "0,bright", "1,dark", "2,mid"]  # the designer's header
    # metrics.jsonl: the same rows for scripts, one JSON object per epoch, numbers as numbers
    lines = (trained_model / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    assert [list(e) for e in epochs] == [list(rows[0])] * 3
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all(e["validation_top5_accuracy"] is None for e in epochs)
    assert [e["validation_loss"] for e in epochs] == [float(r["validation_loss"]) for r in rows]


def test_the_learning_rate_warms_up_then_falls_to_zero_in_a_line_or_a_cosine():
    from imgtrain.training.train import _warmup_decay

    linear, cosine = _warmup_decay(2, 12, "linear"), _warmup_decay(2, 12, "cosine")
    assert [linear(k) for k in range(3)] == [cosine(k) for k in range(3)] == [0.5, 1.0, 1.0]  # 2 warm-up steps
    assert [linear(k) for k in (2, 4, 7, 11, 12)] == pytest.approx([1.0, 0.8, 0.5, 0.1, 0.0])
    assert [cosine(k) for k in (2, 7, 12)] == pytest.approx([1.0, 0.5, 0.0])
    assert cosine(4) == pytest.approx(0.9045, abs=1e-4) and cosine(9) == pytest.approx(0.2061, abs=1e-4)


def test_same_seed_same_weights_with_workers(tmp_path, image_dirs):
    runs = [train(image_dirs, tmp_path / f"run{i}", random_seed=seed, num_workers=2)
            for i, seed in enumerate([7, 7 - 2**32, 8])]  # any integer, taken modulo 2**32
    weights = [(r.output / "model.safetensors").read_bytes() for r in runs]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_early_stopping_keeps_the_best_epoch(tmp_path, labelled_folder, image_dirs):
    # A validation set whose labels contradict the training set: validation loss rises as training learns.
    swapped = make_labelled_folder(tmp_path / "swapped", per_class=6, classes=("dark", "bright", "mid"),
                                   swap={"dark": "bright", "bright": "dark"})
    convert_to_image_directory(swapped, tmp_path / "val", log=lambda m: None)
    dirs = {**image_dirs, "val": tmp_path / "val"}
    result = train(dirs, tmp_path / "out", epochs=12, patience=2, device="cpu")  # re-evaluated on the CPU below
    assert result.stopped_epoch == result.best_epoch + 2 < 12
    losses = [m.validation_loss for m in result.history]
    assert len(losses) == result.stopped_epoch and min(losses) == losses[result.best_epoch - 1]
    spec = json.loads(json.dumps(load_trained_model(result.output).spec.training))
    assert (spec["best_epoch"], spec["stopped_epoch"]) == (result.best_epoch, result.stopped_epoch)
    # The saved weights are the best epoch's: they reproduce its validation loss.
    trained = load_trained_model(result.output)
    model, spec = trained.network, trained.spec
    val = ImageDirectory.load(tmp_path / "val")
    labels = torch.tensor([spec.labels.index(val.categories[i]) for i in val.labels]).numpy()
    loader = DataLoader(ImageDataset([val.path(i) for i in range(len(val))], labels, 32),
                        batch_size=8)
    loss = evaluate(model, loader, Normalize(spec.input.mean, spec.input.std, memory_format(torch.device("cpu"), 32)),
                    torch.device("cpu"),
                    spec.training["precision"]).loss
    assert loss == pytest.approx(losses[result.best_epoch - 1], rel=1e-4)
    assert loss < losses[-1]


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "model_spec.yaml").write_text("flavor: pytorch\nmodel_module: os\n"), "never imports or unpickles"),
    (lambda r: (r / "model_spec.yaml").write_text(
        (r / "model_spec.yaml").read_text().replace("architecture: resnet18", "architecture: evil")),
     "unknown architecture 'evil'"),
    (lambda r: (r / "model_spec.yaml").write_text(
        (r / "model_spec.yaml").read_text().replace("weights: model.safetensors", "weights: ../x.safetensors")),
     "must name a file inside"),
    (lambda r: (r / "model.safetensors").write_bytes(b"\x80\x04 pickle"), "cannot read weights"),
    (lambda r: (r / "model_spec.yaml").write_text(
        (r / "model_spec.yaml").read_text().replace("- mid\n", "- mid\n- extra\n")), "do not fit resnet18"),
    (lambda r: (r / "_meta.yaml").write_text(": :"), "not valid YAML"),
    (lambda r: (r / "model_spec.yaml").write_text(
        (r / "model_spec.yaml").read_text().replace("image_size: 32", "image_size: -3")), "image_size"),
    (lambda r: (r / "model_spec.yaml").write_text(
        (r / "model_spec.yaml").read_text().replace("format_version: 1", "format_version: 2")),
     r"has format version 2; this imgtrain reads versions 1 to 1. upgrade imgtrain"),
    (lambda r: (r / "model_spec.yaml").write_text(
        (r / "model_spec.yaml").read_text().replace("format_version: 1\n", "")), "has format version None"),
])
def test_hostile_model_directories_give_named_errors(tmp_path, trained_model, damage, message):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(trained_model, root)
    damage(root)
    with pytest.raises(InvalidModelDirectoryError, match=message):
        load_trained_model(root)


def _torch_settings() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)


def test_a_run_puts_back_the_torch_settings_it_changed(tmp_path, image_dirs):
    """Training asks for deterministic kernels, turns cuDNN's autotuner off and seeds the random generators:
    for the run only. Afterwards, finished or failed, the process has its own settings and random streams
    back (the Python API and pipelines run many things in one process)."""
    import random

    import numpy as np

    class Stop(Exception):
        pass

    def seed_mine() -> None:
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    def draws() -> tuple:
        return random.random(), float(np.random.random()), float(torch.rand(()))

    before = _torch_settings()
    seen: list[tuple] = []

    def log(message: str) -> None:
        if message.startswith("Training "):  # the model is built: the run's settings hold
            seen.append(_torch_settings())
            if len(seen) == 2:
                raise Stop

    try:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        seed_mine()
        expected = draws()
        for out in ("finished", "failed"):
            seed_mine()
            with pytest.raises(Stop) if out == "failed" else contextlib.nullcontext():
                train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"], tmp_path / out,
                                    epochs=1, batch_size=8, image_size=32, num_workers=0, log=log)
            assert seen[-1] == (True, True, False, True)  # during the run: deterministic
            assert _torch_settings() == (False, False, True, False), out  # after it: as they were
            assert draws() == expected, out
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]


def test_when_cublas_cannot_be_deterministic_it_is_said(monkeypatch):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when it first runs: a GPU run sets it before its own first use
    of the GPU, and says plainly, in every run it holds for, where that is too late (CUDA used before in the
    process) or the value is another. What counts is what was set when CUDA was not yet in use, not what is set
    now: a CPU run set it (so a later GPU run never warned), and a GPU run that warned set it for the next one
    to be silent. (No GPU here: CUDA in use is said, as torch.cuda.is_initialized() would say it.)"""
    from imgtrain import seeding

    def fresh_process(reads) -> None:  # the module's record, as imported with CUDA in use or not
        monkeypatch.setattr(seeding, "_cublas_reads", reads, raising=False)
        monkeypatch.setattr(seeding, "_set_here", None, raising=False)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "to be removed")  # put back as it was after the test
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")

    def warning(device: str, cuda_in_use: bool) -> str | None:
        return cublas_nondeterminism(device, cublas_setting(device, cuda_in_use), cuda_in_use)

    # A CPU run leaves it unset; the GPU used afterwards without it: the next GPU run says so.
    fresh_process(None)
    with seeding.torch_settings_restored("cpu", print):
        seeding.seed_everything(1)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    from imgtrain.seeding import cublas_nondeterminism, cublas_setting

    late = "CUDA was in use in this process before the run, without CUBLAS_WORKSPACE_CONFIG: "
    assert warning("cuda", True).startswith(late)
    # A notebook that used the GPU before imgtrain was imported: every GPU run says it, not the first alone.
    fresh_process(seeding._UNSEEN)
    assert warning("cuda", True).startswith(late) and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in warning("cuda", True)
    assert warning("cpu", True) is None
    # A GPU run before anything used the GPU sets it in time, for every run after it.
    fresh_process(None)
    assert warning("cuda", False) is None and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert warning("cuda", True) is None
    # Set by the user, after imgtrain was imported and before the GPU was used: that is what cuBLAS reads.
    fresh_process(None)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert warning("cuda", True) is None
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert warning("cuda", False).startswith(
        "CUBLAS_WORKSPACE_CONFIG is ':0:0', with which cuBLAS does not compute deterministically")
