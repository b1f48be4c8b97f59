"""Files vitcli writes and reads: atomic writes (bytes and text) and the safe torch loader.

Every file of a run (checkpoints, config.yaml, metrics.csv, figures) is written to a temp file in the same
folder, fsynced and renamed onto its name, so a kill at any moment leaves the old file or the new one,
never half of one. Torch files are only ever loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vitcli.errors import VitcliError


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
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


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_write for a string (UTF-8)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


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
