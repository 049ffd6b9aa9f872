"""Running a pipeline file: each step once, its output kept in a content-addressed cache.

A step's cache key is a digest of the component, imgtrain's version, its parameters, and the digests
of what it reads: a pipeline input's files (names and bytes), or the key of the step that wrote it.
A re-run reuses every step whose key is in the cache and runs only what changed; ``force_rerun``
runs everything again. A step runs into a temporary folder of the cache, owned by its process, and
becomes an entry only when complete, by a rename: a killed run leaves no half-written entry (the next
run removes its temporary folder once its owner is dead, never a live run's). Runs may share a cache
(two pipeline files in one folder do): a step is computed under a lock of its key, so a second run
that needs the same step waits for it and reuses it. What the pipeline publishes is copied out of the
cache (hard links where the file system allows), into an output that must not be or hold any of the
pipeline's inputs, its file or its cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imgtrain.directories.atomic import (
    TMP_PREFIX,
    atomic_output_dir,
    check_output_writable,
    make_owned_dir,
    path_relation,
    publish,
    remove_abandoned,
)
from imgtrain.directories.files import link_or_copy
from imgtrain.errors import ImgtrainError, InvalidPipelineError, OutputNotWritableError
from imgtrain.pipeline.file import Pipeline, Step, load_pipeline

CACHE_FOLDER = ".imgtrain-cache"  # beside the pipeline file, unless asked for elsewhere
_PARTIAL = "partial-"
_LOCKS = ".locks"  # one lock file per entry, held while a run computes it
_KEY = re.compile(r"[0-9a-f]{32}")


@dataclass
class StepRun:
    name: str
    key: str
    reused: bool
    seconds: float


def run_pipeline(file: Path | str, output: Path | str | None = None, *, force_rerun: bool = False,
                 cache: Path | str | None = None, overwrite: bool = False,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[StepRun]:
    """Run every step (or reuse it), then publish the pipeline's outputs under ``output``/NAME (default: a
    folder ``<file name>-output`` beside the file); with no outputs declared, every step's."""
    pipeline = load_pipeline(file)
    force_rerun = force_rerun or pipeline.force_rerun
    for name, (kind, path) in pipeline.inputs.items():
        if not (path.is_dir() if kind == "uri_folder" else path.is_file()):
            raise InvalidPipelineError(f"{pipeline.path}: input {name!r} ({kind}) {path} does not exist",
                                       "make it, or correct its path (relative to the pipeline file)")
    store = _store(pipeline, cache)
    output = Path(output) if output is not None else pipeline.path.with_name(pipeline.path.stem + "-output")
    _check_places(pipeline, output, store, overwrite=overwrite)
    store.mkdir(parents=True, exist_ok=True)
    _remove_partials(store)
    plans = _plans(pipeline, store)  # every input exists: every step has its key
    keys = {plan.name: plan.key for plan in plans}
    runs = []
    for step, plan in zip(pipeline.steps.values(), plans, strict=True):
        entry = plan.entry
        started = time.perf_counter()
        if not (entry.is_dir() and not force_rerun):  # entries appear complete, by a rename: reusing needs no lock
            with _key_lock(store, entry.name, wait=lambda s=step: log(
                    f"step {s.name} ({s.component.name}): another run is computing it; waiting for it")):
                if not (entry.is_dir() and not force_rerun):  # the run waited for may have made it
                    log(f"step {step.name} ({step.component.name}): running")
                    _run_step(step, pipeline, store, keys, entry, log)
                    runs.append(StepRun(step.name, keys[step.name], False, time.perf_counter() - started))
                    continue
        log(f"step {step.name} ({step.component.name}): reused from the cache")
        runs.append(StepRun(step.name, keys[step.name], True, 0.0))
    _publish(pipeline, store, keys, output, overwrite=overwrite)
    reused = [r.name for r in runs if r.reused]
    log(f"pipeline done: {len(runs) - len(reused)} step(s) run, {len(reused)} reused"
        + (f" ({', '.join(reused)})" if reused else "") + f"; outputs in {output}")
    return runs


@dataclass
class StepPlan:
    """What a run would do with a step now: its cache key, and whether the cache holds it (then it is reused)."""

    name: str
    key: str | None  # None when an input it reads (a pipeline input) is missing
    cached: bool
    entry: Path | None  # its folder in the cache: one sub-folder per output port


def plan_pipeline(pipeline: Pipeline, *, cache: Path | str | None = None) -> list[StepPlan]:
    """For each step of a loaded pipeline (in run order), what ``run_pipeline`` would do with it now: reuse it
    from the cache, or run it. The same keys as a run: the inputs' digests (which reads them whole)."""
    return _plans(pipeline, _store(pipeline, cache))


def _store(pipeline: Pipeline, cache: Path | str | None) -> Path:
    return Path(cache) if cache is not None else pipeline.path.parent / CACHE_FOLDER


def _plans(pipeline: Pipeline, store: Path) -> list[StepPlan]:
    """Each step's key (a digest of what it is and reads) and its entry in the cache, in run order."""
    digests = {name: _folder_digest(path) for name, (kind, path) in pipeline.inputs.items()
               if (path.is_dir() if kind == "uri_folder" else path.is_file())}
    keys: dict[str, str] = {}
    plans = []
    for step in pipeline.steps.values():
        if all((s.input in digests) if s.input is not None else s.job in keys for s in step.inputs.values()):
            keys[step.name] = _key(step, digests, keys)
            entry = store / keys[step.name]
            plans.append(StepPlan(step.name, entry.name, entry.is_dir() and not pipeline.force_rerun, entry))
        else:
            plans.append(StepPlan(step.name, None, False, None))
    return plans


def _check_places(pipeline: Pipeline, output: Path, store: Path, *, overwrite: bool) -> None:
    """Before any step runs (and before anything is made): the cache may not be or lie in an input (its
    entries are written into it; it may hold one, as a cache beside the file does) nor be a file; the output
    may not be, lie in or hold an input, the pipeline file or the cache (publishing replaces it: with
    --overwrite that would delete them)."""
    inputs = {f"pipeline input {name!r}": where for name, (_, where) in pipeline.inputs.items()}
    inputs["pipeline file"] = pipeline.path
    for what, where in inputs.items():
        relation = path_relation(store, where)
        if relation in ("is", "is inside"):
            raise OutputNotWritableError(f"the step cache {store} {relation} the {what} {where}: its entries would "
                                         "be written into that input", "choose a --cache outside the pipeline's inputs")
    if store.exists() and not store.is_dir():
        raise OutputNotWritableError(f"the step cache {store} is a file, not a folder", "choose a --cache folder")
    check_output_writable(output, overwrite=overwrite, inputs={**inputs, "step cache": store})


def _key(step: Step, digests: dict[str, str], keys: dict[str, str]) -> str:
    reads = {port: digests[s.input] if s.input is not None else f"{keys[s.job]}/{s.port}"
             for port, s in sorted(step.inputs.items())}
    what = {"component": step.component.name, "code": code_digest(),
            "parameters": step.parameters, "inputs": reads}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.cache
def code_digest() -> str:
    """The digest of imgtrain's own source files (its version number among them). A step's result depends on the
    code as much as on what the file says: a new default (the weights' average) or a new way to compute (precise
    BatchNorm) changes the model a step gives under the same version number and the same parameters, so the cache
    keys on the code."""
    return _folder_digest(Path(__file__).resolve().parents[1], "*.py")


def _folder_digest(path: Path, pattern: str = "*") -> str:
    """The digest of a folder's (or a file's) contents: every file's (matching ``pattern``) relative name and bytes,
    each prefixed by its length."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())
    for file in files:
        name = str(file.relative_to(path) if file != path else file.name).encode("utf-8", "surrogateescape")
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:  # each name and each file's bytes prefixed by its length: no two folders alike
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _run_step(step: Step, pipeline: Pipeline, store: Path, keys: dict[str, str], entry: Path, log) -> None:
    module, name = step.component.function.split(":")
    function = getattr(importlib.import_module(module), name)
    work = make_owned_dir(Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{entry.name}-", dir=store)))
    try:
        arguments = {port: (pipeline.inputs[s.input][1] if s.input is not None else store / keys[s.job] / s.port)
                     for port, s in step.inputs.items()}
        arguments |= {port: work / port for port in step.component.outputs}
        if "log" in _parameters(function):
            arguments["log"] = log
        try:
            function(**arguments, **step.parameters)
        except ImgtrainError as exc:  # the module's own error, said as the step's
            exc.message = f"step {step.name!r}: {exc.message}"
            raise
        publish(work, entry)  # complete: it becomes the entry in one step (--force-rerun: replacing the old one)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parameters(function) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)


def _remove_partials(store: Path) -> None:
    """The temporary folders of runs that were killed (a step's work, an entry that --force-rerun moved aside):
    each is removed only when the lock of its step's key can be had, so never while a run computes that step,
    whatever process, container or machine it runs in. Where locks cannot be had, its owner's pid decides."""
    for folder in sorted(store.iterdir()):
        prefix = next((p for p in (_PARTIAL, TMP_PREFIX) if folder.name.startswith(p)), None)
        key = folder.name[len(prefix):].split("-", 1)[0] if prefix else ""
        if not _KEY.fullmatch(key) or not folder.is_dir():
            continue
        with _key_lock(store, key) as held:
            if held:
                shutil.rmtree(folder, ignore_errors=True)
            elif held is None:
                remove_abandoned(store, folder.name)


@contextlib.contextmanager
def _key_lock(store: Path, key: str, wait: Callable[[], None] | None = None) -> Iterator[bool | None]:
    """Hold the lock of a cache key while a run computes its step, so that two runs sharing a cache never
    compute one step at once (the second waits, then finds the entry made). Yields True when held; False when
    another run holds it and ``wait`` is None; None where no lock can be had (no fcntl on Windows, a read-only
    cache, a file system without locks). Advisory locks (flock): the system releases them when a run dies."""
    try:
        import fcntl

        (store / _LOCKS).mkdir(exist_ok=True)
        lock = open(store / _LOCKS / key, "a")
    except (ImportError, OSError):
        yield None
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is None:
                yield False
                return
            wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # ENOLCK: a network file system without locks
            yield None
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(pipeline: Pipeline, store: Path, keys: dict[str, str], output: Path, *, overwrite: bool) -> None:
    published = pipeline.outputs or {f"{step.name}.{port}" if len(step.component.outputs) > 1 else step.name:
                                     (step.name, port) for step in pipeline.steps.values()
                                     for port in step.component.outputs}
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for name, (step, port) in published.items():
            shutil.copytree(store / keys[step] / port, tmp / name, copy_function=link_or_copy)
