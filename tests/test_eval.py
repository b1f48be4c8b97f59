"""vitcli eval: metrics checked by hand on fixed predictions, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset, run_cli
from test_predict import CLASSES, fitted_checkpoint
from vitcli.evaluation import calibration, compute_metrics, most_confused, topk_accuracy

# 10 fixed predictions over 3 classes (a, b, c); argmax per row is given in the comment.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PROBS = np.array([
    [0.9, 0.05, 0.05],  # a  right
    [0.6, 0.3, 0.1],  # a  right
    [0.2, 0.7, 0.1],  # b  wrong (a -> b)
    [0.3, 0.3, 0.4],  # c  wrong (a -> c)
    [0.1, 0.8, 0.1],  # b  right
    [0.2, 0.5, 0.3],  # b  right
    [0.55, 0.35, 0.1],  # a  wrong (b -> a)
    [0.1, 0.1, 0.8],  # c  right
    [0.25, 0.7, 0.05],  # b  wrong (c -> b)
    [0.0, 0.1, 0.9],  # c  right
])


def test_metrics_match_a_hand_computed_confusion_matrix():
    m = compute_metrics(PROBS, LABELS, ["a", "b", "c"])
    # rows true, columns predicted, counted from the comments above
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["top1"] == pytest.approx(0.6)
    # a: P 2/3, R 2/4;  b: P 2/4, R 2/3;  c: P 2/3, R 2/3
    pc = {c["class"]: c for c in m["per_class"]}
    assert pc["a"]["precision"] == pytest.approx(2 / 3) and pc["a"]["recall"] == pytest.approx(0.5)
    assert pc["b"]["precision"] == pytest.approx(0.5) and pc["b"]["recall"] == pytest.approx(2 / 3)
    assert pc["c"]["f1"] == pytest.approx(2 / 3)
    f1_a = 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    f1_b = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert pc["a"]["f1"] == pytest.approx(f1_a)
    assert m["macro"]["f1"] == pytest.approx((f1_a + f1_b + 2 / 3) / 3)
    assert m["weighted"]["f1"] == pytest.approx((4 * f1_a + 3 * f1_b + 3 * 2 / 3) / 10)
    assert m["weighted"]["recall"] == pytest.approx(0.6)  # weighted recall is accuracy
    assert [c["support"] for c in m["per_class"]] == [4, 3, 3]
    assert m["loss"] == pytest.approx(-np.log(PROBS[np.arange(10), LABELS].clip(1e-12)).mean())
    assert m["top5"] is None  # fewer than 5 classes

    from sklearn.metrics import precision_recall_fscore_support

    preds = PROBS.argmax(1)
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(LABELS, preds, average=avg, zero_division=0)
        assert (m[avg]["precision"], m[avg]["recall"], m[avg]["f1"]) == pytest.approx((p, r, f))


def test_a_class_missing_from_the_data_is_left_out_of_the_averages():
    labels, probs = np.array([0, 1]), np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    m = compute_metrics(probs, labels, ["a", "b", "c"])
    assert m["macro"]["f1"] == pytest.approx(1.0)
    assert m["per_class"][2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_most_confused_pairs_are_ordered_by_count():
    cm = np.array([[5, 3, 0], [1, 4, 2], [0, 3, 6]])
    pairs = most_confused(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("a", "b", 3), ("c", "b", 3), ("b", "c", 2), ("b", "a", 1)]
    assert pairs[0]["share_of_true"] == pytest.approx(3 / 8)


def test_ece_and_top_k_by_hand():
    # bin (0.6, 0.667]: confidences 0.62, 0.65 both right -> gap |1 - 0.635|; bin (0.933, 1]: 0.95 wrong
    probs = np.array([[0.62, 0.38], [0.35, 0.65], [0.95, 0.05]])
    labels = np.array([0, 1, 1])
    ece, bins = calibration(probs, labels, bins=15)
    assert ece == pytest.approx((2 * abs(1 - 0.635) + 1 * abs(0 - 0.95)) / 3)
    assert sum(b["count"] for b in bins) == 3 and bins[9]["count"] == 2 and bins[14]["accuracy"] == 0.0
    probs5 = np.array([[0.1, 0.2, 0.3, 0.25, 0.15], [0.5, 0.1, 0.1, 0.1, 0.2]])
    assert topk_accuracy(probs5, np.array([0, 1]), 1) == 0.0
    assert topk_accuracy(probs5, np.array([3, 4]), 2) == 1.0
    assert topk_accuracy(probs5, np.array([0, 2]), 4) == 0.5  # class 0 ranks 5th; class 2 ranks 4th


def test_eval_reports_metrics_figures_and_json(tmp_path, tmp_path_factory):
    run = fitted_checkpoint(tmp_path_factory)
    data = make_dataset(tmp_path / "ds", CLASSES, per_class=5, seed=11, splits=("train", "test"))
    (data / "test" / "red" / "unreadable.png").write_bytes(b"nope")
    res = run_cli("eval", data, "--model", run, "--json-out", "eval.json", "--output", "figs",
                  "--precision", "fp32", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    for word in ("top-1 accuracy", "macro avg", "weighted avg", "confusion matrix", "ECE"):
        assert word in res.output
    r = json.loads(Path("eval.json").read_text())
    assert r["images"] == 15 and len(r["skipped"]) == 1 and "unreadable.png" in r["skipped"][0]
    cm = np.array(r["confusion_matrix"])
    assert cm.sum() == 15 and cm.sum(1).tolist() == [5, 5, 5]  # the test/ split was used, not train/
    assert r["top1"] == pytest.approx(np.trace(cm) / 15)
    assert r["top1"] >= 0.8
    for name in ("confusion", "confusion_normalized", "reliability"):
        assert Path(r["figures"][name]).stat().st_size > 1000
    assert all(w["true"] != w["predicted"] for w in r["worst"])
    assert ("worst" in r["figures"]) == bool(r["worst"])


def test_eval_accepts_a_subset_of_classes_and_rejects_unknown_ones(tmp_path, tmp_path_factory):
    run = fitted_checkpoint(tmp_path_factory)
    subset = make_dataset(tmp_path / "subset", ("red", "blue"), per_class=2, seed=4)
    res = run_cli("eval", subset, "-m", run, "--json-out", "e.json", "-o", "figs")
    assert res.exit_code == 0, res.output
    assert json.loads(Path("e.json").read_text())["images"] == 4
    unknown = make_dataset(tmp_path / "unknown", ("red", "yellow"), per_class=2, seed=4)
    res = run_cli("eval", unknown, "-m", run)
    assert res.exit_code == 1
    assert "yellow" in res.output and "not among the classes" in res.output
