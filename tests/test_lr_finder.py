"""Learning-rate finder: an exponential sweep, a plot, and a suggestion inside the swept range."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from conftest import TINY, run_cli
from vitcli.config import load_config
from vitcli.lr_finder import find_lr, suggest_lr


def test_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = [10 ** (-6 + i * 0.1) for i in range(61)]  # 1e-6 .. 1
    # flat, then a fall that is steepest at lr = 1e-3, a minimum at 1e-2, then divergence
    loss = [2.0 - math.tanh((math.log10(lr) + 3) * 2) + (max(0.0, math.log10(lr) + 2) * 5) for lr in lrs]
    lr = suggest_lr(lrs, loss)
    assert 5e-4 <= lr <= 2e-3


def test_suggestion_when_the_loss_never_falls_is_below_the_minimum():
    lrs = [10 ** (-6 + i * 0.5) for i in range(10)]
    assert suggest_lr(lrs, [1.0 + i for i in range(10)]) < lrs[2]


def test_find_lr_suggests_a_value_inside_the_swept_range_and_writes_the_plot(shapes, tmp_path):
    cfg = load_config(flags={"model.name": "vit-tiny/8", "data.img_size": 32, "train.device": "cpu",
                             "data.batch_size": 16},
                      overrides=["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.crop_pct=1.0",
                                 "train.precision=fp32"])
    res = find_lr(cfg, shapes, lr_min=1e-5, lr_max=3.0, steps=40)
    assert 1e-5 <= res.suggested <= 3.0
    assert res.lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(res.lrs, res.lrs[1:], strict=False))
    assert min(res.smoothed) < res.smoothed[0]  # the sweep found lrs that train
    png = res.run_dir / "lr_find.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 200
    rows = (res.run_dir / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss" and len(rows) == len(res.lrs) + 1
    assert res.run_dir.resolve().parent == tmp_path / "runs"


def test_cli_find_lr_prints_the_suggestion_and_does_not_train(shapes, tmp_path):
    res = run_cli("train", shapes, *TINY, "--find-lr")
    assert res.exit_code == 0, res.output
    assert "suggested lr" in res.output and "--set optim.lr=" in res.output
    assert (tmp_path / "runs" / "lr-find" / "lr_find.png").is_file()
    assert not (tmp_path / "runs" / "train").exists()


def test_find_lr_with_resume_is_refused(shapes, tmp_path):
    res = run_cli("train", shapes, "--resume", tmp_path, "--find-lr")
    assert res.exit_code == 1 and "--resume" in res.output
