"""Outputs appear complete or not at all.

A module writes into a temporary directory beside its target and renames it into place
only when everything is written: a failed or interrupted run never leaves a half-written
output, and never replaces an existing one unless asked to (``overwrite``). Temporary
directories of runs that were killed are removed by the next run for the same target.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from imgtrain.errors import OutputExistsError, OutputNotWritableError, option

TMP_PREFIX = ".imgtrain-tmp-"
OWNER_FILE = ".owner-pid"
PARTIAL_SUFFIX = ".partial"


def path_relation(a: Path | str, b: Path | str) -> str | None:
    """How path ``a`` stands to path ``b`` once links and ``..`` are resolved: "is", "is inside",
    "holds", or None when neither holds the other."""
    return _relation(_resolved(a), _resolved(b))


def _resolved(path: Path | str) -> Path:
    return Path(path).absolute().resolve()


def _relation(a: Path, b: Path) -> str | None:
    return "is" if a == b else "is inside" if a.is_relative_to(b) else "holds" if b.is_relative_to(a) else None


def check_not_an_input(target: Path | str, inputs: dict[str, Path | str | Sequence]) -> None:
    """Refuse an output that is one of the inputs, lies inside one, or holds one: replacing it (or
    writing into it) would destroy or alter that input. Paths are compared with links and ``..``
    resolved. ``inputs`` maps what each input is ("training data") to a path or a list of paths."""
    output = _resolved(target)
    for what, paths in inputs.items():
        for given in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            relation = _relation(output, _resolved(given))
            if relation:
                raise OutputNotWritableError(
                    f"the output {target} {relation} the {what} {given}: writing it would destroy that input",
                    "choose an output path outside every input")


def check_output_writable(target: Path, *, overwrite: bool = False,
                          inputs: dict[str, Path | str | Sequence] | None = None) -> None:
    """Fail before any work when the output exists, is or holds one of ``inputs`` (see
    check_not_an_input), or its folder cannot be written."""
    target = Path(target)
    check_not_an_input(target, inputs or {})
    if target.absolute().resolve() in (Path.cwd().resolve(), Path(target.absolute().anchor)):
        raise OutputNotWritableError(
            f"the output {target} is the current folder or the root: an output is a folder of its own, "
            "moved into place when complete", "name a new folder, e.g. ./model")
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise OutputExistsError(
            f"output {target} already exists",
            f"choose another output path, or pass {option('overwrite', True)} to replace it",
        )
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=TMP_PREFIX + "probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot write the output {target} ({exc.strerror or exc})",
            "choose an output path in a folder you can write to",
        ) from None


def _process_identity(pid: int) -> str | None:
    """``"<pid> <start time>"``: a process, told apart from a later one that reuses its pid (Linux's
    /proc); ``"<pid>"`` where the start time cannot be read; None when no such process lives."""
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        return f"{pid} {started}"
    except (OSError, IndexError):
        pass
    if os.name == "nt" or Path("/proc/self/stat").exists():
        return None  # Windows cannot probe a pid without signalling it; with /proc, no entry: gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # alive, but another user's
    return str(pid)


def owner_pid(folder: Path) -> int | None:
    """The pid of the live process that owns a temporary or work directory; None when it is gone (or
    its pid now belongs to another process)."""
    try:
        marker = (folder / OWNER_FILE).read_text().split()
        pid = int(marker[0])
    except (OSError, ValueError, IndexError):
        return None
    identity = _process_identity(pid)
    if identity is None or (len(marker) > 1 and identity.split()[1:] != marker[1:]):
        return None
    return pid


def disown(folder: Path) -> None:
    """Mark a work directory this process owns as no longer in use (its run ended, or failed): a later
    run may take it over, even while this process lives on (a notebook after an interrupt)."""
    marker = folder / OWNER_FILE
    try:
        if marker.read_text().split()[:1] == [str(os.getpid())]:
            marker.unlink()
            folder.rmdir()  # only when nothing else is in it
    except OSError:
        pass


def _owner_alive(folder: Path) -> bool:
    if not (folder / OWNER_FILE).is_file():
        return True  # unknown owner: leave it alone
    return owner_pid(folder) is not None


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporary directories that killed runs left for ``target``."""
    target = Path(target).absolute()
    remove_abandoned(target.parent, f"{TMP_PREFIX}{target.name}-*")


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Delete the directories in ``folder`` matching ``pattern`` whose owner is dead: never a live run's,
    nor one whose owner is not known."""
    for leftover in Path(folder).glob(pattern):
        if leftover.is_dir() and not _owner_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def make_owned_dir(path: Path) -> Path:
    """Make ``path`` (if need be) and mark it as this process's until it is published or disowned."""
    path.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed: another run must never read a marker half written (and take it for dead).
    (path / (OWNER_FILE + PARTIAL_SUFFIX)).write_text(_process_identity(os.getpid()) or str(os.getpid()))
    os.replace(path / (OWNER_FILE + PARTIAL_SUFFIX), path / OWNER_FILE)
    return path


def publish(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory into place, replacing ``target`` if it exists."""
    if target.exists():
        # Move the old output aside first, so that there is no moment with neither.
        old = make_owned_dir(Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-old-", dir=tmp.parent)))
        os.rename(target, old / "x")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old / "x", target)  # the old output back in its place
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    (target / OWNER_FILE).unlink(missing_ok=True)  # until here, a failure leaves tmp for the next run to remove


@contextlib.contextmanager
def atomic_output_dir(target: Path | str, *, overwrite: bool = False,
                      inputs: dict[str, Path | str | Sequence] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` when the block succeeds."""
    target = Path(target)
    check_output_writable(target, overwrite=overwrite, inputs=inputs)
    remove_stale_temporaries(target)
    tmp = make_owned_dir(Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-",
                                               dir=target.absolute().parent)))
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file with ``atomic_file``: complete at ``path``, or not there at all.

    safetensors reports a failed write (a full disk, say) as its own error type; it is
    raised here as the OSError it is, naming the file. The file is readable as the umask
    allows (safetensors alone makes it private).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            os.chmod(tmp, 0o666 & ~_umask())
    except SafetensorError as exc:
        # "... (os error 28)" in safetensors 0.8, "IoError(Os { code: 28, ... })" in 0.4 and 0.5
        code = re.search(r"(?:os error |code: )(\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (/proc/self/status): setting it for a
    moment, from the thread that writes a checkpoint, would leave a file another thread makes then writable by all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # elsewhere: set and put back, private meanwhile rather than open
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` to write a file under. When the block succeeds,
    the file is flushed to the disk and takes ``path``'s name; when it fails, it is removed."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
