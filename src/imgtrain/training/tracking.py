"""Where else a run reports its figures, as it goes: TensorBoard event files and MLflow.

Both are optional extras (``pip install 'imgtrain[tensorboard]'``, ``'imgtrain[mlflow]'``), imported
only when asked for; without the package, asking gives one line that says how to install it. Only
rank 0 tracks. A tracker never changes what is trained: it reads the figures the loop already has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from imgtrain.directories.atomic import atomic_file
from imgtrain.errors import MissingDependencyError, option
from imgtrain.training.loop import EpochMetrics, Watcher

DEFAULT_EVERY = 50  # steps between the running figures


MLFLOW_RUN_FILE = "mlflow-run-id"  # in the run's work directory: the MLflow run a resumed run goes on with


class Tracker(Watcher, Protocol):
    def finish(self, model: Path | None, interrupted: bool = False) -> None:
        """The run ended: with the published model directory, or None when it failed or was ``interrupted``
        (Ctrl-C, SIGTERM: it may be resumed)."""


def _require(module: str, extra: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{option(flag, True)} needs the {extra} package, which is not installed",
            f"install it with `pip install 'imgtrain[{extra}]'`") from None


class TensorBoard:
    """Event files in ``folder`` that TensorBoard opens (``tensorboard --logdir folder``): per epoch, every
    figure of metrics.csv under ``epoch/``; every ``every`` steps, the running training loss and the
    learning rate under ``step/``, on the global step."""

    def __init__(self, folder: Path, every: int = DEFAULT_EVERY) -> None:
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.every, self.last = every, 0
        self.writer = SummaryWriter(log_dir=str(folder))

    def step(self, step: int, loss: float, learning_rate: float) -> None:
        if step - self.last >= self.every:  # by distance: on a GPU the steps come every 50, across epochs
            self.last = step
            self.writer.add_scalar("step/train_loss", loss, step)
            self.writer.add_scalar("step/learning_rate", learning_rate, step)

    def epoch(self, metrics: EpochMetrics) -> None:
        for name, value in _figures(metrics).items():
            self.writer.add_scalar(f"epoch/{name}", value, metrics.epoch)
        self.writer.flush()

    def finish(self, model: Path | None, interrupted: bool = False) -> None:
        self.writer.close()


class MLflow:
    """An MLflow run: the parameters at the start, the figures per epoch (and every ``every`` steps),
    and the trained model directory as the artifact ``model`` at the end.

    Where to: ``uri``, else MLflow's own settings (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), else
    the folder ``mlruns`` here (MLflow's file store). The experiment is ``imgtrain`` unless
    MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID names one; the run is named after the output.

    The run's id is kept in the work directory (``MLFLOW_RUN_FILE``, in ``work``): a run resumed from its
    checkpoint goes on with the same MLflow run, first logging the epochs of the checkpoint's ``history`` it
    lacks (a run stopped after an epoch's checkpoint, before its figures reached MLflow), and never an epoch it
    has (one logged while its checkpoint was being written, beside the next epoch, when the run was killed:
    trained again, it has the same figures). An interrupted run
    ends as KILLED, a failed one as FAILED."""

    def __init__(self, uri: str | None, run_name: str, parameters: dict, every: int = DEFAULT_EVERY,
                 work: Path | None = None, history: list[EpochMetrics] = ()) -> None:
        mlflow = _require("mlflow", "mlflow", "mlflow")
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating experiment" lines
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").absolute().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store on request
        self.mlflow, self.every, self.last = mlflow, every, 0
        self.logged: set[int] = set()  # the epochs the MLflow run has: a resumed run logs each once
        mlflow.set_tracking_uri(uri)
        if not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            mlflow.set_experiment("imgtrain")
            # MLflow puts the experiment's id in MLFLOW_EXPERIMENT_ID: a second run in this process (a notebook),
            # with another store, took it for the user's and failed ("Could not find experiment with ID ...")
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        saved = work / MLFLOW_RUN_FILE if work is not None else None
        resumed = self._resumed(saved)
        self.run = resumed or mlflow.start_run(run_name=run_name)
        logged = self.run.data.params
        mlflow.log_params({k: str(v)[:500] for k, v in parameters.items() if k not in logged})  # MLflow's stay
        if resumed is not None:
            run_id = self.run.info.run_id
            self.logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "validation_loss")}
            for metrics in history:
                self.epoch(metrics)
        if saved is not None:
            with atomic_file(saved) as tmp:
                tmp.write_text(self.run.info.run_id + "\n", encoding="utf-8")

    def _resumed(self, saved: Path | None):
        """The MLflow run of the checkpoint this run resumes from, started again (None: there is none)."""
        try:
            run_id = saved.read_text(encoding="utf-8").strip() if saved is not None else ""
        except OSError:
            return None
        if not run_id:
            return None
        try:
            return self.mlflow.start_run(run_id=run_id)
        except self.mlflow.exceptions.MlflowException:  # another store now, or deleted: a new run
            return None

    def step(self, step: int, loss: float, learning_rate: float) -> None:
        if step - self.last >= self.every and math.isfinite(loss):
            self.last = step
            self.mlflow.log_metrics({"step_train_loss": loss, "step_learning_rate": learning_rate}, step=step)

    def epoch(self, metrics: EpochMetrics) -> None:
        if metrics.epoch in self.logged:  # logged before the run stopped (a kill while its checkpoint was written)
            return
        self.mlflow.log_metrics(_figures(metrics), step=metrics.epoch)
        self.logged.add(metrics.epoch)

    def finish(self, model: Path | None, interrupted: bool = False) -> None:
        try:
            if model is not None:
                self.mlflow.log_artifacts(str(model), artifact_path="model")
        finally:
            self.mlflow.end_run(status="FINISHED" if model is not None else "KILLED" if interrupted else "FAILED")


def _figures(metrics: EpochMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in asdict(metrics).items()
            if k != "epoch" and v is not None and math.isfinite(v)}


class Trackers:
    """The trackers of a run, each kept from stopping it: one that fails (an MLflow server gone) is named
    once and dropped, and training goes on."""

    def __init__(self, trackers: list[Tracker], log: Callable[[str], None]) -> None:
        self.active, self.log = list(trackers), log

    def _call(self, method: str, *args) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # any failure of a tracker: the run matters more
                self.active.remove(tracker)
                self.log(f"warning: {type(tracker).__name__} failed ({type(exc).__name__}: {exc}); "
                         "training goes on without it")

    def step(self, step: int, loss: float, learning_rate: float) -> None:
        self._call("step", step, loss, learning_rate)

    def epoch(self, metrics: EpochMetrics) -> None:
        self._call("epoch", metrics)

    def finish(self, model: Path | None, interrupted: bool = False) -> None:
        self._call("finish", model, interrupted)


@dataclass
class Tracking:
    """What a run was asked to report to: a TensorBoard folder, MLflow (True, or a tracking URI)."""

    tensorboard: Path | str | None = None
    mlflow: bool | str = False
    every: int = DEFAULT_EVERY  # steps between the running figures

    def check(self) -> None:
        """Before any work: the packages asked for are installed."""
        if self.tensorboard is not None:
            _require("tensorboard", "tensorboard", "tensorboard")
        if self.mlflow:
            _require("mlflow", "mlflow", "mlflow")

    def open(self, run_name: str, parameters: dict, work: Path | None = None,
             history: list[EpochMetrics] = ()) -> list[Tracker]:
        """The trackers of a run; ``work``: its work directory (where MLflow keeps its run's id for a resume),
        ``history``: the epochs a resumed run's checkpoint has done."""
        trackers: list[Tracker] = []
        if self.tensorboard is not None:
            trackers.append(TensorBoard(Path(self.tensorboard), self.every))
        if self.mlflow:
            trackers.append(MLflow(self.mlflow if isinstance(self.mlflow, str) else None, run_name, parameters,
                                   self.every, work, history))
        return trackers
