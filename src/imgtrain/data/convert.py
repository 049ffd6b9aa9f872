"""Convert to Image Directory: a folder or archive of images becomes an ImageDirectory.

Every image is read once and decoded fully; files that fail are left out (``skip``, the
default) or stop the conversion before anything is written (``fail``). An audit
(``audit.json`` in the output) lists every rejected file with its reason, the images per
category, duplicates, and what was ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import zipfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgtrain.data.decode import ON_BAD_IMAGE, ImageCheck, check_image
from imgtrain.directories.atomic import atomic_output_dir
from imgtrain.directories.image_directory import (
    IMAGE_EXTENSIONS,
    IMAGE_FOLDER,
    write_image_directory_files,
)
from imgtrain.errors import DISK_FULL, BadImageError, InvalidDatasetError, check_choice, option
from imgtrain.progress import bar
from imgtrain.threads import worker_count

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz")
AUDIT_FILE = "audit.json"
MAX_ARCHIVE_ENTRIES = 5_000_000
MAX_ARCHIVE_BYTES = 200 * 2**30
_IGNORED_NAMES = {"__MACOSX"}
_PARALLEL_FROM = 256  # files; fewer are checked in this process


@dataclass
class ConvertResult:
    output: Path
    categories: list[str]  # empty when unlabeled
    counts: dict[str, int]  # images per category
    num_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    audit: dict = field(default_factory=dict)

    def summary(self) -> str:
        what = f"{len(self.categories):,} categories" if self.categories else "no categories (unlabeled)"
        return f"Found {self.num_images:,} images in {what}"


@dataclass
class FoundImages:
    """What a folder holds: image paths with their category (None when unlabeled)."""

    root: Path
    categories: list[str]
    items: list[tuple[Path, str | None]]
    outside_categories: list[Path] = field(default_factory=list)  # images beside the category folders
    empty_categories: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)  # hidden files and folders, and __MACOSX, passed over
    not_images: int = 0  # files without an image extension
    start: Path | None = None  # the folder given, before walking through wrapper folders


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_NAMES


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _images_below(folder: Path, found: FoundImages) -> list[Path]:
    images = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        found.hidden += [os.path.join(dirpath, d) for d in sorted(dirnames) if _ignored(d)]
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for f in sorted(filenames):
            if _ignored(f):
                found.hidden.append(os.path.join(dirpath, f))
            elif is_image_file(Path(f)):
                images.append(Path(dirpath, f))
            else:
                found.not_images += 1
    return images


def find_images(root: Path | str) -> FoundImages:
    """Find the images of a folder: ``root/<category>/**/<image>``, or a flat folder of images.

    Single wrapper folders (one sub-folder and no images) are walked through.
    """
    root = start = Path(root)
    if not root.is_dir():
        raise InvalidDatasetError(f"{root} is not a folder or a supported archive",
                                  f"pass a folder, or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}")
    passed_over = []  # hidden entries and __MACOSX, in every folder walked through too
    while True:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        passed_over += [e.path for e in entries if _ignored(e.name)]
        folders = [Path(e.path) for e in entries if e.is_dir() and not _ignored(e.name)]
        # Anything not a folder that is named like an image is one to check, even a pipe or a device:
        # it is then left out with its reason, never silently passed over (nor opened blindly).
        images = [Path(e.path) for e in entries
                  if not e.is_dir() and not _ignored(e.name) and is_image_file(Path(e.name))]
        if len(folders) == 1 and not images:
            root = folders[0]  # a wrapper folder (the designer's rule; a lone category reads as unlabeled)
            continue
        break
    found = FoundImages(root, [], [], start=start)
    found.hidden = passed_over
    per_folder = {folder.name: _images_below(folder, found) for folder in folders}
    found.categories = [name for name, images_in in per_folder.items() if images_in]
    for name in found.categories:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidDatasetError(f"the category folder {os.fsencode(root / name)!r} has a name that is "
                                      "not valid UTF-8", "rename the folder") from None
    found.empty_categories = [name for name, images_in in per_folder.items() if not images_in]
    if found.categories:
        found.items = [(path, name) for name in found.categories for path in per_folder[name]]
        found.outside_categories = images
    else:
        found.items = [(path, None) for path in images]
        found.empty_categories = []
    return found


def _check_all(paths: list[Path], show: bool | None) -> list[ImageCheck]:
    if len(paths) < _PARALLEL_FROM or (os.cpu_count() or 1) < 2:
        return [check_image(p) for p in bar(paths, what="decoding", show=show)]
    with ProcessPoolExecutor(max_workers=worker_count(None)) as pool:
        return list(bar(pool.map(check_image, paths, chunksize=64), what="decoding", total=len(paths), show=show))


def convert_to_image_directory(
    source: Path | str, output: Path | str, *, on_bad_image: str = "skip", overwrite: bool = False, log=None,
    progress: bool | None = None,
) -> ConvertResult:
    """Convert a folder (one sub-folder per category, or flat) or an archive of one. ``progress``: show
    progress bars (None: on a terminal)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    source, output = Path(source), Path(output)
    check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    if not source.exists():
        raise InvalidDatasetError(f"{source} does not exist", "pass an existing folder or archive")
    with atomic_output_dir(output, overwrite=overwrite, inputs={"source": source}) as tmp:
        from_archive = source.is_file()
        if from_archive:
            extract_archive(source, tmp / ".extracted")
        found = find_images(tmp / ".extracted" if from_archive else source)
        checks = _check_all([path for path, _ in found.items], progress)
        shown_root = tmp / ".extracted" if from_archive else None
        rejected = [(_shown(path, source, shown_root), c.reason)
                    for (path, _), c in zip(found.items, checks, strict=True) if c.reason]
        if rejected and on_bad_image == "fail":
            shown = "; ".join(f"{f}: {r}" for f, r in rejected[:3])
            raise BadImageError(
                f"{len(rejected)} file(s) in {source} are not readable images ({shown})",
                f"remove or replace them, or pass {option('on_bad_image', 'skip')} to leave them out")
        image_dir = tmp / IMAGE_FOLDER
        image_dir.mkdir()
        index = {name: i for i, name in enumerate(found.categories)}
        kept = [(path, cat, c) for (path, cat), c in zip(found.items, checks, strict=True) if not c.reason]
        categories = [c for c in found.categories if any(cat == c for _, cat, _ in kept)]
        if len(categories) != len(found.categories):  # a category whose every file was bad
            index = {name: i for i, name in enumerate(categories)}
        files, labels, infos = [], [], []
        for path, category, check in bar(kept, what="copying", show=progress):
            label = index[category] if category is not None else 0
            name = f"{IMAGE_FOLDER}/{label}_{len(files)}{path.suffix}"  # the original suffix, as the designer
            shutil.copyfile(path, tmp / name)  # follows a link inside the archive to its file
            files.append(name)
            labels.append(label)
            infos.append({"width": check.width, "height": check.height, "sha256": check.sha256,
                          "original_path": path.relative_to(found.start).as_posix()})
        if not files:
            raise InvalidDatasetError(
                f"no valid image found in {source}",
                f"image files end in {' '.join(IMAGE_EXTENSIONS)}; put them in one sub-folder per category")
        shutil.rmtree(tmp / ".extracted", ignore_errors=True)
        write_image_directory_files(tmp, files, categories or None, labels if categories else None, infos=infos)
        counts = {c: labels.count(i) for i, c in enumerate(categories)}
        audit = _audit(source, found, kept, counts, rejected, shown_root)
        (tmp / AUDIT_FILE).write_text(json.dumps(audit, indent=2), encoding="utf-8")
    _report(audit, output / AUDIT_FILE, log)
    return ConvertResult(output, categories, counts, len(files), rejected, audit)


def _shown(path: Path, source: Path, extracted: Path | None) -> str:
    """A file as the user knows it: inside the archive, not in our temporary folder."""
    return f"{source}:{path.relative_to(extracted)}" if extracted and path != extracted else str(
        source if extracted else path)


def _audit(source: Path, found: FoundImages, kept, counts: dict[str, int], rejected,
           extracted: Path | None = None) -> dict:
    by_digest: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for path, category, check in kept:
        by_digest[check.sha256].append((_shown(path, source, extracted), category))
    groups = [g for g in by_digest.values() if len(g) > 1]
    sizes = list(counts.values())
    return {
        "source": str(source),
        "images": sum(sizes) if counts else len(kept),
        "categories": counts,
        "imbalance": round(max(sizes) / min(sizes), 3) if sizes else None,  # largest / smallest category
        "rejected": [{"file": f, "reason": r} for f, r in rejected],
        "duplicates": [[f for f, _ in g] for g in groups],
        "duplicates_with_different_categories": [[f for f, _ in g] for g in groups if len({c for _, c in g}) > 1],
        "empty_categories": found.empty_categories,
        "walked_through": _shown(found.root, source, extracted) if found.root != found.start else None,
        "ignored": {"hidden": [_shown(Path(h), source, extracted) for h in found.hidden],
                    "files_without_image_extension": found.not_images,
                    "images_outside_category_folders": [_shown(p, source, extracted)
                                                        for p in found.outside_categories]},
    }


def _report(audit: dict, audit_path: Path, log) -> None:
    """Say loudly what was left out or looks wrong; the audit has every file."""
    if audit["rejected"]:
        log(f"warning: {len(audit['rejected'])} file(s) are not readable images and were left out "
            f"(every one with its reason in {audit_path}):")
        for row in audit["rejected"][:5]:
            log(f"  {row['file']}: {row['reason']}")
    if audit["empty_categories"]:
        log(f"warning: empty category folder(s) left out: {', '.join(audit['empty_categories'])}")
    if audit["duplicates"]:
        log(f"warning: {len(audit['duplicates'])} group(s) of files with the same bytes, "
            f"{len(audit['duplicates_with_different_categories'])} of them in different categories, "
            f"e.g. {' = '.join(audit['duplicates'][0][:2])}")
    if audit["ignored"]["images_outside_category_folders"]:
        outside = audit["ignored"]["images_outside_category_folders"]
        log(f"warning: {len(outside)} image(s) beside the category folders belong to no category and were "
            f"left out, e.g. {outside[0]}")
    if not audit["categories"] and audit["walked_through"]:
        log(f"note: {audit['walked_through']} holds images and no sub-folders, so they are unlabeled; "
            "labelled images need one sub-folder per category beside it")
    if audit["imbalance"] and audit["imbalance"] >= 10:
        log(f"warning: the largest category has {audit['imbalance']:g}x the images of the smallest")


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive, refusing entries that would land outside ``dest``,
    links and devices, and archives over MAX_ARCHIVE_ENTRIES entries or MAX_ARCHIVE_BYTES."""
    name = archive.name.lower()
    dest.mkdir(parents=True)
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                root = dest.resolve()
                total = 0
                for n, info in enumerate(zf.infolist(), 1):
                    total += info.file_size
                    target = (dest / info.filename).resolve()
                    if info.filename.startswith(("/", "\\")) or not target.is_relative_to(root):
                        raise _unsafe(archive, info.filename, "points outside the folder")
                    _check_limits(archive, info.filename, n, total)
                zf.extractall(dest)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as exc:  # encrypted, odd codecs
            if getattr(exc, "errno", None) in DISK_FULL:
                raise
            raise InvalidDatasetError(f"{archive} cannot be extracted as a zip archive ({exc})",
                                      "check that the file downloaded completely and is not encrypted") from None
    elif name.endswith(ARCHIVE_SUFFIXES):
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, members=_limited(tf, archive), filter="data")
        except tarfile.FilterError as exc:
            raise _unsafe(archive, exc.tarinfo.name, f"is unsafe ({exc})") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            if getattr(exc, "errno", None) in DISK_FULL:
                raise
            if isinstance(exc, tarfile.ReadError) and "could not be opened" in str(exc):
                exc = "neither gzip, bzip2 nor xz compressed, nor a plain tar"  # tarfile's one line per method
            raise InvalidDatasetError(f"{archive} is not a valid tar archive ({exc})",
                                      "check that the file downloaded completely") from None
    else:
        raise InvalidDatasetError(
            f"{archive} is neither a folder nor a supported archive",
            f"pass a folder, or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}",
        )


def _limited(tf: tarfile.TarFile, archive: Path):
    total = 0
    for n, member in enumerate(tf, 1):
        if member.name.startswith(("/", "\\")):  # the tar filter would strip the slash: refuse instead
            raise _unsafe(archive, member.name, "has an absolute path")
        total += member.size
        _check_limits(archive, member.name, n, total)
        yield member


def _check_limits(archive: Path, entry: str, count: int, total: int) -> None:
    if count > MAX_ARCHIVE_ENTRIES:
        raise _unsafe(archive, entry, f"is past the limit of {MAX_ARCHIVE_ENTRIES:,} entries")
    if total > MAX_ARCHIVE_BYTES:
        raise _unsafe(archive, entry, f"takes the archive past {MAX_ARCHIVE_BYTES:,} bytes uncompressed")


def _unsafe(archive: Path, entry: str, what: str) -> InvalidDatasetError:
    return InvalidDatasetError(f"archive {archive}: entry {entry!r} {what}",
                               "the archive is unsafe or too large; extract what you trust and convert the folder")
