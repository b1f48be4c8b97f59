"""The task: one probability for one image on every output path, calibration that cannot collapse, and the
multi-label answers to --min-prob / --coverage / --output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli
from test_predict import CLASSES
from test_trust import calibrated_run


def _predict_probs(model: Path, image: Path) -> dict[str, float]:
    res = run_cli("predict", image, "--model", model, "-f", "json", "-k", "3", "--device", "cpu",
                  "--precision", "fp32")
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout[res.stdout.index("["):])
    return {e["class"]: e["prob"] for e in row["top"]}


def test_one_image_gets_the_same_probability_on_every_output_path(tmp_path, tmp_path_factory, monkeypatch):
    import torch

    from vitcli import data as D
    from vitcli import figures
    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint
    from vitcli.evaluation import evaluate_split
    from vitcli.task import Task

    run = calibrated_run(tmp_path_factory)
    ckpt = load_checkpoint(run / "best.pt")
    assert abs(ckpt["calibration"]["temperature"] - 1.0) > 0.2  # far enough from 1 to show a skipped temperature
    image = sorted(make_dataset(tmp_path / "imgs", CLASSES, per_class=1, seed=11).rglob("*.png"))[0]
    want = _predict_probs(run, image)  # predict, json
    top, p_top = max(want.items(), key=lambda cp: cp[1])

    # eval: the image filed under another class is a mistake, reported with its probability in --json's worst
    wrong = next(c for c in CLASSES if c != top)
    (tmp_path / "ev" / wrong).mkdir(parents=True)
    shutil.copy(image, tmp_path / "ev" / wrong / image.name)
    res = run_cli("eval", tmp_path / "ev", "--model", run, "--json", tmp_path / "ev.json", "--output",
                  tmp_path / "evfig", "--device", "cpu", "--precision", "fp32")
    assert res.exit_code == 0, res.output
    (worst,) = json.loads((tmp_path / "ev.json").read_text())["worst"]
    assert worst["predicted"] == top and worst["prob_predicted"] == pytest.approx(p_top, abs=1e-5)
    assert worst["prob_true"] == pytest.approx(want[wrong], abs=1e-5)

    # the report / compare path: evaluate_split with the checkpoint's task
    net = model_from_checkpoint(ckpt).eval()
    split = D.Split([image], [CLASSES.index(top)])
    _, probs, _, _, _ = evaluate_split(net, list(ckpt["classes"]), dict(ckpt["preprocess"]), split,
                                       torch.device("cpu"), "fp32", task=Task.from_meta(ckpt))
    assert dict(zip(ckpt["classes"], probs[0].tolist(), strict=True)) == pytest.approx(want, abs=1e-5)

    # inspect attention: every method's figure title carries the same probability (one decimal of a percent)
    titles: list[str] = []
    real = figures.save_figure

    def keep_title(fig, path, **kw):
        titles.append(fig._suptitle.get_text() if fig._suptitle else "")
        return real(fig, path, **kw)

    monkeypatch.setattr(figures, "save_figure", keep_title)
    for method in ("all", "gradcam"):
        res = run_cli("inspect", "attention", image, "--model", run, "--method", method, "--output", tmp_path / method)
        assert res.exit_code == 0, res.output
    assert len(titles) >= 4
    for t in titles:
        got = re.search(rf"{top} \((\d+\.\d)%\)", t)
        assert got, t
        assert float(got.group(1)) == pytest.approx(100 * p_top, abs=0.051)

    # exports: ONNX and TorchScript carry the task and its temperature
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        res = run_cli("export", "-m", run, "-f", fmt, "-o", tmp_path / name)
        assert res.exit_code == 0, res.output
        assert _predict_probs(tmp_path / name, image) == pytest.approx(want, abs=1e-4)


def test_a_run_without_validation_mistakes_keeps_sane_probabilities(tmp_path):
    """No validation mistakes: the temperature is not driven to its bound, and wrong answers on new images are
    not reported as certain."""
    from conftest import TINY
    from vitcli.calibrate import T_BOUNDS
    from vitcli.checkpoint import load_checkpoint

    data = make_dataset(tmp_path / "d", CLASSES, per_class=24, seed=2)
    res = run_cli("train", data, *TINY, "--epochs", "8", "--set", "optim.lr=3e-3", "--set", "train.recipe=none",
                  "--output", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "train"
    ckpt = load_checkpoint(run / "best.pt")
    cal = ckpt["calibration"]
    assert cal["errors"] == 0, "the shapes should be learned without a validation mistake"
    assert cal["temperature"] == 1.0 and T_BOUNDS[0] <= cal["temperature"] and "kept at 1" in res.output
    # new images: no answer is certain; filed under the next class, each right answer is a mistake to eval,
    # and none of those wrong predictions is reported at >= 0.999
    new = make_dataset(tmp_path / "new", CLASSES, per_class=6, seed=9)
    res = run_cli("predict", new, "--model", run, "-f", "json")
    assert res.exit_code == 0, res.output
    assert max(r["prob"] for r in json.loads(res.stdout[res.stdout.index("["):])) < 0.999
    for i, c in enumerate(CLASSES):
        shutil.copytree(new / c, tmp_path / "relabelled" / CLASSES[(i + 1) % len(CLASSES)])
    res = run_cli("eval", tmp_path / "relabelled", "--model", run, "--json", tmp_path / "ev.json", "--output",
                  tmp_path / "evfig")
    assert res.exit_code == 0, res.output
    worst = json.loads((tmp_path / "ev.json").read_text())["worst"]
    assert len(worst) >= 8 and all(w["prob_predicted"] < 0.999 for w in worst)


def test_coverage_beyond_what_the_validation_split_supports_says_so(tmp_path, tmp_path_factory):
    run = calibrated_run(tmp_path_factory)  # calibrated on 60 images: 0.99 needs 99
    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=1, seed=3)
    res = run_cli("predict", imgs, "--model", run, "-f", "json", "-k", "3", "--coverage", "0.99")
    assert res.exit_code == 0, res.output
    assert "needs at least 99 validation images" in res.output and "every class is in every set" in res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert all(sorted(r["set"]) == sorted(CLASSES) for r in rows)


# ----------------------------------------------------------------------------------------------- multi-label
@pytest.fixture(scope="module")
def ml_model(tmp_path_factory):
    """A multi-label checkpoint (from test_multilabel's shapes) with hand-set thresholds."""
    import torch

    from test_multilabel import make_multilabel
    from vitcli import data as D
    from vitcli.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from vitcli.config import ModelConfig
    from vitcli.models import build_model

    root = tmp_path_factory.mktemp("mltask")
    labels, truth = make_multilabel(root / "d", 12)
    torch.manual_seed(0)
    model, spec = build_model(ModelConfig(name="vit-tiny/8", embed_dim=32, depth=1, num_heads=2), 4, 32)
    pre = D.preprocess_info(32, 1.0, "bicubic", [0.5] * 3, [0.25] * 3)
    ckpt = make_checkpoint(model_spec=spec, classes=["blue", "green", "red", "yellow"], preprocess=pre,
                           state_dict=model.state_dict(), task="multilabel", thresholds=[0.5, 0.5, 0.5, 0.5])
    save_checkpoint(root / "run" / "best.pt", ckpt)
    assert load_checkpoint(root / "run" / "best.pt")["task"] == "multilabel"
    return root, labels, truth


def test_multilabel_min_prob_marks_labels_below_it_unsure(tmp_path, ml_model):
    root, _, truth = ml_model
    imgs = [root / "d" / f for f in sorted(truth)[:6]]
    base = run_cli("predict", *imgs, "--model", root / "run", "-f", "json", "-k", "4")
    assert base.exit_code == 0, base.output
    rows = json.loads(base.stdout[base.stdout.index("["):])
    probs = sorted(e["prob"] for r in rows for e in r["top"] if e["prob"] >= 0.5)
    assert probs, "some class must pass the threshold 0.5"
    cut = probs[len(probs) // 2] + 1e-7  # about half of the listed labels fall below it
    res = run_cli("predict", *imgs, "--model", root / "run", "-f", "json", "-k", "4", "--min-prob", f"{cut:.7f}")
    assert res.exit_code == 0, res.output
    for a, b in zip(rows, json.loads(res.stdout[res.stdout.index("["):]), strict=True):
        listed = {e["class"] for e in a["labels"]}
        kept = {e["class"] for e in b["labels"]}
        unsure = {e["class"] for e in b.get("unsure", [])}
        assert kept == {e["class"] for e in a["labels"] if e["prob"] >= cut} and kept | unsure == listed
        assert not kept & unsure
    assert "unsure" in run_cli("predict", *imgs, "--model", root / "run", "--min-prob", f"{cut:.7f}").output


def test_multilabel_coverage_and_eval_options_are_refused_in_one_line(tmp_path, ml_model):
    root, labels, truth = ml_model
    img = root / "d" / sorted(truth)[0]
    res = run_cli("predict", img, "--model", root / "run", "--coverage", "0.9")
    assert res.exit_code == 1 and "multi-label" in res.output and "prediction sets" in res.output
    assert "train.calibrate" not in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()[-1]) > 0 and res.output.count("error:") == 1
    for extra, word in ((["--coverage", "0.8"], "--coverage 0.8"), (["--output", str(tmp_path / "figs")], "--output")):
        res = run_cli("eval", labels, "--model", root / "run", *extra)
        assert res.exit_code == 1 and word in res.output and "multi-label" in res.output, res.output
        assert res.output.count("error:") == 1 and "Traceback" not in res.output
    assert not (tmp_path / "figs").exists()
    res = run_cli("eval", labels, "--model", root / "run", "--json", tmp_path / "ml.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ml.json").read_text())["task"] == "multilabel"
