"""A peer of the `tta` section: Ultralytics' classify trainer, from scratch, as `yolo classify train` runs it.

Run by bench/tta_peers.py with the pinned Ultralytics folder first on PYTHONPATH, YOLO_OFFLINE=1,
YOLO_AUTOINSTALL=false and YOLO_CONFIG_DIR in the run's own folder. It is what

    yolo classify train model=yolov8n-cls.yaml data=ROOT imgsz=32 epochs=5 batch=16 device=cpu seed=1 \
        pretrained=False plots=False cache=ram project=DIR name=NAME exist_ok=True

does (the CLI calls the same ``YOLO(model).train(**arguments)``), with two things the CLI cannot do: the
settings that would reach the network or log elsewhere are turned off first (``sync``, the experiment trackers:
imgtrain's environment has MLflow, which Ultralytics would log to), and one line is printed after each epoch's
validation, for the benchmark to stamp: ``ultralytics epoch N/E val top-1 X%`` (the ``metrics/accuracy_top1``
that Ultralytics has just written to results.csv). Ultralytics' own defaults otherwise: its optimizer
(``optimizer=auto``), schedule, warm-up and augmentation; its ROOT layout is ``ROOT/train/<class>/*`` and
``ROOT/val/<class>/*``. No ``workers``: on a CPU its trainer sets them to 0 whatever is asked ("faster CPU
training as time dominated by inference, not dataloading"), which is why ``cache=ram`` (decode each image once,
before the first epoch) is its CPU speed option; it has no other on a CPU (its ``amp`` and ``channels_last``
are for CUDA only: on a CPU they are off or refused). Its device set-up also sets torch's threads to the cores less
one, at most 8 (1 on 2 cores), whatever OMP_NUM_THREADS says.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ROOT with train/<class>/* and val/<class>/*")
    parser.add_argument("--model", default="yolov8n-cls.yaml", help="a model yaml: from scratch")
    parser.add_argument("--imgsz", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", default="ram", help="Ultralytics' cache: ram, disk or False")
    parser.add_argument("--project", required=True)
    parser.add_argument("--name", default="run")
    args = parser.parse_args(argv)

    from ultralytics.utils import SETTINGS

    SETTINGS.update({"sync": False, "mlflow": False, "clearml": False, "comet": False, "dvc": False,
                     "raytune": False, "tensorboard": False, "wandb": False})
    from ultralytics import YOLO

    seen: set[int] = set()

    def epoch_end(trainer) -> None:  # after validation and results.csv
        epoch = trainer.epoch + 1  # final_eval (best.pt validated again) calls it once more, as epoch E + 1
        if epoch in seen or epoch > trainer.epochs or "metrics/accuracy_top1" not in trainer.metrics:
            return
        seen.add(epoch)
        top1 = 100 * float(trainer.metrics["metrics/accuracy_top1"])
        print(f"ultralytics epoch {epoch}/{trainer.epochs} val top-1 {top1:.4f}%", flush=True)

    model = YOLO(args.model, task="classify")
    model.add_callback("on_fit_epoch_end", epoch_end)
    model.train(data=args.data, imgsz=args.imgsz, epochs=args.epochs, batch=args.batch, device="cpu",
                seed=args.seed, pretrained=False, plots=False, cache=args.cache,
                project=args.project, name=args.name, exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
