"""The fast paths change speed, never results: cache, precision, augmentation, JPEG draft decoding."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain import load_trained_model, train_pytorch_model
from imgtrain.data.cache import DecodedImageCache
from imgtrain.data.decode import load_rgb
from imgtrain.data.transforms import Augmentation, build_augmentation
from imgtrain.precision import resolve_precision

QUIET = {"log": lambda m: None}
TRAIN = {"epochs": 2, "batch_size": 8, "image_size": 32}


@pytest.mark.parametrize("fallocate", [True, False], ids=["reserved", "sparse (macOS, Windows)"])
def test_cache_stores_prepared_images_and_bad_files(tmp_path, monkeypatch, fallocate):
    if not fallocate:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    cache = DecodedImageCache(tmp_path / "c", count=3, size=4)
    assert cache.get(0) is None and not cache.complete()
    image = torch.arange(48, dtype=torch.uint8).view(3, 4, 4)
    cache.put(0, image)
    cache.put(1, None)  # a file that cannot be decoded
    again = DecodedImageCache(tmp_path / "c", count=3, size=4)  # another process opening the same files
    assert torch.equal(again.get(0), image) and again.get(1) is False and again.get(2) is None
    again.put(2, image)
    assert cache.complete()
    cache.remove()
    assert not list(tmp_path.iterdir())


def test_cache_changes_no_result(two_epoch_run):
    runs = [two_epoch_run(cache=cache, num_workers=workers) for cache, workers in ((True, 2), (False, 0))]
    weights = [(r.output / "model.safetensors").read_bytes() for r in runs]
    assert weights[0] == weights[1]
    assert not [f for r in runs for f in r.output.parent.glob(".imgtrain-*")]  # the cache went with the work folder


def test_a_cpu_run_fills_the_cache_first_on_every_core(tmp_path, image_dirs):
    """fill_cache decodes every image the cache lacks with worker processes: afterwards the cache is complete, holds
    what decoding gives, and knows a bad file as bad (the first epoch then names it, as it did)."""
    from imgtrain.data.dataset import ImageDataset
    from imgtrain.data.loading import fill_cache
    from imgtrain.data.transforms import Preparation
    from imgtrain.directories.image_directory import ImageDirectory

    images = ImageDirectory.load(image_dirs["train"])
    paths = [images.path(i) for i in range(len(images))]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    paths.append(tmp_path / "bad.png")
    cache = DecodedImageCache(tmp_path / "c", count=len(paths), size=32)
    dataset = ImageDataset(paths, None, 32, cache=cache)
    said: list[str] = []
    fill_cache(dataset, 2, said.append, "training images")
    assert said == [f"decoding {len(paths)} training images into the cache with 2 processes"]
    assert cache.complete() and cache.get(len(paths) - 1) is False
    assert all(torch.equal(cache.get(i), Preparation(32).load(str(p))) for i, p in enumerate(paths[:-1]))
    fill_cache(dataset, 2, said.append, "training images")  # a resumed run: nothing left to decode, nothing said
    assert len(said) == 1


def test_precision_choices(tmp_path, image_dirs):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("fp16", cpu) == "fp16"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    d = image_dirs
    for precision in ("fp16", "fp32"):  # fp16 runs the GPU's loss-scaling path, here on the CPU
        result = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / precision, precision=precision,
                                     num_workers=0, **{**TRAIN, "epochs": 1}, **QUIET)
        spec = load_trained_model(result.output).spec
        assert spec.training["precision"] == precision
        assert np.isfinite(result.best_validation_loss)


def test_auto_precision_is_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    """V100 and T4 emulate bf16 (torch.cuda.is_bf16_supported() says yes by default): fp16 with loss scaling
    there; bf16 from Ampere on. And the GPU asked is the run's, not torch's current device."""
    from types import SimpleNamespace

    from imgtrain.precision import Gpu, auto_precision

    for name, capability, expected in [("Tesla V100-SXM2-32GB", (7, 0), "fp16"), ("Tesla T4", (7, 5), "fp16"),
                                       ("Quadro RTX 8000", (7, 5), "fp16"), ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"),
                                       ("NVIDIA GeForce RTX 3090", (8, 6), "bf16"), ("NVIDIA L4", (8, 9), "bf16"),
                                       ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"), ("NVIDIA B200", (10, 0), "bf16")]:
        assert auto_precision(Gpu(name, capability)) == expected, name
    assert auto_precision(Gpu("AMD Instinct MI250X", (9, 0), rocm=True)) == "bf16"
    # A machine with an A100 as cuda:0 and a T4 as cuda:1, and what torch answers about them
    gpus = [SimpleNamespace(name="NVIDIA A100-SXM4-80GB", major=8, minor=0),
            SimpleNamespace(name="Tesla T4", major=7, minor=5)]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # of cuda:0
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp16"
    assert resolve_precision("auto", torch.device("cuda", 0)) == resolve_precision("auto", torch.device("cuda")) == (
        "bf16")
    assert resolve_precision("fp32", torch.device("cuda", 1)) == "fp32"
    gpus.reverse()  # after torch.cuda.set_device(1), or with the T4 first: "cuda" is the current GPU
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_augmentation_shifts_and_flips_only_when_asked():
    x = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 32)
    shift = build_augmentation(32, "shift")
    outs = [shift(x, random.Random(seed)) for seed in range(20)]
    assert all(o.shape == x.shape and o.dtype == torch.uint8 for o in outs)
    assert torch.equal(shift(x, random.Random(3)), outs[3])  # a pure function of the seed
    assert sum(torch.equal(o, x) for o in outs) < 5  # usually moved
    for o in outs:  # moved by at most 2 px (32 / 16), never flipped
        assert any(torch.equal(o[:, 2:-2, 2:-2], x[:, 2 - dy:30 - dy, 2 - dx:30 - dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    flip = Augmentation(32, "shift-flip")
    flipped = [flip(x, random.Random(seed)) for seed in range(20)]
    assert any(torch.equal(o[:, 2:-2, 2:-2], x.flip(2)[:, 2 - dy:30 - dy, 2 - dx:30 - dx])
               for o in flipped for dy in range(-2, 3) for dx in range(-2, 3))
    assert build_augmentation(32, "none") is None


def test_large_jpegs_decode_at_reduced_scale(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    full, draft = load_rgb(tmp_path / "big.jpg"), load_rgb(tmp_path / "big.jpg", draft_size=224)
    assert full.size == (1600, 1200)
    assert draft.size == (400, 300) and min(draft.size) >= 224  # 1/4 scale, still larger than the target


@pytest.mark.parametrize("workers", [0, 2])
def test_data_wait_is_measured(two_epoch_run, workers):
    result = two_epoch_run(cache=True, num_workers=workers)
    assert len(result.history) == 2 and all(0 <= m.data_wait_fraction < 1 for m in result.history)


def test_denormals_are_flushed_in_every_thread_torch_computes_with():
    """The flag is per thread, and OpenMP's workers, made at torch's first parallel work, do not take it from
    the thread that sets it later: before, training and scoring flushed denormals in half of every operation."""
    import sklearn.metrics  # noqa: F401  (its wheel's own libgomp, loaded beside torch's, as in an evaluation)

    from imgtrain.precision import denormals_flushed

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a team of two, whatever the cores: each thread gets half of the work below
    try:
        tiny = torch.from_numpy(np.full(2_000_000, 1e-39, dtype=np.float32))  # denormal
        tiny.mul(0.5)  # the workers exist before the flag is set, as in a run
        with denormals_flushed():
            inside = tiny.mul(0.5)
        outside = tiny.mul(0.5)
    finally:
        torch.set_num_threads(before)
    assert int((inside == 0).sum()) == len(tiny)  # flushed in every thread
    assert int((outside == 0).sum()) == 0  # and set back afterwards


def test_ctrl_c_or_sigterm_while_the_flag_is_set_is_not_swallowed():
    """The flag is set through a ctypes callback, which printed an exception raised in it and went on: Ctrl-C or
    SIGTERM, raised by its handler inside the callback, was lost (or printed as 'Exception ignored on calling
    ctypes callback function')."""
    import threading

    from imgtrain.precision import _in_every_openmp_thread
    from imgtrain.process import Terminated

    def interrupted() -> None:
        if threading.current_thread() is threading.main_thread():
            raise Terminated  # what the SIGTERM handler raises when the signal comes during the call

    with pytest.raises(Terminated):
        _in_every_openmp_thread(interrupted)


_FAULTS_OF_LARGE_BUFFERS = """
import resource, sys
import torch
if sys.argv[1] != "plain":
    from imgtrain import predict
    from imgtrain.allocator import reuse_large_blocks
    if sys.argv[1] == "predict":  # as scoring on the CPU sets it up
        predict(sys.argv[2], sys.argv[3], device="cpu")
    else:
        print(reuse_large_blocks(), file=sys.stderr)
faults = []
for _ in range(6):  # a 48 MiB activation made and freed, as each inference pass does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="glibc's malloc: Linux")
def test_scoring_reuses_large_blocks_instead_of_faulting_in_fresh_pages(trained_model, image_dirs):
    """allocator.py: by default glibc maps a 48 MiB block afresh at each allocation (about 12,000 pages faulted
    in and zeroed each time); once scoring on the CPU has set malloc up, the block is reused."""
    import subprocess
    import sys

    from imgtrain.directories.image_directory import ImageDirectory

    image = ImageDirectory.load(image_dirs["val"]).path(0)

    def faults(how: str, env: dict | None = None) -> int:
        r = subprocess.run([sys.executable, "-c", _FAULTS_OF_LARGE_BUFFERS, how, str(trained_model), str(image)],
                           capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
        return int(r.stdout)

    pages = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert faults("plain") > pages  # four allocations, each faulting in most of its pages
    assert faults("predict") < pages // 10
    # a setting of one's own wins: imgtrain leaves malloc alone
    assert faults("set", {"MALLOC_MMAP_THRESHOLD_": "131072"}) > pages
