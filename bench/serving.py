"""The `serve` section: `imgtrain serve` under 1, 8 and 32 concurrent clients.

ResNet-18 at 224 px (trained for one epoch on synthetic 400 x 300 JPEG photos), each request one JPEG
posted raw to /predictions/NAME over a kept-alive connection. Measured side by side in one run:

- the bare in-process call: decoding and preparing one image, and the network on it, in a Python
  process set up as the server's is, on its device and in its precision (no HTTP), the floor the server's
  single-client latency is held to, alternated call by call with one client's requests so that both meet
  the same machine; and the network alone at batch sizes 1 and 16, an image, which bounds what batching buys;
- the server with its defaults (dynamic batching: up to 16 images, waiting up to 5 ms while other
  requests are being decoded);
- the same server one request at a time (``--max-batch-size 1``): the baseline batching must beat.

Throughput is answered requests per second over the run; latencies are per request, from sending it to
having read its answer. Clients are threads of this process, on the same cores as the server.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import fixtures
from context import Context
from measure import REPO, Section, table
from responsiveness import Code, codes

CLIENTS = (1, 8, 32)
PHOTOS = 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server process on a free port, ready once ``ready`` answers 200: `imgtrain serve` on the model, with
    ``args``, or any ``command`` (where PORT stands for the port), in a process group of its own."""

    def __init__(self, ctx: Context, code: Code, model: Path, *args: str, command: list[str] | None = None,
                 ready: str = "/v2/health/ready", env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        if command is None:
            command = [ctx.python, "-m", "imgtrain", "serve", str(model), "--port", "PORT", "--name", "bench", *args]
        # Its output goes to a file (a pipe left unread could fill and stop it), read by name (reading through the
        # file object would move the offset the server writes at).
        with tempfile.NamedTemporaryFile("w", prefix="imgtrain-bench-server-", suffix=".log", delete=False) as log:
            self.log = Path(log.name)
            self.process = subprocess.Popen([str(self.port) if c == "PORT" else c for c in command],
                                            env=env or code.env(ctx), cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", ready)
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start: {self.stop()[-3000:]}")

    def output(self) -> str:
        """What it has written so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        """SIGTERM to the server and every process it started (they share its process group), SIGKILL to what
        is left after 60 s; what it wrote."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # what is left of the group (LitServe's workers)
        except ProcessLookupError:
            pass
        self.process.wait()
        text = self.output()
        self.log.unlink(missing_ok=True)
        return text


def _load(port: int, blobs: list[bytes], clients: int, seconds: float, path: str = "/predictions/bench",
          content_type: str = "image/jpeg") -> tuple[float, list[float], int]:
    """``clients`` threads posting ``blobs`` (request bodies: by default raw JPEG images) to ``path`` for
    ``seconds``: (requests per second, latencies, failures)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start.wait()
        n = k
        while time.monotonic() < stop_at[0]:
            sent = time.perf_counter()
            connection.request("POST", path, blobs[n % len(blobs)], {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            latencies[k].append(time.perf_counter() - sent)
            failures[k] += response.status != 200
            n += clients
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    stop_at.append(began + seconds)
    start.wait()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    every = [x for per in latencies for x in per]
    return len(every) / took, every, sum(failures)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


_BARE = """
import statistics, sys, time
import imgtrain  # first, as in the server: it shortens OpenMP's spin-wait before torch starts
import numpy as np
import torch
from pathlib import Path
from imgtrain import load_trained_model
from imgtrain.data.decode import decode_rgb
from imgtrain.data.transforms import Normalize
from imgtrain.device import resolve_device
from imgtrain.precision import autocast, resolve_precision
torch.set_flush_denormal(True)
loaded = load_trained_model(sys.argv[1])
from imgtrain.allocator import reuse_large_blocks
device = resolve_device('auto')  # as the server, at its defaults
precision = resolve_precision('auto', device)
if device.type == 'cpu':
    reuse_large_blocks()
network = loaded.network.to(device, memory_format=torch.channels_last).eval()
normalize = Normalize(loaded.spec.input.mean, loaded.spec.input.std).to(device)
blobs = [Path(p).read_bytes() for p in sys.argv[2:]]
name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
print(f'{name}, precision {precision}', flush=True)

def forward(x):  # from the host's memory to the answer there, as the server runs it
    with torch.inference_mode(), autocast(precision, device):
        return network(normalize(x.to(device))).float().softmax(dim=1).cpu().numpy()

for line in sys.stdin:
    if line.startswith('batches'):  # the network alone, per image, at batch sizes 1 and 16, alternating
        size = loaded.image_size
        x1, x16 = (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8) for n in (1, 16))
        one, sixteen = [], []
        forward(x1), forward(x16)  # each shape's first call prepares its kernels
        for _ in range(int(line.split()[1])):
            for x, times in ((x1, one), (x16, sixteen)):
                t0 = time.perf_counter()
                forward(x)
                times.append((time.perf_counter() - t0) / len(x))
        print(statistics.median(one), statistics.median(sixteen), flush=True)
        continue
    blob = blobs[int(line)]
    t0 = time.perf_counter()
    pixels = loaded.preparation.pixels(decode_rgb(blob, 'bench', draft_size=loaded.preparation.draft_size))
    x = torch.from_numpy(pixels[None].copy()).permute(0, 3, 1, 2)
    t1 = time.perf_counter()
    forward(x)
    t2 = time.perf_counter()
    print(t2 - t0, t2 - t1, flush=True)
"""


def _paired(ctx: Context, port: int, model: Path, photos: list[Path], count: int
            ) -> tuple[str, list[float], list[float], list[float], list[float], list[float]]:
    """One client, alternating call by call with the bare in-process call (in a process of its own, set up as
    the server is, on its device and in its precision) on the same image, so that both meet the same machine:
    (where the network runs, server latencies, bare decode + prepare + network, bare network alone); then the
    bare network's time an image at batch sizes 1 and 16."""
    bare = subprocess.Popen([ctx.python, "-c", _BARE, str(model), *map(str, photos)], env=ctx.env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    served, whole, alone = [], [], []
    where = bare.stdout.readline().strip()
    try:
        for i in range(count + 3):
            k = i % len(photos)
            bare.stdin.write(f"{k}\n")
            bare.stdin.flush()
            both = [float(x) for x in bare.stdout.readline().split()]
            t0 = time.perf_counter()
            connection.request("POST", "/predictions/bench", photos[k].read_bytes(), {"Content-Type": "image/jpeg"})
            connection.getresponse().read()
            if i >= 3:
                served.append(time.perf_counter() - t0)
                whole.append(both[0])
                alone.append(both[1])
        bare.stdin.write(f"batches {max(3, count // 5)}\n")
        bare.stdin.flush()
        one, sixteen = (float(x) for x in bare.stdout.readline().split())
    finally:
        connection.close()
        bare.stdin.close()
        bare.wait(timeout=60)
    return where, served, whole, alone, [one], [sixteen]


def serve_model(ctx: Context) -> tuple[Path, list[Path]]:
    """The served model (made once a run: ResNet-18 at 224 px, one epoch on the photos) and the photos."""
    photos = fixtures.photo_folder(ctx.cache, PHOTOS)
    root = ctx.work / "serve"
    if not (root / "model").exists():
        ctx.imgtrain("convert-to-image-directory", photos, "--output", root / "all", "--overwrite")
        ctx.imgtrain("split-image-directory", root / "all", "--fraction", "0.75", "--output-a", root / "train",
                     "--output-b", root / "val", "--overwrite")
        ctx.imgtrain("train-pytorch-model", "--untrained-model", ctx.untrained("resnet18"), "--training-data",
                     root / "train", "--validation-data", root / "val", "--output", root / "model", "--epochs", 1,
                     "--image-size", 224, "--overwrite")
    return root / "model", sorted(photos.rglob("*.jpg"))[:PHOTOS]


def serving(ctx: Context) -> Section:
    quick = ctx.config.quick
    seconds, reps = (2.0, 1) if quick else (5.0, 3)
    model, files = serve_model(ctx)
    root = model.parent
    blobs = [p.read_bytes() for p in files]
    paired: tuple[list[float], ...] = ([], [], [], [], [])
    where = ""
    # label: (code, arguments, the label of its baseline); with --compare-with, the revision's servers too
    servers: dict[str, tuple[Code, tuple[str, ...], str]] = {}
    for code in codes(ctx):
        suffix = "" if code.src is None else f", {code.name}"
        servers[f"dynamic batching (defaults){suffix}"] = (code, (), f"one request at a time{suffix}")
        servers[f"one request at a time{suffix}"] = (code, ("--max-batch-size", "1"), f"one request at a time{suffix}")
    rates: dict[tuple[str, int], list[float]] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    failures: dict[tuple[str, int], int] = {}
    # The servers wait, loaded, side by side (an idle one takes no CPU); the rows alternate between them
    # and repeat, so that a change in the machine's speed falls on all alike.
    running = {label: _Server(ctx, code, root / "model", *args) for label, (code, args, _) in servers.items()}
    try:
        for server in running.values():
            _load(server.port, blobs, 4, 1.0)  # warm up
        for rep in range(reps):
            where, *measured = _paired(ctx, running["dynamic batching (defaults)"].port, root / "model", files,
                                       10 if quick else 30)
            for pooled, new in zip(paired, measured, strict=True):
                pooled.extend(new)
            order = list(running) if rep % 2 == 0 else list(reversed(running))
            for clients in CLIENTS:
                for label in order:
                    rate, times, failed = _load(running[label].port, blobs, clients, seconds)
                    rates.setdefault((label, clients), []).append(rate)
                    latencies.setdefault((label, clients), []).extend(times)
                    failures[label, clients] = failures.get((label, clients), 0) + failed
                    ctx.log(f"[serve] rep {rep + 1}/{reps} {label}, {clients} clients: {rate:.1f} req/s, p50 "
                            f"{statistics.median(times) * 1000:.0f} ms")
    finally:
        for server in running.values():
            server.stop()
    single, whole, alone, one, sixteen = (statistics.median(values) for values in paired)
    rate = {key: statistics.median(values) for key, values in rates.items()}
    baseline_one = rate["one request at a time", 1]
    rows = [[label, clients, f"{rate[label, clients]:.1f}", f"{rate[label, clients] / rate[servers[label][2], 1]:.2f}x",
             f"{statistics.median(latencies[label, clients]) * 1000:.0f}",
             f"{_percentile(latencies[label, clients], 0.99) * 1000:.0f}", failures[label, clients]]
            for label in servers for clients in CLIENTS]
    batched_32, unbatched_32 = rate["dynamic batching (defaults)", 32], rate["one request at a time", 32]
    summary = (f"At 32 clients, dynamic batching answers **{batched_32 / baseline_one:.2f}x** the requests per second "
               f"of one client served one request at a time, and {batched_32 / unbatched_32:.2f}x the unbatched "
               f"server under the same 32 clients. One client, its requests alternating with the bare in-process "
               f"call on the same images: a median of {single * 1000:.1f} ms a request against {whole * 1000:.1f} ms "
               f"for the bare call with decoding (**{single / whole:.2f}x**; the network alone {alone * 1000:.1f} ms). "
               f"What batching can buy: in-process, the network alone takes {one * 1000:.1f} ms an image at batch "
               f"size 1 and {sixteen * 1000:.1f} at 16 ({one / sixteen:.2f}x); at 32 clients the server answers "
               f"a request every {1000 / batched_32:.1f} ms, decoding and HTTP included.")
    return Section("Serving: `imgtrain serve` under concurrent clients", [
        f"ResNet-18 at 224 px, the network on {where}, each request one 400 x 300 JPEG posted raw to "
        f"`/predictions/NAME` over a kept-alive connection. The servers run side by side; each row is the median "
        f"of {reps} runs of {seconds:g} s, "
        "alternating between the servers; the latencies are pooled over the runs. Clients are threads of the "
        "benchmark process, on the same cores as the server. Each server is compared with its own code's one "
        "client served one request at a time.",
        table(["server", "clients", "requests/s", "vs 1 client, one at a time", "p50 ms", "p99 ms", "failed"], rows),
        table(["one client, alternating call by call", "median ms"],
              [["`imgtrain serve`, one request (HTTP, decoding, network, answer)", f"{single * 1000:.1f}"],
               ["bare in-process call: decode + prepare + network, one image", f"{whole * 1000:.1f}"],
               ["bare in-process call: network alone", f"{alone * 1000:.1f}"],
               ["bare network alone, an image at batch size 1 (random pixels)", f"{one * 1000:.1f}"],
               ["bare network alone, an image at batch size 16 (random pixels)", f"{sixteen * 1000:.1f}"]]),
        summary,
    ])
