"""Label files as datasets: a `.csv` / `.tsv` / `.jsonl` manifest of image paths and labels.

A manifest holds a path column (relative to the manifest's folder, or absolute) and either a label column
(`cat`, or `cat|dog` for several labels) or one 0/1 column per class; an optional `split` column
(train / val / test) fixes the split. Column names are recognised from common spellings; anything else
is an error naming the columns seen; other columns beside a label column are ignored (and said so). The task is
read from the labels: one label per image is single-label classification, several on some image is multi-label
(images with none are then negatives), kept as multi-hot tuples in `Split.labels`. Each file is validated once,
as it is read: every refusal is one line naming the file, line and column; exact repeated rows are dropped and
counted; the same image with other labels or in two splits is an error. Paths are opened only after the
regular-file guard (decode.check_regular), so a FIFO listed in a label file cannot block a read.
Rows are ordered by (label, path), so a manifest describing a folder of class folders yields the very
dataset, split and batches that scanning the folder does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vitcli.dataset import Dataset, Split, stratified_split
from vitcli.errors import VitcliError
from vitcli.store import ListedSource

MANIFEST_EXTS = (".csv", ".tsv", ".jsonl")
PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path",
                "img", "img_path", "image_file", "image_name", "image_id", "relpath")
LABEL_COLUMNS = ("label", "labels", "class", "classes", "category", "categories", "target", "targets", "tags",
                 "tag", "class_name", "y")
SPLIT_COLUMNS = ("split", "subset", "set", "fold_name")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
LABEL_SEPARATORS = ("|", ";")


def is_manifest(path: str | Path) -> bool:
    return Path(path).suffix.lower() in MANIFEST_EXTS


Row = tuple[int, dict[str, object]]  # (line number in the file, column -> value)


def read_rows(path: Path) -> tuple[list[str], list[Row]]:
    """(column names, rows) of a csv / tsv (header row; a two-column file without one is path,label) or jsonl
    (one object per line) file. Quoted newlines stay inside their cell; only '\n' ends a JSONL line."""
    from vitcli.decode import check_regular

    if not path.exists():
        raise VitcliError(f"label file '{path}' does not exist")
    check_regular(path, "a label file", VitcliError)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise VitcliError(f"label file '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise VitcliError(f"label file '{path}' cannot be read ({e.strerror or type(e).__name__})") from None
    if "\0" in text:
        raise VitcliError(f"label file '{path}' holds NUL bytes; it is not a text label file")
    if path.suffix.lower() == ".jsonl":
        return _jsonl_rows(path, text)
    return _csv_rows(path, text)


def _jsonl_rows(path: Path, text: str) -> tuple[list[str], list[Row]]:
    rows: list[Row] = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 / U+0085 are text inside strings
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise VitcliError(f"label file '{path}' line {n}: not JSON ({getattr(e, 'msg', 'nested too deep')})"
                              ) from None
        if not isinstance(row, dict):
            raise VitcliError(f"label file '{path}' line {n}: expected a JSON object per line")
        rows.append((n, row))
    if not rows:
        raise VitcliError(f"label file '{path}' is empty")
    return list(dict.fromkeys(k for _, r in rows for k in r)), rows


def _csv_rows(path: Path, text: str) -> tuple[list[str], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    table: list[tuple[int, list[str]]] = []
    try:
        for r in reader:
            if any(c.strip() for c in r):
                table.append((reader.line_num, r))
    except csv.Error as e:
        raise VitcliError(f"label file '{path}' line {reader.line_num}: not valid CSV ({e})") from None
    if not table:
        raise VitcliError(f"label file '{path}' is empty")
    header = [c.strip() for c in table[0][1]]
    if len(header) == 2 and _looks_like_image(header[0]) and not _known(header[0].lower(), PATH_COLUMNS):
        header, body = ["path", "label"], table  # no header row: path,label
    else:
        body = table[1:]
    names = [h.lower() for h in header]
    twice = sorted({h for h in names if names.count(h) > 1})
    if twice:
        raise VitcliError(f"label file '{path}': column {twice[0]!r} appears twice in the header "
                          f"({', '.join(header)})")
    rows: list[Row] = []
    for n, r in body:
        if [c.strip().lower() for c in r] == names and body is not table:
            raise VitcliError(f"label file '{path}' line {n} repeats the header row (two files joined?); keep one")
        if len(r) != len(header):
            raise VitcliError(f"label file '{path}' line {n}: {len(r)} fields, the header has {len(header)} "
                              f"({', '.join(header)})")
        rows.append((n, {k: v.strip() for k, v in zip(header, r, strict=True)}))
    return header, rows


def _looks_like_image(text: str) -> bool:
    """A file name with an extension (a header-less file starts with a path, not a column name)."""
    return re.search(r"\.[A-Za-z]{3,4}$", text.strip()) is not None


def _known(name: str, names: tuple[str, ...]) -> bool:
    return name.strip().lower() in names


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    for want in names:
        for c in columns:
            if c.strip().lower() == want:
                return c
    return None


def _bit(value: object) -> int | None:
    """A 0/1 cell as 0 or 1 (missing JSONL keys are 0); None when it is something else."""
    if value is None or value is False or (isinstance(value, int) and value == 0) or value == 0.0:
        return 0
    if value is True or value == 1:
        return 1
    if isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0", "True", "False", "true", "false"):
        return int(value.strip() in ("1", "1.0", "True", "true"))
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _onehot_labels(path: Path, rows: list[Row], rest: list[str], seen: str) -> list[tuple[str, ...]]:
    """Labels from one 0/1 column per class: each other column must be 0/1 and hold a 1 somewhere."""
    onehot = [c for c in rest if all(_bit(r.get(c, 0)) is not None for _, r in rows)]
    if len(onehot) < 2:
        raise VitcliError(f"label file '{path}': no label column among the columns seen ({seen}); name it "
                          f"one of: {', '.join(LABEL_COLUMNS[:5])}, or give one 0/1 column per class")
    for c in rest:
        if c not in onehot:
            n, value = next((n, r.get(c)) for n, r in rows if _bit(r.get(c, 0)) is None)
            raise VitcliError(f"label file '{path}' line {n}: column '{c}' is {_short(value)}, not 0 or 1 (without a "
                              "label column, every column but path and split is a 0/1 class column)")
    for c in onehot:
        if not any(_bit(r.get(c, 0)) for _, r in rows):
            raise VitcliError(f"label file '{path}': column '{c}' is 0 on every row, so class '{c}' has no images; "
                              "drop the column or label some images with it")
    return [tuple(c for c in onehot if _bit(r.get(c, 0))) for _, r in rows]


def _split_labels(path: Path, n: int, column: str, value: object) -> tuple[str, ...]:
    """A label cell -> its labels: text ('cat', 'cat|dog'), a whole number, or a JSONL list of those."""
    def bad() -> VitcliError:
        return VitcliError(f"label file '{path}' line {n}: '{column}' is {_short(value)}; a label is text or a whole "
                           "number (several: 'a|b', or a JSON list of them)")

    if isinstance(value, list):
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            raise bad()
        return tuple(sorted({str(v).strip() for v in value if str(v).strip()}))
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
        raise bad()
    text = "" if value is None else str(value).strip()
    for sep in LABEL_SEPARATORS:
        if sep in text:
            return tuple(sorted({t.strip() for t in text.split(sep) if t.strip()}))
    return (text,) if text else ()


def _row_path(path: Path, n: int, column: str, value: object) -> Path:
    """The image path of one row, relative to the label file's folder; URLs and NUL bytes are refused here."""
    raw = value.strip() if isinstance(value, str) else ""
    if not raw:
        raise VitcliError(f"label file '{path}' line {n}: '{column}' is {_short(value)}, not a path")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", raw):
        raise VitcliError(f"label file '{path}' line {n}: {_short(raw)} is a URL; URLs are not supported, give the "
                          "path of a local file")
    if "\0" in raw:
        raise VitcliError(f"label file '{path}' line {n}: the path holds a NUL byte")
    p = Path(raw)
    return p if p.is_absolute() else path.parent / p


def _row_split(path: Path, n: int, column: str | None, value: object) -> str | None:
    text = str(value).strip() if isinstance(value, str | int) else ""
    if column is None:
        return None
    if not text:
        raise VitcliError(f"label file '{path}' line {n}: the '{column}' cell is empty while other rows name a "
                          "split; fill it (train, val or test) or drop the column")
    if text.lower() not in SPLIT_VALUES:
        raise VitcliError(f"label file '{path}' line {n}: '{column}' is {_short(value)}; valid: train, val, test")
    return SPLIT_VALUES[text.lower()]


def parse_manifest(path: str | Path) -> tuple[list[str], list[tuple[Path, tuple[str, ...], str | None]]]:
    """(class names sorted, rows of (image path, labels, split or None)) of a manifest, validated once."""
    from vitcli.console import info

    path = Path(path)
    columns, rows = read_rows(path)
    if not rows:
        raise VitcliError(f"label file '{path}' has a header but no rows")
    seen = ", ".join(columns)
    path_col = _pick(columns, PATH_COLUMNS)
    if path_col is None:
        raise VitcliError(f"label file '{path}': no image path column among the columns seen ({seen}); name "
                          f"it one of: {', '.join(PATH_COLUMNS[:6])}")
    split_col = _pick(columns, SPLIT_COLUMNS)
    if split_col is not None and not any(str(r.get(split_col) or "").strip() for _, r in rows):
        split_col = None  # an empty split column fixes nothing
    label_col = _pick(columns, LABEL_COLUMNS)
    rest = [c for c in columns if c not in (path_col, split_col)]
    if label_col is None:
        labelled = _onehot_labels(path, rows, rest, seen)
    else:
        labelled = [_split_labels(path, n, label_col, r.get(label_col)) for n, r in rows]
        ignored = [c for c in rest if c != label_col]
        if ignored:
            info(f"label file '{path}': column(s) {', '.join(ignored[:8])} ignored (not path, label or split)")
    out = [(n, _row_path(path, n, path_col, r.get(path_col)), labels, _row_split(path, n, split_col, r.get(split_col)))
           for (n, r), labels in zip(rows, labelled, strict=True)]
    out = _dedupe(path, out)
    classes = sorted({c for _, labels, _ in out for c in labels})
    if len(classes) < 2:
        raise VitcliError(f"label file '{path}' needs at least two classes, found {len(classes)}"
                          + (f" ({classes[0]})" if classes else ""))
    return classes, out


def _dedupe(path: Path, rows: list[tuple[int, Path, tuple[str, ...], str | None]]
            ) -> list[tuple[Path, tuple[str, ...], str | None]]:
    """One row per image: an exact repeat (same path, labels, split) is dropped and counted; the same image
    with other labels, or in two splits, is an error naming both lines."""
    from vitcli.console import warn

    first: dict[str, tuple[int, tuple[str, ...], str | None]] = {}
    out, dropped = [], 0
    for n, p, labels, split in rows:
        key = os.path.normpath(p)
        if key in first:
            m, labels0, split0 = first[key]
            if labels0 != labels:
                raise VitcliError(f"label file '{path}' lines {m} and {n}: '{p}' is listed with labels {list(labels0)} "
                                  f"and {list(labels)}; give each image once (several labels: 'a|b' in one cell)")
            if split0 != split:
                raise VitcliError(f"label file '{path}' lines {m} and {n}: '{p}' is in split {split0} and {split}; "
                                  "an image in two splits leaks validation images into training")
            dropped += 1
            continue
        first[key] = (n, labels, split)
        out.append((p, labels, split))
    if dropped:
        warn(f"label file '{path}': {dropped} repeated row(s) dropped (same image, labels and split); each image "
             "counts once")
    return out


def is_multilabel(rows) -> bool:
    """Multi-label when some image has several labels (images with none are then negatives for every class)."""
    return any(len(labels) > 1 for _, labels, _ in rows)


def check_single_label(path: Path, rows) -> None:
    """In a single-label file every image needs its one label: an empty cell is an error, not a switch of task."""
    missing = [p for p, labels, _ in rows if not labels]
    if missing:
        raise VitcliError(f"label file '{path}': '{missing[0]}' has no label ({len(missing)} image(s) without "
                          "one); give each image a label, or several on some rows for a multi-label task")


@dataclass
class Manifest:
    """A label file, parsed: `parts` maps train / val / test (or "all" when no split is given) to
    (paths, labels) ordered by (label, path); labels are class indices, or multi-hot tuples."""

    classes: list[str]
    multilabel: bool
    parts: dict[str, tuple[list[Path], list]]


def read_manifest(path: str | Path, val_csv: str | Path | None = None, classes: list[str] | None = None,
                  multilabel: bool | None = None) -> Manifest:
    """Parse a label file (and `val_csv`, the validation images); `classes` / `multilabel` fix the label
    order and task (a model's), otherwise they are read from the labels."""
    path = Path(path)
    found, rows = parse_manifest(path)
    val_rows = []
    if val_csv:
        if os.path.realpath(val_csv) == os.path.realpath(path):
            raise VitcliError(f"'data.val_csv' '{val_csv}' is the training label file itself; give a separate "
                              "file of validation images (or leave it unset for a seeded split)")
        vfound, val_rows = parse_manifest(val_csv)
        both = {os.path.normpath(p) for p, _, _ in rows} & {os.path.normpath(p) for p, _, _ in val_rows}
        if both:
            raise VitcliError(f"'data.val_csv' '{val_csv}': {len(both)} image(s) are in '{path}' too (e.g. "
                              f"'{sorted(both)[0]}'); validation images must not be trained on")
        extra = [c for c in vfound if c not in found]
        if extra:
            raise VitcliError(f"'data.val_csv' '{val_csv}' has label(s) {extra[:5]} that '{path}' never uses")
    classes = classes if classes is not None else found
    if multilabel is None:
        multilabel = is_multilabel(rows) or is_multilabel(val_rows)
        if not multilabel:
            check_single_label(path, rows + val_rows)
    if val_rows:
        parts = {"train": [r for r in rows if r[2] in (None, "train")], "val": val_rows}
    elif any(r[2] is not None for r in rows):
        parts = {name: [r for r in rows if r[2] == name] for name in ("train", "val", "test")}
    else:
        parts = {"all": rows}
    return Manifest(classes, multilabel, {k: _ordered(v, classes, multilabel) for k, v in parts.items()})


def _ordered(rows, classes: list[str], multilabel: bool) -> tuple[list[Path], list]:
    """Rows -> (paths, labels) ordered by (label, path), so a label file of a class-folder dataset lists
    the images in the order scanning the folders does."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for p, labels, _ in rows:
        unknown = [c for c in labels if c not in index]
        if unknown:
            raise VitcliError(f"'{p}': label(s) {unknown[:5]} are not among the classes {classes[:10]}")
        if not multilabel and not labels:
            raise VitcliError(f"'{p}' has no label; a single-label model is evaluated on images with one label each")
        if not multilabel and len(labels) > 1:
            raise VitcliError(f"'{p}' has {len(labels)} labels {list(labels)[:5]}; this model predicts one label per "
                              "image (train on this label file to get a multi-label model)")
        items.append((p, tuple(int(c in labels) for c in classes) if multilabel else index[labels[0]]))
    if multilabel:
        items.sort(key=lambda it: (tuple(-v for v in it[1]), str(it[0])))
    else:
        items.sort(key=lambda it: (it[1], str(it[0])))
    return [p for p, _ in items], [y for _, y in items]


class LabelFileSource(ListedSource):
    """DATA is a label file: its split column, or `data.val_csv`, or a seeded stratified split (of its train
    rows when the split column names no val rows)."""

    kind = "label file"

    def __init__(self, where: Path, val_csv: str | Path | None = None):
        self.where, self.val_csv = where, val_csv

    def scan(self, val_fraction: float, seed: int) -> Dataset:
        path = self.where
        m = read_manifest(path, self.val_csv)
        parts = {k: Split(*v) for k, v in m.parts.items()}
        kw = {"multilabel": m.multilabel, "source": path}
        test = parts.get("test") or None
        if "all" in parts or (not len(parts["val"]) and val_fraction > 0):
            pool = parts.get("all", parts.get("train"))
            tr, va = stratified_split(pool.labels, val_fraction, seed)
            return Dataset(path.parent, m.classes, pool.subset(tr), pool.subset(va), test, split_made=True,
                           pool=pool, **kw)
        return Dataset(path.parent, m.classes, parts["train"], parts["val"], test, **kw)

    def eval_split(self, classes: list[str], multilabel: bool) -> Split:
        """The split column's test rows, else its val rows, else every row."""
        parts = read_manifest(self.where, classes=classes, multilabel=multilabel).parts
        for name in ("test", "val", "all"):
            if len(parts.get(name, ((), ()))[0]):
                return Split(*parts[name])
        return Split()
