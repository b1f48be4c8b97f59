"""Metric math of both tasks as plain numpy functions of (probabilities (N, C), labels), checkable by hand:
the confusion matrix and per-class precision / recall / F1 with their averages (one label per image); average
precision per class, F1 at thresholds, exact match and per-class threshold tuning (a label vector per image).
No function here asks which task it serves; `vitcli.task` picks the ones that fit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5  # for a class with too few positives in the validation set to tune its own
MIN_POSITIVES = 5  # validation positives a class needs before its threshold is tuned rather than DEFAULT_THRESHOLD


# ----------------------------------------------------------------------------------------------- one label
def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(C, C) int64; rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """precision, recall, f1, support per class; 0 where a ratio is 0/0 (as scikit-learn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(1)}


def averages(pc: dict[str, np.ndarray], cm: np.ndarray) -> dict[str, dict[str, float]]:
    """Macro and support-weighted averages over the classes that occur in the labels or the predictions."""
    present = (cm.sum(0) + cm.sum(1)) > 0
    support = pc["support"][present].astype(np.float64)
    out = {}
    for name, weights in (("macro", np.ones_like(support)), ("weighted", support)):
        total = weights.sum()
        out[name] = {m: float((pc[m][present] * weights).sum() / total) if total > 0 else 0.0
                     for m in ("precision", "recall", "f1")}
        out[name]["support"] = int(pc["support"].sum())
    return out



# ----------------------------------------------------------------------------------------------- label vectors
def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: sum over distinct score thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's
    average_precision_score); NaN when the class has no positives."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(t)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_counts(pred: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class true positives, false positives, false negatives of boolean predictions (N, C)."""
    t = targets > 0.5
    return (pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0)


def _f1(tp, fp, fn) -> np.ndarray:
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def tune_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per class, the probability cut-off that maximises that class's F1 on (probs, targets): the midpoint
    between the lowest probability predicted positive and the next one down. A class with fewer than
    MIN_POSITIVES positives keeps DEFAULT_THRESHOLD: a cut-off tuned on one or two images only fits them."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets) > 0.5
    out = []
    for c in range(probs.shape[1]):
        s, t = probs[:, c], targets[:, c]
        if t.sum() < MIN_POSITIVES:
            out.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(-s, kind="stable")
        s, t = s[order], t[order]
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # predict positive for rows 0..last[k]
        tp = np.cumsum(t)[last]
        fp = last + 1 - tp
        fn = t.sum() - tp
        k = int(np.argmax(_f1(tp, fp, fn)))
        below = s[last[k] + 1] if last[k] + 1 < len(s) else 0.0
        out.append(float((s[last[k]] + below) / 2))
    return out


def label_vector_metrics(probs: np.ndarray, targets: np.ndarray, classes: list[str],
                    thresholds: list[float] | None = None) -> dict[str, Any]:
    """mAP, per-class AP / precision / recall / F1 at the thresholds, micro and macro F1, exact match."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    th = np.asarray(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * len(classes))
    pred = probs >= th[None, :]  # (N, C)
    tp, fp, fn = f1_counts(pred, targets)
    aps = np.array([average_precision(probs[:, c], targets[:, c]) for c in range(len(classes))])
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    f1 = _f1(tp, fp, fn)
    eps = 1e-12
    bce = -(targets * np.log(np.clip(probs, eps, 1)) + (1 - targets) * np.log(np.clip(1 - probs, eps, 1)))
    present = ~np.isnan(aps)
    return {
        "images": len(probs),
        "loss": float(bce.mean()) if len(probs) else 0.0,
        "mAP": float(aps[present].mean()) if present.any() else float("nan"),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "exact_match": float((pred == (targets > 0.5)).all(1).mean()) if len(probs) else 0.0,
        "label_accuracy": float((pred == (targets > 0.5)).mean()) if len(probs) else 0.0,
        "per_class": [{"class": c, "ap": None if np.isnan(aps[i]) else float(aps[i]), "threshold": float(th[i]),
                       "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int((targets[:, i] > 0.5).sum())} for i, c in enumerate(classes)],
        "classes": list(classes),
        "thresholds": [float(v) for v in th],
    }
