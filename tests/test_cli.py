"""The command line a new user types: exact flags, suggestions for mistakes, short names, and errors
that speak the language of where they were made (flags on the command line, arguments in Python)."""

from __future__ import annotations

import pytest

from conftest import run_cli
from imgtrain import convert_to_image_directory, resnet, train_pytorch_model
from imgtrain.errors import NotInRangeValueError, OutputExistsError, WeightsUnavailableError


def test_abbreviated_flags_are_refused_with_a_suggestion(image_dirs, tmp_path):
    d = image_dirs
    r = run_cli("train-pytorch-model", "--untrained-model", d["untrained"], "--training-data", d["train"],
                "--validation-data", d["val"], "--output", tmp_path / "m", "--epoch", "1", "--batchsize", "4",
                check=False)
    assert r.returncode == 2 and not (tmp_path / "m").exists()  # never silently taken as --epochs
    assert r.stderr.strip().splitlines()[-1] == (
        "imgtrain train-pytorch-model: error: unrecognized arguments: --epoch 1 --batchsize 4; "
        "did you mean --epochs or --batch-size?")


def test_a_mistyped_required_flag_is_named():
    r = run_cli("train", "--untrained-model", "u", "--training-data", "t", "--validation-data", "v", "--ouput", "m",
                check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "the following arguments are required: --output (you typed --ouput; did you mean --output?)")


@pytest.mark.parametrize("args, message", [
    (["trian"], "invalid choice: 'trian'"),
    (["resnet", "--model-name", "resnet19", "--output", "x"], "invalid choice: 'resnet19'"),
    (["train", "--precision", "bf61"], "invalid choice: 'bf61'"),
])
def test_mistyped_commands_and_choices_get_the_closest_one(args, message):
    r = run_cli(*args, check=False)
    closest = {"trian": "train", "resnet19": "resnet18", "bf61": "bf16"}[message.split("'")[1]]
    assert r.returncode == 2 and message in r.stderr and f"did you mean {closest}?" in r.stderr, r.stderr


def test_short_names(tmp_path, labelled_folder):
    r = run_cli("convert", labelled_folder, "--output", tmp_path / "all")
    assert "Found 36 images in 3 categories" in r.stdout
    run_cli("split", tmp_path / "all", "--output-a", tmp_path / "a", "--output-b", tmp_path / "b")
    assert "train-pytorch-model (train)" in run_cli("--help").stdout
    assert "--warmup-steps EPOCHS" in run_cli("train", "--help").stdout


def test_errors_speak_python_in_python_and_flags_on_the_command_line(tmp_path, image_dirs, monkeypatch,
                                                                     cli_in_process):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights there
    with pytest.raises(WeightsUnavailableError, match="or pass pretrained=False to train from scratch"):
        resnet(tmp_path / "r", model_name="resnet18")
    r = cli_in_process("resnet", "--model-name", "resnet18", "--output", tmp_path / "r")
    assert r.returncode == 1 and "or pass --no-pretrained to train from scratch" in r.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="pass overwrite=True to replace it"):
        convert_to_image_directory(image_dirs["train"], tmp_path / "taken", log=lambda m: None)
    r = run_cli("convert", image_dirs["train"], "--output", tmp_path / "taken", check=False)
    assert "pass --overwrite to replace it" in r.stderr
    with pytest.raises(NotInRangeValueError, match=r"parameter batch_size is 1, allowed: \[2, 27\]"):
        train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"], tmp_path / "m",
                            batch_size=1, log=lambda m: None)
    r = cli_in_process("train", "--untrained-model", image_dirs["untrained"], "--training-data", image_dirs["train"],
                       "--validation-data", image_dirs["val"], "--output", tmp_path / "m", "--batch-size", "1")
    assert r.returncode == 1
    assert "error: NotInRangeValueError: parameter --batch-size is 1, allowed: [2, 27]" in r.stderr


def test_resnet_help_says_the_default_is_large():
    text = " ".join(run_cli("resnet", "--help").stdout.split())
    assert "the designer's default resnext101_32x8d is a large network (89M parameters, 340 MB of pretrained" in text
    assert "--no-pretrained starts from random weights and needs no download" in text
