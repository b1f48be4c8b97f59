"""Make the local pretrained weights that examples/finetune.yaml fine-tunes from (no download needed).

Generates two related image sets of coloured geometric shapes:
  examples/generated/shapes-pretrain/<shape>/          filled shapes, 6 classes (pretraining task)
  examples/generated/shapes-finetune/{train,val}/<shape>/  outlined shapes, 4 classes, few training images
trains timm's small `test_vit` (64 wide, 6 blocks) on the first with vitcli, and saves its weights as
examples/generated/pretrained/test_vit_shapes.safetensors.

    python examples/make_pretrained.py            # about a minute on a 2-core CPU
    vitcli train examples/generated/shapes-finetune --config examples/finetune.yaml

benchmarks/finetune_vs_scratch.py imports the generator from here.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

PRETRAIN_SHAPES = ("circle", "square", "triangle", "hexagon", "cross", "star")
FINETUNE_SHAPES = ("circle", "square", "triangle", "hexagon")  # drawn as outlines: a related, new task
HERE = Path(__file__).parent
OUT = HERE / "generated"


def polygon(cx: float, cy: float, r: float, sides: int, turn: float, star: bool = False) -> list[tuple]:
    n = sides * 2 if star else sides
    pts = []
    for i in range(n):
        rr = r * (0.45 if star and i % 2 else 1.0)
        a = turn + 2 * math.pi * i / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def shape_image(kind: str, size: int, rng: random.Random, outline: bool = False) -> Image.Image:
    """A noisy dark background with one randomly placed, sized, turned and coloured shape."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 70) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(size // 2):  # speckle noise
        x, y = rng.randrange(size), rng.randrange(size)
        d.point((x, y), fill=tuple(rng.randint(0, 110) for _ in range(3)))
    r = rng.uniform(0.28, 0.42) * size
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    colour = tuple(rng.randint(120, 255) for _ in range(3))
    turn = -math.pi / 2 + rng.uniform(-0.3, 0.3)  # upright, slightly tilted
    width = max(1, size // 16)
    style = {"outline": colour, "width": width} if outline else {"fill": colour}
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), **style)
    elif kind == "square":
        d.polygon(polygon(cx, cy, r, 4, turn), **style)
    elif kind == "triangle":
        d.polygon(polygon(cx, cy, r, 3, turn), **style)
    elif kind == "hexagon":
        d.polygon(polygon(cx, cy, r, 6, turn), **style)
    elif kind == "star":
        d.polygon(polygon(cx, cy, r, 5, turn, star=True), **style)
    elif kind == "cross":
        for a in (turn, turn + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=max(2, size // 8))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return img


def make_shapes(root: Path, shapes, per_class: int, size: int, seed: int, outline: bool = False) -> Path:
    """root/<shape>/<i>.png for each shape."""
    rng = random.Random(seed)
    for kind in shapes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(kind, size, rng, outline).save(folder / f"{kind}_{i:04d}.png")
    return root


def make_finetune_set(root: Path, train_per_class: int, val_per_class: int, size: int, seed: int) -> Path:
    """root/train/<shape>/ and root/val/<shape>/ of outlined shapes."""
    make_shapes(root / "train", FINETUNE_SHAPES, train_per_class, size, seed, outline=True)
    make_shapes(root / "val", FINETUNE_SHAPES, val_per_class, size, seed + 1, outline=True)
    return root


def pretrain(data: Path, weights: Path, *, img_size: int, epochs: int, output: Path) -> float:
    """Train timm/test_vit on `data` with vitcli and save the best weights; returns its val accuracy."""
    from safetensors.torch import save_file

    from vitcli.checkpoint import load_checkpoint
    from vitcli.config import load_config
    from vitcli.train import train

    cfg = load_config(flags={"model.name": "timm/test_vit", "data.img_size": img_size, "train.epochs": epochs,
                             "train.output": str(output), "train.name": "pretrain", "data.batch_size": 32},
                      overrides=["model.pretrained=false", "data.crop_pct=1.0", "data.scale_min=0.6", "optim.lr=2e-3",
                                 "train.precision=fp32", "train.threads=1"])
    res = train(cfg, data)
    state = load_checkpoint(res.run_dir / "best.pt")["model"]
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return res.best_acc


if __name__ == "__main__":
    pre = make_shapes(OUT / "shapes-pretrain", PRETRAIN_SHAPES, 150, 64, seed=0)
    make_finetune_set(OUT / "shapes-finetune", 10, 40, 64, seed=100)
    weights = OUT / "pretrained" / "test_vit_shapes.safetensors"
    acc = pretrain(pre, weights, img_size=64, epochs=15, output=OUT / "runs")
    print(f"pretrained on {pre} (val accuracy {acc:.3f}); weights: {weights}")
