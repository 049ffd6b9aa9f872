"""Nothing lost: bad images, unsafe archives, training faults, atomic outputs, exact resume.

Each test here is a row of docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgtrain.data.convert as convert_module
import imgtrain.data.decode as decode_module
from conftest import make_image, make_labelled_folder, run_cli, training_in_background
from imgtrain import convert_to_image_directory, init_image_transformation, score_image_model, train_pytorch_model
from imgtrain.data.decode import load_rgb
from imgtrain.directories.model_directory import load_model_spec
from imgtrain.errors import (
    BadImageError,
    CheckpointExistsError,
    CheckpointMismatchError,
    InvalidDatasetError,
    NotInRangeValueError,
    OutputExistsError,
    OutputNotWritableError,
    TrainingDivergedError,
    speaking_command_line,
)
from imgtrain.precision import resolve_precision
from imgtrain.training.checkpoint import checkpoint_epoch

DOCS = Path(__file__).parent.parent / "docs" / "reliability.md"
QUIET = {"log": lambda m: None}
TRAIN = {"epochs": 2, "batch_size": 8, "image_size": 32, "num_workers": 0}


# --- images -----------------------------------------------------------------------------------

@pytest.fixture
def messy_folder(tmp_path):
    """Good images plus every kind of bad file, an empty category, hidden entries, duplicates."""
    src = make_labelled_folder(tmp_path / "src", per_class=4, classes=("dark", "bright"))
    good = (src / "dark" / "000.png").read_bytes()
    (src / "dark" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "dark" / "empty.jpg").write_bytes(b"")
    (src / "bright" / "text.png").write_text("this is not an image")
    make_image(src / "bright" / "huge.png", 200, np.random.default_rng(0), size=(60, 60))
    (src / "empty-category").mkdir()
    (src / ".git").mkdir()
    (src / ".git" / "x.png").write_bytes(good)
    (src / "bright" / ".DS_Store").write_bytes(b"junk")
    shutil.copyfile(src / "dark" / "001.jpg", src / "dark" / "copy-of-001.jpg")
    shutil.copyfile(src / "dark" / "002.png", src / "bright" / "mislabelled.png")
    return src


def test_convert_decodes_every_image_and_audits(tmp_path, messy_folder, monkeypatch):
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 50 * 50)
    logs: list[str] = []
    result = convert_to_image_directory(messy_folder, tmp_path / "out", log=logs.append)
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    reasons = {Path(r["file"]).name: r["reason"] for r in audit["rejected"]}
    assert set(reasons) == {"truncated.png", "empty.jpg", "text.png", "huge.png"}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["text.png"].startswith("not an image")
    assert reasons["truncated.png"].startswith("truncated")
    assert "over the pixel limit: 3,600 pixels > 2,500 (a decompression bomb?)" == reasons["huge.png"]
    assert result.num_images == 10 and audit["categories"] == {"bright": 5, "dark": 5}
    assert audit["empty_categories"] == ["empty-category"]
    assert any(h.endswith(".git") for h in audit["ignored"]["hidden"])
    assert any(h.endswith(".DS_Store") for h in audit["ignored"]["hidden"])
    dup_names = sorted(sorted(Path(f).name for f in g) for g in audit["duplicates"])
    assert dup_names == [["001.jpg", "copy-of-001.jpg"], ["002.png", "mislabelled.png"]]
    assert [sorted(Path(f).name for f in g) for g in audit["duplicates_with_different_categories"]] == [
        ["002.png", "mislabelled.png"]]
    text = "\n".join(logs)
    assert "4 file(s) are not readable images" in text and str(tmp_path / "out" / "audit.json") in text
    assert "empty category folder(s) left out: empty-category" in text
    assert "2 group(s) of files with the same bytes, 1 of them in different categories" in text


def test_convert_fail_policy_writes_nothing(tmp_path, messy_folder):
    r = run_cli("convert-to-image-directory", messy_folder, "--output", tmp_path / "out", "--on-bad-image", "fail",
                check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: BadImageError: 3 file(s) in")
    assert "not readable images" in r.stderr and "truncated.png" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".imgtrain-tmp-*"))


def _modes_folder(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    pixels = np.clip(rng.normal(128, 30, (20, 30, 3)), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(pixels)
    root.mkdir(parents=True)
    paths = {}
    for mode, ext in [("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("1", "bmp"),
                      ("I;16", "png"), ("RGB", "webp"), ("RGB", "tiff")]:
        image = rgb.convert("L").convert(mode) if mode in ("I;16", "1") else rgb.convert(mode)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        paths[mode + ext] = root / f"{mode.replace(';', '')}.{ext}"
        image.save(paths[mode + ext])
    return paths


def test_every_mode_becomes_rgb_the_same_way(tmp_path):
    for name, path in _modes_folder(tmp_path / "modes").items():
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (30, 20), name
    sixteen = np.asarray(load_rgb(tmp_path / "modes" / "I16.png"))
    grey = np.asarray(load_rgb(tmp_path / "modes" / "L.png"))
    assert np.abs(sixteen.astype(int) - grey.astype(int)).max() <= 1  # 16-bit scaled, not clipped to white
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.save(tmp_path / "t.png")
    assert load_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 100)
    make_image(tmp_path / "big.png", 100, np.random.default_rng(0), size=(20, 20))
    with pytest.raises(BadImageError, match=r"over the pixel limit: 400 pixels > 100 \(a decompression bomb\?\)"):
        load_rgb(tmp_path / "big.png")


def test_pillows_pixel_limits_give_one_message(tmp_path, monkeypatch):
    """Pillow refuses past its limit with a warning, and past twice it with an error, each naming another limit:
    imgtrain names its own, once, whichever refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 100)
    for side in (12, 20):  # 144 pixels: Pillow's warning; 400: its error (over 200)
        Image.new("RGB", (side, side)).save(tmp_path / f"{side}.png")
        with pytest.raises(BadImageError) as caught:
            load_rgb(tmp_path / f"{side}.png")
        assert caught.value.reason == f"over the pixel limit: {side * side:,} pixels > 100 (a decompression bomb?)"


def test_a_decode_that_would_hold_too_much_memory_is_refused(tmp_path, monkeypatch):
    Image.new("RGBA", (1000, 1000), (1, 2, 3, 4)).save(tmp_path / "wide.png")
    monkeypatch.setattr(decode_module, "MAX_DECODE_BYTES", 4 * 2**20)
    with pytest.raises(BadImageError) as caught:
        load_rgb(tmp_path / "wide.png")
    assert caught.value.reason == "too large to decode: 1000 x 1000 pixels in mode RGBA take 12 MB to decode, over " \
                                  "the limit of 4 MB"
    monkeypatch.setattr(decode_module, "MAX_DECODE_BYTES", 16 * 2**20)
    assert load_rgb(tmp_path / "wide.png").size == (1000, 1000)


_PEAKS = """
import ctypes, gc, io, json, struct, zlib
import numpy as np
from PIL import Image
from imgtrain.data.decode import decode_cost, decode_rgb

def status(key):  # bytes
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

W = H = 2000
def encoded(mode, format, colour=None, **options):
    deep = {"I;16": np.full((H, W), 40000, np.uint16), "F": np.full((H, W), 0.5, np.float32)}
    im = Image.fromarray(deep[mode]) if mode in deep else Image.new(mode, (W, H), colour)
    out = io.BytesIO()
    im.save(out, format, **options)
    return out.getvalue()

def tiff(width, height, chunk, bits, tile=None):
    # a deflated RGB TIFF of one strip, or of one tile of tile x tile pixels: what its tags say, not Pillow's
    tags = {256: width, 257: height, 258: (bits,) * 3, 259: 8, 262: 2, 273 if tile is None else 324: 8,
            277: 3, 279 if tile is None else 325: len(chunk), 284: 1, 278 if tile is None else 322: tile or height}
    if tile:
        tags[323] = tile
    ifd, extra = b"", b""
    values_at = 8 + len(chunk) + 2 + 12 * len(tags) + 4
    for tag, value in sorted(tags.items()):
        if isinstance(value, tuple):  # three shorts: stored after the directory
            ifd += struct.pack("<HHII", tag, 3, 3, values_at + len(extra))
            extra += struct.pack("<3H", *value)
        else:
            ifd += struct.pack("<HHII", tag, 4, 1, value)
    head = b"II*\\0" + struct.pack("<I", 8 + len(chunk))
    return head + chunk + struct.pack("<H", len(tags)) + ifd + b"\\0" * 4 + extra

turned = Image.Exif()
turned[0x0112] = 6
rgb = np.full((H, W, 3), 40000, np.uint16).astype("<u2").tobytes()
cases = {"RGBA png": (encoded("RGBA", "PNG", (10, 200, 30, 128)), None),
         "P png, transparent": (encoded("P", "PNG", 3, transparency=0), None),
         "I;16 png": (encoded("I;16", "PNG"), None), "F tiff": (encoded("F", "TIFF"), None),
         "I;16 png, a transparency key": (encoded("I;16", "PNG", transparency=40000), None),
         "RGB png": (encoded("RGB", "PNG", (1, 2, 3)), None),
         "RGB png, turned": (encoded("RGB", "PNG", (1, 2, 3), exif=turned.tobytes()), None),
         "RGB webp": (encoded("RGB", "WEBP", (1, 2, 3)), None),
         "RGB jpeg, turned": (encoded("RGB", "JPEG", (1, 2, 3), exif=turned.tobytes()), None),
         "CMYK jpeg": (encoded("CMYK", "JPEG", (1, 2, 3, 4)), None),
         "RGB jpeg, drafted": (encoded("RGB", "JPEG", (1, 2, 3)), 224),
         "RGB progressive jpeg 4:4:4": (encoded("RGB", "JPEG", (1, 2, 3), progressive=True, subsampling=0), None),
         "RGB progressive jpeg 4:4:4, drafted": (encoded("RGB", "JPEG", (1, 2, 3), progressive=True, subsampling=0),
                                                 32),
         "RGB progressive jpeg 4:2:0, drafted": (encoded("RGB", "JPEG", (1, 2, 3), progressive=True, subsampling=2),
                                                 32),
         "CMYK progressive jpeg, drafted": (encoded("CMYK", "JPEG", (1, 2, 3, 4), progressive=True), 32),
         "TIFF of one strip, 16-bit RGB": (tiff(W, H, zlib.compress(rgb, 9), 16), None),
         "TIFF of 64 x 64 pixels in a tile of 2048 x 2048": (tiff(64, 64, zlib.compress(bytes(2048 * 2048 * 3), 9),
                                                                 8, tile=2048), None)}
libc = ctypes.CDLL("libc.so.6")
peaks = {}
for name, (data, draft) in cases.items():
    counted = decode_cost(data, name, draft)[0]
    gc.collect()
    libc.malloc_trim(0)  # what earlier decodes freed goes back
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
    before = status("VmRSS:")
    decode_rgb(data, name, draft)
    peaks[name] = (status("VmHWM:") - before, counted)
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_a_decode_holds_no_more_memory_than_it_counts():
    """What one decode holds at its peak, in a process of its own: never more than ``decode_cost`` counts from
    the header (the server holds that much of --max-decode-mb for it). Among them a progressive JPEG, whose
    coefficients libjpeg keeps for the whole picture at any scale (drafted, it was counted at 1/64 of them), and
    TIFFs whose strip or tile libtiff holds whole (a tile far larger than the picture was not counted at all).
    malloc's mmap threshold is fixed, so that each large block is fresh pages (it rises as blocks are freed, and
    a block then reused from the heap would go unseen). A plain-colour RGBA PNG (a few KB) no longer makes five
    full-size copies (8 bytes a pixel, where it took 19), and RGB without orientation takes 4 bytes a pixel."""
    r = subprocess.run([sys.executable, "-c", _PEAKS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert r.returncode == 0, r.stderr
    peaks = json.loads(r.stdout)
    for name, (peak, counted) in peaks.items():
        assert peak <= counted, (name, peak, counted)
    assert peaks["RGBA png"][0] < 9 * 2000 * 2000  # 4 bytes the decoded RGBA, 4 the white RGB it is pasted on
    assert peaks["RGB jpeg, drafted"][0] < 2000 * 2000 / 2  # 1/8 scale: 250 x 250 pixels decoded
    assert peaks["RGB png"][1] < 4 * 2000 * 2000 + 2**23 < peaks["RGB png, turned"][1]  # turned: a second copy


def _reason(data: bytes, draft_size: int | None = None) -> str | None:
    """Why ``data`` is a bad image (None: it decodes)."""
    try:
        decode_module.decode_rgb(data, "x", draft_size)
    except BadImageError as exc:
        return exc.reason
    return None


def test_a_jpeg_of_endless_scans_or_markers_is_refused_before_decoding():
    """Work that no pixel or memory count sees: libjpeg passes over the whole picture for each scan (a scan of
    a few bytes repeated 30,000 times took 75 s of CPU), and Pillow keeps every marker before the first scan
    and reads the bytes between them one at a time (4.9 M empty comments took 4.4 s and 338 MB before a pixel
    was decoded). Both are counted in the file's bytes first; real JPEGs are far within the limits."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        out, "JPEG", progressive=True)
    jpeg = out.getvalue()
    assert jpeg.count(b"\xff\xda") == 10 and _reason(jpeg) is None
    last_scan = jpeg[jpeg.rindex(b"\xff\xda"):-2]  # up to the end-of-image marker
    assert _reason(jpeg[:-2] + last_scan * 200 + b"\xff\xd9", draft_size=8) is None  # 210 scans: decoded
    assert _reason(jpeg[:-2] + last_scan * 300 + b"\xff\xd9", draft_size=8) == (
        "a JPEG of over 256 scans (310 start-of-scan markers): decoding passes over the whole picture for each (a "
        "progressive JPEG has about 10)")
    comments = jpeg[:2] + b"\xff\xfe\x00\x02" * 900 + jpeg[2:]
    assert _reason(comments) is None
    assert _reason(jpeg[:2] + b"\xff\xfe\x00\x02" * 1001 + jpeg[2:]) == (
        "a JPEG with over 1,000 markers before its picture (a camera's has a few dozen)")
    assert _reason(jpeg[:2] + b"\xff\xfe\x00\x02" + b"\x00" * 70_000 + jpeg[2:]) == (
        "a JPEG with over 65,536 bytes of junk or padding between its markers")


def test_files_that_are_not_what_imgtrain_reads_are_named_as_what_they_are():
    """Pillow's own detection names another format (a TGA, whose first bytes a CUR's test also takes, was called
    CUR); a file of a format imgtrain reads that Pillow cannot open says why (a TIFF compressed by a method
    Pillow has no decoder for was 'not an image')."""
    def saved(format: str, **options) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format, **options)
        return out.getvalue()

    reads = "(it reads JPEG, PNG, PPM/PGM, BMP, TIFF and WebP)"
    assert _reason(saved("TGA")) == f"not an image imgtrain reads: TGA {reads}"
    tiff = bytearray(saved("TIFF", compression="tiff_deflate"))
    entries, = struct.unpack_from("<H", tiff, struct.unpack_from("<I", tiff, 4)[0])
    for at in range(struct.unpack_from("<I", tiff, 4)[0] + 2, len(tiff), 12)[:entries]:
        if struct.unpack_from("<H", tiff, at)[0] == 259:  # Compression
            struct.pack_into("<H", tiff, at + 8, 34712)  # JPEG 2000, which Pillow's libtiff does not decode
    assert _reason(bytes(tiff)) == "a TIFF file that Pillow cannot read (compression 34712, which it has no " \
                                   "decoder for)"
    assert _reason(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).startswith("a PNG file that Pillow cannot read (broken PNG file")
    assert _reason(b"\x89PNG\r\n\x1a\n") == "a PNG file that Pillow cannot read (its header is cut short)"
    assert _reason(b"plain text, not an image") == "not an image (no decoder recognises it)"


def test_only_the_designers_formats_reach_a_decoder(tmp_path):
    """EPS would run Ghostscript (here, a stand-in that leaves a mark), ICO would decode: named as what they are,
    left out by convert; a phone's multi-picture JPEG is a JPEG."""
    from conftest import foreign_images, mpo_image

    src = make_labelled_folder(tmp_path / "src", per_class=2)
    for name, data in foreign_images().items():
        (src / "dark" / name).write_bytes(data)
    (src / "dark" / "phone.jpg").write_bytes(mpo_image())
    bin_dir, mark = tmp_path / "bin", tmp_path / "ghostscript-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    run_cli("convert-to-image-directory", src, "--output", tmp_path / "out",
            env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    reasons = {Path(r["file"]).name: r["reason"] for r in audit["rejected"]}
    reads = "(it reads JPEG, PNG, PPM/PGM, BMP, TIFF and WebP)"
    assert reasons == {"eps.png": f"not an image imgtrain reads: EPS {reads}",
                       "ico.jpg": f"not an image imgtrain reads: ICO {reads}",
                       "pdf.png": "not an image (no decoder recognises it)",
                       "svg.png": "not an image (no decoder recognises it)"}
    assert not mark.exists()
    assert audit["categories"] == {"bright": 2, "dark": 3, "mid": 2}  # phone.jpg among them
    phone = load_rgb(src / "dark" / "phone.jpg", draft_size=50)
    assert phone.size == (100, 80)  # decoded at half scale, as a JPEG is


def _corrupt_copy(image_dir: Path, dest: Path, which: int = 0) -> Path:
    shutil.copytree(image_dir, dest)
    victim = sorted((dest / "image").iterdir())[which]
    victim.write_bytes(victim.read_bytes()[:-200])
    return victim


def test_a_bad_image_that_slipped_in_later_is_named(tmp_path, image_dirs, cli_in_process):
    victim = _corrupt_copy(image_dirs["train"], tmp_path / "train")
    logs: list[str] = []
    train_pytorch_model(image_dirs["untrained"], tmp_path / "train", image_dirs["val"], tmp_path / "m1",
                        log=logs.append, **TRAIN)
    assert sum(f"skipping image {victim}" in line for line in logs) == 1  # named once, not every epoch
    assert load_model_spec(tmp_path / "m1").training["bad_images"] == {"training": [str(victim)], "validation": []}
    assert f"<td>training</td><td>{victim}</td>" in (tmp_path / "m1" / "report.html").read_text()
    with pytest.raises(BadImageError, match=f"cannot decode image {victim}: truncated"):
        train_pytorch_model(image_dirs["untrained"], tmp_path / "train", image_dirs["val"], tmp_path / "m2",
                            on_bad_image="fail", **TRAIN, **QUIET)
    assert not (tmp_path / "m2").exists()
    bad_val = _corrupt_copy(image_dirs["val"], tmp_path / "val", which=1)
    logs.clear()
    result = score_image_model(tmp_path / "m1", tmp_path / "val", tmp_path / "s", num_workers=0, log=logs.append)
    assert result.num_images == 8 and any(str(bad_val) in line for line in logs)
    assert bad_val.name not in (tmp_path / "s" / "scored.csv").read_text()
    r = cli_in_process("score-image-model", "--trained-model", tmp_path / "m1", "--dataset", tmp_path / "val",
                       "--output", tmp_path / "s2", "--on-bad-image", "fail")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: BadImageError: cannot decode image {bad_val}")


def test_same_image_in_training_and_validation_is_a_warning(tmp_path, image_dirs):
    from imgtrain import split_image_directory

    shutil.copytree(image_dirs["val"], tmp_path / "val")
    train_first = sorted((image_dirs["train"] / "image").iterdir())[0]
    val_first = sorted((tmp_path / "val" / "image").iterdir())[0]
    shutil.copyfile(train_first, val_first)  # same bytes; the recorded sha256 must follow
    lst = (tmp_path / "val" / "images.lst").read_text().splitlines()
    train_rows = {json.loads(r)["image_info"]["file_name"]: json.loads(r)
                  for r in (image_dirs["train"] / "images.lst").read_text().splitlines()}
    rows = [json.loads(r) for r in lst]
    for row in rows:
        if row["image_info"]["file_name"] == f"image/{val_first.name}":
            row["image_info"]["sha256"] = train_rows[f"image/{train_first.name}"]["image_info"]["sha256"]
    (tmp_path / "val" / "images.lst").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs: list[str] = []
    train_pytorch_model(image_dirs["untrained"], image_dirs["train"], tmp_path / "val", tmp_path / "m",
                        log=logs.append, **{**TRAIN, "epochs": 1})
    assert any("1 validation image(s) are also in the training data" in line and val_first.name in line
               for line in logs)
    del split_image_directory


def test_metadata_left_stale_by_another_tool_is_checked_against_the_files(tmp_path, image_dirs):
    """The designer's Apply Image Transformation re-encodes the images of an ImageDirectory and keeps
    image_info as it was: imgtrain's width, height and sha256 then describe files that are gone. The
    image size follows the files, and stale digests that match no longer make a warning."""
    from PIL import Image

    for name in ("train", "val"):
        shutil.copytree(image_dirs[name], tmp_path / name)
        for image in (tmp_path / name / "image").iterdir():
            with Image.open(image) as im:
                im.convert("RGB").resize((96, 96)).save(image, format="PNG")  # suffix kept, bytes new
    train_rows = [json.loads(r) for r in (tmp_path / "train" / "images.lst").read_text().splitlines()]
    val_rows = [json.loads(r) for r in (tmp_path / "val" / "images.lst").read_text().splitlines()]
    val_rows[0]["image_info"]["sha256"] = train_rows[0]["image_info"]["sha256"]  # stale keys that collide
    (tmp_path / "val" / "images.lst").write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    logs: list[str] = []
    train_pytorch_model(image_dirs["untrained"], tmp_path / "train", tmp_path / "val", tmp_path / "m",
                        log=logs.append, **{**TRAIN, "epochs": 1, "image_size": None})
    assert any("image size 96" in line for line in logs), logs  # the recorded sides (20 to 48) say 32
    assert not any("also in the training data" in line for line in logs), logs


# --- archives ---------------------------------------------------------------------------------

def _tar_with(tmp_path: Path, name: str, add) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        add(tf)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


def _entry(name: str, kind=tarfile.REGTYPE, link: str = "", data: bytes = b"abc") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("name, entry, message", [
    ("abs.tar", _entry("/tmp/imgtrain-escape.png"), "imgtrain-escape.png"),
    ("dotdot.tar", _entry("cat/../../escape.png"), "escape.png"),
    ("symlink.tar", _entry("cat/link.png", tarfile.SYMTYPE, "/etc/passwd"), "link.png"),
    ("hardlink.tar", _entry("cat/hard.png", tarfile.LNKTYPE, "../../etc/passwd"), "hard.png"),
    ("device.tar", _entry("cat/dev.png", tarfile.CHRTYPE), "dev.png"),
])
def test_unsafe_tar_entries_are_refused_by_name(tmp_path, name, entry, message):
    archive = _tar_with(tmp_path, name, lambda tf: tf.addfile(*entry))
    with pytest.raises(InvalidDatasetError, match=f"entry .*{message}"):
        convert_to_image_directory(archive, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists() and not Path("/tmp/imgtrain-escape.png").exists()


def test_archive_limits(tmp_path, labelled_folder, monkeypatch):
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for f in sorted(labelled_folder.rglob("*.png")):
            zf.write(f, f.relative_to(labelled_folder))
    monkeypatch.setattr(convert_module, "MAX_ARCHIVE_ENTRIES", 5)
    with pytest.raises(InvalidDatasetError, match="past the limit of 5 entries"):
        convert_to_image_directory(tmp_path / "many.zip", tmp_path / "out", **QUIET)
    monkeypatch.setattr(convert_module, "MAX_ARCHIVE_ENTRIES", 1000)
    monkeypatch.setattr(convert_module, "MAX_ARCHIVE_BYTES", 2000)
    with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as tf:
        tf.add(labelled_folder, arcname="x")
    for archive in ("many.zip", "big.tar.gz"):
        with pytest.raises(InvalidDatasetError, match="past 2,000 bytes uncompressed"):
            convert_to_image_directory(tmp_path / archive, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


# --- training faults --------------------------------------------------------------------------

def test_nan_loss_stops_with_a_clear_error(tmp_path, image_dirs, monkeypatch):
    import torch
    import torchvision

    from imgtrain import resnet
    from imgtrain.models.weights import weights_cache_path
    from test_models import place_fake_imagenet_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = place_fake_imagenet_weights("resnet18")
    state["conv1.weight"] = state["conv1.weight"] * 1e38  # overflows to inf in the first layer
    torch.save(state, weights_cache_path("resnet18"))
    resnet(tmp_path / "u", model_name="resnet18")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("an earlier output")
    # on a GPU the loss is checked without waiting for each step: the message names the batches checked
    where = r"one of the batches up to \d+" if torch.cuda.is_available() else "batch 1"
    with pytest.raises(TrainingDivergedError, match=rf"the training loss became nan in epoch 1, {where}") as err:
        train_pytorch_model(tmp_path / "u", image_dirs["train"], image_dirs["val"], tmp_path / "model",
                            overwrite=True, **TRAIN, **QUIET)
    assert "lower learning_rate than 0.001" in str(err.value)  # in Python, the argument's name
    assert (tmp_path / "model" / "keep.txt").read_text() == "an earlier output"  # not replaced by a failed run
    del torchvision
    # The message docs/reliability.md quotes is the one the command line prints (they had drifted apart).
    with speaking_command_line(), pytest.raises(TrainingDivergedError) as err:
        train_pytorch_model(tmp_path / "u", image_dirs["train"], image_dirs["val"], tmp_path / "model",
                            overwrite=True, device="cpu", **TRAIN, **QUIET)
    [row] = [line for line in DOCS.read_text().splitlines() if line.startswith("| NaN or infinite loss |")]
    assert f"`TrainingDivergedError: {err.value}`" in row


_ADDRESS_SPACE_OF_A_STARTED_RUN = """
import torch, torchvision, imgtrain.training.train
torchvision.models.resnet18()(torch.zeros(2, 3, 64, 64))  # torch's threads started, as in a run's first step
print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmPeak')) * 1024)
"""


def test_out_of_memory_gets_a_clear_error(tmp_path, image_dirs):
    # The address space a run takes before its first batch differs between builds and machines (a CUDA
    # build maps more, each thread has its arenas): the limit leaves 2.5 GiB beyond it, where the first
    # batch (27 images of 1536 px) needs several times that.
    started = int(subprocess.run([sys.executable, "-c", _ADDRESS_SPACE_OF_A_STARTED_RUN], capture_output=True,
                                 text=True, check=True).stdout)
    limit = started + 2560 * 2**20

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, "-m", "imgtrain", "train-pytorch-model", "--untrained-model", image_dirs["untrained"],
           "--training-data", image_dirs["train"], "--validation-data", image_dirs["val"], "--output",
           tmp_path / "m", "--batch-size", "27", "--image-size", "1536", "--epochs", "1", "--num-workers", "0",
           "--device", "cpu"]  # the CPU's memory is what is limited
    r = subprocess.run(cmd, preexec_fn=limit_memory, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: OutOfMemoryError: the cpu ran out of memory at batch size 27 and image size 1536. "
        "pass a smaller --batch-size (or --image-size)")
    assert not (tmp_path / "m").exists()


def test_unwritable_output_is_detected_before_training(tmp_path, image_dirs):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputNotWritableError, match="cannot write the output"):
        train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"],
                            tmp_path / "a-file" / "model", **TRAIN, **QUIET)
    r = run_cli("convert-to-image-directory", tmp_path, "--output", "/proc/imgtrain-out", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: OutputNotWritableError: cannot write the output")


# --- atomic outputs ---------------------------------------------------------------------------

def test_temporaries_of_killed_runs_are_cleaned_up(tmp_path, labelled_folder):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / ".imgtrain-tmp-out-abc123"
    stale.mkdir()
    (stale / ".owner-pid").write_text(str(dead.pid))
    alive = tmp_path / ".imgtrain-tmp-out-def456"
    alive.mkdir()
    (alive / ".owner-pid").write_text(str(os.getpid()))
    convert_to_image_directory(labelled_folder, tmp_path / "out", **QUIET)
    assert not stale.exists() and alive.exists()


def test_existing_output_needs_overwrite(tmp_path, image_dirs):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"], tmp_path / "m",
                            **TRAIN, **QUIET)
    assert (tmp_path / "m" / "keep.txt").exists()


# --- checkpoints and exact resume -------------------------------------------------------------

@pytest.fixture
def finished(two_epoch_run) -> Path:
    """An uninterrupted run of TRAIN, made once for the session: the tests below copy it, or compare with it."""
    return two_epoch_run(cache=True, num_workers=0).output


class Interrupt(BaseException):
    pass


def _interrupt_after(epoch: int):
    def log(message: str) -> None:
        if message.startswith(f"epoch {epoch}/"):
            raise Interrupt
    return log


def test_resume_continues_exactly(tmp_path, image_dirs):
    d, args = image_dirs, {**TRAIN, "epochs": 3, "num_workers": 2}
    reference = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "ref", **args, **QUIET)
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(1), **args)
    assert not (tmp_path / "m").exists() and (tmp_path / ".imgtrain-resume-m" / "checkpoint.safetensors").exists()
    logs: list[str] = []
    resumed = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True,
                                  log=logs.append, **args)
    assert any("resuming" in line and "after epoch 1" in line for line in logs)
    assert sum(line.startswith("epoch ") for line in logs) == 2  # epochs 2 and 3 only
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert [m.validation_loss for m in resumed.history] == [m.validation_loss for m in reference.history]
    assert not (tmp_path / ".imgtrain-resume-m").exists() and not (tmp_path / "m" / "checkpoint.safetensors").exists()


def test_dropout_masks_depend_on_neither_the_data_workers_nor_a_resume(tmp_path, image_dirs, dropout_model):
    """A network with dropout, its data decoded by worker processes that persist across epochs (as on a GPU, or
    without the cache): the same weights as without workers, and a run interrupted and resumed ends as one that
    was not. DataLoaders drew their workers' seeds from the generator dropout draws from."""
    d = {**image_dirs, "untrained": dropout_model}
    args = {**TRAIN, "epochs": 3, "precision": "fp32", "cache": False}

    def run(name: str, workers: int, **kw):
        return train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / name,
                                   **{**args, "num_workers": workers, **kw})

    reference = run("ref", 2, **QUIET)
    alone = run("alone", 0, **QUIET)
    with pytest.raises(Interrupt):
        run("m", 2, log=_interrupt_after(1))
    resumed = run("m", 2, resume=True, **QUIET)
    weights = (reference.output / "model.safetensors").read_bytes()
    for result in (resumed, alone):
        assert [m.train_loss for m in result.history] == [m.train_loss for m in reference.history]
        assert (result.output / "model.safetensors").read_bytes() == weights


def test_resume_when_complete_changes_nothing(tmp_path, image_dirs, finished):
    d = image_dirs
    shutil.copytree(finished, tmp_path / "m")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m").iterdir()}
    r = run_cli("train-pytorch-model", "--untrained-model", d["untrained"], "--training-data", d["train"],
                "--validation-data", d["val"], "--output", tmp_path / "m", "--epochs", "2", "--batch-size", "8",
                "--image-size", "32", "--resume")
    assert r.stdout.count("\n") == 1 and "already complete" in r.stdout and r.stderr == ""  # one line
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m").iterdir()}


def test_a_checkpoint_written_beside_training_holds_the_tensors_as_they_were_and_its_failure_is_raised(tmp_path):
    """BackgroundWriter: what it writes is a copy taken when asked (training goes on changing the live tensors),
    its buffers are kept for the next write, one write waits for the one before, and a failed write (here, a
    folder that is not there) is raised in the caller's thread by the next wait or start."""
    from safetensors.torch import load_file

    from imgtrain.directories.atomic import write_safetensors
    from imgtrain.training.checkpoint import BackgroundWriter

    live = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "m": torch.ones(4, dtype=torch.bfloat16)}
    writer = BackgroundWriter(limit=1 << 20)
    writer.start(lambda t: write_safetensors(t, tmp_path / "one.safetensors"), live)
    live["w"].mul_(10)  # the next epoch's steps, while the file is written
    writer.wait()
    assert torch.equal(load_file(tmp_path / "one.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    kept = writer.kept["w"]
    writer.start(lambda t: write_safetensors(t, tmp_path / "two.safetensors"), live)
    assert writer.kept["w"] is kept  # the same buffer, not another copy
    writer.start(lambda t: write_safetensors(t, tmp_path / "gone" / "three.safetensors"), live)
    assert torch.equal(load_file(tmp_path / "two.safetensors")["w"], 10 * torch.arange(6.0).reshape(2, 3))
    with pytest.raises(OSError, match="three.safetensors"):
        writer.wait()
    writer.wait()  # raised once
    writer.start(lambda t: write_safetensors(t, tmp_path / "gone" / "four.safetensors"), live)
    with pytest.raises(OSError, match="four.safetensors"):
        writer.start(lambda t: None, live)
    # Ctrl-C (or SIGTERM) while waiting: the write is finished first, then the interrupt is raised. Thread.join
    # on Python 3.11 and 3.12 took the interrupt as the thread's end and the process exited under the write.
    def slow(t: dict) -> None:
        time.sleep(0.6)
        write_safetensors(t, tmp_path / "six.safetensors")

    writer.start(slow, live)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        writer.wait()
    timer.join()
    assert (tmp_path / "six.safetensors").exists() and writer.thread is None
    # More than the limit: written before start returns, from the live tensors, with no copy kept
    small = BackgroundWriter(limit=8)
    small.start(lambda t: write_safetensors(t, tmp_path / "five.safetensors"), live)
    assert small.thread is None and not small.kept and (tmp_path / "five.safetensors").exists()


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, image_dirs):
    logs: list[str] = []
    d = image_dirs
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, log=logs.append,
                        **{**TRAIN, "epochs": 1})
    assert any("no checkpoint" in line and "starting from scratch" in line for line in logs)


def test_killed_between_the_last_epoch_and_publishing_then_resume_publishes(tmp_path, image_dirs, finished):
    d = image_dirs
    weights = (finished / "model.safetensors").read_bytes()
    # What a kill leaves at that moment: the finished model directory still in the work directory,
    # perhaps with the checkpoint, a cache and a partial file not yet removed.
    shutil.copytree(finished, tmp_path / ".imgtrain-resume-m")
    for leftover in ("checkpoint.safetensors", "cache-training-32.pixels", "metrics.csv.partial"):
        (tmp_path / ".imgtrain-resume-m" / leftover).write_bytes(b"x")
    logs: list[str] = []
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, log=logs.append, **TRAIN)
    assert any("moved into place" in line for line in logs) and not any(line.startswith("epoch ") for line in logs)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == [
        "_meta.yaml", "index_to_label.csv", "metrics.csv", "metrics.jsonl", "model.safetensors", "model_spec.yaml",
        "report.html", "training_images.png"]
    assert not (tmp_path / ".imgtrain-resume-m").exists()


def test_resume_keeps_a_finished_run_of_other_parameters_that_waits_to_be_moved_into_place(tmp_path, image_dirs,
                                                                                           finished):
    """Not leftovers to discard, as a run with no checkpoint would be: a model (as one of the version before, whose
    schedule was a cosine, waits for the same command after an upgrade)."""
    d, work = image_dirs, tmp_path / ".imgtrain-resume-m"
    shutil.copytree(finished, work)
    with speaking_command_line(), pytest.raises(CheckpointMismatchError) as refused:
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, lr_schedule="cosine",
                            **TRAIN, **QUIET)
    assert str(refused.value) == (
        f"a finished run of {tmp_path / 'm'} waits in {work} to be moved into place, made with other parameters: "
        "--lr-schedule linear then, --lr-schedule cosine now. run the command that made it with --resume to move it "
        "into place, or pass --restart to discard it and train anew")
    assert (work / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()
    assert not (tmp_path / "m").exists()


def test_resume_refuses_other_data_or_parameters(tmp_path, image_dirs):
    d, args = image_dirs, TRAIN
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(1), **args)
    work = tmp_path / ".imgtrain-resume-m"
    caches_before = sorted(f.name for f in work.glob("cache-*"))
    with pytest.raises(CheckpointMismatchError, match="made with other parameters: learning_rate=0.001 then, "
                                                      "learning_rate=0.01 now; image_size=32 then, image_size=64 now"):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True,
                            **{**args, "learning_rate": 0.01, "image_size": 64}, **QUIET)
    assert sorted(f.name for f in work.glob("cache-*")) == caches_before  # a refused resume reserves nothing
    # On the command line, a parameter left out is said as such (it was "--image-size None now").
    with speaking_command_line(), pytest.raises(CheckpointMismatchError) as refused:
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True,
                            **{**args, "image_size": None}, **QUIET)
    assert "made with other parameters: --image-size 32 then, no --image-size now. run with the same" in \
        str(refused.value)
    # Each as the user gave it, with what it stood for: a precision auto, a transformation's operations; a parameter
    # left at its default is said at it (class weights said "no --class-weights then").
    auto, t = resolve_precision("auto", torch.device("cpu")), tmp_path / "t"
    other = "fp32" if auto == "bf16" else "bf16"
    init_image_transformation(t, size=32, center_crop=False, random_horizontal_flip=False)
    with speaking_command_line(), pytest.raises(CheckpointMismatchError) as refused:
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, **QUIET,
                            **{**args, "precision": other, "class_weights": "balanced", "transformation": t})
    assert (f"made with other parameters: --precision auto ({auto}) then, --precision {other} now; --class-weights "
            f"none then, --class-weights balanced now; no --transformation then, --transformation {t} (Resize 32) "
            "now. run with") in str(refused.value)
    with pytest.raises(CheckpointMismatchError, match="other training data and validation data"):
        train_pytorch_model(d["untrained"], d["val"], d["train"], tmp_path / "m", resume=True, **args, **QUIET)
    # the checkpoint is still there, and the same command resumes it (without the cache: it goes)
    result = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, cache=False,
                                 **args, **QUIET)
    assert result.stopped_epoch == 2
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == [
        "_meta.yaml", "index_to_label.csv", "metrics.csv", "metrics.jsonl", "model.safetensors", "model_spec.yaml",
        "report.html", "training_images.png"]


def test_a_refused_resume_names_a_parameter_now_at_its_default(tmp_path, image_dirs):
    """A checkpoint made with --class-weights balanced, --no-ema, --lr-schedule cosine and an explicit precision,
    resumed with none of them: all are named, as given then and now (the default class weights left the difference
    unnamed: 'made with other parameters (by another version of imgtrain?)')."""
    d = image_dirs
    auto = resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if auto == "bf16" else "bf16"
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(1),
                            **{**TRAIN, "class_weights": "balanced", "precision": other, "ema": False,
                               "lr_schedule": "cosine"})
    with speaking_command_line(), pytest.raises(CheckpointMismatchError) as refused:
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True, **TRAIN, **QUIET)
    assert ("made with other parameters: --lr-schedule cosine then, --lr-schedule linear now; --precision "
            f"{other} then, --precision auto ({auto}) now; --no-ema then, --ema now; --class-weights balanced then, "
            "--class-weights none now. run with") in str(refused.value)


def test_a_damaged_checkpoint_is_named(tmp_path, image_dirs, cli_in_process):
    d = image_dirs
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(1), **TRAIN)
    (tmp_path / ".imgtrain-resume-m" / "checkpoint.safetensors").write_bytes(b"")
    r = cli_in_process("train-pytorch-model", "--untrained-model", d["untrained"], "--training-data", d["train"],
                       "--validation-data", d["val"], "--output", tmp_path / "m", "--epochs", "2", "--batch-size",
                       "8", "--image-size", "32", "--resume")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "error: CheckpointDamagedError: the checkpoint "), r.stderr
    assert r.stderr.strip().endswith("cannot be read (SafetensorError: Error while deserializing header: header too "
                                     "small). run with --restart to start again")
    r = cli_in_process("train", "--untrained-model", d["untrained"], "--training-data", d["train"],
                       "--validation-data", d["val"], "--output", tmp_path / "m", "--epochs", "2", "--batch-size", "8",
                       "--image-size", "32", "--restart")
    assert r.returncode == 0 and "Trained model written to" in r.stdout, r.stderr


def _kill_when(proc: subprocess.Popen, checkpoint: Path, done: int, mode: str, rng: random.Random) -> bool:
    """Wait for the moment to kill ``proc``, decided by the work it has done, never by the clock alone:
    just after a checkpoint past epoch ``done`` appears (then a random instant later), or while a
    checkpoint is being written. Return True when the run finished first."""
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    progressed_at, delay = None, rng.uniform(0, 0.5)
    while proc.poll() is None:
        if mode == "while writing" and partial.exists():
            break
        if progressed_at is None and (checkpoint_epoch(checkpoint) or 0) > done:
            progressed_at = time.monotonic()
        if progressed_at is not None and time.monotonic() - progressed_at >= delay:
            break
        time.sleep(0.002 if mode == "while writing" else 0.02)
    else:
        return True
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return False


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path, image_dirs):
    d = image_dirs
    # The seed's three kills come early: while the first checkpoint is written, 0.27 s after the next one, while
    # the one after that is written (epoch 3's at the latest). 5 epochs leave each of them room before the end.
    args = ["train-pytorch-model", "--untrained-model", d["untrained"], "--training-data", d["train"],
            "--validation-data", d["val"], "--epochs", "5", "--patience", "5", "--batch-size", "4",
            "--image-size", "32", "--num-workers", "1"]
    # the uninterrupted run, in this process (the command's own function, without the process's start-up)
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "reference", epochs=5, patience=5,
                        batch_size=4, image_size=32, num_workers=1, **QUIET)
    checkpoint = tmp_path / ".imgtrain-resume-m" / "checkpoint.safetensors"
    rng = random.Random(20261123)
    kills = []
    while True:  # every kill comes after new work (or in a checkpoint's write), so this ends, however slow
        done = (checkpoint_epoch(checkpoint) or 0) if checkpoint.exists() else 0
        log = tmp_path / f"attempt-{len(kills)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "imgtrain", *map(str, args), "--output", tmp_path / "m",
                                     "--resume"], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        mode = rng.choice(["after a checkpoint", "while writing"]) if len(kills) < 3 else "never"
        if mode == "never":
            proc.wait(timeout=600)
            assert proc.returncode == 0, log.read_text()
            break
        if _kill_when(proc, checkpoint, done, mode, rng):
            assert proc.returncode == 0, log.read_text()
            break
        kills.append((mode, done))
    assert len(kills) >= 2, kills
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (
        tmp_path / "reference" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing piles up
    # nor in the model: a write killed half-way left safetensors' own temporary file (.tmpXXXXXX) beside the checkpoint
    names = [sorted(p.name for p in (tmp_path / model).iterdir()) for model in ("m", "reference")]
    assert names[0] == names[1]


def test_sigterm_to_the_process_group_with_data_workers_is_one_line(tmp_path, image_dirs):
    """SIGTERM to every process of the run at once, as GNU timeout, `kill -TERM -PGID`, systemd and SLURM send it,
    while DataLoader workers persist (--no-cache): the one line and exit code 143 of a SIGTERM to the main process
    alone (the workers died of the signal, and the main process raised 'DataLoader worker is killed by signal'
    over its own unwinding, with two tracebacks and exit code 1)."""
    d, log = image_dirs, tmp_path / "run.log"
    with training_in_background(log, "--untrained-model", d["untrained"], "--training-data", d["train"],
                                "--validation-data", d["val"], "--output", tmp_path / "m", "--epochs", "40",
                                "--patience", "40", "--batch-size", "8", "--image-size", "32", "--precision", "fp32",
                                "--num-workers", "2", "--no-cache") as proc:
        time.sleep(0.2)  # in epoch 2, its workers decoding
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    said = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, said
    assert "Traceback" not in said and "Exception ignored" not in said, said
    assert said.strip().splitlines()[-1] == ("error: terminated (SIGTERM); no output was written (re-run with "
                                             "--resume to continue from the last epoch)")


def test_a_run_in_progress_is_left_alone_and_a_dead_ones_pid_is_not_believed(tmp_path, image_dirs):
    from imgtrain.errors import OutputNotWritableError

    d = image_dirs
    work = tmp_path / ".imgtrain-resume-m"
    work.mkdir()
    (work / "checkpoint.safetensors").write_bytes(b"a live run's")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (work / ".owner-pid").write_text(f"{other.pid} {started}")
        with pytest.raises(OutputNotWritableError, match=f"another imgtrain process \\(pid {other.pid}\\) is "
                                                         "training into .* delete .*.owner-pid"):
            train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", restart=True, **TRAIN, **QUIET)
        assert (work / "checkpoint.safetensors").read_bytes() == b"a live run's"
        # The same pid with another start time: a process that reused the pid of a killed run.
        (work / ".owner-pid").write_text(f"{other.pid} 1")
        with pytest.raises(CheckpointExistsError):
            train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", **TRAIN, **QUIET)
    finally:
        other.kill()
        other.wait()


def test_resume_moves_a_finished_run_into_place_in_one_line(tmp_path, image_dirs, finished, cli_in_process):
    d = image_dirs
    shutil.copytree(finished, tmp_path / ".imgtrain-resume-m")  # killed before it was moved into place
    args = ["train", "--untrained-model", d["untrained"], "--training-data", d["train"], "--validation-data",
            d["val"], "--output", tmp_path / "m", "--batch-size", "8", "--image-size", "32", "--num-workers", "0"]
    r = cli_in_process(*args, "--epochs", "3", "--resume")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: CheckpointMismatchError: a finished run of 2 epochs of {tmp_path / 'm'} waits in "
        f"{tmp_path / '.imgtrain-resume-m'} to be moved into place. pass --epochs 2 with --resume to move it into "
        "place (then train it further as a new run), or --restart to train 3 epochs anew")
    r = cli_in_process(*args, "--epochs", "2", "--resume")
    assert r.returncode == 0 and r.stdout.count("\n") == 1
    assert r.stdout.startswith(f"Trained model written to {tmp_path / 'm'} (best epoch")
    assert (tmp_path / "m" / "model.safetensors").exists() and not (tmp_path / ".imgtrain-resume-m").exists()


def test_a_rerun_without_resume_keeps_the_checkpoint_and_says_what_to_do(tmp_path, image_dirs, finished,
                                                                          cli_in_process):
    d = image_dirs
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(1), **TRAIN)
    work = tmp_path / ".imgtrain-resume-m"
    size = sum(f.stat().st_size for f in work.iterdir() if f.is_file()) / 1e6
    r = cli_in_process("train", "--untrained-model", d["untrained"], "--training-data", d["train"],
                       "--validation-data", d["val"], "--output", tmp_path / "m", "--epochs", "2", "--batch-size", "8",
                       "--image-size", "32")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: CheckpointExistsError: an interrupted run of {tmp_path / 'm'} left a checkpoint after epoch 1 in "
        f"{work} ({size:,.0f} MB). pass --resume to continue it, or --restart to discard it and start again"]
    assert (work / "checkpoint.safetensors").exists()
    with pytest.raises(CheckpointExistsError, match="pass resume=True to continue it, or restart=True"):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", **TRAIN, **QUIET)
    restarted = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", restart=True,
                                    **TRAIN, **QUIET)
    assert (restarted.output / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()
    assert not work.exists()


def test_resume_with_more_epochs_trains_on(tmp_path, image_dirs):
    d, args = image_dirs, {**TRAIN, "patience": 9}
    fresh = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "fresh", **{**args, "epochs": 4},
                                **QUIET)
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(2),
                            **{**args, "epochs": 3})
    with pytest.raises(NotInRangeValueError, match="the checkpoint has trained 2 epochs already"):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True,
                            **{**args, "epochs": 1}, **QUIET)
    # As many epochs as it has done: nothing is trained, and the run says so (it said "training on to 2 epochs").
    shutil.copytree(tmp_path / ".imgtrain-resume-m", tmp_path / ".imgtrain-resume-done")
    logs: list[str] = []
    done = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "done", resume=True, log=logs.append,
                               **{**args, "epochs": 2})
    assert done.stopped_epoch == 2 and len(done.history) == 2 and not any("training on" in line for line in logs)
    assert logs[logs.index(f"resuming {tmp_path / 'done'} after epoch 2 from its checkpoint") + 1] == (
        "the checkpoint has trained all 2 epochs of epochs=2: nothing is left to train, and the model is written "
        "from the best of them")
    logs.clear()
    result = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True,
                                 log=logs.append, **{**args, "epochs": 4})
    assert any("training on to 4 epochs instead of 3" in line for line in logs)
    assert result.stopped_epoch == 4 and len(result.history) == 4
    # Epochs 3 and 4 follow the 4-epoch schedule from where the checkpoint stood.
    assert [m.learning_rate for m in result.history[2:]] == pytest.approx(
        [m.learning_rate for m in fresh.history[2:]], rel=1e-6)
    assert result.history[1].learning_rate != pytest.approx(fresh.history[1].learning_rate)  # done as a 3-epoch run
    with pytest.raises(CheckpointMismatchError, match="is a finished run of 4 epochs, and its checkpoint is gone"):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", resume=True,
                            **{**args, "epochs": 7}, **QUIET)


# --- a full disk ------------------------------------------------------------------------------

def _with_a_small_disk(disk: Path, megabytes: int, script: str) -> None:
    """Run a shell script in a private mount namespace in which `disk` is a tmpfs of `megabytes` MB:
    a real file system that really fills up, gone with the script."""
    disk.mkdir()
    mount = f"mount -t tmpfs -o size={megabytes}m tmpfs {disk} || exit 99\n"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount + script],
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 99:
        pytest.skip(f"this machine cannot mount a small file system for the test: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_full_disk_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, image_dirs, trained_model):
    d, disk = image_dirs, tmp_path / "disk"
    # the parameters of trained_model, the uninterrupted run that the resumed one must match
    args = ["train-pytorch-model", "--untrained-model", d["untrained"], "--training-data", d["train"],
            "--validation-data", d["val"], "--epochs", "3", "--batch-size", "8", "--image-size", "32",
            "--num-workers", "0", "--precision", "fp32"]
    command = " ".join(map(str, [sys.executable, "-m", "imgtrain", *args, "--output", disk / "m"]))
    # ResNet-18: the weights take 45 MB and a checkpoint 180 MB (the weights, their average and AdamW's two
    # moments), so 300 MB hold epoch 1 and epoch 2's best model but not epoch 2's checkpoint beside epoch 1's.
    # Then the disk grows (space was freed) and the same command resumes.
    _with_a_small_disk(disk, 300, f"""
        {command} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc
        ls -A {disk} > {tmp_path}/first.ls
        mount -o remount,size=600m {disk}
        {command} --resume > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
        ls -A {disk} > {tmp_path}/second.ls
        cp {disk}/m/model.safetensors {tmp_path}/resumed.safetensors
    """)
    first_error = (tmp_path / "first.err").read_text().strip().splitlines()[-1]
    assert (tmp_path / "first.rc").read_text().strip() == "1", first_error
    assert first_error == (
        f"error: OSError: [Errno 28] No space left on device: '{disk}/.imgtrain-resume-m/checkpoint.safetensors'. "
        "no output was written; free space on that disk, then re-run with --resume to continue from the last epoch")
    assert (tmp_path / "first.ls").read_text().split() == [".imgtrain-resume-m"]  # no output, no partial file
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert "after epoch 1" in (tmp_path / "second.err").read_text()  # the progress log
    assert (tmp_path / "second.ls").read_text().split() == ["m"]
    assert (tmp_path / "resumed.safetensors").read_bytes() == (trained_model / "model.safetensors").read_bytes()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_full_disk_while_converting_is_not_called_a_bad_archive(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(12):  # noise compresses badly: 12 x 190 KB
        (src / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(src / "ab"[i % 2] / f"{i}.png")
    shutil.make_archive(str(tmp_path / "images"), "zip", src)
    shutil.make_archive(str(tmp_path / "images"), "gztar", src)
    disk = tmp_path / "disk"
    lines = "\n".join(f"{sys.executable} -m imgtrain convert-to-image-directory {tmp_path / name} --output {disk}/out "
                      f"2> {tmp_path}/{name}.err; ls -A {disk} > {tmp_path}/{name}.ls"
                      for name in ("images.zip", "images.tar.gz", "src"))
    _with_a_small_disk(disk, 1, lines)
    for name in ("images.zip", "images.tar.gz", "src"):
        error = (tmp_path / f"{name}.err").read_text().strip().splitlines()[-1]
        assert error.startswith("error: OSError: [Errno 28] No space left on device"), error
        assert error.endswith(". no output was written; free space on that disk, or write the output to another one")
        assert (tmp_path / f"{name}.ls").read_text() == ""  # nothing left behind


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_decoded_image_cache_survives_a_disk_that_fills_up(tmp_path):
    # The cache is a memory-mapped file: were its blocks allocated only when written, an image
    # written after the disk filled up would kill the process with SIGBUS.
    disk = tmp_path / "disk"
    script = f"""
import os, torch
from pathlib import Path
from imgtrain.data.cache import DecodedImageCache
disk = Path({str(disk)!r})
cache = DecodedImageCache(disk / "c", count=40, size=64)  # 480 KB
fd = os.open(disk / "other-program", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(65536))
except OSError:
    pass  # the disk is full
for i in range(40):
    cache.put(i, torch.full((3, 64, 64), i, dtype=torch.uint8))
assert cache.complete() and int(cache.get(39)[2, 63, 63]) == 39
try:
    DecodedImageCache(disk / "more", count=40, size=64)
except OSError as e:
    assert e.errno == 28 and not (disk / "more.pixels").stat().st_size
    print("refused")
"""
    (tmp_path / "script.py").write_text(script)
    _with_a_small_disk(disk, 1, f"{sys.executable} {tmp_path}/script.py > {tmp_path}/out")
    assert (tmp_path / "out").read_text() == "refused\n"


# --- found in review ----------------------------------------------------------------------------

def test_hand_placed_weights_are_never_unpickled(tmp_path, monkeypatch):
    import pickle

    from imgtrain.errors import WeightsUnavailableError
    from imgtrain.models.registry import build_model
    from imgtrain.models.weights import weights_cache_path

    class RunsCode:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("ran",))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weights_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"conv1.weight": RunsCode()}))
    with pytest.raises(WeightsUnavailableError, match="cannot be loaded"):
        build_model("resnet18", 3, pretrained=True)
    assert not (tmp_path / "pwned").exists()


def test_split_never_leaves_an_output_empty_and_refuses_one_path_for_both(tmp_path):
    from imgtrain import split_image_directory
    from imgtrain.errors import InvalidParameterError

    convert_to_image_directory(make_labelled_folder(tmp_path / "src", per_class=4), tmp_path / "all", **QUIET)
    # 3 categories of 4 at 0.9: too few on the second side to stratify, so the designer (and imgtrain) do not
    assert split_image_directory(tmp_path / "all", tmp_path / "a", tmp_path / "b", fraction=0.9) == (10, 2)
    convert_to_image_directory(make_labelled_folder(tmp_path / "two", per_class=1, classes=("dark", "bright")),
                               tmp_path / "two-images", **QUIET)
    for fraction in (0.1, 0.5, 0.9):  # two one-image categories: one image each side
        assert split_image_directory(tmp_path / "two-images", tmp_path / f"a{fraction}", tmp_path / f"b{fraction}",
                                     fraction=fraction) == (1, 1)
    with pytest.raises(InvalidParameterError, match="must be two separate directories, neither inside the other"):
        split_image_directory(tmp_path / "all", tmp_path / "same", tmp_path / "same", fraction=0.5)
    assert not (tmp_path / "same").exists()


def test_links_inside_an_archive_keep_their_images(tmp_path, labelled_folder):
    def add(tf):
        tf.add(labelled_folder, arcname="data")
        info = tarfile.TarInfo("data/dark/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "000.png"
        tf.addfile(info)
    archive = _tar_with(tmp_path, "links.tar", add)
    result = convert_to_image_directory(archive, tmp_path / "out", **QUIET)
    assert result.num_images == 37 and not result.skipped
    assert all(p.is_file() and not p.is_symlink() for p in (tmp_path / "out" / "image").iterdir())


def test_all_training_images_bad_is_an_error(tmp_path, image_dirs):
    shutil.copytree(image_dirs["train"], tmp_path / "train")
    for f in (tmp_path / "train" / "image").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(InvalidDatasetError, match="no training image of .* could be decoded"):
        train_pytorch_model(image_dirs["untrained"], tmp_path / "train", image_dirs["val"], tmp_path / "m",
                            **TRAIN, **QUIET)
    assert not (tmp_path / "m").exists()


def test_sixteen_bit_and_keyed_transparency(tmp_path):
    for value in (200, 300, 60000):
        Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(tmp_path / f"{value}.png")
        assert load_rgb(tmp_path / f"{value}.png").getpixel((0, 0))[0] == round(value / 257)
    keyed = Image.new("RGB", (4, 4), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)
    keyed.save(tmp_path / "keyed.png", transparency=(10, 20, 30))
    assert load_rgb(tmp_path / "keyed.png").getpixel((0, 0)) == (255, 255, 255)
    # 16-bit greyscale keyed at 16 bits (its transparent pixels kept their grey, black for a key of 0)
    grey = np.full((4, 4), 40000, dtype=np.uint16)
    grey[0, 0] = 40001  # the same 8 bits as the key, but not it
    Image.fromarray(grey).save(tmp_path / "keyed16.png", transparency=40000)
    picture = load_rgb(tmp_path / "keyed16.png")
    assert picture.getpixel((1, 1)) == (255, 255, 255) and picture.getpixel((0, 0)) == (156, 156, 156)


def test_a_negative_seed_is_taken_modulo_2_to_the_32(tmp_path, image_dirs):
    """The designer takes any integer as a seed, and so does imgtrain (the README says so; this page listed a
    negative seed among the errors): -1 is 4294967295, in split and in training alike."""
    for seed in ("-1", "4294967295", "1"):
        run_cli("split", image_dirs["all"], "--fraction", "0.5", "--random-seed", seed, "--output-a",
                tmp_path / f"a{seed}", "--output-b", tmp_path / f"b{seed}")
    for seed in (-1, 2**32 - 1):
        train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"], tmp_path / f"m{seed}",
                            random_seed=seed, **{**TRAIN, "epochs": 1}, **QUIET)
    split = {seed: (tmp_path / f"a{seed}" / "images.lst").read_bytes() for seed in ("-1", "4294967295", "1")}
    assert split["-1"] == split["4294967295"] != split["1"]
    assert (tmp_path / "m-1" / "model.safetensors").read_bytes() == \
        (tmp_path / "m4294967295" / "model.safetensors").read_bytes()
    # What the README and this page say of it
    readme = " ".join((DOCS.parents[1] / "README.md").read_text().split())
    assert "the seed is any integer, taken modulo 2**32" in readme
    rows = [row for row in DOCS.read_text().splitlines() if "negative" in row and "seed" in row]
    assert len(rows) == 1 and rows[0].startswith("| a negative `--random-seed` ") and "| taken modulo 2**32" in rows[0]


def test_more_user_errors_are_one_line(tmp_path, image_dirs, trained_model, cli_in_process):
    long_name = tmp_path / ("x" * 300)
    encrypted = tmp_path / "locked.zip"
    with zipfile.ZipFile(encrypted, "w") as zf:
        zf.writestr("cat/a.png", b"x")
    data = bytearray(encrypted.read_bytes())
    data[6] |= 1  # the general-purpose flag: encrypted
    data[data.rfind(b"PK\x01\x02") + 8] |= 1
    encrypted.write_bytes(bytes(data))
    scored = tmp_path / "scored"
    scored.mkdir()
    (scored / "scored.csv").write_text("image,category,Scored Probabilities_$5_to_$10,Scored Labels\n"
                                       "a.png,$5_to_$10,1.0,$5_to_$10\n")
    for args, start in [
        (["convert-to-image-directory", image_dirs["train"], "--output", long_name], "error: OSError"),
        (["convert-to-image-directory", encrypted, "--output", tmp_path / "o"], "error: InvalidDatasetError"),
        (["train-pytorch-model", "--untrained-model", image_dirs["untrained"], "--training-data", image_dirs["train"],
          "--validation-data", image_dirs["val"], "--output", tmp_path / "t", "--learning-rate", "inf"],
         "error: NotInRangeValueError: parameter --learning-rate is inf, allowed: (0, inf)"),
        (["score-image-model", "--trained-model", trained_model, "--dataset", image_dirs["val"], "--output",
          tmp_path / "s", "--num-workers", "-1"], "error: NotInRangeValueError: parameter --num-workers"),
    ]:
        # the commands that import torch run by their main() here; the others each in a process of its own
        r = cli_in_process(*args) if args[0] in ("train-pytorch-model", "score-image-model") else \
            run_cli(*args, check=False)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(start), r.stderr
        assert "Traceback" not in r.stderr
    metrics = run_cli("evaluate-model", "--scored-dataset", scored, "--output", tmp_path / "e")
    assert "Accuracy 100.00%" in metrics.stdout
    with open(scored / "scored.csv", "a") as f:
        f.write("b.png,$5_to_$10\n")
    r = run_cli("evaluate-model", "--scored-dataset", scored, "--output", tmp_path / "e2", check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: InvalidDatasetError: {scored / 'scored.csv'}: data row 2 has fewer fields than the header. "
        "pass the output of `imgtrain score-image-model` or of the designer's Score Model")
    for output in (".", "/"):
        r = run_cli("convert-to-image-directory", image_dirs["train"], "--output", output, check=False)
        assert r.returncode == 1 and r.stderr.startswith("error: OutputNotWritableError: the output "), r.stderr
    assert oct((trained_model / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
