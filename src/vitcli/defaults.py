"""Data-aware defaults: input size, token grid, model size, stem, augmentation and run length from the data.

For a model trained from scratch, every key the user did not set (YAML file, flag, `--set`) is chosen from the
scan: a header-only sample of the image sizes, the number of training images, and the compute per step on the
device. Each choice is printed with its reason; the training recipe (recipes.py) then fills the rest.
Pretrained models keep their input size, and `train.recipe: none` turns this off as well.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitcli.config import Config

PHOTO_SIDE = 160  # median shorter side (px) from which images count as photos: they train at 224 px
PHOTO_SIZE = 224  # input side for photos, pixels
SMALL_SIDE = 64  # below this median shorter side (px): whole-image eval, shift/scale/rotate augmentation
MIN_SIZE = 16  # smallest input side, pixels (8 px images are upsampled to it)
MAX_GRID = 12  # small images: largest token-grid side (attention cost grows with the square of the tokens)
TARGET_STEPS = 1000  # optimiser steps a from-scratch run aims for; epochs = TARGET_STEPS / steps per epoch
MIN_EPOCHS, MAX_EPOCHS = 10, 100  # bounds on the chosen number of epochs
CPU_RUN_MACS = 2e13  # CPU: multiply-adds a default run may spend (~3-4 min on 2 cores); caps the epochs
CPU_MACS_PER_S = 5e10  # CPU: multiply-adds a second one thread trains at (bf16, AVX-512), for a first guess
CPU_STEP_MACS = 3e8  # CPU: forward multiply-adds per image above which the next smaller model is taken
FEW_PHOTOS = 20_000  # photos from scratch below this many training images get the fine-tuning hint
# model ladder: (fewer than this many training images, width, depth, heads)
LADDER = [(1_000, 96, 4, 3), (5_000, 128, 4, 4), (20_000, 192, 6, 3), (100_000, 192, 12, 3),
          (10**12, 384, 12, 6)]


@dataclass
class DataFacts:
    """What the scan tells about the training data."""

    n_train: int  # training images
    sizes: list[tuple[int, int]]  # (width, height) of a sample of them
    device_type: str = "cpu"  # cpu | cuda | mps
    data_dir: str = "DATA"  # for the printed hint


@dataclass
class Choice:
    values: dict[str, Any]  # key -> value wanted
    why: str  # one clause: the reason
    applied: dict[str, Any] = field(default_factory=dict)  # what was set (keys the user left alone)


def median_side(sizes: list[tuple[int, int]]) -> int:
    """Median shorter side of the sampled images (224 when nothing could be read)."""
    return int(statistics.median(min(w, h) for w, h in sizes)) if sizes else PHOTO_SIZE


def input_size(side: int) -> int:
    """Photos train at PHOTO_SIZE; smaller images at about their own size (at least MIN_SIZE)."""
    return PHOTO_SIZE if side >= PHOTO_SIDE else max(MIN_SIZE, side)


def patch_size(img_size: int) -> int:
    """16 for photo-sized inputs; else the smallest power of two leaving a grid of at most MAX_GRID."""
    if img_size >= PHOTO_SIDE:
        return 16
    return next((p for p in (2, 4, 8, 16) if img_size / p <= MAX_GRID + 0.5), 32)


def forward_macs(img_size: int, patch: int, dim: int, depth: int, stem: str, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of one forward pass of the scratch ViT (blocks, stem; the head is negligible)."""
    from vitcli.vit import conv_stem_layout

    grid = img_size // patch
    n = grid * grid + 1
    block = (4 + 2 * mlp_ratio) * n * dim * dim + 2 * n * n * dim  # qkv + proj, MLP, attention
    if stem == "conv":
        stem_macs, side, c_in = 0.0, img_size, 3
        for c_out, s in zip(*conv_stem_layout(patch, dim), strict=True):
            side //= s
            stem_macs += side * side * 9 * c_in * c_out
            c_in = c_out
        stem_macs += grid * grid * c_in * dim  # 1x1 projection
    else:
        stem_macs = grid * grid * 3 * patch * patch * dim
    return depth * block + stem_macs


def choices(cfg: Config, recipe: str, facts: DataFacts, world: int = 1) -> list[Choice]:
    """The data-aware values for a from-scratch run, each group with its reason (before the user's keys)."""
    from vitcli.config import user_keys
    from vitcli.models import PRESETS, parse_preset, with_patch

    mine = user_keys(cfg)
    side = median_side(facts.sizes)
    out: list[Choice] = []
    img = cfg.data.img_size if "data.img_size" in mine else input_size(side)
    base, given = parse_preset(cfg.model.name)
    given = given if "model.name" in mine else None
    patch = given or patch_size(img)
    if "data.img_size" in mine:
        while img % patch and patch > 1:  # the user's size: a patch that divides it
            patch //= 2
    else:  # the image's own size, rounded to whole patches
        img = max(patch, round(img / patch) * patch)
        what = f"the images are about {side} px on the shorter side"
        out.append(Choice({"data.img_size": img}, what + (": photos train at 224 px" if img == PHOTO_SIZE else
                                                          ": small images are not blown up to 224 px")))
    # token grid, stem, width and depth: a ladder by training-set size, one rung down when a CPU step is dear
    if "model.name" not in mine:
        out.append(Choice({"model.name": with_patch(cfg.model.name, patch)},
                          f"patch {patch}: a {img // patch}x{img // patch} token grid on {img} px"))
    stem = cfg.model.stem
    if recipe == "scratch-small" and "model.stem" not in mine and patch & (patch - 1) == 0:
        stem = "conv"
        out.append(Choice({"model.stem": stem}, "a convolutional stem learns from few images far better than "
                                                "linear patches (Xiao et al. 2021)"))
    rung = next(i for i, r in enumerate(LADDER) if facts.n_train < r[0])
    cpu = facts.device_type == "cpu"
    while cpu and rung > 0 and forward_macs(img, patch, *LADDER[rung][1:3], stem) > CPU_STEP_MACS:
        rung -= 1
    _, dim, depth, heads = LADDER[rung]
    sized = not ({"model.name", "model.embed_dim", "model.depth", "model.num_heads"} & mine)
    if sized:
        out.append(Choice({"model.embed_dim": dim, "model.depth": depth, "model.num_heads": heads},
                          f"width {dim}, {depth} blocks for {facts.n_train:,} training images"
                          + (" and a CPU" if cpu else "")))
    else:
        dim, depth, _ = PRESETS.get(base, PRESETS["vit-tiny"])
        dim, depth = cfg.model.embed_dim or dim, cfg.model.depth or depth  # the preset's size unless overridden
    macs = forward_macs(img, patch, dim, depth, stem)
    out += _augment(img, side)
    out += _epochs(cfg, facts, world, macs if cpu else 0.0)
    if cpu and macs <= CPU_STEP_MACS:  # a large model keeps torch's threads: on a quiet machine they pay off
        out.append(Choice({"train.threads": 1}, "a small model: threads that wait on each other run 10-30x slower "
                          "whenever other processes share the cores, and a second one gains little"))
    return out


def _augment(img: int, side: int) -> list[Choice]:
    if side >= SMALL_SIDE:
        return []
    return [Choice({"data.crop_pct": 1.0, "data.scale_min": 0.75, "data.ratio_max": 1.2, "data.translate": 0.08,
                    "data.rotate": 10.0, "data.hflip": 0.0},
                   "small images: shift, scale and rotate a little rather than crop 8% of the area; no mirror "
                   "(it can change the class, as for digits and letters); evaluate the whole image")]


def _epochs(cfg: Config, facts: DataFacts, world: int, macs: float) -> list[Choice]:
    from vitcli.config import user_keys

    if "train.epochs" in user_keys(cfg):
        return []
    steps = max(1, facts.n_train // (cfg.data.batch_size * world * cfg.train.accum_steps))
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, round(TARGET_STEPS / steps)))
    why = f"~{TARGET_STEPS} steps of {steps} an epoch"
    if cfg.train.time and macs:  # a first guess; the budget fixes the number once it has timed some steps
        guess = int(cfg.train.seconds * CPU_MACS_PER_S / (3 * macs * facts.n_train))
        epochs = max(1, min(epochs, guess))
        return [Choice({"train.epochs": epochs}, f"about what fits in {cfg.train.time} on a CPU (the time budget "
                                                 "sets the number after timing the first steps)")]
    if macs:
        cap = int(CPU_RUN_MACS / (3 * macs * facts.n_train))
        if cap < epochs:
            epochs = max(MIN_EPOCHS, cap)
            why = f"what a CPU trains in a few minutes ({macs / 1e6:.0f} M multiply-adds an image forward)"
    return [Choice({"train.epochs": epochs}, why)]


def apply_defaults(cfg: Config, recipe: str, facts: DataFacts, world: int = 1) -> list[Choice]:
    """Set the chosen values on the keys the user did not set; returns the choices with what was applied."""
    from vitcli.config import user_keys

    mine = user_keys(cfg)
    made = choices(cfg, recipe, facts, world)
    for choice in made:
        for key, value in choice.values.items():
            section, attr = key.split(".")
            if key not in mine:
                setattr(getattr(cfg, section), attr, value)
                choice.applied[key] = value
    return [c for c in made if c.applied]


def finetune_facts(cfg: Config, facts: DataFacts | None) -> dict[str, Any]:
    """What `model.pretrained: auto` (pretrained.py) needs from the scan: whether the images are photos, their
    median shorter side, and the multiply-adds a CPU run may spend (0 when not on a CPU or without a scan)."""
    if facts is None:
        return {"photos": False, "side": PHOTO_SIZE, "cpu_macs": 0.0}
    side = median_side(facts.sizes)
    budget = cfg.train.seconds * CPU_MACS_PER_S if cfg.train.time else CPU_RUN_MACS
    return {"photos": side >= PHOTO_SIDE, "side": side, "cpu_macs": budget if facts.device_type == "cpu" else 0.0}


def photo_hint(cfg: Config, facts: DataFacts) -> str | None:
    """For few photo-sized images from scratch: the command that fine-tunes pretrained timm weights instead."""
    if median_side(facts.sizes) < PHOTO_SIDE or facts.n_train >= FEW_PHOTOS:
        return None
    return (f"{facts.n_train:,} photos are few for a ViT from scratch; fine-tuning pretrained weights usually does "
            f"far better: vitcli train {facts.data_dir} --model timm/vit_tiny_patch16_224 --set model.pretrained=true"
            " (downloads the weights through timm), or --set model.pretrained_file=WEIGHTS.safetensors with a local "
            "file")
