"""Checkpoints: the one schema (`make_checkpoint`), saving, safe loading, and finding the model a command means.

A checkpoint is a dict of tensors and plain Python values:
  format, vitcli_version, model_spec, classes, preprocess, config, data_dir, epoch, step, metrics, model,
  calibration (temperature and conformal scores fitted on the validation split when training finished)
and, in last.pt, what resuming needs under train_state: optimizer, scaler, rng, aug_rng, progress, model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitcli import __version__
from vitcli.errors import VitcliError, first_line
from vitcli.files import atomic_write, safe_torch_load

FORMAT = "vitcli-checkpoint-v1"


def make_checkpoint(*, model_spec: dict[str, Any], classes: list[str], preprocess: dict[str, Any],
                    state_dict: dict[str, Any], config: dict[str, Any] | None = None, data_dir: str = "",
                    epoch: int = 0, step: int = 0, metrics: dict[str, float] | None = None,
                    train_state: dict[str, Any] | None = None,
                    calibration: dict[str, Any] | None = None, task: str = "single",
                    thresholds: list[float] | None = None) -> dict[str, Any]:
    """The one checkpoint schema: everything needed to rebuild, run and describe the model.

    Args:
        model_spec: the backend's plain description of the model (`vitcli.models.model_spec`).
        classes: class names in label order.
        preprocess: eval preprocessing (`vitcli.data.preprocess_info`).
        state_dict: the weights (EMA weights when the run keeps an average); copied to CPU.
        config: the resolved training config as a dict.
        data_dir: the dataset the model was trained on (absolute path).
        epoch: epochs finished; step: optimiser steps taken.
        metrics: the epoch's row of metrics.csv.
        train_state: what resuming needs (optimizer, scaler, rng, progress, raw weights); last.pt only.
        calibration: `vitcli.calibrate.fit_calibration` of these weights on the validation split.
        task: "single" (one label per image, softmax) or "multilabel" (a sigmoid per class).
        thresholds: multi-label only: per-class probability cut-offs tuned on the validation set.
    """
    ckpt = {"format": FORMAT, "vitcli_version": __version__, "model_spec": model_spec, "classes": list(classes),
            "preprocess": dict(preprocess), "config": config or {}, "data_dir": data_dir, "epoch": epoch,
            "step": step, "metrics": metrics or {}, "model": cpu_state(state_dict)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    if calibration is not None:
        ckpt["calibration"] = calibration
    if task != "single":
        ckpt["task"], ckpt["thresholds"] = task, [float(t) for t in thresholds or []]
    return ckpt


def cpu_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Detached CPU copies of a state dict's tensors."""
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a vitcli checkpoint."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise VitcliError(f"'{path}' is not a vitcli checkpoint (no '{FORMAT}' marker); for plain weights "
                          "use --set model.pretrained_file=PATH with vitcli train")
    return ckpt


def resolve_model_path(model: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """--model FILE | RUN_DIR (-> best.pt, else last.pt) | None (-> the newest run under runs/)."""
    if model:
        p = Path(model)
        if p.is_dir():
            for name in ("best.pt", "last.pt"):
                if (p / name).is_file():
                    return p / name
            raise VitcliError(f"--model '{p}': the folder holds no best.pt or last.pt")
        if not p.exists():
            raise VitcliError(f"--model '{p}' does not exist; give a checkpoint file or a run folder")
        return p
    root = Path(runs_dir)
    found = [c for c in root.glob("*/best.pt") if c.is_file()] if root.is_dir() else []
    if not found:
        raise VitcliError(f"no trained model found under '{root}/'; train one with 'vitcli train DATA' "
                          "or pass --model")
    return max(found, key=lambda c: c.stat().st_mtime)


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint"):
    """Rebuild the model a checkpoint describes and load its weights (EMA weights when present)."""
    from vitcli.models import model_from_spec

    model = model_from_spec(dict(ckpt["model_spec"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise VitcliError(f"'{path}': weights do not match the model it describes: "
                          f"{first_line(e)}") from None
    return model.eval()


def load_model(model: str | Path | None, runs_dir: str | Path = "runs"):
    """(model in eval mode, checkpoint dict, path) for --model as eval/predict/inspect take it."""
    path = resolve_model_path(model, runs_dir)
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path), ckpt, path
