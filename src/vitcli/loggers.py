"""Where a training run's numbers go: metrics.csv and run.json always, TensorBoard and MLflow on request.

The engine calls one `Loggers` object at the phase boundaries: `start` when the run folder exists, `step` after
each optimiser step (forwarded every `train.log_every_steps`), `epoch` after validation, `end` with the final
figures. Only rank 0 logs under torchrun. TensorBoard and MLflow are the optional extra `vitcli[track]`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
TB_TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
           "lr": "lr/epoch", "seconds": "time/epoch_seconds", "images_per_s": "time/images_per_s"}


class Logger:
    """One sink. Every hook is optional; `meta` holds the command, data folder and class counts."""

    def on_start(self, cfg, run_dir: Path, meta: dict[str, Any]) -> None: ...

    def on_step(self, step: int, loss: float, lr: float) -> None: ...

    def on_epoch(self, row: dict[str, float]) -> None: ...

    def on_end(self, run_dir: Path, figures: dict[str, Path], status: str) -> None: ...


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.csv, one row per epoch, written atomically."""
    from vitcli.checkpoint import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_FIELDS})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv back as numbers ([] when missing)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


class CsvLogger(Logger):
    """metrics.csv in the run folder (the rows of a resumed run's earlier epochs are kept)."""

    def __init__(self, history: list[dict]):
        self.rows = list(history)

    def on_start(self, cfg, run_dir, meta):
        self.path = run_dir / "metrics.csv"

    def on_epoch(self, row):
        self.rows.append(dict(row))
        write_metrics(self.path, self.rows)


class RunInfoLogger(Logger):
    """run.json: command, data summary, status (running / finished / interrupted), pid and host while running,
    start time and wall time summed over resumed sessions; `vitcli runs` reads it."""

    def on_start(self, cfg, run_dir, meta):
        self.path, self.t0 = run_dir / "run.json", time.time()
        self.info = read_run_info(run_dir)
        self.before = float(self.info.get("wall_s", 0.0))  # earlier sessions of a resumed run
        self.info |= meta | {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                             "started": self.info.get("started", time.time()), "model": cfg.model.name,
                             "epochs": cfg.train.epochs}
        self._write()

    def on_epoch(self, row):
        self.info["wall_s"] = self.before + time.time() - self.t0
        self._write()

    def on_end(self, run_dir, figures, status):
        self.info |= {"status": status, "ended": time.time(), "wall_s": self.before + time.time() - self.t0}
        self._write()

    def _write(self) -> None:
        from vitcli.checkpoint import atomic_write

        text = json.dumps(self.info, indent=1)
        atomic_write(self.path, lambda f: f.write(text.encode()))


def read_run_info(run_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((run_dir / "run.json").read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _need(module: str, sink: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise VitcliError(f"train.log: {sink} needs the '{module.split('.')[0]}' package: "
                          "pip install 'vitcli[track]'") from None


class TensorBoardLogger(Logger):
    """Event files in the run folder (so `tensorboard --logdir runs` shows each run by name): scalars per
    epoch, loss and lr per step, config as text, and the final figures as images."""

    def on_start(self, cfg, run_dir, meta):
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        from vitcli.config import to_yaml

        self.w = SummaryWriter(log_dir=str(run_dir))
        self.w.add_text("config", "    " + to_yaml(cfg).replace("\n", "\n    "), 0)

    def on_step(self, step, loss, lr):
        self.w.add_scalar("step/loss", loss, step)
        self.w.add_scalar("step/lr", lr, step)

    def on_epoch(self, row):
        for k, tag in TB_TAGS.items():
            self.w.add_scalar(tag, row[k], int(row["epoch"]))
        self.w.flush()

    def on_end(self, run_dir, figures, status):
        import numpy as np
        from PIL import Image

        for name, path in figures.items():
            with Image.open(path) as im:
                self.w.add_image(f"figures/{name}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")
        self.w.close()


class MlflowLogger(Logger):
    """An MLflow run at MLFLOW_TRACKING_URI, else the file store ./mlruns: params = the resolved config,
    metrics per epoch (and per step), artefacts = the run folder at the end. A resumed run continues the
    same MLflow run (its id is kept in the run folder's mlflow.json)."""

    def on_start(self, cfg, run_dir, meta):
        _need("mlflow", "mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from vitcli.config import to_dict

        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks to opt in to ./mlruns
            uri = Path("mlruns").resolve().as_uri()
        self.client, self.id_file = MlflowClient(tracking_uri=uri), run_dir / "mlflow.json"
        known = read_json(self.id_file)
        if known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vitcli")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        params = [Param(f"{s}.{k}", str(v)) for s, sec in to_dict(cfg).items() for k, v in sec.items()]
        params.append(Param("data", str(meta.get("data_dir", ""))))
        self.client.log_batch(self.run_id, params=params)
        self.id_file.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def on_step(self, step, loss, lr):
        self._log({"step_loss": loss, "step_lr": lr}, step)

    def on_epoch(self, row):
        self._log({k: row[k] for k in METRIC_FIELDS if k != "epoch"}, int(row["epoch"]))

    def on_end(self, run_dir, figures, status):
        self.client.log_artifacts(self.run_id, str(run_dir))
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "KILLED")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


SINKS = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}


class Loggers:
    """All sinks of one run, called by the engine; every hook fans out in order."""

    def __init__(self, items: list[Logger], every: int):
        self.items, self.every = items, every

    def start(self, cfg, run_dir: Path, meta: dict[str, Any]) -> None:
        for lg in self.items:
            lg.on_start(cfg, run_dir, meta)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.every and step % self.every == 0:
            for lg in self.items:
                lg.on_step(step, loss, lr)

    def epoch(self, row: dict[str, float]) -> None:
        for lg in self.items:
            lg.on_epoch(row)

    def end(self, run_dir: Path, figures: dict[str, Path], status: str = "finished") -> None:
        for lg in self.items:
            lg.on_end(run_dir, figures, status)


def make_loggers(cfg, history: list[dict], main: bool) -> Loggers:
    """The sinks `train.log` asks for (csv and run.json always); none on ranks other than 0. Missing optional
    packages fail here, before any training."""
    if not main:
        return Loggers([], 0)
    items: list[Logger] = [CsvLogger(history), RunInfoLogger()]
    for name in dict.fromkeys(cfg.train.log):
        if name in SINKS:
            _need(name, name)
            items.append(SINKS[name]())
    return Loggers(items, cfg.train.log_every_steps)
