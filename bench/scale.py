"""The scale-out section: one process against N under torchrun, training and scoring.

N is the number of GPUs where there are several, else the number of CPU cores (at most 8): on
CPUs the processes share the cores (each gets cores / N threads), so this measures what the
processes cost and gain on one machine, not a cluster.
"""

from __future__ import annotations

import os

import torch
from context import Context, read_metrics, steady_rate
from measure import REPO, Run, Section, num, ratio, run_measured, table


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def processes_here() -> int:
    gpus = torch.cuda.device_count()
    return gpus if gpus > 1 else min(8, available_cores())


def scale(ctx: Context) -> Section:
    n = processes_here()
    if n < 2:
        return Section("10. One process against N: skipped (one core, no second GPU)", [])
    cfg = ctx.config
    case = cfg.cases[0]
    train, val = ctx.case_data(case)
    untrained = ctx.untrained(case.model)
    env = {**ctx.env, "OMP_NUM_THREADS": str(max(1, available_cores() // n))}
    train_args = ["train", "--untrained-model", untrained, "--training-data", train, "--validation-data", val,
                  "--overwrite", "--epochs", cfg.epochs, "--patience", cfg.epochs, "--image-size", case.image_size,
                  "--batch-size", 16, *cfg.imgtrain_recipe_args()]
    rows = []
    alone = ctx.imgtrain(*train_args, "--output", ctx.work / "scale-1")
    several = _torchrun(ctx, n, env, *train_args, "--output", ctx.work / f"scale-{n}")
    rate_1 = steady_rate(read_metrics(ctx.work / "scale-1" / "metrics.csv"))
    rate_n = steady_rate(read_metrics(ctx.work / f"scale-{n}" / "metrics.csv"))
    ctx.log(f"[scale] training {case.name}: 1 process {rate_1:,.1f} img/s, {n} processes {rate_n:,.1f} img/s")
    rows.append([f"train {case.name}, {case.train_images:,} images, batch 16 per process", num(rate_1),
                 num(rate_n), ratio(rate_n, rate_1), num(alone.wall_seconds, 1), num(several.wall_seconds, 1)])

    model, score_case = ctx.scoring_model()
    dataset = ctx.work / "data" / f"score-{cfg.score_images}"
    if not dataset.exists():
        import fixtures

        ctx.imgtrain("convert-to-image-directory", fixtures.mnist_folder(ctx.cache, cfg.score_images),
                     "--output", dataset)
    score_args = ["score", "--trained-model", model, "--dataset", dataset, "--overwrite"]
    alone = ctx.imgtrain(*score_args, "--output", ctx.work / "scored-1")
    several = _torchrun(ctx, n, env, *score_args, "--output", ctx.work / f"scored-{n}")
    same = (ctx.work / "scored-1" / "scored.csv").read_text() == (ctx.work / f"scored-{n}" / "scored.csv").read_text()
    images = cfg.score_images
    ctx.log(f"[scale] scoring: 1 process {alone.wall_seconds:.1f} s, {n} processes {several.wall_seconds:.1f} s, "
            f"same table: {same}")
    rows.append([f"score {images:,} images with {score_case.name} (whole command){'' if same else ' (tables differ!)'}",
                 num(images / alone.wall_seconds), num(images / several.wall_seconds),
                 ratio(alone.wall_seconds, several.wall_seconds), num(alone.wall_seconds, 1),
                 num(several.wall_seconds, 1)])
    where = f"{torch.cuda.device_count()} GPUs" if torch.cuda.device_count() > 1 else f"{available_cores()} CPU cores"
    return Section(f"10. One process against {n} (torchrun, {where})", [
        f"The same command alone and under `torchrun --standalone --nproc-per-node {n}`; with CPUs only, each "
        f"process runs {env['OMP_NUM_THREADS']} thread(s) (OMP_NUM_THREADS), the lone one all {available_cores()}. "
        "Training img/s: the mean over epochs after the first, from metrics.csv; scoring: images over the whole "
        "command's wall time (start-up included). The scored tables are compared byte for byte.",
        table(["what", "1 process, img/s", f"{n} processes, img/s", "speed-up", "1 process, wall s",
               f"{n} processes, wall s"], rows),
    ])


def _torchrun(ctx: Context, n: int, env: dict, *args: object) -> Run:
    return run_measured([ctx.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
                         "imgtrain", *map(str, args)], env=env, cwd=REPO)
