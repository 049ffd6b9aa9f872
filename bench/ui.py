"""The `ui` section: `imgtrain ui`, the web page, against its issue's targets, side by side in one run.

Each server is `python -m imgtrain ui --workspace W --data D --port 0 --token T` in a fresh temporary
workspace; this process plays the browser over HTTP/1.1 (kept-alive connections, at most 6 at a time as a
browser opens to one host; the token as an ``Authorization`` header, or the printed link's cookie).

1. Start-up: from the URL line on stdout to the answer of the page (the printed link: 303 and a cookie,
   then ``/``) and of ``/api/state`` (after the page's style and script), the first thing its script asks;
   and from the process's start to the URL line. Target: within 1 s of the URL.
2. Opening a folder of small JPEGs: ``POST /api/datasets`` (classes and counts), then what a screen shows:
   each class column's first page of names and its first 12 thumbnails. The first time (a fresh workspace,
   while the convert job, a subprocess decoding every image, runs), the second (a new server on the same
   workspace, converted) and the third (the thumbnails the second made are cached). Targets: 10 s, 2 s.
3. Training from the page against the CLI: the same run (ResNet-18 from scratch, 64 px, batch 16), started
   with ``POST /api/runs`` while the page is polled every second as the browser does, and with
   ``train-pytorch-model`` on the page's own training and validation folders; ``train_images_per_second`` of
   epochs 2 and later. Target: the page at 0.95x the CLI or better.
4. Live curves: during a page run, ``GET /api/runs/NAME`` every 0.1 s; when each epoch first appears in its
   ``history``, against the epoch's end (the time of the work folder's metrics.jsonl, written at each
   epoch's end, watched every 20 ms). The page polls every second: the bound is the API's delay plus 1 s.
   Target: 2 s.

Every server and background job started here is ended here (the jobs run in sessions of their own, so
stopping a server leaves them running).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import fixtures
from context import Context, steady_rate
from measure import REPO, CommandFailed, Section, med, num, spread, table

BROWSER_CONNECTIONS = 6  # what a browser opens to one host over HTTP/1.1
COLUMN_PAGE, ON_SCREEN = 48, 12  # names the page asks of a class column at once; thumbnails a screen shows of one
URL_LINE = re.compile(r"imgtrain ui: open http://\S+?:(\d+)/\?token=")
TARGETS = {"start": 1.0, "first open": 10.0, "second open": 2.0, "ratio": 0.95, "curve": 2.0}
PAGE_POLL, CURVE_POLL, FILE_POLL = 1.0, 0.1, 0.02  # seconds


@dataclass(frozen=True)
class Sizes:
    starts: int  # starts of the server for the start-up times
    images: int  # the folder opened
    opens: int  # repetitions of the three openings, each in a fresh workspace
    train_images: int  # the folder trained on: 80% training, 20% validation
    epochs: int
    train_reps: int  # page/CLI pairs, alternating which goes first

    @classmethod
    def of(cls, ctx: Context) -> Sizes:
        if ctx.config.quick:
            return cls(starts=2, images=2_000, opens=1, train_images=200, epochs=2, train_reps=1)
        return cls(starts=5, images=20_000, opens=3, train_images=1_250, epochs=4, train_reps=3)


# --- the server and the browser ----------------------------------------------------------------------------

class Browser:
    """HTTP/1.1 to a server as a browser holds it: a kept-alive connection per thread, the token in a header."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.headers = port, {"Authorization": f"token {token}"}
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, str, bytes]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            self._connections.append(connection)
        headers = dict(self.headers)
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        for attempt in (1, 2):  # a kept-alive connection the server closed: once more, on a new one
            try:
                connection.request(method, path, data, headers)
                response = connection.getresponse()
                return response.status, response.getheader("content-type", ""), response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: dict | None = None):
        status, _, payload = self.request(method, path, body)
        value = json.loads(payload)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: {status} {value.get('error') if isinstance(value, dict) else value}")
        return value

    def image(self, path: str) -> int:
        status, kind, payload = self.request("GET", path)
        if status != 200 or not kind.startswith("image/"):
            raise RuntimeError(f"GET {path}: {status} {kind} {payload[:200]!r}")
        return len(payload)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()


class Server:
    """`imgtrain ui` in a process of its own on a free port: when it started and printed its URL, and its API."""

    def __init__(self, ctx: Context, workspace: Path, data: list[Path], log: Path) -> None:
        self.token = secrets.token_urlsafe(24)
        command = [ctx.python, "-m", "imgtrain", "ui", "--workspace", str(workspace), "--port", "0",
                   "--token", self.token, *(a for d in data for a in ("--data", str(d)))]
        self.log = log
        with open(log, "ab") as err:
            self.started = time.perf_counter()
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                            env=ctx.env, cwd=REPO, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(self.process.stdout, lines), daemon=True).start()
        deadline = time.perf_counter() + 120
        while True:
            try:
                at, line = lines.get(timeout=max(0.1, deadline - time.perf_counter()))
            except queue.Empty:
                line = None
            match = URL_LINE.search(line) if line else None
            if match:
                break
            if line is None:
                self.stop()
                raise RuntimeError(f"`imgtrain ui` printed no URL: {_tail(log)}")
        self.url_at, self.port = at, int(match.group(1))
        self.api = Browser(self.port, self.token)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "api"):
            self.api.close()


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put((time.perf_counter(), line))
    lines.put((time.perf_counter(), None))


def _tail(path: Path, size: int = 1500) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-size:]
    except OSError:
        return ""


def end_jobs(workspace: Path) -> None:
    """End the background jobs the servers started in ``workspace`` (and their workers: a job's process group)."""
    for pid_file in [p for pattern in ("datasets/*/job/pid", "runs/*/job/pid", "pipelines/*/job/pid")
                     for p in workspace.glob(pattern)]:
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"imgtrain.ui.jobs" not in cmdline or os.fsencode(pid_file.parent) not in cmdline:
            continue  # gone, and the number taken by another process
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _running(pid):
                break


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- 1. start-up -------------------------------------------------------------------------------------------

def first_page(server: Server) -> tuple[float, float]:
    """Open the printed link as a browser does: seconds from the URL line to the page, and to /api/state's answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request("GET", f"/?token={server.token}")
        response = connection.getresponse()
        response.read()
        cookie = (response.getheader("set-cookie") or "").split(";")[0]
        if response.status != 303 or not cookie:
            raise RuntimeError(f"GET /?token=...: {response.status}, cookie {cookie!r}, not 303 with a cookie")

        def get(path: str) -> bytes:
            connection.request("GET", path, headers={"Cookie": cookie})
            answer = connection.getresponse()
            body = answer.read()
            if answer.status != 200:
                raise RuntimeError(f"GET {path}: {answer.status} {body[:200]!r}")
            return body

        get("/")
        page = time.perf_counter() - server.url_at
        get("/static/app.css")
        get("/static/app.js")
        json.loads(get("/api/state"))
        return page, time.perf_counter() - server.url_at
    finally:
        connection.close()


# --- 2. opening a folder -----------------------------------------------------------------------------------

def first_screen(api: Browser, name: str, classes: int) -> int:
    """What the page shows of a data set: each column's first page of names, then its first thumbnails, with
    the browser's connections; the thumbnails fetched."""
    with ThreadPoolExecutor(BROWSER_CONNECTIONS) as pool:
        pages = {pool.submit(api.json, "GET", f"/api/datasets/{name}/images?class={c}&start=0&count={COLUMN_PAGE}"): c
                 for c in range(classes)}
        thumbnails = []
        for done in as_completed(pages):
            c = pages[done]
            thumbnails += [pool.submit(api.image, f"/api/datasets/{name}/thumbnail/{c}/{image['number']}")
                           for image in done.result()["images"][:ON_SCREEN]]
        for done in thumbnails:
            done.result()
    return len(thumbnails)


def _thumbnail_files(workspace: Path) -> int:
    return sum(1 for _ in (workspace / ".thumbnails").glob("*/*.jpg"))


def wait_for_job(api: Browser, path: str, every: float = 0.5, timeout: float = 900) -> dict:
    """Poll ``path`` (a data set or a run) until its job no longer runs; the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = api.json("GET", path)["job"]
        if job["state"] != "running":
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: its job still runs after {timeout:.0f} s")
        time.sleep(every)


def open_folder(ctx: Context, workspace: Path, folder: Path, count: int, log: Path) -> dict:
    """One opening of ``folder`` by a new server on ``workspace``, as a user pressing Open; then, the job's end."""
    server = Server(ctx, workspace, [folder], log)
    try:
        before = _thumbnail_files(workspace)
        started = time.perf_counter()
        data = server.api.json("POST", "/api/datasets", {"path": str(folder)})
        classes = time.perf_counter() - started
        if data["images"] != count or len(data["classes"]) != 10:
            raise RuntimeError(f"opening {folder}: {data['images']} images in {len(data['classes'])} classes, "
                               f"not {count} in 10")
        converted = data["converted"]
        shown = first_screen(server.api, data["name"], len(data["classes"]))
        screen = time.perf_counter() - started
        made = _thumbnail_files(workspace) - before
        job = wait_for_job(server.api, f"/api/datasets/{data['name']}")
    finally:
        server.stop()
    if job["state"] != "done":
        raise RuntimeError(f"the conversion of {folder}: {job['state']}, {job.get('error')}\n"
                           f"{job.get('log', '')[-1500:]}")
    return {"classes": classes, "screen": screen, "shown": shown, "made": made, "converted": converted, "job": job}


# --- 3. and 4. training ------------------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


class EpochWatch(threading.Thread):
    """The epochs' ends: the line count of metrics.jsonl (the work folder's, then the output's once it is moved
    into place) read every 20 ms; for each new epoch, the file's time (when it was written) and when seen."""

    def __init__(self, work: Path, output: Path) -> None:
        super().__init__(daemon=True)
        self.paths, self.ends = (work, output), {}  # epoch -> (file time, seen), both time.time()
        self._stop_event = threading.Event()

    def run(self) -> None:
        count = 0
        while not self._stop_event.is_set():
            for path in self.paths:
                try:
                    with open(path, "rb") as f:
                        written = os.fstat(f.fileno()).st_mtime_ns / 1e9
                        lines = f.read().count(b"\n")
                except OSError:
                    continue
                now = time.time()
                for epoch in range(count + 1, lines + 1):
                    self.ends[epoch] = (written, now)
                count = max(count, lines)
                break
            self._stop_event.wait(FILE_POLL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def page_run(server: Server, workspace: Path, dataset: str, name: str, sizes: Sizes, poll: float,
             watch: bool = False) -> dict:
    """A run started from the page, polled every ``poll`` s as long as it trains, then stopped (its scoring and
    evaluation are not measured); its metrics, and when each epoch first appeared in the API's answer."""
    folder = workspace / "runs" / name
    watcher = EpochWatch(folder / ".imgtrain-resume-trained" / "metrics.jsonl", folder / "trained" / "metrics.jsonl")
    if watch:
        watcher.start()
    body = {"dataset": dataset, "model_name": "resnet18", "pretrained": False, "epochs": sizes.epochs,
            "batch_size": 16, "image_size": 64, "validation_share": 0.2, "name": name}
    seen: dict[int, float] = {}  # epoch -> time.time() of the first answer that had it
    latencies = []
    try:
        server.api.json("POST", "/api/runs", body)
        while True:
            sent = time.perf_counter()
            run = server.api.json("GET", f"/api/runs/{name}")
            received = time.time()
            latencies.append(time.perf_counter() - sent)
            for point in run["history"]:
                seen.setdefault(point["epoch"], received)
            job = run["job"]
            if job["state"] != "running" or job.get("running") not in ("image-model", "train-pytorch-model"):
                break
            time.sleep(poll)
    finally:
        if watch:
            watcher.stop()
    if job["state"] == "running":
        server.api.json("POST", f"/api/runs/{name}/stop", {})
        job = wait_for_job(server.api, f"/api/runs/{name}", every=0.2)
    metrics = _jsonl(folder / "trained" / "metrics.jsonl")
    if len(metrics) != sizes.epochs:
        raise RuntimeError(f"the page's run {name}: {len(metrics)} of {sizes.epochs} epochs; job {job['state']}, "
                           f"{job.get('error')}\n{job.get('log', '')[-1500:]}")
    return {"metrics": metrics, "seen": seen, "ends": watcher.ends, "latencies": latencies,
            "setup": setup_line(_tail(folder / "job" / "log.txt", 100_000))}


def setup_line(log: str) -> str:
    """What a training says of its set-up (device, precision, data workers, cache, threads), from its log."""
    return next((line.strip() for line in log.splitlines() if line.startswith("device ")), "?")


def cli_run(ctx: Context, untrained: Path, run_folder: Path, output: Path, sizes: Sizes) -> tuple[list[dict], str]:
    """The page's run from the command line, on its training and validation folders. Started plainly, as the
    page's job is (no memory sampler beside it, which ``ctx.imgtrain`` has); its output goes to files."""
    command = [ctx.python, "-m", "imgtrain", "train-pytorch-model", "--untrained-model", untrained,
               "--training-data", run_folder / "training", "--validation-data", run_folder / "validation",
               "--output", output, "--overwrite", "--epochs", sizes.epochs, "--batch-size", 16, "--image-size", 64]
    with open(output.with_suffix(".log"), "wb") as log:
        done = subprocess.run([str(c) for c in command], stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, env=ctx.env, cwd=REPO)
    if done.returncode != 0:
        raise CommandFailed(f"exit code {done.returncode}: {' '.join(map(str, command))}\n"
                            f"{_tail(output.with_suffix('.log'))}")
    return _jsonl(output / "metrics.jsonl"), setup_line(_tail(output.with_suffix(".log"), 100_000))


# --- the section -------------------------------------------------------------------------------------------

def _met(value: float | None, target: float, at_least: bool = False) -> str:
    if value is None:
        return "—"
    return "yes" if (value >= target if at_least else value <= target) else "**no**"


def ui(ctx: Context) -> Section:
    sizes = Sizes.of(ctx)
    root = ctx.work / "ui"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    opened = fixtures.small_jpegs(ctx.cache, sizes.images)
    trained_on = fixtures.small_jpegs(ctx.cache, sizes.train_images)
    ctx.log(f"[ui] {sizes.images:,} and {sizes.train_images:,} 64 x 64 JPEG files ready in "
            f"{time.perf_counter() - started:.1f} s")
    workspaces: list[Path] = []
    servers: list[Server] = []

    def workspace(name: str) -> Path:
        workspaces.append(root / name)
        return root / name

    try:
        # 1. Start-up, each in a fresh workspace.
        starts = []
        for k in range(sizes.starts):
            server = Server(ctx, workspace(f"start-{k}"), [opened], root / f"start-{k}.log")
            servers.append(server)
            try:
                page, state = first_page(server)
            finally:
                server.stop()
            starts.append((server.url_at - server.started, page, state))
            ctx.log(f"[ui] start {k + 1}/{sizes.starts}: URL after {starts[-1][0]:.2f} s; page {page:.2f} s and "
                    f"/api/state {state:.2f} s after it")

        # 2. Opening the folder: three times on each fresh workspace.
        opens: dict[str, list[dict]] = {"first": [], "second": [], "third": []}
        for rep in range(sizes.opens):
            space = workspace(f"open-{rep}")
            for which in opens:
                opens[which].append(open_folder(ctx, space, opened, sizes.images, root / f"open-{rep}.log"))
                o = opens[which][-1]
                ctx.log(f"[ui] open {rep + 1}/{sizes.opens}, {which} time: classes {o['classes']:.2f} s, "
                        f"{o['shown']} thumbnails on screen {o['screen']:.2f} s ({o['made']} made)"
                        + (f"; the conversion took {o['job']['ended'] - o['job']['started']:.1f} s"
                           if which == "first" else ""))

        # 3. and 4. Training: one server, the page's runs and the CLI's alternating, then a run for the curves.
        space = workspace("train")
        server = Server(ctx, space, [trained_on], root / "train.log")
        servers.append(server)
        dataset = server.api.json("POST", "/api/datasets", {"path": str(trained_on)})["name"]
        job = wait_for_job(server.api, f"/api/datasets/{dataset}")
        if job["state"] != "done":
            raise RuntimeError(f"the conversion of {trained_on}: {job['state']}, {job.get('error')}")
        untrained = root / "untrained-resnet18"
        ctx.imgtrain("image-model", "--model-name", "resnet18", "--no-pretrained", "--output", untrained,
                     "--overwrite")
        pairs = []
        for rep in range(sizes.train_reps):
            order = ("page", "CLI") if rep % 2 == 0 else ("CLI", "page")
            rates, setups = {}, {}
            for side in order:
                if side == "page":
                    run = page_run(server, space, dataset, f"page-{rep}", sizes, PAGE_POLL)
                    metrics, setups[side] = run["metrics"], run["setup"]
                else:
                    metrics, setups[side] = cli_run(ctx, untrained, space / "runs" / "page-0", root / f"cli-{rep}",
                                                    sizes)
                rates[side] = [float(m["train_images_per_second"]) for m in metrics]
                ctx.log(f"[ui] training rep {rep + 1}/{sizes.train_reps}, {side}: "
                        f"{steady_rate([{'train_images_per_second': r} for r in rates[side]]):.1f} img/s (epochs 2+)")
            pairs.append((order, rates, setups))
        curves = page_run(server, space, dataset, "curves", sizes, CURVE_POLL, watch=True)
        server.stop()
    finally:
        for server in servers:
            server.stop()
        for space in workspaces:
            end_jobs(space)

    return _section(sizes, starts, opens, pairs, curves)


def _section(sizes: Sizes, starts: list[tuple[float, float, float]], opens: dict[str, list[dict]],
             pairs: list, curves: dict) -> Section:
    to_url, to_page, to_state = ([s[i] for s in starts] for i in range(3))

    def steady(values: list[float]) -> float:
        return steady_rate([{"train_images_per_second": v} for v in values])

    page_rates = [steady(rates["page"]) for _, rates, _ in pairs]
    cli_rates = [steady(rates["CLI"]) for _, rates, _ in pairs]
    ratios = [p / c for p, c in zip(page_rates, cli_rates, strict=True)]
    epochs = sorted(e for e in curves["seen"] if e in curves["ends"])
    delays = [curves["seen"][e] - curves["ends"][e][0] for e in epochs]
    bound = max(delays) + PAGE_POLL if delays else None
    conversion = [o["job"]["ended"] - o["job"]["started"] for o in opens["first"]]

    def row(what: str, target: str, values: list[float], limit: float, digits: int = 2, at_least: bool = False):
        unit = "x" if at_least else " s"
        return [what, target, num(med(values), digits) + unit, ", ".join(num(v, digits) + unit for v in values),
                _met(med(values), limit, at_least)]

    open_rows = []
    for which, label in (("first", "first time (fresh workspace; convert job running)"),
                         ("second", "second time (new server, same workspace)")):
        limit = TARGETS[f"{which} open"]
        open_rows += [row(f"{label}: classes and counts", f"<= {limit:g} s",
                          [o["classes"] for o in opens[which]], limit),
                      row(f"{label}: first thumbnails on screen", f"<= {limit:g} s",
                          [o["screen"] for o in opens[which]], limit)]
    limit = TARGETS["second open"]
    open_rows.append(row("third time (another new server: the second time's thumbnails cached): first thumbnails "
                         "on screen", f"<= {limit:g} s", [o["screen"] for o in opens["third"]], limit))
    headline = [
        ["process start -> URL line", "", num(med(to_url), 2) + " s", ", ".join(num(v, 2) + " s" for v in to_url), ""],
        row("URL line -> first page (`/?token=` link, 303, `/`)", "<= 1 s", to_page, TARGETS["start"]),
        row("URL line -> `/api/state` answered (after the page, its CSS and script)", "<= 1 s", to_state,
            TARGETS["start"]),
        *open_rows,
        ["the convert job (runs during the first time)", "", num(med(conversion), 1) + " s",
         ", ".join(num(v, 1) + " s" for v in conversion), ""],
        row("training img/s, page / CLI (epochs 2+)", ">= 0.95x", ratios, TARGETS["ratio"], at_least=True),
        ["epoch end -> point on the page (the API's delay, worst epoch, + the page's 1 s polling)", "<= 2 s",
         num(bound, 2) + " s", ", ".join(num(d + PAGE_POLL, 2) + " s" for d in delays), _met(bound, TARGETS["curve"])],
    ]
    open_detail = [[which, num(med([o["classes"] for o in opens[which]]), 2),
                    num(med([o["screen"] for o in opens[which]]), 2), opens[which][0]["shown"],
                    spread([o["made"] for o in opens[which]], 0),
                    "ImageDirectory" if all(o["converted"] for o in opens[which]) else
                    "the folder (not converted yet)" if not any(o["converted"] for o in opens[which]) else "mixed"]
                   for which in opens]
    training = [[rep + 1, " then ".join(order), num(steady(rates["page"])), num(steady(rates["CLI"])),
                 f"{steady(rates['page']) / steady(rates['CLI']):.2f}x", spread(rates["page"]), spread(rates["CLI"])]
                for rep, (order, rates, _) in enumerate(pairs)]
    lines = {side: list(dict.fromkeys(setups[side] for _, _, setups in pairs)) for side in ("page", "CLI")}
    if lines["page"] == lines["CLI"]:
        said = "Both trainings said the same of their set-up: " + "; ".join(f"`{line}`" for line in lines["page"])
    else:
        said = "Their set-ups differ: " + "; ".join(f"{side}: `{line}`" for side in lines for line in lines[side])
    live = [[e, num(curves["ends"][e][1] - curves["ends"][e][0], 3), num(d, 3), num(d + PAGE_POLL, 2)]
            for e, d in zip(epochs, delays, strict=True)]
    latencies = curves["latencies"]
    return Section("UI: `imgtrain ui` against its targets", [
        "`python -m imgtrain ui --workspace W --data D --port 0 --token T`, each in a fresh temporary workspace; "
        "the benchmark plays the browser over HTTP/1.1 (kept-alive connections, at most "
        f"{BROWSER_CONNECTIONS} at a time; the token as a header, or the printed link's cookie), on the same "
        f"cores as the server. Medians; \"each rep\" lists every repetition. {sizes.starts} starts; the folder "
        f"opened {sizes.opens} time(s) in fresh workspaces; {sizes.train_reps} page/CLI training pair(s).",
        table(["measurement", "target", "measured (median)", "each rep", "met?"], headline),
        f"**Opening a folder** of {sizes.images:,} 64 x 64 JPEG files in 10 class folders: from `POST "
        f"/api/datasets` (its answer: classes and counts) to the last of what a screen shows: each class "
        f"column's first {COLUMN_PAGE} names (`/api/datasets/NAME/images`) and its first {ON_SCREEN} thumbnails. "
        "Opening starts the convert job (Convert to Image Directory in a subprocess, decoding and copying every "
        "image), so the first time is measured while it runs on the same cores; each opening waits for it to "
        "end before the next. The second time is a new server on the same workspace, the third another: "
        "\"made\" counts the thumbnail files each made; the page lists a converted data set from its "
        "ImageDirectory, whose files are copies; thumbnails are keyed by the file's bytes, so the copies' are "
        "the ones already made.",
        table(["opening", "classes and counts s", "first thumbnails s", "thumbnails shown", "thumbnails made, each "
               "rep", "listed from"], open_detail),
        f"**Training** ResNet-18 from scratch at 64 px, batch size 16, {sizes.epochs} epochs, on "
        f"{sizes.train_images:,} images (validation share 0.2): from the page (`POST /api/runs`, polled every "
        f"{PAGE_POLL:g} s as the browser does while it trains; the job is stopped once training ends, before its "
        "scoring) and with `imgtrain train-pytorch-model` on the page's training and validation folders and "
        "`imgtrain image-model --no-pretrained`'s model, the server idle beside it. img/s: "
        "`train_images_per_second` of metrics.jsonl, the mean of epochs 2 and later.",
        table(["rep", "order", "page img/s", "CLI img/s", "page / CLI", "page img/s, each epoch",
               "CLI img/s, each epoch"], training),
        said + ".",
        f"**Live curves**: a page run polled every {CURVE_POLL:g} s (`GET /api/runs/NAME`); an epoch ends when "
        "metrics.jsonl in the run's work folder is written (its file time; the benchmark watches the file every "
        f"{FILE_POLL * 1000:.0f} ms, the second column shows how late that watch saw it). The API's delay holds "
        f"this {CURVE_POLL:g} s polling and the request's time; the page polls every {PAGE_POLL:g} s, hence the "
        f"bound. `GET /api/runs/NAME` took {num(med(latencies) * 1000 if latencies else None, 0)} ms "
        f"(median), {num(max(latencies) * 1000 if latencies else None, 0)} ms at most, during the run.",
        table(["epoch", "file watch saw it, s after", "API showed it, s after", "bound with the page's polling, s"],
              live),
    ])
