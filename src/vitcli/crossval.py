"""K-fold cross-validation: stratified, seeded folds of a dataset; one training run per fold under one parent
run folder (each resumable, so an interrupted cross-validation continues from the folds done); out-of-fold
probabilities for every image (`oof.csv`) and the mean and standard deviation of every metric over the folds.

Each fold is a label file (path, label, split) written into the parent run folder and trained on like any label
file; DATA is only read. A service shared by `vitcli cv` and `vitcli inspect data --label-errors`.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitcli.errors import VitcliError

STATE = "cv.json"  # the parent run folder's record: data, folds, seed, how the config was given, results
TrainFn = Callable[..., Any]  # vitcli.train.train: (cfg or None, data, resume=None) -> TrainResult; the command
# layer hands it in, so this service stays below the training command


@dataclass
class Pool:
    """The images cross-validation splits: train and val of DATA (a test split stays out)."""

    classes: list[str]
    paths: list[Path]
    labels: list  # class index per image, or a multi-hot tuple (multi-label)
    multilabel: bool


@dataclass
class OutOfFold:
    """Every pooled image's probabilities from the fold model that never saw it."""

    classes: list[str]
    paths: list[Path]
    labels: list  # as in Pool
    folds: list[int]  # 1-based fold that held the image out
    probs: np.ndarray  # (N, C)
    multilabel: bool

    @property
    def targets(self) -> np.ndarray:
        """Class indices (N,), or multi-hot (N, C)."""
        return np.asarray(self.labels, dtype=np.int64)


def pool_of(data: str | Path) -> Pool:
    from vitcli.sources import scan_dataset

    ds = scan_dataset(data, 0.0, 0)
    return Pool(ds.classes, ds.train.paths + ds.val.paths, ds.train.labels + ds.val.labels, ds.multilabel)


def make_folds(pool: Pool, k: int, seed: int) -> list[int]:
    """A fold (1..k) per image: within each stratum (the class; multi-label: the image's rarest class) the
    images are shuffled with `seed` and dealt out in turn, continuing where the last stratum stopped, so every
    fold gets each class's share and the fold sizes differ by at most one."""
    if k < 2:
        raise VitcliError(f"--folds {k}: cross-validation needs at least 2 folds")
    if pool.multilabel:
        freq = np.asarray(pool.labels).sum(0)  # (C,) images per class
        keys = [min((c for c, v in enumerate(y) if v), key=lambda c: freq[c], default=-1) for y in pool.labels]
    else:
        keys = list(pool.labels)
        counts = np.bincount(keys, minlength=len(pool.classes))
        small = [f"{pool.classes[c]} ({n})" for c, n in enumerate(counts) if n < k]
        if small:
            raise VitcliError(f"--folds {k}: every class needs at least {k} images, and {', '.join(small[:5])} "
                              "has fewer; lower --folds")
    if len(keys) < k:
        raise VitcliError(f"--folds {k}: the data has only {len(keys)} images")
    rng = random.Random(seed)
    fold = [0] * len(keys)
    at = 0
    for key in sorted(set(keys)):
        idx = [i for i, s in enumerate(keys) if s == key]
        rng.shuffle(idx)
        for n, i in enumerate(idx):
            fold[i] = (at + n) % k + 1
        at += len(idx)
    return fold


def write_fold_file(path: Path, pool: Pool, folds: list[int], k: int) -> None:
    """A label file for fold k: every pooled image, split 'val' when fold k holds it out, else 'train'."""
    from vitcli.dataset import label_text
    from vitcli.files import write_csv

    write_csv(path, ["path", "label", "split"], [[str(Path(p).resolve()), label_text(pool.classes, y),
                                                  "val" if f == k else "train"]
                                                 for p, y, f in zip(pool.paths, pool.labels, folds, strict=True)])


def fold_probs(run_dir: Path, pool: Pool, folds: list[int], k: int, device: str, precision: str,
               batch_size: int = 64) -> tuple[list[int], np.ndarray]:
    """(pool indices, calibrated probabilities (n, C)) of fold k's last.pt on the images fold k held out: the
    weights of the last epoch, not best.pt, which was chosen on these very images (an optimistic estimate)."""
    from vitcli.dataset import Split
    from vitcli.evaluation import collect_logits
    from vitcli.inference import TorchPredictor

    held = [i for i, f in enumerate(folds) if f == k]
    pred = TorchPredictor(run_dir / "last.pt", device, precision)
    pred.set_tta(False)  # the folds' scores: one view, as training validated
    logits, _, paths, _ = collect_logits(pred, Split([pool.paths[i] for i in held], [pool.labels[i] for i in held]),
                                         batch_size)
    if logits is None:
        return [], np.zeros((0, len(pool.classes)))
    probs = pred.task.probs(logits)  # (n, C) calibrated
    index = {str(pool.paths[i]): i for i in held}
    return [index[str(p)] for p in paths], probs.numpy()


def fold_metrics(probs: np.ndarray, labels: list, classes: list[str], multilabel: bool) -> dict[str, float]:
    """Every scalar metric `vitcli eval` reports (macro / weighted averages as macro_f1, ...)."""
    if multilabel:
        from vitcli.metrics import label_vector_metrics

        m = label_vector_metrics(probs, np.asarray(labels, dtype=np.float64), classes)
    else:
        from vitcli.evaluation import compute_metrics

        m = compute_metrics(probs, np.asarray(labels), classes)
    flat = {k: float(v) for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "images"}
    for avg in ("macro", "weighted"):
        if isinstance(m.get(avg), dict):
            flat |= {f"{avg}_{k}": float(v) for k, v in m[avg].items() if k != "support"}
    return flat


def summarize(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """metric -> mean and sample standard deviation over the folds."""
    out = {}
    for key in per_fold[0]:
        v = np.asarray([m[key] for m in per_fold if key in m], dtype=np.float64)
        out[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return out


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class CvSpec:
    """How a cross-validation was asked for (kept in cv.json, so a resumed one rebuilds the same config)."""

    data: str
    folds: int
    config: str | None = None  # --config file
    sets: list[str] | None = None  # --set overrides
    flags: dict[str, Any] | None = None  # the train flags given (model.name, train.epochs, ...)
    time_s: float = 0.0  # budget for all folds together, seconds (0: none)

    @classmethod
    def given(cls, data: str | Path, folds: int, config: str | Path | None, sets: list[str] | None,
              flags: dict[str, Any] | None) -> CvSpec:
        """From command-line values; `train.time` among the flags is the budget for all folds together. The
        config is checked here, before any folder is made."""
        from vitcli.config import parse_duration

        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        seconds = parse_duration(flags.pop("train.time"), "--time") if "train.time" in flags else 0.0
        spec = cls(str(data), folds, str(config) if config else None, list(sets or []), flags, seconds)
        spec.load_config()
        return spec

    def load_config(self):
        from vitcli.config import load_config

        return load_config(self.config, self.sets, self.flags)


def start_cv(spec: CvSpec) -> Path:
    """A new parent run folder (train.output / train.name, default name 'cv') with its cv.json."""
    from vitcli.config import user_keys
    from vitcli.files import atomic_write_text, refuse_inside
    from vitcli.rundir import new_run_dir

    cfg = spec.load_config()
    refuse_inside(cfg.train.output, spec.data, "--output" if "train.output" in user_keys(cfg) else "default")
    parent = new_run_dir(cfg.train.output, cfg.train.name if "train.name" in user_keys(cfg) else "cv")
    state = {"spec": spec.__dict__ | {"data": str(Path(spec.data).resolve())}, "seed": cfg.train.seed,
             "spent_s": {}, "started": time.time()}
    atomic_write_text(parent / STATE, json.dumps(state, indent=1))
    return parent


def read_state(parent: Path) -> dict[str, Any]:
    path = parent / STATE
    try:
        state = json.loads(path.read_text())
        state["spec"] = CvSpec(**state["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        raise VitcliError(f"--resume '{parent}': not a cross-validation run folder (no readable {STATE})") from None
    return state


def run_folds(parent: Path, train: TrainFn) -> OutOfFold:
    """Train (or resume) every fold not finished yet, then gather the out-of-fold probabilities."""
    from vitcli.console import info

    state = read_state(parent)
    spec, seed = state["spec"], state["seed"]
    pool = pool_of(spec.data)
    folds = make_folds(pool, spec.folds, seed)
    probs = np.full((len(pool.paths), len(pool.classes)), np.nan)
    for k in range(1, spec.folds + 1):
        info(f"[bold]fold {k}/{spec.folds}[/]: {folds.count(k)} held-out images")
        idx, p = fold_oof(parent, state, pool, folds, k, train)
        probs[idx] = p
    seen = ~np.isnan(probs).any(1)
    keep = np.nonzero(seen)[0].tolist()
    return OutOfFold(pool.classes, [pool.paths[i] for i in keep], [pool.labels[i] for i in keep],
                     [folds[i] for i in keep], probs[seen], pool.multilabel)


def fold_oof(parent: Path, state: dict[str, Any], pool: Pool, folds: list[int], k: int, train: TrainFn
             ) -> tuple[list[int], Any]:
    """Fold k's out-of-fold probabilities: read from fold<k>/oof.npz when done, else train (or resume) it."""
    import shutil

    from vitcli.files import atomic_write, atomic_write_text
    from vitcli.rundir import read_json

    spec = state["spec"]
    fold_dir, done = parent / f"fold{k}", parent / f"fold{k}" / "oof.npz"
    if done.is_file():
        with np.load(done) as z:
            return z["index"].tolist(), z["probs"]
    fold_file = parent / "folds" / f"fold{k}.csv"
    fold_file.parent.mkdir(exist_ok=True)
    write_fold_file(fold_file, pool, folds, k)
    cfg = spec.load_config()
    t0 = time.time()
    if spec.time_s:  # what is left of the budget, shared by the folds still to run
        left = spec.time_s - sum(state["spent_s"].values())
        cfg.train.time = f"{max(1, int(left / (spec.folds - k + 1)))}s"
    if read_json(fold_dir / "run.json").get("status") == "finished" and (fold_dir / "last.pt").is_file():
        pass  # trained; stopped while predicting its held-out images
    elif (fold_dir / "last.pt").is_file():
        train(None, fold_file, resume=fold_dir)
    else:
        if fold_dir.exists():  # killed before its first checkpoint: nothing to keep
            shutil.rmtree(fold_dir)
        cfg.train.output, cfg.train.name = str(parent), f"fold{k}"
        train(cfg, fold_file)
    index, probs = fold_probs(fold_dir, pool, folds, k, cfg.train.device, cfg.train.precision)
    atomic_write(done, lambda f: np.savez(f, index=np.asarray(index, dtype=np.int64), probs=probs))
    state["spent_s"][str(k)] = state["spent_s"].get(str(k), 0.0) + time.time() - t0
    atomic_write_text(parent / STATE, json.dumps(state | {"spec": spec.__dict__}, indent=1))
    return index, probs


def write_oof(path: Path, oof: OutOfFold) -> None:
    """oof.csv: path, label, fold and one probability column per class (p_<class>)."""
    from vitcli.dataset import label_text
    from vitcli.files import write_csv

    write_csv(path, ["path", "label", "fold", *(f"p_{c}" for c in oof.classes)],
              [[str(p), label_text(oof.classes, y), f, *(f"{v:.6g}" for v in row)]
               for p, y, f, row in zip(oof.paths, oof.labels, oof.folds, oof.probs.tolist(), strict=True)])


def read_oof(parent: Path) -> OutOfFold:
    """A finished cross-validation's out-of-fold probabilities (its oof.csv)."""
    path = parent / "oof.csv" if parent.is_dir() else parent
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        classes = [c[2:] for c in rows[0] if c.startswith("p_")]
        probs = np.asarray([[float(r[f"p_{c}"]) for c in classes] for r in rows])  # (N, C)
        names = [tuple(t for t in r["label"].split("|") if t) for r in rows]
    except (OSError, ValueError, KeyError, IndexError, csv.Error):
        raise VitcliError(f"--from '{parent}': no readable oof.csv of a finished `vitcli cv` run") from None
    multilabel = any(len(n) != 1 for n in names)
    index = {c: i for i, c in enumerate(classes)}
    labels = [tuple(int(c in n) for c in classes) if multilabel else index[n[0]] for n in names]
    return OutOfFold(classes, [Path(r["path"]) for r in rows], labels, [int(r["fold"]) for r in rows], probs,
                     multilabel)


def cross_validate(parent: Path, train: TrainFn) -> dict[str, Any]:
    """Run (or continue) the cross-validation in `parent`; write oof.csv and the results into cv.json."""
    from vitcli.files import atomic_write_text

    oof = run_folds(parent, train)
    write_oof(parent / "oof.csv", oof)
    spec = read_state(parent)["spec"]
    per_fold = []
    for k in range(1, spec.folds + 1):
        sel = [i for i, f in enumerate(oof.folds) if f == k]
        per_fold.append(fold_metrics(oof.probs[sel], [oof.labels[i] for i in sel], oof.classes, oof.multilabel))
    result = {"run": str(parent), "data": spec.data, "folds": spec.folds, "images": len(oof.paths),
              "task": "multilabel" if oof.multilabel else "single-label", "per_fold": per_fold,
              "summary": summarize(per_fold),
              "pooled": fold_metrics(oof.probs, oof.labels, oof.classes, oof.multilabel),
              "oof": str(parent / "oof.csv")}
    state = read_state(parent)
    atomic_write_text(parent / STATE, json.dumps(state | {"spec": state["spec"].__dict__, "result": result},
                                                 indent=1))
    return result
