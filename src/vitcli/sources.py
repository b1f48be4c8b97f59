"""The data-source table: what DATA is, decided in one place.

Each row says how a kind of DATA is recognised and which class reads it (a `dataset.Source`). The first row
whose test holds wins; shards are recognised by content (a vitcli `index.json`, a regular `.tar` file or a
brace pattern), so a class folder that merely holds some `index.json`, or a folder named `photos.tar`, stays a
folder. A new kind of source (a Hugging Face `datasets` folder, a parquet file) is one module and one row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vitcli.dataset import Dataset, Source, Split
from vitcli.errors import VitcliError
from vitcli.folders import FolderSource, is_folder
from vitcli.manifest import LabelFileSource, is_manifest
from vitcli.shards import ShardSource, is_shard_source

# (how the source is recognised from DATA, the class that reads it), first match wins
SOURCES: list[tuple[Callable[[Path], bool], type]] = [
    (is_shard_source, ShardSource),
    (is_manifest, LabelFileSource),
    (is_folder, FolderSource),
]


def open_source(data: str | Path, val_csv: str | Path | None = None) -> Source:
    """The source that reads DATA; `val_csv` (the validation label file) only goes with a label file."""
    path = Path(data)
    for detect, cls in SOURCES:
        if detect(path):
            if cls is LabelFileSource:
                return LabelFileSource(path, val_csv)
            if val_csv:
                break
            return cls(path)
    if val_csv:
        raise VitcliError(f"'data.val_csv' needs DATA to be a .csv, .tsv or .jsonl label file, got '{data}'")
    if not path.exists():
        raise VitcliError(f"dataset folder '{data}' does not exist")
    raise VitcliError(f"dataset '{data}' is not a folder; give a folder of class subfolders or of train/ and val/, "
                      "a .csv / .tsv / .jsonl label file, or a shard folder written by vitcli shard")


def scan_dataset(root: str | Path, val_fraction: float, seed: int, val_csv: str | Path | None = None) -> Dataset:
    """DATA's classes, items and train / val (/ test) split, whatever kind of source it is."""
    return open_source(root, val_csv).scan(val_fraction, seed)


def scan_eval_folder(root: str | Path, classes: list[str], multilabel: bool = False) -> Split:
    """The images of DATA to evaluate a model of `classes` on."""
    return open_source(root).eval_split(classes, multilabel)
