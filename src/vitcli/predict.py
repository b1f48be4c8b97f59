"""`vitcli predict`: collect files / folders / globs, run them through the inference service, write results."""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, at_least
from vitcli.inference import Prediction, load_predictor, passive_omp_threads, predict_images

FORMATS = ("table", "json", "jsonl", "csv")
EXIT_SOME_FAILED = 2  # exit code when at least one input could not be predicted


# ----------------------------------------------------------------------------------------------- inputs
def collect_inputs(args: Iterable[str]) -> tuple[list[Path], list[Prediction]]:
    """Files, folders (recursive) and glob patterns, in the order given and without duplicates.

    Returns (image paths, error entries for arguments that matched nothing). A file named explicitly is
    kept whatever its extension (decoding says whether it is an image); folders and globs keep image
    extensions only.
    """
    from vitcli.decode import IMAGE_EXTS
    from vitcli.folders import list_images

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


# ----------------------------------------------------------------------------------------------- output
def csv_header(k: int, answer: bool = False, with_set: bool = False, with_ood: bool = False) -> list[str]:
    extra = ["answer"] * answer + ["set"] * with_set + ["ood_score"] * with_ood
    return ["file"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")] + extra + ["error"]


def csv_row(p: Prediction, k: int, answer: bool = False, with_set: bool = False, with_ood: bool = False
            ) -> list[Any]:
    """One csv line; the set is its classes joined by '|' (empty: no class reached the threshold)."""
    cells: list[Any] = [p.file]
    for i in range(k):
        cells += list(p.top[i]) if i < len(p.top) else ["", ""]
    if answer:
        cells.append(p.answer if p.error is None else "")
    if with_set:
        cells.append("|".join(p.set or []))
    if with_ood:
        cells.append("" if p.ood_score is None else p.ood_score)
    return cells + [p.error or ""]


def write_results(results: Iterable[Prediction], fmt: str, k: int, stream, answer: bool = False,
                  with_set: bool = False, with_ood: bool = False) -> list[Prediction]:
    """Write predictions to a text stream as they come (json and table at the end); returns them all."""
    from vitcli.console import visible

    kept: list[Prediction] = []
    writer = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
    tty = stream.isatty()  # json escapes control characters itself; csv cells shown on a terminal are escaped
    if writer:
        writer.writerow(csv_header(k, answer, with_set, with_ood))
    for r in results:
        kept.append(r)
        if fmt == "jsonl":
            stream.write(json.dumps(r.as_dict()) + "\n")
        elif writer:
            writer.writerow([visible(c) if tty and isinstance(c, str) else c
                             for c in csv_row(r, k, answer, with_set, with_ood)])
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
                unsure = "".join(f", [yellow]unsure[/] {esc(c)} {p:.3f}" for c, p in r.unsure or [])
                tab.add_row(esc(r.file), (", ".join(f"{esc(c)} {p:.3f}" for c, p in r.labels or []) or "(none)")
                            + unsure)
        out.print(tab)
        return
    tab.add_column("class")
    tab.add_column("prob", justify="right")
    if k > 1:
        tab.add_column(f"next {k - 1}")
    if with_set:
        tab.add_column("set")
    with_ood = any(r.ood_score is not None for r in results)
    if with_ood:
        tab.add_column("ood score", justify="right")
    for r in results:
        if r.error is not None:
            continue
        (c, p), rest = r.top[0], r.top[1:]
        word = f"[yellow]{esc(r.unknown)}[/] (top: {esc(c)})"
        row = [esc(r.file), word if r.abstained or r.ood else esc(c), f"{p:.3f}"]
        if k > 1:
            row.append(", ".join(f"{esc(c2)} {p2:.3f}" for c2, p2 in rest))
        if with_set:
            row.append("{" + ", ".join(esc(c2) for c2 in r.set or []) + "}")
        if with_ood:
            row.append(f"{r.ood_score:.4f}" + (" [yellow]out[/]" if r.ood else ""))
        tab.add_row(*row)
    out.print(tab)


def run_predict(inputs: list[str], model: str | None = None, top_k: int = 1, fmt: str = "table",
                output: str | Path | None = None, batch_size: int = 64, tta: bool | None = None, device: str = "auto",
                precision: str = "auto", threads: int = 0, min_prob: list[str] | None = None,
                coverage: float | None = None, ood: str | None = None, unknown: str = "unknown") -> int:
    """The `vitcli predict` command; returns the exit code (0, or EXIT_SOME_FAILED when any input failed).
    `ood`: an out-of-distribution score name (auto, knn, energy) to report and answer `unknown` above; `tta`: None
    for the model's own default (`Predictor.set_tta`)."""
    from vitcli.console import console, esc, info
    from vitcli.device import check_device_args

    passive_omp_threads()
    check_device_args(device, precision)
    if not inputs:
        raise VitcliError("give at least one image, folder or glob pattern, e.g. vitcli predict photo.jpg")
    at_least("--top-k", top_k)
    at_least("--batch-size", batch_size)
    fmt = check_output(fmt, output)
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
    ood = check_ood(pred, ood, unknown)
    answer = thresholds is not None or ood is not None or not pred.task.one_label  # csv: the answer column
    with_set, with_ood = threshold is not None, ood is not None
    if with_set:
        info(f"prediction sets for coverage {coverage:g}: classes with p >= {max(0.0, 1 - threshold):.4f} "
             f"(split conformal, {len(pred.task.conformal_scores)} validation images)")

    def reported(results: Iterable[Prediction]) -> Iterator[Prediction]:
        for r in results:
            if r.error is not None:
                console.print(f"[red]error[/]: {esc(r.error)}", soft_wrap=True)
            yield r

    if line := pred.set_tta(tta):
        info(esc(line))
    how = pred.prepare(len(paths) * pred.views, batch_size)
    t0 = time.perf_counter()
    results = reported(predict_images(pred, paths, top_k=k, batch_size=batch_size, threads=threads,
                                      min_prob=thresholds, threshold=threshold, ood=ood, unknown=unknown))
    if fmt == "table":
        done = list(results)
        print_table(done, k, with_set)
    elif output is None:
        done = write_results(itertools.chain(missing, results), fmt, k, sys.stdout, answer, with_set, with_ood)
        sys.stdout.flush()
    else:
        from vitcli.files import write_output

        buf = io.StringIO()
        done = write_results(itertools.chain(missing, results), fmt, k, buf, answer, with_set, with_ood)
        write_output(output, buf.getvalue().encode(), "--output")
        info(f"wrote {len(done)} predictions to {esc(str(output))}")
    seconds = time.perf_counter() - t0
    if fmt == "table" or output is not None:  # results on stdout: nothing after them (pipes, tests parse them)
        info(f"predicted {len(paths)} images in {seconds:.1f} s: {len(paths) / max(seconds, 1e-9):.0f} img/s "
             f"({how})")
    failed = sum(r.error is not None for r in done) + (len(missing) if fmt == "table" else 0)
    if failed:
        console.print(f"[yellow]{failed} of {len(paths) + len(missing)} inputs could not be predicted[/] "
                      f"(exit code {EXIT_SOME_FAILED})")
        return EXIT_SOME_FAILED
    return 0


def check_output(fmt: str, output: str | Path | None) -> str:
    """The output format after --format / --output are checked (a table with a file picks by its suffix)."""
    if fmt not in FORMATS:
        raise VitcliError(f"--format {fmt!r} is not valid; use one of {', '.join(FORMATS)}")
    if output is not None and Path(output).is_dir():
        raise VitcliError(f"--output '{output}' is a folder; give a file name, e.g. {Path(output) / 'preds.csv'}")
    if output is not None and fmt == "table":
        fmt = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}.get(Path(output).suffix.lower(), "")
        if not fmt:
            raise VitcliError(f"--output '{output}': give --format json, jsonl or csv (or a file ending in "
                              "one of those)")
    return fmt


def check_ood(pred, ood: str | None, unknown: str) -> str | None:
    """The out-of-distribution score to use (None: --ood not given), said in one line; or one line why not."""
    if not unknown.strip() or len(unknown) > 100:
        raise VitcliError(f"--ood-word {unknown!r} must be a non-empty word of at most 100 characters")
    if ood is None:
        return None
    if unknown in pred.classes:
        raise VitcliError(f"--ood-word {unknown!r} is also a class of the model, so the two could not be told "
                          "apart; choose another word")
    from vitcli.console import info
    from vitcli.ood import check_score

    name = check_score(ood, pred.ood, pred.gives_features, str(pred.path))
    info(f"out of distribution: {name} score above {pred.ood['thresholds'][name]:.4f} answers '{unknown}' "
         f"(keeps {pred.ood['keep']:.0%} of {pred.ood['images']} validation images answered)")
    return name
