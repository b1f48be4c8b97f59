"""Real data is not glyphs: photos vs glyphs from the pixels, skewed classes, and a recipe that grows with the
time budget; every choice printed with its reason."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import run_cli
from vitcli.config import load_config
from vitcli.data import probe_pixels, probe_sizes, scan_dataset
from vitcli.defaults import DataFacts
from vitcli.looks import ASYM_GLYPHS, SIDE, image_kind, skewed
from vitcli.recipes import apply_recipe

GLYPHS = {"L": [(8, 4), (8, 26), (22, 26)], "J": [(22, 4), (22, 26), (8, 26)], "7": [(6, 6), (24, 6), (12, 27)],
          "Z": [(6, 6), (24, 6), (6, 26), (24, 26)]}  # strokes drawn one way round, as letters and digits are


def glyph_image(kind: str, rng: random.Random, colour: bool) -> Image.Image:
    """A stroke glyph of random ink on a flat background, shifted and thickened a little."""
    bg = tuple(rng.randint(0, 60) for _ in range(3)) if colour else (0, 0, 0)
    ink = tuple(rng.randint(150, 255) for _ in range(3)) if colour else (255, 255, 255)
    img = Image.new("RGB", (32, 32), bg)
    dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
    ImageDraw.Draw(img).line([(x + dx, y + dy) for x, y in GLYPHS[kind]], fill=ink, width=rng.randint(2, 4))
    return img


def photo_image(kind: int, rng: np.random.Generator, grey: bool) -> Image.Image:
    """A textured scene: a noisy background and a blob of class-dependent shape, facing left or right at random."""
    yy, xx = np.mgrid[0:32, 0:32]
    cx, cy = rng.uniform(10, 22, 2)
    blob = ((xx - cx) / (4 + 3 * kind)) ** 2 + ((yy - cy) / (9 - 2 * kind)) ** 2 < 1  # (32, 32)
    arr = rng.normal(110, 35, (32, 32, 3)) + blob[..., None] * rng.uniform(-80, 80, 3)
    arr[:, :16] += rng.uniform(-30, 30)  # lit from one side
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert("L") if grey else img


def folder(root: Path, make, classes, per_class: int | list[int]) -> Path:
    counts = per_class if isinstance(per_class, list) else [per_class] * len(classes)
    for c, n in zip(classes, counts, strict=True):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make(c).save(root / str(c) / f"{i:03d}.png")
    return root


def facts_for(data: Path) -> DataFacts:
    ds = scan_dataset(data, 0.2, 0)
    counts = [ds.train.labels.count(c) for c in range(len(ds.classes))]
    return DataFacts(len(ds.train), probe_sizes(ds.train.paths), "cpu", str(data), counts,
                     probe_pixels(ds.train, SIDE))


@pytest.mark.parametrize("colour", [False, True])
def test_glyphs_drawn_one_way_round_get_no_mirror_whatever_their_colour(tmp_path, colour):
    rng = random.Random(0)
    data = folder(tmp_path / "g", lambda c: glyph_image(c, rng, colour), GLYPHS, 15)
    cfg = load_config()
    recipe = apply_recipe(cfg, n_train=48, quiet=True, facts=facts_for(data))
    assert cfg.data.hflip == 0.0 and cfg.data.color_jitter == 0.0 and cfg.data.rotate > 0
    assert any(c.why.startswith("glyphs (a mirror lowers") for c in recipe.defaults)


@pytest.mark.parametrize("grey", [True, False])
def test_photos_grey_or_colour_get_mirror_crops_and_colour_jitter(tmp_path, grey):
    rng = np.random.default_rng(0)
    data = folder(tmp_path / "p", lambda c: photo_image(c, rng, grey), range(3), 20)
    cfg = load_config()
    recipe = apply_recipe(cfg, n_train=48, quiet=True, facts=facts_for(data))
    assert cfg.data.hflip == 0.5 and cfg.data.color_jitter > 0 and cfg.data.rotate == 0
    assert cfg.data.scale_min < 0.75 and cfg.data.crop_pct == 1.0
    assert any(c.why.startswith("photos (a mirror lowers") for c in recipe.defaults)


def test_the_mirror_statistic_separates_the_two_kinds_by_a_wide_margin():
    rng, nrng = random.Random(1), np.random.default_rng(1)

    def grey(imgs):
        return np.stack([np.asarray(i.convert("L").resize((SIDE, SIDE))) for i in imgs])

    kinds = list(GLYPHS)
    glyphs = image_kind(grey([glyph_image(kinds[i % 4], rng, False) for i in range(80)]), [i % 4 for i in range(80)])
    photos = image_kind(grey([photo_image(i % 3, nrng, True) for i in range(90)]), [i % 3 for i in range(90)])
    assert glyphs.kind == "glyph" and photos.kind == "photo"
    assert glyphs.asym > 0.1 > 0.02 > photos.asym


def stripes_image(angle: float, rng: np.random.Generator) -> Image.Image:
    """Stripes at `angle` degrees (+-10), random frequency, phase and colours: a flat class mean whatever the
    angle, so only the spectrum tells that a mirror turns 60 degrees into -60."""
    yy, xx = np.mgrid[0:32, 0:32]
    a = np.radians(angle + rng.uniform(-10, 10))
    v = np.sin(rng.uniform(0.3, 0.6) * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = c0 + (c1 - c0) * ((v[..., None] + 1) / 2) + rng.normal(0, 10, (32, 32, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_oriented_textures_get_no_mirror_though_their_class_means_are_flat(tmp_path):
    rng = np.random.default_rng(0)
    data = folder(tmp_path / "t", lambda c: stripes_image(c, rng), [0, 60, 90], 40)
    cfg, facts = load_config(), facts_for(data)
    recipe = apply_recipe(cfg, n_train=96, quiet=True, facts=facts)
    why = next(c.why for c in recipe.defaults if "data.hflip" in c.values)
    assert cfg.data.hflip == 0.0 and why.startswith("oriented patterns"), why
    assert facts.looks.asym < ASYM_GLYPHS  # the pixel test alone would have called them photos
    photos = folder(tmp_path / "p", lambda c: photo_image(c, rng, True), range(3), 40)  # same size, photos
    cfg = load_config()
    apply_recipe(cfg, n_train=96, quiet=True, facts=facts_for(photos))
    assert cfg.data.hflip == 0.5


def test_the_users_augmentation_keys_win_over_the_photo_rule(tmp_path):
    rng = np.random.default_rng(0)
    data = folder(tmp_path / "p", lambda c: photo_image(c, rng, False), range(3), 12)
    cfg = load_config(overrides=["data.hflip=0", "data.color_jitter=0.05"])
    apply_recipe(cfg, n_train=28, quiet=True, facts=facts_for(data))
    assert cfg.data.hflip == 0.0 and cfg.data.color_jitter == 0.05 and cfg.data.scale_min < 0.75  # the rest chosen


def test_skewed_classes_turn_on_a_balanced_loss_and_macro_f1_and_say_so_with_the_counts():
    assert skewed([570, 110, 40, 270]) and not skewed([100, 90, 60]) and not skewed([5])
    cfg = load_config()
    recipe = apply_recipe(cfg, n_train=990, quiet=True, facts=DataFacts(990, [(32, 32)], counts=[570, 110, 40, 270]))
    assert cfg.data.class_weights == "auto" and cfg.train.best_metric == "macro_f1"
    why = next(c.why for c in recipe.defaults if "data.class_weights" in c.applied)
    assert "570, 110, 40, 270" in why and "14.2x" in why
    even = load_config()
    apply_recipe(even, n_train=300, quiet=True, facts=DataFacts(300, [(32, 32)], counts=[100, 100, 100]))
    assert even.data.class_weights == "none" and even.train.best_metric == "acc"
    mine = load_config(overrides=["train.best_metric=acc"])
    apply_recipe(mine, n_train=990, quiet=True, facts=DataFacts(990, [(32, 32)], counts=[570, 110, 40, 270]))
    assert mine.train.best_metric == "acc" and mine.data.class_weights == "auto"


def test_a_skewed_folder_trains_with_class_weights_and_picks_best_by_macro_f1(tmp_path):
    rng = np.random.default_rng(0)
    data = folder(tmp_path / "skew", lambda c: photo_image(c, rng, False), range(3), [30, 6, 12])
    res = run_cli("train", data, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                  "--set", "train.precision=fp32", "--set", "model.embed_dim=32", "--set", "model.depth=1",
                  "--set", "model.num_heads=2")
    assert res.exit_code == 0, res.output
    assert "data.class_weights=auto, train.best_metric=macro_f1: skewed classes (24, 5, 10 training images" \
        in " ".join(res.output.split())
    assert "photos (a mirror lowers" in res.output


LADDER_KEYS = ["train.epochs", "data.reprob", "model.drop_path_rate", "train.ema_decay", "model.embed_dim",
               "model.depth"]
LEVELS = ["minimal", "light", "medium", "heavy"]  # medium trades light's mixup for RandAugment and more erasing


def test_longer_time_budgets_never_choose_less_of_anything_and_print_every_choice(capsys):
    facts = DataFacts(6_400, [(32, 32)] * 8, "cpu", counts=[640] * 10)
    picked = []
    for budget in ("3m", "10m", "30m", "1h", "4h"):
        cfg = load_config(overrides=[f"train.time={budget}"])
        recipe = apply_recipe(cfg, n_train=6_400, facts=facts)
        printed = " ".join(capsys.readouterr().err.split())
        for key in {k for c in recipe.defaults for k in c.applied} | set(recipe.applied):
            assert f"{key}=" in printed, (budget, key)
        level = next(w for w in LEVELS if f"epochs: {w} augmentation" in recipe.why)
        picked.append([getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in LADDER_KEYS]
                      + [LEVELS.index(level), bool(cfg.data.randaugment), cfg.data.mixup])
    for shorter, longer in zip(picked, picked[1:], strict=False):
        assert all(a <= b for a, b in zip(shorter[:-1], longer[:-1], strict=True)), (shorter, longer)
    assert picked[0][0] < picked[-1][0] and picked[0][-1] < picked[-1][-1]  # more epochs, stronger mixing at 4h
    assert picked[-1][4] > picked[0][4] and picked[-1][-2]  # a wider model and RandAugment at 4h


def test_a_default_cpu_run_fills_minutes_not_a_step_count_and_is_capped_in_time():
    facts = DataFacts(6_400, [(32, 32)] * 8, "cpu", counts=[640] * 10)
    cfg = load_config()
    recipe = apply_recipe(cfg, n_train=6_400, quiet=True, facts=facts)
    assert 15 <= cfg.train.epochs <= 25 and cfg.train.time == "9m"
    assert any("fitted to 9m once the first steps are timed" in c.why for c in recipe.defaults)
    assert cfg.optim.warmup_epochs == pytest.approx(0.15 * cfg.train.epochs, abs=0.01)


def test_colour_jitter_changes_colour_images_keeps_grey_ones_grey_and_stays_in_range():
    import torch

    from vitcli.config import DataConfig
    from vitcli.data import TrainAugment

    d = DataConfig(img_size=16, crop_pct=1.0, scale_min=1.0, ratio_max=1.0, hflip=0.0, color_jitter=0.4,
                   mean=[0.0] * 3, std=[1 / 255] * 3)  # normalisation off: pixels stay in [0, 255]
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    plain = TrainAugment(DataConfig(**{**d.__dict__, "color_jitter": 0.0}), torch.Generator().manual_seed(0))(x)
    out = TrainAugment(d, torch.Generator().manual_seed(0))(x)  # (8, 3, 16, 16)
    assert not torch.allclose(out, plain) and out.min() >= 0 and out.max() <= 255
    grey = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    g = TrainAugment(d, torch.Generator().manual_seed(0))(grey)
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-3) and torch.allclose(g[:, 1], g[:, 2], atol=1e-3)


def test_the_default_cpu_budget_fits_its_guessed_epochs_to_the_machine_but_never_the_users_epochs():
    import time
    from types import SimpleNamespace

    from vitcli.budget import MAX_EPOCHS, budget_for

    facts = DataFacts(6_400, [(32, 32)] * 8, "cpu", counts=[640] * 10)
    chosen, mine = load_config(), load_config(overrides=["train.time=9m"])
    for cfg in (chosen, mine):
        apply_recipe(cfg, n_train=6_400, quiet=True, facts=facts)
    assert chosen.train.time == mine.train.time == "9m"
    assert budget_for(SimpleNamespace(cfg=chosen), time.time(), 1_600, None, None).max_epochs == 100
    assert budget_for(SimpleNamespace(cfg=mine), time.time(), 1_600, None, None).max_epochs == MAX_EPOCHS
    fixed = load_config(overrides=["train.epochs=18"])
    apply_recipe(fixed, n_train=6_400, quiet=True, facts=facts)
    assert (fixed.train.epochs, fixed.train.time) == (18, "")  # the user's epochs: no default budget
    fixed.train.time = "9m"  # with a budget (as resumed runs keep it), the user's epochs are only shortened
    assert budget_for(SimpleNamespace(cfg=fixed), time.time(), 1_600, None, None).max_epochs == 18


def test_a_timm_model_from_scratch_gets_the_datas_augmentation_and_balance_but_keeps_its_size(tmp_path):
    """A timm model without pretrained weights is not sized by vitcli, but glyphs still get no mirror and skewed
    classes a balanced loss."""
    rng = random.Random(0)
    data = folder(tmp_path / "g", lambda c: glyph_image(c, rng, False), GLYPHS, [30, 10, 10, 10])
    cfg = load_config(flags={"model.name": "timm/resnet18"}, overrides=["model.pretrained=false"])
    size = cfg.data.img_size
    recipe = apply_recipe(cfg, n_train=48, quiet=True, facts=facts_for(data))
    assert cfg.data.hflip == 0.0 and cfg.data.class_weights == "auto" and cfg.train.best_metric == "macro_f1"
    assert any(c.why.startswith("glyphs (a mirror lowers") for c in recipe.defaults)
    assert cfg.data.img_size == size and cfg.model.name == "timm/resnet18"
