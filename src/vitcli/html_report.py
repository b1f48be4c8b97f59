"""report.html: one self-contained page per run (or per `vitcli eval`) that opens from a file with no server;
`run_report` builds a run's page (at the end of training and for `vitcli report`).

Figures are PNGs embedded as base64 data URIs; a Content-Security-Policy meta tag forbids every network
request, scripts included, so the page shows the same offline as online. Sections: command and config, data,
curves, final metrics, per class, confusion matrix, worst mistakes, attention.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
img{max-width:100%;border:1px solid #eee}.muted{color:#777}"""
N_ATTENTION = 4  # validation images shown with their attention rollout


def e(x: Any) -> str:
    """User text for the page: markup escaped, and control and bidi characters (U+202E would show 'rtl\u202eexe.txt'
    as 'rtltxt.exe') shown as escapes the way the console shows them; newlines and tabs kept for <pre>."""
    from vitcli.console import CONTROL, visible

    return html.escape(CONTROL.sub(lambda m: m[0] if m[0] in "\n\t" else visible(m[0]), str(x)))


def img_tag(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure_or_note(figures: dict[str, Any], key: str, alt: str, note: str) -> str:
    path = figures.get(key)
    return img_tag(path, alt) if path and Path(path).is_file() else f'<p class="muted">{e(note)}</p>'


def render(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The page: (id, heading, inner HTML) per section."""
    body = "".join(f'<section id="{sid}"><h2>{e(head)}</h2>{inner}</section>' for sid, head, inner in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body><h1>{e(title)}</h1>"
            f'<p class="muted">written by vitcli on {e(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>{body}</body></html>')


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def sections_for(r: dict[str, Any], figures: dict[str, Any], *, command: str, config_text: str,
                 data_rows: list[list[Any]], data_header: list[str], history: list[dict],
                 extra_metrics: list[list[Any]]) -> list[tuple[str, str, str]]:
    """The eight sections (nine with --ood-data) from an evaluation report `r` (see evaluate.compute_metrics)
    and the run's files."""
    metrics = [*extra_metrics, ["images evaluated", r["images"]], ["loss", f"{r['loss']:.4f}"],
               ["top-1 accuracy", pct(r["top1"])]]
    if r.get("top5") is not None:
        metrics.append(["top-5 accuracy", pct(r["top5"])])
    metrics += [["macro F1", f"{r['macro']['f1']:.4f}"], ["weighted F1", f"{r['weighted']['f1']:.4f}"],
                ["ECE (15 bins)", f"{r['ece']:.4f}"]]
    per_class = [[c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
                 for c in r["per_class"]]
    epochs = table(["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "s"],
                   [[h["epoch"], f"{h['train_loss']:.4f}", f"{h['train_acc']:.4f}", f"{h['val_loss']:.4f}",
                     f"{h['val_acc']:.4f}", f"{h['lr']:.2e}", f"{h['seconds']:.1f}"] for h in history])
    worst = table(["file", "true", "predicted", "p(predicted)", "loss"],
                  [[Path(w["file"]).name, w["true"], w["predicted"], f"{w['prob_predicted']:.3f}",
                    f"{w['loss']:.3f}"] for w in r["worst"]])
    return [
        ("command", "Command and config", f"<pre>{e(command)}</pre><pre>{e(config_text)}</pre>"),
        ("data", "Data", table(data_header, data_rows)),
        ("curves", "Curves", figure_or_note(figures, "curves", "loss and accuracy per epoch",
                                            "no training curves: the model is not in a run folder")
         + (epochs if history else "")),
        ("metrics", "Final metrics", table(["metric", "value"], metrics)),
        ("per-class", "Per class", table(["class", "precision", "recall", "F1", "support"], per_class)),
        ("confusion", "Confusion matrix", figure_or_note(figures, "confusion", "confusion matrix", "not drawn")),
        ("mistakes", "Worst mistakes", (figure_or_note(figures, "worst", "highest-loss mistakes", "")
                                        + worst) if r["worst"] else '<p class="muted">no mistakes</p>'),
        ("attention", "Attention", figure_or_note(figures, "attention", "attention rollout",
                                                  "attention could not be read for this model")),
    ] + ([ood_section(r["ood"], figures)] if r.get("ood") else [])


def ood_section(o: dict[str, Any], figures: dict[str, Any]) -> tuple[str, str, str]:
    """eval --ood-data: the scores' AUROC / FPR table and their histograms."""
    rows = [[name, f"{s['auroc']:.4f}", f"{s['fpr_at_95_tpr']:.4f}", f"{s['threshold']:.4f}", pct(s["id_answered"]),
             pct(s["ood_unknown"])] for name, s in o["scores"].items()]
    head = ["score", "AUROC", "FPR at 95% TPR", "threshold", "labelled answered", "OOD answered unknown"]
    note = (f"<p>{o['ood_images']} images from {e(o['ood_data'])} against {o['id_images']} labelled ones; "
            f"thresholds keep {o['keep']:.0%} of validation images answered.</p>")
    return "ood", "Out of distribution", note + table(head, rows) + figure_or_note(
        figures, "ood", "out-of-distribution score histograms", "")


def attention_figure(net, paths: list[Path], pre: dict[str, Any], classes: list[str], path: Path, task
                     ) -> Path | None:
    """Input and attention rollout of up to N_ATTENTION images side by side, titled with the task's calibrated
    probability (None if unreadable/unsupported)."""
    from vitcli.attention import capture_attention, rollout_map
    from vitcli.figures import decode_batch, fig_label, overlay, panel_figure, save_figure

    try:
        keep, photos, x = decode_batch(paths[:N_ATTENTION], pre)  # uint8 (B, 3, S, S), normalised (B, 3, S, S)
        dev = next(net.parameters()).device
        cap = capture_attention(net.float().eval(), x.to(dev))
    except VitcliError:
        return None
    heat = rollout_map(cap, discard_ratio=0.9)  # (B, gh, gw)
    probs = task.probs(cap.logits)  # (B, C)
    fig, axes = panel_figure(2, len(keep), "attention rollout (mean fusion, discard 0.9): input above, rollout below")
    for b, p in enumerate(keep):
        q, c = probs[b].max(0)
        axes[0, b].imshow(photos[b].permute(1, 2, 0).cpu().numpy())
        axes[0, b].set_title(fig_label(p.name, 24), fontsize=7)
        axes[1, b].imshow(overlay(photos[b], heat[b]))
        axes[1, b].set_title(f"{fig_label(classes[int(c)], 16)} ({float(q):.0%})", fontsize=7)
    save_figure(fig, path, dpi=100, tight=False)
    return path


def write_page(path: Path, title: str, sections: list[tuple[str, str, str]]) -> Path:
    from vitcli.files import atomic_write_text

    atomic_write_text(path, render(title, sections))
    return path


def pick_examples(paths: list[Path], labels, n: int = N_ATTENTION) -> list[Path]:
    """Up to n images, one per class in turn, so the attention figure shows several classes."""
    seen, first, rest = set(), [], []
    for p, y in zip(paths, [int(v) for v in labels], strict=True):
        (rest if y in seen else first).append(p)
        seen.add(y)
    return (first + rest)[:n]


def eval_report(r: dict[str, Any], out_dir: Path, net, pre: dict[str, Any], ckpt: dict[str, Any],
                model_path: Path, examples: list[Path], task) -> Path:
    """report.html beside `vitcli eval`'s figures; curves come from the model's run folder when it has them."""
    from vitcli.config import config_from_dict, to_yaml
    from vitcli.console import command_line
    from vitcli.rundir import read_metrics

    figures = dict(r.get("figures", {}))
    curves = Path(model_path).parent / "curves.png"
    if curves.is_file():
        figures["curves"] = curves
    if net is not None and attention_figure(net, examples, pre, r["classes"], out_dir / "attention.png", task):
        figures["attention"] = out_dir / "attention.png"
        r["figures"]["attention"] = str(out_dir / "attention.png")
    history = read_metrics(Path(model_path).parent / "metrics.csv")
    rows = [[c["class"], c["support"]] for c in r["per_class"]]
    config_text = to_yaml(config_from_dict(ckpt.get("config", {})))
    sections = sections_for(r, figures, command=command_line(), config_text=config_text, data_rows=rows,
                            data_header=["class", "images"], history=history,
                            extra_metrics=[["model", str(model_path)], ["data", r["data"]]])
    return write_page(out_dir / "report.html", f"vitcli eval: {Path(r['data']).name}", sections)


# ----------------------------------------------------------------------------------------------- a run's page
def val_split(run_dir: Path, ckpt: dict[str, Any], remedy: str = "give DATA", again: bool = False):
    """(dataset folder, the run's validation Split), rebuilt the way training made it (same seed)."""
    return Path(ckpt["data_dir"]), run_dataset(run_dir, ckpt, remedy, again).val


def run_dataset(run_dir: Path, ckpt: dict[str, Any], remedy: str = "give DATA", again: bool = False):
    """The run's Dataset (train and validation Splits), rebuilt the way training made it (same seed). `remedy`
    ends the message when that is impossible: what the calling command offers instead. `again`: the scan's
    warnings (skipped files) were just printed by training, so it keeps them to itself."""
    from vitcli.config import config_from_dict
    from vitcli.console import hold_warnings
    from vitcli.sources import open_source

    cfg = config_from_dict(ckpt.get("config", {}))
    data_dir = ckpt.get("data_dir")
    if not data_dir or not Path(data_dir).exists():
        raise VitcliError(f"run '{run_dir}': its dataset folder '{data_dir}' is not there any more; {remedy}")
    source = open_source(data_dir, cfg.data.val_csv or None)
    if not source.listed:
        raise VitcliError(f"run '{run_dir}' streamed {source.kind}, whose images have no files to show; {remedy} "
                          "(the folder or label file the shards were made from)")
    with hold_warnings(again):
        ds = source.scan(cfg.data.val_fraction, cfg.train.seed)
    if ds.classes != list(ckpt["classes"]):
        raise VitcliError(f"run '{run_dir}': '{data_dir}' now holds classes {ds.classes[:10]}, the model "
                          f"{list(ckpt['classes'])[:10]}; {remedy}")
    return ds


def run_report(run_dir: str | Path, device: str = "auto", precision: str = "auto", again: bool = False
               ) -> dict[str, Path]:
    """Evaluate a run's best.pt on its validation images, draw the figures into the run folder and write
    report.html there. Returns the figures by name (curves, confusion, worst, attention, ...) and the page.
    `again`: at the end of training, whose scan already warned about the files it skipped."""
    from vitcli.checkpoint import load_model
    from vitcli.device import pick_device, pick_precision
    from vitcli.evaluation import evaluate_split, write_figures
    from vitcli.files import read_text
    from vitcli.rundir import read_metrics, read_run_info
    from vitcli.task import Task

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitcliError(f"run folder '{run_dir}' does not exist")
    net, ckpt, path = load_model(run_dir)
    classes, pre, task = list(ckpt["classes"]), dict(ckpt["preprocess"]), Task.from_meta(ckpt)
    if not task.one_label:
        raise VitcliError(f"run '{run_dir}' is {task.words}: report.html covers single-label runs; "
                          "vitcli eval LABELS.csv --model RUN gives its metrics")
    data_dir, split = val_split(run_dir, ckpt, f"vitcli eval DATA --model {run_dir} writes report.html for the "
                                "images in DATA", again)
    dev = pick_device(device)
    prec, _ = pick_precision(precision, dev)
    net.to(dev)
    r, _, y, paths, _ = evaluate_split(net, classes, pre, split, dev, prec, where=data_dir, task=task)
    r["data"] = str(data_dir)
    figures = {k: Path(v) for k, v in write_figures(r, run_dir, pre).items()}
    if (run_dir / "curves.png").is_file():
        figures["curves"] = run_dir / "curves.png"
    if attention_figure(net, pick_examples(paths, y), pre, classes, run_dir / "attention.png", task):
        figures["attention"] = run_dir / "attention.png"
    info, history = read_run_info(run_dir), read_metrics(run_dir / "metrics.csv")
    train_counts = info.get("train_counts") or []
    train_counts = train_counts if len(train_counts) == len(classes) else [""] * len(classes)
    rows = [[c["class"], t, c["support"]] for c, t in zip(r["per_class"], train_counts, strict=True)]
    extra = [["checkpoint", path.name + f" (epoch {ckpt.get('epoch')})"], ["data", str(data_dir)]]
    if history:
        best = max(history, key=lambda h: h["val_acc"])
        extra.append(["best val accuracy (training)", f"{best['val_acc']:.4f} at epoch {best['epoch']}"])
    if info.get("wall_s"):
        extra.append(["wall time", f"{info['wall_s']:.1f} s"])
    config_text = read_text(run_dir / "config.yaml") or ""
    sections = sections_for(r, figures, command=info.get("command", "(not recorded)"), config_text=config_text,
                            data_rows=rows, data_header=["class", "train images", "val images"],
                            history=history, extra_metrics=extra)
    figures["report"] = write_page(run_dir / "report.html", f"vitcli run: {run_dir.name}", sections)
    return figures
