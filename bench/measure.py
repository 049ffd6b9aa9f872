"""Measuring tools: run a command with its wall clock and peak memory, machine details, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent


class CommandFailed(RuntimeError):
    pass


@dataclass
class Run:
    """One finished command."""

    command: list[str]
    returncode: int
    wall_seconds: float
    max_rss_mb: float  # ru_maxrss from wait4: the largest single process (itself or a waited-for child)
    peak_tree_pss_mb: float  # sampled: the sum of PSS over the process and all its descendants
    stdout: str
    stderr: str


# Runs the command in a fork of itself and reports the child's rusage. ru_maxrss is a high-water mark that a
# process keeps across exec and takes from the memory it was forked (or vforked) from: a command started
# straight from this process, which holds models and tensors, would report this process's size. Started from
# this small launcher instead, it starts from a few MB.
_LAUNCHER = """
import json, os, sys, time
report, command = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(report, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "wall": wall, "max_rss_kb": usage.ru_maxrss}, f)
"""


def run_measured(command: Sequence[str], *, env: dict | None = None, cwd: Path | None = None,
                 interval: float = 0.25, check: bool = True) -> Run:
    """Run ``command``; time it and record its peak memory (single process and the whole process tree).

    ``ru_maxrss`` covers one process at a time (DataLoader workers are not added to the main process),
    so the tree's proportional set size (shared pages split between sharers) is also sampled.
    """
    command = [str(c) for c in command]
    with tempfile.TemporaryDirectory(prefix="imgtrain-bench-run-") as tmp:
        report, out_path, err_path = Path(tmp, "report.json"), Path(tmp, "stdout"), Path(tmp, "stderr")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *command],
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
            sampler = _TreeSampler(proc.pid, interval)
            sampler.start()
            proc.wait()
            sampler.stop()
        if proc.returncode != 0 or not report.is_file():
            raise CommandFailed(f"the measuring launcher failed (exit code {proc.returncode}): "
                                f"{err_path.read_text()[-2000:]}")
        measured = json.loads(report.read_text())
        run = Run(command, measured["returncode"], measured["wall"], measured["max_rss_kb"] / 1024,
                  sampler.peak_kb / 1024, out_path.read_text(), err_path.read_text())
    if check and run.returncode != 0:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
        raise CommandFailed(f"exit code {run.returncode}: {' '.join(command)}\n{tail}")
    return run


class _TreeSampler(threading.Thread):
    """Polls /proc for the summed PSS of a process and its descendants; keeps the peak."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            below = _process_tree(self.pid)[1:]  # the launcher itself is not counted
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in below))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # gone, or not readable
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


class OtherLoad:
    """How much of the machine's CPU time other processes used since this object was made.

    All CPU time the kernel counts as busy (/proc/stat, steal included) minus that of this process and its
    finished children: the noise every measurement made meanwhile suffered.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return ((user + nice + system + irq + softirq + steal) / hz, sum(fields) / hz,
                t.user + t.system + t.children_user + t.children_system)

    def share(self) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        busy, total, own = (b - a for a, b in zip(self._start, end, strict=True))
        return max(0.0, busy - own) / total

    def describe(self) -> str:
        share = self.share()
        return "other processes' CPU use unknown" if share is None else \
            f"other processes used {100 * share:.0f}% of the CPU meanwhile"


def python_startup_seconds(python: str, module: str, reps: int) -> float:
    """Median time to start Python and import ``module`` (what every command pays before working)."""
    return median(run_measured([python, "-c", f"import {module}"]).wall_seconds for _ in range(reps))


# --- machine details -------------------------------------------------------------------------------------

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine_details() -> list[tuple[str, str]]:
    import torch
    import torchvision

    lscpu = _lscpu()
    flags = set((lscpu.get("Flags") or _cpuinfo_flags()).split())
    cores = lscpu.get("Core(s) per socket", "?")
    sockets = lscpu.get("Socket(s)", "1")
    threads = lscpu.get("Thread(s) per core", "?")
    onednn = "yes" if torch.backends.mkldnn.is_available() else "no"
    rows = [
        ("CPU", lscpu.get("Model name", platform.processor() or "?")),
        ("cores", f"{os.cpu_count()} logical CPUs ({sockets} socket(s) x {cores} core(s) x {threads} thread(s)), "
                  f"{len(os.sched_getaffinity(0))} usable by this process"),
        ("CPU features", ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FEATURES)),
        ("memory", _meminfo_total()),
        ("load average at start", ", ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, "
                  f"{torch.get_num_interop_threads()} inter-op threads, CPU capability "
                  f"{torch.backends.cpu.get_cpu_capability()}, oneDNN {onednn}"),
        ("torchvision", torchvision.__version__),
        ("CUDA", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"),
        ("imgtrain", _imgtrain_version()),
    ]
    return rows


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def _cpuinfo_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.partition(":")[2]
    except OSError:
        pass
    return ""


def _meminfo_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "?"


def _imgtrain_version() -> str:
    import imgtrain

    text = imgtrain.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        text += f", commit {commit}" + (" with uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return text


# --- markdown ----------------------------------------------------------------------------------------------

@dataclass
class Section:
    """One section of the results: a title and markdown blocks (paragraphs and tables, in order)."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        return "\n\n".join([f"## {self.title}", *self.blocks])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float | None, digits: int = 1) -> str:
    """A number for a table: thousands separators, a fixed number of decimals, a dash when missing."""
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def spread(values: Sequence[float], digits: int = 1) -> str:
    """Every repetition, for a column showing how much the runs vary."""
    return ", ".join(num(v, digits) for v in values)


def med(values: Sequence[float]) -> float | None:
    return median(values) if values else None
