"""Convert to Image Directory: a folder or archive of images becomes an ImageDirectory."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from imgtrain.data.decode import probe_image
from imgtrain.directories.atomic import atomic_output_dir
from imgtrain.directories.image_directory import (
    IMAGE_EXTENSIONS,
    IMAGE_FOLDER,
    write_image_directory_files,
)
from imgtrain.errors import InvalidDatasetError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz")
_IGNORED_NAMES = {"__MACOSX"}


@dataclass
class ConvertResult:
    output: Path
    categories: list[str]  # empty when unlabeled
    counts: dict[str, int]  # images per category
    num_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def summary(self) -> str:
        what = f"{len(self.categories):,} categories" if self.categories else "no categories (unlabeled)"
        return f"Found {self.num_images:,} images in {what}"


@dataclass
class FoundImages:
    """What a folder holds: image paths with their category (None when unlabeled)."""

    root: Path
    categories: list[str]
    items: list[tuple[Path, str | None]]
    ignored: list[Path] = field(default_factory=list)


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".") and entry.name not in _IGNORED_NAMES


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _images_below(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _IGNORED_NAMES)
        found.extend(
            Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and is_image_file(Path(f))
        )
    return found


def find_images(root: Path | str) -> FoundImages:
    """Find the images of a folder: ``root/<category>/**/<image>``, or a flat folder of images.

    Single wrapper folders (one sub-folder and no images) are walked through.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidDatasetError(f"{root} is not a folder or a supported archive",
                                  f"pass a folder, or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}")
    while True:
        entries = sorted((e for e in os.scandir(root) if _visible(e)), key=lambda e: e.name)
        folders = [Path(e.path) for e in entries if e.is_dir()]
        images = [Path(e.path) for e in entries if e.is_file() and is_image_file(Path(e.name))]
        if len(folders) == 1 and not images:
            root = folders[0]
            continue
        break
    per_folder = {folder.name: _images_below(folder) for folder in folders}
    categories = [name for name, found in per_folder.items() if found]
    if categories:
        items = [(path, name) for name in categories for path in per_folder[name]]
        return FoundImages(root, categories, items, ignored=images)
    return FoundImages(root, [], [(path, None) for path in images])


def convert_to_image_directory(
    source: Path | str, output: Path | str, *, overwrite: bool = False, log=None
) -> ConvertResult:
    """Convert a folder (one sub-folder per category, or flat) or an archive of one."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    source, output = Path(source), Path(output)
    if not source.exists():
        raise InvalidDatasetError(f"{source} does not exist", "pass an existing folder or archive")
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if source.is_file():
            extracted = tmp / ".extracted"
            extract_archive(source, extracted)
            found = find_images(extracted)
        else:
            found = find_images(source)
        if found.ignored:
            log(f"warning: {len(found.ignored)} image(s) beside the category folders of {found.root} "
                f"belong to no category and are left out, e.g. {found.ignored[0].name}")
        image_dir = tmp / IMAGE_FOLDER
        image_dir.mkdir()
        index = {name: i for i, name in enumerate(found.categories)}
        files, labels, skipped = [], [], []
        counts = dict.fromkeys(found.categories, 0)
        for path, category in found.items:
            reason = probe_image(path)
            if reason is not None:
                skipped.append((str(path), reason))
                continue
            label = index[category] if category is not None else 0
            name = f"{IMAGE_FOLDER}/{label}_{len(files)}{path.suffix.lower()}"
            if source.is_file():
                os.replace(path, tmp / name)
            else:
                shutil.copyfile(path, tmp / name)
            files.append(name)
            labels.append(label)
            if category is not None:
                counts[category] += 1
        if skipped:
            log(f"warning: {len(skipped)} file(s) are not readable images and are left out:")
            for file, reason in skipped[:10]:
                log(f"  {file}: {reason}")
        if not files:
            raise InvalidDatasetError(
                f"no valid image found in {source}",
                f"image files end in {' '.join(IMAGE_EXTENSIONS)}; "
                "put them in one sub-folder per category",
            )
        categories = [c for c in found.categories if counts[c]]
        if len(categories) != len(found.categories):
            # A category whose every file was bad: renumber so ids stay 0..n-1.
            remap = {index[c]: i for i, c in enumerate(categories)}
            labels = [remap[x] for x in labels]
        shutil.rmtree(tmp / ".extracted", ignore_errors=True)
        write_image_directory_files(tmp, files, categories or None, labels if categories else None)
    return ConvertResult(output, categories, {c: counts[c] for c in categories}, len(files), skipped)


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive, refusing entries that would land outside ``dest``."""
    name = archive.name.lower()
    dest.mkdir(parents=True)
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                root = dest.resolve()
                for info in zf.infolist():
                    target = (dest / info.filename).resolve()
                    if info.filename.startswith(("/", "\\")) or not target.is_relative_to(root):
                        raise InvalidDatasetError(
                            f"archive {archive} entry {info.filename!r} points outside the folder",
                            "the archive is unsafe; re-create it with relative paths",
                        )
                zf.extractall(dest)
        except zipfile.BadZipFile as exc:
            raise InvalidDatasetError(f"{archive} is not a valid zip archive ({exc})",
                                      "check that the file downloaded completely") from None
    elif name.endswith(ARCHIVE_SUFFIXES):
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise InvalidDatasetError(
                f"archive {archive} entry {exc.tarinfo.name!r} is unsafe ({exc})",
                "re-create the archive with plain files and relative paths",
            ) from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidDatasetError(f"{archive} is not a valid tar archive ({exc})",
                                      "check that the file downloaded completely") from None
    else:
        raise InvalidDatasetError(
            f"{archive} is neither a folder nor a supported archive",
            f"pass a folder, or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}",
        )
