"""`vitcli inspect data`: a dataset check before training (unreadable, disguised, duplicate and leaked files,
class counts, sizes and modes); it only reads."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vitcli.console import esc, out
from vitcli.errors import VitcliError

# ----------------------------------------------------------------------------------------------- data
FORMAT_OF_EXT = {".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".bmp": {"BMP"},
                 ".gif": {"GIF"}, ".webp": {"WEBP"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"}}


@dataclass
class FileInfo:
    path: Path
    split: str
    label: int | tuple[int, ...]  # class index, or multi-hot
    sha256: str
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    error: str | None = None  # why the file cannot be used as an image


@dataclass
class DataReport:
    root: Path
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    imbalance: dict[str, float]  # split -> largest / smallest class count (inf when a class is empty)
    sizes: Counter  # (width, height) -> files
    modes: Counter  # PIL mode -> files
    formats: Counter  # PIL format -> files
    unreadable: list[str] = field(default_factory=list)  # one message per file
    disguised: list[str] = field(default_factory=list)  # readable, but the extension names another format
    dup_within: list[list[FileInfo]] = field(default_factory=list)  # identical files inside one split
    dup_across: list[list[FileInfo]] = field(default_factory=list)  # identical files in several splits
    ignored: int = 0  # files without an image extension


def _probe(job: tuple[Path, str, int]) -> FileInfo:
    from PIL import Image

    from vitcli.decode import BadImage, allowed_formats, check_regular, load_rgb

    path, split, label = job
    h = hashlib.sha256()
    try:
        check_regular(path)  # a FIFO swapped in after the scan would block the read
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, BadImage) as e:  # unreadable (permissions, I/O error) or vanished since the scan
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return FileInfo(path, split, label, f"unreadable:{path}", error=f"{path}: cannot be read ({reason})")
    info = FileInfo(path, split, label, h.hexdigest())
    try:
        with Image.open(path, formats=allowed_formats()) as im:
            info.format, info.mode, info.size = im.format, im.mode, im.size
    except Exception:  # load_rgb below explains why
        pass
    try:
        load_rgb(path)
    except BadImage as e:
        info.error = str(e)
    return info


def check_data(root: str | Path) -> DataReport:
    """Read (never write) a dataset folder and collect what could go wrong in training."""
    from vitcli.decode import IMAGE_EXTS
    from vitcli.folders import is_hidden
    from vitcli.sources import open_source

    root = Path(root)
    source = open_source(root)
    if not source.listed:
        raise VitcliError(f"'{root}' is {source.kind}, whose images are streamed, not files to check; give the "
                          "folder or label file they were made from")
    ds = source.scan(0.0, 0)  # no split of its own: val_fraction 0 keeps every image in train
    if (root / "train").is_dir() or (ds.source is not None and (len(ds.val) or ds.test)):
        splits = {"train": ds.train, "val": ds.val, "test": ds.test}
    else:
        splits = {"all": ds.train}
    splits = {k: v for k, v in splits.items() if v is not None and len(v)}
    jobs = [(p, name, y) for name, s in splits.items() for p, y in zip(s.paths, s.labels, strict=True)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        infos = list(pool.map(_probe, jobs, chunksize=16))
    n = len(ds.classes)
    counts = {k: [0] * n for k in splits}  # readable images only
    for i in infos:
        for c in ([k for k, v in enumerate(i.label) if v] if isinstance(i.label, tuple) else [i.label]):
            counts[i.split][c] += i.error is None  # multi-label: images holding the class
    imbalance = {k: (max(c) / min(c) if min(c) else math.inf) for k, c in counts.items()}
    good = [i for i in infos if i.error is None]
    rep = DataReport(root, ds.classes, counts, imbalance, Counter(i.size for i in good if i.size),
                     Counter(i.mode for i in good if i.mode), Counter(i.format for i in good if i.format))
    rep.unreadable = [i.error for i in infos if i.error]
    for i in good:
        if i.format and i.format not in FORMAT_OF_EXT.get(i.path.suffix.lower(), {i.format}):
            rep.disguised.append(f"{i.path}: named {i.path.suffix} but is {i.format}")
    groups: dict[str, list[FileInfo]] = defaultdict(list)
    for i in infos:
        groups[i.sha256].append(i)
    for g in groups.values():
        if len(g) < 2:
            continue
        if len({i.split for i in g}) > 1:
            rep.dup_across.append(g)
        else:
            rep.dup_within.append(g)
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        rep.ignored += sum(1 for f in filenames if not is_hidden(f) and Path(f).suffix.lower() not in IMAGE_EXTS)
    return rep


def _dup_line(g: list[FileInfo], classes: list[str]) -> str:
    from vitcli.dataset import label_text

    labels = {i.label for i in g}
    where = ", ".join(f"{i.split}/{label_text(classes, i.label)}/{i.path.name}" for i in g[:4])
    where += " ..." if len(g) > 4 else ""
    return where + ("  [different classes]" if len(labels) > 1 else "")


def inspect_data(root: str | Path, show: int = 10) -> DataReport:
    """Print the dataset check; returns the report."""
    from rich.table import Table

    rep = check_data(root)
    t = Table("class", *rep.counts, title=f"images per class in '{esc(str(rep.root))}'")
    for c, name in enumerate(rep.classes):
        t.add_row(esc(name), *[str(v[c]) for v in rep.counts.values()])
    t.add_row("[bold]total[/]", *[str(sum(v)) for v in rep.counts.values()])
    t.add_row("[bold]imbalance (max/min)[/]", *[f"{r:.2f}" if math.isfinite(r) else "a class is empty"
                                               for r in rep.imbalance.values()])
    out.print(t)
    if rep.sizes:
        ws = sorted(w for (w, _), k in rep.sizes.items() for _ in range(k))
        hs = sorted(h for (_, h), k in rep.sizes.items() for _ in range(k))
        common = ", ".join(f"{w}x{h} ({k})" for (w, h), k in rep.sizes.most_common(3))
        out.print(f"sizes: width {ws[0]}-{ws[-1]} (median {ws[len(ws) // 2]}), height {hs[0]}-{hs[-1]} "
                  f"(median {hs[len(hs) // 2]}); {len(rep.sizes)} distinct, most common {common}")
    out.print("modes: " + ", ".join(f"{esc(str(m))} ({k})" for m, k in rep.modes.most_common()))
    out.print("formats: " + ", ".join(f"{esc(str(m))} ({k})" for m, k in rep.formats.most_common()))
    sections = [("unreadable files", rep.unreadable),
                ("disguised files (extension does not match the content)", rep.disguised),
                ("exact duplicates within a split", [_dup_line(g, rep.classes) for g in rep.dup_within]),
                ("exact duplicates across splits (leak between train and evaluation)",
                 [_dup_line(g, rep.classes) for g in rep.dup_across])]
    for title, items in sections:
        colour = "green" if not items else "yellow"
        out.print(f"[{colour}]{title}: {len(items)}[/]")
        for line in items[:show]:
            out.print(f"  {esc(line)}")
        if len(items) > show:
            out.print(f"  ... and {len(items) - show} more")
    if rep.ignored:
        out.print(f"ignored {rep.ignored} file(s) without an image extension")
    return rep
