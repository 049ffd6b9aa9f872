"""The `serve` section: `imgtrain serve` under 1, 8 and 32 concurrent clients.

ResNet-18 at 224 px (trained for one epoch on synthetic 400 x 300 JPEG photos), each request one JPEG
posted raw to /predictions/NAME over a kept-alive connection. Measured side by side in one run:

- the bare in-process call: decoding and preparing one image, and the network on it, in this process
  (no HTTP), the floor the server's single-client latency is held to;
- the server with its defaults (dynamic batching: up to 16 images, waiting up to 5 ms while other
  requests are being decoded);
- the same server one request at a time (``--max-batch-size 1``): the baseline batching must beat.

Throughput is answered requests per second over the run; latencies are per request, from sending it to
having read its answer. Clients are threads of this process, on the same cores as the server.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import fixtures
from context import Context
from measure import Section, table

CLIENTS = (1, 8, 32)
PHOTOS = 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, ctx: Context, model: Path, *args: str) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen([ctx.python, "-m", "imgtrain", "serve", str(model), "--port", str(self.port),
                                         "--name", "bench", *args], env=ctx.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not start: {self.process.stderr.read() if self.process.poll() else ''}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=60)


def _load(port: int, blobs: list[bytes], clients: int, seconds: float) -> tuple[float, list[float], int]:
    """``clients`` threads posting images for ``seconds``: (requests per second, latencies, failures)."""
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
            connection.request("POST", "/predictions/bench", blobs[n % len(blobs)], {"Content-Type": "image/jpeg"})
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


def _bare(model: Path, photos: Path, repeats: int) -> tuple[float, float]:
    """In this process: median seconds for (decode + prepare + network on one image, the network alone)."""
    script = f"""
import json, statistics, time, torch, imgtrain
from pathlib import Path
from imgtrain import load_trained_model
from imgtrain.data.decode import decode_rgb
from imgtrain.data.transforms import Normalize
m = load_trained_model({str(model)!r})
net = m.network.to(memory_format=torch.channels_last).eval()
norm = Normalize(m.spec.input.mean, m.spec.input.std)
blobs = [p.read_bytes() for p in sorted(Path({str(photos)!r}).rglob('*.jpg'))][:{PHOTOS}]
torch.set_flush_denormal(True)
whole, alone = [], []
with torch.inference_mode():
    for i in range({repeats}):
        t0 = time.perf_counter()
        x = m.preparation(decode_rgb(blobs[i % len(blobs)], 'bench', draft_size=m.preparation.draft_size))[None]
        t1 = time.perf_counter()
        net(norm(x)).softmax(dim=1).numpy()
        t2 = time.perf_counter()
        if i >= 3:
            whole.append(t2 - t0); alone.append(t2 - t1)
print(json.dumps([statistics.median(whole), statistics.median(alone)]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    import json

    whole, alone = json.loads(out.stdout.strip().splitlines()[-1])
    return whole, alone


def serving(ctx: Context) -> Section:
    quick = ctx.config.quick
    seconds = 3.0 if quick else 15.0
    photos = fixtures.photo_folder(ctx.cache, PHOTOS)
    root = ctx.work / "serve"
    if not (root / "model").exists():
        ctx.imgtrain("convert-to-image-directory", photos, "--output", root / "all", "--overwrite")
        ctx.imgtrain("split-image-directory", root / "all", "--fraction", "0.75", "--output-a", root / "train",
                     "--output-b", root / "val", "--overwrite")
        ctx.imgtrain("train-pytorch-model", "--untrained-model", ctx.untrained("resnet18"), "--training-data",
                     root / "train", "--validation-data", root / "val", "--output", root / "model", "--epochs", 1,
                     "--image-size", 224, "--overwrite")
    blobs = [p.read_bytes() for p in sorted(photos.rglob("*.jpg"))][:PHOTOS]
    whole, alone = _bare(root / "model", photos, 20 if quick else 60)
    ctx.log(f"[serve] bare call: {whole * 1000:.1f} ms (network {alone * 1000:.1f} ms)")
    results: dict[tuple[str, int], tuple[float, list[float], int]] = {}
    for label, args in (("dynamic batching (defaults)", ()), ("one request at a time", ("--max-batch-size", "1"))):
        server = _Server(ctx, root / "model", *args)
        try:
            _load(server.port, blobs, 4, 1.0)  # warm up
            for clients in CLIENTS:
                results[label, clients] = _load(server.port, blobs, clients, seconds)
                rate, latencies, failed = results[label, clients]
                ctx.log(f"[serve] {label}, {clients} clients: {rate:.1f} req/s, p50 "
                        f"{statistics.median(latencies) * 1000:.0f} ms, {failed} failed")
        finally:
            server.stop()
    baseline_one = results["one request at a time", 1][0]
    rows = []
    for (label, clients), (rate, latencies, failed) in results.items():
        rows.append([label, clients, f"{rate:.1f}", f"{rate / baseline_one:.2f}x",
                     f"{statistics.median(latencies) * 1000:.0f}", f"{_percentile(latencies, 0.99) * 1000:.0f}",
                     failed])
    batched_32 = results["dynamic batching (defaults)", 32][0]
    unbatched_32 = results["one request at a time", 32][0]
    single = statistics.median(results["dynamic batching (defaults)", 1][1])
    summary = (f"At 32 clients, dynamic batching answers **{batched_32 / baseline_one:.2f}x** the requests per second "
               f"of one client served one request at a time, and {batched_32 / unbatched_32:.2f}x the unbatched "
               f"server under the same 32 clients. At 1 client the median latency is {single * 1000:.1f} ms against "
               f"{whole * 1000:.1f} ms for the bare in-process call with decoding ({single / whole:.2f}x; the network "
               f"alone {alone * 1000:.1f} ms).")
    return Section("Serving: `imgtrain serve` under concurrent clients", [
        f"ResNet-18 at 224 px, each request one 400 x 300 JPEG posted raw to `/predictions/NAME` over a kept-alive "
        f"connection, {seconds:g} s per row; clients are threads of the benchmark process on the same cores.",
        table(["server", "clients", "requests/s", "vs 1 client, one at a time", "p50 ms", "p99 ms", "failed"], rows),
        table(["bare in-process call", "ms"], [["decode + prepare + network, one image", f"{whole * 1000:.1f}"],
                                              ["network alone, one image", f"{alone * 1000:.1f}"]]),
        summary,
    ])
