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
from typing import TYPE_CHECKING

from vitcli.console import esc, out
from vitcli.dataset import label_text
from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from vitcli.crossval import TrainFn

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
    near_across: list[tuple[FileInfo, FileInfo, float]] = field(default_factory=list)  # similar, not identical
    near_by: str = ""  # what near_across compared: pixel thumbnails or a model's embeddings
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


def check_data(root: str | Path, near: float = 0.97, model: str | None = None, device: str = "auto") -> DataReport:
    """Read (never write) a dataset folder and collect what could go wrong in training; images in different
    splits whose cosine similarity is >= `near` (pixel thumbnails, or `model`'s embeddings) are near-duplicates."""
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
    if len(splits) > 1 and near <= 1:
        rep.near_across, rep.near_by = near_duplicates(good, near, model, device)
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        rep.ignored += sum(1 for f in filenames if not is_hidden(f) and Path(f).suffix.lower() not in IMAGE_EXTS)
    return rep


def near_duplicates(infos: list[FileInfo], near: float, model: str | None, device: str
                    ) -> tuple[list[tuple[FileInfo, FileInfo, float]], str]:
    """Pairs of files from different splits, not byte-identical, with cosine similarity >= `near`."""
    from vitcli.embeddings import cross_group_pairs, embed_images, thumbnails

    paths = [i.path for i in infos]
    if model is None:
        emb, by = thumbnails(paths), "16x16 pixel thumbnails"
    else:
        from vitcli.inference import load

        loaded = load(model, device=device)
        emb, by = embed_images(loaded, paths), f"the embeddings of {loaded.run_dir}"
    info_of = {i.path: i for i in infos}
    kept = [info_of[p] for p in emb.paths]
    pairs = cross_group_pairs(emb.features, [i.split for i in kept], near)
    return [(kept[a], kept[b], s) for a, b, s in pairs if kept[a].sha256 != kept[b].sha256], by


def _dup_line(g: list[FileInfo], classes: list[str]) -> str:
    labels = {i.label for i in g}
    where = ", ".join(f"{i.split}/{label_text(classes, i.label)}/{i.path.name}" for i in g[:4])
    where += " ..." if len(g) > 4 else ""
    return where + ("  [different classes]" if len(labels) > 1 else "")


def inspect_data(root: str | Path, show: int = 10, near: float = 0.97, model: str | None = None,
                 device: str = "auto") -> DataReport:
    """Print the dataset check; returns the report."""
    from rich.table import Table

    rep = check_data(root, near, model, device)
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
                 [_dup_line(g, rep.classes) for g in rep.dup_across]),
                (f"near-duplicates across splits (by {rep.near_by})" if rep.near_by else "",
                 [f"{s:.3f}  " + _dup_line([a, b], rep.classes) for a, b, s in rep.near_across])]
    for title, items in sections:
        if not title:
            continue
        colour = "green" if not items else "yellow"
        out.print(f"[{colour}]{title}: {len(items)}[/]")
        for line in items[:show]:
            out.print(f"  {esc(line)}")
        if len(items) > show:
            out.print(f"  ... and {len(items) - show} more")
    if rep.ignored:
        out.print(f"ignored {rep.ignored} file(s) without an image extension")
    return rep


# ----------------------------------------------------------------------------------------------- label errors
GALLERY_PRE = {"resize_size": 128, "img_size": 128, "interpolation": "bicubic"}  # the gallery shows the images
GALLERY = 16  # images in label_errors.png


def label_errors(root: str | Path, from_run: Path | None = None, folds: int = 5, config: Path | None = None,
                 sets: list[str] | None = None, flags: dict | None = None, rank_by: str = "self_confidence",
                 output: Path | None = None, train: TrainFn | None = None) -> dict:
    """Rank DATA's images by how likely their label is wrong: confident learning on the out-of-fold
    probabilities of `from_run` (a `vitcli cv` run folder), or of a cross-validation run now with each fold
    trained by `train` (vitcli.train.train). Writes label_errors.csv, label_errors.png and labels_corrected.csv
    (DATA's labels with the suggestions applied) into `output` (default: label_errors/ in the cv run folder).
    DATA is only read."""
    from vitcli.confident import RANK_BY, find_label_issues, find_multilabel_issues
    from vitcli.console import esc, info
    from vitcli.crossval import CvSpec, cross_validate, pool_of, read_oof, start_cv
    from vitcli.files import ensure_dir, refuse_inside, write_csv

    if rank_by not in RANK_BY:
        raise VitcliError(f"--rank-by {rank_by!r}: valid: {', '.join(RANK_BY)}")
    if from_run is None:
        parent = start_cv(CvSpec.given(root, folds, config, sets, flags))
        info(f"[bold]cross-validation[/] for out-of-fold probabilities in {esc(str(parent))}")
        cross_validate(parent, train)
    else:
        parent = from_run
    oof = read_oof(parent)
    if from_run is not None and not {str(Path(p).resolve()) for p in oof.paths} & {
            str(p.resolve()) for p in pool_of(root).paths}:
        raise VitcliError(f"--from '{from_run}': its oof.csv holds none of the images of '{root}'; give the cv "
                          "run of this dataset")
    find = find_multilabel_issues if oof.multilabel else find_label_issues
    issues = find(oof.probs, oof.targets, rank_by)
    out_dir = output or (parent if parent.is_dir() else parent.parent) / "label_errors"
    refuse_inside(out_dir, root, "--output")
    ensure_dir(out_dir)
    rows = [{"rank": r, "path": str(oof.paths[t.index]), "given": label_text(oof.classes, t.given),
             "suggested": label_text(oof.classes, t.suggested), "score": round(t.score, 6),
             "self_confidence": round(t.self_confidence, 6)} for r, t in enumerate(issues, 1)]
    files = {"issues": out_dir / "label_errors.csv", "corrected": out_dir / "labels_corrected.csv",
             "gallery": out_dir / "label_errors.png"}
    write_csv(files["issues"], list(rows[0]) if rows else ["rank", "path", "given", "suggested", "score"],
              [list(r.values()) for r in rows])
    n_fixed = write_corrected(files["corrected"], root, {r["path"]: r["suggested"] for r in rows}, oof.classes)
    if rows:
        from vitcli.figures import plot_gallery

        cells = [(Path(r["path"]), f"#{r['rank']} {r['given']} -> {r['suggested']}\nscore {r['score']:.3f}")
                 for r in rows[:GALLERY]]
        plot_gallery([cells[i:i + 4] for i in range(0, len(cells), 4)], files["gallery"], GALLERY_PRE,
                     f"most likely mislabelled (confident learning, {rank_by})")
    else:
        del files["gallery"]
    return {"run": str(parent), "data": str(root), "images": len(oof.paths), "rank_by": rank_by,
            "task": "multilabel" if oof.multilabel else "single-label", "flagged": len(rows), "issues": rows,
            "corrected_images": n_fixed, "files": {k: str(v) for k, v in files.items()}}


def write_corrected(path: Path, root: str | Path, fixes: dict[str, str], classes: list[str]) -> int:
    """Every image of DATA with its label (the suggested one where `fixes` has it) and, when DATA fixes the
    splits, its split: a label file `vitcli train` takes as it is. Returns the labels changed."""
    from vitcli.files import write_csv
    from vitcli.sources import scan_dataset

    ds = scan_dataset(root, 0.0, 0)
    fixes = {str(Path(p).resolve()): v for p, v in fixes.items()}
    rows, changed = [], 0
    for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        for p, y in zip(*(split.paths, split.labels) if split else ((), ()), strict=True):
            key = str(Path(p).resolve())
            changed += key in fixes
            rows.append([key, fixes.get(key, label_text(ds.classes, y))] + ([] if ds.split_made else [name]))
    write_csv(path, ["path", "label"] + ([] if ds.split_made else ["split"]), rows)
    return changed


def print_label_errors(rep: dict, show: int = 20) -> None:
    from rich.table import Table

    t = Table("#", "score", "given", "suggested", "image",
              title=f"likely label errors: {rep['flagged']} of {rep['images']} images ({rep['rank_by']})")
    for r in rep["issues"][:show]:
        t.add_row(str(r["rank"]), f"{r['score']:.3f}", esc(r["given"]), esc(r["suggested"]), esc(r["path"]))
    out.print(t)
    if rep["flagged"] > show:
        out.print(f"  ... and {rep['flagged'] - show} more")
    for f in rep["files"].values():
        out.print(f"wrote {esc(f)}")
    out.print(f"train on the corrections: vitcli train {esc(rep['files']['corrected'])}")
