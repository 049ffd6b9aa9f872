"""The `zoo` section: which architecture trains to a good model fastest on this CPU.

Each model is built from scratch (`imgtrain image-model --no-pretrained`) and trained by
`imgtrain train-pytorch-model` at imgtrain's defaults (5 epochs, batch 16, learning rate 0.001, the image
size it chooses: 32 px for the digits) on the same MNIST digits (the demo's 5,000, split 80/20 with seed 1),
then scores the validation images with `imgtrain score-image-model`. Models run one after another,
whole commands, on the same machine in one run. Reported per model: training img/s (epochs 2..), the
whole training command's wall time, the best validation top-1, the seconds of training until the first
epoch at or above TARGET validation top-1 (the sum of metrics.csv's epoch seconds; "not reached" if
never), and scoring img/s (whole command).
"""

from __future__ import annotations

import fixtures
from context import Context, read_metrics, steady_rate
from measure import Section, num, table

MODELS = ("resnet18", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
          "shufflenet_v2_x1_0")
TARGET = 0.97  # validation top-1 that counts as a good digit model


def zoo(ctx: Context) -> Section:
    count = 500 if ctx.config.quick else 5000
    train, val = ctx.image_directories(fixtures.mnist_folder(ctx.cache, count), f"zoo-{count}",
                                       count * 4 // 5, count // 5)
    epochs = 1 if ctx.config.quick else 5
    rows = []
    for name in MODELS:
        untrained, model, scored = (ctx.work / "zoo" / name / part for part in ("untrained", "model", "scored"))
        ctx.imgtrain("image-model", "--model-name", name, "--no-pretrained", "--output", untrained, "--overwrite")
        run = ctx.imgtrain("train-pytorch-model", "--untrained-model", untrained, "--training-data", train,
                           "--validation-data", val, "--output", model, "--overwrite", "--epochs", epochs)
        metrics = read_metrics(model / "metrics.csv")
        accuracies = [float(m["validation_top1_accuracy"]) for m in metrics]
        elapsed, reached = 0.0, None
        for m, accuracy in zip(metrics, accuracies, strict=True):
            elapsed += float(m["seconds"])
            if accuracy >= TARGET:
                reached = elapsed
                break
        score = ctx.imgtrain("score-image-model", "--trained-model", model, "--dataset", val, "--output", scored,
                             "--overwrite")
        ctx.log(f"[zoo] {name}: {run.wall_seconds:.0f} s, best {max(accuracies):.3f}")
        rows.append([f"`{name}`", num(steady_rate(metrics)), num(run.wall_seconds), f"{100 * max(accuracies):.1f}%",
                     num(reached) if reached is not None else "not reached", num((count // 5) / score.wall_seconds)])
    return Section("Architectures from scratch on the digits: speed and time to a good model", [
        f"{count:,} MNIST digits (80% training, 20% validation), each architecture from scratch at imgtrain's "
        f"defaults ({epochs} epochs, batch 16, learning rate 0.001, the image size it chooses), one after another "
        f"in one run. Time to {100 * TARGET:.0f}%: training seconds until the first epoch at or above it.",
        table(["model", "training img/s (epochs 2..)", "training command, s", "best validation top-1",
               f"s to {100 * TARGET:.0f}% validation top-1", "scoring img/s (whole command)"], rows),
    ])
