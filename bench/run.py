"""imgtrain's benchmark suite: is it fast on the machine people have?

    python bench/run.py                        # everything, about 15 minutes on 2 idle CPU cores
    python bench/run.py --quick                # a smoke run of every code path, a couple of minutes
    python bench/run.py --only train,flops     # some sections
    python bench/run.py --out bench/results/2025-01-01.md

Writes one markdown file (machine details, then a table per section) and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from context import BENCH, TTA_PEERS, Case, Config, Context
from measure import OtherLoad, Section, machine_details, table
from sections import SECTIONS


def _cases(text: str) -> tuple[Case, ...]:
    cases = []
    for item in text.split(","):
        try:
            model_size, data, train, val = item.strip().split(":")
            model, size = model_size.split("@")
            cases.append(Case(model, int(size), data, int(train), int(val)))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{item!r}: {exc or 'expected MODEL@PX:DATA:TRAIN:VAL'}") from None
    return tuple(cases)


def _peers(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return TTA_PEERS
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in TTA_PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown)}; choose among all, none, "
                                         + ", ".join(TTA_PEERS))
    return tuple(names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition: a smoke test")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to run: " + "; ".join(f"{k}: {v}" for k, (_, v) in
                                                                            SECTIONS.items()).replace("%", "%%"))
    parser.add_argument("--out", type=Path, help="the markdown results file (default: bench/results/<date>.md, "
                                                 "<date>-quick.md with --quick)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgtrain-bench",
                        help="where generated images are kept between runs")
    parser.add_argument("--keep-work", action="store_true", help="keep the models and data sets this run made")
    parser.add_argument("--reps", type=int, help="repetitions of every timed command")
    parser.add_argument("--epochs", type=int, help="epochs of every throughput training run")
    parser.add_argument("--convert-images", type=int, help="small PNG files for the conversion memory test")
    parser.add_argument("--score-images", type=int, help="images scored in section 4")
    parser.add_argument("--parity-epochs", type=int, help="epochs of each fp32/bf16 run in section 6")
    parser.add_argument("--cases", type=_cases, metavar="MODEL@PX:DATA:TRAIN:VAL[,...]",
                        help="the training cases instead of the configured ones, e.g. "
                             "'resnet18@224:photos:800:200' (DATA: mnist or photos)")
    parser.add_argument("--imgtrain-defaults", action="store_true",
                        help="time imgtrain at its defaults (AdamW, shift augmentation) instead of with the "
                             "baseline's optimiser and no augmentation")
    parser.add_argument("--compare-with", metavar="REV",
                        help="a git revision (e.g. a commit before a change) whose code the startup, shared and serve "
                             "sections run too, side by side")
    parser.add_argument("--imgtrain-args", default="",
                        help="more arguments for imgtrain's throughput runs, e.g. '--precision fp32' to compare "
                             "at the baseline's precision or '--num-workers 1'")
    parser.add_argument("--peers", type=_peers, default=TTA_PEERS, metavar="all|none|NAME[,NAME]",
                        help="the tta section's peers, among " + ", ".join(TTA_PEERS) + " (default: all, those "
                             "available: the others are skipped with a line)")
    parser.add_argument("--timm-train-py", type=Path, metavar="PATH",
                        help="timm's train.py for the tta section's timm peer (it is not in timm's wheel; default: "
                             "<cache-dir>/timm-<version>/train.py, else downloaded there from GitHub's tag)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose among {', '.join(SECTIONS)}")
    return args


def make_config(args: argparse.Namespace) -> Config:
    config = Config.smoke() if args.quick else Config.full()
    overrides = {name: getattr(args, name) for name in ("reps", "epochs", "cases", "convert_images", "score_images",
                                                        "parity_epochs", "compare_with", "peers", "timm_train_py")
                 if getattr(args, name) is not None}
    if args.imgtrain_defaults:
        overrides["imgtrain_recipe"] = "defaults"
    if args.imgtrain_args:
        overrides["imgtrain_extra"] = tuple(shlex.split(args.imgtrain_args))
    return dataclasses.replace(config, **overrides)


def header(config: Config, started: datetime.datetime, argv: list[str]) -> str:
    cases = "; ".join(f"{c.name} on {c.data} ({c.train_images:,} train / {c.val_images:,} val)" for c in config.cases)
    return "\n\n".join([
        f"# imgtrain benchmark, {started:%Y-%m-%d %H:%M}" + (" (quick smoke run: numbers not meaningful)"
                                                             if config.quick else ""),
        f"`{shlex.join(['python', 'bench/run.py', *argv])}`",
        table(["machine", ""], machine_details()),
        f"Training cases: {cases}; {config.epochs} epoch(s), {config.reps} repetition(s) of every timed command.",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = make_config(args)
    started = datetime.datetime.now()
    out = args.out or BENCH / "results" / f"{started:%Y-%m-%d}{'-quick' if config.quick else ''}.md"
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="imgtrain-bench-"))
    ctx = Context(config, args.cache_dir, work)
    parts, failed = [header(config, started, argv)], []
    clock, other = time.perf_counter(), OtherLoad()
    try:
        for name in args.sections:
            function, _ = SECTIONS[name]
            ctx.log(f"== {name}")
            section_started, other = time.perf_counter(), OtherLoad()
            try:
                section = function(ctx)
            except Exception as exc:  # one broken section must not lose the others' results
                traceback.print_exc()
                failed.append(name)
                section = Section(f"{name}: failed", [f"```\n{type(exc).__name__}: {exc}\n```"])
            section.blocks.append(f"_({time.perf_counter() - section_started:.0f} s; {other.describe()})_")
            parts.append(section.markdown())
    finally:
        if args.keep_work:
            ctx.log(f"models and data sets kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    parts.append(f"Total: {time.perf_counter() - clock:.0f} s; {other.describe()}."
                 + (f" Failed: {', '.join(failed)}." if failed else ""))
    report = "\n\n".join(parts) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(report)
    ctx.log(f"results written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
