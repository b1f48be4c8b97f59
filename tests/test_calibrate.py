"""Calibration maths: temperature fit against a reference optimiser, conformal coverage on synthetic scores,
abstention thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from vitcli.calibrate import (
    conformal_threshold,
    fit_calibration,
    fit_temperature,
    lac_scores,
    parse_min_prob,
    prediction_sets,
    set_metrics,
)
from vitcli.errors import VitcliError


def _synthetic_logits(n: int, c: int, scale: float, seed: int):
    """Logits whose labels are drawn from softmax(true_logits): softmax(logits / T) is calibrated at
    T = 1 / scale, since logits = true_logits * scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, c, generator=g, dtype=torch.float64) * 2.0  # (N, C)
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)  # (N,)
    return true * scale, labels


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_temperature_fit_matches_scipy_minimisation_of_the_same_nll(scale):
    import torch.nn.functional as F
    from scipy.optimize import minimize_scalar

    logits, labels = _synthetic_logits(4000, 5, scale, seed=int(scale * 10))
    t = fit_temperature(logits, labels)

    def nll(temp: float) -> float:
        return float(F.cross_entropy(logits / temp, labels))

    ref = minimize_scalar(nll, bounds=(0.01, 100.0), method="bounded", options={"xatol": 1e-9})
    assert t == pytest.approx(ref.x, rel=1e-4)
    assert nll(t) <= ref.fun + 1e-9
    assert t == pytest.approx(scale, rel=0.15)  # recovers the scale the logits were inflated by


def test_calibration_lowers_ece_and_keeps_accuracy():
    logits, labels = _synthetic_logits(5000, 4, 0.35, seed=3)  # under-confident, like label smoothing makes
    cal = fit_calibration(logits, labels)
    assert cal["ece_before"] > 0.08 and cal["ece_after"] < 0.02
    assert cal["nll_after"] < cal["nll_before"]
    scaled = logits / cal["temperature"]
    assert (scaled.argmax(1) == logits.argmax(1)).all()
    assert len(cal["conformal_scores"]) == 5000 and bool((cal["conformal_scores"].diff() >= 0).all())


def test_conformal_threshold_is_the_finite_sample_quantile():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    # coverage 0.8: rank ceil(10 * 0.8) = 8 -> the 8th smallest = 0.8
    assert conformal_threshold(scores, 0.8) == pytest.approx(0.8)
    assert conformal_threshold(scores, 0.5) == pytest.approx(0.5)  # rank ceil(5.0) = 5
    assert conformal_threshold(scores, 0.95) == np.inf  # rank 10 > n: every class
    with pytest.raises(VitcliError, match="--coverage"):
        conformal_threshold(scores, 1.0)


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_conformal_sets_reach_the_coverage_on_fresh_exchangeable_data(coverage):
    """Dirichlet 'model outputs' with labels drawn from them: over many calibration/test draws the mean
    coverage is between 1 - alpha and 1 - alpha + 1 / (n + 1), as split conformal guarantees."""
    rng = np.random.default_rng(int(coverage * 100))
    n_cal, n_test, c, hits = 500, 2000, 6, []
    for _ in range(40):
        probs = rng.dirichlet(np.full(c, 0.7), size=n_cal + n_test)  # (N, C)
        labels = (rng.random((len(probs), 1)) > probs.cumsum(1)).sum(1)  # labels drawn from probs
        thr = conformal_threshold(lac_scores(probs[:n_cal], labels[:n_cal]), coverage)
        hits.append(set_metrics(probs[n_cal:], labels[n_cal:], thr)["coverage"])
    assert coverage - 0.01 <= np.mean(hits) <= coverage + 1 / (n_cal + 1) + 0.01
    assert all(abs(h - coverage) < 0.05 for h in hits)


def test_prediction_sets_hold_every_class_above_one_minus_the_threshold():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9]])
    sets = prediction_sets(probs, 0.75)  # classes with p >= 0.25
    assert sets.tolist() == [[True, False, False], [True, True, True], [False, False, True]]
    m = set_metrics(probs, np.array([1, 2, 2]), 0.75)
    assert m["coverage"] == pytest.approx(2 / 3) and m["mean_set_size"] == pytest.approx(5 / 3)


def test_min_prob_takes_one_threshold_and_per_class_overrides():
    thr = parse_min_prob(["0.5", "cat=0.8"], ["cat", "dog", "a=b"])
    assert thr.tolist() == [0.8, 0.5, 0.5]
    assert parse_min_prob(["a=b=0.3"], ["cat", "dog", "a=b"]).tolist() == [0.0, 0.0, 0.3]
    assert parse_min_prob(None, ["cat"]) is None
    with pytest.raises(VitcliError, match="no class 'cow'"):
        parse_min_prob(["cow=0.5"], ["cat", "dog"])
    with pytest.raises(VitcliError, match=r"\[0, 1\]"):
        parse_min_prob(["1.5"], ["cat", "dog"])
    with pytest.raises(VitcliError, match="CLASS=PROB"):
        parse_min_prob(["high"], ["cat", "dog"])


def test_temperature_stays_1_with_too_few_validation_mistakes_and_is_bounded_otherwise():
    import torch

    from vitcli.calibrate import MIN_ERRORS, T_BOUNDS

    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]] * 10)  # (30, 2)
    labels = torch.tensor([0, 1, 0] * 10)
    cal = fit_calibration(logits, labels)  # no mistakes: the NLL falls all the way to T -> 0
    assert cal["temperature"] == 1.0 and cal["errors"] == 0 and "kept at 1" in cal["rule"]
    labels[:MIN_ERRORS - 1] = 1 - labels[:MIN_ERRORS - 1]
    assert fit_temperature(logits, labels) == 1.0  # still too few to trust a fit
    labels[:MIN_ERRORS] = torch.tensor([1, 0, 1, 1, 0])  # exactly MIN_ERRORS mistakes
    t = fit_temperature(logits, labels)
    assert T_BOUNDS[0] <= t <= T_BOUNDS[1] and t != 1.0
    many = torch.tensor([[40.0, 0.0]] * 50 + [[0.0, 40.0]] * 5)  # confident and 5 wrong: a huge T would fit
    assert fit_temperature(many, torch.zeros(55, dtype=torch.long)) == T_BOUNDS[1]
