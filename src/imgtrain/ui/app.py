"""The web application of ``imgtrain ui``: the page, and the JSON API it calls.

Every request carries the token printed with the URL (the page's cookie, an ``Authorization: token ...``
header, or ``?token=`` once): without it, 403. An error is the CLI's one line (``InvalidParameterError:
...``) with the control it belongs to (``field``), and the server goes on. The page adds no logic of its
own: opening a folder runs Convert to Image Directory, a run is Split Image Directory, the architecture's
untrained model, Train PyTorch Model, Score Image Model and Evaluate Model, each the CLI's command in a
background job (jobs.py); a prediction is answered by ``imgtrain serve``'s own code.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import ipaddress
import json
import math
import re
import secrets
import shutil
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from imgtrain.errors import (
    ImgtrainError,
    InvalidParameterError,
    MissingDependencyError,
    check_range,
    escaped,
    one_line,
    speaking_command_line,
)
from imgtrain.ui import jobs
from imgtrain.ui.workspace import Workspace, check_name, plain_name, read_json, write_json

STATIC = Path(__file__).parent / "static"
RESUME_PREFIX = ".imgtrain-resume-"  # training.train's, without importing torch for a page that polls
MIN_FREE_GB = 2  # uploads leave at least this much of the workspace's disk free
KEPT_MODELS = 2  # trained models kept loaded for Try it
MAX_UPLOAD_MB = 20.0  # an image sent to Try it, or uploaded in a dropped folder
# Train PyTorch Model's defaults (the designer's), as TrainingParameters has them (a test holds them equal): the
# page's first answer needs no torch.
DEFAULTS = {"epochs": 5, "batch_size": 16, "learning_rate": 0.001, "random_seed": 1, "patience": 3, "image_size": None}
TRAINING_FIELDS = tuple(DEFAULTS)
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z-]*)")
CONTROLS = set(TRAINING_FIELDS) | {"validation_share", "validation_dataset", "model_name", "name", "format"}
_ANSWER_FIELDS = {"warmup-steps": "warmup_epochs"}
EXPORTS = {"onnx": "model.onnx", "pt2": "model.pt2"}
UPLOADS = "uploads"  # the folders dropped on the page
SPEEDS_FILE = "speeds.json"  # "speed here": images a second each architecture scored on this machine
PIPELINES_FILE, PIPELINES_DIR = "pipelines.json", "pipelines"  # the pipeline files opened, and their runs
EXPLAINED = 8  # images `imgtrain explain` shows of a run's validation share: its worst mistakes first


class PageError(Exception):
    """An error for the page: HTTP status, the one line, and the control it belongs to."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def cli_line(exc: BaseException) -> str:
    """An error as the CLI prints it after ``error: ``."""
    return f"{type(exc).__name__}: {one_line(exc)}" if isinstance(exc, ImgtrainError) else one_line(exc)


def _field_of(message: str, default: str | None) -> str | None:
    """The control an error names: the first of the page's parameters that the message names as a flag (a
    ``--`` inside a path the user gave names nothing)."""
    for match in _FLAG.finditer(message):
        name = _ANSWER_FIELDS.get(match.group(1), match.group(1).replace("-", "_"))
        if name in CONTROLS:
            return name
    return default


class UI:
    """The server's state: the workspace, the token, the model loaded for predictions."""

    def __init__(self, workspace: Workspace, token: str, log: Callable[[str], None]) -> None:
        self.workspace, self.token, self.log = workspace, token, log
        self._endpoints: dict[tuple[Path, int], list] = {}  # (model, its time) -> [Endpoint, requests using it]
        self._endpoint_lock = asyncio.Lock()
        self._catalog: list[dict] | None = None
        self._speed_lock = threading.Lock()  # one speed measured at a time: two would share the cores
        # Cookies are kept per host, not per port: each server's has a name of its own.
        self.cookie = "imgtrain-ui-" + hashlib.sha256(token.encode()).hexdigest()[:8]

    # --- Data ------------------------------------------------------------------------------------------

    def open_dataset(self, body: dict) -> dict:
        from imgtrain.data.convert import ARCHIVE_SUFFIXES, find_images

        path = self.workspace.allowed(body.get("path"), "folder")
        if not path.exists():
            raise InvalidParameterError(f"{path} does not exist", "check the path, or pick a folder below")
        if path.is_dir():
            try:
                found = find_images(path)
            except PermissionError as exc:
                raise InvalidParameterError(f"{path} cannot be read ({exc.strerror})",
                                            "pick a folder you may read") from None
            if not found.items:
                raise InvalidParameterError(f"{path} holds no images", "pick a folder with one sub-folder of "
                                            "images per class")
            # Convert follows symbolic links: one out of the folders the page may open would bring that file in.
            out = [p for p, _ in found.items if not self.workspace.inside(p.resolve())]
            if out:
                raise InvalidParameterError(
                    f"{len(out):,} image(s) of {path} are symbolic links out of the folders this page may open "
                    f"(the first: {escaped(str(out[0]))})", "copy those images into the folder, or start `imgtrain "
                    "ui` with --data naming where they are")
        elif not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise InvalidParameterError(f"{path} is not a folder or an archive",
                                        f"pick a folder, or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}")
        name = self.workspace.new_dataset(path)
        folder = self.workspace.dataset_dir(name)
        # Converted, and from the files as they are now (each one's name, class, size and time; an archive's):
        # else converted again.
        stamp = _fingerprint([(p, c) for p, c in found.items] if path.is_dir() else [(path, None)])
        converted = (folder / "images" / "_meta.yaml").is_file() and \
            read_json(folder / "converted-from.json", {}).get("fingerprint") == stamp
        if not converted and jobs.state(folder / "job")["state"] != "running":
            write_json(folder / "converted-from.json", {"fingerprint": stamp})
            jobs.start(folder / "job", [["convert-to-image-directory", str(path), "--output",
                                         str(folder / "images"), "--overwrite"]])
        return self.dataset(name)

    async def upload(self, request) -> dict:
        """One file of a folder dropped on the page (or chosen with "Upload a folder"), streamed to
        WORKSPACE/uploads/NAME/CLASS/FILE: ``?folder=NAME&path=[TOP/]CLASS/FILE`` (its last two parts are kept;
        a lone FILE is unlabelled). Only image files, at most MAX_UPLOAD_MB each; the images are decoded
        later, by Convert to Image Directory, when the page opens the folder."""
        from imgtrain.directories.image_directory import IMAGE_EXTENSIONS

        folder = check_name("upload", request.query_params.get("folder"))
        parts = [p for p in str(request.query_params.get("path", "")).replace("\\", "/").split("/") if p]
        parts = parts[-2:]
        for part in parts:
            if part in (".", "..") or part.startswith(".") or len(part.encode()) > 200 \
                    or re.search(r"[\x00-\x1f\x7f]", part):
                raise PageError(400, f"the file name {escaped(part)[:80]!r} is not one to keep: rename it", "path")
        if not parts or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            raise PageError(415, f"{escaped('/'.join(parts))[:120]} is not an image file (it ends in none of "
                                 f"{', '.join(IMAGE_EXTENSIONS)}): left out", "path")
        limit = int(MAX_UPLOAD_MB * 2**20)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PageError(413, f"{escaped(parts[-1])[:80]} is {int(declared):,} bytes, over the limit of "
                                 f"{limit:,} for an image", "path")
        free = shutil.disk_usage(self.workspace.root).free
        if free < MIN_FREE_GB * 2**30 + int(declared or 0):
            raise PageError(507, f"the disk of the workspace has {free / 2**30:.1f} GB free: uploads stop at "
                                 f"{MIN_FREE_GB} GB. Free some space", "path")
        target = self.workspace.root / UPLOADS / folder / Path(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        received = 0
        try:
            with open(tmp, "wb") as out:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise PageError(413, f"{escaped(parts[-1])[:80]} is over the limit of {limit:,} bytes for "
                                             "an image", "path")
                    out.write(chunk)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return {"saved": "/".join(parts), "bytes": received, "folder": str(self.workspace.root / UPLOADS / folder)}

    def dataset(self, name: str) -> dict:
        folder = self.workspace.dataset_dir(name)
        listing = self.workspace.listing(name)
        audit = read_json(folder / "images" / "audit.json")
        job = jobs.state(folder / "job")
        return {"name": name, "source": read_json(folder / "dataset.json", {}).get("source"),
                "classes": [{"name": c, "count": len(listing.images[c])} for c in listing.classes],
                "images": sum(len(v) for v in listing.images.values()), "converted": listing.converted,
                "audit": _audit_summary(audit), "job": job}

    # --- Models ----------------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        if self._catalog is None:
            from imgtrain.models.catalog import catalog

            self._catalog = [{"name": m.name, "family": m.family, "params_m": round(m.params / 1e6, 1),
                              "gflops": round(m.gflops, 2), "top1": m.top1, "image_size": m.image_size,
                              "pretrained": m.pretrained} for m in catalog()]
        speeds = read_json(self.workspace.root / SPEEDS_FILE, {})
        for m in self._catalog:
            m["speed"] = next((v for k, v in speeds.items() if k.startswith(f"{m['name']}@{m['image_size']}|")), None)
        return self._catalog

    # --- Runs ------------------------------------------------------------------------------------------

    def start_run(self, body: dict) -> dict:
        from imgtrain.data.split import split_image_directory
        from imgtrain.directories.files import link_or_copy
        from imgtrain.directories.image_directory import ImageDirectory
        from imgtrain.models.registry import get_architecture
        from imgtrain.training.train import TrainingParameters

        values = {}  # the form's numbers first: what is wrong in it is said before anything else
        for key in TRAINING_FIELDS:
            value = body.get(key)
            if value not in (None, ""):
                values[key] = _number(key, value, whole=key != "learning_rate")
        share = _number("validation_share", body.get("validation_share", 0.2), whole=False)
        check_range("validation_share", share, low=0, high=1, low_inclusive=False, high_inclusive=False,
                    hint="pass a share of the images between 0 and 1, such as 0.2")
        dataset = body.get("dataset")
        if not dataset:
            raise PageError(400, "InvalidParameterError: no data set is open. Open a folder on the Data tab first",
                            "dataset")
        data_folder = self.workspace.dataset_dir(str(dataset))
        if not (data_folder / "images" / "_meta.yaml").is_file():
            state = jobs.state(data_folder / "job")
            raise PageError(400, state.get("error") or "InvalidDatasetError: the data set is still being converted. "
                                                       "Wait for its audit on the Data tab", "dataset")
        model_name = str(body.get("model_name") or "resnet18")
        try:
            get_architecture(model_name)
        except ImgtrainError as exc:
            raise PageError(400, cli_line(exc), "model_name") from None
        pretrained = body.get("pretrained", False) is True
        name = body.get("name") or time.strftime("run-%Y%m%d-%H%M%S")
        folder = self.workspace.run_dir(check_name("run", name), exists=False)
        if folder.exists():
            raise PageError(400, f"InvalidParameterError: the run {name!r} exists. Pick another name", "name")
        params = TrainingParameters(**values)
        other = body.get("validation_dataset") or None
        if other is not None:  # a second folder validates: the whole data set trains
            other_folder = self.workspace.dataset_dir(str(other))
            if not (other_folder / "images" / "_meta.yaml").is_file():
                raise PageError(400, f"the data set {other!r} is still being converted: wait for its audit",
                                "validation_dataset")
        staging = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.new")  # two clicks: two folders
        try:
            if other is None:
                split_image_directory(data_folder / "images", staging / "training", staging / "validation",
                                      fraction=round(1 - share, 6), random_seed=params.random_seed)
                training, validation = folder / "training", folder / "validation"
                sets = (ImageDirectory.load(staging / "training"), ImageDirectory.load(staging / "validation"))
            else:  # the run's own copies (hard links where it can): a later re-conversion changes nothing here
                staging.mkdir(parents=True)
                for source, side in ((data_folder / "images", "training"), (other_folder / "images", "validation")):
                    shutil.copytree(source, staging / side, copy_function=link_or_copy)
                training, validation = folder / "training", folder / "validation"
                sets = (ImageDirectory.load(staging / "training"), ImageDirectory.load(staging / "validation"))
            try:
                params.check(len(sets[0]))
            except ImgtrainError as exc:
                raise PageError(400, cli_line(exc), _field_of(exc.message, None)) from None
            self._training_elsewhere("train")  # after the checks: an error in the form is said first
            split = {side: {c: int((data.labels == i).sum()) for i, c in enumerate(data.categories)}
                     for side, data in zip(("training", "validation"), sets, strict=True)}
            write_json(staging / "run.json", {"dataset": dataset, "model_name": model_name, "pretrained": pretrained,
                                              "validation_share": None if other else share,
                                              "validation_dataset": other, "training": str(training),
                                              "validation": str(validation), "split": split,
                                              "parameters": values, "created": time.time()})
            try:
                staging.rename(folder)
            except OSError:
                raise PageError(400, f"InvalidParameterError: the run {name!r} exists. Pick another name",
                                "name") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._start_training(folder, resume=False)
        return self.run(name)

    def _start_training(self, folder: Path, *, resume: bool) -> None:
        run = read_json(folder / "run.json")
        values = run["parameters"]
        commands = []
        if not (folder / "untrained").is_dir():
            commands.append(["image-model", "--model-name", run["model_name"],
                             "--pretrained" if run["pretrained"] else "--no-pretrained",
                             "--output", str(folder / "untrained")])
        training, validation = run.get("training", str(folder / "training")), run.get("validation",
                                                                                     str(folder / "validation"))
        train = ["train-pytorch-model", "--untrained-model", str(folder / "untrained"), "--training-data",
                 training, "--validation-data", validation, "--output", str(folder / "trained")]
        for key, value in values.items():
            train += [f"--{key.replace('_', '-')}", str(value)]
        if resume:  # with what the run was made with where this version's defaults differ: its form lacks them
            from imgtrain.training.train import flags_of_earlier_defaults

            train += [*flags_of_earlier_defaults(folder / "trained"), "--resume"]
        commands.append(train)
        commands.append(["score-image-model", "--trained-model", str(folder / "trained"), "--dataset",
                         validation, "--output", str(folder / "scored"), "--overwrite"])
        commands.append(["evaluate-model", "--scored-dataset", str(folder / "scored"), "--output",
                         str(folder / "evaluation"), "--overwrite"])
        if importlib.util.find_spec("captum") is not None:  # imgtrain[explain]: where it looked, mistakes first
            commands.append(["explain", "--trained-model", str(folder / "trained"), "--dataset",
                             validation, "--images", str(EXPLAINED), "--output",
                             str(folder / "explanations"), "--overwrite"])
        jobs.start(folder / "job", commands)

    def _training_elsewhere(self, field: str) -> None:
        """One training at a time: two would share the cores, each at half the speed."""
        for other in self.workspace.runs():
            if jobs.state(self.workspace.run_dir(other) / "job")["state"] == "running":
                raise PageError(409, f"the run {other!r} is running: stop it, or wait for it to end, before "
                                     "starting another", field)
        for other in self.pipelines():
            if jobs.state(self.workspace.root / PIPELINES_DIR / other["name"] / "job")["state"] == "running":
                raise PageError(409, f"the pipeline {other['name']!r} is running: wait for it to end, before "
                                     "starting another", field)

    def resume_run(self, name: str) -> dict:
        folder = self.workspace.run_dir(name)
        state = jobs.state(folder / "job")["state"]
        if state == "running":
            raise PageError(409, f"the run {name!r} is running", "resume")
        if state == "done":
            raise PageError(409, f"the run {name!r} is complete: there is nothing to resume", "resume")
        if read_json(folder / "run.json", {}).get("imported"):
            raise PageError(409, f"the run {name!r} is an imported model: there is nothing to resume", "resume")
        self._training_elsewhere("resume")
        self._start_training(folder, resume=True)
        return self.run(name)

    def stop_run(self, name: str) -> dict:
        folder = self.workspace.run_dir(name)
        if not jobs.stop(folder / "job"):
            raise PageError(409, f"the run {name!r} is not running", "stop")
        return {"stopping": name}

    def run(self, name: str) -> dict:
        folder = self.workspace.run_dir(name)
        run = read_json(folder / "run.json", {})
        trained = folder / "trained"
        live = folder / f"{RESUME_PREFIX}{trained.name}" / "metrics.jsonl"  # the work folder, while it trains
        source = live if live.is_file() and (not (trained / "metrics.jsonl").is_file()
                                             or live.stat().st_mtime > (trained / "metrics.jsonl").stat().st_mtime) \
            else trained / "metrics.jsonl"
        history = _jsonl(source)
        epochs = int(run.get("parameters", {}).get("epochs", 5))
        job = jobs.state(folder / "job")
        eta = None
        if job["state"] == "running" and history and job.get("running") == "train-pytorch-model":
            per_epoch = sum(h["seconds"] for h in history) / len(history)
            eta = max(0.0, per_epoch * (epochs - history[-1]["epoch"]))
        evaluation = read_json(folder / "evaluation" / "metrics.json")
        exports = [fmt for fmt, file in EXPORTS.items() if (folder / "export" / fmt / file).is_file()]
        explained = read_json(folder / "explanations" / "explanations.json", [])
        return {"name": name, "run": run, "job": job, "history": history, "epochs": epochs, "eta_seconds": eta,
                "explanations": explained if isinstance(explained, list) else [],
                "trained": (trained / "model.safetensors").is_file() or (trained / "_meta.yaml").is_file(),
                "evaluation": _evaluation_summary(evaluation), "exports": exports,
                "folder": str(folder)}

    def runs(self) -> list[dict]:
        out = []
        for name in self.workspace.runs():
            folder = self.workspace.run_dir(name)
            run = read_json(folder / "run.json", {})
            state = jobs.state(folder / "job")["state"]
            out.append({"name": name, "dataset": run.get("dataset"), "model_name": run.get("model_name"),
                        "state": "imported" if run.get("imported") and state == "none" else state})
        return out

    def import_model(self, body: dict) -> dict:
        """A trained model directory from elsewhere (the CLI, another machine) copied into a run of its own, to try,
        export and serve from the page. One that is not imgtrain's trained model directory is refused by name."""
        from imgtrain.directories.model_directory import load_model_spec

        path = self.workspace.allowed(body.get("path"), "model directory")
        spec = load_model_spec(path, need_trained=True)
        links = [p for p in path.rglob("*") if p.is_symlink()]
        if links:
            raise InvalidParameterError(f"{path} holds a symbolic link ({escaped(str(links[0]))})",
                                        "copy the model directory without links, then import the copy")
        name = plain_name(path.name, "model", lambda n: (self.workspace.root / "runs" / n).exists())
        folder = self.workspace.run_dir(name, exists=False)
        staging = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.new")
        try:
            shutil.copytree(path, staging / "trained")
            write_json(staging / "run.json", {"imported": str(path), "model_name": spec.architecture,
                                              "dataset": None, "parameters": {}, "created": time.time()})
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.run(name)

    def speed(self, model_name: str, body: dict) -> dict:
        """Images a second the architecture scores here, at its default image size (or ``image_size``), batches of
        8, after one to warm up: the "speed here" of the models table. Kept in the workspace."""
        import torch

        from imgtrain.models.registry import build_model, get_architecture

        get_architecture(model_name)  # an unknown name: named, with the closest ones
        size = body.get("image_size")
        size = int(_number("image_size", size, whole=True)) if size not in (None, "") else None
        if size is not None:
            check_range("image_size", size, low=32, high=1024)
        size = size or next((m["image_size"] for m in self.models() if m["name"] == model_name), 224)
        speeds = read_json(self.workspace.root / SPEEDS_FILE, {})
        key = f"{model_name}@{size}|torch {torch.__version__}"
        if key not in speeds:
            self._training_elsewhere("model_name")  # a speed measured beside a training says nothing
            if not self._speed_lock.acquire(blocking=False):
                raise PageError(409, "another speed is being measured: wait for it", "model_name")
            try:
                with torch.inference_mode():
                    network = build_model(model_name, 1000, image_size=size).eval()
                    batch = torch.rand(8, 3, size, size).contiguous(memory_format=torch.channels_last)
                    network = network.to(memory_format=torch.channels_last)
                    network(batch)  # warm-up
                    done, start = 0, time.perf_counter()
                    while done < 8 or time.perf_counter() - start < 1.0:
                        network(batch)
                        done += 8
                speeds[key] = round(done / (time.perf_counter() - start), 1)
                write_json(self.workspace.root / SPEEDS_FILE, speeds)
            except ImgtrainError:
                raise
            except Exception as exc:  # torchvision's own refusal: an image size the architecture cannot take
                why = escaped(str(exc).splitlines()[0] if str(exc) else "")[:200]
                raise PageError(400, f"ImageSizeError: {model_name} cannot run at {size} px here "
                                     f"({type(exc).__name__}: {why})", "model_name") from None
            finally:
                self._speed_lock.release()
        return {"model_name": model_name, "image_size": size, "images_per_second": speeds[key]}

    def cell(self, name: str, truth: str, predicted: str) -> list[dict]:
        table = self._scored(name)
        return [{"row": i, "image": Path(table.images[i]).name, "confidence": float(table.confidence[i])}
                for i in range(len(table.truth)) if table.truth[i] == truth and table.predicted[i] == predicted]

    def _scored(self, name: str):
        from imgtrain.scoring.evaluate import read_scored

        folder = self.workspace.run_dir(name)
        if not (folder / "scored").is_dir():
            raise PageError(404, f"the run {name!r} has not been scored yet", "evaluate")
        return read_scored(folder / "scored")

    def scored_image(self, name: str, row: int) -> Path:
        table = self._scored(name)
        if not 0 <= row < len(table.images) or table.root is None:
            raise PageError(404, f"the run {name!r} has no scored image number {row}")
        path = (table.root / table.images[row]).resolve()
        if self.workspace.root not in path.parents:  # the run's validation share, or a data set validating it
            raise PageError(403, f"scored image {row} of {name!r} lies outside the workspace")
        return path

    @asynccontextmanager
    async def endpoint(self, name: str):
        """The run's trained model, loaded as `imgtrain serve` loads it, held for one request. A few stay loaded
        (the most recently used); one is let go only when no request uses it."""
        from starlette.concurrency import run_in_threadpool

        from imgtrain.deploy.serve import Endpoint, ServeOptions, _imports

        _imports()
        trained = self.workspace.run_dir(name) / "trained"
        if not trained.is_dir():
            raise PageError(409, f"the run {name!r} has no trained model yet: train it first", "predict")
        key = (trained, trained.stat().st_mtime_ns)
        async with self._endpoint_lock:
            loaded = self._endpoints.pop(key, None)
            if loaded is None:
                options = ServeOptions(max_body_mb=MAX_UPLOAD_MB, max_batch_size=8, device="cpu")
                loaded = [await run_in_threadpool(Endpoint, trained, name, options, lambda m: None), 0]
            self._endpoints[key] = loaded  # the most recent last
            loaded[1] += 1
            idle = [k for k, (_, users) in self._endpoints.items() if users == 0]
            gone = [self._endpoints.pop(k)[0] for k in idle[:max(0, len(self._endpoints) - KEPT_MODELS)]]
        for old in gone:
            await run_in_threadpool(old.close)
        try:
            yield loaded[0]
        finally:
            loaded[1] -= 1

    def export(self, name: str, fmt: str) -> dict:
        from imgtrain.deploy.export import FORMATS, export_model

        if fmt not in FORMATS:
            raise PageError(400, f"InvalidParameterError: --format {escaped(fmt)[:20]} is not one of "
                                 f"{', '.join(FORMATS)}", "format")
        folder = self.workspace.run_dir(name)
        if not (folder / "trained").is_dir():
            raise PageError(409, f"the run {name!r} has no trained model yet: train it first", "export")
        export_model(folder / "trained", folder / "export" / fmt, format=fmt, overwrite=True, log=self.log)
        return self.run(name)

    # --- Pipelines (the designer's canvas) ----------------------------------------------------------------

    def pipelines(self) -> list[dict]:
        known = read_json(self.workspace.root / PIPELINES_FILE, {})
        return [{"name": name, "path": path} for name, path in sorted(known.items())]

    def open_pipeline(self, body: dict) -> dict:
        from imgtrain.pipeline.file import load_pipeline

        path = self.workspace.allowed(body.get("path"), "pipeline file")
        if not path.is_file():
            raise InvalidParameterError(f"{path} is not a file", "pick a pipeline file (.yaml)")
        self._check_pipeline_inputs(load_pipeline(path))  # a file that does not read: its error now, with its line
        known = read_json(self.workspace.root / PIPELINES_FILE, {})
        name = next((n for n, p in known.items() if p == str(path)), None)
        if name is None:
            name = plain_name(path.stem, "pipeline", lambda n: n in known)
            known[name] = str(path)
            write_json(self.workspace.root / PIPELINES_FILE, known)
        return self.pipeline(name)

    def _check_pipeline_inputs(self, pipeline) -> None:
        """A pipeline's inputs, like any folder the page opens, lie in the workspace or a --data folder."""
        for input_name, (_, where) in pipeline.inputs.items():
            if not self.workspace.inside(Path(where).resolve()):
                raise InvalidParameterError(
                    f"{pipeline.path}: input {input_name!r} ({where}) is outside the folders this page may open "
                    f"({', '.join(map(str, self.workspace.roots))})",
                    "start `imgtrain ui` with --data naming its folder, or run it with `imgtrain pipeline run`")

    def _pipeline_path(self, name: str) -> Path:
        path = read_json(self.workspace.root / PIPELINES_FILE, {}).get(check_name("pipeline", name))
        if path is None:
            raise PageError(404, f"there is no pipeline {name!r}: open its file first", "pipeline")
        return self.workspace.allowed(path, "pipeline file")

    def pipeline(self, name: str) -> dict:
        """The graph of a pipeline file, and each step's state: reused from the cache, ran, running, failed, or
        will run (what a run does now)."""
        from imgtrain.pipeline.file import load_pipeline
        from imgtrain.pipeline.run import plan_pipeline

        pipeline = load_pipeline(self._pipeline_path(name))
        self._check_pipeline_inputs(pipeline)  # before the plan reads them whole
        plans = plan_pipeline(pipeline)
        job = jobs.state(self.workspace.root / PIPELINES_DIR / name / "job")
        said = {}  # what the last run said of each step: running, or reused
        for line in jobs.log_text(self.workspace.root / PIPELINES_DIR / name / "job").splitlines():
            found = re.match(r"step ([\w-]+) \([\w-]+\): (running|reused from the cache)", line)
            if found:
                said[found.group(1)] = found.group(2)
        steps = []
        for plan in plans:
            step = pipeline.steps[plan.name]
            if plan.cached:
                state = "ran" if said.get(plan.name) == "running" else "reused"
            elif said.get(plan.name) == "running":
                state = {"running": "running", "failed": "failed", "stopped": "stopped"}.get(job["state"], "will run")
            else:
                state = "will run"
            steps.append({"name": plan.name, "component": step.component.name, "state": state, "key": plan.key,
                          "inputs": {port: ({"input": src.input} if src.input is not None
                                            else {"step": src.job, "port": src.port})
                                     for port, src in step.inputs.items()},
                          "outputs": list(step.component.outputs), "parameters": {
                              k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                              for k, v in step.parameters.items()}})
        return {"name": name, "path": str(pipeline.path), "job": job, "steps": steps,
                "inputs": [{"name": n, "kind": kind, "path": str(path)} for n, (kind, path) in pipeline.inputs.items()],
                "outputs": {n: list(where) for n, where in pipeline.outputs.items()},
                "output": str(self.workspace.root / PIPELINES_DIR / name / "output")}

    def run_pipeline(self, name: str, body: dict) -> dict:
        from imgtrain.pipeline.file import load_pipeline

        path = self._pipeline_path(name)
        self._check_pipeline_inputs(load_pipeline(path))
        folder = self.workspace.root / PIPELINES_DIR / name
        if jobs.state(folder / "job")["state"] == "running":
            raise PageError(409, f"the pipeline {name!r} is running", "pipeline")
        self._training_elsewhere("pipeline")
        command = ["pipeline", "run", str(path), "--output", str(folder / "output"), "--overwrite"]
        if body.get("force_rerun"):
            command.append("--force-rerun")
        (folder / "job" / "log.txt").unlink(missing_ok=True)  # the states read the last run's words
        jobs.start(folder / "job", [command])
        return self.pipeline(name)

    def step_outputs(self, name: str, step: str) -> dict:
        from imgtrain.pipeline.file import load_pipeline
        from imgtrain.pipeline.run import plan_pipeline

        pipeline = load_pipeline(self._pipeline_path(name))
        self._check_pipeline_inputs(pipeline)
        plans = plan_pipeline(pipeline)
        plan = next((p for p in plans if p.name == step), None)
        if plan is None:
            raise PageError(404, f"the pipeline {name!r} has no step {escaped(step)[:40]!r}", "pipeline")
        if not plan.cached:
            return {"step": step, "folder": None, "files": {}}
        files = {}
        for port in sorted(p for p in plan.entry.iterdir() if p.is_dir()):
            listed = sorted(str(f.relative_to(port)) for f in port.rglob("*") if f.is_file())
            files[port.name] = listed[:30] + ([f"... and {len(listed) - 30} more"] if len(listed) > 30 else [])
        metrics = read_json(plan.entry / "output" / "metrics.json")
        return {"step": step, "folder": str(plan.entry), "files": files,
                "accuracy": metrics.get("accuracy") if isinstance(metrics, dict) else None}

    def close(self) -> None:
        for endpoint, _ in self._endpoints.values():
            endpoint.close()


def _fingerprint(items) -> str:
    digest = hashlib.sha256()
    for path, category in items:
        try:
            info = path.stat()
        except OSError:
            continue
        digest.update(f"{path}\0{category}\0{info.st_size}\0{info.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _audit_summary(audit: dict | None) -> dict | None:
    if not audit:
        return None
    keys = ("images", "categories", "imbalance", "rejected", "duplicates", "duplicates_with_different_categories",
            "empty_categories")
    out = {k: audit[k] for k in keys if k in audit}
    ignored = audit.get("ignored", {})
    out["outside_categories"] = len(ignored.get("images_outside_category_folders", []))
    out["not_images"] = ignored.get("files_without_image_extension", 0)
    out["hidden"] = len(ignored.get("hidden", []))
    for k in ("rejected", "duplicates", "duplicates_with_different_categories"):
        if isinstance(out.get(k), list):
            out[k + "_count"] = len(out[k])
            out[k] = out[k][:50]
    return out


def _evaluation_summary(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {k: metrics.get(k) for k in ("num_images", "accuracy", "f1_macro", "per_class", "confusion_matrix")}


# --- The application -----------------------------------------------------------------------------------


def make_app(ui: UI):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = [request.cookies.get(ui.cookie), request.query_params.get("token"),
                 header[len("token "):].strip() if header.startswith("token ") else None]
        return any(g and secrets.compare_digest(g.encode(), ui.token.encode()) for g in given)

    class Guard:
        """Every request needs the token; ``/?token=...`` trades it for a cookie and a plain URL."""

        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            request = Request(scope)
            if not authorized(request):
                message = ("the token is missing or wrong: open the URL `imgtrain ui` printed (with its "
                           "?token=...)")
                response = JSONResponse({"error": message}, status_code=403) if request.url.path.startswith(
                    "/api/") else Response(f"403: {message}\n", status_code=403, media_type="text/plain")
                return await response(scope, receive, send)
            if request.query_params.get("token") and request.url.path == "/":
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(ui.cookie, ui.token, httponly=True, samesite="strict")
                return await response(scope, receive, send)
            return await self.app(scope, receive, send)

    def api(function, default_field: str | None = None, threaded: bool = True):
        async def handle(request: Request):
            try:
                if threaded:
                    result = await run_in_threadpool(_in_cli_words, function, request)
                else:
                    result = await function(request)
                return result if isinstance(result, Response) else JSONResponse(result)
            except PageError as exc:
                return JSONResponse({"error": exc.message, "field": exc.field or default_field},
                                    status_code=exc.status, headers={"Retry-After": "1"} if exc.status == 503 else None)
            except ImgtrainError as exc:
                return JSONResponse({"error": cli_line(exc), "field": _field_of(exc.message, default_field)},
                                    status_code=400)
            except OSError as exc:
                return JSONResponse({"error": f"{type(exc).__name__}: {cli_line(exc)}", "field": default_field},
                                    status_code=400)
        return handle

    async def body(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise PageError(415, "send JSON (Content-Type: application/json)")
        raw = await request.body()
        if len(raw) > 1_000_000:
            raise PageError(413, "the request is over 1 MB")
        try:
            value = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise PageError(400, "the request is not JSON") from None
        if not isinstance(value, dict):
            raise PageError(400, "the request is not a JSON object")
        return value

    def posted(function):
        """A POST handler: its JSON body read here, the work done in a thread."""
        async def handle(request: Request):
            data = await body(request)
            return await run_in_threadpool(_in_cli_words, lambda r: function(r, data), request)
        return handle

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def state(request: Request):
        return {"workspace": str(ui.workspace.root), "roots": [str(r) for r in ui.workspace.roots],
                "datasets": ui.workspace.datasets(), "runs": ui.runs(),
                "defaults": DEFAULTS | {"validation_share": 0.2}, "python": sys.executable}

    def browse(request: Request):
        return ui.workspace.browse(request.query_params.get("path"))

    def dataset(request: Request):
        return ui.dataset(request.path_params["name"])

    def dataset_images(request: Request):
        listing = ui.workspace.listing(request.path_params["name"])
        c = _int(request.query_params.get("class", "0"), "class")
        if not 0 <= c < len(listing.classes):
            raise PageError(404, f"no class number {c}")
        files = listing.images[listing.classes[c]]
        start = max(0, _int(request.query_params.get("start", "0"), "start"))
        count = max(0, min(_int(request.query_params.get("count", "60"), "count"), 500))
        return {"class": listing.classes[c], "total": len(files), "version": ui.workspace.version(
                    request.path_params["name"]),
                "images": [{"number": i, "name": files[i].name} for i in range(start, min(start + count, len(files)))]}

    def thumbnail(request: Request):
        p = request.path_params
        path = ui.workspace.image_path(p["name"], p["category"], p["number"])
        return FileResponse(ui.workspace.thumbnail(path), headers={"Cache-Control": "private, max-age=86400"})

    def models(request: Request):
        return ui.models()

    def run(request: Request):
        return ui.run(request.path_params["name"])

    def runs(request: Request):
        return ui.runs()

    def cell(request: Request):
        q = request.query_params
        return ui.cell(request.path_params["name"], q.get("truth", ""), q.get("predicted", ""))

    def scored_thumbnail(request: Request):
        path = ui.scored_image(request.path_params["name"], request.path_params["row"])
        return FileResponse(ui.workspace.thumbnail(path), headers={"Cache-Control": "private, max-age=86400"})

    async def predict(request: Request):
        from imgtrain.deploy.serve import RequestError, answer_predictions

        async with ui.endpoint(request.path_params["name"]) as endpoint:
            try:
                return await answer_predictions(endpoint, request)
            except RequestError as exc:
                raise PageError(exc.status, exc.message, "predict") from None

    def explanation(request: Request):
        number = request.path_params["number"]
        path = ui.workspace.run_dir(request.path_params["name"]) / "explanations" / f"{number:03d}.png"
        if not 0 <= number < EXPLAINED or not path.is_file():
            raise PageError(404, f"the run has no explanation number {number}", "evaluate")
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    def download(request: Request):
        name, what = request.path_params["name"], request.path_params["what"]
        folder = ui.workspace.run_dir(name)
        if what == "model.zip":
            return _zipped(folder / "trained", f"{name}.zip")
        for fmt, file in EXPORTS.items():
            for wanted in (file, f"{fmt}-metadata.json", f"{fmt}-preprocess.py"):
                if what == wanted:
                    path = folder / "export" / fmt / (file if wanted == file else wanted.split("-", 1)[1])
                    if not path.is_file():
                        raise PageError(404, f"{what} has not been exported: press Export first", "export")
                    return FileResponse(path, filename=path.name)
        raise PageError(404, f"nothing to download named {escaped(what)[:40]!r}")

    def _zipped(folder: Path, filename: str):
        if not folder.is_dir():
            raise PageError(409, "there is no trained model yet: train it first", "export")

        def chunks():
            buffer = _Chunks()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        z.write(path, f"{folder.parent.name}/{path.relative_to(folder)}")
                        yield buffer.take()
            yield buffer.take()
        return StreamingResponse(chunks(), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(ui.close)

    routes = [
        Route("/", index),
        Route("/api/state", api(state)),
        Route("/api/browse", api(browse, "path")),
        Route("/api/datasets", api(posted(lambda r, d: ui.open_dataset(d)), "path", threaded=False),
              methods=["POST"]),
        Route("/api/uploads", api(ui.upload, "path", threaded=False), methods=["POST"]),
        Route("/api/datasets/{name}", api(dataset, "dataset")),
        Route("/api/datasets/{name}/images", api(dataset_images, "dataset")),
        Route("/api/datasets/{name}/thumbnail/{category:int}/{number:int}", api(thumbnail)),
        Route("/api/models", api(models)),
        Route("/api/runs", api(runs)),
        Route("/api/runs", api(posted(lambda r, d: ui.start_run(d)), "train", threaded=False), methods=["POST"]),
        Route("/api/runs/import", api(posted(lambda r, d: ui.import_model(d)), "import", threaded=False),
              methods=["POST"]),
        Route("/api/models/{model}/speed", api(posted(lambda r, d: ui.speed(r.path_params["model"], d)),
                                               "model_name", threaded=False), methods=["POST"]),
        Route("/api/runs/{name}", api(run, "run")),
        Route("/api/runs/{name}/stop", api(posted(lambda r, d: ui.stop_run(r.path_params["name"])), "stop",
                                           threaded=False), methods=["POST"]),
        Route("/api/runs/{name}/resume", api(posted(lambda r, d: ui.resume_run(r.path_params["name"])), "resume",
                                             threaded=False), methods=["POST"]),
        Route("/api/runs/{name}/cell", api(cell, "evaluate")),
        Route("/api/runs/{name}/scored/{row:int}/thumbnail", api(scored_thumbnail)),
        Route("/api/runs/{name}/explanation/{number:int}", api(explanation)),
        Route("/api/runs/{name}/predict", api(predict, "predict", threaded=False), methods=["POST"]),
        Route("/api/runs/{name}/export", api(posted(lambda r, d: ui.export(r.path_params["name"],
                                                                           str(d.get("format", "onnx")))),
                                             "export", threaded=False), methods=["POST"]),
        Route("/api/runs/{name}/download/{what}", api(download, "export")),
        Route("/api/pipelines", api(lambda r: ui.pipelines(), "pipeline")),
        Route("/api/pipelines", api(posted(lambda r, d: ui.open_pipeline(d)), "pipeline", threaded=False),
              methods=["POST"]),
        Route("/api/pipelines/{name}", api(lambda r: ui.pipeline(r.path_params["name"]), "pipeline")),
        Route("/api/pipelines/{name}/run", api(posted(lambda r, d: ui.run_pipeline(r.path_params["name"], d)),
                                               "pipeline", threaded=False), methods=["POST"]),
        Route("/api/pipelines/{name}/steps/{step}", api(lambda r: ui.step_outputs(r.path_params["name"],
                                                                                  r.path_params["step"]), "pipeline")),
        Mount("/static", app=StaticFiles(directory=STATIC)),
    ]
    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"error": f"{request.method} {escaped(request.url.path)[:100]}: "
                                      f"{'no such page' if status == 404 else getattr(exc, 'detail', 'refused')}"},
                            status_code=status)

    return Guard(Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}))


def _in_cli_words(function, request):
    with speaking_command_line():  # parameters named as flags, as the CLI names them
        return function(request)


def _number(key: str, value: object, *, whole: bool) -> int | float:
    """A number the page sent, read as the CLI reads its flag: a whole number where the CLI takes one (2.9 and
    true are not), a finite one always."""
    shown = f"--{key.replace('_', '-')} {escaped(str(value))[:40]}"
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PageError(400, f"InvalidParameterError: {shown} is not {kind}", key)
    try:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        if whole:
            if not number.is_integer() or (isinstance(value, str) and not re.fullmatch(r"\s*[-+]?\d+\s*", value)):
                raise ValueError
            return int(number)
        return number
    except (ValueError, OverflowError):
        raise PageError(400, f"InvalidParameterError: {shown} is not {kind}", key) from None


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PageError(400, f"{what} {escaped(text)[:20]!r} is not a whole number") from None


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken out as they come (a zip streamed as it is written)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


# --- Running it ------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_ui(workspace: Path | str, *, data: list[Path | str] = (), host: str = "127.0.0.1", port: int = 8765,
           token: str | None = None, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
           ) -> None:
    """Serve the page until Ctrl-C or SIGTERM (jobs go on: the next start finds them)."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise MissingDependencyError("`imgtrain ui` needs starlette and uvicorn",
                                     "install them with `pip install 'imgtrain[serve]'`") from None
    from imgtrain.deploy.listening import check_address, stop_signals_end_quietly

    check_range("port", port, low=0, high=65535)
    if token is not None and len(token) < 16:
        raise InvalidParameterError("--token is shorter than 16 characters", "pass a longer one, or none (then "
                                    "a random one is made)")
    check_address(host, port)
    space = Workspace(workspace, list(data))
    ui = UI(space, token or secrets.token_urlsafe(24), log)
    if not _is_loopback(host):
        log(f"warning: listening on {host}, not only this machine: anyone who reaches it and has the token can "
            "read the folders below and run jobs here; use --host 127.0.0.1 unless you mean it")
    config = uvicorn.Config(make_app(ui), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
            print(f"imgtrain ui: open http://{shown}:{bound}/?token={ui.token}", flush=True)
            log(f"workspace {space.root}; folders it may open: {', '.join(map(str, space.roots))}; Ctrl-C stops "
                "the page (running jobs go on)")
        await task

    with stop_signals_end_quietly():
        asyncio.run(main())
    log("Stopped imgtrain ui")
