"""The six measurements. Each takes the shared Context and returns a Section: a title and markdown blocks."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from statistics import median

import fixtures
import torch
import torchvision
from context import Case, Context, TrainCase, parse_training_log, read_metrics, steady_rate
from engines import engines
from gpu import gpu
from measure import CommandFailed, Section, med, num, python_startup_seconds, ratio, spread, table
from peer_bench import peer
from responsiveness import shared_cpu, startup
from scale import scale
from serving import serving
from torch import nn
from tta import time_to_accuracy
from ui import ui
from zoo import zoo

# --- 1. training throughput ----------------------------------------------------------------------------------

def training_throughput(ctx: Context) -> Section:
    cfg = ctx.config
    rows = []
    for case in cfg.cases:
        train, val = ctx.case_data(case)
        untrained = ctx.untrained(case.model)
        result = TrainCase(case)
        for rep in range(cfg.reps):
            # Alternate which side goes first, so that a drift in the machine's speed hits both alike.
            for side in ("imgtrain", "baseline") if rep % 2 == 0 else ("baseline", "imgtrain"):
                out = ctx.work / "train" / case.slug / f"{side}-{rep}"
                if side == "imgtrain":
                    run, metrics = ctx.train_imgtrain(case, untrained, train, val, out)
                    result.imgtrain_runs.append(run)
                    result.imgtrain_metrics.append(metrics)
                    result.imgtrain_log = parse_training_log(run.stderr)
                    result.last_model = out
                    rate = steady_rate(metrics)
                else:
                    out.mkdir(parents=True, exist_ok=True)
                    run, epochs = ctx.train_baseline(case, train, val, out / "result.json")
                    result.baseline_runs.append(run)
                    result.baseline_epochs.append(epochs)
                    rate = steady_rate(epochs)
                ctx.log(f"[train] {case.name} rep {rep + 1}/{cfg.reps} {side}: {rate:,.1f} img/s, "
                        f"{run.wall_seconds:.1f} s")
        ctx.train_results[case.slug] = result
        ctx.memory.append((f"train-pytorch-model, {case.name}", result.imgtrain_runs))
        ctx.memory.append((f"baseline training, {case.name}", result.baseline_runs))
        i_wall = med([r.wall_seconds for r in result.imgtrain_runs])
        b_wall = med([r.wall_seconds for r in result.baseline_runs])
        rows.append([
            case.name, f"{case.data} {case.train_images:,}/{case.val_images:,} x {cfg.epochs}",
            f"{result.imgtrain_log['precision']}, {result.imgtrain_log['workers']} workers",
            num(result.imgtrain_rate()), num(result.baseline_rate()),
            ratio(result.imgtrain_rate(), result.baseline_rate()),
            num(i_wall), num(b_wall), ratio(i_wall, b_wall),
            spread(result.imgtrain_rates()), spread(result.baseline_rates()),
        ])
    recipe = ("with `--optimizer sgd --augmentation none`, so that both do the same work"
              if cfg.imgtrain_recipe == "designer" else "at its defaults (AdamW, shift augmentation)")
    if cfg.imgtrain_extra:
        recipe += f", and `{' '.join(cfg.imgtrain_extra)}`"
    return Section("1. Training throughput: imgtrain vs the designer's recipe", [
        "Same images, same model (from scratch), same epochs, batch size 16. imgtrain runs through its CLI "
        f"(`python -m imgtrain train-pytorch-model ... --image-size N --epochs {cfg.epochs}`) {recipe}; the "
        "baseline is `bench/baseline_train.py`: fp32, PIL decoding in the main process every epoch, SGD "
        "(momentum 0.9, Nesterov, weight decay 1e-4), mean/std 0.5. Both validate after every epoch. img/s is "
        "what each reports for its training loop (imgtrain: `train_images_per_second` in metrics.csv), the "
        "mean over epochs 2 and later when there are several (epoch 1 pays start-up); wall is the whole "
        f"command, Python start-up included. Median of {cfg.reps} repetition(s), sides alternating.",
        table(["case", "data (train/val x epochs)", "imgtrain precision", "imgtrain img/s", "baseline img/s",
               "img/s imgtrain/baseline (>1: imgtrain faster)", "imgtrain wall s", "baseline wall s",
               "wall imgtrain/baseline (<1: imgtrain faster)", "imgtrain img/s, each rep",
               "baseline img/s, each rep"], rows),
    ])


# --- 2. FLOP/s against the machine's peak --------------------------------------------------------------------

def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              bf16: bool) -> None:
    """One synchronous training step (the loss is read back, as a training loop does)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss.item()


def flops(ctx: Context) -> Section:
    cfg = ctx.config
    peak, peak_rows = {}, []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        measured = {what: _peak_rates(op, dtype, cfg.matmul_reps) for what, op in PEAK_PRODUCTS.items()}
        peak[dtype_name] = max(median(rates) for rates in measured.values())
        for what, rates in measured.items():
            used = "yes" if median(rates) == peak[dtype_name] else ""
            peak_rows.append([dtype_name, what, num(median(rates) / 1e9), spread([r / 1e9 for r in rates]), used])
        ctx.log(f"[flops] {dtype_name} peak " + ", ".join(f"{what.split(' (')[0]} {median(r) / 1e9:,.0f} GFLOP/s"
                                                          for what, r in measured.items()))
    rows = []
    for case in cfg.cases:
        per_image = _training_flops_per_image(case)
        steps = cfg.compute_steps if case.image_size < 224 else max(1, cfg.compute_steps // 3)
        fp32 = _compute_only_rate(case, steps, bf16=False)
        bf16 = _compute_only_rate(case, steps, bf16=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fp32_one = _compute_only_rate(case, steps, bf16=False)
        finally:
            torch.set_num_threads(threads)
        ctx.log(f"[flops] {case.name}: {per_image / 1e9:.2f} GFLOP/image, compute-only {fp32:,.1f} img/s fp32, "
                f"{bf16:,.1f} img/s bf16, {fp32_one:,.1f} img/s fp32 on 1 thread")
        trained = ctx.train_results.get(case.slug)
        for what, rate in [(f"compute only, fp32, {threads} threads", fp32),
                           (f"compute only, bf16 autocast, {threads} threads", bf16),
                           ("compute only, fp32, 1 thread", fp32_one),
                           ("imgtrain (section 1)", trained.imgtrain_rate() if trained else None),
                           ("baseline (section 1)", trained.baseline_rate() if trained else None)]:
            achieved = per_image * rate if rate is not None else None
            rows.append([case.name, num(per_image / 1e9, 2), what, num(rate),
                         num(achieved / 1e9 if achieved else None),
                         _percent(achieved, peak["fp32"]), _percent(achieved, peak["bf16"])])
    notes = "" if ctx.train_results else " Section 1 did not run, so only the compute-only rows have figures."
    return Section("2. Achieved training FLOP/s vs the machine's matrix-product peak", [
        f"Peak: `torch.matmul` of two 2048 x 2048 matrices, and a 3x3 convolution (oneDNN) for comparison, "
        f"median of {cfg.matmul_reps} after a warm-up, {torch.get_num_threads()} threads. The higher of the two is "
        "the peak the percentages below divide by (x86 PyTorch wheels do fp32 matmul with MKL, which may not use "
        "all of a non-Intel CPU; convolutions go through oneDNN).",
        table(["dtype", "product", "GFLOP/s (median)", "each rep", "used as peak"], peak_rows),
        "FLOPs per training image: `torch.utils.flop_counter.FlopCounterMode` over one forward and backward "
        "pass (matrix products and convolutions only; normalisation and activations are not counted). "
        "Compute-only: forward, backward and an SGD step on a fixed random batch of 16 in this process, no data "
        "loading: the ceiling that the data pipeline and the loop can at best reach (the 1-thread row shows "
        "how much the intra-op threads gain, or lose when the cores are shared). Achieved = FLOPs/image x "
        "img/s." + notes,
        table(["case", "GFLOP/image (fwd+bwd)", "what", "img/s", "achieved GFLOP/s", "% of fp32 peak",
               "% of bf16 peak"], rows),
    ])


def _matmul(dtype: torch.dtype, n: int = 2048) -> tuple[Callable[[], object], float]:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: torch.matmul(a, b), 2 * n**3


def _conv3x3(dtype: torch.dtype, batch: int = 16, channels: int = 256, side: int = 28) -> tuple[Callable, float]:
    x = torch.randn(batch, channels, side, side).to(dtype)
    w = torch.randn(channels, channels, 3, 3).to(dtype)
    return lambda: nn.functional.conv2d(x, w, padding=1), 2 * batch * channels * channels * 9 * side * side


PEAK_PRODUCTS = {
    "matmul 2048 x 2048 @ 2048 x 2048": _matmul,
    "conv 3x3, 16 x 256 x 28 x 28, 256 filters (oneDNN)": _conv3x3,
}


def _peak_rates(make: Callable, dtype: torch.dtype, reps: int) -> list[float]:
    op, flop = make(dtype)
    for _ in range(3):
        op()
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        op()
        rates.append(flop / (time.perf_counter() - started))
    return rates


def _model(case: Case) -> nn.Module:
    return getattr(torchvision.models, case.model)(weights=None, num_classes=case.num_classes)


def _training_flops_per_image(case: Case, batch: int = 2) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(case).train()
    x = torch.randn(batch, 3, case.image_size, case.image_size)
    y = torch.randint(0, case.num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def _compute_only_rate(case: Case, steps: int, *, bf16: bool, batch: int = 16) -> float:
    torch.manual_seed(1)
    model = _model(case).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(batch, 3, case.image_size, case.image_size)
    y = torch.randint(0, case.num_classes, (batch,))

    def step() -> None:
        _sgd_step(model, optimizer, x, y, bf16)

    step()  # warm-up: allocations, oneDNN primitive creation
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def _percent(part: float | None, whole: float) -> str:
    return "—" if part is None else f"{100 * part / whole:.1f}%"


# --- 3. waiting for data -------------------------------------------------------------------------------------

DATA_WAIT_COLUMN = "data_wait_fraction"


def data_wait(ctx: Context) -> Section:
    cfg = ctx.config
    blocks = []
    reported = [(r.case, r.imgtrain_metrics) for r in ctx.train_results.values()
                if r.imgtrain_metrics and DATA_WAIT_COLUMN in r.imgtrain_metrics[0][0]]
    if reported:
        rows = []
        for case, reps in reported:
            per_epoch = [median(float(m[e][DATA_WAIT_COLUMN]) for m in reps) for e in range(len(reps[0]))]
            rows.append([case.name, ", ".join(f"{100 * f:.1f}%" for f in per_epoch)])
        blocks += [f"What imgtrain reports (`{DATA_WAIT_COLUMN}` in metrics.csv, section 1's runs, median over "
                   "repetitions):", table(["case", "data-wait share, epoch 1, 2, ..."], rows)]
    elif ctx.train_results:
        blocks.append(f"imgtrain does not report it: its metrics.csv has no `{DATA_WAIT_COLUMN}` column.")
    else:
        blocks.append(f"Section 1 did not run, so what imgtrain reports (`{DATA_WAIT_COLUMN}`) is not shown.")

    rows = []
    for case in cfg.cases:
        train, _ = ctx.case_data(case)
        for loader_name, measure in ((f"imgtrain's DataLoader, {imgtrain_auto_precision()}", _imgtrain_loader_wait),
                                     ("designer's (PIL in the main process), fp32", _designer_loader_wait)):
            try:
                first, waits, steps = measure(ctx, case, train)
            except (ImportError, AttributeError, TypeError) as exc:  # imgtrain's internals moved: say so
                rows.append([case.name, loader_name, f"not available ({exc})", "", "", "", ""])
                continue
            share = sum(waits) / (sum(waits) + sum(steps)) if waits else None
            ctx.log(f"[datawait] {case.name}, {loader_name}: {_percent(share, 1) if share is not None else '—'}")
            rows.append([case.name, loader_name, len(waits) + 1, num(first, 2),
                         num(1000 * median(waits) if waits else None), num(1000 * median(steps) if steps else None),
                         _percent(share, 1) if share is not None else "—"])
    blocks += [
        "Measured here: a training loop (SGD) in this process over at most "
        f"{cfg.datawait_batches} batches of one epoch, timing the wait for each batch apart from the step "
        "(forward, backward, optimiser). imgtrain's DataLoader is set up as train.py does it (its ImageDataset "
        f"and sampler, transforms with augmentation `{'none' if cfg.imgtrain_recipe == 'designer' else 'shift'}`, "
        "one worker per core up to 8, batch 16), with the precision its `--precision auto` picks here; the "
        "designer's loop decodes in the main process, in fp32. The first batch (worker start-up) is shown "
        "apart and left out of the share.",
        table(["case", "loader", "batches", "first batch s", "wait ms/batch (median)", "step ms/batch (median)",
               "data-wait share"], rows),
    ]
    return Section("3. Share of step time spent waiting for data", blocks)


TimedLoop = tuple[float, list[float], list[float]]  # first batch's wait, then each later batch's wait and step


def _timed_loop(loader, model: nn.Module, prepare: Callable, max_batches: int, *, bf16: bool = False) -> TimedLoop:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    waits, steps = [], []
    batches = iter(loader)
    for _ in range(min(max_batches, len(loader))):
        started = time.perf_counter()
        x, y = prepare(next(batches))
        ready = time.perf_counter()
        _sgd_step(model, optimizer, x, y, bf16)
        waits.append(ready - started)
        steps.append(time.perf_counter() - ready)
    del batches  # shuts the workers down
    return waits[0], waits[1:], steps[1:]


def imgtrain_auto_precision() -> str:
    """The precision imgtrain's ``--precision auto`` picks on this CPU (fp32 before imgtrain had the flag)."""
    try:
        from imgtrain.precision import resolve_precision
    except ImportError:
        return "fp32"
    return resolve_precision("auto", torch.device("cpu"))


def _imgtrain_loader_wait(ctx: Context, case: Case, train) -> TimedLoop:
    from torch.utils.data import DataLoader

    from imgtrain.data import dataset as imgtrain_dataset
    from imgtrain.data.transforms import Normalize, build_augmentation
    from imgtrain.directories.image_directory import ImageDirectory
    from imgtrain.models.registry import IMAGENET_MEAN, IMAGENET_STD

    data = ImageDirectory.load(train)
    augmentation = "none" if ctx.config.imgtrain_recipe == "designer" else "shift"
    images = imgtrain_dataset.ImageDataset([data.path(i) for i in range(len(data))], data.labels, case.image_size,
                                           augment=build_augmentation(case.image_size, augmentation))
    workers = min(8, os.cpu_count() or 1)
    try:
        from imgtrain.data.loading import Feeder  # the loader set-up train.py itself uses
    except ImportError:  # an older revision (--compare-with): its set-up, as train.py had it
        order: dict = dict(shuffle=True, generator=torch.Generator().manual_seed(1))
        if hasattr(imgtrain_dataset, "SeededSampler"):
            order = dict(sampler=imgtrain_dataset.SeededSampler(len(images), 1, shuffle=True))
        loader = DataLoader(images, batch_size=16, num_workers=workers, drop_last=len(images) % 16 == 1, **order)
    else:
        loader = Feeder(images, imgtrain_dataset.SeededSampler(len(images), 1, shuffle=True), batch_size=16,
                        workers=workers, device=torch.device("cpu"), drop_last=len(images) % 16 == 1).epoch(1)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(1)
    return _timed_loop(loader, _model(case), lambda batch: (normalize(batch[0]), batch[1]),
                       ctx.config.datawait_batches, bf16=imgtrain_auto_precision() == "bf16")


def _designer_loader_wait(ctx: Context, case: Case, train) -> TimedLoop:
    from baseline_train import ImageListDataset, designer_transform, read_image_directory
    from torch.utils.data import DataLoader

    paths, labels, _ = read_image_directory(train)
    loader = DataLoader(ImageListDataset(paths, labels, designer_transform(case.image_size)), batch_size=16,
                        shuffle=True, num_workers=0, drop_last=len(paths) % 16 == 1)
    torch.manual_seed(1)
    return _timed_loop(loader, _model(case), lambda batch: batch, ctx.config.datawait_batches)


# --- 4. scoring ----------------------------------------------------------------------------------------------

def scoring(ctx: Context) -> Section:
    cfg = ctx.config
    model, case = ctx.scoring_model()
    source = fixtures.mnist_folder(ctx.cache, cfg.score_images)
    dataset = ctx.work / "data" / f"score-{cfg.score_images}"
    if not dataset.exists():
        ctx.imgtrain("convert-to-image-directory", source, "--output", dataset)
    startup = python_startup_seconds(ctx.python, "imgtrain.scoring.score", max(1, cfg.reps))
    batched, single, loop_seconds = [], [], []
    for rep in range(cfg.reps):
        for side in ("imgtrain", "single") if rep % 2 == 0 else ("single", "imgtrain"):
            out = ctx.work / "score" / f"{side}-{rep}"
            if side == "imgtrain":
                run = ctx.imgtrain("score-image-model", "--trained-model", model, "--dataset", dataset,
                                   "--output", out, "--overwrite")
                batched.append(run)
            else:
                out.mkdir(parents=True, exist_ok=True)
                run = ctx.script("baseline_score.py", "--trained-model", model, "--dataset", dataset,
                                 "--output", out / "scored.csv", "--json", out / "result.json")
                single.append(run)
                loop_seconds.append(json.loads((out / "result.json").read_text())["loop_seconds"])
            ctx.log(f"[score] rep {rep + 1}/{cfg.reps} {side}: {run.wall_seconds:.1f} s")
    ctx.memory.append((f"score-image-model, {case.name}", batched))
    ctx.memory.append((f"per-image scoring loop, {case.name}", single))
    n = cfg.score_images
    b_wall, s_wall = med([r.wall_seconds for r in batched]), med([r.wall_seconds for r in single])

    def rate(seconds: float | None) -> float | None:
        return n / seconds if seconds and seconds > 0 else None

    rows = [
        ["`imgtrain score-image-model` (batches of 64, DataLoader workers)", num(b_wall, 2),
         spread([r.wall_seconds for r in batched], 2), num(rate(b_wall)), num(rate(b_wall - startup)), "—"],
        ["per-image loop (`bench/baseline_score.py`)", num(s_wall, 2), spread([r.wall_seconds for r in single], 2),
         num(rate(s_wall)), num(rate(s_wall - startup)), num(rate(med(loop_seconds)))],
        ["ratio imgtrain / per-image", "", "", ratio(rate(b_wall), rate(s_wall)),
         ratio(rate(b_wall - startup), rate(s_wall - startup)), ""],
    ]
    return Section("4. Scoring throughput: batched vs one image at a time", [
        f"{n:,} MNIST digits (an ImageDirectory), scored by {case.name} (the model trained in section 1, or a "
        "1-epoch one). Both are whole commands that load the model and write a CSV of probabilities. "
        f"Python start-up and imports (`python -c 'import imgtrain.scoring.score'`) take {startup:.2f} s; "
        f"the column after whole-command img/s takes that off. Median of {cfg.reps} repetition(s).",
        table(["method", "wall s (median)", "wall s, each rep", "img/s, whole command",
               "img/s, minus start-up", "img/s, scoring loop only"], rows),
    ])


# --- 5. peak memory ------------------------------------------------------------------------------------------

def memory(ctx: Context) -> Section:
    cfg = ctx.config
    if not ctx.train_results:
        case = cfg.cases[0]
        train, val = ctx.case_data(case)
        out = ctx.work / "memory"
        out.mkdir(parents=True, exist_ok=True)
        run, _ = ctx.train_imgtrain(case, ctx.untrained(case.model), train, val, out / "imgtrain")
        ctx.memory.append((f"train-pytorch-model, {case.name}", [run]))
        run, _ = ctx.train_baseline(case, train, val, out / "baseline.json")
        ctx.memory.append((f"baseline training, {case.name}", [run]))

    started = time.perf_counter()
    source = fixtures.many_small_pngs(ctx.cache, cfg.convert_images)
    ctx.log(f"[memory] {cfg.convert_images:,} small PNG files ready in {time.perf_counter() - started:.1f} s")
    output = ctx.work / "convert-large"
    convert = ctx.imgtrain("convert-to-image-directory", source, "--output", output, "--overwrite")
    shutil.rmtree(output, ignore_errors=True)
    ctx.log(f"[memory] converted {cfg.convert_images:,} images in {convert.wall_seconds:.1f} s, "
            f"max RSS {convert.max_rss_mb:,.0f} MB")
    ctx.memory.append((f"convert-to-image-directory, {cfg.convert_images:,} 28x28 PNG files "
                       f"({cfg.convert_images / convert.wall_seconds:,.0f} images/s)", [convert]))
    rows = [[what, len(runs), num(med([r.wall_seconds for r in runs])), num(max(r.max_rss_mb for r in runs), 0),
             num(max(r.peak_tree_pss_mb for r in runs), 0)] for what, runs in ctx.memory if runs]
    return Section("5. Peak memory", [
        "Every command this run measured. max RSS: `ru_maxrss` of the command from `wait4`, the largest "
        "single process (the main one, or a DataLoader worker); tree PSS: the peak, sampled every 0.25 s, of "
        "the proportional set size summed over the command and all its worker processes (pages shared between "
        "processes counted once), the figure that tells whether a machine runs out of memory.",
        table(["command", "runs", "wall s (median)", "max RSS MB (max over runs)", "peak tree PSS MB"], rows),
    ])


# --- 6. accuracy parity fp32 vs bf16 ----------------------------------------------------------------------------

def precision_parity(ctx: Context) -> Section:
    cfg = ctx.config
    title = "6. Accuracy parity: fp32 vs bf16"
    help_text = ctx.imgtrain("train-pytorch-model", "--help").stdout
    if "--precision" not in help_text:
        return Section(title, ["Not available: `imgtrain train-pytorch-model --help` does not list `--precision`."])
    count = cfg.parity_images
    train, val = ctx.image_directories(fixtures.mnist_folder(ctx.cache, count), f"parity-{count}",
                                       round(count * 0.9), count - round(count * 0.9))
    untrained = ctx.untrained("resnet18")
    epochs = cfg.parity_epochs
    rows, best = [], {"fp32": [], "bf16": []}
    for seed in cfg.parity_seeds:
        for precision in ("fp32", "bf16"):
            out = ctx.work / "parity" / f"{precision}-{seed}"
            try:
                run = ctx.imgtrain("train-pytorch-model", "--untrained-model", untrained, "--training-data", train,
                                   "--validation-data", val, "--output", out, "--overwrite", "--epochs", epochs,
                                   "--patience", epochs, "--precision", precision, "--random-seed", seed)
            except CommandFailed as exc:
                rows.append([precision, seed, f"failed: {str(exc).splitlines()[-1]}", "", "", "", "", "", ""])
                continue
            ctx.memory.append((f"train-pytorch-model --precision {precision}, MNIST {count:,}", [run]))
            metrics = read_metrics(out / "metrics.csv")
            top = min(metrics, key=lambda m: float(m["validation_loss"]))
            best[precision].append(float(top["validation_top1_accuracy"]))
            ctx.log(f"[precision] {precision} seed {seed}: best top-1 {best[precision][-1]:.2%}, "
                    f"{run.wall_seconds:.1f} s")
            rows.append([precision, seed, parse_training_log(run.stderr)["precision"], top["epoch"],
                         f"{best[precision][-1]:.2%}", f"{float(top['validation_loss']):.4f}",
                         f"{float(metrics[-1]['validation_top1_accuracy']):.2%}", num(steady_rate(metrics)),
                         num(run.wall_seconds)])
    blocks = [
        f"ResNet-18 from scratch on {count:,} MNIST digits (split 0.9 / 0.1), imgtrain's defaults otherwise, "
        f"{epochs} epoch(s) each (patience {epochs}, so no early stop), one run per precision and training seed "
        f"({', '.join(map(str, cfg.parity_seeds))}).",
        table(["--precision", "--random-seed", "precision it reports", "best epoch", "best val top-1",
               "best val loss", "last-epoch val top-1", "img/s", "wall s"], rows),
    ]
    if best["fp32"] and len(best["fp32"]) == len(best["bf16"]):
        diffs = [100 * (b - f) for b, f in zip(best["bf16"], best["fp32"], strict=True)]
        mean = {p: 100 * sum(v) / len(v) for p, v in best.items()}
        blocks.append(f"bf16 - fp32 best validation top-1, per seed: {', '.join(f'{d:+.2f}' for d in diffs)} "
                      f"points; mean {sum(diffs) / len(diffs):+.2f} points (mean fp32 {mean['fp32']:.2f}%, "
                      f"mean bf16 {mean['bf16']:.2f}%).")
    return Section(title, blocks)


SECTIONS: dict[str, tuple[Callable[[Context], Section], str]] = {
    "tta": (time_to_accuracy, "time to accuracy: imgtrain's defaults against the designer's recipe and peers (timm, "
                               "Ultralytics, fastai: --peers), whole commands"),
    "train": (training_throughput, "training throughput, imgtrain vs the designer's recipe"),
    "flops": (flops, "achieved FLOP/s vs the matmul peak"),
    "datawait": (data_wait, "share of step time waiting for data"),
    "score": (scoring, "batched scoring vs a per-image loop"),
    "memory": (memory, "peak memory of training, scoring and converting many files"),
    "precision": (precision_parity, "fp32 vs bf16 accuracy, if imgtrain has --precision"),
    "startup": (startup, "each command's wall time on a tiny input, and the six-command pipeline"),
    "shared": (shared_cpu, "training speed beside one and two busy processes"),
    "gpu": (gpu, "CUDA training speed vs the designer's recipe, FLOP/s, data wait (skipped without a GPU)"),
    "scale": (scale, "training and scoring, one process against N under torchrun"),
    "serve": (serving, "imgtrain serve under 1, 8 and 32 clients, batched and one at a time, vs a bare call"),
    "zoo": (zoo, "six architectures from scratch on the digits: training and scoring img/s, time to 97%"),
    "ui": (ui, "imgtrain ui: first page, opening 20,000 images, training from the page vs the CLI, live curves"),
    "engines": (engines, "the network at batch 16 in torch, ONNX Runtime and OpenVINO (fp32, bf16, int8) with each "
                         "one's accuracy; scoring 2,000 photos and serving with --engine auto and an int8 export"),
    "peer": (peer, "imgtrain serve against LitServe (installed pinned into the cache): 1 and 32 clients, after a "
                   "sweep of LitServe's batching settings"),
}
