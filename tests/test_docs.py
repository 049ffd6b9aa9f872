"""What the README and docs/ show is what imgtrain does: its pipeline and Python examples run as written, and
every message they quote is the one imgtrain prints."""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import run_cli
from test_models import place_fake_imagenet_weights

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _block(text: str, heading: str, language: str) -> str:
    """The first ```language block under a heading."""
    section = text[text.index(f"\n{heading}\n"):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_the_readmes_pipeline_runs_as_written(tmp_path, labelled_folder, monkeypatch):
    """The six commands of "The pipeline", as written, on a folder called photos/ (ImageNet weights placed where
    the download would put them, since tests have no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # the CLI subprocesses inherit it
    place_fake_imagenet_weights("resnet18")
    (tmp_path / "photos").symlink_to(labelled_folder)
    said = {}
    for line in _block(README.read_text(), "## The pipeline", "sh").strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == "imgtrain", line
        r = subprocess.run([sys.executable, "-m", "imgtrain", *words[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr}"
        said[words[1]] = r
    assert "Found 36 images in 3 categories" in said["convert-to-image-directory"].stdout
    training = said["train-pytorch-model"]
    assert "Trained model written to" in training.stdout and "fine-tuning ImageNet weights" in training.stderr
    assert "image size 32" in training.stderr and training.stderr.count("val loss") == 5  # the designer's 5 epochs
    import torch

    assert f"device {'cuda' if torch.cuda.is_available() else 'cpu'}" in training.stderr  # it says what it uses
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and {"precision_micro", "precision_macro", "recall_micro", "recall_macro",
                                           "f1_micro", "f1_macro", "per_class", "confusion_matrix"} <= set(metrics)
    assert f"Accuracy {metrics['accuracy']:.2%}" in said["evaluate-model"].stdout
    # Scoring with the saved model agrees with the best epoch's validation accuracy.
    with open(tmp_path / "model" / "metrics.csv") as f:
        best = min(csv.DictReader(f), key=lambda row: float(row["validation_loss"]))
    assert metrics["accuracy"] == float(best["validation_top1_accuracy"])


def test_the_readmes_python_example_runs_as_written(tmp_path, labelled_folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    place_fake_imagenet_weights("resnet18")
    (tmp_path / "photos").symlink_to(labelled_folder)
    monkeypatch.chdir(tmp_path)
    code = _block(README.read_text(), "## The pipeline", "python")
    space: dict = {}
    exec(compile(code, "README.md", "exec"), space)  # noqa: S102 (the README's own example)
    assert space["result"].history and space["metrics"]["num_images"] == 4
    assert (tmp_path / "evaluation" / "report.html").is_file()


def test_the_readmes_export_example_runs_as_written(tmp_path, trained_model, monkeypatch, capsys):
    """"Export to ONNX, OpenVINO or torch.export": its three commands, then its Python, which needs neither
    imgtrain nor its code: its answers are the model's."""
    from conftest import make_image

    (tmp_path / "demo-output").mkdir()
    (tmp_path / "demo-output" / "trained-model").symlink_to(trained_model)
    lines = _block(README.read_text(), "### Export to ONNX, OpenVINO or torch.export", "sh").strip().splitlines()
    commands = [shlex.split(line, comments=True)[1:] for line in lines]
    assert all(shlex.split(line)[0] == "imgtrain" for line in lines), lines
    # each command as `imgtrain` runs it (its main()), one after another in one process: torch starts once
    script = "import sys, json\nfrom imgtrain.cli import main\nfor argv in json.loads(sys.argv[1]):\n" \
             "    code = main(argv)\n    if code:\n        sys.exit(code)\n"
    r = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{lines}\n{r.stderr}"
    assert {p.name for p in tmp_path.iterdir()} >= {"exported", "exported2", "exported3"}
    import numpy as np

    make_image(tmp_path / "digit.png", 40, np.random.default_rng(0))
    monkeypatch.chdir(tmp_path)
    code = _block(README.read_text(), "### Export to ONNX, OpenVINO or torch.export", "python")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own example)
    from imgtrain import predict

    expected = predict(trained_model, tmp_path / "digit.png", precision="fp32")[0].label
    assert capsys.readouterr().out.split() == [expected, expected]


# Every message the docs quote (`SomeError: ...`, `error: ...`, `warning: ...`), with a line imgtrain really
# prints in that case. In a quote, `...`, `<x>` and upper-case placeholders (N, E, B, S, MODEL) stand for any text.
# The cases that are quick to make are made and run here; the others name the test that asserts the printed line.
QUOTED = {
    "CheckpointMismatchError: ... made with other parameters: --learning-rate 0.001 then, --learning-rate 0.01 now":
        ("CheckpointMismatchError: the checkpoint in m was made with other parameters: --learning-rate 0.001 then, "
         "--learning-rate 0.01 now", "test_reliability.py::test_resume_refuses_other_data_or_parameters"),
    "CheckpointMismatchError: a finished run of ... waits in ... to be moved into place, made with other parameters: "
    "--lr-schedule linear then, --lr-schedule cosine now":
        ("CheckpointMismatchError: a finished run of m waits in .imgtrain-resume-m to be moved into place, made with "
         "other parameters: --lr-schedule linear then, --lr-schedule cosine now",
         "test_reliability.py::test_resume_keeps_a_finished_run_of_other_parameters_that_waits_to_be_moved_into_place"),
    "CheckpointMismatchError: ... was made by 2 process(es); this run has 4":
        ("CheckpointMismatchError: the checkpoint in m was made by 2 process(es); this run has 4",
         "test_distributed.py::test_resuming_with_another_number_of_processes_names_both"),
    "DistributedRunError: another process of this run stopped":
        ("DistributedRunError: another process of this run stopped or cannot be reached (Connection closed by peer)",
         "test_distributed.py::test_a_bad_image_in_one_rank_stops_every_rank_with_its_name"),
    "DistributedRunError: another process of this run stopped ...":
        ("DistributedRunError: another process of this run stopped or cannot be reached (Connection closed by peer)",
         "test_distributed.py::test_a_bad_image_in_one_rank_stops_every_rank_with_its_name"),
    "InvalidDatasetError: S was scored by another model (/path/of/it), not MODEL":
        ("InvalidDatasetError: scored was scored by another model (/path/of/it), not model",
         "test_designer_models.py::test_a_report_of_a_designer_model_and_of_a_data_set_another_model_scored"),
    "InvalidDatasetError: junk.tar.gz is not a valid tar archive (neither gzip, bzip2 nor xz compressed, nor a plain "
    "tar)": ("convert", "junk.tar.gz", "--output", "out"),
    "InvalidModelDirectoryError: ... cannot be read (a named pipe, not a regular file)":
        ("InvalidModelDirectoryError: m/model_spec.yaml cannot be read (a named pipe, not a regular file)",
         "test_inputs_are_safe.py::test_directories_with_special_files_get_named_errors"),
    "InvalidPipelineError: p.yaml:22: step 'train': ...": ("pipeline", "show", "p.yaml"),
    "MissingDependencyError: --mlflow needs the mlflow package, which is not installed":
        ("MissingDependencyError: --mlflow needs the mlflow package, which is not installed. install it with "
         "`pip install 'imgtrain[mlflow]'`", "test_tracking.py::test_a_missing_extra_is_one_line_before_any_work"),
    "InvalidParameterError: --epochs 2.9 is not a whole number":
        ("InvalidParameterError: --epochs 2.9 is not a whole number",
         "test_ui.py::test_what_an_outside_review_found_stays_fixed"),
    "NotInRangeValueError: parameter --image-size is 16, ...":
        ("NotInRangeValueError: parameter --image-size is 16, allowed: [32, 4,096]. pass an image size from 32 "
         "(DenseNet and ResNet shrink images 32-fold) to 4096",
         "test_ui.py::test_bad_input_through_the_page_is_one_line_next_to_its_control"),
    "NotInRangeValueError: parameter --batch-size is 50, allowed: [2, 3]. ...":
        ("NotInRangeValueError: parameter --batch-size is 50, allowed: [2, 3]. pass a batch size from 2 (BatchNorm "
         "needs two images a batch) to 3, the number of training images",
         "test_ui.py::test_bad_input_through_the_page_is_one_line_next_to_its_control"),
    "OSError: [Errno 28] No space left on device ... no output was written; free space on that disk, or write the "
    "output to another one":
        ("OSError: [Errno 28] No space left on device: 'disk/out/x.png'. no output was written; free space on "
         "that disk, or write the output to another one",
         "test_reliability.py::test_a_full_disk_while_converting_is_not_called_a_bad_archive"),
    "OSError: [Errno 28] No space left on device: '<file>'. no output was written; free space on that disk, then "
    "re-run with --resume to continue from the last epoch":
        ("OSError: [Errno 28] No space left on device: 'disk/.imgtrain-resume-m/checkpoint.safetensors'. no output "
         "was written; free space on that disk, then re-run with --resume to continue from the last epoch",
         "test_reliability.py::test_a_full_disk_keeps_the_last_checkpoint_and_resume_finishes"),
    "OutOfMemoryError: the cpu ran out of memory at batch size N and image size S. pass a smaller --batch-size (or "
    "--image-size)":
        ("OutOfMemoryError: the cpu ran out of memory at batch size 27 and image size 1536. pass a smaller "
         "--batch-size (or --image-size)", "test_reliability.py::test_out_of_memory_gets_a_clear_error"),
    "OutputNotWritableError: the output photos-in is the pipeline input 'photos' photos-in: writing it would destroy "
    "that input": ("pipeline", "run", "p.yaml", "--output", "photos-in", "--overwrite"),
    "OutputNotWritableError: the output val is the validation data val: writing it would destroy that input":
        ("train", "--untrained-model", "untrained", "--training-data", "train", "--validation-data", "val",
         "--output", "val"),
    "TrainingDivergedError: the training loss became nan in epoch 1, batch 1. train again with a lower "
    "--learning-rate than 0.001":
        ("TrainingDivergedError: the training loss became nan in epoch 1, batch 1. train again with a lower "
         "--learning-rate than 0.001", "test_reliability.py::test_nan_loss_stops_with_a_clear_error"),
    "error: terminated (SIGTERM); no output was written (re-run with --resume to continue from the last epoch)":
        ("error: terminated (SIGTERM); no output was written (re-run with --resume to continue from the last epoch)",
         "test_tracking.py::test_sigterm_says_how_to_resume_and_the_resumed_run_goes_on_with_the_killed_mlflow_run"),
    "warning: 1 of the 3 classes have no images in the training data train (bright): the model learns never to "
    "answer them; give them training images, or leave them out of the data":
        ("warning: 1 of the 3 classes have no images in the training data train (bright): the model learns never to "
         "answer them; give them training images, or leave them out of the data",
         "test_imbalance.py::test_a_class_without_training_images_is_a_warning_naming_it"),
    "classes (training/validation images): cat 900/100, dog 45/5; imbalance 20:1":
        ("classes (training/validation images): cat 900/100, dog 45/5; imbalance 20:1",
         "test_imbalance.py::test_balancing_beats_the_raw_counts_on_macro_recall"),
    "cannot be read: a named pipe, not a regular file":
        ("cannot be read: a named pipe, not a regular file",
         "test_inputs_are_safe.py::test_convert_leaves_special_files_out_with_their_reason"),
    "make a transformation that leaves 64 x 64 images instead (this one's CenterCrop makes 40 x 40): "
    "init-image-transformation with --crop-size 64 and --size 64, its other parameters as before":
        ("make a transformation that leaves 64 x 64 images instead (this one's CenterCrop makes 40 x 40): "
         "init-image-transformation with --crop-size 64 and --size 64, its other parameters as before",
         "test_zoo.py::test_a_size_hint_under_a_transformation_is_one_the_user_can_follow"),
    "a JPEG of over 256 scans (N start-of-scan markers): decoding passes over the whole picture for each (a "
    "progressive JPEG has about 10)":
        ("a JPEG of over 256 scans (310 start-of-scan markers): decoding passes over the whole picture for each (a "
         "progressive JPEG has about 10)",
         "test_reliability.py::test_a_jpeg_of_endless_scans_or_markers_is_refused_before_decoding"),
    "not an image imgtrain reads: TGA (it reads ...)":
        ("not an image imgtrain reads: TGA (it reads JPEG, PNG, PPM/PGM, BMP, TIFF and WebP)",
         "test_reliability.py::test_files_that_are_not_what_imgtrain_reads_are_named_as_what_they_are"),
    "this one leaves 40 x 40: its CenterCrop makes 30 x 30, its Pad adds 10":
        ("make a transformation that leaves 48 x 48 images instead (this one leaves 40 x 40: its CenterCrop makes "
         "30 x 30, its Pad adds 10): init-image-transformation with --crop-size 38 and --size 38, its other "
         "parameters as before", "test_transformation.py::test_a_size_hint_names_what_each_operation_makes"),
    "not an image imgtrain reads: EPS (it reads ...)":
        ("not an image imgtrain reads: EPS (it reads JPEG, PNG, PPM/PGM, BMP, TIFF and WebP)",
         "test_reliability.py::test_only_the_designers_formats_reach_a_decoder"),
    "outputs is 5: it must be a list":
        ("outputs is 5: it must be a list",
         "test_deploy.py::_malformed"),  # the cases of test_malformed_inference_requests_are_refused_before_...
    "over the pixel limit: N pixels > 89,478,485 (a decompression bomb?)":
        ("convert", "bomb", "--output", "out", "--on-bad-image", "fail"),
    "p.yaml:N: the output name '../../escaped-outside' is not a plain name": ("pipeline", "show", "escaped/p.yaml"),
    "the checkpoint has trained all 2 epochs of --epochs 2: nothing is left to train, and the model is written from "
    "the best of them":
        ("the checkpoint has trained all 2 epochs of --epochs 2: nothing is left to train, and the model is written "
         "from the best of them", "test_reliability.py::test_resume_with_more_epochs_trains_on"),
    "too large to decode: W x H pixels in mode M take N MB to decode, over the limit of 1,024 MB":
        ("too large to decode: 1000 x 1000 pixels in mode RGBA take 12 MB to decode, over the limit of 1,024 MB",
         "test_reliability.py::test_a_decode_that_would_hold_too_much_memory_is_refused"),
    "error: <Name>: <what is wrong>. <how to fix it>": ("convert", "no-such-folder", "--output", "out"),
    "error: rank N: BadImageError: cannot decode image ...":
        ("error: rank 1: BadImageError: cannot decode image train/bad.png (truncated)",
         "test_distributed.py::test_a_bad_image_in_one_rank_stops_every_rank_with_its_name"),
}
_QUOTE = re.compile(r"`((?:[A-Z][A-Za-z]*Error|error|warning): [^`]+)`")
_MESSAGE = re.compile(r"`([a-z][^`]*?: (?![${])[^`]*? [^`]{6,})`")  # a message's words, not a YAML key's value


def _quotes(text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # quotes in the prose, not code blocks
    return {" ".join(q.split()) for pattern in (_QUOTE, _MESSAGE) for q in pattern.findall(text)}


def _source_of(test: str) -> str:
    """A test's source, with string literals that continue on the next line joined into one."""
    file, name = test.split("::")
    text = (ROOT / "tests" / file).read_text()
    start = text.index(f"def {name}(")
    end = text.find("\ndef ", start + 1)
    return re.sub(r"""["']\s*\\?\n\s*f?["']""", "", text[start:end if end > 0 else None])


def _pattern(quote: str) -> re.Pattern:
    parts = re.split(r"(\s?\.\.\.\s?|<[^>]+>|\b(?:[A-Z]|MODEL)\b)", quote)
    return re.compile("".join(".*" if i % 2 else re.escape(p) for i, p in enumerate(parts)))


def test_every_quoted_message_is_known_and_matches_a_printed_line():
    found = set().union(*(_quotes(doc.read_text()) for doc in DOCS))
    assert found - set(QUOTED) == set(), "a quote the docs added or changed: add it here with a line imgtrain prints"
    assert set(QUOTED) - found == set(), "a quote no longer in the docs: remove it here"
    for quote, case in QUOTED.items():
        if isinstance(case[-1], str) and "::" in case[-1]:  # a printed line, and the test that asserts it
            printed, test = case
            assert _pattern(quote).search(printed), (quote, printed)
            # the line registered here is the one that test asserts: a long stretch of it stands in its source
            source = _source_of(test)
            match = difflib.SequenceMatcher(None, printed, source, autojunk=False).find_longest_match()
            assert match.size >= min(len(printed), 25), (quote, test, printed[match.a:match.a + match.size])


def test_the_quoted_messages_that_are_quick_to_make_are_printed(tmp_path, image_dirs):
    """Each quote whose case is quick to make: made here, and the quote found in what imgtrain prints."""
    from conftest import make_labelled_folder

    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    make_labelled_folder(tmp_path / "photos-in", per_class=2)
    example = (ROOT / "examples" / "pipeline.yaml").read_text().replace("digits", "photos")
    (tmp_path / "p.yaml").write_text(example.replace("path: ../demo-output/mnist-images", "path: photos-in")
                                     .replace("epochs: 5", "epochs: five"))
    for name in ("untrained", "train", "val"):
        os.symlink(image_dirs[name], tmp_path / name)
    (tmp_path / "escaped").mkdir()
    (tmp_path / "escaped" / "p.yaml").write_text(example.replace("  evaluation: ", "  ../../escaped-outside: "))
    # a PNG whose header says 10,000 x 9,000 pixels, in 65 bytes: refused before anything is decoded
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (tmp_path / "bomb" / "a").mkdir(parents=True)
    (tmp_path / "bomb" / "a" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", 10_000, 9_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    for quote, case in QUOTED.items():
        if "::" in case[-1]:
            continue
        if case[:2] == ("pipeline", "run"):  # a file that reads: the output check comes before any step
            (tmp_path / "p.yaml").write_text(example.replace("path: ../demo-output/mnist-images", "path: photos-in"))
        r = subprocess.run([sys.executable, "-m", "imgtrain", *case], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, (case, r.stderr)
        assert _pattern(quote).search(r.stderr), (quote, r.stderr)


@pytest.mark.parametrize("flag", ["--help"])
def test_the_cli_help_names_every_module_the_readme_lists(flag):
    listed = set(re.findall(r"^\| `([a-z-]+) ", README.read_text(), re.M))
    shown = run_cli(flag).stdout
    assert listed and all(name in shown for name in listed), listed
