"""Evaluation: the loop that runs a model over a labelled store (used by training too), and `vitcli eval`:
how good a model is on a labelled folder and where it fails.

Metrics are plain functions of (probabilities, labels) so they can be checked by hand: confusion matrix,
per-class precision / recall / F1 with macro and weighted averages, top-k accuracy, expected calibration
error, most-confused class pairs and the highest-loss mistakes. `evaluate` runs the model, prints rich
tables, writes figures to a new folder and, with `json_path`, everything machine-readable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitcli.calibrate import calibration  # noqa: F401  (expected calibration error, re-exported)
from vitcli.errors import VitcliError, at_least
from vitcli.metrics import averages, confusion_matrix, per_class_metrics  # noqa: F401  (re-exported)

CHUNK = 2048  # images decoded and held in memory at a time
DEFAULT_COVERAGE = 0.9  # target coverage of the conformal sets eval reports when --coverage is not given


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


def hits(logits, y):
    """Per image: 1 when the top class is the label; multi-label (y (B, C)): the share of classes whose
    sigmoid > 0.5 agrees with the label vector."""
    if y.ndim == 2:
        return ((logits > 0) == (y > 0.5)).float().mean(1)  # (B,)
    return logits.argmax(1) == y  # (B,)


def run_eval(model, store, pre: dict, device, precision: str, batch_size: int, loss_fn=None,
             rank: int = 0, world: int = 1, keep_logits: bool = False) -> EvalOutput:
    """Forward every image of `store` (this rank's shard) with the eval transform. The sums stay on the device
    and are read once at the end."""
    import torch

    from vitcli.data import eval_transform
    from vitcli.device import autocast

    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    all_logits, all_labels = [], []
    with torch.inference_mode():
        for x, y in store.eval_batches(batch_size, rank, world):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(eval_transform(x, pre)).float()  # (B, C)
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


def collect_logits(pred, split, batch_size: int, tta: bool):
    """Run `pred` over a Split in bounded chunks: (logits (N, C), mirrored-image logits (N, C) or None,
    labels (N,), readable paths, unreadable-file messages)."""
    import torch

    from vitcli import data as D

    pre = pred.preprocess
    bad: list[str] = []
    logits, flipped, labels, paths = [], [], [], []
    for start in range(0, len(split), CHUNK):  # bounded memory; the store keeps paths aligned with logits
        part = D.Split(split.paths[start:start + CHUNK], split.labels[start:start + CHUNK])
        store = D.ImageStore(part, pre["resize_size"], pre["interpolation"], cache=True, num_workers=0,
                             on_bad=bad.append, progress_label="decoding")
        for x, y in store.batches(D.sequential_batches(len(store), batch_size)):  # uint8 (B, 3, S, S)
            logits.append(pred.logits(x).float())
            if tta:
                flipped.append(pred.logits(x.flip(-1)).float())
            labels.append(y)
        paths += store.paths
    if not paths:
        return None, None, None, paths, bad
    return torch.cat(logits), torch.cat(flipped) if tta else None, torch.cat(labels), paths, bad


def calibration_report(pred, logits, flipped, probs: np.ndarray, y: np.ndarray, coverage: float | None
                       ) -> dict[str, Any]:
    """Temperature, ECE before and after it (`probs`: the calibrated ones), and (with conformal scores)
    coverage and mean set size."""
    from vitcli.calibrate import set_metrics

    task = pred.task
    before = type(task)().probs(logits, flipped).numpy()  # the same task without a temperature
    rep: dict[str, Any] = {"temperature": task.temperature, "ece_uncalibrated": calibration(before, y)[0]}
    if coverage is not None and task.conformal_scores is not None:
        thr = task.conformal_threshold(coverage, str(pred.path))
        rep["conformal"] = {"coverage_target": coverage, "threshold": thr,
                            "calibration_images": len(task.conformal_scores), **set_metrics(probs, y, thr)}
    return rep


def evaluate(data_dir: str | Path, model: str | None = None, batch_size: int = 64, device: str = "auto",
             precision: str = "auto", output: str | Path | None = None, json_path: str | Path | None = None,
             figures: bool = True, tta: bool = False, coverage: float | None = None) -> dict[str, Any]:
    """Run the model (checkpoint, .onnx or TorchScript) on DATA (class folders, or its test/ else val/
    split); print, plot and return the report. Probabilities are the task's calibrated ones; `coverage` (default
    DEFAULT_COVERAGE) is the target of the conformal sets whose coverage is reported."""
    from vitcli.predict import load_predictor, passive_omp_threads

    passive_omp_threads()
    from vitcli import data as D
    from vitcli.calibrate import check_coverage
    from vitcli.console import esc, info, warn
    from vitcli.device import check_device_args

    at_least("--batch-size", batch_size)
    if coverage is not None:
        check_coverage(coverage)
    check_device_args(device, precision)
    pred = load_predictor(model, device, precision)
    one_label = pred.task.one_label
    if not one_label:
        refuse_for_label_vectors(pred, output, coverage)
    check_outputs(data_dir, output if figures and one_label else None, json_path, figures and one_label)
    classes, pre = pred.classes, pred.preprocess
    split = D.scan_eval_folder(data_dir, classes, not one_label)
    if len(split) == 0:
        raise VitcliError(f"'{data_dir}' holds no images in class folders named like the model's classes "
                          f"{classes[:10]}")
    dev, prec = str(getattr(pred, "device", "cpu")), getattr(pred, "precision", "fp32")
    info(f"[bold]data[/] {esc(str(data_dir))}: {len(split)} images; device {dev}, precision {prec}"
         + (", TTA (mirror)" if tta else ""))
    logits, flipped, labels, paths, bad = collect_logits(pred, split, batch_size, tta)
    for msg in bad:
        warn(f"skipped {msg}")
    if not paths:
        raise VitcliError(f"none of the {len(split)} images in '{data_dir}' could be read")
    probs = pred.task.probs(logits, flipped).numpy()  # (N, C)
    head = {"model": str(pred.path), "data": str(data_dir), "device": dev, "precision": prec, "tta": tta,
            "skipped": bad}
    if not one_label:  # a sigmoid per class: mAP, per-class AP, F1 at the stored thresholds, exact match
        return write_json(report_label_vectors(pred, probs, labels, head), json_path)
    y = labels.numpy()  # (N,)
    report = compute_metrics(probs, y, classes)
    losses, preds = report.pop("_losses"), report.pop("_preds")
    report["worst"] = worst_mistakes(losses, preds, y, probs, paths, classes)
    cov = DEFAULT_COVERAGE if coverage is None else coverage
    report = head | report | calibration_report(pred, logits, flipped, probs, y, cov)
    if figures:
        from vitcli.html_report import eval_report, pick_examples
        from vitcli.rundir import new_run_dir

        out_dir = Path(output) if output else new_run_dir("runs", "eval")
        report["figures"] = write_figures(report, out_dir, pre)
        net = getattr(pred, "model", None)  # exported files: no attention figure
        page = eval_report(report, out_dir, net, pre, {"config": getattr(pred, "config", {})}, pred.path,
                           pick_examples(paths, y), pred.task)
        report["figures"]["report"] = str(page)
    print_report(report)
    return write_json(report, json_path)


def write_json(report: dict[str, Any], json_path: str | Path | None) -> dict[str, Any]:
    """The report as JSON at --json PATH (when given); returns the report."""
    if json_path:
        from vitcli.console import esc, info
        from vitcli.files import write_output

        write_output(json_path, json.dumps(report, indent=1).encode(), "--json")
        info(f"wrote {esc(str(json_path))}")
    return report


def refuse_for_label_vectors(pred, output: str | Path | None, coverage: float | None) -> None:
    """Multi-label eval has neither conformal sets nor figures: --coverage / --output are refused, not ignored."""
    if coverage is not None:
        raise VitcliError(f"--coverage {coverage:g}: '{pred.path}' is multi-label and has no prediction sets (each "
                          "class is decided at its own tuned threshold); leave --coverage out")
    if output is not None:
        raise VitcliError(f"--output '{output}': multi-label eval draws no figures; use --json PATH for the "
                          "per-class metrics")


def check_outputs(data_dir: str | Path, output: str | Path | None, json_path: str | Path | None,
                  figures: bool) -> None:
    """Before any work: no output inside the dataset, and an --output / --json that cannot be one fails now."""
    from vitcli.files import ensure_dir, refuse_inside

    if figures:
        refuse_inside(output or "runs", data_dir, "--output" if output else "default")
        if output:
            ensure_dir(output, "--output")
    if json_path is not None:
        if Path(json_path).is_dir():
            raise VitcliError(f"--json '{json_path}' is a folder; give a file name")
        refuse_inside(json_path, data_dir, "--json")


def evaluate_split(net, classes: list[str], pre: dict[str, Any], split, dev, prec: str, batch_size: int = 64,
                   where: str | Path = "the data", *, task):
    """Run `net` (already on `dev`) over a Split -> (metrics incl. worst mistakes, calibrated probs (N, C) of
    `task` (the model's task.Task), labels (N,), the readable paths, skipped-file messages). Label vectors get
    the multi-label metrics at the task's thresholds."""
    import torch

    from vitcli import data as D
    from vitcli.console import warn

    bad: list[str] = []
    logits, labels, paths = [], [], []
    for start in range(0, len(split), CHUNK):  # bounded memory; the store keeps paths aligned with logits
        part = D.Split(split.paths[start:start + CHUNK], split.labels[start:start + CHUNK])
        store = D.ImageStore(part, pre["resize_size"], pre["interpolation"], cache=True, num_workers=0,
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
    from vitcli.report import plot_confusion, plot_mistakes, plot_reliability

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


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def print_report(r: dict[str, Any]) -> None:
    """Summary, per-class table, confusion matrix and most-confused pairs on stdout."""
    from rich.table import Table

    from vitcli.console import esc, out

    classes = r["classes"]
    summary = Table(title="evaluation", show_header=False, title_justify="left")
    rows = [("images", str(r["images"]) + (f" ({len(r['skipped'])} unreadable skipped)" if r["skipped"] else "")),
            ("loss", f"{r['loss']:.4f}"), ("top-1 accuracy", _pct(r["top1"]))]
    if r["top5"] is not None:
        rows.append(("top-5 accuracy", _pct(r["top5"])))
    rows += [("macro F1", f"{r['macro']['f1']:.4f}"), ("weighted F1", f"{r['weighted']['f1']:.4f}")]
    if r.get("temperature", 1.0) != 1.0:
        rows += [("ECE (15 bins), uncalibrated", f"{r['ece_uncalibrated']:.4f}"),
                 ("ECE (15 bins), calibrated", f"{r['ece']:.4f} (temperature {r['temperature']:.4f})")]
    else:
        rows.append(("ECE (15 bins)", f"{r['ece']:.4f} (no temperature stored)"))
    if r.get("conformal"):
        c = r["conformal"]
        rows += [(f"coverage of {c['coverage_target']:g} sets", f"{_pct(c['coverage'])} (mean set size "
                  f"{c['mean_set_size']:.3f}, empty {_pct(c['empty_share'])})")]
    for k, v in rows:
        summary.add_row(k, v)
    out.print(summary)

    tab = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support"):
        tab.add_column(col, justify="left" if col == "class" else "right")
    for c in r["per_class"]:
        tab.add_row(esc(c["class"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                    str(c["support"]))
    tab.add_section()
    for name in ("macro", "weighted"):
        a = r[name]
        tab.add_row(f"[bold]{name} avg[/]", f"{a['precision']:.3f}", f"{a['recall']:.3f}", f"{a['f1']:.3f}",
                    str(a["support"]))
    out.print(tab)

    if len(classes) <= 30:
        cm = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
        cm.add_column("")
        for c in classes:
            cm.add_column(esc(c), justify="right")
        for c, row in zip(classes, r["confusion_matrix"], strict=True):
            cells = [f"[bold green]{v}[/]" if j == i else (f"[red]{v}[/]" if v else "[dim]0[/]")
                     for j, v in enumerate(row) for i in [classes.index(c)]]
            cm.add_row(esc(c), *cells)
        out.print(cm)
    if r["most_confused"]:
        mc = Table(title="most confused", title_justify="left")
        for col in ("true", "predicted as", "images", "share of true"):
            mc.add_column(col, justify="right" if col in ("images", "share of true") else "left")
        for p in r["most_confused"]:
            mc.add_row(esc(p["true"]), esc(p["predicted"]), str(p["count"]), _pct(p["share_of_true"]))
        out.print(mc)
    if r.get("figures"):
        out.print("figures: " + ", ".join(esc(v) for v in r["figures"].values()))


def print_label_vector_report(report: dict[str, Any]) -> None:
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


def report_label_vectors(pred, probs: np.ndarray, labels, head: dict[str, Any]) -> dict[str, Any]:
    """`vitcli eval` of a multi-label model: the metrics of the task's probabilities at its thresholds."""
    from vitcli.metrics import label_vector_metrics

    report = head | {"task": pred.task.name} | label_vector_metrics(probs, labels.numpy(), pred.classes,
                                                                    pred.task.thresholds)
    print_label_vector_report(report)
    return report
