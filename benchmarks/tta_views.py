"""Which test-time views pay: one view, the mirror, and the shifted views, on trained runs' own validation images
and on a held-out test folder.

    python benchmarks/tta_views.py TEST_FOLDER RUN [RUN ...]

Each RUN is a `vitcli train` run folder (its best.pt, its split.csv and the training folder the checkpoint names);
TEST_FOLDER holds class subfolders named like the model's classes. Prints, per run and split, top-1 for:
  1v   the image alone
  2v   the image and its mirror                         (the default before shifted views)
  6v   those two plus the image shifted 1/16 of the side four ways (not the mirror's)
  10v  the image and its mirror, each also shifted four ways (`vitcli.augment.tta_views`, today's default for
       small mirrored photos)
and the mean over the runs. The views' choice is read off the validation rows; the test rows report it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def images(paths: list[Path], pre: dict):
    import torch

    from vitcli.decode import decode_square

    return torch.stack([decode_square(p, pre["resize_size"], pre["interpolation"]) for p in paths])


def scores(pred, x, y) -> dict[str, float]:
    """uint8 (N, 3, R, R), labels (N,) -> top-1 (%) of each view set."""
    import torch

    from vitcli.augment import center_crop, tta_views

    pre = dict(pred.preprocess, shift=max(1, pred.preprocess["img_size"] // 16))
    x = center_crop(x, pre["img_size"])
    views = tta_views(x, pre)  # image, mirror, image shifted x4, mirror shifted x4
    logits = [torch.cat([pred.logits(v[i:i + 256]) for i in range(0, len(v), 256)]) for v in views]

    def top1(chosen) -> float:
        return 100.0 * (sum(logits[i] for i in chosen).argmax(1) == y).float().mean().item()

    return {"1v": top1([0]), "2v": top1([0, 1]), "6v": top1([0, 1, 2, 3, 4, 5]), "10v": top1(range(10))}


def main() -> None:
    import torch

    from vitcli.checkpoint import load_checkpoint
    from vitcli.inference import load_predictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("test", type=Path, help="held-out folder of class subfolders")
    ap.add_argument("runs", type=Path, nargs="+", help="vitcli run folders")
    args = ap.parse_args()
    total: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    for run in args.runs:
        pred = load_predictor(str(run), "cpu", "auto")
        pred.set_tta(False)
        classes = pred.classes
        data_dir = Path(load_checkpoint(run / "best.pt")["data_dir"])
        with open(run / "split.csv", newline="") as f:
            val = [(data_dir / r["path"], r["class"]) for r in csv.DictReader(f) if r["split"] == "val"]
        test = [(p, c) for c in classes for p in sorted((args.test / c).iterdir()) if p.is_file()]
        row = []
        for name, items in (("val", val), ("test", test)):
            x = images([p for p, _ in items], pred.preprocess)
            y = torch.tensor([classes.index(c) for _, c in items])
            got = scores(pred, x, y)
            for k, v in got.items():
                total[name][k] = total[name].get(k, 0.0) + v / len(args.runs)
            row.append(f"{name} ({len(items)}): " + "  ".join(f"{k} {v:.2f}" for k, v in got.items()))
        print(f"{run}  " + " | ".join(row), flush=True)
    print("mean  " + " | ".join(f"{name}: " + "  ".join(f"{k} {v:.2f}" for k, v in t.items())
                                for name, t in total.items()))


if __name__ == "__main__":
    main()
