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
from vitcli.files import atomic_write_text, ensure_dir, os_reason, refuse_inside, run_lock

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

    if not path.is_file():
        return None
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
        return {r[2] for r in rows[1:] if len(r) == 3}
    except (OSError, ValueError, csv.Error) as e:
        warn(f"'{path}' cannot be read ({type(e).__name__}); the file set is not compared")
        return None


def write_config(run_dir: Path, cfg: Config, data_dir: str | Path) -> None:
    """config.yaml, whose first line records the dataset (atomic: a kill must not leave half a config)."""
    from vitcli.config import to_yaml

    atomic_write_text(run_dir / "config.yaml",
                      f"# vitcli {__version__}; data: {Path(data_dir).resolve()}\n" + to_yaml(cfg))


def cfg_data_dir(run_dir: Path) -> str | None:
    """The dataset path recorded in the first line of config.yaml."""
    try:
        first = (run_dir / "config.yaml").read_text().splitlines()[0]
        return first.split("data: ", 1)[1] if "data: " in first else None
    except (OSError, IndexError, ValueError):  # ValueError: not UTF-8
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
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error) as e:  # not UTF-8, a short row, a word where a number belongs
        raise VitcliError(f"'{path}' is not a metrics.csv written by vitcli ({clip(str(e))})") from None
    if any(not set(METRIC_FIELDS) <= row.keys() for row in rows):
        raise VitcliError(f"'{path}' lacks columns of a vitcli metrics.csv ({', '.join(METRIC_FIELDS)})")
    return rows


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder file ({} when missing or not an object)."""
    import json

    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
