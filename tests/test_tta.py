"""Test-time augmentation follows training: a model trained on small mirrored, cropped images predicts on the image and
its mirror, each also shifted (logits averaged) by default, is calibrated on those same logits, and `--no-tta` turns
it off; a model trained without mirroring predicts on the image alone unless `--tta` asks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, make_dataset, run_cli

CLASSES = ("red", "green", "blue")


def _train(root: Path, hflip: float) -> Path:
    data = make_dataset(root / "data", CLASSES, per_class=10, seed=4)
    res = run_cli("train", data, *TINY, "--epochs", "2", "--output", root / "runs", "--name", "r",
                  "--set", f"data.hflip={hflip}", "--set", "train.calibrate=true")
    assert res.exit_code == 0, res.output
    return root / "runs" / "r"


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("mirrored"), 0.5)


@pytest.fixture(scope="module")
def unmirrored(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("unmirrored"), 0.0)


def _logits(run: Path, paths: list[Path]):
    """The model's logits of each image, and the mean of the logits of the image, its mirror and both shifted 2 px
    four ways (torch's reflect padding), computed here from the checkpoint (fp32, CPU)."""
    import torch
    import torch.nn.functional as F

    from vitcli import data as D
    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(ckpt).eval()
    pre = ckpt["preprocess"]
    x = D.eval_transform(torch.stack([D.decode_square(p, pre["resize_size"]) for p in paths]), pre)
    d, side = pre["shift"], x.shape[-1]
    views = []
    for v in (x, x.flip(-1)):
        padded = F.pad(v, (d, d, d, d), mode="reflect")
        views += [v] + [padded[..., d - dy:d - dy + side, d - dx:d - dx + side]
                        for dx, dy in ((d, 0), (-d, 0), (0, d), (0, -d))]
    with torch.no_grad():
        logits = [model(v).double() for v in views]
    return logits[0], sum(logits) / len(logits), ckpt


def test_mirrored_training_makes_tta_the_default_and_calibrates_on_its_views(tmp_path, mirrored):
    import torch

    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=2, seed=9)
    paths = sorted(imgs.rglob("*.png"))
    plain, mean, ckpt = _logits(mirrored, paths)
    assert ckpt["preprocess"]["mirror"] is True and ckpt["calibration"]["tta"] is True
    assert ckpt["preprocess"]["shift"] == 2  # 32 px: shifted by 32 / 16
    t = ckpt["calibration"]["temperature"]

    res = run_cli("predict", *paths, "--model", mirrored, "-f", "json", "-k", "3", "--device", "cpu",
                  "--precision", "fp32")
    assert res.exit_code == 0, res.output
    assert "TTA: the mean of the logits of 10 views: the image and its mirror, each also shifted 2 px four ways" \
        in res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    got = torch.tensor([[{e["class"]: e["prob"] for e in r["top"]}[c] for c in CLASSES] for r in rows],
                       dtype=torch.float64)
    ckpt_classes = ckpt["classes"]
    want = (mean / t).softmax(-1)[:, [ckpt_classes.index(c) for c in CLASSES]]
    assert torch.allclose(got, want, atol=2e-5)
    one_view = (plain / t).softmax(-1)[:, [ckpt_classes.index(c) for c in CLASSES]]
    assert not torch.allclose(got, one_view, atol=1e-4)  # the views changed the answer's probabilities

    res = run_cli("predict", *paths, "--model", mirrored, "-f", "json", "-k", "3", "--device", "cpu",
                  "--precision", "fp32", "--no-tta")
    assert res.exit_code == 0, res.output
    assert "TTA off (--no-tta); the temperature and conformal scores were fitted on the TTA views" in res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    got = torch.tensor([[{e["class"]: e["prob"] for e in r["top"]}[c] for c in CLASSES] for r in rows],
                       dtype=torch.float64)
    assert torch.allclose(got, one_view, atol=2e-5)


def test_eval_follows_the_models_default_and_the_flags(tmp_path, mirrored, unmirrored):
    data = make_dataset(tmp_path / "ds", CLASSES, per_class=4, seed=11)
    reports = {}
    for name, run, flags in (("mirrored", mirrored, ()), ("mirrored-off", mirrored, ("--no-tta",)),
                             ("plain", unmirrored, ()), ("plain-on", unmirrored, ("--tta",))):
        res = run_cli("eval", data, "--model", run, "--json-out", f"{name}.json", "-o", f"figs-{name}", *flags)
        assert res.exit_code == 0, res.output
        reports[name] = json.loads(Path(f"{name}.json").read_text())
    assert [reports[n]["tta"] for n in ("mirrored", "mirrored-off", "plain", "plain-on")] == [True, False, False, True]
    assert reports["mirrored"]["loss"] != reports["mirrored-off"]["loss"]
    assert reports["plain"]["loss"] != reports["plain-on"]["loss"]


@pytest.mark.parametrize("task, mirror, default", [("single", True, True), ("single", False, False),
                                                   ("multilabel", True, False)])
def test_the_default_follows_training_and_what_the_calibration_saw(task, mirror, default):
    """Label vectors tune their thresholds on one view while training, so their default stays one view."""
    from vitcli.formats import Predictor

    pred = Predictor()
    pred._init_meta(Path("m.pt"), "test", {"classes": ["a", "b"], "task": task, "thresholds": [0.5, 0.5],
                                           "preprocess": {"img_size": 8, "mirror": mirror}})
    line = pred.set_tta(None)
    assert pred.tta is default and (line is not None) is default
    assert pred.set_tta(True) is not None and pred.tta is True  # --tta asks for it on any model


@pytest.mark.parametrize("size, mirror, scale_min, translate, shift", [
    (32, True, 0.5, 0.0, 2),  # small photos, cropped: shifted views, 32 / 16 px
    (48, True, 1.0, 0.1, 3),  # shifted rather than cropped
    (32, True, 1.0, 0.0, 0),  # never moved in training: no shifted views
    (32, False, 0.5, 0.0, 0),  # glyphs (no mirror): one view by default, no shifts
    (224, True, 0.08, 0.0, 0),  # large inputs: ten views cost too much; the mirror only
])
def test_shifted_views_only_for_small_moved_photos(size, mirror, scale_min, translate, shift):
    from vitcli.augment import tta_shift

    assert tta_shift(size, mirror, scale_min, translate) == shift


def test_a_checkpoint_from_before_shifted_views_keeps_its_two():
    from vitcli.formats import Predictor

    pred = Predictor()
    meta = {"classes": ["a", "b"], "task": "single", "preprocess": {"img_size": 8, "mirror": True}}
    pred._init_meta(Path("m.pt"), "test", meta)
    pred.set_tta(None)
    assert pred.views == 2
    pred._init_meta(Path("m.pt"), "test", {**meta, "preprocess": {"img_size": 8, "mirror": True, "shift": 1}})
    assert "10 views" in pred.set_tta(None) and pred.views == 10
    assert pred.set_tta(False) is None and pred.views == 1
