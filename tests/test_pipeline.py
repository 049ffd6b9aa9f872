"""Modules through the CLI, in subprocesses, as a user runs them (the README's whole pipeline: test_docs.py)."""

from __future__ import annotations

from conftest import run_cli
from test_models import place_fake_imagenet_weights


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
