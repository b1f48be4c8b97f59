"""Calibrated predictions end to end: temperature applied in predict/eval, --min-prob, --coverage sets in every
output format, eval on exported models and with TTA."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli
from test_predict import CLASSES, fitted_checkpoint

_CAL: dict = {}


def calibrated_run(tmp_path_factory) -> Path:
    """The fitted test checkpoint plus a 'calibration' entry fitted on 20 fresh images per class."""
    import torch

    from vitcli import data as D
    from vitcli.calibrate import fit_calibration
    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    key = str(tmp_path_factory.getbasetemp())
    if key in _CAL:
        return _CAL[key]
    run = fitted_checkpoint(tmp_path_factory)
    ckpt = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(ckpt)
    root = tmp_path_factory.mktemp("calibrated")
    _, split = D.scan_classes(make_dataset(root / "val", CLASSES, per_class=20, seed=7))
    pre = ckpt["preprocess"]
    x = D.eval_transform(torch.stack([D.decode_square(p, pre["resize_size"]) for p in split.paths]), pre)
    with torch.no_grad():
        logits = model(x)
    labels = torch.tensor(split.labels)
    labels[::10] = (labels[::10] + 1) % 3  # 10% label noise: mistakes, so the temperature has a finite optimum
    ckpt["calibration"] = fit_calibration(logits, labels)
    save_checkpoint(root / "run" / "best.pt", ckpt)
    _CAL[key] = root / "run"
    return _CAL[key]


@pytest.fixture
def cal_run(tmp_path_factory) -> Path:
    return calibrated_run(tmp_path_factory)


def _json(res) -> list[dict]:
    assert res.exit_code in (0, 2), res.output
    return json.loads(res.stdout[res.stdout.index("["):])


def test_predict_applies_the_stored_temperature(tmp_path, cal_run, tmp_path_factory):
    import torch

    from vitcli.checkpoint import load_checkpoint

    t = load_checkpoint(cal_run / "best.pt")["calibration"]["temperature"]
    assert t != pytest.approx(1.0, abs=1e-3)
    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=2, seed=3)
    plain = _json(run_cli("predict", imgs, "--model", fitted_checkpoint(tmp_path_factory), "-f", "json",
                          "-k", "3", "--device", "cpu", "--precision", "fp32"))
    cal = _json(run_cli("predict", imgs, "--model", cal_run, "-f", "json", "-k", "3", "--device", "cpu",
                        "--precision", "fp32"))
    for a, b in zip(plain, cal, strict=True):
        p = torch.tensor([e["prob"] for e in sorted(a["top"], key=lambda e: e["class"])], dtype=torch.float64)
        q = torch.tensor([e["prob"] for e in sorted(b["top"], key=lambda e: e["class"])], dtype=torch.float64)
        # softmax(z / T) from softmax(z): p ** (1 / T), renormalised
        assert q.tolist() == pytest.approx((p ** (1 / t) / (p ** (1 / t)).sum()).tolist(), abs=2e-5)
        assert a["class"] == b["class"]


def test_min_prob_answers_unknown_below_the_threshold_per_class(tmp_path, cal_run):
    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=3, seed=3)
    base = _json(run_cli("predict", imgs, "--model", cal_run, "-f", "json", "--device", "cpu"))
    probs = sorted({r["prob"] for r in base})
    cut = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2  # between two printed values
    got = _json(run_cli("predict", imgs, "--model", cal_run, "-f", "json", "--min-prob", str(cut)))
    for a, b in zip(base, got, strict=True):
        assert b["class"] == ("unknown" if a["prob"] < cut else a["class"]) and b["top"] == a["top"]
    assert 0 < sum(r["class"] == "unknown" for r in got) < len(got)
    got = _json(run_cli("predict", imgs, "--model", cal_run, "-f", "json", "--min-prob", "red=1.0"))
    for a, b in zip(base, got, strict=True):
        assert b["class"] == ("unknown" if a["class"] == "red" else a["class"])
    res = run_cli("predict", imgs, "--model", cal_run, "-f", "csv", "--min-prob", "1.0")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows and all(r["answer"] == "unknown" and r["class_1"] in CLASSES for r in rows)
    res = run_cli("predict", imgs, "--model", cal_run, "--min-prob", "purple=0.3")
    assert res.exit_code == 1 and "no class 'purple'" in res.output and "Traceback" not in res.output


def test_coverage_sets_follow_the_lac_threshold_in_every_format(tmp_path, cal_run):
    from vitcli.calibrate import calibration_of, conformal_threshold
    from vitcli.checkpoint import load_checkpoint

    _, scores = calibration_of(load_checkpoint(cal_run / "best.pt"))
    thr = conformal_threshold(scores, 0.8)
    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=3, seed=3)
    res = run_cli("predict", imgs, "--model", cal_run, "-f", "json", "-k", "3", "--coverage", "0.8")
    for r in _json(res):
        want = [e["class"] for e in r["top"] if 1 - e["prob"] <= thr + 1e-6]
        assert r["set"] == want
    res = run_cli("predict", imgs, "--model", cal_run, "-f", "jsonl", "--coverage", "0.8")
    assert all("set" in json.loads(line) for line in res.stdout.strip().splitlines())
    res = run_cli("predict", imgs, "--model", cal_run, "-f", "csv", "--coverage", "0.8")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 9 and all(set(r["set"].split("|")) <= set(CLASSES) | {""} for r in rows)
    res = run_cli("predict", imgs, "--model", cal_run, "--coverage", "0.8")
    assert res.exit_code == 0 and "set" in res.output and "{" in res.output
    res = run_cli("predict", imgs, "--model", cal_run, "--coverage", "1.5")
    assert res.exit_code == 1 and "--coverage 1.5" in res.output


def test_coverage_without_stored_scores_is_a_clear_error(tmp_path, tmp_path_factory):
    imgs = make_dataset(tmp_path / "imgs", CLASSES, per_class=1, seed=3)
    res = run_cli("predict", imgs, "--model", fitted_checkpoint(tmp_path_factory), "--coverage", "0.9")
    assert res.exit_code == 1 and "train.calibrate" in res.output and "Traceback" not in res.output


def test_eval_prints_ece_before_and_after_and_set_coverage(tmp_path, cal_run):
    data = make_dataset(tmp_path / "ds", CLASSES, per_class=10, seed=21)
    res = run_cli("eval", data, "--model", cal_run, "--json-out", "e.json", "-o", "figs", "--coverage", "0.8")
    assert res.exit_code == 0, res.output
    assert "uncalibrated" in res.output and "calibrated" in res.output and "mean set size" in res.output
    r = json.loads(Path("e.json").read_text())
    assert r["temperature"] != 1.0 and r["ece"] != r["ece_uncalibrated"]
    c = r["conformal"]
    assert c["coverage_target"] == 0.8 and 0 <= c["coverage"] <= 1 and c["mean_set_size"] >= 0
    assert c["calibration_images"] == 60
    res = run_cli("eval", data, "--model", cal_run, "--json-out", "t.json", "-o", "figs", "--tta")
    assert res.exit_code == 0, res.output
    t = json.loads(Path("t.json").read_text())
    assert t["tta"] is True and t["loss"] != r["loss"] and t["images"] == r["images"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_models_carry_the_calibration_and_eval_runs_on_them(tmp_path, cal_run, fmt):
    data = make_dataset(tmp_path / "ds", CLASSES, per_class=6, seed=21)
    out = tmp_path / f"model.{fmt}"
    res = run_cli("export", "--model", cal_run, "--format", fmt, "--output", out)
    assert res.exit_code == 0, res.output
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["calibration"]["temperature"] != 1.0 and len(meta["calibration"]["conformal_scores"]) == 60
    ref = run_cli("eval", data, "--model", cal_run, "--json-out", "ref.json", "-o", "f1", "--precision", "fp32",
                  "--coverage", "0.8")
    got = run_cli("eval", data, "--model", out, "--json-out", "got.json", "-o", "f2", "--coverage", "0.8")
    assert ref.exit_code == 0 and got.exit_code == 0, got.output
    r, g = json.loads(Path("ref.json").read_text()), json.loads(Path("got.json").read_text())
    assert g["confusion_matrix"] == r["confusion_matrix"] and g["temperature"] == pytest.approx(r["temperature"])
    assert g["loss"] == pytest.approx(r["loss"], abs=1e-4) and g["ece"] == pytest.approx(r["ece"], abs=1e-4)
    assert g["conformal"]["coverage"] == r["conformal"]["coverage"]
    preds = _json(run_cli("predict", data, "--model", out, "-f", "json", "--coverage", "0.8", "-k", "3"))
    ref_preds = _json(run_cli("predict", data, "--model", cal_run, "-f", "json", "--coverage", "0.8", "-k", "3",
                              "--precision", "fp32"))
    assert [p["set"] for p in preds] == [p["set"] for p in ref_preds]


def test_training_calibrates_both_checkpoints_and_best_metric_picks_best_pt(shapes, tmp_path):
    from conftest import TINY
    from vitcli.calibrate import T_BOUNDS
    from vitcli.checkpoint import load_checkpoint
    from vitcli.evaluate import evaluate

    res = run_cli("train", shapes, *TINY, "--epochs", "3", "--set", "train.recipe=none",
                  "--set", "train.best_metric=macro_f1", "--set", "optim.lr=3e-3")
    assert res.exit_code == 0, res.output
    assert "calibrated best.pt" in res.output and "calibrated last.pt" in res.output
    run = tmp_path / "runs" / "train"
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    for ck in (best, last):
        cal = ck["calibration"]
        assert T_BOUNDS[0] <= cal["temperature"] <= T_BOUNDS[1]
        assert cal["images"] == len(cal["conformal_scores"]) > 0
        assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert "train_state" in last  # resuming still works from the recalibrated last.pt
    f1s = [load_checkpoint(run / "last.pt")["train_state"]["progress"]["history"][i].get("val_macro_f1")
           for i in range(3)]
    assert best["metrics"]["val_macro_f1"] == pytest.approx(max(f1s)) and best["epoch"] == 1 + f1s.index(max(f1s))
    # the stored macro F1 is the one eval computes on the same validation images
    val = tmp_path / "val"
    for row in csv.DictReader(io.StringIO((run / "split.csv").read_text())):
        if row["split"] == "val":
            dst = val / row["class"] / Path(row["path"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((shapes / row["path"]).read_bytes())
    rep = evaluate(val, str(run / "best.pt"), figures=False, device="cpu", precision="fp32")
    assert rep["macro"]["f1"] == pytest.approx(best["metrics"]["val_macro_f1"], abs=1e-6)

    res = run_cli("train", shapes, *TINY, "--epochs", "3", "--set", "train.recipe=none", "--set",
                  "train.best_metric=loss", "--set", "train.calibrate=false", "--name", "byloss")
    assert res.exit_code == 0, res.output
    assert "calibrated" not in res.output
    hist = load_checkpoint(tmp_path / "runs" / "byloss" / "last.pt")["train_state"]["progress"]["history"]
    best = load_checkpoint(tmp_path / "runs" / "byloss" / "best.pt")
    losses = [h["val_loss"] for h in hist]
    assert best["epoch"] == 1 + losses.index(min(losses)) and "calibration" not in best
    res = run_cli("train", shapes, *TINY, "--set", "train.best_metric=f1")
    assert res.exit_code == 1 and "train.best_metric" in res.output and "macro_f1" in res.output
