"""Confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in Dataset
Labels"): which images are most likely mislabelled, from out-of-fold probabilities.

Per class j, the threshold t_j is the mean probability of class j over the images labelled j (the model's
self-confidence on that class). An image's confident label is the most likely class whose probability reaches
its threshold; counting (given, confident) pairs gives the confident joint, calibrated so that its rows sum to
the class counts. For every off-diagonal cell (i, j) the n_ij images labelled i with the largest margin
p_j - p_i are flagged ("prune by noise rate"), an image whose given label is the model's top class is never
flagged, and the flagged images are ranked by self-confidence p_given (or the normalised margin), lowest first.
Multi-label: each class is a two-class problem (absent / present) and an image is flagged when any class is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RANK_BY = ("self_confidence", "normalized_margin")


@dataclass
class LabelIssue:
    index: int  # row of the probabilities
    given: int | tuple[int, ...]  # the label in the data (class index, or multi-hot)
    suggested: int | tuple[int, ...]  # the label the model believes
    score: float  # in [0, 1]: lower = more likely mislabelled (per `rank_by`)
    self_confidence: float  # probability of the given label (multi-label: the lowest over the flagged classes)


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) mean probability of each class over the images labelled with it (1 for a class never given)."""
    c = probs.shape[1]
    return np.asarray([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(c)])


def confident_joint(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, C) counts of (given label, confident label), calibrated: row i sums to the images labelled i."""
    n, c = probs.shape
    above = probs >= thresholds(probs, labels)[None, :] - 1e-9  # (N, C)
    confident = np.where(above, probs, -1.0).argmax(1)  # (N,)
    has = above.any(1)
    joint = np.zeros((c, c))
    np.add.at(joint, (labels[has], confident[has]), 1)
    counts = np.bincount(labels, minlength=c).astype(np.float64)
    rows = joint.sum(1, keepdims=True)
    joint = np.where(rows > 0, joint / np.maximum(rows, 1) * counts[:, None], 0.0)
    return joint / max(joint.sum(), 1e-12) * n


def _flagged(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: pruned by noise rate from the calibrated confident joint."""
    joint = confident_joint(probs, labels)
    flag = np.zeros(len(labels), dtype=bool)
    for i in range(probs.shape[1]):
        members = np.nonzero(labels == i)[0]
        for j in range(probs.shape[1]):
            n = int(round(joint[i, j]))
            if i == j or n == 0 or not len(members):
                continue
            margin = probs[members, j] - probs[members, i]  # (n_i,)
            flag[members[np.argsort(-margin, kind="stable")[:n]]] = True
    return flag & (probs.argmax(1) != labels)


def _scores(probs: np.ndarray, labels: np.ndarray, rank_by: str) -> np.ndarray:
    rows = np.arange(len(labels))
    own = probs[rows, labels]  # (N,)
    if rank_by == "self_confidence":
        return own
    others = probs.copy()
    others[rows, labels] = -np.inf
    return (own - others.max(1) + 1) / 2  # normalised margin in [0, 1]


def find_label_issues(probs: np.ndarray, labels: np.ndarray, rank_by: str = "self_confidence") -> list[LabelIssue]:
    """Single-label: probabilities (N, C), labels (N,) -> the flagged images, most likely mislabelled first."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    flag = _flagged(probs, labels)
    score = _scores(probs, labels, rank_by)
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    suggested = others.argmax(1)  # (N,) the most likely other class
    issues = [LabelIssue(int(i), int(labels[i]), int(suggested[i]), float(score[i]), float(probs[i, labels[i]]))
              for i in np.nonzero(flag)[0]]
    return sorted(issues, key=lambda t: (t.score, t.index))


def find_multilabel_issues(probs: np.ndarray, targets: np.ndarray, rank_by: str = "self_confidence"
                           ) -> list[LabelIssue]:
    """Multi-label: probabilities (N, C), multi-hot targets (N, C); each class as absent / present."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    n, c = probs.shape
    flags = np.zeros((n, c), dtype=bool)
    scores = np.ones((n, c))
    for j in range(c):
        two = np.stack([1 - probs[:, j], probs[:, j]], 1)  # (N, 2)
        flags[:, j] = _flagged(two, targets[:, j])
        scores[:, j] = _scores(two, targets[:, j], rank_by)
    own = np.where(targets == 1, probs, 1 - probs)  # (N, C) probability of each given bit
    issues = []
    for i in np.nonzero(flags.any(1))[0]:
        f = flags[i]
        issues.append(LabelIssue(int(i), tuple(int(v) for v in targets[i]),
                                 tuple(int(1 - v if f[j] else v) for j, v in enumerate(targets[i])),
                                 float(scores[i][f].min()), float(own[i][f].min())))
    return sorted(issues, key=lambda t: (t.score, t.index))
