"""The `peer` section: `imgtrain serve` against a peer model server, LitServe, side by side in one run.

The same machine, the same model directory (serving.py's: ResNet-18 at 224 px, trained for one epoch on the
synthetic 400 x 300 JPEG photos), the same images and the same client load (serving.py's ``_load``: threads of
this process, each posting one image a request over a kept-alive connection).

LitServe stays out of imgtrain's dependencies: this section installs it, pinned, into a folder of its own in
the benchmark's cache (``pip install --no-deps --target``), with the packages LitServe requires that imgtrain's
environment lacks, also pinned, and nothing else: torch, numpy, Pillow, FastAPI, Starlette and uvicorn are the
environment's own, for both servers (checked: every package in the folder is one the environment does not
have). The peer's server is bench/peer.py, run with that folder first on PYTHONPATH.

What is measured:

1. Agreement: every image posted to each server, one at a time; the top labels compared, and the largest
   difference between their probabilities.
2. The peer's best setting: a short run of 32 clients for each point of a small sweep of LitServe's knobs
   (``max_batch_size`` 8, 16, 32 x ``batch_timeout`` 5, 10, 50 ms with one inference worker using all the
   cores; LitServe's own default, no batching; then ``workers_per_device`` = the cores, one torch thread
   each, as LitServe's documentation advises on a CPU, at the best batching found and without batching), a
   fresh server for each; the three best run again; the one that answers the most requests a second (the
   median of its runs), none failing, is the one measured. Then, on that server, which of the two ways
   LitServe takes an image (below) answers more.
3. Side by side: LitServe at that setting, `imgtrain serve` at its defaults (``--engine auto`` where its
   ``--help`` lists ``--engine``), and `imgtrain serve` on the model's int8 export (``imgtrain export --int8
   --format openvino``: another file, made from the same model; its speed only, as this one-epoch model's
   accuracy says nothing: the `engines` section measures int8's accuracy on a trained model). 1 and 32
   clients, rows alternating between the servers, repeated; requests/s, p50 and p99 latency, failures. (An
   earlier run had, as a third row, `imgtrain serve` with LitServe's folder on its path, so that its uvicorn
   ran on uvloop and httptools as LitServe's does: 90.4 against 90.2 requests/s at 32 clients, 72.0 against
   69.5 at one: the HTTP stack is not where the time goes; bench/results/2026-12-05-engines.md.)

Requests differ in one way: LitServe 0.2.19 reads a request body as JSON or as a form, never raw, so its
clients send each image as a ``multipart/form-data`` file (field ``content``, its file-upload examples' way)
in the sweep, and in the side-by-side rows as that or as base64 in JSON (its ``ImageInput`` schema's way),
whichever answered more; the bodies are made before the runs. `imgtrain serve`'s clients post the image raw
to ``/predictions/NAME``, its own way.

Not swept: ``num_api_servers`` (LitServe's default, one HTTP server process per inference worker, is kept)
and ``fast_queue``, which LitServe 0.2.19 ignores (bench/peer.py's ``--fast-queue`` says why).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from context import BENCH, Context
from measure import REPO, Section, table
from responsiveness import Code
from serving import _load, _percentile, _Server, serve_model

PEER, PEER_VERSION = "litserve", "0.2.19"
# LitServe 0.2.19 requires fastapi>=0.112, pyzmq>=22.0.0 and uvicorn[standard]>=0.29.0. imgtrain's environment
# has FastAPI, Starlette, uvicorn, python-multipart, python-dotenv and PyYAML; these are the rest, at the
# versions pip resolved for litserve==0.2.19 (pip install --target, with its dependencies) on 2026-12-05.
PEER_EXTRAS = ("pyzmq==27.3.0", "uvloop==0.23.0", "httptools==0.9.0", "websockets==17.4", "watchfiles==1.3.0")
CLIENTS = (1, 32)
BOUNDARY = "imgtrain-bench-7d1f0c"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
PEER_PATH = "/predict"
BODIES = {"form": "a multipart form's file", "json": "base64 in JSON"}
# The sweep's grid (max_batch_size, batch_timeout in s), the seconds of each sweep run and of each side-by-side
# row, the side-by-side repetitions, the images: a full run, and --quick's smoke run.
FULL = {"batches": (8, 16, 32), "timeouts": (0.005, 0.01, 0.05), "sweep_seconds": 4.0, "seconds": 5.0, "reps": 3,
        "images": 48}
QUICK = {"batches": (8, 32), "timeouts": (0.01,), "sweep_seconds": 1.5, "seconds": 2.0, "reps": 1, "images": 12}


def install_peer(ctx: Context) -> Path:
    """LitServe, pinned, in a folder of its own in the cache; CalledProcessError where pip fails."""
    return install_pinned(ctx, PEER, PEER_VERSION, PEER_EXTRAS, "[peer]")


def install_pinned(ctx: Context, name: str, version: str, extras: tuple[str, ...], tag: str) -> Path:
    """``name==version`` and ``extras`` (pinned requirements), without their dependencies, in the folder
    ``<cache>/<name>-<version>`` (installed once, by the environment's pip, from its package index; ``tag``
    starts the log line); CalledProcessError where pip fails."""
    folder = ctx.cache / f"{name}-{version}"
    if not (folder / ".complete").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        ctx.log(f"{tag} installing {name}=={version} into {folder}")
        subprocess.run([ctx.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet",
                        "--no-deps", "--target", str(partial), f"{name}=={version}", *extras],
                       check=True, env=ctx.env, stdin=subprocess.DEVNULL)
        (partial / ".complete").touch()
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder


_SHADOWED = """
import importlib.util, json, sys
from pathlib import Path
folder = Path(sys.argv[1])
modules = sorted({p.name.split('.')[0] for p in folder.iterdir() if not p.name.endswith(('.dist-info', '.libs'))
                  and p.name not in ('bin', '__pycache__', '.complete')})  # packages, modules, extensions
print(json.dumps([name for name in modules if importlib.util.find_spec(name) is not None]))
"""


def shadowed(ctx: Context, folder: Path) -> list[str]:
    """The top-level modules of ``folder`` that the environment has too (looked up without the folder on the
    path): those the folder would replace when put first on PYTHONPATH."""
    found = subprocess.run([ctx.python, "-c", _SHADOWED, str(folder)], env=ctx.env, capture_output=True, text=True,
                           check=True)
    return json.loads(found.stdout)


_CHECK = """
import importlib, importlib.metadata as md, importlib.util, json, sys
from pathlib import Path
folder = Path(sys.argv[1]).resolve()
found = [p.name.split('-')[0] for p in folder.glob('*.dist-info')]
modules = sorted({p.name.split('.')[0] for p in folder.iterdir() if not p.name.endswith(('.dist-info', '.libs'))
                  and p.name not in ('bin', '__pycache__', '.complete')})  # packages, modules, extensions
shadowing = [name for name in modules if importlib.util.find_spec(name) is not None]
sys.path.insert(0, str(folder))
versions = {}
for dist in ('litserve', 'fastapi', 'starlette', 'uvicorn', 'uvloop', 'httptools', 'pyzmq', 'python-multipart',
             'torch', 'numpy', 'pillow'):
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = None
outside = {}
for module in ('torch', 'numpy', 'PIL', 'fastapi', 'starlette', 'uvicorn'):
    spec = importlib.util.find_spec(module)
    outside[module] = spec is not None and folder not in Path(spec.origin).resolve().parents
print(json.dumps({'installed': found, 'modules': modules, 'shadowing': shadowing, 'versions': versions,
                  'outside': outside}))
"""


def check_peer(ctx: Context, folder: Path) -> dict:
    """The folder's packages shadow none of the environment's (run with the folder out of the path, then in):
    versions of what both servers run on."""
    checked = subprocess.run([ctx.python, "-c", _CHECK, str(folder)], env=ctx.env, capture_output=True, text=True)
    if checked.returncode != 0:
        raise RuntimeError(f"checking {folder} failed: {checked.stderr[-2000:]}")
    found = json.loads(checked.stdout)
    if found["shadowing"]:
        raise RuntimeError(f"{folder} holds {', '.join(found['shadowing'])}, which the environment has too: it "
                           f"would replace them for the peer; remove the folder and install with --no-deps")
    if not all(found["outside"].values()):
        raise RuntimeError(f"the peer would import {found['outside']} from {folder}")
    return found


def _form(blob: bytes) -> bytes:
    """One JPEG as a multipart form's file in field ``content``, as LitServe's file-upload examples send it."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"image.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + blob + f"\r\n--{BOUNDARY}--\r\n".encode()


def _peer_bodies(blobs: list[bytes]) -> dict[str, tuple[list[bytes], str]]:
    """The images as the peer's clients send them, each way it takes: (request bodies, content type)."""
    return {"form": ([_form(b) for b in blobs], FORM),
            "json": ([json.dumps({"image": base64.b64encode(b).decode()}).encode() for b in blobs],
                     "application/json")}


def _engine_args(ctx: Context, code: Code) -> tuple[str, ...]:
    """``--engine auto`` where this imgtrain's serve has the option, else nothing (its defaults)."""
    shown = subprocess.run([ctx.python, "-m", "imgtrain", "serve", "--help"], env=code.env(ctx), cwd=REPO,
                           capture_output=True, text=True).stdout
    return ("--engine", "auto") if "--engine" in shown else ()


def _peer_env(ctx: Context, code: Code, folder: Path) -> dict[str, str]:
    env = code.env(ctx)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return env


def _setting_args(setting: tuple[int, float, int]) -> list[str]:
    batch, timeout, workers = setting
    return ["--max-batch-size", str(batch), "--batch-timeout", f"{timeout:g}", "--workers-per-device", str(workers)]


def _describe(setting: tuple[int, float, int], cores: int) -> str:
    batch, timeout, workers = setting
    threads = max(1, cores // workers)
    return (f"max_batch_size {batch}, batch_timeout {timeout * 1000:g} ms, workers_per_device {workers} "
            f"({threads} torch thread{'s' if threads != 1 else ''} each)")


def _ask(port: int, path: str, body: bytes, content_type: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type})
        response = connection.getresponse()
        text = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {text[:300]!r}")
        return json.loads(text)
    finally:
        connection.close()


def _agreement(imgtrain_port: int, peer_port: int, blobs: list[bytes], bodies: list[bytes], kind: str
               ) -> tuple[int, int, float, int]:
    """Each image asked of both, one at a time (the peer: ``bodies`` of content type ``kind``): (images, same
    top label, largest probability difference, distinct labels answered)."""
    same, largest, labels = 0, 0.0, set()
    for blob, body in zip(blobs, bodies, strict=True):
        ours = _ask(imgtrain_port, "/predictions/bench", blob, "image/jpeg")
        theirs = _ask(peer_port, PEER_PATH, body, kind)
        same += ours["label"] == theirs["label"]
        labels.add(ours["label"])
        largest = max(largest, *(abs(p - theirs["probabilities"][k]) for k, p in ours["probabilities"].items()))
    return len(blobs), same, largest, len(labels)


def _line(output: str, start: str) -> str:
    return next((line.strip() for line in output.splitlines() if line.startswith(start)), "?")


def peer(ctx: Context) -> Section:
    quick = ctx.config.quick
    sizes = QUICK if quick else FULL
    sweep_seconds, seconds, reps = sizes["sweep_seconds"], sizes["seconds"], sizes["reps"]
    try:
        folder = install_peer(ctx)
    except subprocess.CalledProcessError as exc:  # no package index here: the other sections go on
        return Section(f"Peer: not available: `pip install {PEER}=={PEER_VERSION}` failed (exit code "
                       f"{exc.returncode}; its output is above)", [])
    found = check_peer(ctx, folder)
    versions = found["versions"]
    model, files = serve_model(ctx)
    files = files[:sizes["images"]]
    blobs = [p.read_bytes() for p in files]
    peer_bodies = _peer_bodies(blobs)
    forms = peer_bodies["form"][0]
    code = Code("new", None)
    engine = _engine_args(ctx, code)
    from imgtrain.threads import available_cores, torch_default_threads

    cores = min(available_cores(), torch_default_threads())

    def start_peer(setting: tuple[int, float, int]) -> _Server:
        return _Server(ctx, code, model, command=[ctx.python, str(BENCH / "peer.py"), str(model), "--port", "PORT",
                                                  *_setting_args(setting)],
                       ready="/health", env=_peer_env(ctx, code, folder))

    # --- the sweep: 32 clients, a short run per setting, one server at a time --------------------------------
    batches, timeouts = sizes["batches"], sizes["timeouts"]
    sweep_rates: dict[tuple[int, float, int], list[float]] = {}  # each run's requests/s
    sweep_times: dict[tuple[int, float, int], list[float]] = {}  # latencies, pooled over its runs
    sweep_failed: dict[tuple[int, float, int], int] = {}

    def try_setting(setting: tuple[int, float, int], again: bool = False) -> None:
        if setting in sweep_rates and not again:
            return
        server = start_peer(setting)
        try:
            _load(server.port, forms, 4, 1.0, PEER_PATH, FORM)  # warm up
            rate, times, failed = _load(server.port, forms, 32, sweep_seconds, PEER_PATH, FORM)
        finally:
            server.stop()
        sweep_rates.setdefault(setting, []).append(rate)
        sweep_times.setdefault(setting, []).extend(times)
        sweep_failed[setting] = sweep_failed.get(setting, 0) + failed
        ctx.log(f"[peer] sweep {_describe(setting, cores)}: {rate:.1f} req/s, p50 "
                f"{statistics.median(times) * 1000:.0f} ms, {failed} failed")

    def best(candidates) -> tuple[int, float, int]:
        return max(candidates, key=lambda s: (sweep_failed[s] == 0, statistics.median(sweep_rates[s])))

    try_setting((1, 0.0, 1))  # LitServe's defaults: no batching, one worker
    for batch in batches:
        for timeout in timeouts:
            try_setting((batch, timeout, 1))
    batched = best([s for s in sweep_rates if s[0] > 1])
    if cores > 1:  # as LitServe's documentation advises on a CPU: a worker per core
        try_setting((batched[0], batched[1], cores))
        try_setting((1, 0.0, cores))
    finalists = sorted(sweep_rates, key=lambda s: (sweep_failed[s] == 0, sweep_rates[s][0]), reverse=True)[:3]
    if not quick:  # one short run each is noisy: the three best run again, in the reverse order
        for setting in reversed(finalists):
            try_setting(setting, again=True)
    chosen = best(finalists)

    # --- side by side -------------------------------------------------------------------------------------
    peer_label = f"LitServe {versions['litserve']} (best setting of the sweep)"
    ours_label = "`imgtrain serve`" + (" --engine auto" if engine else " (defaults)")
    fast_label = "`imgtrain serve`, its int8 export, --engine auto"
    int8 = model.parent / "int8-openvino"
    if not int8.exists():  # the speed of the int8 export: this one-epoch model's accuracy says nothing (the
        # engines section measures int8's accuracy on a trained model), so its check may not refuse it here
        ctx.imgtrain("export", model, "--format", "openvino", "--int8", "--calibration-data", model.parent / "train",
                     "--validation-data", model.parent / "val", "--max-accuracy-drop", "100", "--output", int8)
    running: dict[str, tuple[_Server, list[bytes], str, str]] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    failures: dict[tuple[str, int], int] = {}
    body_rates: dict[str, list[float]] = {}
    try:
        server = start_peer(chosen)
        running[peer_label] = (server, forms, PEER_PATH, FORM)
        # The body the peer's clients send: whichever way of the two it takes answers more at 32 clients
        for rep in range(2):
            for way, (bodies, kind) in peer_bodies.items() if rep % 2 == 0 else reversed(peer_bodies.items()):
                if rep == 0:
                    _load(server.port, bodies, 4, 1.0, PEER_PATH, kind)  # warm up
                body_rates.setdefault(way, []).append(_load(server.port, bodies, 32, sweep_seconds, PEER_PATH,
                                                            kind)[0])
        way = max(body_rates, key=lambda w: statistics.median(body_rates[w]))
        ctx.log(f"[peer] bodies: {', '.join(f'{w} {statistics.median(r):.1f} req/s' for w, r in body_rates.items())}")
        running[peer_label] = (server, peer_bodies[way][0], PEER_PATH, peer_bodies[way][1])
        running[ours_label] = (_Server(ctx, code, model, *engine), blobs, "/predictions/bench", "image/jpeg")
        running[fast_label] = (_Server(ctx, code, int8, *engine), blobs, "/predictions/bench", "image/jpeg")
        agreement = _agreement(running[ours_label][0].port, server.port, blobs, *peer_bodies[way])
        ctx.log(f"[peer] agreement: {agreement[1]} of {agreement[0]} top labels the same, largest probability "
                f"difference {agreement[2]:.4f}")
        for server, bodies, path, kind in running.values():
            _load(server.port, bodies, 4, 1.0, path, kind)  # warm up
        for rep in range(reps):
            order = list(running) if rep % 2 == 0 else list(reversed(running))
            for clients in CLIENTS:
                for label in order:
                    server, bodies, path, kind = running[label]
                    rate, times, failed = _load(server.port, bodies, clients, seconds, path, kind)
                    rates.setdefault((label, clients), []).append(rate)
                    latencies.setdefault((label, clients), []).extend(times)
                    failures[label, clients] = failures.get((label, clients), 0) + failed
                    ctx.log(f"[peer] rep {rep + 1}/{reps} {label}, {clients} clients: {rate:.1f} req/s, p50 "
                            f"{statistics.median(times) * 1000:.0f} ms")
        peer_line = _line(running[peer_label][0].output(), "peer worker ready")
        ours_line = _line(running[ours_label][0].output(), "Serving")
    finally:
        for server, *_ in running.values():
            server.stop()

    # --- the results --------------------------------------------------------------------------------------
    rate = {key: statistics.median(values) for key, values in rates.items()}
    settings = {peer_label: f"{_describe(chosen, cores)}; each image {BODIES[way]}",
                ours_label: f"its defaults{' and --engine auto' if engine else ''}; each image the raw body",
                fast_label: "`imgtrain export --int8 --format openvino` of the same model (another file, "
                            "OpenVINO's int8), served at its defaults"}
    rows = [[label, settings[label], clients, f"{rate[label, clients]:.1f}",
             f"{rate[label, clients] / rate[ours_label, clients]:.2f}x",
             f"{statistics.median(latencies[label, clients]) * 1000:.1f}",
             f"{_percentile(latencies[label, clients], 0.99) * 1000:.1f}", failures[label, clients]]
            for clients in CLIENTS for label in running]
    sweep_rows = [[("**" if s == chosen else "") + _describe(s, cores) + ("**" if s == chosen else ""),
                   ", ".join(f"{r:.1f}" for r in sweep_rates[s]), f"{statistics.median(sweep_times[s]) * 1000:.0f}",
                   f"{_percentile(sweep_times[s], 0.99) * 1000:.0f}", sweep_failed[s]] for s in sweep_rates]
    images, same, largest, distinct = agreement
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    one, many = (rate[peer_label, c] / rate[ours_label, c] for c in CLIENTS)
    return Section(f"Peer: `imgtrain serve` against LitServe {versions['litserve']}", [
        f"The same model (ResNet-18 at 224 px), machine, images ({len(blobs)} 400 x 300 JPEG photos) and clients "
        f"(threads of this process, one image a request over a kept-alive connection). LitServe "
        f"{versions['litserve']} is installed by the benchmark with `pip install --no-deps --target "
        f"{folder}` ({PEER}=={PEER_VERSION} and {', '.join(PEER_EXTRAS)}: what it requires that the environment "
        f"lacks), and runs `bench/peer.py` with that folder first on PYTHONPATH; both servers run on the "
        f"environment's torch, numpy, Pillow, FastAPI/Starlette and uvicorn. Versions: {shown}. "
        f"The peer decodes, resizes and normalises with imgtrain's own code and runs the network as `imgtrain "
        f"serve` does (channels-last, its precision, its threads): the peer's worker says `{peer_line}`; "
        f"imgtrain says `{ours_line}`.",
        f"Agreement, each image asked of both one at a time: **{same} of {images}** top labels the same "
        f"({distinct} distinct labels among the answers); the largest difference of a probability "
        f"{largest:.4f}.",
        f"LitServe's settings, 32 clients, a run of {sweep_seconds:g} s each (after 1 s of warming up), a fresh "
        "server each time, one at a time; " + ("" if quick else "the three best ran again, in the reverse order; ")
        + "the chosen one in bold: the most requests/s (the median of its runs) with none failing. Each image a "
        "multipart form's file.",
        table(["LitServe setting", "requests/s (each run)", "p50 ms", "p99 ms", "failed"], sweep_rows),
        f"The peer's clients send each image {BODIES[way]}, the faster of its two ways at its chosen setting "
        f"(32 clients, 2 runs of {sweep_seconds:g} s each, alternating: " + ", ".join(
            f"{BODIES[w]} {statistics.median(r):.1f} requests/s" for w, r in body_rates.items()) + ").",
        f"Side by side, rows alternating between the servers; each the median of {reps} run(s) of {seconds:g} s, "
        "latencies pooled over the runs:",
        table(["server", "settings", "clients", "requests/s", "vs imgtrain serve", "p50 ms", "p99 ms", "failed"],
              rows),
        f"LitServe at its best setting answers **{one:.2f}x** the requests/s of `imgtrain serve` at 1 client and "
        f"**{many:.2f}x** at 32. Note that LitServe waits out its whole batch_timeout for a batch that does not "
        "fill (a lone client waits it on every request), where imgtrain waits only while other requests are being "
        "decoded; and that LitServe decodes each image in its inference worker, between batches, where imgtrain "
        "decodes in threads beside the network.",
    ])
