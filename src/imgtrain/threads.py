"""How many threads torch computes with, on a CPU that other programs share.

PyTorch's CPU kernels run on OpenMP threads that, between parallel regions, spin on a core
waiting for work. When another process holds one of those cores, each region waits for the
thread that lost its core, and the spinning takes CPU from everyone: on 2 cores, one busy
process beside training cut it to a third of its speed (bench/, "shared CPU"). Three remedies,
measured there, and what imgtrain does with them:

- Shorter spinning. OpenMP threads sleep after GOMP_SPINCOUNT spins instead of 300,000, so a
  thread without a core yields it. Same speed on an idle machine, half the idle speed beside
  a busy process instead of a third. Set before torch starts (importing imgtrain does it,
  unless OMP_WAIT_POLICY or GOMP_SPINCOUNT are set already).
- As many threads as the cores this process may use: its CPU affinity and its container's
  CPU quota (cgroups), never more than torch's own default, less one for each core other
  processes kept busy while the run was set up (training only: ``start_load``). Fixed for the
  run: the thread count changes how sums are split, so the count chosen is recorded (the
  trained model's spec, the checkpoint) and a resumed run keeps it; ``--threads N`` with that
  count gives the same weights on a machine however busy. Beside one busy process on 2 cores,
  one thread trains at two thirds of the idle speed where two trained at a quarter of it.
- ``adapt``: fewer threads while other processes keep cores busy, more when they are done,
  re-decided every few seconds. The fastest on a shared machine (three quarters of the idle
  speed beside one busy process on 2 cores), but the weights then depend on the machine's
  load: opt in with ``--threads adapt``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imgtrain.errors import InvalidParameterError, option

THREADS_ENV = "IMGTRAIN_THREADS"
SPIN_COUNT = "3000"  # measured in bench/ ("shared CPU"): no loss when idle, most of the gain when shared
ADAPT = "adapt"
ADAPT_EVERY_SECONDS = 2.0
START_WINDOW_SECONDS = 0.5  # auto: the load is read over the run's set-up, and over this long at least
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat: user nice system (idle iowait) irq softirq steal


def configure_openmp() -> None:
    """Shorten OpenMP's spin-wait before torch loads it (it reads the environment once, at start)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by its cgroup's CPU quota."""
    cores = _affinity()
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def worker_count(requested: int | None, *, processes: int = 1) -> int:
    """Worker processes for loading or checking images: as asked, else this process's share (one of
    ``processes`` on the machine) of one per available core, at most 8. Beside a GPU too: on an H200
    with 16 cores, 15 workers left training waiting for data 11-13% of the time where 8 left it 5-7%,
    and scored 13% slower (bench/results/2026-11-26-gpu-h200.md)."""
    if requested is not None:
        return requested
    return max(1, min(8, available_cores()) // processes)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
                     ) -> float | None:
    """The CPU quota (in cores) of this process's cgroup and its parents, v2 or v1; None when unlimited."""
    limits = []
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: cpu.max holds "<quota> <period>" or "max <period>"
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1
            base, files = root / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            limits.append(_quota_in(folder, files))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    found = [q for q in limits if q]
    return min(found) if found else None


def _quota_in(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            quota, period = (folder / files[0]).read_text().split()[:2]
        else:
            quota, period = ((folder / f).read_text().strip() for f in files)
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def torch_default_threads() -> int:
    """The intra-op threads torch picked for itself at start (OMP_NUM_THREADS when set), before imgtrain
    changed it."""
    global _TORCH_DEFAULT
    if _TORCH_DEFAULT is None:
        import torch

        _TORCH_DEFAULT = torch.get_num_threads()
    return _TORCH_DEFAULT


_TORCH_DEFAULT: int | None = None


def parse_threads(value: int | str | None) -> int | str:
    """--threads (or IMGTRAIN_THREADS): "auto", "adapt" or a count >= 1."""
    name = option("threads")
    if value is None:
        value, name = os.environ.get(THREADS_ENV) or "auto", THREADS_ENV
    if isinstance(value, str) and value.strip().lower() in ("auto", ADAPT):
        return value.strip().lower()
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise InvalidParameterError(f"{name} {value!r} is not known",
                                    f"pass auto, {ADAPT}, or a whole number of threads from 1")
    return count


class OtherLoad:
    """How many of this process's cores other processes kept busy since the last reading: the busy CPU
    time the kernel counts (/proc/stat, steal included) on the CPUs this process may run on, less that
    of this process and its child processes."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.lines = {f"cpu{i}" for i in cpus}
        self.last = self._read()

    @property
    def readable(self) -> bool:
        return self.last is not None

    def _read(self) -> tuple[float, float, float] | None:
        try:
            busy = 0
            for line in (self.proc / "stat").read_text().splitlines():
                name, *fields = line.split()
                if name in self.lines:
                    busy += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
        except (OSError, ValueError, IndexError):
            return None
        if not busy:
            return None
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), _own_cpu_seconds(self.proc)

    def cores(self, at_least: float = 0.0) -> float | None:
        """Cores other processes used on average since the previous call (None where /proc is missing), over
        ``at_least`` seconds: waits for the rest when the previous call was more recent."""
        if self.last is not None:
            time.sleep(max(0.0, self.last[0] + at_least - time.monotonic()))
        now = self._read()
        last, self.last = self.last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


def _own_cpu_seconds(proc: Path) -> float:
    """CPU seconds of this process, its running children (DataLoader workers) and its finished ones."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    me = str(os.getpid())
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or entry.name == me:
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        if fields[1] == me:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Threads:
    """Sets torch's intra-op threads while a run is inside ``with``, and, with ``adapt``, keeps them
    fitted to the free cores. ``step()`` is called between batches; it costs a clock reading except
    every few seconds."""

    setting: int | str
    log: Callable[[str], None]
    start_load: OtherLoad | None = None  # auto: started as the run began; the cores others used since then count
    chosen: int | None = None  # auto: the count of the run a checkpoint was made by
    cores: int = 0
    current: int = 0
    others: float | None = None  # the cores other processes kept busy as the run started (auto)

    def __post_init__(self) -> None:
        self.cores = min(available_cores(), torch_default_threads())
        # The load is read over every CPU this process may run on; those beyond its cores (a CPU quota, a smaller
        # OMP_NUM_THREADS) take other processes' work first.
        self._spare = max(0, _affinity() - self.cores)
        self.current = self.setting if isinstance(self.setting, int) else self.cores
        if self.setting == "auto" and self.chosen is not None:
            self.current = max(1, min(self.cores, self.chosen))
        elif self.setting == "auto" and self.start_load is not None:
            self.others = self.start_load.cores(at_least=START_WINDOW_SECONDS)
            if self.others is not None:
                self.current = threads_at_start(self.cores, max(0.0, self.others - self._spare))
        self._load = OtherLoad() if self.setting == ADAPT else None
        self._next = time.monotonic() + ADAPT_EVERY_SECONDS / 4  # first look soon: the set-up is one core
        self._wanted_more = 0

    def __enter__(self) -> Threads:
        import torch

        self._before = torch.get_num_threads()
        self._apply()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self._before)  # as it was, for the rest of the program

    def describe(self) -> str:
        threads = f"{self.current} thread{'s' if self.current != 1 else ''}"
        if isinstance(self.setting, int):
            return f"{threads} (asked for)"
        if self.setting == ADAPT:
            if not self._load.readable:
                return f"{threads} (the cores available; the load cannot be read here, so they stay)"
            return f"{threads}, adapting to the load, of {self.cores} cores"
        if self.chosen is not None:
            return f"{threads} (as when the run started: a resumed run keeps its count)"
        if self.current < self.cores:
            return (f"{threads} (other processes kept {self.others:.1f} of the {self.cores} cores busy as the run "
                    f"started; {option('threads', self.cores)} uses them all, {option('threads', 'adapt')} follows "
                    "the load)")
        return f"{threads} (the cores available)"

    def step(self) -> None:
        if self._load is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + ADAPT_EVERY_SECONDS
        others = self._load.cores()
        if others is None:
            return
        wanted = fitting_threads(self.cores, max(0.0, others - self._spare))
        # Fewer at once (spinning beside a busy process is the expensive mistake), more only when two
        # readings in a row agree (a short burst elsewhere should not make it swing back and forth).
        self._wanted_more = self._wanted_more + 1 if wanted > self.current else 0
        if wanted < self.current or self._wanted_more >= 2:
            self.log(f"threads: {self.current} -> {wanted} (other processes keep {others:.1f} of "
                     f"{self.cores} cores busy)")
            self.current, self._wanted_more = wanted, 0
            self._apply()

    def _apply(self) -> None:
        import torch

        torch.set_num_threads(self.current)


def threads_at_start(cores: int, others: float) -> int:
    """Threads for a run that keeps them: one fewer for each core other processes keep busy, rounded (half a
    core of other work, a browser's or an editor's, does not cost a thread)."""
    return max(1, min(cores, cores - math.floor(others + 0.5)))


def fitting_threads(cores: int, others: float) -> int:
    """Threads for ``cores`` when other processes keep ``others`` cores busy: one fewer for each core
    they take, a quarter-core of background noise forgiven."""
    return max(1, min(cores, cores - math.ceil(others - 0.25)))
