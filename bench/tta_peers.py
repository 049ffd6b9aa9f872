"""Peers of the `tta` section: other tools' whole training commands on the same data, at the same image size,
from scratch, 5 epochs, batch 16, seed 1, on the CPU, each at its own recipe and its best CPU speed options.

- timm: its ``train.py`` (not in timm's wheel or sdist: ``--timm-train-py PATH``, else
  ``<cache>/timm-<version>/train.py``, else downloaded there from the GitHub tag of the environment's timm
  version, else skipped with a line saying where to put it), on the environment's timm, ResNet-18.
- Ultralytics: its classify trainer (bench/peer_ultralytics.py: ``YOLO(yaml).train(...)`` as ``yolo classify
  train`` runs it), YOLOv8n-cls and YOLOv8s-cls (about ResNet-18's FLOPs), from their yaml.
- fastai: ``vision_learner(..., resnet18, pretrained=False)`` and ``fit_one_cycle`` (bench/peer_fastai.py).

Peers stay out of imgtrain's dependencies: Ultralytics and fastai are installed once, pinned, each into a
folder of its own in the benchmark's cache (``pip install --no-deps --target``, as the `peer` section installs
LitServe), with only the packages they need at import and run time that the environment lacks (found by running
them here: e.g. fastai's spaCy is for text and is left out); none may shadow a package the environment has
(checked: the peer is skipped with a line if one would). Without a package index a peer is skipped with a line.

Each command's output is read as it comes and each epoch's validation top-1 stamped with the seconds since the
command started, as for imgtrain (``tta.timed``): timm's last ``Test: [ N/N]`` line of an epoch (its running
mean over the whole validation set), a line the two drivers print after each epoch's validation. After each run
those figures are checked against the peer's own per-epoch file (timm's summary.csv, Ultralytics' results.csv,
fastai's CSVLogger file).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from context import BENCH, Context
from measure import num
from peer_bench import install_pinned, shadowed
from responsiveness import Code
from tta import DataSet, Timed, timed

EPOCHS, BATCH, SEED = 5, 16, 1
TIMM_URL = "https://raw.githubusercontent.com/huggingface/pytorch-image-models/v{version}/train.py"
# What each needs at import and run time that imgtrain's environment lacks, pinned (found by running them with
# --no-deps installs on 2026-12-05: each import error added the package named). Ultralytics: thop counts the
# FLOPs it prints, OpenCV (headless: no GUI) reads the images, polars reads results.csv when saving a
# checkpoint; psutil, py-cpuinfo, nvidia-ml-py and ultralytics-platform are not reached by CPU classify
# training. fastai: fastprogress 1.1.6 imports python-fasthtml (which imports itsdangerous), plum-dispatch
# imports beartype and rich, fastai.vision.all imports fastdownload; spaCy (text), oauthlib and beautifulsoup4
# are not imported. plum-dispatch 2.9.0: fastai 2.8.12 requires plum-dispatch<2.10.
ULTRALYTICS = ("ultralytics", "8.4.190", ("ultralytics-thop==2.2.3", "opencv-python-headless==5.0.0.93",
                                          "polars==2.1.0", "polars-runtime-32==2.1.0"))
FASTAI = ("fastai", "2.8.12", ("fastcore==2.2.41", "fastprogress==1.1.6", "fasttransform==0.0.5",
                               "fastdownload==0.0.8", "plum-dispatch==2.9.0", "beartype==0.23.1", "rich==15.0.0",
                               "python-fasthtml==0.14.14", "itsdangerous==2.2.0"))
TIMM_TEST = re.compile(r"^Test: \[\s*(\d+)/(\d+)\].*Acc@1:\s*[\d.]+\s*\(\s*([\d.]+)\)")
DRIVER_EPOCH = re.compile(r"\b(?:ultralytics|fastai) epoch (\d+)/\d+ val top-1 ([\d.]+)%")


@dataclass
class Runner:
    """One peer's row: how to run it on a data set, read its output, and read its own per-epoch file."""

    key: str  # the --peers name it belongs to
    label: str  # the table's name for it
    command: Callable[[Path, DataSet, int, Path], list[str]]  # (data root, set, classes, output folder)
    env: Callable[[Path], dict[str, str]]  # (output folder)
    parse: Callable[[str], float | None]  # an output line: the epoch's validation top-1 in %, or None
    own: Callable[[Path], tuple[Path, list[float]]]  # (output folder): its file, its per-epoch top-1 in %


@dataclass
class PeerRun:
    runner: Runner
    timed: Timed | None
    own_file: Path | None = None
    own: list[float] = field(default_factory=list)
    error: str | None = None

    def agreement(self) -> str:
        """Whether the stamped figures are the peer's own."""
        parsed = [100 * top1 for _, top1 in self.timed.epochs]
        where = self.own_file.name if self.own_file else "?"
        if len(parsed) == len(self.own) and all(abs(a - b) < 0.01 for a, b in zip(parsed, self.own, strict=True)):
            return f"the {len(parsed)} figures read from its output equal its own {where}"
        return (f"**the figures read from its output ({', '.join(f'{a:.2f}' for a in parsed)}) differ from its "
                f"own {where} ({', '.join(f'{b:.2f}' for b in self.own)})**")


@dataclass
class Peers:
    runners: list[Runner]
    described: list[str]  # a paragraph per peer: command, flags, versions, folders
    skipped: list[str]  # a line per peer that cannot run here


def prepare(ctx: Context) -> Peers:
    """The peers ``--peers`` asks for, installed (once) and checked; those that cannot run, with a reason."""
    wanted = ctx.config.peers
    peers = Peers([], [], [])
    for key, make in (("timm", _timm), ("ultralytics", _ultralytics), ("fastai", _fastai)):
        if key not in wanted:
            continue
        started = time.perf_counter()
        try:
            runners, described = make(ctx)
        except _Skip as exc:
            ctx.log(f"[tta] {key}: skipped: {exc}")
            peers.skipped.append(f"{key}: skipped: {exc}")
            continue
        ctx.log(f"[tta] {key} ready ({time.perf_counter() - started:.0f} s)")
        peers.runners += runners
        peers.described.append(described)
    return peers


class _Skip(Exception):
    """A peer that cannot run here; the message says why, in a line."""


def _installed(ctx: Context, name: str, version: str, extras: tuple[str, ...]) -> tuple[Path, str]:
    """The peer's pinned folder (installed now if it is not there yet) and how it came to be; _Skip where pip
    fails or where the folder would shadow a package of the environment."""
    folder = ctx.cache / f"{name}-{version}"
    fresh = not (folder / ".complete").is_file()
    started = time.perf_counter()
    try:
        install_pinned(ctx, name, version, extras, "[tta]")
    except subprocess.CalledProcessError as exc:
        raise _Skip(f"not available: `pip install --no-deps --target {folder} {name}=={version} ...` failed (exit "
                    f"code {exc.returncode}; no package index here?)") from None
    clash = shadowed(ctx, folder)
    if clash:
        raise _Skip(f"{folder} holds {', '.join(clash)}, which the environment has too: put first on PYTHONPATH "
                    "it would replace them, so it is not run (remove the folder to install it again)")
    how = (f"installed now in {time.perf_counter() - started:.0f} s" if fresh else "installed by an earlier run")
    return folder, how


def _env(ctx: Context, folder: Path | None = None) -> dict[str, str]:
    """The benchmark's environment, with no OpenMP waiting policy inherited (each tool's own, as for imgtrain's
    runs: responsiveness.Code), and ``folder`` first on PYTHONPATH."""
    env = Code("peer", None).env(ctx)
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return env


def _native_bf16() -> bool:
    from imgtrain.precision import cpu_has_native_bf16  # the rule of imgtrain's --precision auto on a CPU

    return cpu_has_native_bf16()


def _workers() -> int:
    from imgtrain.threads import worker_count  # imgtrain's own: a worker per available core, at most 8

    return worker_count(None)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


# --- timm's train.py -------------------------------------------------------------------------------------------

def _timm_train_py(ctx: Context, version: str) -> tuple[Path, str]:
    given = ctx.config.timm_train_py
    if given is not None:
        if not Path(given).is_file():
            raise _Skip(f"--timm-train-py {given}: no such file")
        return Path(given), f"`{given}` (--timm-train-py)"
    cached = ctx.cache / f"timm-{version}" / "train.py"
    if cached.is_file():
        return cached, f"`{cached}`"
    url = TIMM_URL.format(version=version)
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            text = response.read()
    except OSError as exc:
        raise _Skip(f"timm's train.py is in neither its wheel nor its sdist, and {url} could not be read ({exc}): "
                    f"put the v{version} tag's train.py (github.com/huggingface/pytorch-image-models) at {cached} "
                    "or pass --timm-train-py PATH") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    partial.write_bytes(text)
    partial.rename(cached)
    return cached, f"`{cached}`, downloaded now from {url}"


def _timm(ctx: Context) -> tuple[list[Runner], str]:
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise _Skip("timm is not installed in the environment (`pip install imgtrain[timm]`)") from None
    script, where = _timm_train_py(ctx, version)
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    bf16 = _native_bf16()
    workers = _workers()
    speed = ["--channels-last", *(["--amp", "--amp-dtype", "bfloat16"] if bf16 else []), "-j", str(workers)]
    recipe = ["--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--sched", "cosine"]

    def command(root: Path, d: DataSet, classes: int, out: Path) -> list[str]:
        return [ctx.python, str(script), "--data-dir", str(root), "--train-split", "train", "--val-split", "val",
                "--model", "resnet18", "--num-classes", str(classes), "--img-size", str(d.size),
                "--epochs", str(EPOCHS), "-b", str(BATCH), *recipe, "--seed", str(SEED), "--device", "cpu", *speed,
                "--output", str(out), "--experiment", "run"]

    def parse(line: str) -> float | None:
        match = TIMM_TEST.match(line)  # the last batch's line carries the epoch's mean over the whole set
        return float(match.group(3)) if match and match.group(1) == match.group(2) else None

    def own(out: Path) -> tuple[Path, list[float]]:
        path = out / "run" / "summary.csv"
        return path, [float(row["eval_top1"]) for row in _read_csv(path)]

    shown = " ".join(["train.py", "--data-dir ROOT --train-split train --val-split val --model resnet18",
                      "--num-classes N --img-size PX", f"--epochs {EPOCHS} -b {BATCH}", *recipe, f"--seed {SEED}",
                      "--device cpu", *speed, "--output DIR --experiment run"])
    described = (
        f"**timm {version}**, `{shown}`, on the environment's timm; train.py: {where} (sha256 {digest}...). "
        f"timm's own recipe otherwise (label smoothing 0.1, weight decay 2e-5, RandomResizedCrop scale 0.08-1 with "
        "random interpolation, horizontal flips, colour jitter 0.4; validation resized to the size / crop_pct "
        "(0.95 for resnet18) and centre-cropped; checkpoints kept each epoch), but not its default schedule: SGD "
        "at lr 0.1 x batch / 256 after a 5-epoch warm-up would warm up for the whole 5 epochs, so AdamW at 1e-3 "
        "(imgtrain's optimiser and rate), cosine over the 5 epochs, no warm-up. CPU speed: channels-last, "
        + ("bf16 autocast (`--amp --amp-dtype bfloat16`: this CPU multiplies bf16 natively, the rule of imgtrain's "
           "`--precision auto`)" if bf16 else "fp32 (this CPU has no native bf16; imgtrain's `--precision auto` "
                                              "also picks fp32 here)")
        + f", {workers} DataLoader workers (imgtrain's count: one per core, at most 8); not `--torchcompile`.")
    return [Runner("timm", f"timm {version} train.py, resnet18", command, lambda out: _env(ctx), parse, own)], \
        described


# --- Ultralytics --------------------------------------------------------------------------------------------------

def _ultralytics(ctx: Context) -> tuple[list[Runner], str]:
    name, version, extras = ULTRALYTICS
    folder, how = _installed(ctx, name, version, extras)
    runners = []
    for model in ("yolov8n-cls", "yolov8s-cls"):
        def command(root: Path, d: DataSet, classes: int, out: Path, model: str = model) -> list[str]:
            return [ctx.python, str(BENCH / "peer_ultralytics.py"), "--data", str(root), "--model", f"{model}.yaml",
                    "--imgsz", str(d.size), "--epochs", str(EPOCHS), "--batch", str(BATCH), "--seed", str(SEED),
                    "--cache", "ram", "--project", str(out), "--name", "run"]

        def env(out: Path) -> dict[str, str]:  # no network, no settings of this user's, no auto-install
            return _env(ctx, folder) | {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false",
                                                "YOLO_CONFIG_DIR": str(out / "config")}

        def own(out: Path) -> tuple[Path, list[float]]:
            path = out / "run" / "results.csv"
            return path, [100 * float(row["metrics/accuracy_top1"]) for row in _read_csv(path)]

        runners.append(Runner("ultralytics", f"Ultralytics {version}, {model}", command, env, _driver_line, own))
    described = (
        f"**Ultralytics {version}** ({how}: `pip install --no-deps --target {folder} {name}=={version} "
        f"{' '.join(extras)}`), `bench/peer_ultralytics.py --model yolov8n-cls.yaml` (and yolov8s-cls.yaml, about "
        f"ResNet-18's FLOPs) `--imgsz PX --epochs {EPOCHS} --batch {BATCH} --seed {SEED} --cache ram`: "
        f"`YOLO('yolov8n-cls.yaml').train(data=ROOT, imgsz=PX, epochs={EPOCHS}, batch={BATCH}, device='cpu', "
        f"seed={SEED}, pretrained=False, plots=False, cache='ram')`, what `yolo classify train` runs, with "
        "YOLO_OFFLINE=1, YOLO_AUTOINSTALL=false, a fresh YOLO_CONFIG_DIR and its settings `sync` and the "
        "experiment trackers (MLflow is in this environment) off: nothing is downloaded, no weights, fonts or "
        "AMP-check model. Its own recipe: `optimizer=auto` (AdamW at lr 0.002 x 5 / (4 + classes) for short "
        "runs), a 3-epoch warm-up then a linear decay, RandomResizedCrop scale 0.5-1, horizontal flips, "
        "RandAugment, HSV jitter, random erasing 0.4; validation resized and centre-cropped (the whole square "
        "image); deterministic algorithms; checkpoints each epoch. CPU speed: `cache=ram` (each image decoded "
        "once); on a CPU its trainer sets DataLoader workers to 0 and torch's threads to the cores less one, at "
        "most 8 (whatever OMP_NUM_THREADS says), and refuses bf16 autocast and channels-last (CUDA only), so it "
        "trains in fp32 in one process.")
    return runners, described


def _driver_line(line: str) -> float | None:
    match = DRIVER_EPOCH.search(line)  # searched: a progress bar's carriage returns may come before it
    return float(match.group(2)) if match else None


# --- fastai ---------------------------------------------------------------------------------------------------------

def _fastai(ctx: Context) -> tuple[list[Runner], str]:
    name, version, extras = FASTAI
    folder, how = _installed(ctx, name, version, extras)

    def command(root: Path, d: DataSet, classes: int, out: Path) -> list[str]:
        return [ctx.python, str(BENCH / "peer_fastai.py"), "--data", str(root), "--size", str(d.size),
                "--epochs", str(EPOCHS), "--batch", str(BATCH), "--lr", "1e-3", "--seed", str(SEED),
                "--csv", str(out / "history.csv")]

    def own(out: Path) -> tuple[Path, list[float]]:
        path = out / "history.csv"
        return path, [100 * float(row["accuracy"]) for row in _read_csv(path)]

    described = (
        f"**fastai {version}** ({how}: `pip install --no-deps --target {folder} {name}=={version} "
        f"{' '.join(extras)}`), `bench/peer_fastai.py --size PX --epochs {EPOCHS} --batch {BATCH} --lr 1e-3 "
        f"--seed {SEED}`: `ImageDataLoaders.from_folder(ROOT, train='train', valid='val', item_tfms=Resize(PX), "
        f"bs={BATCH})`, `vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)`, "
        f"`to_channelslast(use_amp=False)`, `fit_one_cycle({EPOCHS}, 1e-3)` (`fine_tune` is for pretrained "
        "weights), `set_seed(1, reproducible=True)`. Its own recipe: Adam with decoupled weight decay 0.01, the "
        "one-cycle schedule, no batch augmentation (`aug_transforms` is opt-in), `vision_learner`'s head "
        "(average and max pooling concatenated, two linear layers with batch norm and dropout) on torchvision's "
        "ResNet-18 body, no input normalisation (fastai adds ImageNet's only for pretrained weights), DataLoader "
        "workers `defaults.cpus`. CPU speed: channels-last; fastai's mixed precision is CUDA-only, so fp32.")
    return [Runner("fastai", f"fastai {version}, resnet18", command, lambda out: _env(ctx, folder),
                   _driver_line, own)], described


# --- running ----------------------------------------------------------------------------------------------------------

def data_root(ctx: Context, d: DataSet, train: Path, val: Path) -> tuple[Path, int]:
    """The set's training and validation ImageDirectories as ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``
    (symbolic links to their image files: the very images imgtrain reads), made once; and the classes."""
    from imgtrain.directories.image_directory import ImageDirectory

    root = ctx.work / "tta" / "peers-data" / re.sub(r"[^a-z0-9]+", "-", d.name.lower()).strip("-")
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        for split, directory in (("train", train), ("val", val)):
            images = ImageDirectory.load(directory)
            for i, label in enumerate(images.require_labels(str(directory))):
                source = images.path(i).resolve()
                link = root / split / images.categories[label] / f"{i:06d}{source.suffix.lower()}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source)
        (root / ".complete").touch()
    classes = {p.name for p in (root / "train").iterdir() if p.is_dir()}
    return root, len(classes)


def run(ctx: Context, peers: Peers, d: DataSet, train: Path, val: Path) -> list[PeerRun]:
    """Every peer on the set, one after another."""
    if not peers.runners:
        return []
    root, classes = data_root(ctx, d, train, val)
    runs = []
    for n, runner in enumerate(peers.runners):
        out = ctx.work / "tta" / "peers" / f"{n}-{runner.key}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for stale in root.glob("*.cache"):  # Ultralytics' list of the checked images: each run makes its own
            stale.unlink()
        ctx.log(f"[tta] {d.name}: {runner.label}")
        try:
            result = timed(runner.command(root, d, classes, out), runner.env(out), runner.parse, ctx.log, cwd=out)
        except RuntimeError as exc:  # one peer failing must not lose imgtrain's figures or the other peers'
            ctx.log(f"[tta] {runner.label} failed: {exc}")
            runs.append(PeerRun(runner, None, error=str(exc).strip().splitlines()[-1][:300]))
            continue
        try:
            own_file, own = runner.own(out)
        except (OSError, KeyError, ValueError) as exc:
            own_file, own = None, []
            ctx.log(f"[tta] {runner.label}: its own per-epoch file could not be read: {exc}")
        runs.append(PeerRun(runner, result, own_file, own))
    return runs


def _reached(t: Timed, bar: float) -> str:
    for k, (s, top1) in enumerate(t.epochs, 1):
        if top1 >= bar - 1e-9:
            return f"{num(s)} (epoch {k})"
    return f"not reached in {len(t.epochs)} epochs (best {100 * t.best:.1f}%)"


def _ratio(mine: Timed, theirs: Timed, bar: float) -> str:
    """imgtrain's seconds / the peer's to ``bar``: the issue's target is 0.75x or less (in bold)."""
    a, b = mine.reached(bar), theirs.reached(bar)
    if a is None or b is None:
        return "-"
    value = a / b
    return f"**{value:.2f}x**" if value <= 0.75 else f"{value:.2f}x"


def rows(d: DataSet, target: float, mine: Timed, runs: list[PeerRun]) -> list[list[str]]:
    """The set's rows of the peers' table: imgtrain's first, then each peer's."""
    out = [[f"{d.name} ({d.size} px; the recipe's final {100 * target:.1f}%, bar {100 * d.bar:.0f}%)",
            "imgtrain defaults", _reached(mine, target), "", _reached(mine, d.bar), ""]]
    for r in runs:
        if r.timed is None:
            out.append(["", r.runner.label, f"failed: {r.error}", "-", "", "-"])
            continue
        out.append(["", r.runner.label, _reached(r.timed, target), _ratio(mine, r.timed, target),
                    _reached(r.timed, d.bar), _ratio(mine, r.timed, d.bar)])
    return out


def lines(d: DataSet, runs: list[PeerRun]) -> list[str]:
    found = []
    for r in runs:
        if r.timed is None:
            found.append(f"- {d.name}, {r.runner.label}: failed: `{r.error}`")
            continue
        t = r.timed
        found.append(
            f"- {d.name}, {r.runner.label}: best top-1 {100 * t.best:.1f}% (last {100 * t.last:.1f}%), whole "
            f"command {num(t.wall)} s; epochs at (s, top-1): "
            + ", ".join(f"({s:.0f}, {100 * a:.1f}%)" for s, a in t.epochs) + f"; {r.agreement()}")
    return found


def text(peers: Peers) -> list[str]:
    """The section's paragraphs on the peers: what runs, how, and what was skipped."""
    if not peers.runners and not peers.skipped:
        return []
    found = ["Peers, whole commands after imgtrain's on each set: the same images (the set's training and "
             "validation ImageDirectories as `ROOT/train/<class>/*` and `ROOT/val/<class>/*` folders of symbolic "
             f"links, made before the clocks start), the same image size, from scratch, {EPOCHS} epochs, batch "
             f"{BATCH}, seed {SEED}, the CPU; each stamped as imgtrain is. Each at its own recipe and its best CPU "
             "speed options, installed outside imgtrain's dependencies:"]
    found += [f"- {p}" for p in peers.described]
    found += [f"- {s}" for s in peers.skipped]
    return ["\n".join(found)]


HEADERS = ["data set", "command", "to the recipe's final top-1, s", "imgtrain's time / its", "to the bar, s",
           "imgtrain's time / its"]
