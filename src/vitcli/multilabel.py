"""Multi-label classification: several classes per image, each a yes/no decided by a sigmoid.

Owns what differs from single-label training: the loss (binary cross-entropy, or the asymmetric loss of
Ridnik et al. 2021), mixup / cutmix on multi-hot label vectors, the metrics (average precision per class and
its mean, F1 at the thresholds, exact match) and per-class thresholds tuned on the validation set. Metrics are
plain numpy functions of (probabilities (N, C), multi-hot targets (N, C)) so they can be checked by hand.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitcli.errors import VitcliError

DEFAULT_THRESHOLD = 0.5  # for a class without positives in the validation set


# ----------------------------------------------------------------------------------------------- losses
def make_loss(kind: str, label_smoothing: float = 0.0):
    """loss(logits (B, C), multi-hot or mixed targets (B, C)) -> scalar mean over images and classes."""
    import torch.nn.functional as F

    def bce(logits, target):
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target)

    if kind == "bce":
        return bce
    return asymmetric_loss


def asymmetric_loss(logits, target, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
    """Asymmetric loss (Ridnik et al. 2021): easy negatives are down-weighted by (p_m)^gamma_neg, with the
    negative probability shifted by `clip` (p_m = max(p - clip, 0)); positives keep plain BCE when gamma_pos=0.
    Returned as a mean over images and classes, the same scale as BCE."""
    import torch

    p = torch.sigmoid(logits)  # (B, C)
    p_m = (p - clip).clamp(min=0)
    pos = target * torch.log(p.clamp(min=1e-8)) * (1 - p) ** gamma_pos
    neg = (1 - target) * torch.log((1 - p_m).clamp(min=1e-8)) * p_m**gamma_neg
    return -(pos + neg).mean()


def mix(mixup, x, y):
    """Mixup / cutmix with timm's Mixup (its batch mode) on images, the same mixture of label vectors.

    x: float (B, 3, H, W), mixed in place; y: multi-hot (B, C) -> mixed (B, C)."""
    lam = mixup._mix_batch(x)  # timm: mixes x with x.flip(0) in place and returns the (corrected) weight
    return x, y * lam + y.flip(0) * (1.0 - lam)


# ----------------------------------------------------------------------------------------------- training glue
def check_options(cfg, multilabel: bool) -> str:
    """The loss `train.loss` resolves to for this task (ce | bce | asl); options that do not fit are errors."""
    t, d = cfg.train, cfg.data
    kind = t.loss if t.loss != "auto" else ("bce" if multilabel else "ce")
    if multilabel:
        if kind == "ce":
            raise VitcliError("'train.loss' ce needs one label per image; this data is multi-label: use bce or asl")
        if d.class_weights != "none" or d.balanced_sampler:
            key = "data.class_weights" if d.class_weights != "none" else "data.balanced_sampler"
            raise VitcliError(f"'{key}' is for one label per image; turn it off for multi-label data")
    return kind


def task_line(cfg, multilabel: bool) -> str:
    """The task as detected from the labels, and the loss it trains with (printed at the start)."""
    kind = check_options(cfg, multilabel)
    what = {"ce": "softmax + cross-entropy", "bce": "sigmoid + binary cross-entropy",
            "asl": "sigmoid + asymmetric loss"}[kind]
    if multilabel:
        return (f"[bold]task[/] multi-label (labels read from the data; several per image): {what}; mAP picks the "
                "best epoch and per-class thresholds are tuned on the validation set")
    return f"[bold]task[/] single-label (one label per image): {what}"


class SigmoidLoss:
    """BCE or asymmetric loss on (B, C) targets; class indices (single-label data) become one-hot vectors."""

    class_w = None  # the training summary asks every loss for its class weights

    def __init__(self, kind: str, label_smoothing: float):
        self.kind, self.fn = kind, make_loss(kind, label_smoothing)

    def __call__(self, logits, target):
        import torch.nn.functional as F

        if target.ndim == 1:
            target = F.one_hot(target, logits.shape[1]).float()  # (B, C)
        return self.fn(logits, target)


def train_loss(cfg, multilabel: bool):
    """The sigmoid loss for multi-label data (or when `train.loss` asks for one), else None (cross-entropy)."""
    kind = check_options(cfg, multilabel)
    return None if kind == "ce" else SigmoidLoss(kind, cfg.train.label_smoothing)


def eval_loss(multilabel: bool):
    import torch

    return torch.nn.BCEWithLogitsLoss() if multilabel else torch.nn.CrossEntropyLoss()


class LabelVectorMix:
    """timm's Mixup / cutmix for multi-hot targets: the same mixture of images and of label vectors."""

    def __init__(self, mixup):
        self.mixup = mixup

    def __call__(self, x, y):
        return mix(self.mixup, x, y)


def val_scores(ev, device, world: int) -> tuple[float, list[float]]:
    """Validation mAP and tuned thresholds from every rank's logits and label vectors."""
    import torch

    logits, labels = ev.logits, ev.labels
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, (logits, labels))
        parts = [p for p in parts if p[0].numel()]  # a rank may hold no validation shard
        logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    probs = logits.float().sigmoid().double().numpy()  # (N, C)
    targets = labels.double().numpy()
    aps = [average_precision(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return (float(np.mean(aps)) if aps else 0.0), tune_thresholds(probs, targets)


# ----------------------------------------------------------------------------------------------- metrics
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
    between the lowest probability predicted positive and the next one down. DEFAULT_THRESHOLD for a class
    without positives."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets) > 0.5
    out = []
    for c in range(probs.shape[1]):
        s, t = probs[:, c], targets[:, c]
        if not t.any():
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


def compute_metrics(probs: np.ndarray, targets: np.ndarray, classes: list[str],
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
        "task": "multilabel",
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


def above_threshold(probs, classes: list[str], thresholds: list[float]) -> list[tuple[str, float]]:
    """(class, probability) of every class at or above its threshold, most probable first."""
    hits = [(c, float(p)) for c, p, t in zip(classes, probs, thresholds, strict=True) if p >= t]
    return sorted(hits, key=lambda cp: -cp[1])


# ----------------------------------------------------------------------------------------------- reporting
def print_multilabel(report: dict[str, Any]) -> None:
    """`vitcli eval` for a multi-label model: the summary and the per-class table."""
    from rich.table import Table

    from vitcli.console import esc, out

    summary = Table(title="evaluation (multi-label)", show_header=False, title_justify="left")
    skipped = f" ({len(report['skipped'])} unreadable skipped)" if report.get("skipped") else ""
    for k, v in (("images", f"{report['images']}{skipped}"), ("mAP", f"{report['mAP']:.4f}"),
                 ("micro F1 at the thresholds", f"{report['micro_f1']:.4f}"),
                 ("macro F1 at the thresholds", f"{report['macro_f1']:.4f}"),
                 ("exact match", f"{report['exact_match']:.4f}"), ("label accuracy", f"{report['label_accuracy']:.4f}"),
                 ("loss (binary cross-entropy)", f"{report['loss']:.4f}")):
        summary.add_row(k, v)
    out.print(summary)
    tab = Table(title="per class", title_justify="left")
    for col in ("class", "AP", "threshold", "precision", "recall", "F1", "support"):
        tab.add_column(col, justify="left" if col == "class" else "right")
    for c in report["per_class"]:
        tab.add_row(esc(c["class"]), "-" if c["ap"] is None else f"{c['ap']:.3f}", f"{c['threshold']:.3f}",
                    f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    out.print(tab)


def report_multilabel(pred, logits, flipped, labels, bad: list[str], head: dict[str, Any],
                      json_path=None) -> dict[str, Any]:
    """`vitcli eval` of a multi-label model: sigmoid(logits / T) (averaged with the mirror's under TTA),
    the metrics at the model's thresholds, printed and optionally written as JSON."""
    import json

    from vitcli.console import esc, info

    probs = (logits.double() / pred.temperature).sigmoid()  # (N, C)
    if flipped is not None:
        probs = (probs + (flipped.double() / pred.temperature).sigmoid()) / 2
    report = head | {"skipped": bad} | compute_metrics(probs.numpy(), labels.numpy(), pred.classes, pred.thresholds)
    print_multilabel(report)
    if json_path:
        from vitcli.files import atomic_write_text

        atomic_write_text(json_path, json.dumps(report, indent=1))
        info(f"wrote {esc(str(json_path))}")
    return report
