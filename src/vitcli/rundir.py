"""The run folder: its name, config.yaml, split.csv, metrics.csv and curves.png, and finding a run to resume.

    runs/<name>/  config.yaml  split.csv  metrics.csv  curves.png  best.pt  last.pt
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli import __version__
from vitcli.errors import VitcliError, clip, shown
from vitcli.files import atomic_write_text, ensure_dir, os_reason, read_text, refuse_inside, run_lock

if TYPE_CHECKING:
    from vitcli.config import Config
    from vitcli.dataset import Dataset

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
EXTRA_METRIC_FIELDS = ["val_map"]  # multi-label runs: validation mean average precision


def new_run_dir(output: str | Path, name: str) -> Path:
    """<output>/<name>, or <name>-2, -3, ... : an existing run is never overwritten."""
    root = ensure_dir(output, "--output")
    for i in range(1, 10_000):
        cand = root / (name if i == 1 else f"{name}-{i}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
        except OSError as e:
            raise VitcliError(f"cannot create the run folder '{cand}': {os_reason(e)}") from None
    raise VitcliError(f"too many runs named '{name}' under '{root}'")


def refuse_output_in_data(cfg: Config, data_dir: str | Path | None, run_dir: Path | None) -> None:
    """The run folder (a new one under train.output, or the resumed one) must not be inside the dataset."""
    from vitcli.config import user_keys

    if run_dir is not None:
        refuse_inside(run_dir, data_dir, "--resume")
    else:
        refuse_inside(cfg.train.output, data_dir, "--output" if "train.output" in user_keys(cfg) else "default")


def check_resumed_data(run_dir: Path, ds: Dataset, classes: list[str] | None) -> None:
    """Resuming on other data: different classes are an error (the labels would silently change meaning);
    a changed file set (against split.csv) is a warning. Runs before anything is written."""
    from vitcli.console import warn

    if classes is not None and list(ds.classes) != list(classes):
        raise VitcliError(f"--resume: the dataset '{ds.root}' has the classes {shown(ds.classes)}, but the run "
                          f"'{run_dir}' was trained on {shown(classes)}; resume with the run's dataset "
                          "(or start a new run)")
    recorded = _split_files(run_dir / "split.csv")
    if recorded is None:
        return
    now = {p.relative_to(ds.root).as_posix() for p in ds.train.paths + ds.val.paths}
    added, gone = len(now - recorded), len(recorded - now)
    if added or gone:
        warn(f"the dataset '{ds.root}' changed since the run started ({added} images added, {gone} missing, "
             f"against {run_dir / 'split.csv'}); the resumed run trains on the files there now")


def _split_files(path: Path) -> set[str] | None:
    """The image paths split.csv records, or None when there is none (or it is unreadable: then a warning)."""
    from vitcli.console import warn

    try:
        text = read_text(path)
        return None if text is None else {r[2] for r in list(csv.reader(io.StringIO(text)))[1:] if len(r) == 3}
    except (VitcliError, csv.Error) as e:
        warn(f"{clip(str(e), 200)}; the file set is not compared")
        return None


def write_config(run_dir: Path, cfg: Config, data_dir: str | Path) -> None:
    """config.yaml, whose first line records the dataset (atomic: a kill must not leave half a config)."""
    from vitcli.config import to_yaml

    atomic_write_text(run_dir / "config.yaml",
                      f"# vitcli {__version__}; data: {Path(data_dir).resolve()}\n" + to_yaml(cfg))


def cfg_data_dir(run_dir: Path) -> str | None:
    """The dataset path recorded in the first line of config.yaml."""
    try:
        first = (read_text(run_dir / "config.yaml") or "").split("\n", 1)[0]
        return first.split("data: ", 1)[1] if "data: " in first else None
    except VitcliError:
        return None


def write_split(path: Path, ds: Dataset) -> None:
    """split.csv: which image went to train and which to val (relative to the dataset folder, or to the label
    file's folder; multi-label: classes joined by '|')."""
    from vitcli.dataset import label_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "class", "path"])
    for name, split in (("train", ds.train), ("val", ds.val)):
        for p, y in zip(split.paths, split.labels, strict=True):
            w.writerow([name, label_text(ds.classes, y), Path(os.path.relpath(p, ds.root)).as_posix()])
    atomic_write_text(path, buf.getvalue())


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv: one row per finished epoch."""
    buf = io.StringIO()
    extra = [k for k in EXTRA_METRIC_FIELDS if history and k in history[0]]
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_FIELDS + extra})
    atomic_write_text(path, buf.getvalue())


def metrics_in_line(run_dir: Path, history: list[dict[str, Any]]) -> bool:
    """Whether metrics.csv holds exactly the epochs of `history` (a kill may land between last.pt and it)."""
    path = run_dir / "metrics.csv"
    return path.is_file() and path.read_bytes().count(b"\n") == len(history) + 1


_CURVES_DRAWN: dict[str, tuple[float, float]] = {}  # run folder -> (end of the last drawing, its seconds)


def draw_curves(run_dir: Path, history: list[dict[str, Any]], force: bool = True) -> None:
    """curves.png: loss and accuracy per epoch, train and val. Unless forced, an epoch's redraw is skipped
    while the last one is more recent than 10x its cost (drawing takes ~0.3-0.8 s), so with epochs of a few
    seconds the figure costs at most a tenth of the run; the last epoch is always drawn."""
    from vitcli.figures import plot_curves

    last, cost = _CURVES_DRAWN.get(str(run_dir), (0.0, 0.0))
    if not force and time.time() - last < 10 * cost:
        return
    t0 = time.time()
    try:
        plot_curves(history, run_dir / "curves.png")
    except ImportError:
        pass
    _CURVES_DRAWN[str(run_dir)] = (time.time(), time.time() - t0)


def resolve_resume(resume: str | Path, hold: contextlib.ExitStack | None = None) -> tuple[Path, dict | None]:
    """--resume RUN|last.pt -> (run folder, last.pt contents or None when the run never saved one). With
    `hold`, the run folder is locked first (held until `hold` closes): a run another process is still
    training is an error naming its PID, and its temp files are never touched."""
    from vitcli.checkpoint import load_checkpoint

    p = Path(resume)
    run_dir = p.parent if p.is_file() else p
    if not run_dir.is_dir():
        raise VitcliError(f"--resume '{p}': no such run folder")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 touches the run folder
        hold = None
    elif hold is not None:
        hold.enter_context(run_lock(run_dir))
    if hold is not None or int(os.environ.get("RANK", "0")) == 0:
        for tmp in run_dir.glob(".*.tmp"):  # left by a kill -9 during an atomic write (checkpoint, csv, png)
            tmp.unlink(missing_ok=True)
    last = p if p.is_file() else p / "last.pt"
    if last.is_file():
        ckpt = load_checkpoint(last)
        if "train_state" not in ckpt:
            raise VitcliError(f"--resume '{last}' holds weights only, not the training state; resume from the "
                              "run folder (its last.pt)")
        return run_dir, ckpt
    if (run_dir / "config.yaml").is_file():
        return run_dir, None  # killed before its first save: start that run again from the beginning
    raise VitcliError(f"--resume '{p}': the folder holds neither last.pt nor config.yaml of a vitcli run")


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv back as numbers ([] when missing)."""
    text = read_text(path)
    if text is None:
        return []
    try:
        rows = [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(io.StringIO(text, newline=""))]
    except (ValueError, TypeError, csv.Error) as e:  # not UTF-8, a short row, a word where a number belongs
        raise VitcliError(f"'{path}' is not a metrics.csv written by vitcli ({clip(str(e))})") from None
    if any(not set(METRIC_FIELDS) <= row.keys() for row in rows):
        raise VitcliError(f"'{path}' lacks columns of a vitcli metrics.csv ({', '.join(METRIC_FIELDS)})")
    return rows


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder file ({} when there is none); anything else is one line naming it."""
    import json

    text = read_text(path)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
        raise VitcliError(f"'{path}' is not valid JSON ({clip(str(e) or type(e).__name__)})") from None
    if not isinstance(data, dict):
        raise VitcliError(f"'{path}' holds a JSON {type(data).__name__}, not the object vitcli writes")
    return data


_NUMBER, _INT, _STR = "a finite number", "an integer", "a string"
RUN_INFO_KEYS = {"started": _NUMBER, "ended": _NUMBER, "wall_s": _NUMBER, "pid": _INT, "epochs": _INT,
                 "host": _STR, "status": _STR, "command": _STR, "data_dir": _STR, "model": _STR,
                 "classes": "a list of strings", "train_counts": "a list of integers",
                 "val_counts": "a list of integers"}  # run.json: key -> what its value must be
_TIMES = ("started", "ended")  # seconds since 1970: between 0 and the year 5138


def _is(kind: str, v: Any) -> bool:
    import math

    if kind.startswith("a list of "):
        item = _STR if kind.endswith("strings") else _INT
        return isinstance(v, list) and all(_is(item, x) for x in v)
    if kind == _STR:
        return isinstance(v, str)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return isinstance(v, int) if kind == _INT else math.isfinite(v) and v >= 0


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json ({} when there is none), each key vitcli reads checked for its type: a bad one is one line
    naming the file, the key and the value."""
    path = run_dir / "run.json"
    info = read_json(path)
    for key, kind in RUN_INFO_KEYS.items():
        if key in info and not (_is(kind, info[key]) and (key not in _TIMES or info[key] < 1e11)):
            raise VitcliError(f"'{path}': \"{key}\" is {shown(info[key], 40)}, not {kind}")
    return info


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    """run.json, atomically."""
    import json

    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1))


def mark_running(run_dir: Path) -> dict[str, Any]:
    """run.json says "running" (this process's pid and host) from the moment the run folder is taken, before
    config.yaml, scanning and decoding, so `vitcli runs` never shows a starting run as interrupted. An unreadable
    run.json of a resumed run is started afresh. Returns what was written."""
    import socket

    try:
        info = read_run_info(run_dir)
    except VitcliError:
        info = {}
    info |= {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
             "started": info.get("started", time.time())}
    write_run_info(run_dir, info)
    return info
