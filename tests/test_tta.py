"""Test-time augmentation follows training: a model trained on mirrored images predicts on the image and its mirror
(logits averaged) by default, is calibrated on those same logits, and `--no-tta` turns it off; a model trained
without mirroring predicts on the image alone unless `--tta` asks."""

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
    """The model's logits of each image and of its mirror, computed here from the checkpoint (fp32, CPU)."""
    import torch

    from vitcli import data as D
    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(ckpt).eval()
    pre = ckpt["preprocess"]
    x = D.eval_transform(torch.stack([D.decode_square(p, pre["resize_size"]) for p in paths]), pre)
    with torch.no_grad():
        return model(x).double(), model(x.flip(-1)).double(), ckpt


def test_mirrored_training_makes_tta_the_default_and_calibrates_on_both_views(tmp_path, mirrored):
    import torch

    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=2, seed=9)
    paths = sorted(imgs.rglob("*.png"))
    plain, flipped, ckpt = _logits(mirrored, paths)
    assert ckpt["preprocess"]["mirror"] is True and ckpt["calibration"]["tta"] is True
    t = ckpt["calibration"]["temperature"]

    res = run_cli("predict", *paths, "--model", mirrored, "-f", "json", "-k", "3", "--device", "cpu",
                  "--precision", "fp32")
    assert res.exit_code == 0, res.output
    assert "TTA: the mean of the image's and its mirror's logits" in res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    got = torch.tensor([[{e["class"]: e["prob"] for e in r["top"]}[c] for c in CLASSES] for r in rows],
                       dtype=torch.float64)
    ckpt_classes = ckpt["classes"]
    want = (((plain + flipped) / 2) / t).softmax(-1)[:, [ckpt_classes.index(c) for c in CLASSES]]
    assert torch.allclose(got, want, atol=2e-5)
    one_view = (plain / t).softmax(-1)[:, [ckpt_classes.index(c) for c in CLASSES]]
    assert not torch.allclose(got, one_view, atol=1e-4)  # the mirror changed the answer's probabilities

    res = run_cli("predict", *paths, "--model", mirrored, "-f", "json", "-k", "3", "--device", "cpu",
                  "--precision", "fp32", "--no-tta")
    assert res.exit_code == 0, res.output
    assert "TTA off (--no-tta); the temperature and conformal scores were fitted on both views" in res.output
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
