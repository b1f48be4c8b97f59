"""Start-up and throughput of `vitcli predict`, measured in one run against plain baselines.

    python benchmarks/predict_speed.py [--images 500] [--repeats 3]

Prints, each as the median of --repeats runs of a fresh process:
  1. `vitcli --help` wall time                                  (target <= 0.3 s)
  2. `vitcli predict one.jpg` / `python -c "import torch"`      (target <= 1.3x), from-scratch vit-tiny/16
  3. images/s predicting a folder of --images JPEGs (640x480) with vitcli vs a plain
     PyTorch + timm + torchvision DataLoader script on the same weights  (target >= 1.2x)
Everything runs in a temporary folder; wall times include process start-up, as a user sees them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = r'''
import json, sys, time
import timm, torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

folder, weights, classes, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

class Files(Dataset):
    def __init__(self, paths): self.paths = paths
    def __len__(self): return len(self.paths)
    def __getitem__(self, i): return tf(Image.open(self.paths[i]).convert("RGB")), i

paths = sorted(str(p) for p in __import__("pathlib").Path(folder).rglob("*.jpg"))
model = timm.create_model("vit_tiny_patch16_224", num_classes=classes)
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval()
loader = DataLoader(Files(paths), batch_size=64, num_workers=2)
with torch.inference_mode(), open(out, "w") as f:
    for x, idx in loader:
        p = model(x).softmax(-1)
        conf, cls = p.max(-1)
        for i, c, q in zip(idx.tolist(), cls.tolist(), conf.tolist()):
            f.write(json.dumps({"file": paths[i], "class": c, "prob": q}) + "\n")
'''


def wall(cmd: list[str], repeats: int, cwd: Path) -> float:
    """Median wall time of running `cmd` `repeats` times (output discarded; a failure stops the script)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t)
        if res.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return statistics.median(times)


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-sized JPEGs (640x480): a colour gradient with a few random shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        a, b = [tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(2)]
        img = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        img = Image.composite(Image.new("RGB", img.size, a), Image.new("RGB", img.size, b), img.convert("L"))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x, y, r = rng.randint(0, 640), rng.randint(0, 480), rng.randint(20, 120)
            d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        img.save(folder / f"img_{i:04d}.jpg", quality=90)


def make_checkpoint(root: Path, classes: int) -> tuple[Path, Path]:
    """The default `vitcli train` model (from-scratch vit-tiny/16, 224 px) as best.pt, and its bare state
    dict for the timm baseline (the from-scratch ViT uses timm's parameter names)."""
    import torch

    from vitcli.checkpoint import make_checkpoint, save_checkpoint
    from vitcli.config import Config, to_dict
    from vitcli.data import preprocess_info
    from vitcli.models import build_model

    cfg = Config()
    d = cfg.data
    torch.manual_seed(0)
    model, spec = build_model(cfg.model, classes, d.img_size)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = make_checkpoint(model_spec=spec, classes=[f"class_{i}" for i in range(classes)],
                           preprocess=preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std),
                           config=to_dict(cfg), state_dict=state)
    path = root / "runs" / "bench" / "best.pt"
    save_checkpoint(path, ckpt)
    torch.save(state, root / "weights.pt")
    return path, root / "weights.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    exe = shutil.which("vitcli")
    vitcli = [exe] if exe else [sys.executable, "-m", "vitcli"]
    py = sys.executable
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"python {sys.version.split()[0]}; {' '.join(vitcli)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, weights = make_checkpoint(root, classes=10)
        make_images(root / "photos", args.images)
        one = root / "photos" / "img_0000.jpg"
        r = args.repeats

        t_help = wall(vitcli + ["--help"], max(5, r), root)
        t_pass = wall([py, "-c", "pass"], max(5, r), root)
        print(f"1. vitcli --help: {t_help:.3f} s (target <= 0.3 s); bare 'python -c pass': {t_pass:.3f} s")

        t_torch = wall([py, "-c", "import torch"], r, root)
        t_one = wall(vitcli + ["predict", str(one), "--model", str(ckpt)], r, root)
        print(f"2. python -c 'import torch': {t_torch:.2f} s; vitcli predict one.jpg: {t_one:.2f} s "
              f"-> {t_one / t_torch:.2f}x (target <= 1.3x)")

        n = args.images
        base = root / "baseline.py"
        base.write_text(BASELINE)
        t_base = wall([py, str(base), str(root / "photos"), str(weights), "10", str(root / "b.jsonl")], r, root)
        rows = [("baseline (timm + torchvision DataLoader, 2 workers, fp32)", t_base)]
        for prec in ("auto", "fp32"):
            t = wall(vitcli + ["predict", str(root / "photos"), "--model", str(ckpt), "--format", "jsonl",
                               "--output", str(root / "v.jsonl"), "--precision", prec], r, root)
            rows.append((f"vitcli predict --precision {prec}", t))
        print(f"3. folder of {n} JPEGs (640x480), vit-tiny/16 at 224 px, end to end:")
        for name, t in rows:
            print(f"   {name:<60} {t:6.2f} s  {n / t:7.1f} images/s  ({t_base / t:.2f}x baseline)")
        print("   target: vitcli >= 1.2x baseline images/s")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other processes on the machine skew all timings)")


if __name__ == "__main__":
    main()
