"""Early stopping, class weights, the balanced sampler, curves.png and the translate/rotate augmentation."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from conftest import TINY, make_dataset, run_cli
from vitcli.checkpoint import load_checkpoint
from vitcli.config import load_config
from vitcli.data import TrainAugment, class_counts, epoch_batches

QUIET = ["--set", "train.recipe=none"]  # these tests pin engine features, not recipe choices


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_early_stopping_stops_when_val_accuracy_stalls_and_keeps_the_best(shapes, tmp_path):
    # an lr so small the weights cannot move: val accuracy is flat after epoch 1
    res = run_cli("train", shapes, *TINY, *QUIET, "--epochs", "12", "--set", "train.patience=2",
                  "--set", "optim.lr=1e-12", "--set", "optim.warmup_epochs=0")
    assert res.exit_code == 0, res.output
    assert "early stop: val accuracy did not improve for 2 epochs" in res.output
    run = tmp_path / "runs" / "train"
    rows = metrics(run)
    assert len(rows) == 3  # epoch 1 sets the best, epochs 2 and 3 do not beat it
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 1
    assert best["metrics"]["val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in rows), abs=1e-5)


def test_early_stopping_waits_while_accuracy_improves(shapes, tmp_path):
    res = run_cli("train", shapes, *TINY, *QUIET, "--epochs", "4", "--set", "train.patience=3",
                  "--set", "optim.lr=3e-3")
    assert res.exit_code == 0, res.output
    assert "early stop" not in res.output
    rows = metrics(tmp_path / "runs" / "train")
    assert len(rows) == 4
    best = load_checkpoint(tmp_path / "runs" / "train" / "best.pt")
    assert best["metrics"]["val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in rows), abs=1e-5)


def imbalanced(tmp_path, counts):
    """A train/val dataset whose train classes have `counts` images; val is balanced."""
    root = tmp_path / "imb"
    for split, per in (("train", counts), ("val", [6, 6, 6])):
        for cls, n in zip(("red", "green", "blue"), per, strict=True):
            make_dataset(root / split, classes=(cls,), per_class=n, seed=n + len(split))
    return root


def test_class_weights_come_from_the_counts_and_enter_the_training_loss(tmp_path):
    data = imbalanced(tmp_path, [36, 12, 6])  # classes sort as blue, green, red: 6, 12, 36
    frozen = [*TINY, *QUIET, "--epochs", "1", "--set", "optim.lr=1e-12", "--set", "optim.warmup_epochs=0"]
    plain = run_cli("train", data, *frozen, "--name", "plain")
    weighted = run_cli("train", data, *frozen, "--name", "weighted", "--set", "data.class_weights=auto")
    assert plain.exit_code == 0 and weighted.exit_code == 0, plain.output + weighted.output
    assert "per class: blue 6, green 12, red 36" in weighted.output
    # inverse frequency: n / (classes * count) = 54 / (3 * count)
    assert "class weights: 3.00, 1.50, 0.50" in weighted.output
    assert "class weights" not in plain.output
    p, w = metrics(tmp_path / "runs" / "plain")[0], metrics(tmp_path / "runs" / "weighted")[0]
    # the same weights, batches and augmentations: only the training loss sees the class weights
    assert p["val_loss"] == w["val_loss"] and p["val_acc"] == w["val_acc"]
    assert p["train_loss"] != w["train_loss"]


def test_class_weights_of_a_balanced_dataset_are_one(shapes, tmp_path):
    res = run_cli("train", shapes, *TINY, *QUIET, "--epochs", "1", "--set", "data.class_weights=auto")
    assert res.exit_code == 0, res.output
    assert "class weights: 1.00, 1.00, 1.00" in res.output


def test_balanced_sampler_draws_every_class_about_equally():
    labels = [0] * 800 + [1] * 150 + [2] * 50
    counts = class_counts(labels, 3)
    weights = [1.0 / counts[y] for y in labels]
    drawn = [labels[i] for b in epoch_batches(len(labels), 50, 0, 0, weights=weights) for i in b]
    share = [drawn.count(c) / len(drawn) for c in range(3)]
    assert all(0.27 < s < 0.40 for s in share), share
    plain = [labels[i] for b in epoch_batches(len(labels), 50, 0, 0) for i in b]
    assert plain.count(2) / len(plain) == pytest.approx(0.05, abs=0.01)


def test_balanced_sampler_trains_end_to_end(tmp_path):
    data = imbalanced(tmp_path, [24, 8, 4])
    res = run_cli("train", data, *TINY, *QUIET, "--epochs", "1", "--set", "data.balanced_sampler=true")
    assert res.exit_code == 0, res.output
    assert len(metrics(tmp_path / "runs" / "train")) == 1


def test_curves_png_shows_every_epoch_so_far(shapes, tmp_path):
    res = run_cli("train", shapes, *TINY, *QUIET, "--epochs", "2")
    assert res.exit_code == 0, res.output
    png = tmp_path / "runs" / "train" / "curves.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > img.height > 100
    # rewritten after each epoch: resuming to 3 epochs redraws it with the new row
    before = png.stat().st_mtime_ns
    res = run_cli("train", shapes, "--resume", tmp_path / "runs" / "train", "--epochs", "3")
    assert res.exit_code == 0, res.output
    assert png.stat().st_mtime_ns > before and len(metrics(tmp_path / "runs" / "train")) == 3


def blob_batch(size=16):
    """One image: a bright 4x4 square off centre on black, as uint8 (1, 3, size, size)."""
    x = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    x[..., 2:6, 9:13] = 255
    return x.repeat(64, 1, 1, 1)


def centroids(out):
    """Brightness-weighted centre (row, col) of each image of a normalised (B, 3, H, W) batch."""
    m = (out[:, 0] - out[:, 0].amin()).clamp(min=0)  # (B, H, W)
    rows, cols = torch.meshgrid(torch.arange(m.shape[1]), torch.arange(m.shape[2]), indexing="ij")
    total = m.sum((1, 2))
    return (m * rows).sum((1, 2)) / total, (m * cols).sum((1, 2)) / total


def augment(**sets):
    cfg = load_config(overrides=["data.img_size=16", "data.crop_pct=1.0", "data.hflip=0", "data.scale_min=1",
                                 "data.ratio_max=1", "data.mean=[0,0,0]", "data.std=[1,1,1]"]
                      + [f"data.{k}={v}" for k, v in sets.items()])
    return TrainAugment(cfg.data, torch.Generator().manual_seed(0))


def test_without_translate_or_rotate_the_crop_is_the_identity():
    x = blob_batch()
    assert torch.allclose(augment()(x), x.float() / 255, atol=1e-5)


def test_translate_shifts_the_image_by_up_to_the_given_fraction():
    x = blob_batch()
    r0, c0 = centroids(x.float())
    r, c = centroids(augment(translate=0.125)(x))
    shift = torch.stack([r - r0, c - c0])  # pixels
    assert shift.abs().max() <= 0.125 * 16 + 0.5
    assert (shift.abs() > 0.5).any(dim=0).float().mean() > 0.5  # most images moved


def test_rotate_turns_the_image_about_its_centre():
    x = blob_batch()
    r0, c0 = centroids(x.float())
    r, c = centroids(augment(rotate=30)(x))
    centre = 7.5
    radius0 = ((r0 - centre) ** 2 + (c0 - centre) ** 2).sqrt()
    radius = ((r - centre) ** 2 + (c - centre) ** 2).sqrt()
    assert torch.allclose(radius, radius0.expand_as(radius), atol=0.6)  # distance to the centre kept
    angle = torch.atan2(r - centre, c - centre) - torch.atan2(r0 - centre, c0 - centre)
    assert angle.abs().max() <= torch.deg2rad(torch.tensor(30.0)) + 0.1 and angle.abs().max() > 0.2


def test_translate_and_rotate_are_validated():
    from vitcli.errors import VitcliError

    with pytest.raises(VitcliError, match="data.translate"):
        load_config(overrides=["data.translate=0.9"])
    with pytest.raises(VitcliError, match="data.rotate"):
        load_config(overrides=["data.rotate=-5"])
