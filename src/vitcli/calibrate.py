"""Trustworthy probabilities: temperature scaling, split-conformal prediction sets and abstention.

- Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits, fitted by minimising the
  negative log-likelihood on the validation split (LBFGS on log T, so T stays positive). It changes no argmax,
  so accuracy is unchanged; only how sure the probabilities say the model is. With fewer than MIN_ERRORS
  validation mistakes the optimum runs off to T -> 0 (every answer certain), so T stays 1; a fit is bounded
  to T_BOUNDS.
- Split conformal prediction (Angelopoulos & Bates 2021) with the LAC score s = 1 - p_true (Sadinle et al.
  2019), the score that gives the smallest sets on average. The validation scores are stored; for a coverage
  1 - alpha the threshold is their ceil((n + 1)(1 - alpha)) / n empirical quantile, and an image's set holds
  every class with p >= 1 - threshold. On exchangeable data the set holds the true class with probability at
  least 1 - alpha. A set can be empty: no class is as likely as the true class was on (1 - alpha) of the
  validation images, i.e. the model does not know.
- Abstention: `--min-prob` thresholds (one for all classes and/or per class) turn a top-1 answer into
  `unknown`.

Also the expected calibration error (ECE) over equal-width confidence bins, which eval reports.

The numbers live in the checkpoint under "calibration" and in exported files' metadata; `calibration_of`
reads them from either.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcli.errors import VitcliError

UNKNOWN = "unknown"  # the answer when the top probability is below its --min-prob threshold

if TYPE_CHECKING:
    import torch

T_BOUNDS = (0.25, 10.0)  # fitted temperatures are clipped to this range: logits at most 4x sharper, 10x flatter
MIN_ERRORS = 5  # validation mistakes needed to fit a temperature; with fewer T stays 1 (the model's own probabilities)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises mean cross-entropy of softmax(logits / T) against `labels` (N,).

    LBFGS with a strong-Wolfe line search on log T in float64; the NLL is convex in 1/T, so this finds the
    global minimum, clipped to T_BOUNDS. With fewer than MIN_ERRORS misclassified validation images the NLL
    falls (nearly) all the way to T -> 0, which would make every answer certain: T = 1 is kept instead."""
    import torch
    import torch.nn.functional as F

    z = logits.detach().double().cpu()  # (N, C)
    y = labels.detach().long().cpu()  # (N,)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise VitcliError(f"temperature fit needs logits (N, C) and N labels, got {tuple(z.shape)} and {len(y)}")
    if int((z.argmax(1) != y).sum()) < MIN_ERRORS:  # too few mistakes: no finite optimum worth trusting
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):  # diverged (e.g. logits that are all equal): nothing to scale
        return 1.0
    return min(max(t, T_BOUNDS[0]), T_BOUNDS[1])


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature)."""
    import torch.nn.functional as F

    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def lac_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Conformity scores 1 - p_true, (N,), from probabilities (N, C) and integer labels (N,)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    return 1.0 - probs[np.arange(len(labels)), labels]


def conformal_threshold(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal threshold for `coverage` = 1 - alpha: the ceil((n + 1)(1 - alpha))-th smallest of
    the n calibration scores; inf (every class in every set) when n is too small for that coverage."""
    check_coverage(coverage)
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise VitcliError("no conformal scores: the validation split was empty")
    k = math.ceil((n + 1) * coverage)  # 1-based rank
    return math.inf if k > n else float(s[k - 1])


def prediction_sets(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(N, C) bool: class c is in image i's set when 1 - p_ic <= threshold (the LAC rule)."""
    return (1.0 - np.asarray(probs, dtype=np.float64)) <= threshold


def check_coverage(coverage: float) -> None:
    if not 0.0 < coverage < 1.0:
        raise VitcliError(f"--coverage {coverage} must be between 0 and 1, e.g. 0.9")


def set_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Empirical coverage, mean set size and share of empty sets of the LAC sets at `threshold`."""
    sets = prediction_sets(probs, threshold)  # (N, C)
    labels = np.asarray(labels, dtype=np.int64)
    n = max(1, len(labels))
    return {"coverage": float(sets[np.arange(len(labels)), labels].sum() / n),
            "mean_set_size": float(sets.sum() / n), "empty_share": float((sets.sum(1) == 0).sum() / n)}


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error over equal-width confidence bins, and the per-bin table (for the diagram).

    ECE = sum_b |accuracy_b - confidence_b| * n_b / N, with confidence the top-1 probability.
    """
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # bin b holds (lo, hi]
    ece, table = 0.0, []
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else 0.0
        c = float(conf[m].mean()) if n else 0.0
        ece += abs(acc - c) * n / max(1, len(labels))
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "accuracy": acc,
                      "confidence": c})
    return float(ece), table


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Everything stored in a checkpoint's "calibration" entry, from validation logits (N, C) and labels."""
    import torch

    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    t = fit_temperature(logits, labels)
    before = logits.softmax(-1).numpy()
    after = (logits / t).softmax(-1).numpy()
    y = labels.numpy()
    scores = np.sort(lac_scores(after, y))
    errors = int((before.argmax(1) != y).sum())
    return {"temperature": t, "images": len(y), "rule": temperature_rule(errors), "errors": errors, "score": "lac",
            "conformal_scores": torch.from_numpy(scores),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
            "ece_before": calibration(before, y, bins)[0], "ece_after": calibration(after, y, bins)[0]}


def temperature_rule(errors: int) -> str:
    """How the temperature was chosen, in words (printed after training, stored in the checkpoint)."""
    if errors < MIN_ERRORS:
        return f"kept at 1, the model's own probabilities: {errors} validation mistakes, a fit needs {MIN_ERRORS}"
    return f"fitted on {errors} validation mistakes, bounded to [{T_BOUNDS[0]:g}, {T_BOUNDS[1]:g}]"


def calibration_of(meta: dict[str, Any]) -> tuple[float, np.ndarray | None]:
    """(temperature, sorted conformal scores or None) from a checkpoint or export metadata dict; a model
    without calibration gives (1.0, None)."""
    cal = meta.get("calibration") or {}
    t = float(cal.get("temperature", 1.0))
    scores = cal.get("conformal_scores")
    if scores is None:
        return t, None
    return t, np.sort(np.asarray(scores.tolist() if hasattr(scores, "tolist") else scores, dtype=np.float64))


def calibration_for_export(cal: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint's calibration as plain JSON values (scores as a list of floats)."""
    if not cal:
        return None
    out = {k: v for k, v in cal.items() if k != "conformal_scores"}
    if cal.get("conformal_scores") is not None:
        out["conformal_scores"] = [round(float(s), 7) for s in np.asarray(cal["conformal_scores"].tolist())]
    return out


def parse_min_prob(values: list[str] | None, classes: list[str]) -> np.ndarray | None:
    """--min-prob P (all classes) and/or CLASS=P (one class; wins over P) -> thresholds (C,), None if unset."""
    if not values:
        return None
    if UNKNOWN in classes:
        raise VitcliError(f"--min-prob: the model has a class named '{UNKNOWN}', the answer --min-prob gives when "
                          "it abstains, so the two could not be told apart; leave out --min-prob, or rename that "
                          "class (e.g. its folder to unknown_class) and retrain")
    thr = np.zeros(len(classes), dtype=np.float64)
    per: dict[int, float] = {}
    for v in values:
        name, sep, num = v.rpartition("=")
        try:
            p = float(num)
        except ValueError:
            raise VitcliError(f"--min-prob {v!r}: give a probability (0.5) or CLASS=PROB (cat=0.7)") from None
        if not 0.0 <= p <= 1.0:
            raise VitcliError(f"--min-prob {v!r}: the probability must be in [0, 1]")
        if not sep:
            thr[:] = p
            continue
        if name not in classes:
            raise VitcliError(f"--min-prob {v!r}: the model has no class {name!r}; its classes are "
                              f"{', '.join(classes[:20])}")
        per[classes.index(name)] = p
    for i, p in per.items():
        thr[i] = p
    return thr
