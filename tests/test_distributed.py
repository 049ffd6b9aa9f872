"""Training under torchrun: real processes, gloo on loopback, two ranks on this machine's CPUs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import distributed_env, training_in_background
from imgtrain import load_trained_model
from imgtrain.data.dataset import ImageDataset, SeededSampler
from imgtrain.data.transforms import Normalize, memory_format
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.training.checkpoint import checkpoint_epoch
from imgtrain.training.loop import evaluate

# Long enough that a run can be killed between its first checkpoint and its end.
# On the CPUs even where there is a GPU: two ranks need two GPUs (tests/test_cuda.py runs torchrun with NCCL)
ARGS = ("--epochs", "4", "--patience", "4", "--batch-size", "4", "--image-size", "32", "--num-workers", "0",
        "--device", "cpu")


def torchrun(d: dict, output: Path, *extra: str, processes: int = 2, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "imgtrain", "train-pytorch-model", "--untrained-model", str(d["untrained"]),
               "--training-data", str(d["train"]), "--validation-data", str(d["val"]), "--output", str(output),
               *ARGS, *extra]
    return subprocess.Popen(command, env=distributed_env(), text=True, start_new_session=True, **popen)


def run_torchrun(d: dict, output: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = torchrun(d, output, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _end(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_dirs) -> Path:
    """One uninterrupted run of two processes."""
    out = tmp_path_factory.mktemp("ddp") / "reference"
    r = run_torchrun(image_dirs, out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Trained model written to") == 1, r.stdout  # rank 0 alone reports
    assert "2 processes (gloo): each takes 4 images a step, 8 together" in r.stderr, r.stderr
    return out


def test_two_processes_record_the_figures_of_one_process_evaluating_the_saved_weights(reference, image_dirs):
    trained = load_trained_model(reference)
    assert trained.spec.training["processes"] == 2
    assert sorted(k for k in trained.network.state_dict() if k.startswith("module.")) == []
    val = ImageDirectory.load(image_dirs["val"])
    assert len(val) % 2 == 1  # an odd number: the two shares differ; none is padded
    labels = np.array([trained.labels.index(val.categories[i]) for i in val.labels])
    loader = DataLoader(ImageDataset([val.path(i) for i in range(len(val))], labels, trained.image_size),
                        batch_size=5)
    alone = evaluate(trained.network, loader, Normalize(trained.spec.input.mean, trained.spec.input.std,
                                                      memory_format(torch.device("cpu"), trained.image_size)),
                     torch.device("cpu"), trained.spec.training["precision"])
    best = trained.spec.training["best_epoch"]
    import csv

    with open(reference / "metrics.csv", newline="") as f:
        recorded = list(csv.DictReader(f))[best - 1]
    assert alone.images == len(val)
    assert float(recorded["validation_top1_accuracy"]) == alone.top1
    assert float(recorded["validation_loss"]) == pytest.approx(alone.loss, rel=1e-5)


@pytest.fixture(scope="module")
def with_dropout(image_dirs, dropout_model) -> dict:
    """The data of ``image_dirs`` and an untrained MobileNetV3-Small: dropout in its forward pass."""
    return {**image_dirs, "untrained": dropout_model}


@pytest.fixture(scope="module")
def dropout_reference(tmp_path_factory, with_dropout) -> Path:
    """One uninterrupted run of two processes of a network with dropout."""
    out = tmp_path_factory.mktemp("ddp") / "dropout-reference"
    r = run_torchrun(with_dropout, out)
    assert r.returncode == 0, r.stderr
    return out


def _dropout_mask(generator_state: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator_state)
        return torch.nn.functional.dropout(torch.ones(1000), 0.2) == 0


def test_each_rank_draws_its_own_dropout_masks():
    """Every process seeds its generators from (seed, rank): the same masks for the same pair, other masks for
    another rank or another seed."""
    from imgtrain.seeding import rank_seed, seed_rank

    def masks(seed: int, rank: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            seed_rank(seed, rank)
            return torch.nn.functional.dropout(torch.ones(1000), 0.2) == 0

    assert torch.equal(masks(1, 0), masks(1, 0)) and torch.equal(masks(1, 1), masks(1, 1))
    assert not torch.equal(masks(1, 0), masks(1, 1)) and not torch.equal(masks(1, 1), masks(2, 1))
    assert len({rank_seed(seed, rank) for seed in (0, 1, 2, 2**32 - 1) for rank in range(64)}) == 4 * 64
    assert rank_seed(-1, 3) == rank_seed(2**32 - 1, 3)  # any integer is taken modulo 2**32, as elsewhere


def test_each_rank_resumes_its_own_generators_and_older_checkpoints_still_resume(tmp_path):
    """A checkpoint holds every rank's torch generators; each rank restores its own. One written by an earlier
    version (rank 0's alone, as ``rng/torch``) restores that one, as it did."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from imgtrain.training.checkpoint import load_checkpoint, rng_state, save_checkpoint

    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(network.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cpu, path = torch.device("cpu"), tmp_path / "checkpoint.safetensors"
    with torch.random.fork_rng(devices=[]):
        streams = []
        for seed in (11, 12):  # two processes' generators
            torch.manual_seed(seed)
            streams.append(rng_state(cpu))
        save_checkpoint(path, network, optimizer, schedule, {"run_id": {}, "epoch": 1}, streams)
        for rank in (0, 1):
            load_checkpoint(path, {}, network, optimizer, schedule, rank=rank, device=cpu)
            assert torch.equal(torch.get_rng_state(), streams[rank]["cpu"])
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        legacy = {("rng/torch" if k == "rng/0/cpu" else k): v for k, v in tensors.items() if k != "rng/1/cpu"}
        save_file(legacy, path, metadata=metadata)
        torch.manual_seed(99)
        load_checkpoint(path, {}, network, optimizer, schedule, rank=0, device=cpu)
        assert torch.equal(torch.get_rng_state(), streams[0]["cpu"])


def test_the_same_seed_gives_the_same_weights_and_a_killed_rank_ends_the_job(dropout_reference, with_dropout,
                                                                              tmp_path):
    """A network with dropout, two processes. Rank 1 is killed with SIGKILL after the first checkpoint:
    torchrun ends the job non-zero, quickly, leaving no output and a readable checkpoint, which holds each
    process's own random generators (they draw different dropout masks); --resume under torchrun then
    finishes as the uninterrupted run did: every epoch's figures and the weights, bit for bit."""
    from safetensors.torch import load_file

    out = tmp_path / "m"
    checkpoint = tmp_path / ".imgtrain-resume-m" / "checkpoint.safetensors"
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = torchrun(with_dropout, out, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while proc.poll() is None and not (checkpoint.exists() and checkpoint_epoch(checkpoint)):
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()
            os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
            killed = time.monotonic()
            proc.wait(timeout=90)
            ended_after = time.monotonic() - killed
        finally:
            _end(proc)
    assert proc.returncode != 0 and ended_after < 60, (proc.returncode, ended_after, log.read_text())
    assert not out.exists()
    assert 1 <= checkpoint_epoch(checkpoint) < 4
    saved = load_file(checkpoint)
    assert not torch.equal(_dropout_mask(saved["rng/0/cpu"]), _dropout_mask(saved["rng/1/cpu"]))
    r = run_torchrun(with_dropout, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    # the same seed and world size: the resumed run and the uninterrupted one have identical figures and weights
    assert _figures(out) == _figures(dropout_reference)
    assert (out / "model.safetensors").read_bytes() == (dropout_reference / "model.safetensors").read_bytes()


def _figures(model: Path) -> list[tuple]:
    """Each epoch's losses and accuracies (metrics.csv, without its timings)."""
    import csv

    with open(model / "metrics.csv", newline="") as f:
        return [(r["train_loss"], r["train_error"], r["validation_loss"], r["validation_top1_accuracy"])
                for r in csv.DictReader(f)]


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker process of ``rank`` that torchrun started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under torchrun (pid {torchrun_pid})")


def test_a_bad_image_in_one_rank_stops_every_rank_with_its_name(tmp_path, image_dirs):
    """One image of the training data cannot be decoded; with --on-bad-image fail, the rank whose share
    holds it names it, and the whole job stops, with no output."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(image_dirs["train"], train)
    data = ImageDirectory.load(train)
    bad = data.path(3)
    bad.write_bytes(b"not an image at all")
    started = time.monotonic()
    # imgtrain starts torchrun itself here
    r = subprocess.run([sys.executable, "-m", "imgtrain", "train", "--nproc-per-node", "2", "--untrained-model",
                        image_dirs["untrained"], "--training-data", train, "--validation-data", image_dirs["val"],
                        "--output", tmp_path / "m", *ARGS, "--on-bad-image", "fail"], capture_output=True, text=True,
                       timeout=120, env=distributed_env())
    assert r.returncode == 1
    assert time.monotonic() - started < 90
    lines = r.stderr.strip().splitlines()
    assert any(line.startswith("error: rank ") and "BadImageError: cannot decode image " in line and bad.name in line
               for line in lines), r.stderr
    assert lines[-1].startswith("error: DistributedRunError: ") and lines[-1].endswith("their errors are above")
    assert any("DistributedRunError: another process of this run stopped or cannot be reached" in line
               for line in lines), r.stderr  # the other rank says why it stops
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_each_image_is_in_one_share(tmp_path):
    """Validation: every image once over all ranks; training: equal shares, reshuffled by epoch."""
    shares = [list(SeededSampler(11, 0, shuffle=False, rank=r, ranks=3)) for r in range(3)]
    assert sorted(i for share in shares for i, _ in share) == list(range(11))
    for epoch in (1, 2):
        train = []
        for r in range(3):
            sampler = SeededSampler(11, 7, shuffle=True, rank=r, ranks=3)
            sampler.set_epoch(epoch)
            train.append([i for i, _ in sampler])
        assert [len(s) for s in train] == [3, 3, 3]
        flat = [i for s in train for i in s]
        assert len(set(flat)) == 9
    alone = SeededSampler(11, 7, shuffle=True)
    alone.set_epoch(2)
    assert len(list(alone)) == 11  # one process keeps every image and the order it always had


def test_resuming_with_another_number_of_processes_names_both(tmp_path, image_dirs):
    from imgtrain import train_pytorch_model

    d = image_dirs

    class Interrupt(Exception):
        pass

    def interrupt_after_epoch_1(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):  # one process, as ARGS says
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", epochs=4, patience=4, batch_size=4,
                            image_size=32, num_workers=0, log=interrupt_after_epoch_1)
    r = run_torchrun(d, tmp_path / "m", "--resume", timeout=120)
    assert r.returncode != 0
    assert ("CheckpointMismatchError: the checkpoint " in r.stderr and "was made by 1 process(es); this run has 2"
            in r.stderr), r.stderr
    assert r.stderr.count("CheckpointMismatchError") == 2  # both ranks name it
    assert checkpoint_epoch(tmp_path / ".imgtrain-resume-m" / "checkpoint.safetensors") == 1  # left as it was


def test_scoring_under_torchrun_writes_the_table_of_one_process(tmp_path, reference, image_dirs):
    """Each process scores its share of the images (every image once); rank 0 writes one scored.csv, in the
    input's order, the same as one process writes."""
    from imgtrain import score_image_model

    score_image_model(reference, image_dirs["all"], tmp_path / "alone", num_workers=0, log=lambda m: None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "imgtrain", "score", "--trained-model", reference, "--dataset", image_dirs["all"], "--output",
                        tmp_path / "two", "--batch-size", "4", "--num-workers", "1", "--device", "cpu"],
                       capture_output=True, text=True,
                       timeout=300, env=distributed_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Scored 36 images") == 1, r.stdout
    assert "2 processes (gloo)" in r.stderr
    assert (tmp_path / "two" / "scored.csv").read_text() == (tmp_path / "alone" / "scored.csv").read_text()


def test_skipping_many_bad_images_keeps_the_processes_in_step(tmp_path, image_dirs):
    """Half the training images cannot be decoded: some process's batch is left with fewer than two
    images, and it still takes part in the step, so no process waits for another forever."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(image_dirs["train"], train)
    data = ImageDirectory.load(train)
    for i in range(0, len(data), 2):
        data.path(i).write_bytes(b"not an image")
    # the case under test happens: some process has a batch with fewer than two decodable images (in each of the
    # 2 epochs run, whose shares between them hold every bad image)
    share, batch, epochs = len(data) // 2, 4, 2
    assert share % batch == 1  # so the last batch of one is dropped, as training does
    thin = [(epoch, rank) for epoch in range(1, epochs + 1) for rank in (0, 1)
            for order in [[i for i, _ in _sampler(len(data), epoch, rank)]]
            for start in range(0, share - share % batch, batch)
            if sum(i % 2 for i in order[start:start + batch]) < 2]
    assert thin
    r = run_torchrun({**image_dirs, "train": train}, tmp_path / "m", "--epochs", str(epochs), timeout=180)
    assert r.returncode == 0, r.stderr
    # every process names the bad images it meets (once each): together, every one of them
    import re

    named = set(re.findall(r"warning: skipping image (\S+):", r.stderr))
    assert {Path(p).name for p in named} == {data.path(i).name for i in range(0, len(data), 2)}, r.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()


def _sampler(size: int, epoch: int, rank: int) -> SeededSampler:
    sampler = SeededSampler(size, 1, shuffle=True, rank=rank, ranks=2)  # --random-seed 1
    sampler.set_epoch(epoch)
    return sampler


def test_an_error_rank_0_finds_before_training_is_every_ranks(reference, image_dirs):
    """Rank 0 alone checks the output and claims the work directory; its named error reaches every process."""
    before = (reference / "model.safetensors").read_bytes()
    r = run_torchrun(image_dirs, reference, timeout=120)  # the output exists, and --overwrite is not given
    assert r.returncode != 0
    assert r.stderr.count("OutputExistsError") == 2, r.stderr  # rank 0's, and rank 1's the same
    assert "DistributedRunError" not in r.stderr
    assert (reference / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_under_nproc_per_node_is_one_line_resumable_and_ends_the_mlflow_run(tmp_path, image_dirs,
                                                                                             monkeypatch, stop):
    """Ctrl-C (SIGINT to the process group, from a terminal) or SIGTERM to the launcher (`kill`, a scheduler):
    torchrun passes the signal on to the ranks, which unwind as one process does. The launcher says it in one
    line (rank 0 said it too, after Ctrl-C); rank 0 ends its MLflow run as KILLED (after SIGTERM the ranks died
    of the signal and left it RUNNING; Ctrl-C, which ended it so before, is run without MLflow, to save time)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    d, store = image_dirs, (tmp_path / "mlruns").as_uri()
    log = tmp_path / "run.log"
    with training_in_background(log, "--nproc-per-node", "2", "--untrained-model", d["untrained"], "--training-data",
                                d["train"], "--validation-data", d["val"], "--output", tmp_path / "m", *ARGS,
                                *(["--mlflow", store] if stop == "sigterm" else [])) as proc:
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text()
    number, said = (signal.SIGINT, "interrupted") if stop == "ctrl-c" else (signal.SIGTERM, "terminated (SIGTERM)")
    assert proc.returncode == 128 + number, text
    assert "Traceback" not in text
    line = f"error: {said}; no output was written (re-run with --resume to continue from the last epoch)"
    assert text.strip().splitlines()[-1] == line and text.count(line) == 1, text
    assert not (tmp_path / "m").exists() and checkpoint_epoch(tmp_path / ".imgtrain-resume-m" /
                                                              "checkpoint.safetensors") >= 1
    if stop == "sigterm":
        client = MlflowClient(tracking_uri=store)
        [run] = client.search_runs([client.get_experiment_by_name("imgtrain").experiment_id])
        assert run.info.status == "KILLED"


def test_rank_without_world_size_is_no_torchrun_world(tmp_path, image_dirs):
    """RANK left in the environment by something else (a scheduler, a shell), without WORLD_SIZE: a run of one
    process, as without it. It armed the parent-death signal (`RANK=0 nohup imgtrain train ... &` died with the
    shell that started it) and left SIGTERM to its default (a silent death)."""
    d, log = image_dirs, tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    # a shell that starts the run in the background (in a session of its own, as nohup ... & leaves it), then ends
    shell = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen(sys.argv[2:], "
                              "stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], 'w'), start_new_session=True).pid, "
                              "flush=True); sys.stdin.read()", log, sys.executable, "-m", "imgtrain", "train",
                              "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data",
                              d["val"], "--output", tmp_path / "m", *ARGS, "--epochs", "40", "--patience", "40",
                              "--batch-size", "8", "--precision", "fp32"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**env, "RANK": "0", "PYTHONUNBUFFERED": "1"})
    pid = int(shell.stdout.readline())
    try:
        while _alive(pid) and "epoch 1/" not in log.read_text():
            time.sleep(0.05)
        shell.stdin.close()
        shell.wait(timeout=10)
        time.sleep(0.5)
        assert _alive(pid), f"the run died with the shell that started it:\n{log.read_text()}"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert log.read_text().strip().splitlines()[-1] == (
        "error: terminated (SIGTERM); no output was written (re-run with --resume to continue from the last epoch)")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_killing_the_launcher_with_sigkill_ends_its_workers(tmp_path, image_dirs):
    """`kill -9` of `imgtrain train --nproc-per-node 2` (the OOM killer, a scheduler that gives up): torchrun
    starts each worker in a session of its own and cannot pass SIGKILL on, so they trained on and published
    the model by themselves. They die with it (Linux's parent-death signal): gone within seconds, no output."""
    d = image_dirs
    log = tmp_path / "run.log"
    ranks: list[int] = []
    with training_in_background(log, "--nproc-per-node", "2", "--untrained-model", d["untrained"], "--training-data",
                                d["train"], "--validation-data", d["val"], "--output", tmp_path / "m", *ARGS,
                                "--epochs", "40", "--patience", "40") as proc:
        try:
            ranks = [_rank_pid(proc.pid, rank) for rank in (0, 1)]  # training: rank 0 has logged an epoch
            os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
            proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while any(map(_alive, ranks)) and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = [pid for pid in ranks if _alive(pid)]
        finally:
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their launcher"
    assert not (tmp_path / "m").exists()
