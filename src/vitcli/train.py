"""`vitcli train`: the training engine with the run's tracking attached (run.json, TensorBoard / MLflow,
report.html at the end)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitcli.config import Config
    from vitcli.engine import Callback, TrainResult


def train(cfg: Config | None, data_dir: str | Path | None, resume: str | Path | None = None,
          epochs_override: int | None = None, stop_after_steps: int | None = None,
          callbacks: list[Callback] | None = None, time_override: str | None = None) -> TrainResult:
    """`engine.train` (same arguments) with the `Tracking` callback in front of `callbacks`."""
    from vitcli import engine
    from vitcli.loggers import Tracking

    return engine.train(cfg, data_dir, resume, epochs_override, stop_after_steps, [Tracking(), *(callbacks or [])],
                        time_override)
