"""The whole pipeline through the CLI, in subprocesses, as a user runs it."""

from __future__ import annotations

import csv
import json

import torch

from conftest import run_cli
from test_models import place_fake_imagenet_weights


def test_cli_pipeline_end_to_end(tmp_path, labelled_folder):
    o = tmp_path
    r = run_cli("convert-to-image-directory", labelled_folder, "--output", o / "all")
    assert "Found 36 images in 3 categories" in r.stdout
    run_cli("split-image-directory", o / "all", "--fraction", "0.75", "--output-a", o / "train",
            "--output-b", o / "val")
    run_cli("resnet", "--model-name", "resnet18", "--no-pretrained", "--output", o / "untrained")
    r = run_cli("train-pytorch-model", "--untrained-model", o / "untrained", "--training-data", o / "train",
                "--validation-data", o / "val", "--output", o / "model", "--epochs", "3", "--batch-size", "8")
    assert "Trained model written to" in r.stdout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert "image size 32" in r.stderr and f"device {device}" in r.stderr  # it says what it uses
    assert r.stderr.count("val loss") == 3
    run_cli("score-image-model", "--trained-model", o / "model", "--dataset", o / "val", "--output", o / "scored")
    r = run_cli("evaluate-model", "--scored-dataset", o / "scored", "--output", o / "eval")
    metrics = json.loads((o / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 9 and metrics["accuracy"] >= 8 / 9
    assert {"precision_micro", "precision_macro", "recall_micro", "recall_macro", "f1_micro", "f1_macro",
            "per_class", "confusion_matrix"} <= set(metrics)
    assert f"Accuracy {metrics['accuracy']:.2%}" in r.stdout
    # Scoring with the saved model agrees with the best epoch's validation accuracy.
    with open(o / "model" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best = min(rows, key=lambda row: float(row["validation_loss"]))
    assert metrics["accuracy"] == float(best["validation_top1_accuracy"])


def test_fine_tuning_a_pretrained_densenet(tmp_path, image_dirs, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # the CLI subprocesses inherit it
    place_fake_imagenet_weights("densenet121")
    run_cli("densenet", "--model-name", "densenet121", "--output", tmp_path / "untrained")
    r = run_cli("train-pytorch-model", "--untrained-model", tmp_path / "untrained", "--training-data",
                image_dirs["train"], "--validation-data", image_dirs["val"], "--output", tmp_path / "model",
                "--epochs", "1", "--batch-size", "9")
    assert "fine-tuning ImageNet weights" in r.stderr


def test_help_lists_modules_and_shows_defaults():
    r = run_cli("--help")
    for name in ["convert-to-image-directory", "split-image-directory", "densenet", "resnet",
                 "train-pytorch-model", "score-image-model", "evaluate-model"]:
        assert name in r.stdout
    r = run_cli("train-pytorch-model", "--help")
    for text in ["--epochs EPOCHS", "(default: 5)", "(default: 16)", "(default: 0.001)", "(default: 1)",
                 "(default: 3)"]:
        assert text in r.stdout
    assert "(default: resnext101_32x8d)" in " ".join(run_cli("resnet", "--help").stdout.split())
    assert "(default: densenet201)" in " ".join(run_cli("densenet", "--help").stdout.split())
