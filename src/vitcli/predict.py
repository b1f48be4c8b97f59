"""Classify images: collect files / folders / globs, decode in threads while the model runs, write results.

The model is a vitcli checkpoint, an exported ONNX file (run by onnxruntime) or an exported TorchScript file;
class names and preprocessing always come from the model file, so prediction repeats training's eval
transform exactly. Only torch, PIL and numpy are imported for a from-scratch checkpoint: no timm, no
torchvision (they cost seconds of start-up).
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, at_least
from vitcli.formats import Predictor

FORMATS = ("table", "json", "jsonl", "csv")
EXIT_SOME_FAILED = 2  # exit code when at least one input could not be predicted


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most likely first
    error: str | None = None
    abstained: bool = False  # top probability below its --min-prob threshold: the answer is "unknown"
    set: list[str] | None = None  # --coverage: the conformal prediction set, most likely first
    labels: list[tuple[str, float]] | None = None  # multi-label: every class at or above its threshold

    @property
    def answer(self) -> str:
        """The predicted class ('unknown' when abstaining); multi-label: the labels joined by '|'."""
        from vitcli.calibrate import UNKNOWN

        if self.labels is not None:
            return "|".join(c for c, _ in self.labels)
        return UNKNOWN if self.abstained else self.top[0][0]

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        if self.labels is not None:
            return {"file": self.file, "labels": [{"class": c, "prob": p} for c, p in self.labels],
                    "top": [{"class": c, "prob": p} for c, p in self.top]}
        d = {"file": self.file, "class": self.answer, "prob": self.top[0][1],
             "top": [{"class": c, "prob": p} for c, p in self.top]}
        return d | ({"set": self.set} if self.set is not None else {})


# ----------------------------------------------------------------------------------------------- inputs
def collect_inputs(args: Iterable[str]) -> tuple[list[Path], list[Prediction]]:
    """Files, folders (recursive) and glob patterns, in the order given and without duplicates.

    Returns (image paths, error entries for arguments that matched nothing). A file named explicitly is
    kept whatever its extension (decoding says whether it is an image); folders and globs keep image
    extensions only.
    """
    from vitcli.data import IMAGE_EXTS, list_images

    paths: list[Path] = []
    errors: list[Prediction] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for arg in args:
        p = Path(arg)
        if not arg.strip():
            errors.append(Prediction(arg, error="'': an empty argument names no file (use . for this folder)"))
        elif p.is_dir():
            found = list_images(p)
            if not found:
                errors.append(Prediction(arg, error=f"{arg}: folder holds no images "
                                                    f"({', '.join(sorted(IMAGE_EXTS))})"))
            for f in found:
                add(f)
        elif p.exists():
            add(p)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            files: list[Path] = []
            for m in map(Path, matches):
                if m.is_dir():
                    files += list_images(m)
                elif m.suffix.lower() in IMAGE_EXTS:
                    files.append(m)
            if not files:
                errors.append(Prediction(arg, error=f"{arg}: no image matches this pattern"))
            for f in files:
                add(f)
        else:
            errors.append(Prediction(arg, error=f"{arg}: no such file or folder"))
    return paths, errors


def passive_omp_threads() -> None:
    """Let idle OpenMP threads sleep instead of spin (unless the user chose otherwise).

    With spinning threads, a machine whose cores are busy with other work runs a one-image forward pass
    ~30x slower (a waiting thread steals the core the working one needs); large batches lose little to
    passive waiting. Only takes effect when called before torch is first imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ----------------------------------------------------------------------------------------------- models
class TorchPredictor(Predictor):
    """A vitcli checkpoint (scratch or timm model) on the chosen device and precision."""

    def __init__(self, path: Path, device: str, precision: str):
        import torch

        from vitcli.checkpoint import load_checkpoint, model_from_checkpoint
        from vitcli.device import pick_device, pick_precision

        ckpt = load_checkpoint(path)
        self._init_meta(path, f"checkpoint ({ckpt['model_spec']['backend']})", ckpt)
        self.config = ckpt.get("config", {})  # the training config (eval's report.html shows it)
        self.device = pick_device(device)
        self.precision, _ = pick_precision(precision, self.device)
        self.model = model_from_checkpoint(ckpt, path).to(self.device)
        self._torch = torch

    def logits(self, x):
        from vitcli.data import eval_transform
        from vitcli.device import autocast

        with self._torch.inference_mode(), autocast(self.device, self.precision):
            x = eval_transform(x.to(self.device, non_blocking=True), self.preprocess)  # (B, 3, H, W)
            return self.model(x).float().cpu()  # (B, C)


def load_predictor(model: str | None, device: str = "auto", precision: str = "auto",
                   runs_dir: str = "runs") -> Predictor:
    """--model as a checkpoint, run folder, .onnx or TorchScript file; None -> the newest run."""
    from vitcli.checkpoint import resolve_model_path
    from vitcli.console import esc, info
    from vitcli.formats import format_of

    path = resolve_model_path(model, runs_dir)
    fmt = format_of(path)
    pred = fmt.predictor(path, device) if fmt else TorchPredictor(path, device, precision)
    info(f"[bold]model[/] {esc(str(path))} ({pred.kind}, {len(pred.classes)} classes)")
    return pred


# ----------------------------------------------------------------------------------------------- inference
def _decode(path: Path, size: int, interpolation: str):
    from vitcli.data import BadImage, decode_square

    try:
        return decode_square(path, size, interpolation), None  # uint8 (3, S, S)
    except BadImage as e:
        return None, str(e)


def decoded(paths: list[Path], size: int, interpolation: str, threads: int, window: int) -> Iterator:
    """(path, uint8 image or None, error or None) in input order; at most `window` images decoded ahead,
    in a thread pool (PIL releases the GIL) so decoding overlaps with the model."""
    if threads <= 1 or len(paths) <= 1:
        for p in paths:
            yield (p, *_decode(p, size, interpolation))
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        todo = iter(paths)
        pending: deque = deque()
        for p in todo:
            pending.append((p, pool.submit(_decode, p, size, interpolation)))
            if len(pending) >= window:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, nxt, size, interpolation)))
            yield (p, *fut.result())


def answers(pred: Predictor, names: list[str], probs, k: int, min_prob=None, threshold: float | None = None
            ) -> list[Prediction]:
    """Probabilities (B, C) of `names` -> their Predictions: top `k`, "unknown" below `min_prob` (C,), the
    conformal set for `threshold`, and the labels above their thresholds for a multi-label model."""
    from vitcli.multilabel import DEFAULT_THRESHOLD, above_threshold

    label_th = pred.thresholds or [DEFAULT_THRESHOLD] * len(pred.classes)  # multi-label models only
    full = probs.double()  # (B, C)
    order = full.argsort(dim=-1, descending=True, stable=True)  # (B, C)
    out = []
    for name, pr, ids in zip(names, full.tolist(), order.tolist(), strict=True):
        r = Prediction(name, [(pred.classes[i], round(pr[i], 6)) for i in ids[:k]])
        r.abstained = min_prob is not None and pr[ids[0]] < min_prob[ids[0]]
        if threshold is not None:
            r.set = [pred.classes[i] for i in ids if 1.0 - pr[i] <= threshold]
        if pred.multilabel:
            r.labels = [(c, round(q, 6)) for c, q in above_threshold(pr, pred.classes, label_th)]
        out.append(r)
    return out


def predict_images(pred: Predictor, paths: list[Path], top_k: int = 1, batch_size: int = 64, tta: bool = False,
                   threads: int = 0, progress: bool = True, min_prob=None, threshold: float | None = None
                   ) -> Iterator[Prediction]:
    """Yield one Prediction per path, in order; unreadable images give an error entry, the rest go on.
    `min_prob` (C,) thresholds turn a top-1 below its class's threshold into "unknown"; `threshold` (a
    conformal threshold) adds the prediction set."""
    import torch

    from vitcli.console import progress_bar

    pre = pred.preprocess
    k = max(1, min(top_k, len(pred.classes)))
    threads = threads or min(4, os.cpu_count() or 1)
    bar = progress_bar(transient=True) if progress and len(paths) > batch_size else None
    task = bar.add_task("predicting", total=len(paths)) if bar else None

    def flush(batch: list[tuple[Path, Any]]) -> Iterator[Prediction]:
        x = torch.stack([img for _, img in batch])  # uint8 (B, 3, S, S)
        yield from answers(pred, [str(p) for p, _ in batch], pred.probs(x, tta), k, min_prob, threshold)

    if bar:
        bar.start()
    try:
        batch: list[tuple[Path, Any]] = []
        for path, img, err in decoded(paths, pre["resize_size"], pre["interpolation"], threads,
                                      window=2 * batch_size):
            if err is not None:
                yield Prediction(str(path), error=err)
            else:
                batch.append((path, img))
            if len(batch) == batch_size:
                yield from flush(batch)
                batch = []
            if bar:
                bar.advance(task)
        if batch:
            yield from flush(batch)
    finally:
        if bar:
            bar.stop()


# ----------------------------------------------------------------------------------------------- output
def csv_header(k: int, answer: bool = False, with_set: bool = False) -> list[str]:
    extra = ["answer"] * answer + ["set"] * with_set
    return ["file"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")] + extra + ["error"]


def csv_row(p: Prediction, k: int, answer: bool = False, with_set: bool = False) -> list[Any]:
    """One csv line; the set is its classes joined by '|' (empty: no class reached the threshold)."""
    cells: list[Any] = [p.file]
    for i in range(k):
        cells += list(p.top[i]) if i < len(p.top) else ["", ""]
    if answer:
        cells.append(p.answer if p.error is None else "")
    if with_set:
        cells.append("|".join(p.set or []))
    return cells + [p.error or ""]


def write_results(results: Iterable[Prediction], fmt: str, k: int, stream, answer: bool = False,
                  with_set: bool = False) -> list[Prediction]:
    """Write predictions to a text stream as they come (json and table at the end); returns them all."""
    from vitcli.console import visible

    kept: list[Prediction] = []
    writer = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
    tty = stream.isatty()  # json escapes control characters itself; csv cells shown on a terminal are escaped
    if writer:
        writer.writerow(csv_header(k, answer, with_set))
    for r in results:
        kept.append(r)
        if fmt == "jsonl":
            stream.write(json.dumps(r.as_dict()) + "\n")
        elif writer:
            writer.writerow([visible(c) if tty and isinstance(c, str) else c
                             for c in csv_row(r, k, answer, with_set)])
    if fmt == "json":
        json.dump([r.as_dict() for r in kept], stream, indent=1)
        stream.write("\n")
    return kept


def print_table(results: list[Prediction], k: int, with_set: bool = False) -> None:
    from rich.table import Table

    from vitcli.console import esc, out

    tab = Table(box=None, header_style="bold", pad_edge=False)
    tab.add_column("file", overflow="fold")
    if any(r.labels is not None for r in results):  # multi-label: every label above its threshold
        tab.add_column("labels (at or above threshold)")
        for r in results:
            if r.error is None:
                tab.add_row(esc(r.file), ", ".join(f"{esc(c)} {p:.3f}" for c, p in r.labels or []) or "(none)")
        out.print(tab)
        return
    tab.add_column("class")
    tab.add_column("prob", justify="right")
    if k > 1:
        tab.add_column(f"next {k - 1}")
    if with_set:
        tab.add_column("set")
    for r in results:
        if r.error is not None:
            continue
        (c, p), rest = r.top[0], r.top[1:]
        row = [esc(r.file), f"[yellow]unknown[/] (top: {esc(c)})" if r.abstained else esc(c), f"{p:.3f}"]
        if k > 1:
            row.append(", ".join(f"{esc(c2)} {p2:.3f}" for c2, p2 in rest))
        if with_set:
            row.append("{" + ", ".join(esc(c2) for c2 in r.set or []) + "}")
        tab.add_row(*row)
    out.print(tab)


def run_predict(inputs: list[str], model: str | None = None, top_k: int = 1, fmt: str = "table",
                output: str | Path | None = None, batch_size: int = 64, tta: bool = False, device: str = "auto",
                precision: str = "auto", threads: int = 0, min_prob: list[str] | None = None,
                coverage: float | None = None) -> int:
    """The `vitcli predict` command; returns the exit code (0, or EXIT_SOME_FAILED when any input failed)."""
    from vitcli.console import console, esc, info
    from vitcli.device import check_device_args

    passive_omp_threads()
    check_device_args(device, precision)
    if not inputs:
        raise VitcliError("give at least one image, folder or glob pattern, e.g. vitcli predict photo.jpg")
    if fmt not in FORMATS:
        raise VitcliError(f"--format {fmt!r} is not valid; use one of {', '.join(FORMATS)}")
    at_least("--top-k", top_k)
    at_least("--batch-size", batch_size)
    if output is not None and Path(output).is_dir():
        raise VitcliError(f"--output '{output}' is a folder; give a file name, e.g. {Path(output) / 'preds.csv'}")
    if output is not None and fmt == "table":
        fmt = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}.get(Path(output).suffix.lower(), "")
        if not fmt:
            raise VitcliError(f"--output '{output}': give --format json, jsonl or csv (or a file ending in "
                              "one of those)")
    paths, missing = collect_inputs(inputs)
    if not paths:
        raise VitcliError("no images to predict: " + "; ".join(m.error or "" for m in missing))
    for m in missing:
        console.print(f"[red]error[/]: {esc(m.error or '')}", soft_wrap=True)
    if coverage is not None:
        from vitcli.calibrate import check_coverage

        check_coverage(coverage)
    pred = load_predictor(model, device, precision)
    k = max(1, min(top_k, len(pred.classes)))
    from vitcli.calibrate import parse_min_prob

    thresholds = parse_min_prob(min_prob, pred.classes)
    threshold = pred.conformal_threshold(coverage) if coverage is not None else None
    answer, with_set = thresholds is not None or pred.multilabel, threshold is not None  # csv: labels as answer
    if with_set:
        info(f"prediction sets for coverage {coverage:g}: classes with p >= {max(0.0, 1 - threshold):.4f} "
             f"(split conformal, {len(pred.conformal_scores)} validation images)")

    def reported(results: Iterable[Prediction]) -> Iterator[Prediction]:
        for r in results:
            if r.error is not None:
                console.print(f"[red]error[/]: {esc(r.error)}", soft_wrap=True)
            yield r

    results = reported(predict_images(pred, paths, top_k=k, batch_size=batch_size, tta=tta, threads=threads,
                                      min_prob=thresholds, threshold=threshold))
    if fmt == "table":
        done = list(results)
        print_table(done, k, with_set)
    elif output is None:
        done = write_results(itertools.chain(missing, results), fmt, k, sys.stdout, answer, with_set)
        sys.stdout.flush()
    else:
        from vitcli.files import write_output

        buf = io.StringIO()
        done = write_results(itertools.chain(missing, results), fmt, k, buf, answer, with_set)
        write_output(output, buf.getvalue().encode(), "--output")
        info(f"wrote {len(done)} predictions to {esc(str(output))}")
    failed = sum(r.error is not None for r in done) + (len(missing) if fmt == "table" else 0)
    if failed:
        console.print(f"[yellow]{failed} of {len(paths) + len(missing)} inputs could not be predicted[/] "
                      f"(exit code {EXIT_SOME_FAILED})")
        return EXIT_SOME_FAILED
    return 0
