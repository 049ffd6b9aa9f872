"""No module destroys its input, and no reader hangs on a file that is not a regular file.

Each test here is a row of docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image, run_cli
from imgtrain import (
    ImageDirectory,
    convert_to_image_directory,
    evaluate_model,
    score_image_model,
    split_image_directory,
    train_pytorch_model,
)
from imgtrain.errors import InvalidDatasetError, InvalidModelDirectoryError, OutputNotWritableError

QUIET = {"log": lambda m: None}
TRAIN = {"epochs": 1, "batch_size": 8, "image_size": 32, "num_workers": 0}


def tree(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes: equal trees are byte-for-byte equal."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, labelled_folder, image_dirs, trained_model) -> dict[str, Path]:
    """Copies of every kind of input in one folder, so that an output around them stays in tmp_path."""
    w = tmp_path / "work"
    shutil.copytree(labelled_folder, w / "photos")
    for name in ("all", "train", "val", "untrained"):
        shutil.copytree(image_dirs[name], w / name)
    shutil.copytree(trained_model, w / "model")
    score_image_model(w / "model", w / "val", w / "scored", num_workers=0, **QUIET)
    return {p.name: p for p in w.iterdir()} | {"work": w}


# Each module with its inputs; an output is refused when it is an input, inside one, or holds one.
MODULES = {
    "convert": (["photos"], lambda w, out: convert_to_image_directory(w["photos"], out, overwrite=True, **QUIET)),
    "split": (["all"], lambda w, out: split_image_directory(w["all"], out, w["work"].parent / "b", overwrite=True)),
    "train": (["untrained", "train", "val"], lambda w, out: train_pytorch_model(
        w["untrained"], w["train"], w["val"], out, overwrite=True, **TRAIN, **QUIET)),
    "score": (["model", "val"], lambda w, out: score_image_model(w["model"], w["val"], out, overwrite=True,
                                                                 num_workers=0, **QUIET)),
    "evaluate": (["scored"], lambda w, out: evaluate_model(w["scored"], out, overwrite=True, **QUIET)),
}


@pytest.mark.parametrize("relation", ["is", "is inside", "holds"])
@pytest.mark.parametrize("module", list(MODULES))
def test_an_output_that_is_an_input_is_refused(work, module, relation):
    inputs, run = MODULES[module]
    before = tree(work["work"])
    for name in inputs:
        target = {"is": work[name], "is inside": work[name] / "out", "holds": work["work"]}[relation]
        with pytest.raises(OutputNotWritableError, match=f"the output {target} {relation} the .* {work[name]}: "
                                                         "writing it would destroy that input"):
            run(work, target)
        assert tree(work["work"]) == before
        if relation == "holds":
            break  # one folder holds them all


def test_links_and_dots_are_resolved(work, tmp_path):
    (tmp_path / "link").symlink_to(work["val"])
    for output in (tmp_path / "link", work["train"] / ".." / "val"):
        with pytest.raises(OutputNotWritableError, match="is the validation data"):
            MODULES["train"][1](work, output)
    with pytest.raises(OutputNotWritableError, match="is inside the ImageDirectory to split"):
        split_image_directory(work["all"], tmp_path / "a", tmp_path / "link" / ".." / "all" / "x")


def test_the_cli_says_which_input_and_exits_1(work):
    before = tree(work["work"])
    r = run_cli("train-pytorch-model", "--untrained-model", work["untrained"], "--training-data", work["train"],
                "--validation-data", work["val"], "--output", work["val"], "--overwrite", check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: OutputNotWritableError: the output {work['val']} is the validation data {work['val']}: writing it "
        "would destroy that input. choose an output path outside every input"]
    r = run_cli("convert-to-image-directory", work["photos"], "--output", work["photos"] / "images", check=False)
    assert r.returncode == 1 and "is inside the source" in r.stderr and "Traceback" not in r.stderr
    assert tree(work["work"]) == before


# --- files that are not regular files -------------------------------------------------------------

@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail instead of waiting forever: the readers under test must never block."""
    def hung(signum, frame):
        raise AssertionError(f"still reading after {seconds} s: it hangs")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def special_files(folder: Path) -> dict[str, str]:
    """Every kind of file that is not a regular file, named like an image; with the reason expected."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "null.jpg").symlink_to("/dev/null")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.png"))
    server.close()
    return {"pipe.png": "a named pipe", "zero.png": "a character device", "null.jpg": "a character device",
            "dangling.png": "No such file or directory", "socket.png": "a socket"}


def test_convert_leaves_special_files_out_with_their_reason(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for category in ("dark", "bright"):
        for i in range(3):
            make_image(src / category / f"{i}.png", 40 if category == "dark" else 215, rng)
        (src / category / "linked.png").symlink_to(src / category / "0.png")  # a link to a file is a file
    expected = special_files(src / "dark")
    with no_hang():
        result = convert_to_image_directory(src, tmp_path / "out", **QUIET)
    assert result.num_images == 8
    reasons = {Path(f).name: r for f, r in result.skipped}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith("cannot be read: ") and reason in reasons[name], reasons[name]
    assert reasons["pipe.png"] == "cannot be read: a named pipe, not a regular file"  # as docs/reliability.md says
    with no_hang():
        r = run_cli("convert-to-image-directory", src, "--output", tmp_path / "o2", "--on-bad-image", "fail",
                    check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: BadImageError: 5 file(s) in ") and "pipe.png" in r.stderr
    assert not (tmp_path / "o2").exists()
    flat = tmp_path / "flat"  # a flat folder: special files beside the images are named too
    make_image(flat / "a.png", 100, rng)
    special_files(flat)
    with no_hang():
        result = convert_to_image_directory(flat, tmp_path / "o3", **QUIET)
    assert result.num_images == 1 and len(result.skipped) == 5


def test_score_skips_or_refuses_special_files(tmp_path, trained_model):
    rng = np.random.default_rng(1)
    folder = tmp_path / "new"
    make_image(folder / "a.png", 40, rng)
    expected = special_files(folder)
    logs: list[str] = []
    with no_hang():
        result = score_image_model(trained_model, folder, tmp_path / "s", num_workers=0, log=logs.append)
    assert result.num_images == 1
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in logs), (name, logs)
    with no_hang(), pytest.raises(InvalidDatasetError, match="cannot decode image .*: cannot be read: "):
        score_image_model(trained_model, folder, tmp_path / "s2", num_workers=0, on_bad_image="fail", **QUIET)
    with no_hang(), pytest.raises(InvalidDatasetError, match="none of the 2 images could be decoded"):
        score_image_model(trained_model, [folder / "pipe.png", "/dev/zero"], tmp_path / "s3", **QUIET)
    assert not (tmp_path / "s3").exists()


def test_directories_with_special_files_get_named_errors(tmp_path, image_dirs, trained_model):
    data = tmp_path / "val"
    shutil.copytree(image_dirs["val"], data)
    first = ImageDirectory.load(data).path(0)
    first.unlink()
    os.mkfifo(first)  # an image of the ImageDirectory
    with no_hang():
        result = score_image_model(trained_model, data, tmp_path / "s", num_workers=0, **QUIET)
        assert result.num_images == 8
        with pytest.raises(InvalidDatasetError, match="is listed in .* but is a named pipe"):
            split_image_directory(data, tmp_path / "a", tmp_path / "b")
    for meta in ("images.lst", "_schema.json", "_meta.yaml"):
        broken = tmp_path / f"broken-{meta}"
        shutil.copytree(image_dirs["val"], broken)
        (broken / meta).unlink()
        os.mkfifo(broken / meta)
        with no_hang(), pytest.raises(InvalidDatasetError, match=f"{meta} cannot be read .*a named pipe"):
            ImageDirectory.load(broken)
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    for name, error in (("model.safetensors", "cannot read weights"), ("model_spec.yaml", "cannot be read")):
        (model / name).unlink()
        os.mkfifo(model / name)
        with no_hang(), pytest.raises(InvalidModelDirectoryError, match=f"{error} .*a named pipe"):
            score_image_model(model, image_dirs["val"], tmp_path / "s3", num_workers=0, **QUIET)
        (model / name).unlink()
        shutil.copyfile(trained_model / name, model / name)
    scored = tmp_path / "scored"
    scored.mkdir()
    os.mkfifo(scored / "scored.csv")
    with no_hang(), pytest.raises(InvalidDatasetError, match="scored.csv cannot be read .*a named pipe"):
        evaluate_model(scored, tmp_path / "e", **QUIET)
