"""Share of the attention-rollout mass that falls in the quadrant that decides the class.

    python examples/attention/quadrant_check.py data/quadrant/val --model runs/quadrant

Prints validation accuracy and, over correctly classified images, the mean rollout mass in the top-left
quadrant for a few discard ratios, and the same share of the last block's class-token attention (uniform
attention would give 25%).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from vitcli.inspect import decode_batch, load

from vitcli.attention import capture_attention, head_maps, rollout_map
from vitcli.data import scan_classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("val", type=Path, help="folder of class subfolders (the quadrant dataset's val/)")
    ap.add_argument("--model", default=None, help="run folder or checkpoint (default: newest run)")
    args = ap.parse_args()
    ld = load(args.model)
    _, split = scan_classes(args.val, ld.classes)
    correct, masses, last = 0, {d: [] for d in (0.0, 0.5, 0.9)}, []
    for start in range(0, len(split), 64):
        paths, labels = split.paths[start:start + 64], torch.tensor(split.labels[start:start + 64])
        _, _, x = decode_batch(paths, ld.pre)
        cap = capture_attention(ld.model, x)
        ok = cap.logits.argmax(dim=1) == labels
        correct += int(ok.sum())
        gh, gw = cap.grid
        for d in masses:
            heat = rollout_map(cap, fusion="mean", discard_ratio=d)[ok]  # (B, gh, gw)
            masses[d] += heat[:, : gh // 2, : gw // 2].sum(dim=(1, 2)).tolist()
        heat = head_maps(cap, -1)[ok].mean(dim=1)  # (B, gh, gw): last block, mean over heads
        last += heat[:, : gh // 2, : gw // 2].sum(dim=(1, 2)).tolist()
    print(f"val accuracy {correct / len(split):.1%} ({correct}/{len(split)})")
    for d, m in masses.items():
        print(f"rollout (mean fusion, discard {d}): {sum(m) / len(m):.1%} of the mass in the deciding quadrant")
    print(f"last block, class-token attention (mean over heads): {sum(last) / len(last):.1%} in that quadrant")


if __name__ == "__main__":
    main()
