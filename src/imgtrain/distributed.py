"""Several processes, one run: torch.distributed as torchrun starts it.

torchrun (and SLURM's srun + torchrun, Kubeflow's PyTorchJob, the clouds' PyTorch jobs) sets
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; this module only reads them. There is
no launcher or process-group logic here beyond ``init_process_group``: NCCL with one GPU per
local rank, gloo on CPUs.

What the training loop needs from the other processes fits in a few calls: a barrier, sums over
every rank, and whether this process is the one that writes (rank 0).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from imgtrain import errors
from imgtrain.errors import DistributedRunError, ImgtrainError, InvalidParameterError
from imgtrain.process import die_with_launcher, launched_by_torchrun

T = TypeVar("T")

# A rank that waits longer than this at a collective (a peer stuck, not dead: torchrun ends the job
# when a process dies) stops with an error instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("IMGTRAIN_DIST_TIMEOUT_MINUTES", "30")))


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes: rank 0 of 1 when not under torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None  # None: no process group (one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, *values: torch.Tensor | float | int, device: torch.device | None = None) -> list[float]:
        """Each value summed over every rank (one all-reduce for them all), as Python numbers (float64)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        if self.distributed:
            t = t.to(self.collective_device)
            dist.all_reduce(t)
        return t.tolist()

    @property
    def collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 and hand its answer to every rank, or the named error it raised, so
        that every process stops with the same error; the other ranks wait meanwhile."""
        if not self.distributed:
            return work()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", work())
            except ImgtrainError as exc:
                box[0] = ("error", type(exc).__name__, exc.message, exc.hint)
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            _, name, message, hint = box[0]
            cls = getattr(errors, name, ImgtrainError)
            exc = cls.__new__(cls)
            ImgtrainError.__init__(exc, message, hint)
            raise exc
        return box[0][1]

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced, in place, by its mean over the ranks (in float64, one all-reduce for them all)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.detach().double().reshape(-1) for t in tensors]).to(self.collective_device)
        dist.all_reduce(flat)
        flat /= self.size
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.reshape(t.shape).to(t.device, t.dtype))

    def share_buffers(self, network: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank: before evaluating, every
        process then runs the very network rank 0 saves."""
        if self.distributed:
            for buffer in network.buffers():
                dist.broadcast(buffer, src=0)

    def own_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """Where this process reports what only it sees (the bad images of its share): ``log`` on rank 0,
        stderr with 'rank N: ' in front on the others."""
        if self.is_main:
            return log
        return lambda message: print(f"rank {self.rank}: {message}", file=sys.stderr, flush=True)

    def gather(self, value: T) -> list[T] | None:
        """Rank 0: every rank's ``value``, in the order of the ranks (other ranks: None)."""
        if not self.distributed:
            return [value]
        parts: list | None = [None] * self.size if self.is_main else None
        dist.gather_object(value, parts, dst=0)
        return parts

    def gather_rows(self, indices: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray | None:
        """Rank 0: a ``total``-row array holding every rank's ``rows`` at their ``indices`` (other ranks:
        None). Alone: the rows placed at their indices."""
        parts = self.gather((indices, rows))
        if parts is None:
            return None
        full = np.zeros((total, *rows.shape[1:]), dtype=rows.dtype)
        for where, values in parts:
            full[where] = values
        return full

    def union(self, items: set[int]) -> set[int]:
        """Every rank's ``items`` together, on every rank."""
        if not self.distributed:
            return set(items)
        parts: list = [None] * self.size
        dist.all_gather_object(parts, sorted(items))
        return set().union(*parts)

    @contextlib.contextmanager
    def speaking_for_the_others(self) -> Iterator[None]:
        """A collective that fails because another process died or hangs becomes DistributedRunError
        (the process that failed first prints its own error)."""
        try:
            yield
        except RuntimeError as exc:
            if not (self.distributed and collective_failed(exc)):
                raise
            raise DistributedRunError(
                f"another process of this run stopped or cannot be reached ({first_words(exc)})",
                "the first error above says why; fix that, then run again (training: with --resume, to continue "
                "from the last checkpoint)") from None


ALONE = World()  # one process, no process group


def join_world(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (once per process); outside
    torchrun, the world of one. Under torchrun the group is made even for one process, so that one
    GPU runs NCCL's code path as eight would."""
    if not launched_by_torchrun():
        return ALONE
    die_with_launcher()  # the command line asked already; a script run by torchrun asks here
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InvalidParameterError(
                f"local rank {local_rank} has no GPU of its own: this machine has {torch.cuda.device_count()}",
                "start at most one process per GPU (torchrun --nproc-per-node <= the number of GPUs)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=torch.device("cuda", local_rank) if backend == "nccl" else None)
    return World(rank, size, local_rank, local_size, backend)


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """Under torchrun, ``cuda`` means this process's own GPU: the one numbered by its local rank."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def ddp(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network wrapped for data-parallel training: gradients averaged over the processes in
    backward. Buffers (BatchNorm's running statistics) are not sent at every step; rank 0's are
    shared before each evaluation instead (``World.share_buffers``)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})  # its name before torch 2.12
    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_buffer_sync)


def collective_failed(exc: BaseException) -> bool:
    """Whether an error comes from talking to the other processes (one of them died or hangs), not
    from this process's own work."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo/transport",
                                         "NCCL error", "ProcessGroupNCCL", "Broken pipe"))


def first_words(exc: BaseException) -> str:
    """An error of torch.distributed in a few words: its first sentence, without the source location."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().split("\n")[0])
    return text.split(". ")[0] or type(exc).__name__
