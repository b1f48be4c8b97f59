"""Training throughput: vitcli against a plain loop written the way timm's train.py does it.

Same data (generated 256 px JPEGs in a temp folder), same model, same batch, one run:
  baseline fp32   torchvision ImageFolder + PIL RandomResizedCrop / flip / ToTensor / Normalize in DataLoader
                  workers, AdamW, label-smoothed cross entropy, fp32
  baseline bf16   the same loop under torch.autocast(bfloat16)
  vitcli          `vitcli.engine.train` with its defaults (decode-once uint8 cache, batched tensor augmentation,
                  `train.precision: auto`), images/s read from the run's metrics.csv

Before the runs it prints the limit of the machine: the measured GFLOP/s of a 2048x2048 matmul in bf16 and fp32
(torch's threads, and one thread, which a small model's probe picks on a busy machine). Each model's training
FLOPs per image are counted (torch.utils.flop_counter over one forward and backward) and each run's share of the
limit printed; on CUDA (--device cuda) that share is the MFU against the device's bf16 peak.

With --today-src (e.g. the src/ folder of a checkout of main), vitcli from that tree runs too, in a child
process, interleaved with the rest: "vitcli today" against this tree's "vitcli". `vitcli compiled` is this
tree with `train.compile: on` (its compile time is printed; a short run's `auto` leaves it off).

Each figure is the training images/s of the last epoch (the first warms up allocators and worker processes),
best of --repeat runs, run interleaved so that load from other processes hits all of them alike. The baseline
runs with 0, 1 and 2 DataLoader workers and its best is the one compared (on 2 cores, workers and the 2 compute
threads fight over the cores, so more workers is not always faster).

    python benchmarks/train_throughput.py                       # both sizes
    python benchmarks/train_throughput.py --sizes small32 --repeat 3
    python benchmarks/train_throughput.py --sizes cifar32,ti224 --today-src ../main/src --workers 0
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

SMALL = {"model.stem": "conv", "model.global_pool": "avg", "model.pos_embed": "sincos",
         "model.pos_conv": True}  # what scratch-small picks
# timm's ViT (patch stem, class token, learnt positions, no position conv), pinned: the defaults would give vitcli's
# run a conv stem and a position conv on these 256 images, a heavier model than the baseline's and the FLOPs counted
TIMM_VIT = {"model.stem": "patch", "model.global_pool": "token", "model.pos_embed": "learn",
            "model.pos_conv": False}
SIZES = {
    # name: (vitcli model args as --set overrides, img_size, batch, train images)
    "ti224": ({"model.name": "vit-tiny/16", **TIMM_VIT}, 224, 32, 256),
    "s224": ({"model.name": "vit-small/16", **TIMM_VIT}, 224, 128, 4096),  # for a GPU (--device cuda): ViT-S/16
    "small32": ({"model.name": "vit-tiny/4", "model.depth": 6, **SMALL}, 32, 64, 768),
    # the no-flags CIFAR-10 model (8,000 training images): width 128, 4 blocks, conv stem, patch 4
    "cifar32": ({"model.name": "vit-tiny/4", "model.embed_dim": 128, "model.depth": 4, "model.num_heads": 4, **SMALL},
                32, 64, 1536),
}
CLASSES = 4
VAL_PER_CLASS = 4


def make_jpegs(root: Path, n_train: int, side: int = 256, seed: int = 0) -> Path:
    """train/ and val/ class folders of random coloured shapes on noise, saved as JPEG (quality 90)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    for split, per_class in (("train", n_train // CLASSES), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = nrng.integers(0, 80, (side, side, 3), dtype=np.uint8)
                img = Image.fromarray(noise)
                d = ImageDraw.Draw(img)
                r = rng.randint(side // 6, side // 3)
                cx, cy = rng.randint(r, side - r), rng.randint(r, side - r)
                colour = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40)][c]
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
                img.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def vitcli_config(size: str, output: Path, epochs: int, overrides: list[str]):
    from vitcli.config import load_config

    model_over, img_size, batch, _ = SIZES[size]
    sets = [f"{k}={v}" for k, v in model_over.items()] + [
        f"data.img_size={img_size}", f"data.batch_size={batch}", f"train.epochs={epochs}",
        f"train.output={output}", "train.name=bench", "train.calibrate=false", "train.report=false", *overrides]
    return load_config(None, sets)


def run_vitcli(size: str, data: Path, work: Path, epochs: int, overrides: list[str]) -> float:
    """Train with the library's own loop; images/s of the last epoch from metrics.csv."""
    import contextlib
    import io

    from vitcli.train import train

    cfg = vitcli_config(size, work, epochs, overrides)
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars and the summary table
        from vitcli import console

        quiet, console.console.quiet = console.console.quiet, True
        try:
            res = train(cfg, data)
        finally:
            console.console.quiet = quiet
    with open(res.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["images_per_s"])


def run_baseline(size: str, data: Path, epochs: int, bf16: bool, workers: int, device: str = "cpu") -> float:
    """The timm train.py recipe: ImageFolder + PIL transforms in DataLoader workers, plain AdamW loop."""
    import contextlib

    import torch
    from torchvision import datasets, transforms

    from vitcli.models import build_model

    cfg = vitcli_config(size, Path(tempfile.gettempdir()), epochs, [])
    d = cfg.data
    torch.manual_seed(0)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(d.img_size, scale=(d.scale_min, 1.0), ratio=(1 / d.ratio_max, d.ratio_max)),
        transforms.RandomHorizontalFlip(d.hflip),
        transforms.ToTensor(),
        transforms.Normalize(d.mean, d.std),
    ])
    ds = datasets.ImageFolder(str(data / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=d.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    model, _ = build_model(cfg.model, len(ds.classes), d.img_size)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rate = 0.0
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with amp():
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        if device != "cpu":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
    del loader
    return rate


def train_flops_per_image(size: str, device: str = "cpu") -> float:
    """FLOPs of one training step per image (forward and backward), counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vitcli.models import build_model

    cfg = vitcli_config(size, Path(tempfile.gettempdir()), 1, [])
    model, _ = build_model(cfg.model, CLASSES, cfg.data.img_size)
    model.to(device).train()
    x = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


# dense bf16 peak TFLOP/s of common GPUs (no sparsity), by a piece of torch.cuda.get_device_name()
GPU_BF16_PEAK = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "RTX 4090": 165,
                 "RTX 3090": 71, "V100": 125, "T4": 65}


def limits(device: str) -> dict[str, float]:
    """GFLOP/s the hardware allows: matmul bf16 / fp32 with torch's threads and one thread; on CUDA the device's
    bf16 peak from its data sheet (else the measured matmul)."""
    import torch

    from vitcli.speed import matmul_gflops

    dev = torch.device(device)
    # best of 40 (~0.4 s of bf16 products on 2 AMX cores): a handful of runs caught a shared host's slow moments
    # and AMX's warm-up (748 GFLOP/s on 2 threads against 909 on one, where 40 runs find ~2,000)
    out = {"bf16": matmul_gflops("bf16", dev, runs=40), "fp32": matmul_gflops("fp32", dev, runs=40)}
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in GPU_BF16_PEAK.items() if k in name), 0)
        out["peak"] = peak * 1e3 if peak else out["bf16"]
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out["bf16 1 thread"] = matmul_gflops("bf16", dev, runs=40)
    out["fp32 1 thread"] = matmul_gflops("fp32", dev, runs=40)
    torch.set_num_threads(threads)
    return out


def run_child(src: str, size: str, data: Path, work: Path, epochs: int, overrides: list[str]) -> float:
    """run_vitcli with vitcli imported from another source tree, in a child process."""
    import json
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    cmd = [sys.executable, __file__, "--child", json.dumps([size, str(data), str(work), epochs, overrides])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"vitcli from {src} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="ti224,small32,cifar32", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--epochs", type=int, default=2, help="epochs per measurement; the last one is timed")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best of each is reported")
    ap.add_argument("--workers", default="0,1,2",
                    help="baseline DataLoader worker counts to try; the baseline's best is compared "
                         "(timm's default is 4, more than this machine's cores); none: no baseline runs")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra vitcli config override for the vitcli run, e.g. train.precision=fp32")
    ap.add_argument("--today-src", default="", help="also run vitcli from this source tree (e.g. main's src/)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the `train.compile: on` run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the baseline and vitcli both)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import json

        size, data, work, epochs, overrides = json.loads(args.child)
        print(run_vitcli(size, Path(data), Path(work), epochs, overrides))
        return 0

    import torch

    from vitcli.device import cpu_has_fast_bf16

    workers = [int(w) for w in args.workers.split(",") if w.strip() not in ("", "none")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"AVX-512 BF16/AMX: {cpu_has_fast_bf16()}; baseline workers tried: {workers}")
    lim = limits(args.device)
    print("limit (GFLOP/s, best 2048x2048 matmul): " + ", ".join(f"{k} {v:.0f}" for k, v in lim.items()), flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="vitcli-bench-") as tmp:
        tmp = Path(tmp)
        for size in args.sizes.split(","):
            ok &= bench_size(size, tmp, args, workers, lim)
    return 0 if ok else 1


def bench_size(size: str, tmp: Path, args, workers: list[int], lim: dict[str, float]) -> bool:
    """All runs of one size, interleaved; prints each, then the best of each with its share of the limit."""
    n_train = SIZES[size][3]
    data = make_jpegs(tmp / f"data-{size}", n_train)
    dev = [f"train.device={args.device}"]
    runs = {}
    for prec, bf16 in (("fp32", False), ("bf16", True)):
        for w in workers:
            runs[f"baseline {prec} {w} workers"] = (
                lambda s=size, d=data, b=bf16, w=w: run_baseline(s, d, args.epochs, b, w, args.device))
    if args.today_src:
        runs["vitcli today"] = lambda s=size, d=data: run_child(args.today_src, s, d, tmp / "runs", args.epochs, dev)
    runs["vitcli"] = lambda s=size, d=data: run_vitcli(s, d, tmp / "runs", args.epochs, dev + args.sets)
    if not args.no_compiled:
        runs["vitcli compiled"] = lambda s=size, d=data: run_vitcli(s, d, tmp / "runs", args.epochs,
                                                                     dev + args.sets + ["train.compile=on"])
    import torch

    threads = torch.get_num_threads()
    best: dict[str, float] = {}
    for r in range(args.repeat):
        for name, fn in runs.items():
            torch.set_num_threads(threads)  # a run that chose train.threads leaves it set in this process
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            ips = fn()
            print(f"  {size} {name:24s} run {r + 1}: {ips:7.1f} img/s, {time.perf_counter() - t0:5.0f} s in all "
                  f"(load average {load0:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
            best[name] = max(best.get(name, 0.0), ips)
    flops = train_flops_per_image(size, args.device)
    _, img, batch, _ = SIZES[size]
    limit = lim.get("peak", lim["bf16"])
    what = "MFU (device bf16 peak)" if "peak" in lim else "of the bf16 matmul limit"
    print(f"{size} (img {img}, batch {batch}, {n_train} train JPEGs at 256 px), best of {args.repeat}; "
          f"{flops / 1e9:.3f} GFLOP per training image:")
    for name, v in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {v:7.1f} img/s  {v * flops / 1e9:6.1f} GFLOP/s  {v * flops / 1e9 / limit:5.1%} {what}")
    good, line = True, ""
    if workers:
        b32 = max(v for k, v in best.items() if k.startswith("baseline fp32"))
        b16 = max(v for k, v in best.items() if k.startswith("baseline bf16"))
        v = max(best["vitcli"], best.get("vitcli compiled", 0.0))
        r32, r16 = v / b32, v / b16
        good = r32 >= 1.4 and r16 >= 1.15
        line = (f"  vitcli (best of plain and compiled) / baseline fp32 = {r32:.2f}x (target 1.40x), / baseline bf16 "
                f"= {r16:.2f}x (target 1.15x) {'OK' if good else 'BELOW TARGET'}")
    if "vitcli today" in best:
        line += (f"\n  vitcli / vitcli today = {best['vitcli'] / best['vitcli today']:.2f}x, compiled / today = "
                 f"{best.get('vitcli compiled', 0.0) / best['vitcli today']:.2f}x")
    print(line, flush=True)
    return good


if __name__ == "__main__":
    sys.exit(main())
