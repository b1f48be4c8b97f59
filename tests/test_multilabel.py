"""Multi-label classification: metrics against scikit-learn, thresholds, losses, and training end to end."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from vitcli import multilabel as ML


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
    m = ML.compute_metrics(probs, targets, list("abcd"), [0.5, 0.4, 0.5, 0.6])
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
    assert ML.asymmetric_loss(logits, target, gamma_neg=0, clip=0) == pytest.approx(float(bce), rel=1e-5)
    assert ML.asymmetric_loss(logits, target) < bce  # easy negatives down-weighted
    from timm.data import Mixup

    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    xm, ym = ML.mix(Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3), x.clone(), y)
    lam = float(ym[0, 0])  # row 0 mixes with row 3: (1, 0, 0) * lam + (0, 0, 1) * (1 - lam)
    assert torch.allclose(ym[0], torch.tensor([lam, 0.0, 1 - lam])) and 0 < lam <= 1
    assert torch.allclose(ym, y * lam + y.flip(0) * (1 - lam))


def test_above_threshold_lists_every_label_over_its_own_threshold():
    got = ML.above_threshold([0.9, 0.3, 0.6], ["a", "b", "c"], [0.5, 0.2, 0.7])
    assert got == [("a", 0.9), ("b", 0.3)]
