"""`vitcli shard DATA OUT`: pack a folder or label file into tar shards (the format shards.py reads).

Per image `<id>.<ext>` (the original bytes) and `<id>.cls` (class index, or comma-separated indices for
multi-label), plus `index.json` (classes, task, images per shard and per class) written last. Ids are numbered
0..N-1 per split, so "every image once per epoch" can be checked by sums. DATA is only ever read.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError
from vitcli.shards import FORMAT, INDEX

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
    from vitcli.console import esc, info
    from vitcli.sources import open_source
    from vitcli.store import BadImageLog

    limit = parse_size(size) if isinstance(size, str) else int(size)
    out = Path(out)
    source = open_source(data, val_csv)
    if not source.listed:
        raise VitcliError(f"'{data}' is already {source.kind}; give the folder or label file to pack")
    ds = source.scan(val_fraction, seed)
    src = Path(data).resolve()
    if src.is_dir() and (out.resolve() == src or src in out.resolve().parents):
        raise VitcliError(f"OUT '{out}' is inside the dataset folder '{data}'; vitcli never writes there")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VitcliError(f"OUT '{out}' already exists and is not an empty folder; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": ds.train, "val": ds.val, "test": ds.test}
    total = sum(len(s) for s in splits.values() if s is not None)
    bad = BadImageLog(total=total, max_fraction=max_bad_fraction, data_dir=data)
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
    from vitcli.decode import probe_many

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
