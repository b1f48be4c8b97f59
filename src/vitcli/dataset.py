"""What every data source yields: listed splits (`Split`, `Dataset`), the seeded stratified val split, class
counts, and the two protocols a source implements (`Source`: scan -> items, classes, counts, val split;
`Store`: batches of one split for a rank). The sources themselves are chosen in sources.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from vitcli.config import DataConfig

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: list[int]) -> Split:
        return Split([self.paths[i] for i in idx], [self.labels[i] for i in idx])


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    train: Split
    val: Split
    test: Split | None = None
    split_made: bool = False  # True when val was carved out of the class folders by a seeded split
    multilabel: bool = False  # labels are multi-hot tuples (several classes per image) instead of indices
    source: Path | None = None  # the label file when DATA is a manifest (.csv / .tsv / .jsonl)
    streamed: tuple[int, int] | None = None  # a streamed source (shards): (train, val) images; splits not listed
    streamed_counts: tuple[list[int], list[int]] | None = None  # streamed: (train, val) images per class
    pool: Split | None = None  # split_made: the images the seeded split was cut from, in scan order (resplit)

    def resplit(self, val_fraction: float, seed: int) -> Dataset:
        """The scan's seeded split again with another share (a split it made): what `scan(val_fraction, seed)`
        gives, without listing the files again."""
        tr, va = stratified_split(self.pool.labels, val_fraction, seed)
        return replace(self, train=self.pool.subset(tr), val=self.pool.subset(va))

    def sizes(self) -> tuple[int, int]:
        """(train, val) images, listed or streamed."""
        return self.streamed if self.streamed is not None else (len(self.train), len(self.val))

    def counts(self) -> tuple[list[int], list[int]]:
        """(train, val) images per class (multi-label: images holding each class)."""
        if self.streamed_counts is not None:
            return self.streamed_counts
        n = len(self.classes)
        return class_counts(self.train.labels, n), class_counts(self.val.labels, n)


def label_text(classes: list[str], y) -> str:
    """A label as text: the class name, or 'a|b' for a multi-hot tuple."""
    return "|".join(c for c, v in zip(classes, y, strict=True) if v) if isinstance(y, tuple) else classes[y]


def class_counts(labels: list, n: int) -> list[int]:
    """Images per class, for labels in range(n) (multi-hot tuples: images holding each class)."""
    counts = [0] * n
    for y in labels:
        if isinstance(y, tuple):
            counts = [c + v for c, v in zip(counts, y, strict=True)]
        else:
            counts[y] += 1
    return counts


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: round(n * val_fraction) of each class (at least 1 when n >= 2) go to val."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)

def check_val_split(ds: Dataset, val_fraction: float) -> None:
    """A dataset to train on needs validation images; say what would give it some."""
    if ds.sizes()[1]:
        return
    if not ds.split_made:
        raise VitcliError(f"'{ds.root}': the val/ folder holds no images")
    if val_fraction == 0:
        raise VitcliError(f"'{ds.root}': no validation images with 'data.val_fraction' 0; raise it (e.g. 0.2) or "
                          "add a val/ folder")
    raise VitcliError(f"'{ds.root}': every class has a single image, so none can be held out for validation; "
                      "add images (2 or more in some class) or a val/ folder")




class Store(Protocol):
    """One split's images as batches of (uint8 images (B, 3, S, S), labels (B,) or multi-hot (B, C)), the same
    surface for images held in memory (store.ImageStore) and streamed shards (shards.ShardStore)."""

    def __len__(self) -> int: ...

    def to(self, device) -> Store:
        """Move what the store holds to `device` (a streamed store holds nothing)."""

    def steps(self, batch_size: int, epoch: int, seed: int, world: int, weights=None) -> int:
        """Batches per rank in one epoch, the same on every rank."""

    def train_batches(self, batch_size: int, epoch: int, seed: int, rank: int, world: int, skip: int = 0,
                      weights=None, limit: int | None = None) -> Iterator[tuple[Any, Any]]:
        """This rank's seeded shuffled batches of `epoch` (at most `limit`), from batch `skip` on."""

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Any, Any]]:
        """This rank's share of the images, in order."""

    def epoch_check(self, device, world: int) -> str | None:
        """A line saying whether the epoch saw every image once (None: an index order always does)."""


class Source(Protocol):
    """One kind of DATA (class folders, a label file, tar shards), chosen by the table in sources.py."""

    kind: ClassVar[str]  # what the user gave, in messages: "folder", "label file", "shards"
    listed: ClassVar[bool]  # its images are files that can be listed, shown and evaluated one by one
    where: Path  # DATA as given

    def scan(self, val_fraction: float, seed: int) -> Dataset:
        """Classes, items (a streamed source: their counts) and the train / val (/ test) split."""

    def eval_split(self, classes: list[str], multilabel: bool) -> Split:
        """The images to evaluate a model of `classes` on."""

    def sample_sizes(self, ds: Dataset, seed: int) -> list[tuple[int, int]]:
        """(width, height) of a sample of the training images, from headers only (for the data-aware defaults)."""

    def sample_pixels(self, ds: Dataset, side: int, seed: int):
        """A sample of the training images decoded grey at `side` px and their labels (photos or glyphs)."""

    def stores(self, ds: Dataset, d: DataConfig, pre: dict[str, Any], on_bad, device, workers: int
               ) -> tuple[Store, Store]:
        """The train and val stores, on `device` where they hold images; prints how the images are read.
        `workers`: DataLoader workers per process when `data.num_workers` is -1 (auto) and they are needed."""
