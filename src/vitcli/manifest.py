"""Label files as datasets: a `.csv` / `.tsv` / `.jsonl` manifest of image paths and labels.

A manifest holds a path column (relative to the manifest's folder, or absolute) and either a label column
(`cat`, or `cat|dog` for several labels) or one 0/1 column per class; an optional `split` column
(train / val / test) fixes the split. Column names are recognised from common spellings; anything else
is an error naming the columns seen. The task is read from the labels: one label per image is single-label
classification, several (or none) on some image is multi-label, kept as multi-hot tuples in `Split.labels`.
Rows are ordered by (label, path), so a manifest describing a folder of class folders yields the very
dataset, split and batches that scanning the folder does.
"""

from __future__ import annotations

import csv
import json
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


def read_rows(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """(column names, rows) of a csv / tsv (header row; a two-column file without one is path,label)
    or jsonl (one object per line) file."""
    if not path.is_file():
        raise VitcliError(f"label file '{path}' does not exist" if not path.exists()
                          else f"label file '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise VitcliError(f"label file '{path}' is not UTF-8 text") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise VitcliError(f"label file '{path}' line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise VitcliError(f"label file '{path}' line {n}: expected a JSON object per line")
            rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, rows
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    table = [r for r in csv.reader(text.splitlines(), delimiter=delim) if any(c.strip() for c in r)]
    if not table:
        raise VitcliError(f"label file '{path}' is empty")
    header = [c.strip() for c in table[0]]
    if len(header) == 2 and _looks_like_image(header[0]) and not _known(header[0].lower(), PATH_COLUMNS):
        header, body = ["path", "label"], table  # no header row: path,label
    else:
        body = table[1:]
    rows = []
    for n, r in enumerate(body, 2):
        if len(r) != len(header):
            raise VitcliError(f"label file '{path}' line {n}: {len(r)} fields, the header has {len(header)} "
                              f"({', '.join(header)})")
        rows.append({k: v.strip() for k, v in zip(header, r, strict=True)})
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


def _is_binary(value: object) -> bool:
    return value in (0, 1, True, False) or (isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0"))


def parse_manifest(path: str | Path) -> tuple[list[str], list[tuple[Path, tuple[str, ...], str | None]]]:
    """(class names sorted, rows of (image path, labels, split or None)) of a manifest."""
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
    label_col = _pick(columns, LABEL_COLUMNS)
    rest = [c for c in columns if c not in (path_col, split_col)]
    if label_col is None:  # one 0/1 column per class?
        onehot = [c for c in rest if all(_is_binary(r.get(c, 0)) for r in rows)]
        if not onehot or len(onehot) != len(rest) or len(onehot) < 2:
            raise VitcliError(f"label file '{path}': no label column among the columns seen ({seen}); name it "
                              f"one of: {', '.join(LABEL_COLUMNS[:5])}, or give one 0/1 column per class")
        labelled = [tuple(c for c in onehot if str(r.get(c, 0)).strip() in ("1", "1.0", "True")) for r in rows]
    else:
        labelled = [_split_labels(r.get(label_col)) for r in rows]
    out = []
    base = path.parent
    for n, (r, labels) in enumerate(zip(rows, labelled, strict=True), 2):
        raw = str(r.get(path_col) or "").strip()
        if not raw:
            raise VitcliError(f"label file '{path}' row {n - 1}: empty '{path_col}'")
        split = None
        if split_col is not None and str(r.get(split_col) or "").strip():
            value = str(r[split_col]).strip().lower()
            if value not in SPLIT_VALUES:
                raise VitcliError(f"label file '{path}' row {n - 1}: '{split_col}' is {r[split_col]!r}; valid: "
                                  "train, val, test")
            split = SPLIT_VALUES[value]
        p = Path(raw)
        out.append((p if p.is_absolute() else base / p, labels, split))
    classes = sorted({c for _, labels, _ in out for c in labels})
    if len(classes) < 2:
        raise VitcliError(f"label file '{path}' needs at least two classes, found {len(classes)}"
                          + (f" ({classes[0]})" if classes else ""))
    return classes, out


def _split_labels(value: object) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(sorted({str(v).strip() for v in value if str(v).strip()}))
    text = "" if value is None else str(value).strip()
    for sep in LABEL_SEPARATORS:
        if sep in text:
            return tuple(sorted({t.strip() for t in text.split(sep) if t.strip()}))
    return (text,) if text else ()


def is_multilabel(rows) -> bool:
    """Multi-label when some image has several labels or none; single-label when every image has one."""
    return any(len(labels) != 1 for _, labels, _ in rows)


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
        vfound, val_rows = parse_manifest(val_csv)
        extra = [c for c in vfound if c not in found]
        if extra:
            raise VitcliError(f"'data.val_csv' '{val_csv}' has label(s) {extra[:5]} that '{path}' never uses")
    classes = classes if classes is not None else found
    if multilabel is None:
        multilabel = is_multilabel(rows) or is_multilabel(val_rows)
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
        if not multilabel and len(labels) != 1:
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
            return Dataset(path.parent, m.classes, pool.subset(tr), pool.subset(va), test, split_made=True, **kw)
        return Dataset(path.parent, m.classes, parts["train"], parts["val"], test, **kw)

    def eval_split(self, classes: list[str], multilabel: bool) -> Split:
        """The split column's test rows, else its val rows, else every row."""
        parts = read_manifest(self.where, classes=classes, multilabel=multilabel).parts
        for name in ("test", "val", "all"):
            if len(parts.get(name, ((), ()))[0]):
                return Split(*parts[name])
        return Split()
