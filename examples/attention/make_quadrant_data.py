"""Write a dataset whose class is decided only by the top-left quadrant (for checking attention maps).

Each image is noise with coloured shapes. The colour of the shape in the top-left quadrant is the class;
the other quadrants hold shapes of random colours (or none) that carry no information.

    python examples/attention/make_quadrant_data.py data/quadrant --size 64 --train 600 --val 150
    python examples/attention/make_quadrant_data.py data/quadcal --train 600 --val 300 --test 300 --noise 0.2
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def quadrant_image(label: str, size: int, rng: random.Random, noise: float = 0.0) -> Image.Image:
    img = Image.effect_noise((size, size), 40).convert("RGB").point(lambda v: v // 4)
    draw = ImageDraw.Draw(img)
    half = size // 2
    for q in range(4):
        if q and rng.random() < 0.3:
            continue
        decides = q == 0 and rng.random() >= noise  # with probability `noise` the label is not visible
        colour = COLOURS[label] if decides else rng.choice(list(COLOURS.values()))
        r = rng.randint(half // 5, half // 3)
        oy, ox = (q // 2) * half, (q % 2) * half
        cy, cx = oy + rng.randint(r, half - r), ox + rng.randint(r, half - r)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=colour)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--size", type=int, default=64, help="image side, pixels")
    ap.add_argument("--train", type=int, default=600, help="training images per class")
    ap.add_argument("--val", type=int, default=150, help="validation images per class")
    ap.add_argument("--test", type=int, default=0, help="held-out test images per class (0 = no test/ split)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="share of images whose top-left shape has a random colour (a task no model can ace)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        if n == 0:
            continue
        for label in COLOURS:
            folder = args.root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                quadrant_image(label, args.size, rng, args.noise).save(folder / f"{label}_{i:04d}.png")


if __name__ == "__main__":
    main()
