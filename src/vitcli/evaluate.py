"""`vitcli eval`: how good a model is on a labelled folder and where it fails. Runs the model through the inference
service, prints rich tables, writes figures and report.html to a new folder and, with `json_path`, everything
machine-readable."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, at_least
from vitcli.evaluation import (
    calibration_report,
    collect_logits,
    compute_metrics,
    worst_mistakes,
    write_figures,
)

DEFAULT_COVERAGE = 0.9  # target coverage of the conformal sets eval reports when --coverage is not given


def evaluate(data_dir: str | Path, model: str | None = None, batch_size: int = 64, device: str = "auto",
             precision: str = "auto", output: str | Path | None = None, json_path: str | Path | None = None,
             figures: bool = True, tta: bool | None = None, coverage: float | None = None,
             ood_data: str | Path | None = None) -> dict[str, Any]:
    """Run the model (checkpoint, .onnx or TorchScript) on DATA (class folders, or its test/ else val/
    split); print, plot and return the report. Probabilities are the task's calibrated ones; `coverage` (default
    DEFAULT_COVERAGE) is the target of the conformal sets whose coverage is reported; `ood_data` (images of
    another kind) measures the out-of-distribution scores against DATA's images. `tta`: None for the model's
    own default (`Predictor.set_tta`)."""
    from vitcli.inference import load_predictor, passive_omp_threads

    passive_omp_threads()
    from vitcli.calibrate import check_coverage
    from vitcli.console import esc, info, warn
    from vitcli.device import check_device_args
    from vitcli.sources import scan_eval_folder

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
    split = scan_eval_folder(data_dir, classes, not one_label)
    if len(split) == 0:
        raise VitcliError(f"'{data_dir}' holds no images in class folders named like the model's classes "
                          f"{classes[:10]}")
    dev, prec = str(getattr(pred, "device", "cpu")), getattr(pred, "precision", "fp32")
    info(f"[bold]data[/] {esc(str(data_dir))}: {len(split)} images; device {dev}, precision {prec}")
    if line := pred.set_tta(tta):
        info(f"  {esc(line)}")
    how = pred.prepare(len(split) * pred.views, batch_size)
    t0 = time.perf_counter()
    logits, labels, paths, bad = collect_logits(pred, split, batch_size)
    seconds = time.perf_counter() - t0
    info(f"  {len(split)} images in {seconds:.1f} s: {len(split) / max(seconds, 1e-9):.0f} img/s ({how})")
    for msg in bad:
        warn(f"skipped {msg}")
    if not paths:
        raise VitcliError(f"none of the {len(split)} images in '{data_dir}' could be read")
    probs = pred.task.probs(logits).numpy()  # (N, C)
    head = {"model": str(pred.path), "data": str(data_dir), "device": dev, "precision": prec, "tta": pred.tta,
            "skipped": bad}
    ood = ood_report(pred, paths, ood_data, batch_size) if ood_data else None  # (report, scores) or None
    head |= {"ood": ood[0]} if ood else {}
    if not one_label:  # a sigmoid per class: mAP, per-class AP, F1 at the stored thresholds, exact match
        return write_json(report_label_vectors(pred, probs, labels, head), json_path)
    y = labels.numpy()  # (N,)
    report = compute_metrics(probs, y, classes)
    losses, preds = report.pop("_losses"), report.pop("_preds")
    report["worst"] = worst_mistakes(losses, preds, y, probs, paths, classes)
    cov = DEFAULT_COVERAGE if coverage is None else coverage
    report = head | report | calibration_report(pred, logits, probs, y, cov)
    if figures:
        from vitcli.html_report import eval_report, pick_examples
        from vitcli.rundir import new_run_dir

        out_dir = Path(output) if output else new_run_dir("runs", "eval")
        report["figures"] = write_figures(report, out_dir, pre)
        if ood:
            from vitcli.figures import plot_ood

            report["figures"]["ood"] = str(plot_ood(ood[1], ood[0], out_dir / "ood.png"))
        net = getattr(pred, "model", None)  # exported files: no attention figure
        page = eval_report(report, out_dir, net, pre, {"config": getattr(pred, "config", {})}, pred.path,
                           pick_examples(paths, y), pred.task)
        report["figures"]["report"] = str(page)
    print_report(report)
    return write_json(report, json_path)


def ood_report(pred, paths: list[Path], ood_data: str | Path, batch_size: int):
    """eval --ood-data: the out-of-distribution measurement, printed one line per score; (report, scores)."""
    from vitcli.console import esc, info

    r, scores = evaluate_ood(pred, paths, ood_data, batch_size)
    info(f"[bold]out of distribution[/] {r['ood_images']} images from {esc(str(ood_data))} against "
         f"{r['id_images']} labelled ones (thresholds keep {r['keep']:.0%} of validation images):")
    for name, s in r["scores"].items():
        info(f"  {name}: AUROC {s['auroc']:.4f}, FPR at 95% TPR {s['fpr_at_95_tpr']:.4f}; at the threshold "
             f"{s['ood_unknown']:.1%} of OOD images answered unknown, {s['id_answered']:.1%} of labelled answered")
    return r, scores


def score_images(pred, paths: list, batch_size: int) -> tuple[dict[str, Any], list[str]]:
    """Every out-of-distribution score the predictor gives for image files: ({name: (N,) array}, skipped)."""
    import numpy as np
    import torch

    from vitcli.inference import decoded
    from vitcli.ood import ood_scores

    pre, bad = pred.preprocess, []
    parts: dict[str, list] = {}
    imgs: list = []

    def flush() -> None:
        feats, logits = pred.outputs(torch.stack(imgs))
        for name, s in ood_scores(pred.ood, feats, logits).items():
            parts.setdefault(name, []).append(s.numpy())
        imgs.clear()

    for _, img, err in decoded(paths, pre["resize_size"], pre["interpolation"], 4, 2 * batch_size):
        if err is not None:
            bad.append(err)
            continue
        imgs.append(img)
        if len(imgs) == batch_size:
            flush()
    if imgs:
        flush()
    return {n: np.concatenate(v) for n, v in parts.items()}, bad


def evaluate_ood(pred, id_paths: list, ood_dir, batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """`vitcli eval --ood-data`: per score, AUROC and FPR at 95% TPR of telling OOD_DATA's images from the
    labelled ones, and at the model's stored threshold the shares answered (ID) and called unknown (OOD).
    Returns (the report, {score: (ID scores, OOD scores)} for the histogram)."""
    from pathlib import Path

    import numpy as np

    from vitcli.console import warn
    from vitcli.folders import list_images
    from vitcli.ood import auroc, check_score, fpr_at_tpr

    if pred.ood is None:
        check_score("energy", None, False, str(pred.path))
    ood_dir = Path(ood_dir)
    ood_paths = list_images(ood_dir) if ood_dir.is_dir() else [ood_dir] if ood_dir.is_file() else []
    if not ood_paths:
        raise VitcliError(f"--ood-data '{ood_dir}' holds no images")
    id_scores, _ = score_images(pred, id_paths, batch_size)
    ood_scores_, bad = score_images(pred, ood_paths, batch_size)
    for msg in bad:
        warn(f"skipped {msg}")
    if not len(next(iter(ood_scores_.values()), [])):
        raise VitcliError(f"none of the {len(ood_paths)} images in --ood-data '{ood_dir}' could be read")
    out = {"ood_data": str(ood_dir), "id_images": len(id_paths), "ood_images": int(len(next(iter(
        ood_scores_.values())))), "keep": pred.ood["keep"], "scores": {}}
    for name, s_id in id_scores.items():
        s_ood, t = ood_scores_[name], pred.ood["thresholds"][name]
        out["scores"][name] = {"auroc": auroc(s_id, s_ood), "fpr_at_95_tpr": fpr_at_tpr(s_id, s_ood, 0.95),
                               "threshold": t, "id_answered": float(np.mean(s_id <= t)),
                               "ood_unknown": float(np.mean(s_ood > t))}
    return out, {n: (s, ood_scores_[n]) for n, s in id_scores.items()}


def write_json(report: dict[str, Any], json_path: str | Path | None) -> dict[str, Any]:
    """The report as JSON at --json PATH (when given); returns the report."""
    if json_path:
        from vitcli.console import esc, info
        from vitcli.files import write_output

        write_output(json_path, json.dumps(report, indent=1).encode(), "--json-out")
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
            raise VitcliError(f"--json-out '{json_path}' is a folder; give a file name")
        refuse_inside(json_path, data_dir, "--json-out")


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
        rows.append(("ECE (15 bins)", f"{r['ece']:.4f} (temperature 1: none stored or fitted)"))
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


def report_label_vectors(pred, probs, labels, head: dict[str, Any]) -> dict[str, Any]:
    """`vitcli eval` of a multi-label model: the metrics of the task's probabilities at its thresholds."""
    from vitcli.metrics import label_vector_metrics

    report = head | {"task": pred.task.name} | label_vector_metrics(probs, labels.numpy(), pred.classes,
                                                                    pred.task.thresholds)
    print_label_vector_report(report)
    return report
