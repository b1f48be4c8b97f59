"""Checkpoints: atomic writes, safe loading (weights_only=True, never a pickle fallback), self-describing metadata.

A checkpoint is a dict of tensors and plain Python values:
  format, vitcli_version, model_spec, classes, preprocess, config, epoch, step, metrics, model (state dict)
and, in last.pt, what resuming needs: optimizer, scaler, ema, rng, progress.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError

FORMAT = "vitcli-checkpoint-v1"


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temp file in the same folder, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(ckpt, f))


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; anything that needs arbitrary code is refused with a clear message."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise VitcliError(f"checkpoint '{p}' does not exist")
    # The environment variable would silently turn weights_only off: refuse to honour it here.
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notice: the error says it all
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wants = re.search(r"GLOBAL ([\w.]+)", str(e))  # the weights-only unpickler met an import of code
        if wants:
            raise VitcliError(f"'{p}' is not a plain weights file: loading it would import {wants[1]}, which "
                              "vitcli refuses (weights_only=True); nothing from the file was run") from None
        raise VitcliError(f"'{p}' is not a readable checkpoint (not written by torch.save, or damaged)") from None
    except Exception as e:  # zip, EOF, storage errors of a truncated or foreign file
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if p.stat().st_size == 0:
            first = "the file is empty"
        raise VitcliError(f"'{p}' is not a readable checkpoint (truncated or not made by torch): {first}") from None


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
                          f"{str(e).splitlines()[0]}") from None
    return model.eval()


def load_model(model: str | Path | None, runs_dir: str | Path = "runs"):
    """(model in eval mode, checkpoint dict, path) for --model as eval/predict/inspect take it."""
    path = resolve_model_path(model, runs_dir)
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path), ckpt, path
