"""Shared fixtures: small real image folders written with Pillow, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Never reach for the network: pretrained weights come from files the tests place.
os.environ["IMGTRAIN_OFFLINE"] = "1"
# --threads auto trains on the cores that are free as a run starts, so two runs of a test on a busy machine could
# choose differently, and their weights differ: the tests train on every core available, as auto does on an idle
# machine (tests/test_threads.py asks for auto itself).
from imgtrain.threads import Threads  # noqa: E402  (imgtrain first: it sets OpenMP's spinning before torch starts)

os.environ.setdefault("IMGTRAIN_THREADS", str(Threads("auto", print).cores))


def distributed_env(**extra: str) -> dict[str, str]:
    """The environment of a command that starts several processes (torchrun, --nproc-per-node): without the pinned
    thread count (each process would take every core), and with one OpenMP thread each, as torchrun gives."""
    env = {k: v for k, v in os.environ.items() if k != "IMGTRAIN_THREADS"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}

FORMATS = [("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("bmp", "RGB"), ("png", "RGBA"), ("png", "P"),
           ("webp", "RGB"), ("tiff", "RGB")]
LEVELS = {"dark": 40, "mid": 128, "bright": 215}


def make_image(path: Path, level: int, rng: np.random.Generator, mode: str = "RGB",
               size: tuple[int, int] | None = None) -> Path:
    """A noisy image whose mean brightness is ``level``: its class survives any colour mode."""
    w, h = size or (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
    pixels = np.clip(rng.normal(level, 18, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    image = image.convert("P") if mode == "P" else image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_labelled_folder(root: Path, per_class: int = 12, classes=("dark", "mid", "bright"), seed: int = 0,
                         swap: dict[str, str] | None = None) -> Path:
    """``root/<class>/<n>.<ext>`` in mixed formats, modes and sizes. ``swap`` renames folders
    (the pixels of class k filed under another name), to make a validation set that disagrees."""
    rng = np.random.default_rng(seed)
    for name in classes:
        for n in range(per_class):
            ext, mode = FORMATS[n % len(FORMATS)]
            folder = (swap or {}).get(name, name)
            make_image(root / folder / f"{n:03d}.{ext}", LEVELS[name], rng, mode)
    return root


def run_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "imgtrain", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"imgtrain {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


# The warning filters of an interpreter started without -W or PYTHONWARNINGS, as `imgtrain` is (pytest sets its own)
_FRESH_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                  ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                  ("ignore", ResourceWarning, "")]


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.fixture
def cli_in_process(capfd):
    """``imgtrain ARGS`` run by the function its process runs, ``imgtrain.cli.main``, in this process: without
    the 3 to 4 s of importing torch that each process of the command pays. Returned as ``run_cli`` returns it:
    the exit code, and what reached file descriptors 1 and 2 (the warnings a fresh interpreter prints among
    them; an exception main() lets out fails the test, where the process would print its traceback).

    For commands that stop with an error, or finish a small job without state that outlives it in the process
    (an MLflow run does): each kind of result is also had from a real process of the command elsewhere
    (run_cli)."""
    from imgtrain.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capfd.readouterr()  # what came before
        environ = dict(os.environ)  # what the command sets in its environment goes with it, as with its process
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(_FRESH_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _print_warning
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's errors (2) and --help (0)
                code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
            finally:
                for key in set(os.environ) - set(environ):
                    del os.environ[key]
                os.environ.update(environ)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["imgtrain", *argv], code, out, err)

    return run


@contextlib.contextmanager
def training_in_background(log: Path, *args) -> Iterator[subprocess.Popen]:
    """`imgtrain train ARGS` in a session of its own, its stderr in ``log``, yielded once it has logged epoch 1
    (still running); killed with its whole process group at the end if it runs on."""
    env = distributed_env() if "--nproc-per-node" in args else {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imgtrain", "train", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, env=env)
    try:
        while proc.poll() is None and "epoch 1/" not in log.read_text():
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory) -> Iterator[Path]:
    """imgtrain's cache (the engines' ONNX graphs, auto's choices) in the session's temporary folder, for this
    process and the commands it starts: never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("imgtrain-cache")
    before = os.environ.get("IMGTRAIN_CACHE")
    os.environ["IMGTRAIN_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("IMGTRAIN_CACHE", None)
    else:
        os.environ["IMGTRAIN_CACHE"] = before


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("src") / "shades")


@pytest.fixture(scope="session")
def image_dirs(tmp_path_factory, labelled_folder) -> dict[str, Path]:
    """A converted and split data set plus an untrained ResNet-18, made once for the session."""
    from imgtrain import convert_to_image_directory, resnet, split_image_directory

    root = tmp_path_factory.mktemp("dirs")
    convert_to_image_directory(labelled_folder, root / "all")
    split_image_directory(root / "all", root / "train", root / "val", fraction=0.75, random_seed=1)
    resnet(root / "untrained", model_name="resnet18", pretrained=False)
    return {"all": root / "all", "train": root / "train", "val": root / "val", "untrained": root / "untrained"}


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory) -> Path:
    """An untrained MobileNetV3-Small: dropout in its forward pass, so its weights depend on torch's generator."""
    from imgtrain import image_model

    untrained = tmp_path_factory.mktemp("dropout") / "untrained"
    image_model(untrained, model_name="mobilenet_v3_small", pretrained=False)
    return untrained


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, image_dirs) -> Path:
    """ResNet-18 trained 3 epochs, in fp32: the same model on every machine (auto is bf16 where it is native)."""
    from imgtrain import train_pytorch_model

    out = tmp_path_factory.mktemp("trained") / "model"
    train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"], out,
                        epochs=3, batch_size=8, image_size=32, num_workers=0, precision="fp32", log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def two_epoch_run(tmp_path_factory, image_dirs):
    """ResNet-18 trained 2 epochs at 32 px in batches of 8 (precision auto), by the parameters that change no
    result, ``two_epoch_run(cache=True, num_workers=0)``: each trained once for the session, when a test first
    asks for it. Read only: a test that changes one works on a copy."""
    from imgtrain import train_pytorch_model

    runs = {}

    def run(cache: bool = True, num_workers: int = 0):
        if (cache, num_workers) not in runs:
            out = tmp_path_factory.mktemp("two-epochs") / "m"
            runs[cache, num_workers] = train_pytorch_model(
                image_dirs["untrained"], image_dirs["train"], image_dirs["val"], out, epochs=2, batch_size=8,
                image_size=32, cache=cache, num_workers=num_workers, log=lambda m: None)
        return runs[cache, num_workers]

    return run


def foreign_images() -> dict[str, bytes]:
    """Images of formats imgtrain does not read (Pillow would take the first two), and content no decoder takes,
    each under a name that says otherwise: a file's name is no guide to which decoder its bytes reach."""
    def saved(format: str) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format)
        return out.getvalue()

    return {"eps.png": saved("EPS"), "ico.jpg": saved("ICO"), "pdf.png": saved("PDF"),
            "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"><rect width="16" '
                       b'height="16" fill="red"/></svg>'}


def mpo_image(size: tuple[int, int] = (200, 160)) -> bytes:
    """A multi-picture JPEG, as phones write: Pillow opens it as MPO, a kind of JPEG."""
    out = io.BytesIO()
    first = Image.fromarray(np.random.default_rng(3).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    first.save(out, "MPO", save_all=True, append_images=[Image.new("RGB", size, (9, 9, 9))])
    return out.getvalue()
