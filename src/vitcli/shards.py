"""Datasets larger than memory: WebDataset-style tar shards, written once and streamed by every process.

`write_shards` reads a folder or label file (never writing into it) and packs each split into tar files of
about `size` bytes: per image `<id>.<ext>` (the original bytes) and `<id>.cls` (class index, or comma-separated
indices for multi-label), plus `index.json` (classes, task, images per shard and per class) written last.
Ids are numbered 0..N-1 per split, so "every image once per epoch" can be checked by sums.

`ShardStore` streams them with plain `tarfile` inside DataLoader workers (webdataset would add a dependency
without making the tar reading faster, and we need what it does not give: images per shard known up front so
every rank runs the same number of steps). Per epoch the shard order is shuffled with the seed, shards are
dealt to ranks by image count and then to workers; each worker decodes, draws from a shuffle buffer of
encoded images and batches. Nothing is listed or held per image, so memory does not grow with the dataset.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError

FORMAT = "vitcli-shards-v1"
INDEX = "index.json"
ID_MOD = 2**31 - 1  # the id checksums are kept modulo this prime
FATAL = "\0fatal: "  # marks a worker's message that must stop the run (a shard that cannot be read)
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise VitcliError(f"--size {text!r}: expected a positive size such as 1GB, 500MB or 64KiB")
    return max(1, int(float(m.group(1)) * UNITS[m.group(2).lower()]))


# ----------------------------------------------------------------------------------------------- writing
def write_shards(data: str | Path, out: str | Path, size: str | int = "1GB", *, val_fraction: float = 0.2,
                 seed: int = 0, val_csv: str | None = None, max_bad_fraction: float = 0.05) -> dict[str, Any]:
    """Pack DATA (class folders, train/ + val/, or a label file) into tar shards under OUT; returns the index."""
    from vitcli import data as D
    from vitcli.console import esc, info

    limit = parse_size(size) if isinstance(size, str) else int(size)
    out = Path(out)
    ds = D.scan_dataset(data, val_fraction, seed, val_csv)
    src = Path(data).resolve()
    if src.is_dir() and (out.resolve() == src or src in out.resolve().parents):
        raise VitcliError(f"OUT '{out}' is inside the dataset folder '{data}'; vitcli never writes there")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VitcliError(f"OUT '{out}' already exists and is not an empty folder; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": ds.train, "val": ds.val, "test": ds.test}
    total = sum(len(s) for s in splits.values() if s is not None)
    bad = D.BadImageLog(total=total, max_fraction=max_bad_fraction, data_dir=data)
    index: dict[str, Any] = {"format": FORMAT, "classes": ds.classes, "multilabel": ds.multilabel,
                             "source": str(src), "split_made": ds.split_made, "seed": seed, "splits": {},
                             "class_counts": {}}
    for name, split in splits.items():
        if split is None or not len(split):
            continue
        shards, counts = _write_split(out, name, split, limit, len(ds.classes), bad.add)
        index["splits"][name] = shards
        index["class_counts"][name] = counts
    bad.check()
    from vitcli.files import atomic_write

    text = json.dumps(index, indent=1)
    atomic_write(out / INDEX, lambda f: f.write(text.encode()))  # last: a folder without it is incomplete
    for name, shards in index["splits"].items():
        info(f"[bold]{name}[/] {sum(s['count'] for s in shards)} images in {len(shards)} shard(s)")
    info(f"wrote {esc(str(out / INDEX))}" + (f"; skipped {len(bad)} unreadable file(s)" if len(bad) else ""))
    return index


def _write_split(out: Path, name: str, split, limit: int, n_classes: int, on_bad) -> tuple[list[dict], list[int]]:
    from vitcli.data import probe_many

    shards: list[dict] = []
    counts = [0] * n_classes
    tar, written, next_id = None, 0, 0
    chunk = 4096
    for start in range(0, len(split), chunk):  # probe headers in parallel, a chunk at a time
        paths, labels = split.paths[start:start + chunk], split.labels[start:start + chunk]
        for path, y, err in zip(paths, labels, probe_many(paths), strict=True):
            if err is not None:
                on_bad(err)
                continue
            payload = Path(path).read_bytes()
            if tar is not None and written + len(payload) > limit:
                tar.close()
                tar = None
            if tar is None:
                fname = f"{name}-{len(shards):06d}.tar"
                tar = tarfile.open(out / fname, "w", format=tarfile.USTAR_FORMAT)
                shards.append({"file": fname, "count": 0, "first": next_id})
                written = 0
            cls = ",".join(str(i) for i, v in enumerate(y) if v) if isinstance(y, tuple) else str(y)
            key = f"{next_id:09d}"
            _add(tar, f"{key}{Path(path).suffix.lower()}", payload)
            _add(tar, f"{key}.cls", cls.encode())
            for i in ([i for i, v in enumerate(y) if v] if isinstance(y, tuple) else [y]):
                counts[i] += 1
            written += len(payload) + 1536  # two headers and padding, roughly
            shards[-1]["count"] += 1
            next_id += 1
    if tar is not None:
        tar.close()
    return shards, counts


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(payload), 0o644, 0
    tar.addfile(ti, io.BytesIO(payload))


# ----------------------------------------------------------------------------------------------- opening
def expand_braces(pattern: str) -> list[str]:
    """'a/{000..003}.tar' -> a/000.tar ... a/003.tar (zero padding kept); '{x,y}' -> both."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand_braces(head + o + tail)]


def is_shard_source(data: str | Path | None) -> bool:
    if data is None:
        return False
    s = str(data)
    return (Path(s) / INDEX).is_file() or s.endswith(".tar") or ("{" in s and ".tar" in s)


@dataclass
class ShardData:
    root: Path
    classes: list[str]
    multilabel: bool
    train: ShardStore
    val: ShardStore
    counts: list[int]  # training images (multi-label: positives) per class
    split_made: bool
    val_counts: list[int]  # validation images (multi-label: positives) per class


def open_shards(data: str | Path, *, size: int, interpolation: str, num_workers: int, shuffle_buffer: int,
                on_bad=None) -> ShardData:
    """A shard folder (its index.json), or shard files / a brace pattern beside one, as train and val stores."""
    s = str(data)
    root = Path(s) if (Path(s) / INDEX).is_file() else Path(s.split("{")[0]).parent if "{" in s else Path(s).parent
    if not (root / INDEX).is_file():
        raise VitcliError(f"'{data}': no {INDEX} in '{root}'; write shards with vitcli shard DATA OUT")
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise VitcliError(f"'{root / INDEX}' is not a readable shard index: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise VitcliError(f"'{root / INDEX}' is not a vitcli shard index (format {FORMAT})")
    train = index["splits"].get("train", [])
    if root != Path(s):  # explicit shard files: the train shards among them
        wanted = {Path(p).name for p in expand_braces(s)}
        known = {sh["file"] for sh in train}
        missing = sorted(wanted - known - {sh["file"] for sh in index["splits"].get("val", [])})
        if missing:
            raise VitcliError(f"'{data}': {missing[:3]} not among the train shards listed in '{root / INDEX}'")
        train = [sh for sh in train if sh["file"] in wanted]
    val = index["splits"].get("val", [])
    if not train or not val:
        raise VitcliError(f"'{data}': needs train and val shards; '{root / INDEX}' lists {len(train)} train and "
                          f"{len(val)} val shard(s)")
    for sh in train + val:
        if not (root / sh["file"]).is_file():
            raise VitcliError(f"shard '{root / sh['file']}' listed in {INDEX} is missing")
    kw = {"size": size, "interpolation": interpolation, "num_workers": num_workers, "on_bad": on_bad,
          "n_classes": len(index["classes"]), "multilabel": bool(index["multilabel"])}
    return ShardData(root, list(index["classes"]), bool(index["multilabel"]),
                     ShardStore(root, train, shuffle_buffer=shuffle_buffer, **kw), ShardStore(root, val, **kw),
                     list(index["class_counts"]["train"]), bool(index.get("split_made")),
                     list(index["class_counts"]["val"]))


# ----------------------------------------------------------------------------------------------- streaming
def deal(shards: list[dict], world: int) -> list[list[dict]]:
    """Shards to `world` parts with image counts as even as possible (largest first to the lightest part)."""
    parts: list[list[dict]] = [[] for _ in range(world)]
    load = [0] * world
    for sh in sorted(shards, key=lambda s: -s["count"]):
        r = min(range(world), key=lambda i: (load[i], i))
        parts[r].append(sh)
        load[r] += sh["count"]
    return parts


class ShardStore:
    """One split's shards; yields (uint8 images (B, 3, S, S), labels) batches like ImageStore."""

    def __init__(self, root: Path, shards: list[dict], *, size: int, interpolation: str, num_workers: int,
                 n_classes: int, multilabel: bool, on_bad=None, shuffle_buffer: int = 0):
        self.root, self.shards, self.size, self.interpolation = root, shards, size, interpolation
        self.num_workers, self.n_classes, self.multilabel = max(0, num_workers), n_classes, multilabel
        self.on_bad, self.shuffle_buffer = on_bad, shuffle_buffer
        self.seen = [0, 0, 0]  # images this rank trained on this epoch: count, sum of ids, sum of squared ids

    def __len__(self) -> int:
        return sum(sh["count"] for sh in self.shards)

    def to(self, device) -> ShardStore:
        return self

    def _parts(self, epoch: int, seed: int, world: int, shuffle: bool) -> list[list[list[dict]]]:
        """[rank][worker] -> shards, the same on every rank."""
        order = list(self.shards)
        if shuffle:
            random.Random(seed * 1000003 + epoch).shuffle(order)
        per_rank = deal(order, world) if shuffle else [order[r::world] for r in range(world)]
        w = max(1, self.num_workers)
        parts = [[part[i::w] for i in range(w)] for part in per_rank]  # image counts per worker: epoch-invariant
        if shuffle:
            rng = random.Random(seed * 1000003 + epoch + 1)
            for per_worker in parts:
                for shards in per_worker:
                    rng.shuffle(shards)
        return parts

    def steps(self, batch_size: int, epoch: int, seed: int, world: int, weights=None) -> int:
        """Batches per rank per epoch: the most any rank has (the others pad with empty batches)."""
        parts = self._parts(epoch, seed, world, shuffle=True)
        return max(sum(math.ceil(sum(s["count"] for s in w) / batch_size) for w in r) for r in parts)

    def train_batches(self, batch_size: int, epoch: int, seed: int, rank: int, world: int, skip: int = 0,
                      weights=None, limit: int | None = None):
        """This rank's shuffled batches of `epoch`, padded with empty batches to `steps()` (at most `limit`)
        so that every rank runs the same number of steps; the first `skip` are drawn but not yielded (resume)."""
        import torch

        if weights is not None:
            raise VitcliError("'data.balanced_sampler' needs random access to the images; it does not work with "
                              "streamed shards")
        if world > 1 and len(self.shards) < world:
            raise VitcliError(f"'{self.root}': {len(self.shards)} train shard(s) for {world} processes; write "
                              "at least one shard per process (a smaller vitcli shard --size)")
        n = self.steps(batch_size, epoch, seed, world)
        n = n if limit is None else min(n, limit)
        self.seen = [0, 0, 0]
        done = 0
        for x, y, ids in self._stream(self._parts(epoch, seed, world, True)[rank], batch_size,
                                      seed * 7919 + epoch * 104729 + rank * 1299709):
            done += 1
            if done > n:
                break
            self.seen[0] += len(ids)  # batches skipped on resume were trained before the stop: they count
            self.seen[1] = (self.seen[1] + int(ids.sum())) % ID_MOD
            self.seen[2] = (self.seen[2] + int((ids * ids % ID_MOD).sum())) % ID_MOD
            if done > skip:
                yield x, y
        empty = torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        for _ in range(max(min(done, n), skip), n):
            yield empty, self._labels([])

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """This rank's share of the shards in order (no padding: evaluation has no per-step collectives)."""
        for x, y, _ in self._stream(self._parts(0, 0, world, False)[rank], batch_size, None):
            yield x, y

    def expected(self) -> list[int]:
        """[count, sum of ids, sum of squared ids] over the whole split (mod ID_MOD)."""
        def s1(n: int) -> int:  # 0 + 1 + ... + (n - 1)
            return n * (n - 1) // 2

        def s2(n: int) -> int:  # 0 + 1 + 4 + ... + (n - 1)^2
            return (n - 1) * n * (2 * n - 1) // 6

        ends = [(sh["first"], sh["first"] + sh["count"]) for sh in self.shards]
        return [sum(b - a for a, b in ends), sum(s1(b) - s1(a) for a, b in ends) % ID_MOD,
                sum(s2(b) - s2(a) for a, b in ends) % ID_MOD]

    def epoch_check(self, device, world: int) -> str:
        return self.check_seen(device, world)[1]

    def check_seen(self, device, world: int) -> tuple[bool, str]:
        """Sum every rank's [count, id sum, squared id sum] of the epoch and compare with the split's."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(self.seen, dtype=torch.int64, device=device)
        if world > 1:
            dist.all_reduce(t)
        got = [int(t[0]), int(t[1]) % ID_MOD, int(t[2]) % ID_MOD]
        exp = self.expected()
        ok = got == exp
        return ok, (f"{got[0]} of {exp[0]} images streamed from {len(self.shards)} shards"
                    + (", each exactly once" if ok else "; NOT each exactly once (count or id sums differ)"))

    def _labels(self, ys: list):
        import torch

        if self.multilabel:
            t = torch.zeros((len(ys), self.n_classes))
            for i, y in enumerate(ys):
                t[i, list(y)] = 1.0
            return t
        return torch.tensor(ys, dtype=torch.long)

    def _stream(self, per_worker: list[list[dict]], batch_size: int, seed: int | None):
        import torch

        cls = globals().get("ShardIterable") or __getattr__("ShardIterable")
        it = cls(self.root, per_worker, self.size, self.interpolation, batch_size,
                 self.shuffle_buffer if seed is not None else 0, seed, self.multilabel)
        loader = torch.utils.data.DataLoader(it, batch_size=None, num_workers=self.num_workers,
                                             persistent_workers=False)
        for imgs, ys, ids, errors in loader:
            for err in errors:
                if err.startswith(FATAL):
                    raise VitcliError(err.removeprefix(FATAL))
                if self.on_bad:
                    self.on_bad(err)
            if len(ids):
                yield imgs, self._labels(ys), ids


class _ShardStream:
    """What a DataLoader worker runs: its shards -> decoded, shuffled, batched samples."""

    def __init__(self, root, per_worker, size, interpolation, batch_size, buffer, seed, multilabel):
        self.root, self.per_worker, self.size, self.interpolation = root, per_worker, size, interpolation
        self.batch_size, self.buffer, self.seed, self.multilabel = batch_size, buffer, seed, multilabel

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        shards = self.per_worker[wid] if info is not None else [s for w in self.per_worker for s in w]
        rng = random.Random(None if self.seed is None else self.seed * 31 + wid)
        batch: list = []
        errors: list[str] = []
        from vitcli.data import decode_square

        try:
            for key, name, payload, cls, shard in _shuffled(self._samples(shards), self.buffer, rng):
                try:
                    img = decode_square(f"{shard}:{name}", self.size, self.interpolation, data=payload)
                    batch.append((img, cls, int(key)))
                except VitcliError as e:  # one bad image: reported, counted against data.max_bad_fraction
                    errors.append(str(e))
                if len(batch) == self.batch_size:
                    yield self._collate(batch, errors)
                    batch, errors = [], []
        except VitcliError as e:  # a broken shard: the main process stops with this one line (no worker traceback)
            batch, errors = [], [FATAL + str(e)]
        if batch or errors:
            yield self._collate(batch, errors)

    def _collate(self, batch, errors):
        import torch

        if not batch:
            empty = torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
            return empty, [], torch.empty(0, dtype=torch.long), errors
        imgs = torch.stack([b[0] for b in batch])  # (B, 3, S, S) uint8
        ys = [tuple(int(c) for c in b[1].split(",") if c) if self.multilabel else int(b[1]) for b in batch]
        return imgs, ys, torch.tensor([b[2] for b in batch], dtype=torch.long), errors

    def _samples(self, shards):
        """(key, member name, image bytes, class text, shard path) read sequentially from each tar."""
        for sh in shards:
            path = self.root / sh["file"]
            pending: dict[str, dict[str, Any]] = {}
            found = 0
            try:
                with tarfile.open(path, "r|") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, _, ext = m.name.partition(".")
                        rec = pending.setdefault(key, {})
                        rec["cls" if ext == "cls" else "img"] = tar.extractfile(m).read()
                        if ext != "cls":
                            rec["name"] = m.name
                        if "cls" in rec and "img" in rec:
                            del pending[key]
                            found += 1
                            yield key, rec["name"], rec["img"], rec["cls"].decode(), path
            except (OSError, tarfile.TarError) as e:
                raise VitcliError(f"shard '{path}' cannot be read ({e}); write the shards again with vitcli "
                                  "shard") from None
            if found != sh["count"]:  # cut short at a member boundary: tarfile sees a normal end
                raise VitcliError(f"shard '{path}' holds {found} images, {INDEX} lists {sh['count']}; write the "
                                  "shards again with vitcli shard")


def _shuffled(items, buffer: int, rng: random.Random):
    """Reservoir-style shuffle buffer: hold `buffer` items, emit a random one for each new item."""
    if buffer <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def __getattr__(name: str):
    """`ShardIterable`, a torch IterableDataset over _ShardStream, made on first use so that importing this
    module does not import torch (a module attribute, so DataLoader workers can unpickle it)."""
    if name != "ShardIterable":
        raise AttributeError(name)
    import torch

    cls = type("ShardIterable", (_ShardStream, torch.utils.data.IterableDataset), {"__module__": __name__})
    globals()["ShardIterable"] = cls
    return cls
