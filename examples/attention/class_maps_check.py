"""Do class-specific maps change with the class asked about? Quadrant dataset check.

    python examples/attention/class_maps_check.py data/quadrant/val --model runs/quadrant --max-images 150

For grad-rollout, gradcam and chefer (and plain rollout, which ignores the class) prints, over the images the
model classifies correctly: the share of the map for the true class in the deciding (top-left) quadrant, and
the mean total-variation distance between the maps for the true class and for another class
(0 = identical maps, 1 = no overlap), the same as comparing `vitcli inspect attention IMG --class A` with
`--class B`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from vitcli.inspect import decode_batch, load

from vitcli.data import scan_classes
from vitcli.explain import MAP_METHODS, explain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("val", type=Path, help="folder of class subfolders (the quadrant dataset's val/ or test/)")
    ap.add_argument("--model", default=None, help="run folder or checkpoint (default: newest run)")
    ap.add_argument("--max-images", type=int, default=150)
    args = ap.parse_args()
    ld = load(args.model)
    _, split = scan_classes(args.val, ld.classes)
    pick = [i * len(split) // min(args.max_images, len(split)) for i in range(min(args.max_images, len(split)))]
    paths, labels = [split.paths[i] for i in pick], torch.tensor([split.labels[i] for i in pick])
    share, dist = {m: [] for m in MAP_METHODS}, {m: [] for m in MAP_METHODS}
    for start in range(0, len(paths), 32):
        _, _, x = decode_batch(paths[start:start + 32], ld.pre)
        y = labels[start:start + 32]
        other = (y + 1) % len(ld.classes)
        for m in MAP_METHODS:
            true_map, logits, _ = explain(ld.model, x, m, y)  # (B, gh, gw), each summing to 1
            other_map, _, _ = explain(ld.model, x, m, other)
            ok = logits.argmax(dim=1) == y
            gh, gw = true_map.shape[-2:]
            share[m] += true_map[ok, : gh // 2, : gw // 2].sum(dim=(1, 2)).tolist()
            dist[m] += (0.5 * (true_map - other_map).abs().sum(dim=(1, 2)))[ok].tolist()
    n = len(share[MAP_METHODS[0]])
    print(f"{n} correctly classified images of {len(paths)}")
    for m in MAP_METHODS:
        print(f"{m:>12}: {sum(share[m]) / n:.1%} of the true-class map in the deciding quadrant; "
              f"distance between the maps for two classes {sum(dist[m]) / n:.3f}")


if __name__ == "__main__":
    main()
