"""The workspace: what the page makes, on disk, and which paths a request may reach.

    WORKSPACE/
      datasets/NAME/dataset.json   where its images come from (a folder or an archive)
      datasets/NAME/images/        the ImageDirectory that Convert to Image Directory made of them (audit.json)
      datasets/NAME/job/           the conversion's job (jobs.py)
      runs/NAME/run.json           the data set, the architecture and Train PyTorch Model's parameters
      runs/NAME/training/, validation/, untrained/, trained/, scored/, evaluation/, export/: the modules' outputs
      runs/NAME/job/               the job that trains, scores and evaluates
      uploads/NAME/CLASS/FILE      the folders dropped on the page (then opened as any folder)
      pipelines.json, pipelines/   the pipeline files opened, and their runs' logs and outputs
      .thumbnails/                 small JPEGs, made once per image file

Every run is an ordinary model directory, usable from the CLI (``imgtrain score-image-model --trained-model
WORKSPACE/runs/NAME/trained ...``). A request never names a file by its path, except the folder it opens:
images are named by their data set, class and number, and a path to open must lie, once its symbolic links
are followed, inside the workspace or a folder given with ``--data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from imgtrain.errors import InvalidDatasetError, InvalidParameterError, escaped

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
THUMBNAIL = 128  # pixels, the longer side
DATASETS, RUNS, THUMBNAILS = "datasets", "runs", ".thumbnails"


def check_name(what: str, name: object) -> str:
    """A data set's or run's name: a folder name that is plain ASCII, 1 to 64 characters."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        shown = escaped(repr(name))[:80]
        raise InvalidParameterError(f"the {what} name {shown} is not a plain name",
                                    "use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit")
    return name


def plain_name(text: str, fallback: str, taken) -> str:
    """A plain name made of a file's or folder's name (``check_name`` accepts it), not one of ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:40]
    base = re.sub(r"\.{2,}", ".", re.sub(r"^[^A-Za-z0-9]+", "", base)).rstrip("-.") or fallback
    name, n = base, 1
    while taken(name):
        n += 1
        name = f"{base}-{n}"
    return check_name("new", name)


def write_json(path: Path, value: object) -> None:
    """A small JSON file, replaced whole (never seen half written). Not ``atomic_file``: two requests may write
    one file at once (each its own temporary name here), and nothing here needs its fsync."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


@dataclass
class Listing:
    """A data set's images by class, as the page shows them."""

    classes: list[str]
    images: dict[str, list[Path]]  # class -> files; "" holds the images of an unlabelled folder
    converted: bool  # listed from the ImageDirectory (else from the folder, before its conversion ends)


class Workspace:
    def __init__(self, root: Path | str, data: list[Path | str] = ()) -> None:
        self.root = Path(root).resolve()
        self.roots = [self.root] + [Path(d).resolve() for d in data]
        for folder in self.roots[1:]:
            if not folder.is_dir():
                raise InvalidParameterError(f"--data {folder}: not a folder", "pass a folder that holds images")
        if self.root.exists() and not self.root.is_dir():
            raise InvalidParameterError(f"--workspace {self.root}: not a folder", "pass a folder (made if missing)")
        try:
            for sub in (DATASETS, RUNS, THUMBNAILS):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidParameterError(f"--workspace {self.root}: cannot be made ({exc.strerror or exc})",
                                        "pass a folder you may write to") from None
        self._listings: dict[str, tuple[float, Listing]] = {}
        self._lock = threading.Lock()

    # --- Paths a request gives -----------------------------------------------------------------------

    def allowed(self, text: object, what: str = "path") -> Path:
        """The path a request gives, if it lies inside the workspace or a --data folder once resolved."""
        if not isinstance(text, str) or not text.strip() or "\0" in text:
            raise InvalidParameterError(f"the {what} is empty", "type a folder's path, or pick one below")
        path = Path(text.strip()).expanduser()
        if not path.is_absolute():
            path = self.roots[-1] / path  # relative to the last --data folder (else the workspace)
        real = path.resolve()
        if not self.inside(real):
            listed = ", ".join(str(r) for r in self.roots)
            raise InvalidParameterError(
                f"{escaped(text.strip())} is outside the folders this page may open ({listed})",
                "start `imgtrain ui` with --data FOLDER to open folders below FOLDER")
        return real

    def inside(self, real: Path) -> bool:
        """Whether a resolved path lies in the workspace or a --data folder."""
        return any(real == root or root in real.parents for root in self.roots)

    def browse(self, text: str | None) -> dict:
        """The folders (and archives) inside an allowed folder, for the page's folder picker."""
        from imgtrain.data.convert import ARCHIVE_SUFFIXES

        if not text:
            return {"path": None, "parent": None, "folders": [str(r) for r in self.roots], "archives": []}
        folder = self.allowed(text, "folder")
        if not folder.is_dir():
            raise InvalidDatasetError(f"{folder} is not a folder", "pick a folder")
        folders, archives = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        folders.append(entry.name)
                    elif entry.name.lower().endswith(ARCHIVE_SUFFIXES):
                        archives.append(entry.name)
                    if len(folders) + len(archives) >= 2000:
                        break
        except OSError as exc:
            raise InvalidDatasetError(f"{folder} cannot be read ({exc.strerror})", "pick a folder you may read") \
                from None
        parent = folder.parent if any(folder != r and r in folder.parents for r in self.roots) else None
        return {"path": str(folder), "parent": str(parent) if parent else None, "folders": sorted(folders),
                "archives": sorted(archives)}

    # --- Data sets -----------------------------------------------------------------------------------

    def dataset_dir(self, name: str) -> Path:
        folder = self.root / DATASETS / check_name("data set", name)
        if not (folder / "dataset.json").is_file():
            raise InvalidParameterError(f"there is no data set {name!r} in the workspace", "open a folder first")
        return folder

    def datasets(self) -> list[str]:
        """The data sets, the most recently opened last."""
        found = [(read_json(p, {}).get("opened", 0), p.parent.name)
                 for p in (self.root / DATASETS).glob("*/dataset.json") if NAME.fullmatch(p.parent.name)]
        return [name for _, name in sorted(found)]

    def new_dataset(self, source: Path) -> str:
        """A data set for the folder or archive ``source``: the one it already has, or a new name."""
        for name in self.datasets():
            record = self.root / DATASETS / name / "dataset.json"
            if read_json(record, {}).get("source") == str(source):
                write_json(record, {"source": str(source), "opened": time.time()})
                return name
        name = plain_name(source.name.split(".")[0], "data", lambda n: (self.root / DATASETS / n).exists())
        folder = self.root / DATASETS / name
        folder.mkdir(parents=True)
        write_json(folder / "dataset.json", {"source": str(source), "opened": time.time()})
        return name

    def listing(self, name: str) -> Listing:
        """The data set's classes and files: from its ImageDirectory once converted, else from its folder (walked
        as Convert to Image Directory walks it). Kept while the folder's listing stays the same."""
        folder = self.dataset_dir(name)
        images = folder / "images"
        source = Path(read_json(folder / "dataset.json", {})["source"])
        stamp = _stamp(images if (images / "_meta.yaml").is_file() else source)
        with self._lock:
            kept = self._listings.get(name)
            if kept and kept[0] == stamp:
                return kept[1]
        if (images / "_meta.yaml").is_file():
            listing = _from_image_directory(images)
        elif source.is_dir():
            from imgtrain.data.convert import find_images

            found = find_images(source)
            by_class: dict[str, list[Path]] = {c: [] for c in found.categories} or {"": []}
            for path, category in found.items:
                by_class[category or ""].append(path)
            listing = Listing(list(by_class), by_class, converted=False)
        else:
            listing = Listing([], {}, converted=False)  # an archive: listed once converted
        with self._lock:
            self._listings[name] = (stamp, listing)
        return listing

    def image_path(self, name: str, category: int, number: int) -> Path:
        listing = self.listing(name)
        if not 0 <= category < len(listing.classes):
            raise InvalidParameterError(f"data set {name!r} has no class number {category}", "reload the page")
        files = listing.images[listing.classes[category]]
        if not 0 <= number < len(files):
            raise InvalidParameterError(f"class {category} of {name!r} has no image number {number}",
                                        "reload the page")
        real = files[number].resolve()
        if not self.inside(real):  # a symbolic link out of the folders it may open
            raise InvalidParameterError(f"{files[number]} leads outside the folders this page may open",
                                        "copy the image into the folder, or start `imgtrain ui` with --data "
                                        "naming where it is")
        return real

    # --- Runs ----------------------------------------------------------------------------------------

    def run_dir(self, name: str, *, exists: bool = True) -> Path:
        folder = self.root / RUNS / check_name("run", name)
        if exists and not (folder / "run.json").is_file():
            raise InvalidParameterError(f"there is no run {name!r} in the workspace", "start one on the Train tab")
        return folder

    def runs(self) -> list[str]:
        found = [(p.stat().st_mtime, p.parent.name) for p in (self.root / RUNS).glob("*/run.json")
                 if not p.parent.name.startswith(".")]  # a run being made
        return [name for _, name in sorted(found, reverse=True)]

    # --- Thumbnails ----------------------------------------------------------------------------------

    def thumbnail(self, path: Path) -> Path:
        """A small JPEG of the image file ``path``, made once per content (a file and its copy in the converted
        ImageDirectory share it) with the decoders every module uses; BadImageError names what is wrong."""
        from imgtrain.data.decode import MAX_FILE_BYTES, decode_rgb
        from imgtrain.directories.files import read_bytes

        try:
            data = read_bytes(path, min(MAX_FILE_BYTES, 64 * 2**20))
        except OSError as exc:
            raise InvalidDatasetError(f"{path} cannot be read ({exc.strerror or exc})",
                                      "check the file, or open the folder again") from None
        key = hashlib.sha256(data).hexdigest()[:32]
        thumb = self.root / THUMBNAILS / key[:2] / f"{key}.jpg"
        if thumb.is_file():
            return thumb
        image = decode_rgb(data, str(path), draft_size=2 * THUMBNAIL)
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        thumb.parent.mkdir(exist_ok=True)
        tmp = thumb.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        image.save(tmp, format="JPEG", quality=80)
        os.replace(tmp, thumb)
        return thumb

    def version(self, name: str) -> str:
        """A short tag of a data set's listing, in its thumbnails' URLs: a browser's cached thumbnail of image N is
        not taken for another image once the listing changes (the conversion left one out, another folder of the
        same name)."""
        listing = self.listing(name)
        stamp, _ = self._listings[name]
        return hashlib.sha256(f"{name}|{stamp}|{listing.converted}|{sum(map(len, listing.images.values()))}"
                              .encode()).hexdigest()[:12]


def _stamp(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def _from_image_directory(root: Path) -> Listing:
    from imgtrain.directories.image_directory import ImageDirectory

    data = ImageDirectory.load(root)
    classes = list(data.categories) or [""]
    by_class: dict[str, list[Path]] = {c: [] for c in classes}
    labels = data.labels if data.categories else [None] * len(data)
    for i, label in enumerate(labels):
        by_class[classes[label] if label is not None else ""].append(data.path(i))
    return Listing(classes, by_class, converted=True)
