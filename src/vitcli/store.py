"""Stores: the images of one split as batches. `ImageStore` keeps a listed split decoded in memory (or decodes
it on demand in DataLoader workers); `shards.ShardStore` streams tar shards. Both follow `dataset.Store`."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitcli.dataset import Split
from vitcli.decode import _decode_or_none, decode_many, probe_many
from vitcli.errors import VitcliError


class BadImageLog:
    """Unreadable files: one warning line each (repeats across epochs dropped), a count for the summary, and
    a VitcliError once more than `max_fraction` of `total` are bad (checked live after `check()`)."""

    def __init__(self, *, total: int, max_fraction: float, data_dir: str | Path):
        self.total, self.max_fraction, self.data_dir = total, max_fraction, data_dir
        self.messages: dict[str, None] = {}  # insertion-ordered set
        self.live = False

    def add(self, msg: str) -> None:
        from vitcli.console import warn

        if msg in self.messages:
            return
        self.messages[msg] = None
        warn(f"skipped {msg}")
        if self.live:
            self.check()

    def check(self) -> None:
        """Raise above the allowed share; from now on every new bad file is checked as it is found."""
        self.live = True
        if self.total and len(self) / self.total > self.max_fraction:
            raise VitcliError(f"{len(self)} of {self.total} images in '{self.data_dir}' cannot be read, more "
                              f"than 'data.max_bad_fraction' {self.max_fraction}; fix the data or raise that key")

    def __len__(self) -> int:
        return len(self.messages)


class ImageStore:
    """The images of one split as uint8 (3, S, S) tensors: all decoded up front (cache) or on demand."""

    def __init__(self, split: Split, size: int, interpolation: str, cache: bool, num_workers: int,
                 on_bad=None, progress_label: str = "decoding", pin_memory: bool = False):
        import torch

        self.size, self.interpolation, self.num_workers = size, interpolation, num_workers
        self.pin_memory = pin_memory  # uncached batches in page-locked memory (non-blocking copies to CUDA)
        self.bad: list[str] = []
        self.images = None
        if cache:
            from vitcli.console import progress_bar

            images = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
            keep = []
            with progress_bar(transient=True) as bar:
                task = bar.add_task(progress_label, total=len(split))
                for i, img, err in decode_many(split.paths, size, interpolation, threads=os.cpu_count() or 1):
                    if img is None:
                        self._report(err, on_bad)
                    else:
                        images[i] = img
                        keep.append(i)
                    bar.advance(task)
            self.images = images[keep] if len(keep) < len(split) else images  # (N, 3, S, S)
            split = split.subset(keep)
        else:  # decoded on demand: drop files whose header already fails, so max_bad_fraction holds up front
            errors = probe_many(split.paths)
            for err in filter(None, errors):
                self._report(err, on_bad)
            split = split.subset([i for i, err in enumerate(errors) if err is None])
        self.paths, self.labels = PathList(split.paths), label_tensor(split.labels)
        self._on_bad = on_bad

    def _report(self, err: str, on_bad) -> None:
        self.bad.append(err)
        if on_bad:
            on_bad(err)

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, device) -> ImageStore:
        if self.images is not None:
            self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        return self

    def steps(self, batch_size: int, epoch: int, seed: int, world: int, weights=None) -> int:
        """Batches per rank in one epoch (the same on every rank)."""
        return len(epoch_batches(len(self), batch_size, epoch, seed, 0, world, weights))

    def train_batches(self, batch_size: int, epoch: int, seed: int, rank: int, world: int, skip: int = 0,
                      weights=None, limit: int | None = None) -> Iterator[tuple[Any, Any]]:
        """This rank's seeded shuffled batches of `epoch` (the first `limit`), from batch `skip` on."""
        yield from self.batches(epoch_batches(len(self), batch_size, epoch, seed, rank, world, weights)[skip:limit])

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Any, Any]]:
        """This rank's share of the images, in order."""
        yield from self.batches(sequential_batches(len(self), batch_size, rank, world))

    def epoch_check(self, device, world: int) -> str | None:
        """Streamed stores say whether the epoch saw every image once; an in-memory index order always does."""
        return None

    def batches(self, batches: list[list[int]]) -> Iterator[tuple[Any, Any]]:
        """Yield (uint8 images (B, 3, S, S), labels (B,)) for each list of indices."""
        import torch

        from vitcli.signals import ignore_in_worker

        if self.images is not None:
            for idx in batches:
                t = torch.as_tensor(idx, device=self.labels.device)
                yield self.images[t], self.labels[t]
            return
        loader = torch.utils.data.DataLoader(
            _DecodeDataset(self.paths, self.size, self.interpolation), batch_sampler=batches,
            num_workers=self.num_workers, collate_fn=_collate, persistent_workers=False, pin_memory=self.pin_memory,
            worker_init_fn=ignore_in_worker if self.num_workers > 0 else None,
            multiprocessing_context="spawn" if self.num_workers > 0 and os.name != "posix" else None,
        )
        for images, keep, errors in loader:
            for err in errors:
                self._report(err, self._on_bad)
            if images is None:
                continue
            idx = torch.as_tensor(keep)
            yield images, self.labels[idx]


class PathList:
    """Paths packed into one bytes buffer and an offset array: tens of bytes per image instead of the
    hundreds a list of Path objects costs, and DataLoader workers read it without copying it page by page."""

    def __init__(self, paths: list[Path]):
        import numpy as np

        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buf = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Path:
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return Path(os.fsdecode(self._buf[self._offsets[i]:self._offsets[i + 1]]))

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))


def label_tensor(labels: list):
    """Class indices -> long (N,); multi-hot tuples -> float (N, C)."""
    import torch

    t = torch.tensor(labels, dtype=torch.long)
    return t.float() if t.ndim == 2 else t


class _DecodeDataset:
    def __init__(self, paths, size, interpolation):
        self.paths, self.size, self.interpolation = paths, size, interpolation

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img, err = _decode_or_none((self.paths[i], self.size, self.interpolation))
        return i, img, err


def _collate(items):
    import torch

    good = [(i, img) for i, img, _ in items if img is not None]
    errors = [err for _, img, err in items if img is None]
    if not good:
        return None, [], errors
    return torch.stack([img for _, img in good]), [i for i, _ in good], errors


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  weights: list[float] | None = None, drop_last: bool = True) -> list[list[int]]:
    """Seeded shuffled batches for one epoch, sharded across ranks; `weights` draws a balanced sample."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if weights is not None:
        order = torch.multinomial(torch.tensor(weights, dtype=torch.double), n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    per_rank = n // world
    order = order[: per_rank * world][rank::world].tolist()  # equal length on every rank
    if drop_last and len(order) >= batch_size:
        nb = len(order) // batch_size
    else:
        nb = math.ceil(len(order) / batch_size)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(nb)]


def sequential_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    idx = list(range(rank, n, world))
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]




class ListedSource:
    """What the sources whose images are files (class folders, label files) share: a header-only size sample
    and ImageStores, decoded once and cached in memory when they fit (`data.cache`)."""

    listed = True

    def sample_sizes(self, ds, seed: int) -> list[tuple[int, int]]:
        from vitcli.decode import probe_sizes

        return probe_sizes(ds.train.paths, seed=seed)

    def sample_pixels(self, ds, side: int, seed: int):
        from vitcli.decode import probe_pixels

        return probe_pixels(ds.train, side, seed=seed)

    def stores(self, ds, d, pre: dict[str, Any], on_bad, device, workers: int) -> tuple[ImageStore, ImageStore]:
        from vitcli.console import info

        size = pre["resize_size"]
        est_gb = (len(ds.train) + len(ds.val)) * 3 * size * size / 2**30
        cache = d.cache == "on" or (d.cache == "auto" and est_gb <= d.cache_max_gb)
        workers = d.num_workers if d.num_workers >= 0 else (0 if cache else workers)
        info(f"[bold]images[/] decoded once to {size}x{size} uint8"
             + (f", cached in memory ({est_gb * 1024:.0f} MiB)" if cache else f", not cached, {workers} workers"))
        pin = device.type == "cuda"
        train = ImageStore(ds.train, size, d.interpolation, cache, workers, on_bad, "decoding train", pin)
        val = ImageStore(ds.val, size, d.interpolation, cache, workers, on_bad, "decoding val", pin)
        if cache and device.type != "cpu":
            train.to(device)
            val.to(device)
        return train, val
