"""Real-data benchmark: vitcli with no flags and at two time budgets, against an RBF SVM and a ResNet-18 from
scratch given each vitcli run's wall clock; test top-1, macro F1 and seconds in one table.

    python benchmarks/real_data.py ../shared/data/cifar10_test.npz       # an npz: split 80/20 per class, seeded
    python benchmarks/real_data.py PHOTOS --time 10m 30m                 # a folder of train/ and test/ class folders
    python benchmarks/real_data.py A B --skip-resnet                     # several sets, no ResNet

DATA is a folder with train/ and test/ class folders (vitcli holds 20% of train/ out for validation and is
tested on test/), or an .npz with arrays x (N, H, W[, 3]) uint8, y (N,) and optionally names: 20% of each class
(seeded) becomes test/, the rest train/, written once under examples/generated/real_data/ (git ignores it; the
data is never committed). Every run is a whole command as a user types it, timed from start to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_data import resnet, svm, vitcli  # noqa: E402  (the same methods as the small-data benchmark)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "generated" / "real_data"


def folders_from_npz(npz: Path, out: Path, seed: int = 0) -> Path:
    """x / y (/ names) arrays -> out/train and out/test class folders, 20% of each class to test (seeded)."""
    if (out / "test").is_dir():
        return out
    d = np.load(npz)
    x, y = d["x"], d["y"]
    names = [str(n) for n in d["names"]] if "names" in d else [str(c) for c in sorted(set(y.tolist()))]
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        idx = rng.permutation(np.flatnonzero(y == c))
        for k, i in enumerate(idx):
            folder = out / ("test" if k < len(idx) // 5 else "train") / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
    return out


def run_set(data: Path, budgets: list[str], skip_resnet: bool) -> list[tuple]:
    """Every method on one dataset: rows (set, train images, method, top-1, macro F1, seconds)."""
    n_train = sum(1 for p in (data / "train").rglob("*") if p.is_file())
    runs = OUT / "runs" / f"{data.name}-{time.strftime('%H%M%S')}"
    name, rows = data.name, []
    for label, extra in [("no flags", []), *((f"--time {b}", ["--time", b]) for b in budgets)]:
        acc, sec, size, f1 = vitcli(data, runs, label.replace(" ", "").replace("-", ""), extra)
        rows.append((name, n_train, f"vitcli train DATA ({label})" if not extra else f"vitcli train DATA {label}",
                     acc, f1, sec))
        if not skip_resnet:
            r_acc, r_sec, r_f1 = resnet(data, size, sec)
            rows.append((name, n_train, f"ResNet-18 from scratch, {sec:.0f} s", r_acc, r_f1, r_sec))
    s_acc, s_sec, s_f1 = svm(data)
    rows.append((name, n_train, "RBF SVM on raw pixels (C, gamma tuned on val)", s_acc, s_f1, s_sec))
    for r in rows:
        print(f"{r[0]:<14} {r[1]:>6,} train  {r[2]:<46} top-1 {r[3]:.2%}  macro F1 {r[4]:.3f}  {r[5]:6.0f} s",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", type=Path, help="folders of train/ + test/, or .npz files")
    ap.add_argument("--time", nargs=2, default=["10m", "30m"], metavar=("SHORT", "LONG"),
                    help="the two `vitcli --time` budgets (default 10m 30m)")
    ap.add_argument("--skip-resnet", action="store_true", help="leave out the ResNet-18 runs")
    args = ap.parse_args()
    rows = []
    for data in args.data:
        if data.suffix == ".npz":
            data = folders_from_npz(data, OUT / data.stem)
        elif not (data / "train").is_dir() or not (data / "test").is_dir():
            sys.exit(f"error: '{data}' needs train/ and test/ class folders (or give an .npz)")
        rows += run_set(data, args.time, args.skip_resnet)
    print("\n| data | train images | method | test top-1 | macro F1 | seconds |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]:.1%} | {r[4]:.3f} | {r[5]:.0f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
