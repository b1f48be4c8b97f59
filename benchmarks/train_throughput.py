"""Training throughput: vitcli against a plain loop written the way timm's train.py does it.

Same data (generated 256 px JPEGs in a temp folder), same model, same batch, one run:
  baseline fp32   torchvision ImageFolder + PIL RandomResizedCrop / flip / ToTensor / Normalize in DataLoader
                  workers, AdamW, label-smoothed cross entropy, fp32
  baseline bf16   the same loop under torch.autocast(bfloat16)
  vitcli          `vitcli.engine.train` with its defaults (decode-once uint8 cache, batched tensor augmentation,
                  `train.precision: auto`), images/s read from the run's metrics.csv

Each figure is the training images/s of the last epoch (the first warms up allocators and worker processes),
best of --repeat runs, run interleaved so that load from other processes hits all of them alike. The baseline
runs with 0, 1 and 2 DataLoader workers and its best is the one compared (on 2 cores, workers and the 2 compute
threads fight over the cores, so more workers is not always faster).

    python benchmarks/train_throughput.py                       # both sizes
    python benchmarks/train_throughput.py --sizes small32 --repeat 3
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

SIZES = {
    # name: (vitcli model args as --set overrides, img_size, batch, train images)
    "ti224": ({"model.name": "vit-tiny/16"}, 224, 32, 256),
    "small32": ({"model.name": "vit-tiny/4", "model.depth": 6}, 32, 64, 768),
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
        "train.device=cpu", f"train.output={output}", "train.name=bench", *overrides]
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


def run_baseline(size: str, data: Path, epochs: int, bf16: bool, workers: int) -> float:
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
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rate = 0.0
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            with amp():
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        rate = n / (time.perf_counter() - t0)
    del loader
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="ti224,small32", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--epochs", type=int, default=2, help="epochs per measurement; the last one is timed")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best of each is reported")
    ap.add_argument("--workers", default="0,1,2",
                    help="baseline DataLoader worker counts to try; the baseline's best is compared "
                         "(timm's default is 4, more than this machine's cores)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra vitcli config override for the vitcli run, e.g. train.precision=fp32")
    args = ap.parse_args()

    import torch

    from vitcli.device import cpu_has_fast_bf16

    workers = [int(w) for w in args.workers.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"AVX-512 BF16/AMX: {cpu_has_fast_bf16()}; baseline workers tried: {workers}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="vitcli-bench-") as tmp:
        tmp = Path(tmp)
        for size in args.sizes.split(","):
            n_train = SIZES[size][3]
            data = make_jpegs(tmp / f"data-{size}", n_train)
            runs = {}
            for prec, bf16 in (("fp32", False), ("bf16", True)):
                for w in workers:
                    runs[f"baseline {prec} {w} workers"] = (
                        lambda s=size, d=data, b=bf16, w=w: run_baseline(s, d, args.epochs, b, w))
            runs["vitcli"] = lambda s=size, d=data: run_vitcli(s, d, tmp / "runs", args.epochs, args.sets)
            best: dict[str, float] = {}
            for r in range(args.repeat):
                for name, fn in runs.items():
                    load0 = os.getloadavg()[0]
                    ips = fn()
                    print(f"  {size} {name:24s} run {r + 1}: {ips:7.1f} img/s   (load average {load0:.1f} -> "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
                    best[name] = max(best.get(name, 0.0), ips)
            _, img, batch, _ = SIZES[size]
            b32 = max((v, k) for k, v in best.items() if k.startswith("baseline fp32"))
            b16 = max((v, k) for k, v in best.items() if k.startswith("baseline bf16"))
            v = best["vitcli"]
            r32, r16 = v / b32[0], v / b16[0]
            good = r32 >= 1.4 and r16 >= 1.15
            ok &= good
            print(f"{size} (img {img}, batch {batch}, {n_train} train JPEGs at 256 px), best of {args.repeat}:\n"
                  f"  vitcli {v:.1f} img/s | {b32[1]} {b32[0]:.1f} img/s | {b16[1]} {b16[0]:.1f} img/s\n"
                  f"  vitcli / baseline fp32 = {r32:.2f}x (target 1.40x), vitcli / baseline bf16 = {r16:.2f}x "
                  f"(target 1.15x) {'OK' if good else 'BELOW TARGET'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
