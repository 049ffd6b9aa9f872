"""Background jobs: the CLI's commands, one after another, in a process of their own.

A job is a folder: ``job.json`` (its commands), ``log.txt`` (what they print), ``status.json`` (which
command runs, and how the job ended) and ``pid``. Its process (``python -m imgtrain.ui.jobs FOLDER``)
runs each command as ``python -m imgtrain ...``, the command line itself, in a session of its own:
closing the page, or stopping the server, leaves it running, and the page finds it again from its
folder. Stop sends SIGTERM to its process group, which every command takes as Ctrl-C: training keeps
its checkpoint, and ``--resume`` goes on from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imgtrain.ui.workspace import read_json, write_json

JOB_FILE, LOG_FILE, STATUS_FILE, PID_FILE = "job.json", "log.txt", "status.json", "pid"
STOP_FILE = "stop-asked"  # Stop was pressed: a process that ends without a word then was stopped, not failed
STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT)
_children: dict[Path, subprocess.Popen] = {}  # this server's jobs, reaped when asked about


def start(folder: Path, commands: list[list[str]], *, env: dict[str, str] | None = None) -> None:
    """Run ``commands`` (each the arguments of one ``imgtrain`` command) in a new background process."""
    if state(folder)["state"] == "running":
        raise RuntimeError(f"a job already runs in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (STATUS_FILE, PID_FILE, STOP_FILE):
        (folder / name).unlink(missing_ok=True)
    write_json(folder / JOB_FILE, {"commands": commands, "started": time.time()})
    with open(folder / LOG_FILE, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "imgtrain.ui.jobs", str(folder)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    (folder / PID_FILE).write_text(str(process.pid))
    _children[folder] = process


def _alive(folder: Path) -> int | None:
    """The pid of the job's process, if it still runs (and is that job: a pid may be reused)."""
    child = _children.get(folder)
    if child is not None:
        if child.poll() is None:
            return child.pid  # this server's own child (its command line may not show the job yet)
        del _children[folder]  # reaped
    try:
        pid = int((folder / PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"imgtrain.ui.jobs" in cmdline and os.fsencode(folder) in cmdline:
            return pid
    except OSError:
        pass
    # The runner is gone (killed with SIGKILL?), but its command may still run: its process group (the runner's
    # pid, in a session of its own) lives while any of its processes does, and Stop reaches them there.
    status = read_json(folder / STATUS_FILE, {})
    if status.get("ended") is None:
        try:
            os.killpg(pid, 0)
            return pid
        except (ProcessLookupError, PermissionError):
            return None
    return None


def state(folder: Path) -> dict:
    """What the job does or did: ``state`` none, running, done, failed or stopped; the command it is on; its
    error (the last ``error:`` line it printed, as the CLI prints it); the end of its log."""
    job = read_json(folder / JOB_FILE)
    if job is None:
        return {"state": "none"}
    status = read_json(folder / STATUS_FILE, {})
    pid = _alive(folder)
    commands = job["commands"]
    out = {"command": status.get("command", 0), "commands": len(commands), "started": job.get("started"),
           "ended": status.get("ended"), "log": _tail(folder / LOG_FILE)}
    if pid is not None and status.get("ended") is None:
        out["state"] = "running"
    elif status.get("ended") is None and (folder / STOP_FILE).exists():
        out["state"] = "stopped"  # stopped before it could say so (while starting)
    elif status.get("ended") is None:
        out["state"], out["error"] = "failed", "the job's process ended without a word (was it killed?)"
    else:
        code = status.get("code", 1)
        out["state"] = "done" if code == 0 else "stopped" if code in STOPPED else "failed"
        if code != 0:
            errors = [line[len("error: "):] for line in out["log"].splitlines() if line.startswith("error: ")]
            out["error"] = errors[-1] if errors else f"exit code {code}"
    out["running"] = commands[out["command"]][0] if out["command"] < len(commands) else None
    return out


def stop(folder: Path) -> bool:
    """SIGTERM to the job's process group; whether one was running."""
    pid = _alive(folder)
    if pid is None:
        return False
    (folder / STOP_FILE).touch()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def log_text(folder: Path, limit: int = 8 * 2**20) -> str:
    """A job's whole log (its first ``limit`` bytes)."""
    try:
        with open(folder / LOG_FILE, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def _tail(path: Path, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _run(folder: Path) -> int:
    """The job's process: each command as `python -m imgtrain ...`, the command line itself, in a process of its
    own (nothing one leaves, threads or memory, weighs on the next), until one fails or is stopped. SIGTERM to
    the group reaches the command, which takes it as Ctrl-C; this process waits for it to end, then says so."""
    stopping = []

    def stopped(number, frame):
        stopping.append(number)

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    commands = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))["commands"]
    code = 0
    for i, argv in enumerate(commands):
        write_json(folder / STATUS_FILE, {"command": i})
        if stopping:
            code = 128 + stopping[0]
            break
        print(f"$ imgtrain {' '.join(argv)}", flush=True)
        command = subprocess.Popen([sys.executable, "-m", "imgtrain", *argv], stdin=subprocess.DEVNULL)
        if stopping:  # SIGTERM came between the check above and the start: the command has it too
            command.send_signal(signal.SIGTERM)
        code = command.wait()
        if code < 0:  # killed by the signal before its handler was there (it was still starting)
            code = 128 - code
        if stopping and code == 0:
            code = 128 + stopping[0]  # stopped between its last epoch and its end: the next does not start
        if code != 0:
            break
    write_json(folder / STATUS_FILE, {"command": i, "ended": time.time(), "code": code})
    return code


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
