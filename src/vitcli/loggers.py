"""Where a training run's numbers go besides metrics.csv: run.json always, TensorBoard and MLflow on request
(`train.log`), and report.html at the end (`train.report`).

`Tracking` is one engine callback (on_start / on_log / on_epoch / on_end / on_stop, called on rank 0 only) that
fans out to small `Logger` sinks with the interface on_start(cfg, run_dir, meta), on_step(step, loss, lr),
on_epoch(row), on_end(run_dir, figures, status). TensorBoard and MLflow are the optional extra `vitcli[track]`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, first_line

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # train.log entry -> the package it needs
METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
TB_TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
           "lr": "lr/epoch", "seconds": "time/epoch_seconds", "images_per_s": "time/images_per_s"}


CONNECT_TIMEOUT_S = 3.0  # an MLflow server must accept a connection within this, checked before any work


def check_installed(log: list[str]) -> None:
    """Fail before any work when a tracker in `train.log` is not installed (find_spec imports nothing), or
    when MLFLOW_TRACKING_URI names a server nothing answers at (MLflow itself retries for minutes)."""
    for name in log:
        package = TRACKERS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise VitcliError(f"train.log: {name} needs the '{package}' package: pip install 'vitcli[track]'")
    if "mlflow" in log:
        check_server(os.environ.get("MLFLOW_TRACKING_URI", ""))


def check_server(uri: str) -> None:
    """One TCP connection to an http(s) tracking URI, with a short timeout; a refusal is one line."""
    from urllib.parse import urlsplit

    from vitcli.files import os_reason

    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a port that is not a number or out of range
        raise VitcliError(f"MLFLOW_TRACKING_URI '{uri}': {e}") from None
    if parts.scheme not in ("http", "https") or not host:
        return  # a file store or a database: MLflow opens it itself
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else os_reason(e)
        raise VitcliError(f"MLFLOW_TRACKING_URI '{uri}': cannot connect to {host}:{port} ({why}; timeout "
                          f"{CONNECT_TIMEOUT_S:g} s); start the server, or unset the variable to log to ./mlruns"
                          ) from None


class Logger:
    """One sink; every hook is optional. `meta` holds the command, data folder and class counts."""

    def on_start(self, cfg, run_dir: Path, meta: dict[str, Any]) -> None: ...

    def on_step(self, step: int, loss: float, lr: float) -> None: ...

    def on_epoch(self, row: dict[str, float]) -> None: ...

    def on_end(self, run_dir: Path, figures: dict[str, Path], status: str) -> None: ...


class RunInfoLogger(Logger):
    """run.json: command, data summary, status (running / finished / interrupted) with pid and host, start
    time and wall time summed over resumed sessions. `vitcli runs` reads it."""

    def on_start(self, cfg, run_dir, meta):
        from vitcli.rundir import mark_running

        self.run_dir, self.t0 = run_dir, time.time()
        self.info = mark_running(run_dir)
        self.before = float(self.info.get("wall_s", 0.0))  # earlier sessions of a resumed run
        self.info |= meta | {"model": cfg.model.name, "epochs": cfg.train.epochs}
        self._write()

    def on_epoch(self, row):
        self.info["wall_s"] = self.before + time.time() - self.t0
        self._write()

    def on_end(self, run_dir, figures, status):
        self.info |= {"status": status, "ended": time.time(), "wall_s": self.before + time.time() - self.t0}
        self._write()

    def _write(self) -> None:
        from vitcli.rundir import write_run_info

        write_run_info(self.run_dir, self.info)


class TensorBoardLogger(Logger):
    """Event files in the run folder (so `tensorboard --logdir runs` lists runs by name): scalars per epoch,
    loss and lr every `train.log_every_steps`, the config as text, and the final figures as images."""

    def on_start(self, cfg, run_dir, meta):
        from torch.utils.tensorboard import SummaryWriter

        from vitcli.config import to_yaml

        self.w = SummaryWriter(log_dir=str(run_dir))
        self.w.add_text("config", "    " + to_yaml(cfg).replace("\n", "\n    "), 0)  # markdown code block

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
            if Path(path).suffix == ".png":
                with Image.open(path) as im:
                    self.w.add_image(f"figures/{name}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")
        self.w.close()


class MlflowLogger(Logger):
    """An MLflow run at MLFLOW_TRACKING_URI, else in the file store ./mlruns: params = the resolved config,
    metrics per epoch (and per step), artefacts = the run folder at the end. A resumed run continues its MLflow
    run (the id is kept in the run folder's mlflow.json)."""

    def on_start(self, cfg, run_dir, meta):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from vitcli.config import to_dict
        from vitcli.rundir import read_json

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks to opt in to ./mlruns
            uri = Path("mlruns").resolve().as_uri()
        try:
            self.client, id_file = MlflowClient(tracking_uri=uri), run_dir / "mlflow.json"
            known = read_json(id_file)
            if known.get("tracking_uri") == uri:
                self.run_id = known["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vitcli")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        except Exception as e:  # a bad URI, a server that does not answer
            first = first_line(e)
            raise VitcliError(f"mlflow at '{uri}': {first}") from None
        params = [Param(f"{s}.{k}", str(v)) for s, sec in to_dict(cfg).items() for k, v in sec.items()]
        self.client.log_batch(self.run_id, params=[*params, Param("data", str(meta["data_dir"]))])
        id_file.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def on_step(self, step, loss, lr):
        self._log({"step_loss": loss, "step_lr": lr}, step)

    def on_epoch(self, row):
        self._log({k: row[k] for k in METRICS}, int(row["epoch"]))

    def on_end(self, run_dir, figures, status):
        self.client.log_artifacts(self.run_id, str(run_dir))
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "KILLED")


SINKS = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}


class Tracking:
    """The engine callback (rank 0 only): run.json, the trackers `train.log` names, and at the end report.html
    (`train.report`) whose figures the trackers also receive."""

    def __init__(self):
        self.sinks: list[Logger] = []
        self.window = (0.0, 0.0, 0)  # (loss sum, images, step) at the last step log

    def on_open(self, cfg) -> None:
        check_installed(cfg.train.log)  # before any data work

    def on_start(self, run, data) -> None:
        from vitcli.console import command_line

        cfg = run.cfg
        check_installed(cfg.train.log)
        self.sinks = [RunInfoLogger(), *(SINKS[n]() for n in dict.fromkeys(cfg.train.log) if n in SINKS)]
        meta = {"command": command_line(), "data_dir": str(Path(data.data_dir).resolve()),
                "classes": list(data.classes), "train_counts": list(data.counts),
                "val_counts": list(data.val_counts)}
        for s in self.sinks:
            s.on_start(cfg, run.run_dir, meta)

    def on_log(self, run, stats: dict[str, float]) -> None:
        """Mean training loss over the images since the previous step log (the epoch's sums are running)."""
        every, step = run.cfg.train.log_every_steps, int(stats["step"])
        loss, count = run.progress.partial["loss"], run.progress.partial["count"]
        last_loss, last_count, last_step = self.window
        if count < last_count:  # a new epoch restarted the sums
            last_loss, last_count = 0.0, 0.0
        if not every or step // every == last_step // every or count == last_count:
            return  # log once each time the step count passes a multiple of `every`
        self.window = (loss, count, step)
        for s in self.sinks:
            s.on_step(step, (loss - last_loss) / (count - last_count), stats["lr"])

    def on_epoch(self, run, row: dict[str, float]) -> None:
        for s in self.sinks:
            s.on_epoch(row)

    def on_end(self, run, result) -> None:
        curves = run.run_dir / "curves.png"
        figures: dict[str, Path] = {"curves": curves} if curves.is_file() else {}
        if run.cfg.train.report and result.history:
            from vitcli.console import esc, info, warn
            from vitcli.html_report import run_report

            try:
                figures = run_report(run.run_dir, str(run.env.device), run.env.precision, again=True)
                info(f"[bold]report[/] {esc(str(figures['report']))}")
            except VitcliError as e:  # the run itself succeeded; say why there is no page
                warn(f"report.html not written: {e}")
        for s in self.sinks:
            s.on_end(run.run_dir, figures, "finished")

    def on_stop(self, run) -> None:
        """The run ended early (a signal, an error): mark it interrupted; last.pt holds what was saved. A sink
        that fails now (a tracking server gone) must not hide why the run stopped."""
        for s in self.sinks:
            try:
                s.on_end(run.run_dir, {}, "interrupted")
            except Exception as e:
                from vitcli.console import warn

                first = first_line(e)
                warn(f"{type(s).__name__} could not record the stop: {first}")
        self.sinks = []
