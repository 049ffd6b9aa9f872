"""Two sections about what a user feels first: how fast each command starts, and how training holds up when
another program keeps the CPU busy. With ``--compare-with REV`` both run the code of that git revision too,
side by side in the same run (the "old" rows)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fixtures
from context import Context, read_metrics, steady_rate
from measure import REPO, Section, med, num, run_measured, spread, table

STARTUP_IMAGES = 20  # the tiny input of each start-up command
PIPELINE_IMAGES = 288  # MNIST digits for the six-command pipeline at the designer's defaults


@dataclass(frozen=True)
class Code:
    """A version of imgtrain to run: this checkout, or another revision's src/ put first on PYTHONPATH."""

    name: str
    src: Path | None  # None: the installed (this checkout's) code

    def env(self, ctx: Context, **extra: str) -> dict[str, str]:
        # OpenMP's waiting is each version's own choice: nothing inherited from this process decides it.
        env = {k: v for k, v in ctx.env.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | extra
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src) + os.pathsep + env.get("PYTHONPATH", "")
        return env


def codes(ctx: Context) -> list[Code]:
    """This checkout, and the ``--compare-with`` revision's code exported once into the work folder."""
    found = [Code("new", None)]
    rev = ctx.config.compare_with
    if rev:
        folder = ctx.work / f"code-{rev}"
        if not folder.exists():
            archive = subprocess.run(["git", "archive", "--format=tar", rev, "src"], cwd=REPO, check=True,
                                     capture_output=True).stdout
            folder.mkdir(parents=True)
            with tempfile.TemporaryFile() as f:
                f.write(archive)
                f.seek(0)
                with tarfile.open(fileobj=f) as tf:
                    tf.extractall(folder, filter="data")
        found.insert(0, Code(f"old ({rev})", folder / "src"))
    return found


def _imgtrain(ctx: Context, code: Code, *args: object, env: dict[str, str] | None = None):
    return run_measured([ctx.python, "-m", "imgtrain", *map(str, args)], env=env or code.env(ctx), cwd=REPO)


# --- start-up ----------------------------------------------------------------------------------------------

def startup(ctx: Context) -> Section:
    reps = max(3, ctx.config.reps)
    source = fixtures.mnist_folder(ctx.cache, STARTUP_IMAGES)
    floors = []
    for what, code in (("python -c pass", "pass"), ("python -c 'import torch'", "import torch"),
                       ("python -c 'import torch, torchvision'", "import torch, torchvision")):
        runs = [run_measured([ctx.python, "-c", code], env=ctx.env).wall_seconds for _ in range(reps)]
        floors.append([what, num(med(runs), 2), spread(runs, 2)])
        ctx.log(f"[startup] {what}: {med(runs):.2f} s")
    rows = []
    torch_home = ctx.work / "startup-torch-home"
    _place_stand_in_weights(ctx, torch_home)
    for code in codes(ctx):
        w = ctx.work / "startup" / code.name.split()[0]
        env = code.env(ctx, TORCH_HOME=str(torch_home))
        commands = [
            ("--help", ["--help"]),
            ("convert-to-image-directory", ["convert-to-image-directory", source, "--output", w / "all"]),
            ("split-image-directory", ["split-image-directory", w / "all", "--fraction", "0.5", "--output-a",
                                       w / "train", "--output-b", w / "val"]),
            ("resnet --no-pretrained", ["resnet", "--model-name", "resnet18", "--no-pretrained", "--output",
                                        w / "untrained"]),
            ("resnet (weights cached)", ["resnet", "--model-name", "resnet18", "--output", w / "pretrained"]),
            ("train-pytorch-model, 1 epoch", ["train-pytorch-model", "--untrained-model", w / "untrained",
                                              "--training-data", w / "train", "--validation-data", w / "val",
                                              "--output", w / "model", "--epochs", 1, "--batch-size", 8]),
            ("score-image-model", ["score-image-model", "--trained-model", w / "model", "--dataset", w / "val",
                                   "--output", w / "scored"]),
            ("evaluate-model", ["evaluate-model", "--scored-dataset", w / "scored", "--output", w / "evaluation"]),
        ]
        for what, args in commands:
            overwrite = ["--overwrite"] if any(str(a).startswith("--output") for a in args) else []
            runs = [_imgtrain(ctx, code, *args, *overwrite, env=env) for _ in range(reps)]
            seconds = [r.wall_seconds for r in runs]
            rows.append([code.name, what, num(med(seconds), 2), spread(seconds, 2)])
            ctx.log(f"[startup] {code.name} {what}: {med(seconds):.2f} s")
    pipeline = _pipeline(ctx)
    return Section("7. Start-up: each command on a tiny input", [
        f"Wall time of whole commands ({STARTUP_IMAGES} MNIST digits, split in half; training 1 epoch at batch size "
        f"8), median of "
        f"{reps}, beside the floors every Python program pays. Stand-in ImageNet weights sit in a temporary "
        "TORCH_HOME, so `resnet` finds them cached and downloads nothing.",
        table(["floor", "wall s (median)", "each rep"], floors),
        table(["code", "command", "wall s (median)", "each rep"], rows),
        f"The six-command pipeline on {PIPELINE_IMAGES} MNIST digits at the designer's defaults (split 0.75, "
        "ResNet-18 from scratch, 5 epochs, batch size 16, learning rate 0.001), one run each:",
        table(["code", *pipeline["steps"], "total s"], pipeline["rows"]),
    ])


def _place_stand_in_weights(ctx: Context, torch_home: Path) -> None:
    import torch
    import torchvision

    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)


def _pipeline(ctx: Context) -> dict:
    source = fixtures.mnist_folder(ctx.cache, PIPELINE_IMAGES)
    steps = ["convert", "split", "resnet", "train", "score", "evaluate"]
    rows = []
    for code in codes(ctx):
        o = ctx.work / "pipeline" / code.name.split()[0]
        shutil.rmtree(o, ignore_errors=True)
        commands = [
            ["convert-to-image-directory", source, "--output", o / "all"],
            ["split-image-directory", o / "all", "--fraction", "0.75", "--output-a", o / "train", "--output-b",
             o / "val"],
            ["resnet", "--model-name", "resnet18", "--no-pretrained", "--output", o / "untrained"],
            ["train-pytorch-model", "--untrained-model", o / "untrained", "--training-data", o / "train",
             "--validation-data", o / "val", "--output", o / "model"],
            ["score-image-model", "--trained-model", o / "model", "--dataset", o / "val", "--output", o / "scored"],
            ["evaluate-model", "--scored-dataset", o / "scored", "--output", o / "evaluation"],
        ]
        seconds = [_imgtrain(ctx, code, *args).wall_seconds for args in commands]
        rows.append([code.name, *(num(s, 1) for s in seconds), num(sum(seconds), 1)])
        ctx.log(f"[startup] pipeline, {code.name}: {sum(seconds):.1f} s")
    return {"steps": [f"{s} s" for s in steps], "rows": rows}


# --- training on a shared CPU ------------------------------------------------------------------------------

def shared_cpu(ctx: Context) -> Section:
    cfg = ctx.config
    train_images, val_images = (480, 120) if not cfg.quick else (48, 16)
    epochs = 3 if not cfg.quick else 2
    source = fixtures.mnist_folder(ctx.cache, train_images + val_images)
    train, val = ctx.image_directories(source, f"mnist-{train_images}-{val_images}", train_images, val_images)
    untrained = ctx.untrained("resnet18")
    variants = [(code, setting) for code in codes(ctx)
                for setting in ((None,) if code.src is not None else ("auto", "adapt", "1"))]
    rates: dict[tuple[str, int], float] = {}
    for busy in (0, 1, 2):
        competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                       for _ in range(busy)]
        try:
            for code, setting in variants:
                name = code.name if setting is None else f"{code.name}, --threads {setting}"
                out = ctx.work / "shared" / f"{len(rates)}"
                args = ["train-pytorch-model", "--untrained-model", untrained, "--training-data", train,
                        "--validation-data", val, "--output", out, "--overwrite", "--epochs", epochs,
                        "--patience", epochs, "--image-size", 32]
                _imgtrain(ctx, code, *args, *(["--threads", setting] if setting else []))
                rates[name, busy] = steady_rate(read_metrics(out / "metrics.csv"))
                ctx.log(f"[shared] {busy} busy process(es), {name}: {rates[name, busy]:.1f} img/s")
        finally:
            for p in competitors:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    names = list(dict.fromkeys(name for name, _ in rates))
    reference = rates[names[0], 0]
    rows = [[name, *(f"{num(rates[name, b])} ({rates[name, b] / rates[name, 0]:.0%})" for b in (0, 1, 2)),
             *(f"{rates[name, b] / reference:.0%}" for b in (1, 2))] for name in names]
    return Section("8. Training on a shared CPU", [
        f"Training img/s of `train-pytorch-model` (ResNet-18 from scratch, {train_images:,} MNIST digits at 32 px, "
        f"{epochs} epochs, the mean of epochs 2 and later), on an idle machine and beside one and two other "
        "busy processes (`python -c 'while True: pass'`). In parentheses: the share of the same setting's "
        f"idle speed; the last columns: the share of the first row's idle speed. {os.cpu_count()} logical CPUs.",
        table(["code and threads", "idle img/s", "1 busy process", "2 busy processes",
               f"1 busy, vs {names[0]} idle", f"2 busy, vs {names[0]} idle"], rows),
    ])
