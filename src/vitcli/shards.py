"""Datasets larger than memory: WebDataset-style tar shards (written by shard_writer.py), streamed by every process.

`ShardSource` is this module's row in the source table (sources.py): shards are recognised by content, and
index.json and each member are validated once (`read_index`, `check_member`, `parse_label`), every refusal one
line naming the shard, member or key.

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
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError

FORMAT = "vitcli-shards-v1"
INDEX = "index.json"
MAX_INDEX_BYTES = 256 * 2**20  # an index.json larger than this is not one vitcli wrote
MAX_MEMBER_BYTES = 2**30  # a shard member larger than this is refused (one image, not a whole dataset)
ID_MOD = 2**31 - 1  # the id checksums are kept modulo this prime
FATAL = "\0fatal: "  # marks a worker's message that must stop the run (a shard that cannot be read)


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


def is_shard_source(data: str | Path) -> bool:
    """Shards by content: a folder whose index.json is vitcli's (or that holds .tar files beside an index.json),
    a regular .tar file, or a brace pattern of .tar files. A class folder that merely holds some other
    index.json, or a folder named photos.tar, is not."""
    s = str(data)
    path = Path(s)
    if path.is_dir():
        index = path / INDEX
        if not index.is_file():
            return False
        return _is_vitcli_index(index) or any(p.suffix == ".tar" and p.is_file() for p in path.iterdir())
    return ("{" in s and ".tar" in s) or (path.suffix.lower() == ".tar" and path.is_file())


def _is_vitcli_index(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            return False
        with open(path, "rb") as f:  # a regular file (is_file above): a FIFO never gets here
            return json.loads(f.read().decode("utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def shard_root(data: str | Path) -> Path:
    """The folder whose index.json describes DATA (a shard folder, shard files, a brace pattern)."""
    s = str(data)
    if Path(s).is_dir():
        return Path(s)
    return Path(s.split("{")[0]).parent if "{" in s else Path(s).parent


def read_index(root: Path) -> dict[str, Any]:
    """index.json, validated once: every key the streaming reads has the right type and range, or one line
    naming the file and key."""
    from vitcli.decode import check_regular

    path = root / INDEX
    if not path.exists():
        raise VitcliError(f"'{root}': no {INDEX}; write shards with vitcli shard DATA OUT")
    check_regular(path, "a shard index", VitcliError)
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise VitcliError(f"'{path}': {path.stat().st_size} bytes, larger than a shard index can be")
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise VitcliError(f"'{path}' is not a readable shard index ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise VitcliError(f"'{path}' is not a vitcli shard index (format {FORMAT})")
    classes, multilabel = index.get("classes"), index.get("multilabel", False)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise VitcliError(f"'{path}': 'classes' must be a list of two or more class names (text), got "
                          f"{_short(classes)}")
    if len(set(classes)) != len(classes):
        raise VitcliError(f"'{path}': 'classes' names a class twice ({_short(classes)})")
    if not isinstance(multilabel, bool):
        raise VitcliError(f"'{path}': 'multilabel' must be true or false, got {_short(multilabel)}")
    index["multilabel"] = multilabel  # absent: single-label
    splits, counts = index.get("splits"), index.get("class_counts")
    if not isinstance(splits, dict) or not isinstance(counts, dict):
        raise VitcliError(f"'{path}': 'splits' and 'class_counts' must be objects keyed by train / val / test")
    seen: dict[str, str] = {}
    for name in ("train", "val"):
        _check_split(path, name, splits.get(name), counts.get(name), len(classes), seen)
    if "test" in splits:
        _check_split(path, "test", splits["test"], counts.get("test"), len(classes), seen)
    return index


def _check_split(path: Path, name: str, shards, counts, n_classes: int, seen: dict[str, str]) -> None:
    where = f"'{path}' splits.{name}"
    if not isinstance(shards, list) or not shards:
        raise VitcliError(f"{where}: needs a non-empty list of shards, got {_short(shards)} (training needs "
                          "train and val shards)")
    ends = []
    for k, sh in enumerate(shards):
        if not isinstance(sh, dict):
            raise VitcliError(f"{where}[{k}]: expected an object with file, count, first; got {_short(sh)}")
        f, count, first = sh.get("file"), sh.get("count"), sh.get("first")
        if not isinstance(f, str) or not re.fullmatch(r"[^/\\\0]+\.tar", f) or f.startswith("."):
            raise VitcliError(f"{where}[{k}].file: {_short(f)} is not a shard file name (name.tar in this folder)")
        for key, v in (("count", count), ("first", first)):
            if not _whole(v):
                raise VitcliError(f"{where}[{k}].{key}: {_short(v)} is not a whole number >= 0")
        if f in seen:
            raise VitcliError(f"{where}[{k}]: shard '{f}' is listed twice (also in splits.{seen[f]}); each image "
                              "must be streamed once")
        seen[f] = name
        ends.append((first, first + count))
    ends.sort()
    if any(b[0] < a[1] for a, b in zip(ends, ends[1:], strict=False)):
        raise VitcliError(f"{where}: the shards' id ranges (first, first + count) overlap")
    if not isinstance(counts, list) or len(counts) != n_classes or not all(_whole(c) for c in counts):
        raise VitcliError(f"'{path}' class_counts.{name}: expected {n_classes} whole numbers >= 0 (one per "
                          f"class), got {_short(counts)}")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def open_index(data: str | Path) -> tuple[Path, dict[str, Any], list[dict], list[dict]]:
    """(root, validated index, train shards, val shards) of DATA; explicit shard files select train shards."""
    from vitcli.decode import check_regular

    s = str(data)
    root = shard_root(data)
    index = read_index(root)
    train, val = index["splits"]["train"], index["splits"]["val"]
    if root != Path(s):  # explicit shard files: the train shards among them
        wanted = {Path(p).name for p in expand_braces(s)}
        missing = sorted(wanted - {sh["file"] for sh in train} - {sh["file"] for sh in val})
        if missing:
            raise VitcliError(f"'{data}': {missing[:3]} not among the train shards listed in '{root / INDEX}'")
        train = [sh for sh in train if sh["file"] in wanted]
        if not train:
            raise VitcliError(f"'{data}': names no train shard listed in '{root / INDEX}'")
    for sh in train + val:
        if not (root / sh["file"]).exists():
            raise VitcliError(f"shard '{root / sh['file']}' listed in {INDEX} is missing")
        check_regular(root / sh["file"], "a shard file", VitcliError)
    return root, index, train, val


class ShardSource:
    """DATA is tar shards written by `vitcli shard`: counted from index.json, streamed, never listed."""

    kind = "tar shards"
    listed = False

    def __init__(self, where: Path):
        self.where = where
        self.opened: tuple[Path, dict[str, Any], list[dict], list[dict]] | None = None

    def scan(self, val_fraction: float, seed: int) -> Any:
        from vitcli.dataset import Dataset, Split

        self.opened = root, index, train, val = open_index(self.where)
        counts = index["class_counts"]["train"]  # the whole split's, also when shard files pick some of it
        sizes = (sum(sh["count"] for sh in train), sum(sh["count"] for sh in val))
        return Dataset(root, list(index["classes"]), Split(), Split(), split_made=bool(index.get("split_made")),
                       multilabel=index["multilabel"], source=root, streamed=sizes,
                       streamed_counts=(list(counts), list(index["class_counts"]["val"])))

    def eval_split(self, classes: list[str], multilabel: bool) -> Any:
        raise VitcliError(f"'{self.where}': shards stream images that have no files to evaluate one by one; give "
                          "the folder or label file the shards were made from")

    def sample_sizes(self, ds, seed: int) -> list[tuple[int, int]]:
        """Header sizes of the first images of the train shards (in file order: no seed needed)."""
        return sample_sizes(ds.root, (self.opened or open_index(self.where))[2])

    def sample_pixels(self, ds, side: int, seed: int):
        """Grey `side` px images from the start of the train shards and their labels (as decode.probe_pixels)."""
        root, index, train, _ = self.opened or open_index(self.where)
        return sample_pixels(root, train, side, len(index["classes"]), index["multilabel"])

    def stores(self, ds, d, pre: dict[str, Any], on_bad, device, workers: int) -> tuple[ShardStore, ShardStore]:
        from vitcli.console import info

        if d.balanced_sampler:
            raise VitcliError("'data.balanced_sampler' needs random access to the images; turn it off for shards")
        root, index, train, val = self.opened or open_index(self.where)
        workers = d.num_workers if d.num_workers >= 0 else workers
        kw = {"size": pre["resize_size"], "interpolation": d.interpolation, "num_workers": workers,
              "on_bad": on_bad, "n_classes": len(index["classes"]), "multilabel": index["multilabel"]}
        info(f"[bold]images[/] streamed from {len(train)} + {len(val)} shards ({workers} workers per process, "
             f"shuffle buffer {d.shuffle_buffer})")
        return ShardStore(root, train, shuffle_buffer=d.shuffle_buffer, **kw), ShardStore(root, val, **kw)


def sample_sizes(root: Path, shards: list[dict], sample: int = 256) -> list[tuple[int, int]]:
    """(width, height) of up to `sample` images read from the start of `shards` (headers only)."""
    from PIL import Image

    from vitcli.decode import allowed_formats

    sizes: list[tuple[int, int]] = []
    for sh in shards:
        try:
            with tarfile.open(root / sh["file"], "r|") as tar:
                for m in tar:
                    if len(sizes) >= sample:
                        return sizes
                    if not m.isfile() or m.name.endswith(".cls") or m.size > MAX_MEMBER_BYTES:
                        continue
                    try:
                        with Image.open(io.BytesIO(tar.extractfile(m).read()), formats=allowed_formats()) as img:
                            sizes.append(img.size)
                    except Exception:  # unreadable images are reported when they are decoded
                        continue
        except (OSError, tarfile.TarError):  # reported, with its name, when the shard is streamed
            continue
    return sizes


def sample_pixels(root: Path, shards: list[dict], side: int, n_classes: int, multilabel: bool, sample: int = 512):
    """Up to `sample` images from the start of `shards`, decoded grey at `side` px: (uint8 (N, side, side),
    labels); members that do not decode or parse are left out (they are reported when streamed)."""
    import numpy as np

    from vitcli.decode import decode_square

    imgs, labels, pending = [], [], {}
    for sh in shards:
        try:
            with tarfile.open(root / sh["file"], "r|") as tar:
                for m in tar:
                    if len(imgs) >= sample:
                        break
                    if not m.isfile() or m.size > MAX_MEMBER_BYTES:
                        continue
                    key, _, ext = m.name.rpartition(".")
                    data = tar.extractfile(m).read()
                    if ext == "cls" and key in pending:
                        try:
                            labels.append(parse_label(root / sh["file"], key, data, n_classes, multilabel))
                            imgs.append(pending.pop(key))
                        except VitcliError:
                            pending.pop(key)
                    elif ext != "cls":
                        try:
                            pending[key] = decode_square(m.name, side, "bilinear", data=data).float()  # (3, s, s)
                        except Exception:
                            continue
        except (OSError, tarfile.TarError):
            continue
    if not imgs:
        return np.zeros((0, side, side), np.uint8), []
    rgb = np.stack([x.numpy() for x in imgs])  # (N, 3, side, side)
    grey = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    return grey.round().astype(np.uint8), labels


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
                 self.shuffle_buffer if seed is not None else 0, seed, self.multilabel, self.n_classes)
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

    def __init__(self, root, per_worker, size, interpolation, batch_size, buffer, seed, multilabel, n_classes):
        self.root, self.per_worker, self.size, self.interpolation = root, per_worker, size, interpolation
        self.batch_size, self.buffer, self.seed, self.multilabel = batch_size, buffer, seed, multilabel
        self.n_classes = n_classes

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        shards = self.per_worker[wid] if info is not None else [s for w in self.per_worker for s in w]
        rng = random.Random(None if self.seed is None else self.seed * 31 + wid)
        batch: list = []
        errors: list[str] = []
        from vitcli.decode import decode_square

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
        return imgs, [b[1] for b in batch], torch.tensor([b[2] for b in batch], dtype=torch.long), errors

    def _samples(self, shards):
        """(key, member name, image bytes, label, shard path) read sequentially from each tar, each member
        checked once (`check_member`)."""
        for sh in shards:
            path = self.root / sh["file"]
            pending: dict[str, dict[str, Any]] = {}
            found = 0
            try:
                with tarfile.open(path, "r|") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, ext = check_member(path, m, sh)
                        rec = pending.setdefault(key, {})
                        rec["cls" if ext == "cls" else "img"] = tar.extractfile(m).read()
                        if ext != "cls":
                            rec["name"] = m.name
                        if "cls" in rec and "img" in rec:
                            del pending[key]
                            found += 1
                            label = parse_label(path, key, rec["cls"], self.n_classes, self.multilabel)
                            yield key, rec["name"], rec["img"], label, path
            except (OSError, tarfile.TarError, EOFError) as e:
                raise VitcliError(f"shard '{path}' cannot be read ({e}); write the shards again with vitcli "
                                  "shard") from None
            if found != sh["count"]:  # cut short at a member boundary: tarfile sees a normal end
                raise VitcliError(f"shard '{path}' holds {found} images, {INDEX} lists {sh['count']}; write the "
                                  "shards again with vitcli shard")


def check_member(path: Path, m: tarfile.TarInfo, sh: dict) -> tuple[str, str]:
    """(key, extension) of a shard member named `<9-digit id>.<ext>` with the id in the shard's range, or one
    line naming the shard and member."""
    from vitcli.decode import IMAGE_EXTS

    match = re.fullmatch(r"(\d{9})\.([A-Za-z0-9]{1,5})", m.name)
    if not match:
        raise VitcliError(f"shard '{path}' member {_short(m.name)}: not a vitcli member name (<9-digit id>.<ext>); "
                          "write the shards with vitcli shard")
    key, ext = match.group(1), match.group(2).lower()
    if ext != "cls" and f".{ext}" not in IMAGE_EXTS:
        raise VitcliError(f"shard '{path}' member '{m.name}': extension .{ext} is neither an image nor .cls")
    if not sh["first"] <= int(key) < sh["first"] + sh["count"]:
        raise VitcliError(f"shard '{path}' member '{m.name}': id {int(key)} is outside the shard's range "
                          f"{sh['first']}..{sh['first'] + sh['count'] - 1} in {INDEX}")
    if m.size > MAX_MEMBER_BYTES:
        raise VitcliError(f"shard '{path}' member '{m.name}': {m.size} bytes, more than one image can be")
    return key, ext


def parse_label(path: Path, key: str, raw: bytes, n_classes: int, multilabel: bool):
    """A `.cls` member -> class index (multi-label: tuple of indices), each in range(n_classes)."""
    text = raw.decode("ascii", "replace").strip()
    parts = text.split(",") if multilabel else [text]
    if (not multilabel or text) and not all(re.fullmatch(r"\d{1,9}", p) and int(p) < n_classes for p in parts):
        raise VitcliError(f"shard '{path}' member '{key}.cls': {_short(text)} is not "
                          + ("comma-separated class indices" if multilabel else "a class index")
                          + f" in 0..{n_classes - 1}")
    if not multilabel:
        return int(text)
    return tuple(sorted({int(p) for p in parts})) if text else ()


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
