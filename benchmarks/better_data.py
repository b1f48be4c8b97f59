"""Better data on examples/digits (1,797 images, 10 classes): the wrong-label finder and `vitcli select`.

label-errors: flips 5% of the labels (seeded), runs `vitcli cv --folds 5` with examples/digits.yaml (20 epochs a
fold) on the noisy and on the clean labels, then `vitcli inspect data --label-errors --from` each; prints the
cv mean ± std and the finder's precision and recall among its top K (K = labels flipped) and its list length on
the clean labels.

select: from a seed set of 3 images per class of digits/train, trains a model, picks N more images with
`vitcli select` (each strategy; and N at random), trains on seed + picks and on seed + random, and prints the best
validation accuracy of each (examples/digits/val) per seed and their mean.

    python benchmarks/better_data.py label-errors     # ~30 min on a busy 2-core CPU
    python benchmarks/better_data.py select --n 60    # ~40 min
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
CONFIG = ROOT / "examples" / "digits.yaml"
STRATEGIES = ("badge", "margin")


def vitcli(*args, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-m", "vitcli", *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=cwd)
    if r.returncode:
        sys.exit(f"vitcli {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def images(split: str = "") -> list[tuple[Path, str]]:
    return sorted((p.resolve(), p.parent.name) for p in (DIGITS / split).rglob("*.png"))


def label_errors(work: Path, epochs: int, share: float) -> None:
    rows = images()
    rng = random.Random(0)
    flipped = set(rng.sample(range(len(rows)), round(share * len(rows))))
    classes = sorted({c for _, c in rows})
    for name, flip in (("noisy", flipped), ("clean", set())):
        with open(work / f"{name}.csv", "w") as f:
            f.write("path,label\n")
            for i, (p, c) in enumerate(rows):
                f.write(f"{p},{rng.choice([x for x in classes if x != c]) if i in flip else c}\n")
        cv = json.loads(vitcli("cv", f"{name}.csv", "--folds", 5, "--config", CONFIG, "--epochs", epochs,
                               "--set", "train.report=false", "--name", f"cv-{name}", "--json", cwd=work))
        top1 = cv["summary"]["top1"]
        rep = json.loads(vitcli("inspect", "data", f"{name}.csv", "--label-errors", "--from", f"runs/cv-{name}",
                                "--json", cwd=work))
        print(f"{name}: cv top-1 {top1['mean']:.4f} ± {top1['std']:.4f}; flagged {rep['flagged']} of "
              f"{rep['images']}", flush=True)
        if flip:
            want = {str(rows[i][0]) for i in flip}
            top = {r["path"] for r in rep["issues"][:len(want)]}
            print(f"  top {len(want)} (= labels flipped): precision = recall = {len(top & want) / len(want):.3f}")


def best_val(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        return max(float(r["val_acc"]) for r in csv.DictReader(f))


def select_vs_random(work: Path, n: int, epochs: int, seeds: int) -> None:
    train, val = images("train"), images("val")

    def write(name: str, rows: list[tuple[Path, str]], split: bool = True) -> str:
        with open(work / name, "w") as f:
            f.write("path,label,split\n" if split else "path,label\n")
            f.writelines(f"{p},{c}" + (",train\n" if split else "\n") for p, c in rows)
            if split:
                f.writelines(f"{p},{c},val\n" for p, c in val)
        return name

    results = []
    for seed in range(seeds):
        rng = random.Random(seed)
        by_class: dict[str, list[int]] = {}
        for i, (_, c) in enumerate(train):
            by_class.setdefault(c, []).append(i)
        first = [i for c in sorted(by_class) for i in rng.sample(by_class[c], 3)]
        rest = [i for i in range(len(train)) if i not in set(first)]
        common = ["--config", CONFIG, "--epochs", epochs, "--set", "train.report=false", "--set", f"train.seed={seed}"]
        vitcli("train", write(f"seed{seed}.csv", [train[i] for i in first]), *common, "--name", f"seed{seed}",
               cwd=work)
        seed_rows = [train[i] for i in first]
        write(f"unlabelled{seed}.csv", [train[i] for i in rest], split=False)
        write(f"labelled{seed}.csv", seed_rows, split=False)
        for strategy in STRATEGIES:
            out = json.loads(vitcli("select", f"unlabelled{seed}.csv", "--model", f"runs/seed{seed}", "--n", n,
                                    "--strategy", strategy, "--seed", seed, "--labelled", f"labelled{seed}.csv",
                                    "--json", "-o", f"{strategy}{seed}", cwd=work))
            picked = {Path(r["path"]) for r in out["selected"]}
            vitcli("train", write(f"{strategy}{seed}.csv", seed_rows + [t for t in train if t[0] in picked]),
                   *common, "--name", f"{strategy}{seed}", cwd=work)
        vitcli("train", write(f"random{seed}.csv", seed_rows + [train[i] for i in rng.sample(rest, n)]), *common,
               "--name", f"random{seed}", cwd=work)
        r = [best_val(work / "runs" / f"{k}{seed}") for k in ("seed", *STRATEGIES, "random")]
        results.append(r)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in zip(("seed set", *STRATEGIES, "random"), r,
                                                                          strict=True)), flush=True)
    m = np.mean(results, 0)
    print(f"mean over {seeds} seeds: " + ", ".join(f"{k} {v:.4f}" for k, v in zip(("seed set", *STRATEGIES,
                                                                                   "random"), m, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["label-errors", "select"])
    ap.add_argument("--n", type=int, default=60, help="select: images to pick")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (label-errors 20, select 60)")
    ap.add_argument("--seeds", type=int, default=3, help="select: seeds to average over")
    ap.add_argument("--share", type=float, default=0.05, help="label-errors: share of labels flipped")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.what == "label-errors":
            label_errors(Path(tmp), a.epochs or 20, a.share)
        else:
            select_vs_random(Path(tmp), a.n, a.epochs or 60, a.seeds)


if __name__ == "__main__":
    main()
