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
    from vitcli.looks import Looks

PHOTO_SIDE = 160  # median shorter side (px) from which images count as photos: they train at 224 px
PHOTO_SIZE = 224  # input side for photos, pixels
SMALL_SIDE = 64  # below this median shorter side (px): whole-image eval, shift/scale/rotate augmentation
MIN_SIZE = 16  # smallest input side, pixels (8 px images are upsampled to it)
MAX_GRID = 12  # small images: largest token-grid side (attention cost grows with the square of the tokens)
TARGET_STEPS = 1000  # optimiser steps a from-scratch run aims for; epochs = TARGET_STEPS / steps per epoch
MIN_EPOCHS, MAX_EPOCHS = 10, 100  # bounds on the chosen number of epochs
CPU_RUN_MACS = 2.4e13  # CPU: multiply-adds of a default run (~8 min at CPU_MACS_PER_S): its first guess of epochs
CPU_RUN_TIME = "9m"  # CPU: the budget a default run fits its epochs to once timed (more when faster, fewer when slower)
CPU_MACS_PER_S = 5e10  # CPU: multiply-adds a second one thread trains at (bf16, AVX-512), for a first guess
THREAD_GAIN = 0.7  # CPU: the speed-up of each doubling of the cores a step runs on, for a first guess (the thread
# probe measured 1.7x on 2 cores; a 30-minute CIFAR-10 run on 2 cores trained at 2x CPU_MACS_PER_S, so one thread's
# rate alone guessed 64 epochs where 100 fit, and the augmentation level followed the guess)
CPU_STEP_MACS = 3e8  # CPU: forward multiply-adds per image above which the next smaller model is taken
FEW_PHOTOS = 20_000  # photos from scratch below this many training images get the fine-tuning hint
ENOUGH_EPOCHS = 15  # CPU: a smaller model rather than one a default run trains for fewer epochs than this
ROOMY_EPOCHS = 150  # CPU time budget: the next larger model once the budget trains it for this many epochs
LIGHT_EPOCHS = 20  # from-scratch runs this long get light augmentation (mixup 0.2, erasing 0.1, EMA)
# ... and this long medium: light's crops plus RandAugment at magnitude 6 and erasing 0.25 instead of mixup, on images
# of 32 px and up, for a model at least MEDIUM_WIDTH wide (the 30-minute CIFAR-10 run, 128 wide, same seed: 74.30%
# test top-1 against 72.35% with mixup 0.2 kept and 71.15% with light augmentation; 480 CIFAR-10 photos of 5
# classes, 96 wide, 100 epochs: 60.15% against 62.25%, mean of two seeds)
MEDIUM_EPOCHS, MEDIUM_WIDTH = 60, 128
BIG_IMAGES = 32  # RandAugment's and cutmix's geometry is sized for images of this side (px) and up
HEAVY_EPOCHS = 100  # ... and this long the full DeiT regime (RandAugment, mixup 0.8, cutmix 1.0, erasing 0.25)
# ... for a model at least this wide (DeiT-Ti's width, the smallest DeiT trained with it): smaller models prefer
# lighter augmentation (Steiner et al. 2021); the 128-wide no-flags CIFAR-10 model with the heavy set stood at 58%
# validation at 63% of a 30-minute run, where light augmentation stood at 69%
HEAVY_WIDTH = 192
# a folder vitcli splits holds out this many images for validation (at least VAL_PER_CLASS a class, at least
# MIN_VAL_FRACTION) when that is less than data.val_fraction's 20%: enough to pick best.pt and fit the temperature
# and conformal scores (+-1.5 points on the accuracy), and the rest train
VAL_IMAGES, VAL_PER_CLASS, MIN_VAL_FRACTION = 1000, 50, 0.1
FEW_STEPS = 400  # a run with fewer optimiser steps than this at its batch size takes a smaller batch (down to 16)
# `data.batch_size: auto`: rows (tokens) a step's matmuls need to run near the matrix units' limit, by device; on
# 2 AVX-512 BF16 cores a 64 x 65-token step already reaches ~90% of the square-matmul GFLOP/s
AUTO_TOKENS = {"cpu": 4096, "cuda": 65536, "mps": 16384}
MAX_AUTO_BATCH = 1024  # largest batch `auto` picks
GPU_MEMORY_SHARE = 0.5  # CUDA: share of the free memory the activations of an auto-sized batch may take
# photos: smallest random crop (share of the area) and colour jitter by augmentation strength; small photos also
# shift a little in minimal runs (ImageNet's 0.08 crops suit runs of hundreds of epochs)
PHOTO_AUG = {"minimal": (0.75, 0.0), "light": (0.5, 0.1), "medium": (0.5, 0.1), "heavy": (0.35, 0.2)}
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
    counts: list[int] = field(default_factory=list)  # training images per class; empty: multi-label (not judged)
    pixels: tuple | None = None  # (uint8 grey sample (N, 32, 32), its labels) from data.probe_pixels; None: unseen
    looks: Looks | None = None  # photos or glyphs, from `pixels` (looks_of fills it)
    split: list[Choice] = field(default_factory=list)  # the validation share chosen before the scan's split


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


def patch_size(img_size: int, at_most: int | None = None) -> int:
    """The one patch rule: 16 for photo-sized inputs, else the smallest power of two leaving a grid of at most
    MAX_GRID; no larger than `at_most` (an input side chosen here is then rounded to whole patches; a side that
    is given takes `divisor_patch`)."""
    p = 16 if img_size >= PHOTO_SIDE else next((p for p in (2, 4, 8, 16) if img_size / p <= MAX_GRID + 0.5), 32)
    return min(p, at_most or p)


def divisor_patch(img_size: int, patch: int) -> int:
    """`patch`, halved until it divides img_size."""
    while img_size % patch and patch > 1:
        patch //= 2
    return patch


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
    from vitcli.models import PRESETS, fit_heads, parse_preset, with_patch

    mine = user_keys(cfg)
    side = median_side(facts.sizes)
    out: list[Choice] = []
    img = cfg.data.img_size if "data.img_size" in mine else input_size(side)
    base, given = parse_preset(cfg.model.name)
    given = given if "model.name" in mine else None
    patch = given or patch_size(img)
    if "data.img_size" in mine:
        patch = divisor_patch(img, patch)  # the user's size: a patch that divides it
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
    cpu = facts.device_type == "cpu"
    rung, grown = _rung(cfg, facts, img, patch, stem)
    _, dim, depth, heads = LADDER[rung]
    size_keys = {"model.embed_dim", "model.depth", "model.num_heads"}
    if not ({"model.name"} | size_keys) & mine:
        out.append(Choice({"model.embed_dim": dim, "model.depth": depth, "model.num_heads": heads},
                          f"width {dim}, {depth} blocks for {facts.n_train:,} training images"
                          + (" and a CPU" if cpu else "") + grown))
    elif "model.name" not in mine:  # part of the size given: the ladder's rung fills the rest, not the preset
        m = cfg.model
        dim, depth = m.embed_dim or dim, m.depth or depth
        heads = m.num_heads or fit_heads(dim, heads)
        out.append(Choice({"model.embed_dim": dim, "model.depth": depth, "model.num_heads": heads},
                          f"width {dim}, {depth} blocks, {heads} heads for {facts.n_train:,} training images"
                          + (" and a CPU" if cpu else "")))
    else:
        dim, depth, _ = PRESETS.get(base, PRESETS["vit-tiny"])
        dim, depth = cfg.model.embed_dim or dim, cfg.model.depth or depth  # the preset's size unless overridden
    macs = forward_macs(img, patch, dim, depth, stem)
    length = _epochs(cfg, facts, world, macs if cpu else 0.0)
    epochs = length[0].values["train.epochs"] if length else cfg.train.epochs
    out += _augment(side, facts, epochs, dim, img) + _balance(facts.counts) + length + _batch(cfg, facts, world, epochs)
    if cpu and macs <= CPU_STEP_MACS:  # a large model keeps torch's threads: on a quiet machine they pay off
        out.append(Choice({"train.threads": 1}, "a small model, one process per core") if world > 1 else
                   Choice({"train.threads": -1}, "auto: one thread, half or every core, whichever a probe of a few "
                          "steps finds fastest (~1.7x on a quiet 2-core machine; threads that wait on each other "
                          "run 2-3x slower when another process takes a core), probed again when epochs slow"))
    return out


def strength(epochs: int, width: int | None = None, img_size: int = 224) -> str:
    """How much augmentation a from-scratch run of this length can use, for a model of this width (None: not
    known, e.g. a timm model) on images of this size: minimal | light | medium | heavy (medium trades mixup
    for RandAugment and more erasing, which need images of BIG_IMAGES px and up and a model MEDIUM_WIDTH wide: else
    light).

    Heavy mixing and erasing pay off only when the model trains long enough, and is large enough, to fit the
    harder task; in short runs and for small models they cost accuracy (Steiner et al., "How to train your
    ViT?", 2021).
    """
    return augment_level(epochs, width, img_size)[0]


def augment_level(epochs: int, width: int | None = None, img_size: int = 224) -> tuple[str, str]:
    """(strength, why it is not stronger: '' or ' (...)' for the recipe line); see `strength`."""
    if epochs >= HEAVY_EPOCHS and (width is None or width >= HEAVY_WIDTH):
        return "heavy", ""
    if epochs >= MEDIUM_EPOCHS:
        if img_size < BIG_IMAGES:
            return "light", f" (images of {img_size} px: under {BIG_IMAGES}, too small for RandAugment)"
        if width is not None and width < MEDIUM_WIDTH:
            return "light", f" (width {width}: narrower than {MEDIUM_WIDTH}, too small for RandAugment)"
        return "medium", (f" (width {width}: narrower than {HEAVY_WIDTH}, too small for the full DeiT set)"
                          if epochs >= HEAVY_EPOCHS else "")
    return ("light" if epochs >= LIGHT_EPOCHS else "minimal"), ""


def model_width(cfg: Config) -> int | None:
    """The embedding width of a from-scratch model (its preset's unless set); None for a timm model."""
    from vitcli.models import PRESETS, backend_for_name, parse_preset

    m = cfg.model
    if not backend_for_name(m.name).from_scratch:
        return None
    return m.embed_dim or PRESETS.get(parse_preset(m.name)[0], PRESETS["vit-tiny"])[0]


def _rung(cfg: Config, facts: DataFacts, img: int, patch: int, stem: str) -> tuple[int, str]:
    """The LADDER rung for the training-set size; on a CPU one down while a step is dear or a default run
    (CPU_RUN_MACS) would train it for fewer than ENOUGH_EPOCHS, and with a time budget one up while the larger
    model still gets ROOMY_EPOCHS in it. Returns (rung, '' or why it grew)."""
    from vitcli.config import user_keys

    rung = next(i for i, r in enumerate(LADDER) if facts.n_train < r[0])
    if facts.device_type != "cpu":
        return rung, ""
    macs = [forward_macs(img, patch, dim, depth, stem) for _, dim, depth, _ in LADDER]  # per rung
    while rung > 0 and (macs[rung] > CPU_STEP_MACS or CPU_RUN_MACS / (3 * macs[rung] * facts.n_train) < ENOUGH_EPOCHS):
        rung -= 1
    if not cfg.train.time or "train.epochs" in user_keys(cfg):
        return rung, ""
    seconds, grown = cfg.train.seconds, ""
    while (rung + 1 < len(LADDER) and macs[rung + 1] <= CPU_STEP_MACS
           and budget_macs(seconds) / (3 * macs[rung + 1] * facts.n_train) >= ROOMY_EPOCHS):
        rung, grown = rung + 1, f", one size up: {cfg.train.time} trains it for {ROOMY_EPOCHS}+ epochs"
    return rung, grown


def budget_macs(seconds: float) -> float:
    """Multiply-adds a CPU trains in `seconds` on the cores this process may use: a first guess (the time budget
    fits the epochs once it has timed steps), but the augmentation level and model size follow it."""
    import math

    from vitcli.device import cpu_count

    return seconds * CPU_MACS_PER_S * (1 + THREAD_GAIN * math.log2(cpu_count()))


def _augment(side: int, facts: DataFacts, epochs: int, width: int | None, img: int) -> list[Choice]:
    """Photos: mirror, crops and colour jitter; glyphs: no mirror, and small ones shift, scale and rotate a little.
    Without a pixel sample (shards), small images are taken for glyphs and larger ones keep the usual crops."""
    looks = looks_of(facts)
    if looks is not None and looks.kind == "photo":
        level = strength(epochs, width, img)
        scale, jitter = PHOTO_AUG[level]
        small = side < SMALL_SIDE
        crops = {"data.crop_pct": 1.0, "data.scale_min": scale, "data.ratio_max": 4 / 3, "data.rotate": 0.0,
                 "data.translate": 0.08 if level == "minimal" else 0.0} if small else {"data.scale_min": scale}
        return [Choice({**crops, "data.hflip": 0.5, "data.color_jitter": jitter},
                       f"{looks.why}: mirror and random crops of {scale:.0%}-100% of the area"
                       + (f", colour jitter {jitter:g}" if jitter else "") + f" for {level} augmentation"
                       + ("; evaluate the whole image" if small else ""))]
    why = looks.why + ": " if looks is not None else ""
    if side >= SMALL_SIDE:
        return [] if looks is None else [Choice({"data.hflip": 0.0}, why + "no mirror (it can change the class)")]
    return [Choice({"data.crop_pct": 1.0, "data.scale_min": 0.75, "data.ratio_max": 1.2, "data.translate": 0.08,
                    "data.rotate": 10.0, "data.hflip": 0.0},
                   why + "small images: shift, scale and rotate a little rather than crop 8% of the area; no mirror "
                   "(it can change the class, as for digits and letters); evaluate the whole image")]


def _batch(cfg: Config, facts: DataFacts, world: int, epochs: int) -> list[Choice]:
    """A short run on few images takes a smaller batch so that it still makes FEW_STEPS optimiser steps."""
    from vitcli.config import user_keys

    if "data.batch_size" in user_keys(cfg):
        return []
    per_step = world * cfg.train.accum_steps
    batch, steps = cfg.data.batch_size, (lambda b: max(1, facts.n_train // (b * per_step)) * epochs)
    while batch > 16 and steps(batch) < FEW_STEPS:
        batch //= 2
    if batch == cfg.data.batch_size:
        return []
    return [Choice({"data.batch_size": batch}, f"{steps(cfg.data.batch_size)} optimiser steps at batch "
                   f"{cfg.data.batch_size} are few for a model from scratch: {steps(batch)} at batch {batch}")]


def auto_batch(cfg: Config, n_train: int, device_type: str, world: int = 1) -> Choice:
    """`data.batch_size: auto`: the smallest power of two whose tokens fill the matrix units (AUTO_TOKENS), on
    CUDA at most what fits in GPU_MEMORY_SHARE of the free memory; then at most the training images, and halved
    (down to 16) while a run would make fewer than FEW_STEPS optimiser steps."""
    import re

    from vitcli.models import PRESETS, parse_preset

    d, m, t = cfg.data, cfg.model, cfg.train
    base, patch = parse_preset(m.name)
    found = re.search(r"patch(\d+)", m.name)
    patch = patch or (int(found[1]) if found else 16)
    tokens = max(1, d.img_size // patch) ** 2 + 1
    want = AUTO_TOKENS.get(device_type, AUTO_TOKENS["cpu"])
    batch = 16
    while batch < MAX_AUTO_BATCH and batch * tokens < want:
        batch *= 2
    why = f"{batch} images of {tokens} tokens fill the {device_type} matrix units (>= {want} rows a matmul)"
    if device_type == "cuda":
        dim, depth, heads = PRESETS.get(base, PRESETS["vit-small"])
        dim, depth, heads = m.embed_dim or dim, m.depth or depth, m.num_heads or heads
        per_image = depth * tokens * (34 * dim + 5 * heads * tokens) * 2  # activation bytes (Korthikanti et al.)
        fits = int(GPU_MEMORY_SHARE * _free_gpu_bytes() / per_image)
        while batch > 16 and batch > fits:
            batch //= 2
            why = f"{batch} images: the most whose activations fit in {GPU_MEMORY_SHARE:.0%} of the free GPU memory"
    per_step = world * t.accum_steps
    steps = lambda b: max(1, n_train // (b * per_step)) * t.epochs  # noqa: E731
    while batch > 16 and steps(batch) < FEW_STEPS:
        batch //= 2
        why = f"{batch}: fewer images a step keep a short run at {steps(batch)} optimiser steps (>= {FEW_STEPS} wanted)"
    most = max(1, n_train // per_step)
    if batch > most:
        batch = 1 << (most.bit_length() - 1)
        why = f"{batch}: no more than the {n_train} training images give a whole batch"
    return Choice({"data.batch_size": batch}, "auto: " + why)


def _free_gpu_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 8 << 30


def _balance(counts: list[int]) -> list[Choice]:
    """Skewed classes: a loss weighted by inverse class frequency and macro F1 to pick best.pt."""
    from vitcli.looks import SKEW_RATIO, skewed

    if not skewed(counts):
        return []
    present = [c for c in counts if c > 0]
    return [Choice({"data.class_weights": "auto", "train.best_metric": "macro_f1"},
                   f"skewed classes ({', '.join(map(str, counts))} training images; the largest "
                   f"{max(present) / min(present):.1f}x the smallest, at least {SKEW_RATIO:g}x): every class weighs "
                   "the same in the loss, and macro F1 (every class counts equally) picks best.pt")]


def _epochs(cfg: Config, facts: DataFacts, world: int, macs: float) -> list[Choice]:
    """On a CPU (`macs` > 0) as many epochs as fit the time budget or CPU_RUN_MACS; elsewhere TARGET_STEPS."""
    from vitcli.config import user_keys

    if "train.epochs" in user_keys(cfg):
        return []
    if cfg.train.time and macs:  # a first guess; the budget fixes the number once it has timed some steps
        guess = int(budget_macs(cfg.train.seconds) / (3 * macs * facts.n_train))
        return [Choice({"train.epochs": max(1, min(MAX_EPOCHS, guess))},
                       f"about what fits in {cfg.train.time} on a CPU (the time budget sets the number after timing "
                       "the first steps)")]
    if macs:
        cap = int(CPU_RUN_MACS / (3 * macs * facts.n_train))
        if cap < MIN_EPOCHS:
            return [Choice({"train.epochs": MIN_EPOCHS}, f"at least {MIN_EPOCHS}, though a CPU needs more than a few "
                                                         f"minutes for them ({macs / 1e6:.0f} M multiply-adds an "
                                                         "image forward)")]
        return [Choice({"train.epochs": min(MAX_EPOCHS, cap), "train.time": CPU_RUN_TIME},
                       f"what a CPU trains in about {CPU_RUN_MACS / CPU_MACS_PER_S / 60:.0f} minutes "
                       f"({macs / 1e6:.0f} M multiply-adds an image forward) as a first guess; the epochs are then "
                       f"fitted to {CPU_RUN_TIME} once the first steps are timed, more on a faster machine, fewer "
                       "on a slower or busier one (--time sets another budget, --epochs a fixed number)")]
    steps = max(1, facts.n_train // (cfg.data.batch_size * world * cfg.train.accum_steps))
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, round(TARGET_STEPS / steps)))
    return [Choice({"train.epochs": epochs}, f"~{TARGET_STEPS} steps of {steps} an epoch")]


def apply_defaults(cfg: Config, recipe: str, facts: DataFacts, world: int = 1) -> list[Choice]:
    """Set the chosen values on the keys the user did not set; returns the choices with what was applied."""
    return _apply(cfg, choices(cfg, recipe, facts, world))


def data_defaults(cfg: Config, facts: DataFacts) -> list[Choice]:
    """For a model vitcli does not size (a timm model trained from scratch): only what the data says about
    augmentation (photos or glyphs) and class balance; its input size and width stay the model's own."""
    return _apply(cfg, _augment(median_side(facts.sizes), facts, cfg.train.epochs, model_width(cfg),
                                cfg.data.img_size)
                  + _balance(facts.counts))


def split_defaults(cfg: Config, n_images: int, n_classes: int) -> list[Choice]:
    """A large folder that vitcli splits keeps VAL_IMAGES for validation rather than 20%, so more images train;
    set on the config (unless the user set data.val_fraction) and returned for the printed defaults."""
    share = max(MIN_VAL_FRACTION, max(VAL_IMAGES, VAL_PER_CLASS * n_classes) / max(1, n_images))
    if share >= cfg.data.val_fraction:
        return []
    share = round(share, 3)
    return _apply(cfg, [Choice({"data.val_fraction": share},
                               f"{n_images:,} images: ~{round(share * n_images):,} held out are enough to pick best.pt "
                               "and calibrate, so the rest train (20% for smaller sets)")])


def _apply(cfg: Config, made: list[Choice]) -> list[Choice]:
    from vitcli.config import user_keys

    mine = user_keys(cfg)
    for choice in made:
        for key, value in choice.values.items():
            section, attr = key.split(".")
            if key not in mine:
                setattr(getattr(cfg, section), attr, value)
                choice.applied[key] = value
        kept = [k for k in choice.values if k in mine]
        if kept and choice.applied:  # the reason names values the user replaced: say so
            choice.why += f" (your {', '.join(kept)} kept)"
    return [c for c in made if c.applied]


def finetune_facts(cfg: Config, facts: DataFacts | None) -> dict[str, Any]:
    """What `model.pretrained: auto` (pretrained.py) needs from the scan: whether the images are photos, their
    median shorter side, and the multiply-adds a CPU run may spend (0 when not on a CPU or without a scan)."""
    if facts is None:
        return {"photos": False, "side": PHOTO_SIZE, "cpu_macs": 0.0}
    side = median_side(facts.sizes)
    budget = budget_macs(cfg.train.seconds) if cfg.train.time else CPU_RUN_MACS
    looks = looks_of(facts)
    photos = looks.kind == "photo" if looks is not None else side >= PHOTO_SIDE
    return {"photos": photos, "side": side, "cpu_macs": budget if facts.device_type == "cpu" else 0.0}


def looks_of(facts: DataFacts) -> Looks | None:
    """Photos or glyphs from the scan's pixel sample (looks.py), worked out once; None without a sample."""
    from vitcli.looks import image_kind

    if facts.pixels is None or not len(facts.pixels[1]):
        return None
    if facts.looks is None:
        facts.looks = image_kind(*facts.pixels)
    return facts.looks


def photo_hint(cfg: Config, facts: DataFacts) -> str | None:
    """For few photo-sized images from scratch: the command that fine-tunes pretrained timm weights instead."""
    if median_side(facts.sizes) < PHOTO_SIDE or facts.n_train >= FEW_PHOTOS:
        return None
    return (f"{facts.n_train:,} photos are few for a ViT from scratch; fine-tuning pretrained weights usually does "
            f"far better: vitcli train {facts.data_dir} --model timm/vit_tiny_patch16_224 --set model.pretrained=true"
            " (downloads the weights through timm), or --set model.pretrained_file=WEIGHTS.safetensors with a local "
            "file")
