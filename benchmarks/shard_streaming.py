"""Streaming from tar shards under torchrun: every image once per epoch, memory flat in the dataset size.

Generates tiny PNGs (16 px, 10 classes: a coloured square whose colour is the class) in a temp folder, packs
them with `vitcli shard`, and trains one epoch of a tiny ViT with
`python -m torch.distributed.run --standalone --nproc_per_node=2` (gloo, CPU) on:

  shards 10k     the --small set, streamed from its shards
  shards 100k    the --images set, streamed from its shards
  off 10k / 100k both sets as folders with `data.cache: off` (decoded in DataLoader workers every epoch)
  cache 100k     the --images set as a folder, decoded once into the in-memory uint8 cache

and prints, per run: the exactly-once line vitcli logs after each epoch, the training images/s of the epoch
(all processes together), the wall time of the command, and the peak resident memory of each rank's main
process and of its DataLoader workers (ru_maxrss of the largest finished child process, read by a wrapper
around the vitcli CLI). The check: each rank's peak RSS with 100k images is within 20% of the same run
with 10k (shards, and cache off).

    python benchmarks/shard_streaming.py                         # 100,000 and 10,000 images
    python benchmarks/shard_streaming.py --images 20000 --small 2000 --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40), (200, 60, 200), (40, 200, 200),
           (240, 140, 30), (140, 90, 40), (250, 250, 250), (120, 120, 120)]
MODEL = ["--model", "vit-tiny/4", "--img-size", "16", "--device", "cpu", "--batch-size", "256", "--epochs", "1",
         "--set", "model.embed_dim=32", "--set", "model.depth=1", "--set", "model.num_heads=2",
         "--set", "data.crop_pct=1.0", "--set", "train.precision=fp32", "--set", "train.threads=1",
         "--set", "data.num_workers=1", "--set", "data.cache_max_gb=8",
         "--set", "train.report=false", "--set", "train.calibrate=false"]  # time the training only


def _write_chunk(args) -> None:
    root, start, stop, size = args
    from PIL import Image, ImageDraw

    rng = random.Random(start)
    for i in range(start, stop):
        c = i % len(COLOURS)
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 60) for _ in range(3)))
        r = rng.randint(2, size // 3)
        x, y = rng.randint(0, size - 2 * r), rng.randint(0, size - 2 * r)
        ImageDraw.Draw(img).rectangle((x, y, x + 2 * r, y + 2 * r), fill=COLOURS[c])
        img.save(root / f"c{c}" / f"{i:07d}.png")


def make_pngs(root: Path, n: int, size: int = 16) -> Path:
    """n tiny PNGs in 10 class folders, written by 2 processes."""
    from multiprocessing import Pool

    for c in range(len(COLOURS)):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    step = 5000
    with Pool(2) as pool:
        pool.map(_write_chunk, [(root, s, min(n, s + step), size) for s in range(0, n, step)])
    return root


def run(cmd: list[str], cwd: Path) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["COLUMNS"] = "200"
    t0 = time.time()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr, time.time() - t0


def train(data: Path, work: Path, name: str, *extra: str) -> dict:
    """One epoch under torchrun (2 processes); returns the figures of the run."""
    rss = work / f"{name}.rss"
    rss.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--child", str(rss), "train", str(data), *MODEL, *extra, "--output", str(work / "runs"), "--name", name]
    log, wall = run(cmd, work)
    once = re.findall(r"epoch 1: (\d+ of \d+ images streamed from \d+ shards, [^\n]*)", log)
    ips = re.findall(r"epoch   1/1 .* (\d+) img/s", log)
    ranks = [json.loads(line) for line in rss.read_text().splitlines()]
    return {"name": name, "exactly_once": once[0] if once else "-", "images_per_s": int(ips[0]) if ips else 0,
            "wall_s": wall, "rss": sorted(ranks, key=lambda r: r["rank"])}


def child(rss_file: str, args: list[str]) -> None:
    """Under torchrun: run the vitcli CLI, then append this rank's peak RSS (main process, and the largest of
    its finished DataLoader workers) to `rss_file`."""
    from vitcli.cli import app

    try:
        app(args, standalone_mode=False)
    finally:
        rank = int(os.environ.get("RANK", 0))
        main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with open(rss_file, "a") as f:
            f.write(json.dumps({"rank": rank, "main_mib": round(main, 1), "workers_mib": round(workers, 1)}) + "\n")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--shard-size", default="4MB")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--runs", default="shards,off,cache", help="which runs: shards, off, cache (comma-separated)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="vitcli-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    results = []
    runs = args.runs.split(",")
    for n in (args.small, args.images):
        t0 = time.time()
        data = work / f"png{n}"
        if not data.is_dir():  # --keep: generated and sharded once
            make_pngs(data, n)
            run([sys.executable, "-m", "vitcli", "shard", str(data), str(work / f"shards{n}"), "--size",
                 args.shard_size], work)
            print(f"{n} images: generated and sharded in {time.time() - t0:.0f} s", flush=True)
        if "shards" in runs:
            results.append(train(work / f"shards{n}", work, f"shards-{n}"))
    for n in (args.small, args.images) if "off" in runs else ():
        results.append(train(work / f"png{n}", work, f"off-{n}", "--set", "data.cache=off"))
    if "cache" in runs:
        results.append(train(work / f"png{args.images}", work, f"cache-{args.images}"))
    report(results, args)


def report(results: list[dict], args) -> None:

    print(f"\n{'run':<16} {'img/s':>7} {'wall s':>7}  peak RSS per rank: main / child (MiB)     exactly once")
    for r in results:
        mem = "  ".join(f"r{x['rank']} {x['main_mib']:.0f} / {x['workers_mib']:.0f}" for x in r["rss"])
        print(f"{r['name']:<16} {r['images_per_s']:>7} {r['wall_s']:>7.1f}  {mem:<38} {r['exactly_once']}")
    by = {r["name"]: r for r in results}
    pairs = [(what, by.get(f"{key}-{args.small}"), by.get(f"{key}-{args.images}"))
             for what, key in (("shards", "shards"), ("cache off", "off"))]
    for what, lo, hi in pairs:
        if lo is None or hi is None:
            continue
        for a, b in zip(lo["rss"], hi["rss"], strict=True):
            ratio = b["main_mib"] / a["main_mib"]
            wratio = b["workers_mib"] / max(a["workers_mib"], 1)
            print(f"{what}, rank {a['rank']}: peak RSS with {args.images} vs {args.small} images: main {ratio:.3f}x, "
                  f"child {wratio:.3f}x ({'within' if ratio <= 1.2 and wratio <= 1.2 else 'NOT within'} 20%)")
    big, cache = by.get(f"shards-{args.images}"), by.get(f"cache-{args.images}")
    if big and cache:
        print(f"throughput, {args.images} images, 2 processes: shards {big['images_per_s']} img/s vs in-memory "
              f"cache {cache['images_per_s']} img/s ({big['images_per_s'] / max(cache['images_per_s'], 1):.2f}x); "
              f"wall {big['wall_s']:.0f} s vs {cache['wall_s']:.0f} s (the cache decodes every image first)")


if __name__ == "__main__":
    main()
