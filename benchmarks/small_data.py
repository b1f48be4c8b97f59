"""Small-data benchmark: vitcli with no flags and with --time, against an RBF SVM and a ResNet-18-style CNN.

    python benchmarks/small_data.py                 # all datasets, full size (long on a 2-core CPU)
    python benchmarks/small_data.py --scale 0.5     # half the training images of each set, quicker
    python benchmarks/small_data.py --only digits   # one dataset

In one run, for each dataset (written under examples/generated/small_data/, which git ignores):
  digits    scikit-learn's 1,797 handwritten digits (8x8 grey), a seeded 80/20 train/test split
  digits28  MNIST-like: those digits at 28 px with elastic and affine distortions, 400 a class for training
            and a test set drawn from other writers' digits (originals split before distorting)
  clutter   32 px colour shapes (5 kinds, the class) of random colour on a cluttered background, 120 a class
  textures  48 px colour textures (6 kinds: stripes at two angles, checks, dots, rings, noise), 150 a class
it trains
  - `vitcli train DATA` with no flags (every choice data-aware), then `vitcli eval` on the test split;
  - `vitcli train DATA --time T` with T the benchmark's time budget, then eval;
  - an RBF support-vector machine on raw pixels with C and gamma tuned on a validation split;
  - timm's resnet18 from scratch (3x3 stem, no max-pool for small images) trained with SGD + cosine for the
    same wall clock as the no-flags vitcli run;
and prints top-1 on the test split and seconds for each. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "generated" / "small_data"


# ----------------------------------------------------------------------------------------------- datasets
def _save(root: Path, split: str, label: str, i: int, img: Image.Image) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{i:05d}.png")


def make_digits(root: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """scikit-learn digits, 8x8 grey, 80/20 stratified train/test (train scaled by `scale`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    keep = int(len(Xtr) * scale)
    for split, XX, yy in (("train", Xtr[:keep], ytr[:keep]), ("test", Xte, yte)):
        for i, (x, c) in enumerate(zip(XX, yy, strict=True)):
            _save(root, split, str(c), i, Image.fromarray((x.reshape(8, 8) * 255 / 16).astype(np.uint8), "L"))
    return root


def _elastic(img: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Simard et al. 2003 elastic distortion of a float image (H, W)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = img.shape
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return map_coordinates(img, [yy + dy, xx + dx], order=1, mode="constant")


def _digit28(x8: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit (0-16) -> a 28x28 MNIST-like image: 20 px glyph, affine jitter, elastic warp, stroke."""
    glyph = Image.fromarray((x8.reshape(8, 8) * 255 / 16).astype(np.uint8), "L").resize((20, 20), Image.BICUBIC)
    canvas = Image.new("L", (28, 28), 0)
    canvas.paste(glyph, (4, 4))
    a = math.radians(rng.uniform(-8, 8))
    s = rng.uniform(0.9, 1.1)
    sh = rng.uniform(-0.15, 0.15)
    tx, ty = rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)
    # inverse map for PIL: output (u, v) -> input, about the centre
    m = np.array([[math.cos(a), -math.sin(a) + sh], [math.sin(a), math.cos(a)]]) / s
    c = np.array([14.0, 14.0])
    off = c - m @ (c + np.array([tx, ty]))
    canvas = canvas.transform((28, 28), Image.AFFINE, (m[0, 0], m[0, 1], off[0], m[1, 0], m[1, 1], off[1]),
                              resample=Image.BILINEAR)
    arr = _elastic(np.asarray(canvas, dtype=np.float64), rng, alpha=rng.uniform(6, 14), sigma=4.0)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    stroke = rng.integers(0, 3)
    if stroke == 1:
        img = img.filter(ImageFilter.MaxFilter(3))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = np.asarray(img, dtype=np.float64)
    arr = arr * (255.0 / max(arr.max(), 1.0))  # MNIST's ink is saturated
    return Image.fromarray(np.clip(arr * rng.uniform(1.0, 1.4), 0, 255).astype(np.uint8), "L")


def make_digits28(root: Path, scale: float = 1.0, seed: int = 0, per_class: int = 400, test_per_class: int = 100
                  ) -> Path:
    """MNIST-like: distorted 28 px digits; train and test come from disjoint originals (65% / 35% a class)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    n_train = max(1, int(per_class * scale))
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(len(idx) * 0.65)
        for split, pool, n in (("train", idx[:cut], n_train), ("test", idx[cut:], test_per_class)):
            for i in range(n):
                _save(root, split, str(c), i, _digit28(X[pool[i % len(pool)]], rng))
    return root


SHAPES = ("circle", "square", "triangle", "cross", "ring")


def _clutter_image(kind: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # clutter: lines and small blobs in random colours
        col = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0, x1, y1 = (rng.randint(0, size) for _ in range(4))
        if rng.random() < 0.6:
            d.line((x0, y0, x1, y1), fill=col, width=1)
        else:
            r = rng.randint(1, 3)
            d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=col)
    bg = img.getpixel((0, 0))
    col = tuple((c + rng.randint(80, 176)) % 256 for c in bg)  # a colour that stands out from the background
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
    elif kind == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=col)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif kind == "cross":
        w = max(2, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
    else:
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=col, width=max(2, r // 3))
    return img


def make_clutter(root: Path, scale: float = 1.0, seed: int = 0, per_class: int = 120, test_per_class: int = 100,
                 size: int = 32) -> Path:
    rng = random.Random(seed)
    for split, n in (("train", max(1, int(per_class * scale))), ("test", test_per_class)):
        for kind in SHAPES:
            for i in range(n):
                _save(root, split, kind, i, _clutter_image(kind, size, rng))
    return root


TEXTURES = ("stripes0", "stripes60", "checks", "dots", "rings", "noise")


def _texture_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    freq = rng.uniform(0.25, 0.6)
    phase = rng.uniform(0, 2 * math.pi)
    if kind.startswith("stripes"):
        a = math.radians(float(kind[7:]) + rng.uniform(-15, 15))
        v = np.sin(freq * (xx * math.cos(a) + yy * math.sin(a)) + phase)
    elif kind == "checks":
        a = math.radians(rng.uniform(-20, 20))
        u, w = xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)
        v = np.sign(np.sin(freq * u + phase) * np.sin(freq * w))
    elif kind == "dots":
        v = (np.sin(freq * xx + phase) + np.sin(freq * yy)) - 1.2
        v = np.where(v > 0, 1.0, -1.0)
    elif kind == "rings":
        cx, cy = rng.uniform(0, size, 2)
        v = np.sin(freq * np.hypot(xx - cx, yy - cy) + phase)
    else:  # band-limited noise
        from scipy.ndimage import gaussian_filter

        v = gaussian_filter(rng.normal(size=(size, size)), rng.uniform(1.0, 2.5))
        v = v / (np.abs(v).max() + 1e-9)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (v[..., None] + 1) / 2
    arr = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_textures(root: Path, scale: float = 1.0, seed: int = 0, per_class: int = 150, test_per_class: int = 80,
                  size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", max(1, int(per_class * scale))), ("test", test_per_class)):
        for kind in TEXTURES:
            for i in range(n):
                _save(root, split, kind, i, _texture_image(kind, size, rng))
    return root


DATASETS = {"digits": make_digits, "digits28": make_digits28, "clutter": make_clutter, "textures": make_textures}


# ----------------------------------------------------------------------------------------------- methods
def vitcli(data: Path, runs: Path, name: str, extra: list[str]) -> tuple[float, float, int, float]:
    """`vitcli train DATA [extra]` as a user runs it, then `vitcli eval` on test/: (top-1, seconds, img_size,
    macro F1)."""
    import yaml

    cmd = [sys.executable, "-m", "vitcli", "train", str(data), "--set", f"train.output={runs}", "--set",
           f"train.name={name}", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=_env())
    seconds = time.time() - t0
    report = runs / f"{name}.json"
    subprocess.run([sys.executable, "-m", "vitcli", "eval", str(data), "--model", str(runs / name / "best.pt"),
                    "--json", str(report), "--output", str(runs / f"{name}-eval")], check=True,
                   stdout=subprocess.DEVNULL, env=_env())
    img_size = yaml.safe_load((runs / name / "config.yaml").read_text())["data"]["img_size"]
    result = json.loads(report.read_text())
    return result["top1"], seconds, img_size, result["macro"]["f1"]


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _arrays(data: Path, split: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of a split as float32 (N, C, H, W) in [0, 1] (resized to `size`), labels and class names."""
    classes = sorted(p.name for p in (data / "train").iterdir())
    xs, ys = [], []
    for label, c in enumerate(classes):
        for p in sorted((data / split / c).glob("*.png")):
            img = Image.open(p).convert("RGB")
            if size and img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(label)
    return np.stack(xs), np.array(ys), classes


def svm(data: Path, seed: int = 0) -> tuple[float, float, float]:
    """RBF SVM on raw pixels; C and gamma tuned on a 20% validation split of train, refit on all of train:
    (top-1, seconds, macro F1)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    t0 = time.time()
    Xtr, ytr, _ = _arrays(data, "train")
    Xte, yte, _ = _arrays(data, "test")
    Xtr, Xte = Xtr.reshape(len(Xtr), -1), Xte.reshape(len(Xte), -1)
    a, b, ya, yb = train_test_split(Xtr, ytr, test_size=0.2, stratify=ytr, random_state=seed)
    scale = 1.0 / (Xtr.shape[1] * Xtr.var())
    grid = [(c, g * scale) for c in (1, 3, 10, 30) for g in (0.3, 1, 3)]
    best = max(grid, key=lambda cg: SVC(C=cg[0], gamma=cg[1]).fit(a, ya).score(b, yb))
    pred = SVC(C=best[0], gamma=best[1]).fit(Xtr, ytr).predict(Xte)
    return float((pred == yte).mean()), time.time() - t0, macro_f1(yte, pred)


def resnet(data: Path, img_size: int, seconds: float, seed: int = 0) -> tuple[float, float]:
    """timm resnet18 from scratch (3x3 stem, no max-pool: small images), SGD + cosine fitted to `seconds` of
    wall clock (the first epoch is timed), random shifts; torch's threads (every core), as vitcli keeps for a model
    this large (its small models pick their count by a probe, which takes every core on a quiet machine)."""
    import timm
    import torch
    import torch.nn.functional as F

    t0 = time.time()
    torch.manual_seed(seed)
    Xtr, ytr, classes = _arrays(data, "train", img_size)
    Xte, yte, _ = _arrays(data, "test", img_size)
    Xtr, ytr, Xte, yte = (torch.from_numpy(v) for v in (Xtr, ytr, Xte, yte))
    mean, std = Xtr.mean(dim=(0, 2, 3), keepdim=True), Xtr.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    model = timm.create_model("resnet18", num_classes=len(classes))
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bs, pad, epochs, epoch = 64, max(1, img_size // 8), None, 0
    steps = max(1, len(Xtr) // bs)
    while epochs is None or epoch < epochs:
        t_epoch = time.time()
        model.train()
        perm = torch.randperm(len(Xtr))
        for i in range(steps):
            total = steps * (epochs or 1000)
            for g in opt.param_groups:
                g["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch * steps + i) / total)))
            idx = perm[i * bs:(i + 1) * bs]
            x = F.pad(Xtr[idx], (pad,) * 4, mode="replicate")
            dx, dy = np.random.randint(0, 2 * pad + 1, 2)
            x = x[..., dy:dy + img_size, dx:dx + img_size]
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch += 1
        if epochs is None:  # the first epoch sets how many fit in the wall clock
            epochs = max(1, int((seconds - (time.time() - t0)) / (time.time() - t_epoch)) + 1)
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(Xte[i:i + 256]).argmax(1) for i in range(0, len(Xte), 256)])
    return float((pred == yte).float().mean()), time.time() - t0, macro_f1(yte.numpy(), pred.numpy())


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 averaged over the classes, each counting the same however many test images it has."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, average="macro"))


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="share of each set's training images (default all)")
    ap.add_argument("--only", nargs="*", choices=list(DATASETS), help="datasets to run (default all)")
    ap.add_argument("--time", default="3m", help="budget for the `vitcli --time` run (default 3m)")
    ap.add_argument("--out", type=Path, default=OUT, help="where data and runs go (default examples/generated/)")
    args = ap.parse_args()
    rows = []
    for name in args.only or list(DATASETS):
        data = args.out / f"{name}-{args.scale:g}"
        if not (data / "test").is_dir():
            DATASETS[name](data, scale=args.scale)
        n_train = sum(1 for _ in (data / "train").glob("*/*.png"))
        runs = args.out / "runs" / f"{name}-{args.scale:g}-{time.strftime('%H%M%S')}"
        acc, sec, size, _ = vitcli(data, runs, "noflags", [])
        rows.append((name, n_train, "vitcli train DATA (no flags)", acc, sec))
        acc_t, sec_t, _, _ = vitcli(data, runs, "time", ["--time", args.time])
        rows.append((name, n_train, f"vitcli train DATA --time {args.time}", acc_t, sec_t))
        rows.append((name, n_train, "RBF SVM (C, gamma tuned on val)", *svm(data)[:2]))
        rows.append((name, n_train, f"ResNet-18 from scratch, {sec:.0f} s", *resnet(data, size, sec)[:2]))
        for r in rows[-4:]:
            print(f"{r[0]:<9} {r[1]:>6,} train  {r[2]:<40} top-1 {r[3]:.2%}  {r[4]:6.0f} s", flush=True)
    print("\n| dataset | train images | method | test top-1 | seconds |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]:.2%} | {r[4]:.0f} |")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
