"""Numeric precision: bf16 autocast where the hardware runs it natively, fp16 with loss
scaling on GPUs without bf16, fp32 otherwise."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU multiplies bf16 matrices in hardware (Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Gpu:
    """What the precision ``auto`` stands for on a GPU depends on, as torch reports it."""

    name: str
    capability: tuple[int, int]  # CUDA's compute capability: (7, 0) V100, (7, 5) T4, (8, 0) A100, (9, 0) H100
    rocm: bool = False

    @property
    def native_bf16(self) -> bool:
        """Whether the GPU multiplies bf16 matrices in hardware: NVIDIA's from Ampere (8.0) on. Volta and Turing
        only emulate bf16, more slowly than their fp16 tensor cores, yet ``torch.cuda.is_bf16_supported()``
        counts emulation by default. On ROCm, every GPU torch supports has bf16, as torch says."""
        return self.rocm or self.capability >= (8, 0)


def gpu_of(device: torch.device) -> Gpu:
    """The GPU ``device`` names (``cuda`` alone: the current one, which a run on ``cuda`` uses)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return Gpu(properties.name, (properties.major, properties.minor), rocm=bool(torch.version.hip))


def auto_precision(gpu: Gpu) -> str:
    """bf16 where the GPU runs it natively, else fp16 (training scales its loss: torch.amp.GradScaler)."""
    return "bf16" if gpu.native_bf16 else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision ``auto`` stands for on this device: on a GPU, the one the run uses."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return auto_precision(gpu_of(device))
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def denormals_flushed():
    """Flush denormal numbers to zero while training or scoring on the CPU: a nearly converged
    model's tiny gradients otherwise slow steps down up to 50x (measured on ResNet-18). The flag
    belongs to each thread, and OpenMP's worker threads, made at torch's first parallel work (in a
    run, before this), do not take it from the thread that sets it later: it is set here in this
    thread and in each worker torch computes with, and set back to the default (off) afterwards.
    Enter it once the run's thread count is set."""
    _in_every_openmp_thread(lambda: torch.set_flush_denormal(True))
    try:
        yield
    finally:
        _in_every_openmp_thread(lambda: torch.set_flush_denormal(False))


def _in_every_openmp_thread(function) -> None:
    """``function()`` in this thread and in each worker of the OpenMP team torch's parallel work from this
    thread will use (an OpenMP parallel region of that size, through the runtime's ``GOMP_parallel``, which
    libgomp, LLVM's libomp and Intel's all export); in this thread alone where no runtime is found."""
    from imgtrain.threads import torch_default_threads

    found = _openmp_parallel()
    if found is None:
        function()
        return
    parallel, region = found
    stopped: list[BaseException] = []  # Ctrl-C or SIGTERM (raised by its handler) in this thread's call

    def run(_) -> None:
        try:
            function()
        except BaseException as exc:  # ctypes would print it and go on as if nothing had happened
            stopped.append(exc)

    # A team as large as any this process is likely to have made: torch's default, or more where set since.
    parallel(region(run), None, max(torch.get_num_threads(), torch_default_threads()), 0)
    if stopped:
        raise stopped[0]


@functools.cache
def _openmp_parallel():
    """``GOMP_parallel`` of the OpenMP runtime torch computes with, among this process's mapped libraries, and
    the type of the function it runs; or None. Other packages bring their own copies (scikit-learn's wheels a
    libgomp in scikit_learn.libs): torch's own is preferred, then one that no other wheel vendors."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    runtimes = []
    for line in maps:
        fields = line.split(maxsplit=5)
        path = Path(fields[5]) if len(fields) == 6 else None
        if path and path.name.startswith(("libgomp", "libomp", "libiomp5")) and path not in runtimes:
            runtimes.append(path)
    home = Path(torch.__file__).resolve().parent
    runtimes.sort(key=lambda p: (home not in p.resolve().parents, p.parent.name.endswith(".libs")))
    region = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    for path in runtimes:
        try:
            parallel = ctypes.CDLL(str(path)).GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [region, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        return parallel, region
    return None
