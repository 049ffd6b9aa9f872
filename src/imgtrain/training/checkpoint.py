"""Checkpoints for exact resume: everything the next epoch depends on, in one safetensors file.

Tensors (model, optimizer state, torch random states) are safetensors tensors; the rest
(scheduler, early stopping, history, python and numpy random states, the run's
fingerprint) is JSON in the file's metadata. Nothing is pickled. Data order and
augmentation are pure functions of (seed, epoch, image), so they need no saved state.

Torch's generators are kept for every process of the run (``rng/<rank>/cpu``, and
``rng/<rank>/cuda`` for the GPU it computes on): each process draws its own dropout masks
(seeding.seed_rank), and each resumes its own stream. Python's and numpy's are every
process's alike (nothing of a run draws from them after seeding) and kept once.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from imgtrain.directories.atomic import write_safetensors
from imgtrain.directories.files import check_regular, read_bytes
from imgtrain.errors import CheckpointDamagedError, CheckpointMismatchError, option
from imgtrain.models.registry import load_weights
from imgtrain.training.averaging import WeightAverage

CHECKPOINT_FILE = "checkpoint.safetensors"


def fingerprint(parts: dict[str, object]) -> dict[str, str]:
    """A short digest of each named part of a run (parameters, data, model spec)."""
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for name, value in parts.items()}


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(read_bytes(path))
    return h.hexdigest()


def checkpoint_epoch(path: Path) -> int | None:
    """The last epoch a checkpoint holds, or None when it cannot be read."""
    try:
        return int(checkpoint_state(path)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's JSON state (its epoch, the parameters it was made with ...), or {} when it cannot be read."""
    try:
        check_regular(path)
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RecursionError):
        return {}
    return state if isinstance(state, dict) else {}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch generators that a run on ``device`` draws from: the CPU's, and its GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict,
                    rng: list[dict[str, torch.Tensor]], average: WeightAverage | None = None) -> None:
    """Write a checkpoint atomically (temporary file, then rename); ``rng``: every process's
    ``rng_state``, in the order of their ranks; ``average``: the weights' average, if the run keeps one."""
    tensors, metadata = checkpoint_contents(model, optimizer, scheduler, state, rng, average)
    write_safetensors(on_the_cpu(tensors), path, metadata=metadata)


def checkpoint_contents(model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict,
                        rng: list[dict[str, torch.Tensor]], average: WeightAverage | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a checkpoint holds, as safetensors' metadata and tensors: the live ones (the model's, the optimizer's,
    on their device, in their layout), to be copied (``on_the_cpu``, ``BackgroundWriter``) before they are
    written."""
    tensors = {f"model/{k}": v.detach() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"average/{k}": v.detach() for k, v in average.network.state_dict().items()})
        state = {**state, "average_updates": average.updates}
    opt = optimizer.state_dict()
    skeleton: dict = {"param_groups": opt["param_groups"], "state": {}}
    for pid, entries in opt["state"].items():
        skeleton["state"][str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{pid}/{key}"] = value.detach()
                skeleton["state"][str(pid)][key] = None
            else:
                skeleton["state"][str(pid)][key] = value
    for rank, generators in enumerate(rng):
        for name, value in generators.items():
            tensors[f"rng/{rank}/{name}"] = value
    np_state = np.random.get_state()
    meta = {
        **state,
        "optimizer": skeleton,
        "scheduler": scheduler.state_dict(),
        "rng_python": random.getstate(),
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, {"state": json.dumps(meta)}


def on_the_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as safetensors writes them: on the CPU, contiguous (the very tensors where they are so already)."""
    return {name: t.to("cpu").contiguous() for name, t in tensors.items()}


class BackgroundWriter:
    """Writes a run's files in a thread beside the next epoch's steps, one write at a time.

    ``start`` first waits for the write before it, then copies the tensors it is given into buffers kept from
    one write to the next (training goes on changing the live ones; a GPU's are copied to the CPU) and writes
    from the copies. A failed write (a full disk) is raised in the training thread by the next ``wait``: before
    the next epoch's files are written, and before the run's output is published. Tensors of more than ``limit``
    bytes in all are written at once instead: a copy of them would cost that much memory more."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: dict[str, torch.Tensor] = {}
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.failure: BaseException | None = None

    def start(self, write: Callable[[dict[str, torch.Tensor]], None], tensors: dict[str, torch.Tensor]) -> None:
        self.wait()
        if sum(t.numel() * t.element_size() for t in tensors.values()) > self.limit:
            write(on_the_cpu(tensors))
            return
        copies = {name: self._copy(name, tensor) for name, tensor in tensors.items()}

        def run() -> None:
            try:
                write(copies)
            except BaseException as exc:  # raised in the training thread by wait()
                self.failure = exc
            finally:
                self.done.set()

        self.done.clear()
        self.thread = threading.Thread(target=run, name="imgtrain-checkpoint")
        self.thread.start()

    def _copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        kept = self.kept.get(name)
        if kept is None or kept.shape != tensor.shape or kept.dtype != tensor.dtype:
            kept = self.kept[name] = torch.empty_like(tensor, device="cpu", memory_format=torch.contiguous_format)
        return kept.copy_(tensor)

    def wait(self) -> None:
        """Until the write under way is done; raise its failure, if it failed."""
        interrupted: BaseException | None = None
        if self.thread is not None:
            # Not Thread.join: on Python 3.11 a KeyboardInterrupt (Ctrl-C, SIGTERM) inside join() marks the thread
            # as stopped while it still writes, and the interpreter then exits under it. The write is finished
            # first (its epoch's line is out), then the interrupt is raised.
            while True:
                try:
                    self.done.wait()
                    break
                except KeyboardInterrupt as exc:
                    interrupted = exc
            self.thread = None
        failure, self.failure = self.failure, None
        if interrupted is not None:
            raise interrupted
        if failure is not None:
            raise failure


def load_checkpoint(path: Path, run_id: dict[str, str], model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    differences: Callable[[dict], str] = lambda state: "", *,
                    rank: int = 0, device: torch.device | None = None, average: WeightAverage | None = None) -> dict:
    """Restore model, optimizer, scheduler, the weights' ``average`` (if the run keeps one) and random states
    (those of process ``rank``, whose GPU is ``device`` if any); return the JSON state.

    Refuses a checkpoint whose run had other data or parameters, naming which, and what ``differences``
    (given the checkpoint's JSON state) says of them: ': --learning-rate 0.001 then, ... now'.
    """
    try:
        check_regular(path)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            differ = [name for name in run_id if meta["run_id"].get(name) != run_id[name]]
            tensors = {k: f.get_tensor(k) for k in f.keys()} if not differ else {}
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise CheckpointDamagedError(
            f"the checkpoint {path} cannot be read ({type(exc).__name__}: {exc})",
            f"run with {option('restart', True)} to start again") from None
    if differ:
        raise CheckpointMismatchError(
            f"the checkpoint {path} was made with other {' and '.join(differ)}{differences(meta)}",
            f"run with the same data and parameters to resume, or with {option('restart', True)} to start again")
    load_weights(model, {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    if average is not None:
        if "average_updates" not in meta:
            raise CheckpointDamagedError(f"the checkpoint {path} holds no average of the weights",
                                         f"run with {option('restart', True)} to start again")
        load_weights(average.network, {k[len("average/"):]: v for k, v in tensors.items() if k.startswith("average/")})
        average.updates = int(meta.pop("average_updates"))
    skeleton = meta.pop("optimizer")
    opt_state = {"param_groups": skeleton["param_groups"], "state": {}}
    for pid, entries in skeleton["state"].items():
        opt_state["state"][int(pid)] = {
            key: tensors[f"optimizer/{pid}/{key}"] if value is None else value for key, value in entries.items()}
    optimizer.load_state_dict(opt_state)
    # Moments saved contiguous go back in their parameter's layout (channels-last convolutions):
    # fused optimizers must see the same memory layout as the uninterrupted run to match it bit for bit.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    scheduler.load_state_dict(meta.pop("scheduler"))
    _restore_torch_generators(tensors, rank, device)
    py = meta.pop("rng_python")
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta.pop("rng_numpy")
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))
    return meta


def _restore_torch_generators(tensors: dict[str, torch.Tensor], rank: int, device: torch.device | None) -> None:
    if f"rng/{rank}/cpu" in tensors:
        torch.set_rng_state(tensors[f"rng/{rank}/cpu"])
        if device is not None and device.type == "cuda" and f"rng/{rank}/cuda" in tensors:  # none from a CPU run
            torch.cuda.set_rng_state(tensors[f"rng/{rank}/cuda"], device)
        return
    if "rng/torch" not in tensors:
        return  # made by fewer processes: the run refuses it (its world size differs)
    # A checkpoint of an earlier version: rank 0's generators alone, every GPU's of its process
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                              key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
