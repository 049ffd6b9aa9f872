"""Threads on a shared CPU: the cores this process may use, the load of other processes, --threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli
from imgtrain.errors import InvalidParameterError
from imgtrain.threads import OtherLoad, Threads, cgroup_cpu_quota, fitting_threads, parse_threads


def test_parse_threads(monkeypatch):
    monkeypatch.delenv("IMGTRAIN_THREADS", raising=False)
    assert parse_threads(None) == "auto" and parse_threads("adapt") == "adapt" and parse_threads("3") == 3
    monkeypatch.setenv("IMGTRAIN_THREADS", "2")
    assert parse_threads(None) == 2 and parse_threads(1) == 1  # the option overrides the variable
    for bad in (0, "-1", "many"):
        with pytest.raises(InvalidParameterError, match="pass auto, adapt, or a whole number of threads from 1"):
            parse_threads(bad)


def test_fitting_threads():
    assert fitting_threads(2, 0.0) == 2 and fitting_threads(2, 0.2) == 2  # background noise is forgiven
    assert fitting_threads(2, 0.7) == 1 and fitting_threads(2, 1.0) == 1 and fitting_threads(2, 3.0) == 1
    assert fitting_threads(16, 2.0) == 14 and fitting_threads(16, 2.3) == 13


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_quota_is_read_up_the_hierarchy(tmp_path, version):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    if version == "v2":
        proc.write_text("0::/job/step\n")
        (root / "job" / "step").mkdir(parents=True)
        (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
        (root / "job" / "cpu.max").write_text("150000 100000\n")  # 1.5 cores for the whole job
    else:
        proc.write_text("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n")
        folder = root / "cpu,cpuacct" / "docker" / "abc"
        folder.mkdir(parents=True)
        (folder / "cpu.cfs_quota_us").write_text("50000\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(root, proc) == (1.5 if version == "v2" else 0.5)
    proc.write_text("0::/\n")
    assert cgroup_cpu_quota(root, proc) is None  # unlimited


def _busy_process_elsewhere() -> int:
    """A busy process that is not this one's child (a child's CPU time would count as this process's)."""
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_other_load_sees_a_busy_process():
    load = OtherLoad()
    pid = _busy_process_elsewhere()
    try:
        time.sleep(1.5)
        others = load.cores()
    finally:
        os.kill(pid, signal.SIGKILL)
    assert others is not None and others >= 0.6, others  # about one core, whatever else the machine runs
    start = time.process_time()
    load.cores()
    while time.process_time() - start < 1.0:  # this process's own work is not "others"
        pass
    assert load.cores() < 0.6 + others


def test_threads_are_set_for_the_run_and_given_back(image_dirs, tmp_path):
    before = torch.get_num_threads()
    with Threads(1, print) as threads:
        assert torch.get_num_threads() == 1 and threads.describe() == "1 thread (asked for)"
    assert torch.get_num_threads() == before
    torch.set_num_threads(1)  # what the calling program chose comes back, whatever it was
    try:
        with Threads("auto", print):
            pass
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    r = run_cli("train", "--untrained-model", image_dirs["untrained"], "--training-data", image_dirs["train"],
                "--validation-data", image_dirs["val"], "--output", tmp_path / "m", "--epochs", "1",
                "--threads", "1", "--image-size", "32")
    assert "1 thread (asked for)" in r.stderr
    r = run_cli("train", "--untrained-model", image_dirs["untrained"], "--training-data", image_dirs["train"],
                "--validation-data", image_dirs["val"], "--output", tmp_path / "m2", "--epochs", "1",
                env={"IMGTRAIN_THREADS": "lots"}, check=False)
    assert r.returncode == 1 and "error: InvalidParameterError: IMGTRAIN_THREADS 'lots' is not known" in r.stderr


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_auto_takes_the_cores_free_as_the_run_starts_and_keeps_them_on_resume(image_dirs, tmp_path):
    """Beside a busy process, auto trains on one thread fewer, says so, records it, and a resumed run keeps the
    count its run chose (the weights depend on it) even when the machine is idle by then."""
    cores = Threads("auto", print).cores
    if cores < 2:
        pytest.skip("one core: there is no thread to give up")
    load = OtherLoad()
    pid = _busy_process_elsewhere()
    try:
        busy = Threads("auto", print, start_load=load)
    finally:
        os.kill(pid, signal.SIGKILL)
    assert busy.current == cores - 1 and "busy as the run started" in busy.describe(), busy.describe()
    assert Threads("auto", print, start_load=OtherLoad()).current == cores  # idle again (the window: 0.5 s)
    assert Threads("auto", print, start_load=OtherLoad(), chosen=1).current == 1
    assert Threads(2, print, start_load=OtherLoad(), chosen=1).current == 2  # asked for: as asked
    # A run records what it chose in its checkpoint and its spec; resumed under auto, it keeps that count. Here the
    # checkpoint says 1 (as a run that started beside a busy process chose): the resumed run on an idle machine
    # trains on 1 thread.
    from imgtrain import load_trained_model, train_pytorch_model

    class Stop(BaseException):
        pass

    def stop_after_epoch_1(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise Stop

    args = (image_dirs["untrained"], image_dirs["train"], image_dirs["val"], tmp_path / "m")
    with pytest.raises(Stop):
        train_pytorch_model(*args, epochs=2, image_size=32, num_workers=0, threads=1, log=stop_after_epoch_1)
    lines: list[str] = []
    train_pytorch_model(*args, epochs=2, image_size=32, num_workers=0, threads="auto", resume=True,
                        log=lines.append)
    assert any("1 thread (as the run chose when it started)" in line for line in lines), lines
    assert load_trained_model(tmp_path / "m").spec.training["torch_threads"] == 1
