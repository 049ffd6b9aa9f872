"""Where a run reports besides its own files: TensorBoard, MLflow; and what it prints, on a terminal or not."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import make_labelled_folder, run_cli, training_in_background
from imgtrain import train_pytorch_model
from imgtrain.training.tracking import TensorBoard, Tracking


def _history(model: Path) -> list[dict]:
    with open(model / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, image_dirs) -> dict:
    """One training run from the command line (stderr a pipe, as in CI) reporting to TensorBoard and MLflow."""
    root, d = tmp_path_factory.mktemp("tracked"), image_dirs
    store = (root / "mlruns").as_uri()
    r = run_cli("train", "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data",
                d["val"], "--output", root / "m", "--epochs", "2", "--batch-size", "8", "--image-size", "32",
                "--num-workers", "0", "--tensorboard", root / "tb", "--mlflow", store, "--log-every", "2",
                env={"MLFLOW_EXPERIMENT_NAME": "shades"})
    return {"run": r, "model": root / "m", "tb": root / "tb", "store": store}


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked["tb"]), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/train_loss", "epoch/validation_loss", "epoch/validation_top1_accuracy", "epoch/learning_rate",
            "epoch/train_images_per_second", "step/train_loss", "step/learning_rate"} <= tags
    rows = _history(tracked["model"])
    validation = events.Scalars("epoch/validation_loss")
    assert [e.step for e in validation] == [1, 2]
    assert [e.value for e in validation] == pytest.approx([float(r["validation_loss"]) for r in rows], rel=1e-6)
    # 27 training images in batches of 8: 4 steps an epoch, numbered across epochs; every second one
    assert [e.step for e in events.Scalars("step/train_loss")] == [2, 4, 6, 8]


def test_mlflow_logs_parameters_metrics_and_the_model(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store on request only

    assert "warning" not in tracked["run"].stderr, tracked["run"].stderr
    client = MlflowClient(tracking_uri=tracked["store"])
    experiment = client.get_experiment_by_name("shades")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["architecture"] == "resnet18"
    assert run.data.params["class_weights"] == "none" and run.data.params["image_size"] == "32"
    history = sorted(client.get_metric_history(run.info.run_id, "validation_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(
        [float(r["validation_loss"]) for r in _history(tracked["model"])], rel=1e-6)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "step_train_loss")} == {2, 4, 6, 8}
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model.safetensors", "model_spec.yaml", "metrics.csv", "report.html"} <= artifacts


def test_sigterm_says_how_to_resume_and_the_resumed_run_goes_on_with_the_killed_mlflow_run(tmp_path, image_dirs,
                                                                                             monkeypatch):
    """SIGTERM (`kill`, a scheduler, a container stopping) to a one-process run: one line saying how to resume,
    exit 143, the MLflow run ended as KILLED (it stayed RUNNING); --resume then goes on with that MLflow run."""
    import signal

    from mlflow.tracking import MlflowClient

    from imgtrain.training.checkpoint import checkpoint_epoch

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    d, store, log = image_dirs, (tmp_path / "mlruns").as_uri(), tmp_path / "run.log"
    args = ["train", "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data", d["val"],
            "--output", tmp_path / "m", "--batch-size", "8", "--image-size", "32", "--num-workers", "0",
            "--patience", "40", "--mlflow", store]
    with training_in_background(log, *args[1:], "--epochs", "40") as proc:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    said = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in said, said
    assert said.strip().splitlines()[-1] == ("error: terminated (SIGTERM); no output was written (re-run with "
                                             "--resume to continue from the last epoch)")
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("imgtrain")
    [killed] = client.search_runs([experiment.experiment_id])
    assert killed.info.status == "KILLED"
    done = checkpoint_epoch(tmp_path / ".imgtrain-resume-m" / "checkpoint.safetensors")
    assert not (tmp_path / "m").exists() and done >= 1
    run_cli(*args, "--epochs", done + 1, "--resume")
    [resumed] = client.search_runs([experiment.experiment_id])
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    history = client.get_metric_history(resumed.info.run_id, "validation_loss")
    assert sorted({m.step for m in history}) == list(range(1, done + 2))
    assert {Path(a.path).name for a in client.list_artifacts(resumed.info.run_id, "model")} >= {"model.safetensors"}
    assert not any("mlflow" in f.name for f in (tmp_path / "m").iterdir())  # its run's id stayed in the work folder


def test_an_epoch_checkpointed_but_not_yet_logged_is_logged_on_resume(tmp_path, image_dirs, monkeypatch):
    """Ctrl-C or SIGTERM between an epoch's checkpoint and its figures reaching MLflow (a call to a server, after
    the checkpoint): the resumed run, which goes on after that epoch, logs its figures first, so that the MLflow
    run has every epoch once (that epoch was missing from it for good)."""
    from mlflow.tracking import MlflowClient

    from imgtrain.training.tracking import MLflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    d, store = image_dirs, (tmp_path / "mlruns").as_uri()
    logged = MLflow.epoch

    def interrupted_at_epoch_1(self, metrics) -> None:
        if metrics.epoch == 1:
            raise KeyboardInterrupt  # as the signal's handler raises it in the middle of the call
        logged(self, metrics)

    args = {"epochs": 2, "batch_size": 8, "image_size": 32, "num_workers": 0, "mlflow": store, "log": lambda m: None}
    with monkeypatch.context() as patched:
        patched.setattr(MLflow, "epoch", interrupted_at_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", **args)
    result = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, **args)
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("imgtrain").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "validation_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2] and run.info.status == "FINISHED"
    assert [m.value for m in history] == pytest.approx([m.validation_loss for m in result.history], rel=1e-6)


def test_an_epoch_logged_while_its_checkpoint_was_written_is_not_logged_again(tmp_path, image_dirs, monkeypatch):
    """The checkpoint is written beside the next epoch, after the epoch's figures went to MLflow: a run killed while
    epoch 2's was written resumes after epoch 1 and trains epoch 2 again, and the MLflow run keeps it once."""
    from mlflow.tracking import MlflowClient

    from imgtrain.training.train import _RunFiles

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    d, store = image_dirs, (tmp_path / "mlruns").as_uri()
    saved = _RunFiles.save_checkpoint

    def lost_at_epoch_2(self, epoch, stopper, history) -> None:  # the kill, before the file had its name
        if epoch < 2:
            saved(self, epoch, stopper, history)

    def killed(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise KeyboardInterrupt

    args = {"epochs": 2, "batch_size": 8, "image_size": 32, "num_workers": 0, "mlflow": store}
    with monkeypatch.context() as patched:
        patched.setattr(_RunFiles, "save_checkpoint", lost_at_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=killed, **args)
    said = []
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, log=said.append, **args)
    assert any("after epoch 1" in line for line in said), said
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("imgtrain").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "validation_loss")) == [1, 2]


@pytest.mark.parametrize("flag, extra", [("--mlflow", "mlflow"), ("--tensorboard", "tensorboard")])
def test_a_missing_extra_is_one_line_before_any_work(tmp_path, image_dirs, flag, extra):
    """The package made unimportable, as on a machine without the extra: the run stops at once."""
    blocker = tmp_path / "blocked" / extra
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ImportError(\"No module named '{extra}'\")\n")
    d = image_dirs
    args = [flag, str(tmp_path / "tb")] if flag == "--tensorboard" else [flag]
    r = run_cli("train", "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data",
                d["val"], "--output", tmp_path / "m", *args, check=False,
                env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (f"error: MissingDependencyError: {flag} needs the {extra} package, which is not "
                                f"installed. install it with `pip install 'imgtrain[{extra}]'`")
    assert not (tmp_path / "m").exists() and not (tmp_path / ".imgtrain-resume-m").exists()


def test_a_failing_tracker_is_named_once_and_dropped(tmp_path, image_dirs, monkeypatch):
    """A tracker that breaks in the middle of a real run (as an MLflow server that goes away): one warning,
    the others go on, and the model is written."""
    class Broken:
        calls = 0

        def step(self, step, loss, learning_rate):
            pass

        def epoch(self, metrics):
            Broken.calls += 1
            raise ConnectionError("server gone")

        def finish(self, model):
            raise AssertionError("a dropped tracker is not called again")

    opened = Tracking.open
    monkeypatch.setattr(Tracking, "open", lambda self, *args: [Broken(), *opened(self, *args)])
    said: list[str] = []
    d = image_dirs
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", epochs=2, batch_size=8, image_size=32,
                        num_workers=0, tensorboard=tmp_path / "tb", log=said.append)
    assert Broken.calls == 1 and (tmp_path / "m" / "model.safetensors").is_file()
    assert [line for line in said if line.startswith("warning")] == [
        "warning: Broken failed (ConnectionError: server gone); training goes on without it"]
    assert sum(line.startswith("epoch ") for line in said) == 2
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tb").iterdir())


def test_running_figures_keep_their_pace_across_epochs(tmp_path):
    """On a GPU the loop reads the running loss every 50 steps of an epoch: with 137 steps an epoch, the
    figures still come every 50 steps or so in every epoch, not only in the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoard(tmp_path, every=50)
    for epoch in range(3):
        for step in range(50, 138, 50):
            board.step(epoch * 137 + step, 1.0, 0.001)
    board.finish(None)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("step/train_loss")] == [50, 100, 187, 237, 324, 374]


def test_without_a_terminal_one_line_per_epoch_and_quiet_leaves_warnings(tmp_path, image_dirs, tracked):
    r = tracked["run"]  # its stderr was a pipe
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr  # no bar redrawn into a log
    assert [line.split()[1] for line in r.stderr.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert r.stdout.startswith("Trained model written to")
    d = image_dirs
    r = run_cli("train", "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data",
                d["val"], "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--num-workers", "0",
                "--output", tmp_path / "q", "--quiet")
    assert r.stdout == "" and r.stderr == "" and (tmp_path / "q" / "model.safetensors").is_file()
    # a bad image still speaks under --quiet
    folder = make_labelled_folder(tmp_path / "src", per_class=2)
    (folder / "dark" / "broken.png").write_bytes(b"not a png")
    r = run_cli("convert", folder, "--output", tmp_path / "images", "--quiet")
    assert r.stdout == "" and r.stderr.startswith("warning: 1 file(s) are not readable images")
    assert "broken.png" in r.stderr


def _on_a_terminal(*args: str) -> str:
    """Run imgtrain with stdout and stderr on a pseudo-terminal, as in a shell; what the terminal got."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    process = subprocess.Popen([sys.executable, "-m", "imgtrain", *args], stdin=child, stdout=child, stderr=child,
                               env=os.environ)
    os.close(child)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    process.wait(timeout=120)
    os.close(main)
    assert process.returncode == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


def test_convert_and_score_show_progress_bars_on_a_terminal(tmp_path, trained_model):
    folder = make_labelled_folder(tmp_path / "src", per_class=30)
    shown = _on_a_terminal("convert", str(folder), "--output", str(tmp_path / "images"))
    assert "decoding:" in shown and "/90 [" in shown and "image/s]" in shown, shown
    shown = _on_a_terminal("score", "--trained-model", str(trained_model), "--dataset", str(tmp_path / "images"),
                           "--output", str(tmp_path / "scored"))
    assert "scoring:" in shown and "/90 [" in shown and "image/s]" in shown, shown
    quiet = _on_a_terminal("score", "--trained-model", str(trained_model), "--dataset", str(tmp_path / "images"),
                           "--output", str(tmp_path / "scored-quietly"), "--quiet")
    assert quiet == ""
