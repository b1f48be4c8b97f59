"""Class-folder datasets: scanning folders of class subfolders (or train/ + val/ + test/) into listed splits.

Only regular image files count; links inside the dataset (aliases), run folders vitcli wrote, FIFOs and
devices are skipped with one line each. `FolderSource` is this module's entry in the source table (sources.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from vitcli.dataset import Dataset, Split, stratified_split
from vitcli.decode import IMAGE_EXTS, BadImage, check_regular
from vitcli.errors import VitcliError, shown
from vitcli.store import ListedSource


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def is_run_folder(folder: str | Path) -> bool:
    """A folder vitcli wrote (train run, lr finder, eval figures): never data, even inside DATA."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return False
    return (("config.yaml" in names and bool(names & {"metrics.csv", "last.pt", "best.pt"}))
            or "lr_find.csv" in names or {"confusion.png", "reliability.png"} <= names)


def _holds_runs(folder: Path) -> bool:
    """`folder` is a run folder, or an output folder of run folders (runs/ with train/, train-2/ ...: run
    folders and no images of its own)."""
    if is_run_folder(folder):
        return True
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if any(Path(e.name).suffix.lower() in IMAGE_EXTS for e in entries):  # names only: no stat per file
        return False
    return any(_is_dir(e) and is_run_folder(e.path) for e in entries)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # the type from the folder listing; a stat only for a symlink
    except OSError:  # a symlink loop
        return False


def _inside(path: str, root: str) -> bool:
    """Resolved `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)



class ScanLog:
    """What a folder scan skipped and why: one warning line each (the first MAX_LINES), and each real file
    (symlinks resolved) counted once across the whole scan."""

    MAX_LINES = 10

    def __init__(self, root: str | Path | None = None):
        self.root = os.path.realpath(root) if root is not None else None
        self.files: dict[str, Path] = {}  # resolved path -> the path it was counted under
        self.count = 0

    def skip(self, msg: str) -> None:
        from vitcli.console import warn

        self.count += 1
        if self.count <= self.MAX_LINES:
            warn(f"skipped {msg}")

    def finish(self) -> None:
        from vitcli.console import warn

        if self.count > self.MAX_LINES:
            warn(f"skipped {self.count - self.MAX_LINES} more entries (files that are not images, links and "
                 f"aliases), {self.count} in all")
            self.count = 0

    def alias(self, link: str) -> bool:
        """True when the symlink `link` points inside the dataset: an alias of data that is read anyway."""
        return self.root is not None and _inside(os.path.realpath(link), self.root)


def list_images(folder: Path, log: ScanLog | None = None) -> list[Path]:
    """Regular image files under `folder`, recursively, sorted, each real file once. Skipped, with one line
    each: FIFOs, devices and dangling links; links that point back inside the dataset (aliases); folders
    vitcli wrote (run folders); links to a file already counted. Hidden entries are ignored silently."""
    own = log is None
    log = log or ScanLog(folder)
    out: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to a folder already read
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if is_hidden(d):
                continue
            if os.path.islink(full) and (log.alias(full) or _inside(real, os.path.realpath(full))):
                log.skip(f"{full}: a link to {os.path.realpath(full)}, inside the dataset (an alias; its "
                         "images count once, where they are)")
            elif is_run_folder(full):
                log.skip(f"{full}: a vitcli run folder, not data")
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if is_hidden(name) or Path(name).suffix.lower() not in IMAGE_EXTS:
                continue
            path = Path(dirpath) / name
            try:
                check_regular(path)
            except BadImage as e:
                log.skip(str(e))
                continue
            link = os.path.islink(path)
            if link and log.alias(str(path)):
                log.skip(f"{path}: a link to {os.path.realpath(path)}, inside the dataset (an alias; counted "
                         "once, where it is)")
                continue
            key = os.path.realpath(path) if link else os.path.join(real, name)  # the folder is resolved once
            if key in log.files:
                log.skip(f"{path}: the same file as {log.files[key]} (counted once)")
                continue
            log.files[key] = path
            out.append(path)
    if own:
        log.finish()
    return out


def class_folders(folder: Path, log: ScanLog | None = None) -> list[str]:
    """Class subfolders: hidden ones, folders vitcli wrote, and links to folders inside the dataset (or
    above it) are not classes; the ones a user may have meant as classes are reported."""
    log = log or ScanLog(folder)
    real = os.path.realpath(folder)
    classes = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.name.startswith("__"):
            log.skip(f"{p}: folder names starting with '__' or '.' are hidden, not classes")
        elif _inside(real, os.path.realpath(p)) or (p.is_symlink() and log.alias(str(p))):
            log.skip(f"{p}: a link to {os.path.realpath(p)}, inside the dataset (an alias, not a class)")
        elif _holds_runs(p):
            log.skip(f"{p}: holds vitcli run folders, not images (outputs never belong inside DATA)")
        else:
            classes.append(p.name)
    return classes


def scan_classes(folder: Path, classes: list[str] | None = None, log: ScanLog | None = None
                 ) -> tuple[list[str], Split]:
    """Images of a folder of class subfolders; `classes` fixes the label order (e.g. the train split's)."""
    own = log is None
    log = log or ScanLog(folder)
    found = class_folders(folder, log)
    if classes is None:
        if len(found) < 2:
            raise VitcliError(f"'{folder}' needs at least two class subfolders with images, found "
                              f"{len(found)}" + (f" ({found[0]})" if found else ""))
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise VitcliError(f"'{folder}' has class folder(s) {shown(extra[:5])} that are not among the classes "
                              f"{shown(classes[:10])}")
    split = Split()
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = list_images(folder / name, log)
        if not files:
            raise VitcliError(f"class folder '{folder / name}' holds no images (extensions: "
                              f"{', '.join(sorted(IMAGE_EXTS))})")
        split.paths += files
        split.labels += [label] * len(files)
    if own:
        log.finish()
    return classes, split


def is_folder(path: Path) -> bool:
    return path.is_dir()


class FolderSource(ListedSource):
    """DATA is a folder of class subfolders (split in memory with the seed), or of train/ + val/ (+ test/)."""

    kind = "folder"

    def __init__(self, where: Path):
        self.where = where

    def scan(self, val_fraction: float, seed: int) -> Dataset:
        root = self.where
        log = ScanLog(root)  # one log for every split: a file linked into two splits counts once
        try:
            if (root / "train").is_dir():
                classes, train = scan_classes(root / "train", log=log)
                val = scan_classes(root / "val", classes, log)[1] if (root / "val").is_dir() else None
                test = scan_classes(root / "test", classes, log)[1] if (root / "test").is_dir() else None
                if val is None:
                    tr, va = stratified_split(train.labels, val_fraction, seed)
                    return Dataset(root, classes, train.subset(tr), train.subset(va), test, split_made=True,
                                   pool=train)
                return Dataset(root, classes, train, val, test)
            classes, everything = scan_classes(root, log=log)
            tr, va = stratified_split(everything.labels, val_fraction, seed)
            return Dataset(root, classes, everything.subset(tr), everything.subset(va), None, split_made=True,
                           pool=everything)
        finally:
            log.finish()

    def eval_split(self, classes: list[str], multilabel: bool) -> Split:
        """The folder itself as class folders, or its test/ (else val/) split."""
        if multilabel:
            raise VitcliError(f"'{self.where}': a multi-label model is evaluated on a .csv / .tsv / .jsonl label "
                              "file")
        root = self.where
        for name in ("test", "val"):
            if (root / name).is_dir():
                root = root / name
                break
        log = ScanLog(self.where)
        try:
            return scan_classes(root, classes, log)[1]
        finally:
            log.finish()
