"""Multi-label classification: metrics against scikit-learn, thresholds, losses, and training end to end."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from vitcli import metrics as ML
from vitcli import task as T
from vitcli.task import MultiLabel


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 4)) < [0.5, 0.2, 0.05, 0.7]).astype(float)
    probs = np.clip(targets * 0.3 + rng.random((200, 4)) * 0.7, 0, 1).round(2)  # ties on purpose
    targets[:, 2] = 0  # a class without positives
    return probs, targets


def test_average_precision_and_f1_match_scikit_learn(scored):
    probs, targets = scored
    for c in (0, 1, 3):
        assert ML.average_precision(probs[:, c], targets[:, c]) == pytest.approx(
            average_precision_score(targets[:, c], probs[:, c]), abs=1e-12)
    assert np.isnan(ML.average_precision(probs[:, 2], targets[:, 2]))
    m = ML.label_vector_metrics(probs, targets, list("abcd"), [0.5, 0.4, 0.5, 0.6])
    pred = probs >= np.array([0.5, 0.4, 0.5, 0.6])
    assert m["micro_f1"] == pytest.approx(f1_score(targets, pred, average="micro"))
    assert m["mAP"] == pytest.approx(np.mean([average_precision_score(targets[:, c], probs[:, c]) for c in (0, 1, 3)]))
    assert m["exact_match"] == pytest.approx((pred == targets.astype(bool)).all(1).mean())
    assert m["per_class"][2]["ap"] is None and m["per_class"][2]["support"] == 0


def test_tuned_thresholds_give_the_best_f1_per_class(scored):
    probs, targets = scored
    th = ML.tune_thresholds(probs, targets)
    assert th[2] == ML.DEFAULT_THRESHOLD
    for c in (0, 1, 3):
        best = max(f1_score(targets[:, c], probs[:, c] >= t, zero_division=0) for t in np.unique(probs[:, c]))
        assert f1_score(targets[:, c], probs[:, c] >= th[c]) == pytest.approx(best)


def test_asymmetric_loss_is_bce_without_focusing_and_mixup_mixes_label_vectors():
    logits, target = torch.randn(6, 5), (torch.rand(6, 5) < 0.4).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert T.asymmetric_loss(logits, target, gamma_neg=0, clip=0) == pytest.approx(float(bce), rel=1e-5)
    assert T.asymmetric_loss(logits, target) < bce  # easy negatives down-weighted
    from timm.data import Mixup

    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    xm, ym = T.mix(Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3), x.clone(), y)
    lam = float(ym[0, 0])  # row 0 mixes with row 3: (1, 0, 0) * lam + (0, 0, 1) * (1 - lam)
    assert torch.allclose(ym[0], torch.tensor([lam, 0.0, 1 - lam])) and 0 < lam <= 1
    assert torch.allclose(ym, y * lam + y.flip(0) * (1 - lam))


def test_labels_are_every_class_over_its_own_threshold_and_min_prob_makes_them_unsure():
    task = MultiLabel(thresholds=[0.5, 0.2, 0.7])
    (d,) = task.decide(np.array([[0.9, 0.3, 0.6]]))
    assert d.labels == [0, 1] and d.unsure == [] and d.order == [0, 2, 1]
    (d,) = task.decide(np.array([[0.9, 0.3, 0.6]]), min_prob=np.array([0.0, 0.5, 0.0]))
    assert d.labels == [0] and d.unsure == [1]  # b passes its threshold 0.2 but not its --min-prob 0.5


def test_a_class_with_too_few_validation_positives_keeps_the_default_threshold():
    probs = np.array([[0.9], [0.8], [0.3], [0.2], [0.1]])
    targets = np.array([[1], [1], [0], [0], [0]])  # 2 positives: a tuned cut-off would fit exactly these two
    assert ML.tune_thresholds(probs, targets) == [ML.DEFAULT_THRESHOLD]
    assert ML.tune_thresholds(np.tile(probs, (3, 1)), np.tile(targets, (3, 1)))[0] == pytest.approx(0.55)


# ----------------------------------------------------------------------------------------------- end to end
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def make_multilabel(root, n: int, size: int = 32, seed: int = 0):
    """n images with 2-3 of 4 coloured shapes, one per quadrant; labels.csv: path, labels ('red|blue')."""
    import csv
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 50) for _ in range(3)))
        d = ImageDraw.Draw(img)
        present = rng.sample(sorted(COLOURS), rng.choice([2, 3]))
        h = size // 2
        for c, (qx, qy) in zip(present, rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], len(present)), strict=False):
            r = rng.randint(h // 4, h // 2 - 1)
            cx, cy = qx * h + rng.randint(r, h - r), qy * h + rng.randint(r, h - r)
            fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[c])
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=fill)
        img.save(root / f"img/{i:04d}.png")
        rows.append((f"img/{i:04d}.png", "|".join(sorted(present))))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "labels"), *rows])
    return root / "labels.csv", dict(rows)


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    from conftest import TINY, run_cli

    root = tmp_path_factory.mktemp("ml")
    labels, truth = make_multilabel(root / "d", 400)
    res = run_cli("train", labels, *TINY, "--epochs", "10", "--output", root / "runs", "--set", "optim.lr=3e-3",
                  "--set", "train.label_smoothing=0", "--set", "data.mixup=0.2")
    assert res.exit_code == 0, res.output
    return root, truth, res.output


def test_multilabel_shapes_reach_map_0_9_and_store_thresholds(ml_run):
    import csv

    root, _, output = ml_run
    assert "task multi-label" in output and "sigmoid + binary cross-entropy" in output
    rows = list(csv.DictReader(open(root / "runs" / "train" / "metrics.csv")))
    assert max(float(r["val_map"]) for r in rows) >= 0.9
    ckpt = torch.load(root / "runs" / "train" / "best.pt", weights_only=True)
    assert ckpt["task"] == "multilabel" and ckpt["metrics"]["val_map"] >= 0.9
    assert len(ckpt["thresholds"]) == 4 and all(0 < t < 1 for t in ckpt["thresholds"])
    split = list(csv.DictReader(open(root / "runs" / "train" / "split.csv")))
    assert len(split) == 400 and any("|" in r["class"] for r in split)


def test_multilabel_predict_lists_present_shapes_using_stored_thresholds(ml_run):
    import json

    from conftest import run_cli

    root, truth, _ = ml_run
    files = sorted(truth)[:40]
    res = run_cli("predict", *[root / "d" / f for f in files], "--model", root / "runs" / "train", "-f", "json")
    assert res.exit_code == 0, res.output
    preds = json.loads(res.output[res.output.index("["):])
    got = {p["file"].split("/d/")[1]: "|".join(sorted(c["class"] for c in p["labels"])) for p in preds}
    assert sum(got[f] == truth[f] for f in files) >= 30  # exact label sets for most images
    ckpt = torch.load(root / "runs" / "train" / "best.pt", weights_only=True)
    for p in preds:  # every class at or above its own stored threshold is listed, and only those
        listed = {c["class"] for c in p["labels"]}
        for c in p["top"]:
            assert (c["class"] in listed) == (c["prob"] >= ckpt["thresholds"][ckpt["classes"].index(c["class"])])
    table = run_cli("predict", root / "d" / files[0], "--model", root / "runs" / "train")
    assert "labels (at or above threshold)" in table.output


def test_multilabel_eval_export_and_class_attention(ml_run):
    import json

    from conftest import run_cli

    root, _, _ = ml_run
    run = root / "runs" / "train"
    res = run_cli("eval", root / "d" / "labels.csv", "--model", run, "--json-out", root / "ev.json")
    assert res.exit_code == 0, res.output
    ev = json.loads((root / "ev.json").read_text())
    assert ev["task"] == "multilabel" and ev["mAP"] >= 0.9 and 0 <= ev["exact_match"] <= 1
    assert [c["class"] for c in ev["per_class"]] == ["blue", "green", "red", "yellow"]
    res = run_cli("export", "--model", run, "--format", "onnx", "--output", root / "m.onnx")
    assert res.exit_code == 0, res.output
    meta = json.loads((root / "m.onnx.json").read_text())
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == 4
    img = root / "d" / "img" / "0000.png"
    a = run_cli("predict", img, "--model", root / "m.onnx", "-f", "json")
    b = run_cli("predict", img, "--model", run, "-f", "json", "--precision", "fp32")
    la, lb = (json.loads(r.output[r.output.index("["):])[0]["labels"] for r in (a, b))
    assert [c["class"] for c in la] == [c["class"] for c in lb]
    res = run_cli("inspect", "attention", img, "--model", run, "--class", "red", "--method", "chefer",
                  "-o", root / "att")
    assert res.exit_code == 0, res.output
    assert (root / "att" / "0000_chefer_red.png").is_file()
    res = run_cli("inspect", "attention", img, "--model", run, "--class", "purple", "--method", "chefer")
    assert res.exit_code == 1 and "--class 'purple' is not a class of the model" in res.output


def test_chefer_map_of_each_label_follows_its_shape(ml_run):
    """A present class's relevance map puts more of its mass on the patches its shape touches than their
    share of the image (on average over images and classes, by at least 1.5x)."""
    from vitcli.checkpoint import load_model
    from vitcli.data import decode_square, eval_transform
    from vitcli.explain import explain

    root, truth, _ = ml_run
    model, ckpt, _ = load_model(str(root / "runs" / "train"))
    model.eval()
    files = [f for f in sorted(truth) if len(truth[f].split("|")) == 2][:8]
    x = torch.stack([decode_square(root / "d" / f, 32) for f in files])
    x = eval_transform(x, ckpt["preprocess"])
    maps = {c: explain(model, x, "chefer", torch.full((len(files),), ckpt["classes"].index(c)))[0]
            for c in ckpt["classes"]}  # each (B, 4, 4)
    for c in maps.values():
        assert torch.allclose(c.sum((1, 2)), torch.ones(len(files)), atol=1e-4)
    raw = torch.stack([decode_square(root / "d" / f, 32) for f in files]).float()  # (B, 3, 32, 32)
    on_shape, area = [], []
    for b, f in enumerate(files):
        for c in truth[f].split("|"):
            near = ((raw[b] - torch.tensor(COLOURS[c]).view(3, 1, 1)).abs().amax(0) < 45).float()  # (32, 32)
            patches = near.view(4, 8, 4, 8).amax((1, 3)) > 0  # (4, 4): patches touching the shape
            on_shape.append(float(maps[c][b][patches].sum()))
            area.append(float(patches.float().mean()))
    assert sum(on_shape) / len(on_shape) > 1.5 * sum(area) / len(area), (on_shape, area)
