"""The `tta` section: time to accuracy, whole command against whole command.

What a user waits for is a model that is good enough, not images per second. For each data set, one after
another in one run, from scratch at the same image size: the designer's recipe (`baseline_train.py`: SGD, no
augmentation, fp32, the last epoch kept) for 5 epochs, then `imgtrain train-pytorch-model` at its defaults (5
epochs, batch 16, learning rate 0.001, seed 1, patience 3). Each command's output is read as it comes and every
epoch's validation top-1 is stamped with the seconds since that command started (start-up, reading the images,
caching and every epoch before it included). Reported: the seconds until the validation top-1 first reaches the
recipe's final (5-epoch) accuracy, and a fixed bar, for both; their ratio; the best top-1; the whole commands.
With ``--compare-with REV``, that revision's imgtrain runs too, after this checkout's, on every set. Then the
peers (``--peers``, bench/tta_peers.py: timm's train.py, Ultralytics' classify trainer, fastai), whole commands on
the same images at the same size, from scratch: their seconds to the same two bars and imgtrain's time / theirs.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fixtures
import numpy as np
from context import BENCH, Context
from measure import Section, num, table
from PIL import Image
from responsiveness import codes

IMGTRAIN_EPOCH = re.compile(r"^epoch (\d+)/\d+ .*val loss \S+ top-1 ([\d.]+)%")
DESIGNER_EPOCH = re.compile(r"^epoch (\d+)/\d+ .*val top-1 ([\d.]+)%")


@dataclass
class DataSet:
    name: str
    source: str  # mnist, textures, imbalanced
    size: int  # image size, px
    train: int
    val: int
    bar: float  # a fixed validation top-1 to reach


@dataclass
class Timed:
    """One command: its wall time and each epoch's (seconds since the start, validation top-1)."""

    wall: float
    epochs: list[tuple[float, float]]

    def reached(self, bar: float) -> float | None:
        return next((t for t, top1 in self.epochs if top1 >= bar - 1e-9), None)

    @property
    def best(self) -> float:
        return max((top1 for _, top1 in self.epochs), default=math.nan)

    @property
    def last(self) -> float:
        return self.epochs[-1][1] if self.epochs else math.nan


def sets(quick: bool) -> list[DataSet]:
    if quick:
        return [DataSet("digits", "mnist", 32, 400, 100, 0.9), DataSet("textures", "textures", 64, 120, 30, 0.9)]
    return [DataSet("digits", "mnist", 32, 4000, 1000, 0.97),
            DataSet("textures 64 px", "textures", 64, 1200, 300, 0.9),
            DataSet("textures 224 px", "textures", 224, 400, 100, 0.9),
            DataSet("digits, imbalanced", "imbalanced", 32, 2200, 1000, 0.95)]


def timed(command: list[str], env: dict, pattern: re.Pattern | Callable[[str], float | None], log,
          cwd: Path | None = None) -> Timed:
    """Run ``command``, stamping each epoch line of its output (stdout and stderr together) as it comes.
    ``pattern``: a regular expression whose group 2 is the validation top-1 in %, or a function of a line (stripped)
    that returns it, or None for any other line."""
    started = time.perf_counter()
    epochs = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, cwd=cwd) as proc:
        tail = []
        for line in proc.stdout:
            now = time.perf_counter() - started
            tail = (tail + [line])[-20:]
            if callable(pattern):
                top1 = pattern(line.strip())
            else:
                match = pattern.match(line.strip())
                top1 = float(match.group(2)) if match else None
            if top1 is not None:
                epochs.append((now, top1 / 100))
                log(f"  {now:6.1f} s  {line.strip()}")
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{''.join(tail)}")
    return Timed(time.perf_counter() - started, epochs)


def imbalanced_digits(cache: Path, train: int, val: int) -> tuple[Path, Path]:
    """Training digits 10:1 (digits 0-4 ten times as many as 5-9), validation digits balanced: two source folders."""
    folder = cache / f"mnist-imbalanced-{train}-{val}"
    if not fixtures._complete(folder):
        images, labels = fixtures._mnist()
        tmp = fixtures._partial(folder)
        large = round(train / 5.5)  # five digits of ``large`` images each, five of a tenth of it
        small = max(1, large // 10)
        for d in range(10):
            mine = np.flatnonzero(labels == d)
            kept = {"train": mine[: large if d < 5 else small], "val": mine[-(val // 10):]}
            for split, indices in kept.items():
                sub = tmp / split / str(d)
                sub.mkdir(parents=True, exist_ok=True)
                for i in indices:
                    Image.fromarray(images[i], mode="L").save(sub / f"{i:04d}.png")
        fixtures._finish(tmp, folder)
    return folder / "train", folder / "val"


def directories(ctx: Context, d: DataSet) -> tuple[Path, Path]:
    if d.source == "imbalanced":
        train_src, val_src = imbalanced_digits(ctx.cache, d.train, d.val)
        root = ctx.work / "tta" / "imbalanced"
        for name, src in (("train", train_src), ("val", val_src)):
            if not (root / name).exists():
                ctx.imgtrain("convert-to-image-directory", src, "--output", root / name)
        return root / "train", root / "val"
    count = d.train + d.val
    source = (fixtures.mnist_folder(ctx.cache, count) if d.source == "mnist"
              else fixtures.texture_folder(ctx.cache, count, size=128))
    return ctx.image_directories(source, f"tta-{d.source}-{d.train}-{d.val}", d.train, d.val)


def time_to_accuracy(ctx: Context) -> Section:
    import tta_peers  # (it imports this module)

    rows, lines = [], []
    peers = tta_peers.prepare(ctx)  # --peers: installed once, checked; those that cannot run say why
    peer_rows, peer_lines = [], []
    (ctx.work / "tta").mkdir(parents=True, exist_ok=True)
    untrained = ctx.untrained("resnet18")
    old = next((c for c in codes(ctx) if c.src is not None), None)  # --compare-with's revision, if any
    for d in sets(ctx.config.quick):
        train, val = directories(ctx, d)
        ctx.log(f"[tta] {d.name}: the designer's recipe")
        designer = timed([ctx.python, str(BENCH / "baseline_train.py"), "--training-data", str(train),
                          "--validation-data", str(val), "--model", "resnet18", "--image-size", str(d.size),
                          "--epochs", "5", "--json", str(ctx.work / "tta" / "designer.json")], ctx.env,
                         DESIGNER_EPOCH, ctx.log)
        ctx.log(f"[tta] {d.name}: imgtrain at its defaults")
        out = ctx.work / "tta" / "model"
        command = [ctx.python, "-m", "imgtrain", "train-pytorch-model", "--untrained-model", str(untrained),
                   "--training-data", str(train), "--validation-data", str(val), "--output", str(out),
                   "--overwrite", "--image-size", str(d.size)]
        mine = timed(command, ctx.env, IMGTRAIN_EPOCH, ctx.log)
        before = None
        if old is not None:
            ctx.log(f"[tta] {d.name}: imgtrain {old.name} at its defaults")
            before = timed(command, old.env(ctx), IMGTRAIN_EPOCH, ctx.log)
        target = designer.last
        bars = [(f"the recipe's final {100 * target:.1f}%", target), (f"{100 * d.bar:.0f}%", d.bar)]
        for what, bar in bars:
            a, b = designer.reached(bar), mine.reached(bar)
            row = [d.name if what == bars[0][0] else "", what, _secs(a), _secs(b), f"{a / b:.2f}x" if a and b else "-"]
            if before is not None:
                c = before.reached(bar)
                row += [_secs(c), f"{a / c:.2f}x" if a and c else "-"]
            rows.append(row)
        runs = tta_peers.run(ctx, peers, d, train, val)
        peer_rows += tta_peers.rows(d, target, mine, runs)
        peer_lines += tta_peers.lines(d, runs)
        lines.append(f"- {d.name} ({d.train:,} training / {d.val:,} validation images, {d.size} px): best top-1 "
                     f"designer {100 * designer.best:.1f}% (last {100 * designer.last:.1f}%), imgtrain "
                     f"{100 * mine.best:.1f}%" + (f", imgtrain {old.name} {100 * before.best:.1f}%" if before else "")
                     + f"; whole commands {num(designer.wall)} s and {num(mine.wall)} s"
                     + (f" ({num(before.wall)} s {old.name})" if before else "") + "; epochs at (s, top-1): designer "
                     + _epochs(designer) + "; imgtrain " + _epochs(mine)
                     + (f"; imgtrain {old.name} " + _epochs(before) if before else ""))
    return Section("Time to accuracy: imgtrain's defaults against the designer's recipe"
                   + (" and peers" if peers.runners else ""), [
        "ResNet-18 from scratch, whole commands one after another, each epoch's validation top-1 stamped with the "
        "seconds since its command started. The designer's recipe: `bench/baseline_train.py` (SGD, momentum 0.9, "
        "Nesterov, no augmentation, fp32, batch 16, learning rate 0.001, 5 epochs, the last kept); imgtrain: "
        "`train-pytorch-model` at its defaults with `--image-size` as the recipe's. 'not reached': never within its 5 "
        "epochs. Textures: `fixtures.texture_folder`, 128 x 128 JPEG stripes, checks and dots of random colours, "
        "scale and angle, with noise. The imbalanced set: digits 0-4 ten times as many as 5-9 in training, all "
        "alike in validation.",
        table(["data set", "validation top-1 reached", "designer's recipe, s", "imgtrain defaults, s",
               "imgtrain sooner by"] + ([f"imgtrain {old.name}, s", "sooner by"] if old else []), rows),
        "\n".join(lines),
        *tta_peers.text(peers),
        *([table(tta_peers.HEADERS, peer_rows), "\n".join(peer_lines)] if peers.runners else []),
    ])


def _secs(value: float | None) -> str:
    return num(value) if value is not None else "not reached"


def _epochs(t: Timed) -> str:
    return ", ".join(f"({s:.0f}, {100 * a:.1f}%)" for s, a in t.epochs)
