"""Files vitcli writes and reads: atomic writes, outputs the user names, output folders, the run-folder lock,
and the safe torch loader.

Every file of a run (checkpoints, config.yaml, metrics.csv, figures) is written to a temp file in the same
folder, fsynced and renamed onto its name, so a kill at any moment leaves the old file or the new one,
never half of one. A file the user names (`predict -o`, `eval --json`, `export -o`) is written *through* what
is there instead: a device or FIFO gets the bytes, a symlink keeps pointing where it did and its target gets
the new content. Every OS error becomes one VitcliError line naming the path and the reason. Torch files are
only ever loaded with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vitcli.errors import VitcliError, first_line

LOCK_NAME = ".vitcli.lock"  # in a run folder while a process trains in it; holds that process's PID
MAX_RUN_FILE_BYTES = 64 << 20  # a run folder's JSON / YAML / CSV file larger than this is not one vitcli wrote


def os_reason(e: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: /x/.last.pt.tmp'."""
    return e.strerror or type(e).__name__


def read_text(path: str | Path, limit: int = MAX_RUN_FILE_BYTES) -> str | None:
    """The UTF-8 text of a regular file (None when there is none), for every JSON / YAML / CSV file read from a
    run folder. Opened non-blocking and checked on the open descriptor, so a FIFO, device or folder put in its
    place is a one-line error naming it, never a hang; so are a file over `limit` bytes and bytes not UTF-8."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VitcliError(f"'{p}' cannot be read: {os_reason(e)}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VitcliError(f"'{p}' is not a regular file (a folder, FIFO or device); vitcli reads only files")
        if st.st_size > limit:
            raise VitcliError(f"'{p}' is {st.st_size:,} bytes; vitcli writes such a file under {limit:,}")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise VitcliError(f"'{p}' cannot be read: {os_reason(e)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VitcliError(f"'{p}' is not UTF-8 text (byte {e.start}); it is not a file vitcli wrote") from None


def write_output(path: str | Path, data: bytes, flag: str = "--output") -> Path:
    """Write `data` to a file the user named; returns the path written (a symlink's target)."""
    p = Path(path)
    try:
        st = p.stat()  # follows a symlink: what the bytes will land in
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise VitcliError(f"{flag} '{p}': cannot write there: {os_reason(e)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise VitcliError(f"{flag} '{p}' is a folder; give a file name")
    real = Path(os.path.realpath(p))
    through = st is not None and (not stat.S_ISREG(st.st_mode) or _via_dev_or_proc(p))
    try:
        if through:  # a device, FIFO, socket or /dev/stdout-like link: never replace it with a file
            _write_through(p, data, regular=stat.S_ISREG(st.st_mode))
        else:  # a regular file, new or existing, or a symlink to one: replace the target, keep the link
            _atomic_write(real, lambda f: f.write(data))
    except OSError as e:
        raise VitcliError(f"{flag} '{p}': cannot write there: {os_reason(e)}") from None
    return real


def regular_target(path: str | Path, flag: str = "--output") -> Path:
    """Where to write a file the user named that must be a regular file (it is read back): the target of a
    symlink (so the link is kept), with its folder created; a folder, device or FIFO is an error."""
    p = Path(path)
    if p.is_dir():
        raise VitcliError(f"{flag} '{p}' is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise VitcliError(f"{flag} '{p}' is not a regular file; this output is read back to check it")
    real = Path(os.path.realpath(p))
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitcliError(f"{flag} '{p}': cannot create its folder: {os_reason(e)}") from None
    return real


def _via_dev_or_proc(p: Path) -> bool:
    """True when `p` is, or links through, a path under /dev or /proc (/dev/stdout redirected to a file)."""
    q = Path(os.path.abspath(p))
    for _ in range(40):  # the kernel's own limit on a chain of links
        if q.parts[1:2] in (("dev",), ("proc",)):
            return True
        if not q.is_symlink():
            return False
        q = Path(os.path.normpath(q.parent / os.readlink(q)))
    return False


def _write_through(p: Path, data: bytes, regular: bool) -> None:
    import fcntl

    # O_NONBLOCK: a FIFO nobody reads fails at once (ENXIO) instead of hanging; cleared before writing.
    fd = os.open(p, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | (os.O_APPEND if regular else 0))
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def ensure_dir(path: str | Path, flag: str = "--output") -> Path:
    """Create an output folder (and its parents) or say in one line why it cannot be."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise VitcliError(f"{flag} '{p}' is a file; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitcliError(f"{flag} '{p}': cannot create the folder: {os_reason(e)}") from None
    return p


def refuse_inside(out_dir: str | Path, data_dir: str | Path | None, flag: str) -> None:
    """The dataset is never written to: an output folder inside DATA is an error that says what to do."""
    if data_dir is None:
        return
    out, data = Path(os.path.realpath(out_dir)), Path(os.path.realpath(data_dir))
    if out == data or data in out.parents:
        hint = ("run vitcli from outside the dataset folder or give --output DIR" if flag == "default"
                else "give a folder outside the dataset")
        what = f"the default output folder '{out_dir}'" if flag == "default" else f"{flag} '{out_dir}'"
        raise VitcliError(f"{what} is inside the dataset '{data_dir}', and vitcli never writes into a dataset; "
                          f"{hint}")


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold an exclusive lock on a run folder while training in it; a second process gets an error naming
    the PID that holds it. The lock (fcntl.flock) goes with the process, also on kill -9 (which leaves the
    file behind, unlocked: the next run takes it)."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise VitcliError(f"run folder '{run_dir}': cannot create {LOCK_NAME}: {os_reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:  # the holder removed it as we opened it: still busy
            raise BlockingIOError
    except OSError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise VitcliError(f"run folder '{run_dir}' is in use by another vitcli process (PID {pid}); wait for "
                          "it to finish or stop it, then resume") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter that opened it sees another inode
        os.close(fd)  # releases the lock


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call write(file_object) on a temp file in the same folder, fsync, then os.replace onto `path`; an OS
    error (disk full, read-only, no such folder) is one line, and the previous file stays as it was."""
    try:
        _atomic_write(Path(path), write)
    except OSError as e:
        kept = " (the previous file is kept)" if Path(path).is_file() else ""
        raise VitcliError(f"cannot write '{path}': {os_reason(e)}{kept}") from None
    except RuntimeError as e:  # torch.save reports a failed write of its zip stream this way
        if "write" not in str(e).lower():
            raise
        kept = " (the previous file is kept)" if Path(path).is_file() else ""
        raise VitcliError(f"cannot write '{path}': {first_line(e)[:200]}{kept}") from None


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
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
        raise VitcliError(f"checkpoint '{p}' " + ("is not a regular file" if p.exists() else "does not exist"))
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
        first = first_line(e).split(". ")[0]
        if p.stat().st_size == 0:
            first = "the file is empty"
        raise VitcliError(f"'{p}' is not a readable checkpoint (truncated or not made by torch): {first}") from None
