"""The GPU section: imgtrain's training step on CUDA against the designer's recipe on the same GPU.

Runs where CUDA is present (`python bench/run.py --only gpu`), and says so and skips elsewhere:

- compute only (no data loading), at 224 px: imgtrain's own epoch loop (``loop.train_one_epoch``:
  bf16 autocast, channels-last, fused AdamW, large batches, no host synchronisation per step; its
  deterministic settings as a run makes them) against the designer's step (fp32, batch 16, plain
  SGD, ``loss.item()`` every step), with the FLOP/s achieved as a share of the bf16 peak;
- what determinism costs: the same loop with cuDNN's autotuner and non-deterministic kernels;
- a real run of ``imgtrain train-pytorch-model`` on JPEG photos: images/s and the share of the step
  time spent waiting for data after the first epoch (which decodes; later ones read the cache).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fixtures
from context import Context, read_metrics
from measure import Section, num, table

# (model, per-GPU batch) at 224 px
MODELS = (("resnet18", 256), ("resnet50", 256), ("densenet121", 128))
# NVIDIA DeepLearningExamples' ResNet-50 v1.5 training figures (AMP, images/s on one GPU), as the issue cites them
PUBLISHED_RESNET50 = {"A100": 2470, "H100 SXM": 2700, "H100 PCIe": 1925}
DATASHEET_BF16_DENSE_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}


def gpu(ctx: Context) -> Section:
    import torch

    if not torch.cuda.is_available():
        return Section("9. GPU: skipped (no CUDA device on this machine)", [])
    quick = ctx.config.quick
    steps = 4 if quick else 30
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = _bf16_matmul_peak()
    datasheet = next((v for k, v in DATASHEET_BF16_DENSE_TFLOPS.items() if k in name), None)
    ctx.log(f"[gpu] {name}: bf16 matmul {peak / 1e12:,.0f} TFLOP/s")
    rows, rates = [], {}
    for model, batch in MODELS[:1] if quick else MODELS:
        per_image = _training_flops_per_image(model)
        ours = _imgtrain_rate(model, batch, steps, deterministic=True)
        fast = _imgtrain_rate(model, batch, steps, deterministic=False)
        designer = _designer_rate(model, 16, steps * 4)
        rates[model] = ours
        ctx.log(f"[gpu] {model}: imgtrain {ours:,.0f} img/s (non-deterministic {fast:,.0f}), designer "
                f"{designer:,.0f} img/s, {per_image / 1e9:.1f} GFLOP/image")
        for what, rate in ((f"imgtrain loop, bf16, batch {batch}, deterministic (as it trains)", ours),
                           (f"imgtrain loop, bf16, batch {batch}, cuDNN autotuner, non-deterministic", fast),
                           ("designer recipe: fp32, batch 16, SGD, loss.item() every step", designer)):
            achieved = per_image * rate
            rows.append([model, what, num(rate, 0), num(achieved / 1e12, 1), f"{100 * achieved / peak:.1f}%",
                         f"{100 * achieved / (datasheet * 1e12):.1f}%" if datasheet else "—"])
    blocks = [
        f"Device: **{name}**, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}. Measured bf16 "
        f"peak: {peak / 1e12:,.0f} TFLOP/s (an 8192 x 8192 x 8192 `torch.matmul`, median of 10); datasheet "
        f"dense bf16: {datasheet or '—'} TFLOP/s.",
        f"Compute only, 224 px, random images in pinned host memory copied in as training copies them, {steps} "
        "timed steps after a warm-up epoch. FLOPs per image: `FlopCounterMode` over a forward and backward pass.",
        table(["model", "loop", "img/s", "achieved TFLOP/s", "% of measured bf16 peak", "% of datasheet peak"], rows),
    ]
    try:
        compiled = None if quick else _imgtrain_rate("resnet50", 256, steps, deterministic=True, compiled=True)
    except Exception as exc:  # a compiler missing or failing must not lose the other figures
        ctx.log(f"[gpu] torch.compile failed: {type(exc).__name__}: {exc}")
        blocks.append(f"`--compile`: torch.compile failed here ({type(exc).__name__}: {str(exc)[:200]}).")
        compiled = None
    if compiled:
        ctx.log(f"[gpu] resnet50 compiled: {compiled[0]:,.0f} img/s after {compiled[1]:.0f} s compiling")
        blocks.append(f"`--compile` (torch.compile of the model, default mode), ResNet-50, batch 256, deterministic: "
                      f"{compiled[0]:,.0f} img/s against {rates['resnet50']:,.0f} eager "
                      f"({compiled[0] / rates['resnet50']:.2f}x), after {compiled[1]:.0f} s of compiling (the "
                      "warm-up epoch's time).")
    if "resnet50" in rates:
        blocks.append("ResNet-50 against NVIDIA's published figures (DeepLearningExamples, AMP): "
                      + ", ".join(f"{gpu} {v:,} img/s" for gpu, v in PUBLISHED_RESNET50.items())
                      + f". imgtrain's loop here: {rates['resnet50']:,.0f} img/s.")
    blocks += _real_run(ctx, quick)
    return Section("9. GPU training", blocks)


def _bf16_matmul_peak(n: int = 8192) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def _network(model: str, classes: int = 1000):
    import torchvision

    return getattr(torchvision.models, model)(weights=None, num_classes=classes)


def _training_flops_per_image(model: str, batch: int = 2, device: str = "cuda") -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    network = _network(model).to(device).train()
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(network(x), y).backward()
    return counter.get_total_flops() / batch


def _host_batches(batch: int, count: int = 4, classes: int = 1000, pin: bool = True) -> list:
    """uint8 images, labels, indices and ok flags in pinned memory: what imgtrain's DataLoader yields."""
    import torch

    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, generator=g),
                torch.randint(0, classes, (batch,), generator=g), torch.arange(batch),
                torch.ones(batch, dtype=torch.bool)] for _ in range(count)]
    return [[t.pin_memory() for t in b[:2]] + b[2:] for b in batches] if pin else batches


def _imgtrain_rate(model: str, batch: int, steps: int, *, deterministic: bool, on: str = "cuda",
                   compiled: bool = False):
    """Images/s of imgtrain's epoch loop; with ``compiled``, (images/s, seconds of the warm-up epoch)."""
    import torch

    from imgtrain.data.dataset import BadImagePolicy
    from imgtrain.data.transforms import Normalize
    from imgtrain.models.registry import IMAGENET_MEAN, IMAGENET_STD
    from imgtrain.seeding import seed_everything
    from imgtrain.threads import Threads
    from imgtrain.training.loop import Stepper, train_one_epoch

    device = torch.device(on)
    seed_everything(1)  # what a run sets: deterministic kernels, no cuDNN autotuner
    if not deterministic:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    network = _network(model).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stepper = Stepper(torch.compile(network) if compiled else network, network, optimizer,
                      torch.amp.GradScaler(on, enabled=False), schedule,
                      Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device), device, "bf16", 1e-3,
                      Threads("auto", lambda m: None), world=_alone())
    batches = _host_batches(batch, pin=on == "cuda")
    policy = BadImagePolicy("fail", None, lambda m: None)
    try:
        warm_up = train_one_epoch(stepper, [batches[i % 4] for i in range(5)], policy, 1)
        stats = train_one_epoch(stepper, [batches[i % 4] for i in range(steps)], policy, 2)
    finally:
        seed_everything(1)
    rate = stats.images / stats.seconds
    return (rate, warm_up.seconds) if compiled else rate


def _alone():
    from imgtrain.distributed import ALONE

    return ALONE


def _designer_rate(model: str, batch: int, steps: int, on: str = "cuda") -> float:
    """The designer's step on the GPU: fp32, NCHW, plain SGD, float batches from pageable memory,
    the loss read back every step."""
    import torch

    torch.manual_seed(1)
    network = _network(model).to(on).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    xs = [torch.randn(batch, 3, 224, 224) for _ in range(4)]
    ys = [torch.randint(0, 1000, (batch,)) for _ in range(4)]

    def step(i: int) -> float:
        x, y = xs[i % 4].to(on), ys[i % 4].to(on)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    for i in range(5):
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)  # loss.item() waits for the GPU
    return batch * steps / (time.perf_counter() - started)


def _real_run(ctx: Context, quick: bool) -> list[str]:
    """imgtrain train-pytorch-model on JPEG photos, ResNet-50 at 224 px: the data pipeline feeding the GPU."""
    count, epochs, batch = (100, 1, 16) if quick else (12_500, 4, 256)
    photos = fixtures.photo_folder(ctx.cache, count, workers=os.cpu_count() or 1)
    train, val = ctx.image_directories(photos, f"gpu-photos-{count}", count * 4 // 5, count // 5)
    untrained = ctx.untrained("resnet50")
    out = ctx.work / "gpu-resnet50"
    run = ctx.imgtrain("train-pytorch-model", "--untrained-model", untrained, "--training-data", train,
                       "--validation-data", val, "--output", out, "--overwrite", "--epochs", epochs, "--patience",
                       epochs, "--image-size", 224, "--batch-size", batch)
    rows = read_metrics(out / "metrics.csv")
    workers = next((line for line in run.stderr.splitlines() if "data workers" in line), "")
    table_rows = [[r["epoch"], num(float(r["train_images_per_second"]), 0),
                   f"{100 * float(r['data_wait_fraction']):.1f}%", num(float(r["seconds"]), 1),
                   f"{100 * float(r['validation_top1_accuracy']):.1f}%"] for r in rows]
    ctx.log(f"[gpu] real run: {[r[1] for r in table_rows]} img/s, data wait {[r[2] for r in table_rows]}")
    scores = []
    for score_batch in (64, 256):
        scored = ctx.imgtrain("score", "--trained-model", out, "--dataset", train, "--output",
                              ctx.work / f"gpu-scored-{score_batch}", "--overwrite", "--batch-size", score_batch)
        scores.append([score_batch, num(scored.wall_seconds, 1), num(count * 4 // 5 / scored.wall_seconds, 0)])
        ctx.log(f"[gpu] scoring {count * 4 // 5:,} images, batch {score_batch}: {scored.wall_seconds:.1f} s")
    return [
        f"A real run: `imgtrain train-pytorch-model`, ResNet-50 from scratch, {count * 4 // 5:,} training and "
        f"{count // 5:,} validation JPEG photos (400 x 300), 224 px, batch {batch}, {epochs} epochs, its defaults "
        f"otherwise; wall time {run.wall_seconds:.0f} s. Its start-up line: `{workers.strip()}`. Epoch 1 decodes "
        "every image (and fills the decoded-image cache); later epochs read the cache.",
        table(["epoch", "train img/s", "data wait", "epoch seconds (with validation)", "val top-1"], table_rows),
        f"Scoring the {count * 4 // 5:,} training photos with that model: `imgtrain score-image-model` (decoding in "
        "worker processes, pinned memory, bf16), whole command (start-up, loading the model, writing scored.csv).",
        table(["--batch-size", "wall s", "img/s, whole command"], scores),
    ]


if __name__ == "__main__":  # the section alone: python bench/gpu.py OUT.md
    import sys
    import tempfile

    from context import Config

    work = Path(tempfile.mkdtemp(prefix="imgtrain-gpu-"))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgtrain-bench"
    cache.mkdir(parents=True, exist_ok=True)
    context = Context(Config.smoke() if "--quick" in sys.argv else Config.full(), cache, work)
    if "--real-run" in sys.argv:  # the real run and scoring alone
        section = Section("9. GPU training: the real run", _real_run(context, "--quick" in sys.argv))
    else:
        section = gpu(context)
    text = section.markdown() + "\n"
    print(text)
    targets = [a for a in sys.argv[1:] if not a.startswith("--")]
    if targets:
        Path(targets[0]).write_text(text, encoding="utf-8")
