"""`vitcli runs` (a table of run folders) and `vitcli compare` (is model B really better than model A?).

`compare` runs both models on the same images and reports the config diff, per-class metric deltas and an
exact McNemar test on the paired predictions: under "no difference" the images only one model gets right are
equally likely to favour either, so the two-sided p-value is a binomial(n = b + c, 1/2) tail, computed here
exactly with integer arithmetic.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError

ALPHA = 0.05  # significance level the verdict line uses


# ----------------------------------------------------------------------------------------------- runs
def _alive(pid: int) -> bool:
    if not 0 < pid < 2**31:  # 0 and negative numbers would ask about process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(info: dict[str, Any], epochs_done: int, epochs: int) -> str:
    """finished / interrupted / running, from run.json (older runs: from the epochs in metrics.csv)."""
    status = info.get("status")
    if status == "running":
        if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", 0))):
            return "interrupted"  # killed without a chance to say so (kill -9, power cut)
        return "running"
    if status in ("finished", "interrupted"):
        return status
    return "finished" if epochs and epochs_done >= epochs else "interrupted"


def describe_run(run_dir: Path) -> dict[str, Any] | None:
    """One row of `vitcli runs`, or None when the folder is not a training run (no config.yaml). A run whose
    config.yaml, metrics.csv or run.json cannot be read is a row with status "unreadable" and the reason."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():  # a FIFO or device in its place: a run, and unreadable
        return None
    try:
        return _describe(run_dir)
    except VitcliError as e:
        return {"name": run_dir.name, "path": str(run_dir), "started": _mtime(cfg_file), "model": "?",
                "data": "?", "epochs": 0, "epochs_planned": 0, "best_val_acc": None, "best_epoch": None,
                "wall_s": 0.0, "status": "unreadable", "error": str(e)}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _describe(run_dir: Path) -> dict[str, Any]:
    import yaml

    from vitcli.config import MAX_YAML_BYTES, safe_yaml
    from vitcli.files import read_text
    from vitcli.rundir import cfg_data_dir, read_metrics, read_run_info

    cfg_file = run_dir / "config.yaml"
    try:
        raw = safe_yaml(read_text(cfg_file, MAX_YAML_BYTES) or "", f"'{cfg_file}'")
    except yaml.YAMLError as e:
        raise VitcliError(f"'{cfg_file}' is not valid YAML ({str(e).splitlines()[0][:80]})") from None
    raw = raw if isinstance(raw, dict) else {}
    history, info = read_metrics(run_dir / "metrics.csv"), read_run_info(run_dir)
    train, model = (v if isinstance(v := raw.get(k), dict) else {} for k in ("train", "model"))
    epochs = train.get("epochs", 0)
    epochs = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else 0
    best = max(history, key=lambda h: h["val_acc"]) if history else None
    wall = info.get("wall_s", sum(h["seconds"] for h in history))
    return {"name": run_dir.name, "path": str(run_dir), "started": info.get("started", _mtime(cfg_file)),
            "model": info.get("model") or str(model.get("name", "?")),
            "data": info.get("data_dir") or cfg_data_dir(run_dir) or "?",
            "epochs": len(history), "epochs_planned": epochs,
            "best_val_acc": best["val_acc"] if best else None, "best_epoch": best["epoch"] if best else None,
            "wall_s": float(wall) if math.isfinite(wall) else 0.0, "status": run_status(info, len(history), epochs)}


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """Every training run folder directly under `root`, newest first."""
    from vitcli.files import os_reason

    root = Path(root)
    if not root.is_dir():
        raise VitcliError(f"runs folder '{root}' does not exist")
    try:
        folders = sorted(d for d in root.iterdir() if d.is_dir())
    except OSError as e:
        raise VitcliError(f"runs folder '{root}' cannot be listed: {os_reason(e)}") from None
    rows = [r for d in folders if (r := describe_run(d)) is not None]
    return sorted(rows, key=lambda r: r["started"], reverse=True)


def print_runs(rows: list[dict[str, Any]]) -> None:
    """The table; the data column shows the dataset folder's name (`--json` has the full path)."""
    from rich import box
    from rich.table import Table

    from vitcli.console import esc, out

    colour = {"finished": "green", "interrupted": "yellow", "running": "cyan", "unreadable": "red"}
    tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("name", "started", "model", "data", "epochs", "best acc", "wall", "status"):
        tab.add_column(col, justify="right" if col in ("epochs", "best acc", "wall") else "left",
                       no_wrap=col != "data")
    for r in rows:
        best = f"{r['best_val_acc']:.4f} @{r['best_epoch']}" if r["best_val_acc"] is not None else "-"
        tab.add_row(esc(r["name"]), time.strftime("%m-%d %H:%M", time.localtime(r["started"])),
                    esc(r["model"]), esc(Path(r["data"]).name), f"{r['epochs']}/{r['epochs_planned']}", best,
                    _duration(r["wall_s"]), f"[{colour[r['status']]}]{r['status']}[/]")
    out.print(tab)
    for r in rows:
        if r["status"] == "unreadable":
            out.print(f"[red]unreadable[/] {esc(r['name'])}: {esc(r['error'])}")


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------------------------- compare
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b images only A gets right and c only B gets right:
    2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1 (1 when b + c = 0)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))  # exact integers
    return min(1.0, 2 * tail / 2**n)


def config_diff(a: dict, b: dict) -> list[dict[str, Any]]:
    """Flattened `section.key` entries whose values differ."""
    keys = sorted({f"{s}.{k}" for cfg in (a, b) for s, sec in cfg.items() if isinstance(sec, dict) for k in sec})
    rows = []
    for key in keys:
        s, k = key.split(".", 1)
        va, vb = (a.get(s) or {}).get(k), (b.get(s) or {}).get(k)
        if va != vb:
            rows.append({"key": key, "a": va, "b": vb})
    return rows


def compare_runs(run_a: str | Path, run_b: str | Path, data: str | Path | None = None, device: str = "auto",
                 precision: str = "auto", batch_size: int = 64) -> dict[str, Any]:
    """Both models on the same images: config diff, accuracy, per-class deltas and the McNemar test."""
    import numpy as np

    from vitcli.checkpoint import load_model
    from vitcli.config import config_from_dict, to_dict
    from vitcli.device import pick_device, pick_precision
    from vitcli.evaluation import evaluate_split
    from vitcli.html_report import val_split
    from vitcli.sources import scan_eval_folder
    from vitcli.task import Task

    (net_a, ck_a, path_a), (net_b, ck_b, path_b) = load_model(run_a), load_model(run_b)
    task_a, task_b = Task.from_meta(ck_a), Task.from_meta(ck_b)
    classes, multi = list(ck_a["classes"]), not task_a.one_label
    if list(ck_b["classes"]) != classes:
        raise VitcliError(f"'{run_a}' and '{run_b}' do not have the same classes ({classes[:6]} vs "
                          f"{list(ck_b['classes'])[:6]}); compare needs models of the same task")
    if task_b.name != task_a.name:
        raise VitcliError(f"'{run_a}' is {task_a.words} and '{run_b}' is {task_b.words}; compare needs models of "
                          "the same task")
    if data is not None:
        where, split = Path(data), scan_eval_folder(data, classes, multi)
        if len(split) == 0:
            raise VitcliError(f"'{data}' holds no images in class folders named like the models' classes")
    else:
        (where, split), (where_b, split_b) = val_split(Path(path_a).parent, ck_a), val_split(Path(path_b).parent, ck_b)
        if (split.paths, split.labels) != (split_b.paths, split_b.labels):
            raise VitcliError(f"'{run_a}' and '{run_b}' were validated on different images ({where} vs "
                              f"{where_b}); give DATA to compare them on the same ones")
    dev = pick_device(device)
    prec, _ = pick_precision(precision, dev)
    results = []
    for net, ck in ((net_a, ck_a), (net_b, ck_b)):
        net.to(dev)
        results.append(evaluate_split(net, classes, dict(ck["preprocess"]), split, dev, prec, batch_size, where,
                                      task=Task.from_meta(ck)))
    (ra, pa, y, paths_a, _), (rb, pb, _, paths_b, _) = results
    if paths_a != paths_b:  # decoding is deterministic; this would be a bug, not bad input
        raise VitcliError("the two models saw different images; please report this")
    right_a, right_b = (_right(p, y, r) for p, r in ((pa, ra), (pb, rb)))  # (N,) bool each
    counts = {"both_right": int((right_a & right_b).sum()), "only_a_right": int((right_a & ~right_b).sum()),
              "only_b_right": int((~right_a & right_b).sum()), "both_wrong": int((~right_a & ~right_b).sum())}
    p = mcnemar_exact(counts["only_a_right"], counts["only_b_right"])
    per_class = [{"class": x["class"], "support": x["support"],
                  **{f"{m}_{s}": r[m] for s, r in (("a", x), ("b", z)) for m in ("precision", "recall", "f1")},
                  "f1_delta": z["f1"] - x["f1"], "recall_delta": z["recall"] - x["recall"]}
                 for x, z in zip(ra["per_class"], rb["per_class"], strict=True)]
    return {"run_a": str(path_a), "run_b": str(path_b), "data": str(where), "images": int(len(y)),
            "config_diff": config_diff(to_dict(config_from_dict(ck_a.get("config", {}))),
                                       to_dict(config_from_dict(ck_b.get("config", {})))),
            "task": task_a.name,
            "accuracy_a": float(np.mean(right_a)), "accuracy_b": float(np.mean(right_b)),
            "macro_f1_a": _macro_f1(ra), "macro_f1_b": _macro_f1(rb), "per_class": per_class,
            "mcnemar": counts | {"p_value": p, "alpha": ALPHA, "significant": p < ALPHA,
                                 "right_means": RIGHT_MEANS[task_a.name]}}


RIGHT_MEANS = {"single": "top-1 class is the label",  # what "right" means in the McNemar test, per task
               "multilabel": "exact match: every label of the image right at the model's thresholds"}


def _right(probs, y, report: dict[str, Any]):
    """(N,) bool: single-label, the top-1 class is the label; multi-label (probs, y (N, C)), exact match at the
    model's thresholds (so the McNemar test pairs whole images, as for single-label models)."""
    import numpy as np

    if y.ndim == 1:
        return probs.argmax(1) == y
    return ((probs >= np.asarray(report["thresholds"])[None, :]) == (y > 0.5)).all(1)


def _macro_f1(report: dict[str, Any]) -> float:
    return report["macro_f1"] if "macro_f1" in report else report["macro"]["f1"]


def verdict(r: dict[str, Any]) -> str:
    m = r["mcnemar"]
    b, c = m["only_a_right"], m["only_b_right"]
    if b + c == 0:
        return "the two models make exactly the same right and wrong calls: no difference to test"
    better = "B" if c > b else "A" if b > c else "neither"
    where = f"{better} is right on {max(b, c)} of the {b + c} images where exactly one model is right"
    sig = "significant" if m["significant"] else "not significant"
    return f"{where} (right: {m['right_means']}); exact McNemar p = {m['p_value']:.4g}: {sig} at the {m['alpha']} level"


def print_compare(r: dict[str, Any]) -> None:
    from rich.table import Table

    from vitcli.console import esc, out

    out.print(f"A: {esc(r['run_a'])}\nB: {esc(r['run_b'])}\ndata: {esc(r['data'])} ({r['images']} images)")
    diff = Table(title="config diff", title_justify="left")
    for col in ("key", "A", "B"):
        diff.add_column(col)
    for d in r["config_diff"]:
        diff.add_row(d["key"], esc(str(d["a"])), esc(str(d["b"])))
    out.print(diff if r["config_diff"] else "config diff: none")
    tab = Table(title="per class (delta = B - A)", title_justify="left")
    for col in ("class", "support", "recall A", "recall B", "delta", "F1 A", "F1 B", "delta"):
        tab.add_column(col, justify="left" if col == "class" else "right")
    for c in r["per_class"]:
        tab.add_row(esc(c["class"]), str(c["support"]), f"{c['recall_a']:.3f}", f"{c['recall_b']:.3f}",
                    f"{c['recall_delta']:+.3f}", f"{c['f1_a']:.3f}", f"{c['f1_b']:.3f}", f"{c['f1_delta']:+.3f}")
    tab.add_section()
    tab.add_row("[bold]exact match[/]" if r["task"] == "multilabel" else "[bold]accuracy[/]", str(r["images"]),
                f"{r['accuracy_a']:.4f}", f"{r['accuracy_b']:.4f}",
                f"{r['accuracy_b'] - r['accuracy_a']:+.4f}", f"{r['macro_f1_a']:.3f}", f"{r['macro_f1_b']:.3f}",
                f"{r['macro_f1_b'] - r['macro_f1_a']:+.3f}")
    out.print(tab)
    m = r["mcnemar"]
    mc = Table(title="McNemar (paired predictions)", title_justify="left", show_header=False)
    for k, v in (("both right", m["both_right"]), ("only A right", m["only_a_right"]),
                 ("only B right", m["only_b_right"]), ("both wrong", m["both_wrong"]),
                 ("p-value (exact, two-sided)", f"{m['p_value']:.6g}")):
        mc.add_row(k, str(v))
    out.print(mc)
    out.print(verdict(r))
