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


class _Load:
    """What OtherLoad measured over a run's set-up (tests/test_threads.py::test_other_load_sees_a_busy_process
    measures a real busy process)."""

    def __init__(self, cores: float | None) -> None:
        self.value = cores

    def cores(self, at_least: float = 0.0) -> float | None:
        return self.value


def test_auto_takes_the_cores_free_as_the_run_starts_and_keeps_them_on_resume(image_dirs, tmp_path, monkeypatch):
    """Beside busy processes, auto trains on fewer threads, says so and records it; a resumed run keeps the count
    its run had (the weights depend on it), whatever the load then."""
    monkeypatch.setattr("imgtrain.threads.available_cores", lambda: 4)
    monkeypatch.setattr("imgtrain.threads.torch_default_threads", lambda: 4)
    monkeypatch.setattr("imgtrain.threads._affinity", lambda: 4)
    assert [Threads("auto", print, start_load=_Load(others)).current
            for others in (None, 0.0, 0.4, 0.6, 1.0, 2.2, 9.0)] == [4, 4, 4, 3, 3, 2, 1]
    busy = Threads("auto", print, start_load=_Load(1.0))
    assert busy.describe() == ("3 threads (other processes kept 1.0 of the 4 cores busy as the run started; "
                               "threads=4 uses them all, threads='adapt' follows the load)")  # as Python calls say it
    assert Threads("auto", print, start_load=_Load(1.0), chosen=4).current == 4  # resumed: the run's count
    assert Threads("auto", print, chosen=9).current == 4  # never more than the cores
    assert Threads(2, print, start_load=_Load(3.0), chosen=1).current == 2  # asked for: as asked
    # 8 CPUs, 4 of them this process's (a quota, OMP_NUM_THREADS=4): the other 4 take others' work first
    monkeypatch.setattr("imgtrain.threads._affinity", lambda: 8)
    assert [Threads("auto", print, start_load=_Load(others)).current for others in (4.0, 5.0)] == [4, 3]
    monkeypatch.undo()
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
    assert any("1 thread (as when the run started: a resumed run keeps its count)" in line for line in lines), lines
    assert load_trained_model(tmp_path / "m").spec.training["torch_threads"] == 1
