"""Evaluation as a service: the loop that runs a model over a labelled store (used by training, `eval`, the run
report and `compare`), the metrics and the evaluation figures.

Metrics are plain functions of (probabilities, labels) so they can be checked by hand: confusion matrix,
per-class precision / recall / F1 with macro and weighted averages, top-k accuracy, expected calibration
error, most-confused class pairs and the highest-loss mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitcli.calibrate import calibration  # noqa: F401  (expected calibration error, re-exported)
from vitcli.errors import VitcliError
from vitcli.metrics import averages, confusion_matrix, per_class_metrics  # noqa: F401  (re-exported)

CHUNK = 2048  # images decoded and held in memory at a time


# ----------------------------------------------------------------------------------------------- metrics
def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k highest probabilities."""
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    return float((topk == labels[:, None]).any(1).mean()) if len(labels) else 0.0


def most_confused(cm: np.ndarray, classes: list[str], n: int = 10) -> list[dict[str, Any]]:
    """The off-diagonal cells with the most images: (true, predicted, count), largest first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), cm.shape[1])
        if off[t, p] == 0:
            break
        pairs.append({"true": classes[t], "predicted": classes[p], "count": int(off[t, p]),
                      "share_of_true": float(off[t, p] / max(1, cm[t].sum()))})
    return pairs


def compute_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str], bins: int = 15) -> dict[str, Any]:
    """Everything `vitcli eval` reports, from probabilities (N, C) and integer labels (N,)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    n_cls = len(classes)
    preds = probs.argmax(1)
    cm = confusion_matrix(labels, preds, n_cls)
    pc = per_class_metrics(cm)
    ece, table = calibration(probs, labels, bins)
    eps = 1e-12
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], eps, None))  # (N,) cross-entropy
    out: dict[str, Any] = {
        "images": len(labels),
        "loss": float(losses.mean()) if len(labels) else 0.0,
        "top1": float((preds == labels).mean()) if len(labels) else 0.0,
        "top5": topk_accuracy(probs, labels, 5) if n_cls >= 5 else None,
        "per_class": [{"class": c, "precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                       "f1": float(pc["f1"][i]), "support": int(pc["support"][i])} for i, c in enumerate(classes)],
        **averages(pc, cm),
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, classes),
        "ece": ece,
        "calibration_bins": table,
    }
    return out | {"_losses": losses, "_preds": preds}


def worst_mistakes(losses: np.ndarray, preds: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                   paths: list[Path], classes: list[str], n: int = 16) -> list[dict[str, Any]]:
    """The wrong predictions with the highest loss, highest first."""
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-losses[wrong], kind="stable")][:n]
    return [{"file": str(paths[i]), "true": classes[labels[i]], "predicted": classes[preds[i]],
             "prob_predicted": float(probs[i, preds[i]]), "prob_true": float(probs[i, labels[i]]),
             "loss": float(losses[i])} for i in wrong]


# ----------------------------------------------------------------------------------------------- running
@dataclass
class EvalOutput:
    logits: Any  # float (N, C) on CPU (empty unless keep_logits)
    labels: Any  # long (N,), or multi-hot float (N, C), on CPU (empty unless keep_logits)
    loss_sum: float
    correct: float  # images whose top class is right (multi-label: summed share of classes right)
    count: int


def run_eval(model, store, pre: dict, device, precision: str, batch_size: int, loss_fn=None,
             rank: int = 0, world: int = 1, keep_logits: bool = False, tta: bool = False) -> EvalOutput:
    """Forward every image of `store` (this rank's shard) with the eval transform; with `tta`, the logits are
    the mean over the views prediction's TTA averages (`augment.tta_views`). The sums stay on the device and are
    read once at the end."""
    import torch

    from vitcli.augment import eval_transform, tta_views
    from vitcli.device import autocast
    from vitcli.task import hits

    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    all_logits, all_labels = [], []
    with torch.inference_mode():
        for x, y in store.eval_batches(batch_size, rank, world):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                x = eval_transform(x, pre)  # (B, 3, H, W)
                views = tta_views(x, pre) if tta else [x]
                logits = sum(model(v).float() for v in views) / len(views)  # (B, C)
            if loss_fn is not None:
                loss_sum += loss_fn(logits, y).double() * len(y)
            correct += hits(logits, y).sum()
            count += len(y)
            if keep_logits:
                all_logits.append(logits.cpu())
                all_labels.append(y.cpu())
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, 0)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0)
    return EvalOutput(logits, labels if labels.ndim == 2 else labels.long(), float(loss_sum), float(correct), count)


def collect_logits(pred, split, batch_size: int):
    """Run `pred` over a Split in bounded chunks: (its prediction logits (N, C) (`Predictor.view_logits`: with
    its TTA), labels (N,), readable paths, unreadable-file messages)."""
    import torch

    from vitcli.dataset import Split
    from vitcli.store import ImageStore, sequential_batches

    pre = pred.preprocess
    bad: list[str] = []
    logits, labels, paths = [], [], []
    for start in range(0, len(split), CHUNK):  # bounded memory; the store keeps paths aligned with logits
        part = Split(split.paths[start:start + CHUNK], split.labels[start:start + CHUNK])
        store = ImageStore(part, pre["resize_size"], pre["interpolation"], cache=True, num_workers=0,
                             on_bad=bad.append, progress_label="decoding")
        for x, y in store.batches(sequential_batches(len(store), batch_size)):  # uint8 (B, 3, S, S)
            logits.append(pred.view_logits(x).float())
            labels.append(y)
        paths += store.paths
    if not paths:
        return None, None, paths, bad
    return torch.cat(logits), torch.cat(labels), paths, bad


def calibration_report(pred, logits, probs: np.ndarray, y: np.ndarray, coverage: float | None
                       ) -> dict[str, Any]:
    """Temperature, ECE before and after it (`probs`: the calibrated ones), and (with conformal scores)
    coverage and mean set size."""
    from vitcli.calibrate import set_metrics

    task = pred.task
    before = task.uncalibrated().probs(logits).numpy()  # (N, C)
    rep: dict[str, Any] = {"temperature": task.temperature, "ece_uncalibrated": calibration(before, y)[0]}
    if coverage is not None and task.conformal_scores is not None:
        thr = task.conformal_threshold(coverage, str(pred.path))
        rep["conformal"] = {"coverage_target": coverage, "threshold": thr,
                            "calibration_images": len(task.conformal_scores), **set_metrics(probs, y, thr)}
    return rep


def evaluate_split(net, classes: list[str], pre: dict[str, Any], split, dev, prec: str, batch_size: int = 64,
                   where: str | Path = "the data", *, task):
    """Run `net` (already on `dev`) over a Split -> (metrics incl. worst mistakes, calibrated probs (N, C) of
    `task` (the model's task.Task), labels (N,), the readable paths, skipped-file messages). Label vectors get
    the multi-label metrics at the task's thresholds."""
    import torch

    from vitcli.console import warn
    from vitcli.dataset import Split
    from vitcli.store import ImageStore

    bad: list[str] = []
    logits, labels, paths = [], [], []
    for start in range(0, len(split), CHUNK):  # bounded memory; the store keeps paths aligned with logits
        part = Split(split.paths[start:start + CHUNK], split.labels[start:start + CHUNK])
        store = ImageStore(part, pre["resize_size"], pre["interpolation"], cache=True, num_workers=0,
                             on_bad=bad.append, progress_label="decoding")
        res = run_eval(net, store.to(dev), pre, dev, prec, batch_size, keep_logits=True)
        logits.append(res.logits)
        labels.append(res.labels)
        paths += store.paths
    for msg in bad:
        warn(f"skipped {msg}")
    if not paths:
        raise VitcliError(f"none of the {len(split)} images in '{where}' could be read")
    probs, y = task.probs(torch.cat(logits)).numpy(), torch.cat(labels).numpy()  # (N, C), (N,) or (N, C)
    if not task.one_label:  # mAP, AP, F1 at the thresholds, exact match
        from vitcli.metrics import label_vector_metrics

        return label_vector_metrics(probs, y, classes, task.thresholds), probs, y, paths, bad
    report = compute_metrics(probs, y, classes)
    losses, preds = report.pop("_losses"), report.pop("_preds")
    report["worst"] = worst_mistakes(losses, preds, y, probs, paths, classes)
    return report, probs, y, paths, bad


def write_figures(report: dict[str, Any], out_dir: Path, pre: dict[str, Any]) -> dict[str, str]:
    from vitcli.figures import plot_confusion, plot_mistakes, plot_reliability

    cm, classes = np.asarray(report["confusion_matrix"]), report["classes"]
    figs = {"confusion": out_dir / "confusion.png", "confusion_normalized": out_dir / "confusion_normalized.png",
            "reliability": out_dir / "reliability.png"}
    plot_confusion(cm, classes, figs["confusion"], normalize=False)
    plot_confusion(cm, classes, figs["confusion_normalized"], normalize=True)
    plot_reliability(report["calibration_bins"], report["ece"], figs["reliability"])
    if report["worst"]:
        figs["worst"] = out_dir / "worst.png"
        plot_mistakes(report["worst"], figs["worst"], pre)
    return {k: str(v) for k, v in figs.items()}
