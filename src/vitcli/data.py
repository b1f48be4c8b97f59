"""Folder scanning, splits, safe image decoding, the uint8 image store and batched tensor augmentation.

Every image is decoded once to a square uint8 tensor of side `resize_size` (shorter side resized, center
crop). Evaluation center-crops `img_size` from it; training draws random-resized crops from it on the
compute device. The dataset folder is only ever read.
"""

from __future__ import annotations

import math
import os
import random
import stat
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, first_line, shown

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PIL_FORMATS = ["JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"]  # the only decoders vitcli opens files with
SPLIT_NAMES = ("train", "val", "test")


class BadImage(VitcliError):
    """One file that cannot be used as an image; the message starts with its path."""


# ----------------------------------------------------------------------------------------------- scanning
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


def label_text(classes: list[str], y) -> str:
    """A label as text: the class name, or 'a|b' for a multi-hot tuple."""
    return "|".join(c for c, v in zip(classes, y, strict=True) if v) if isinstance(y, tuple) else classes[y]


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def is_run_folder(folder: str | Path) -> bool:
    """A folder vitcli wrote (train run, lr finder, eval figures): never data, even inside DATA."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return False
    return (("config.yaml" in names and bool(names & {"metrics.csv", "last.pt", "best.pt"}))
            or "lr_find.csv" in names or {"confusion.png", "reliability.png"} <= names)


def _holds_runs(folder: Path) -> bool:
    """`folder` is a run folder, or an output folder of run folders (runs/ with train/, train-2/ ...: run
    folders and no images of its own)."""
    if is_run_folder(folder):
        return True
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if any(Path(e.name).suffix.lower() in IMAGE_EXTS for e in entries):  # names only: no stat per file
        return False
    return any(_is_dir(e) and is_run_folder(e.path) for e in entries)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # the type from the folder listing; a stat only for a symlink
    except OSError:  # a symlink loop
        return False


def _inside(path: str, root: str) -> bool:
    """Resolved `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def file_kind(st_mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(st_mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path) -> None:
    """Raise BadImage unless `path` is a regular file: opening a FIFO or a device would hang or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImage(f"{path}: " + ("dangling symlink" if os.path.islink(path) else "file not found")) from None
    except OSError as e:
        raise BadImage(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(f"{path}: {file_kind(st.st_mode)}, not an image file")


class ScanLog:
    """What a folder scan skipped and why: one warning line each (the first MAX_LINES), and each real file
    (symlinks resolved) counted once across the whole scan."""

    MAX_LINES = 10

    def __init__(self, root: str | Path | None = None):
        self.root = os.path.realpath(root) if root is not None else None
        self.files: dict[str, Path] = {}  # resolved path -> the path it was counted under
        self.count = 0

    def skip(self, msg: str) -> None:
        from vitcli.console import warn

        self.count += 1
        if self.count <= self.MAX_LINES:
            warn(f"skipped {msg}")

    def finish(self) -> None:
        from vitcli.console import warn

        if self.count > self.MAX_LINES:
            warn(f"skipped {self.count - self.MAX_LINES} more entries (files that are not images, links and "
                 f"aliases), {self.count} in all")
            self.count = 0

    def alias(self, link: str) -> bool:
        """True when the symlink `link` points inside the dataset: an alias of data that is read anyway."""
        return self.root is not None and _inside(os.path.realpath(link), self.root)


def list_images(folder: Path, log: ScanLog | None = None) -> list[Path]:
    """Regular image files under `folder`, recursively, sorted, each real file once. Skipped, with one line
    each: FIFOs, devices and dangling links; links that point back inside the dataset (aliases); folders
    vitcli wrote (run folders); links to a file already counted. Hidden entries are ignored silently."""
    own = log is None
    log = log or ScanLog(folder)
    out: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to a folder already read
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if is_hidden(d):
                continue
            if os.path.islink(full) and (log.alias(full) or _inside(real, os.path.realpath(full))):
                log.skip(f"{full}: a link to {os.path.realpath(full)}, inside the dataset (an alias; its "
                         "images count once, where they are)")
            elif is_run_folder(full):
                log.skip(f"{full}: a vitcli run folder, not data")
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if is_hidden(name) or Path(name).suffix.lower() not in IMAGE_EXTS:
                continue
            path = Path(dirpath) / name
            try:
                check_regular(path)
            except BadImage as e:
                log.skip(str(e))
                continue
            link = os.path.islink(path)
            if link and log.alias(str(path)):
                log.skip(f"{path}: a link to {os.path.realpath(path)}, inside the dataset (an alias; counted "
                         "once, where it is)")
                continue
            key = os.path.realpath(path) if link else os.path.join(real, name)  # the folder is resolved once
            if key in log.files:
                log.skip(f"{path}: the same file as {log.files[key]} (counted once)")
                continue
            log.files[key] = path
            out.append(path)
    if own:
        log.finish()
    return out


def class_folders(folder: Path, log: ScanLog | None = None) -> list[str]:
    """Class subfolders: hidden ones, folders vitcli wrote, and links to folders inside the dataset (or
    above it) are not classes; the ones a user may have meant as classes are reported."""
    log = log or ScanLog(folder)
    real = os.path.realpath(folder)
    classes = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.name.startswith("__"):
            log.skip(f"{p}: folder names starting with '__' or '.' are hidden, not classes")
        elif _inside(real, os.path.realpath(p)) or (p.is_symlink() and log.alias(str(p))):
            log.skip(f"{p}: a link to {os.path.realpath(p)}, inside the dataset (an alias, not a class)")
        elif _holds_runs(p):
            log.skip(f"{p}: holds vitcli run folders, not images (outputs never belong inside DATA)")
        else:
            classes.append(p.name)
    return classes


def scan_classes(folder: Path, classes: list[str] | None = None, log: ScanLog | None = None
                 ) -> tuple[list[str], Split]:
    """Images of a folder of class subfolders; `classes` fixes the label order (e.g. the train split's)."""
    own = log is None
    log = log or ScanLog(folder)
    found = class_folders(folder, log)
    if classes is None:
        if len(found) < 2:
            raise VitcliError(f"'{folder}' needs at least two class subfolders with images, found "
                              f"{len(found)}" + (f" ({found[0]})" if found else ""))
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise VitcliError(f"'{folder}' has class folder(s) {shown(extra[:5])} that are not among the classes "
                              f"{shown(classes[:10])}")
    split = Split()
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = list_images(folder / name, log)
        if not files:
            raise VitcliError(f"class folder '{folder / name}' holds no images (extensions: "
                              f"{', '.join(sorted(IMAGE_EXTS))})")
        split.paths += files
        split.labels += [label] * len(files)
    if own:
        log.finish()
    return classes, split


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


def scan_dataset(root: str | Path, val_fraction: float, seed: int, val_csv: str | Path | None = None) -> Dataset:
    """DATA is train/ + val/ (+ test/), class folders split in memory into train and val, or a label file."""
    from vitcli.manifest import is_manifest

    root = Path(root)
    if is_manifest(root) or val_csv:
        if not is_manifest(root):
            raise VitcliError(f"'data.val_csv' needs DATA to be a .csv, .tsv or .jsonl label file, got '{root}'")
        return scan_label_file(root, val_fraction, seed, val_csv)
    if not root.exists():
        raise VitcliError(f"dataset folder '{root}' does not exist")
    if not root.is_dir():
        raise VitcliError(f"dataset '{root}' is not a folder; give a folder of class subfolders or of "
                          "train/ and val/, or a .csv / .tsv / .jsonl label file")
    log = ScanLog(root)  # one log for every split: a file linked into two splits counts once
    try:
        if (root / "train").is_dir():
            classes, train = scan_classes(root / "train", log=log)
            val = scan_classes(root / "val", classes, log)[1] if (root / "val").is_dir() else None
            test = scan_classes(root / "test", classes, log)[1] if (root / "test").is_dir() else None
            if val is None:
                tr, va = stratified_split(train.labels, val_fraction, seed)
                return Dataset(root, classes, train.subset(tr), train.subset(va), test, split_made=True)
            return Dataset(root, classes, train, val, test)
        classes, everything = scan_classes(root, log=log)
        tr, va = stratified_split(everything.labels, val_fraction, seed)
        return Dataset(root, classes, everything.subset(tr), everything.subset(va), None, split_made=True)
    finally:
        log.finish()


def check_val_split(ds: Dataset, val_fraction: float) -> None:
    """A dataset to train on needs validation images; say what would give it some."""
    if len(ds.val):
        return
    if not ds.split_made:
        raise VitcliError(f"'{ds.root}': the val/ folder holds no images")
    if val_fraction == 0:
        raise VitcliError(f"'{ds.root}': no validation images with 'data.val_fraction' 0; raise it (e.g. 0.2) or "
                          "add a val/ folder")
    raise VitcliError(f"'{ds.root}': every class has a single image, so none can be held out for validation; "
                      "add images (2 or more in some class) or a val/ folder")


def scan_label_file(path: Path, val_fraction: float, seed: int, val_csv: str | Path | None = None) -> Dataset:
    """A label file as a Dataset: its split column, or `val_csv`, or a seeded stratified split (of its train
    rows when the split column names no val rows)."""
    from vitcli.manifest import read_manifest

    m = read_manifest(path, val_csv)
    parts = {k: Split(*v) for k, v in m.parts.items()}
    kw = {"multilabel": m.multilabel, "source": path}
    test = parts.get("test") or None
    if "all" in parts or (not len(parts["val"]) and val_fraction > 0):
        pool = parts.get("all", parts.get("train"))
        tr, va = stratified_split(pool.labels, val_fraction, seed)
        return Dataset(path.parent, m.classes, pool.subset(tr), pool.subset(va), test, split_made=True, **kw)
    return Dataset(path.parent, m.classes, parts["train"], parts["val"], test, **kw)


def scan_eval_folder(root: str | Path, classes: list[str], multilabel: bool = False) -> Split:
    """Images to evaluate: `root` itself as class folders, or its test/ (else val/) split, or a label file."""
    from vitcli.manifest import is_manifest, read_manifest

    root = Path(root)
    if is_manifest(root):  # the split column's test rows, else its val rows, else every row
        parts = read_manifest(root, classes=classes, multilabel=multilabel).parts
        for name in ("test", "val", "all"):
            if len(parts.get(name, ((), ()))[0]):
                return Split(*parts[name])
        return Split()
    if multilabel:
        raise VitcliError(f"'{root}': a multi-label model is evaluated on a .csv / .tsv / .jsonl label file")
    if not root.is_dir():
        raise VitcliError(f"dataset folder '{root}' does not exist" if not root.exists()
                          else f"dataset '{root}' is not a folder")
    data_root = root
    for name in ("test", "val"):
        if (root / name).is_dir():
            root = root / name
            break
    log = ScanLog(data_root)
    try:
        return scan_classes(root, classes, log)[1]
    finally:
        log.finish()


# ----------------------------------------------------------------------------------------------- decoding
def allowed_formats() -> list[str]:
    """PIL_FORMATS as registered decoders (Image.init loads the plugins, MPO among them)."""
    from PIL import Image

    Image.init()
    pil_warning_filters()
    return [f for f in PIL_FORMATS if f in Image.OPEN]


def pil_warning_filters() -> None:
    """Process-wide filters (catch_warnings is not thread-safe and images decode in threads): Pillow's
    decompression-bomb warning is an error, its EXIF / palette UserWarnings are silent (each file is either
    used or reported on one line)."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def load_rgb(path: str | Path, data: bytes | None = None):
    """Open an image as RGB: format allowlist, decompression-bomb limit as an error, EXIF orientation,
    16-bit scaled to 8-bit, transparency composited on white. With `data`, decode those bytes (a shard
    member) and use `path` only in messages."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if data is None:
        check_regular(path)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path, formats=allowed_formats()) as img:
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # broken EXIF: keep the pixels as stored
                pass
            return to_rgb(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadImage(f"{path}: image too large (decompression-bomb limit "
                       f"{Image.MAX_IMAGE_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        if (data is not None and not data) or (data is None and path.is_file() and path.stat().st_size == 0):
            raise BadImage(f"{path}: empty file (0 bytes)") from None
        raise BadImage(f"{path}: not an image in an allowed format ({', '.join(PIL_FORMATS)})") from None
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadImage(f"{path}: is a folder, not an image") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadImage(f"{path}: unreadable image ({first_line(e)})"
                       ) from None


def to_rgb(img):
    """Any PIL mode -> RGB; 16/32-bit grey is scaled by its bit depth, not clipped."""
    import numpy as np
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if arr.max(initial=0) > 65535:
            top = float(arr.max())
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def resample_filter(name: str) -> int:
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[name]


def decode_square(path: str | Path, size: int, interpolation: str = "bicubic", data: bytes | None = None):
    """File (or its bytes) -> uint8 tensor (3, size, size): shorter side resized to `size`, center crop."""
    import numpy as np
    import torch

    img = load_rgb_draft(path, size) if data is None else load_rgb(path, data)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample_filter(interpolation), reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)  # (size, size, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size)


def load_rgb_draft(path: str | Path, size: int):
    """load_rgb, but let the JPEG decoder downscale by a power of two while staying >= size (much faster)."""
    from PIL import Image

    path = Path(path)
    check_regular(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            with Image.open(path, formats=allowed_formats()) as probe:
                if probe.format == "JPEG" and not _has_rotation(probe):
                    probe.draft("RGB", (size, size))
                    probe.load()
                    return to_rgb(probe.copy())
        except Exception:
            pass  # let load_rgb produce the precise error
    return load_rgb(path)


def _has_rotation(img) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:
        return True


def resize_size_for(img_size: int, crop_pct: float) -> int:
    return int(math.floor(img_size / crop_pct))


def preprocess_info(img_size: int, crop_pct: float, interpolation: str, mean, std) -> dict[str, Any]:
    """What prediction must repeat exactly; stored in every checkpoint."""
    return {"img_size": img_size, "resize_size": resize_size_for(img_size, crop_pct), "crop_pct": crop_pct,
            "interpolation": interpolation, "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


# ----------------------------------------------------------------------------------------------- image store
def _decode_or_none(args):
    path, size, interpolation = args
    try:
        return decode_square(path, size, interpolation), None
    except BadImage as e:
        return None, str(e)


def decode_many(paths: list[Path], size: int, interpolation: str, threads: int, progress=None):
    """Decode in a thread pool (PIL releases the GIL); yields (index, tensor or None, error or None)."""
    jobs = [(p, size, interpolation) for p in paths]
    if threads <= 1:
        for i, job in enumerate(jobs):
            yield (i, *_decode_or_none(job))
        return
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        for i, res in enumerate(pool.map(_decode_or_none, jobs, chunksize=16)):
            yield (i, *res)
    finally:  # stopped (a signal, an error): drop the queued images instead of decoding them all first
        pool.shutdown(wait=True, cancel_futures=True)


def probe_image(path: str | Path) -> str | None:
    """Cheap header check (format allowlist, size limit) without decoding: None, or load_rgb's message."""
    from PIL import Image

    try:
        check_regular(path)
        with Image.open(path, formats=allowed_formats()):
            return None
    except BadImage as e:
        return str(e)
    except Exception:
        try:
            load_rgb(path)  # the precise message; a full decode only for a file that already failed
        except BadImage as e:
            return str(e)
        return None


def probe_sizes(paths: list[Path], sample: int = 256, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of a seeded sample of the images, from their headers only (no pixel decoding)."""
    from PIL import Image

    picked = random.Random(seed).sample(paths, sample) if len(paths) > sample else paths

    def size(path: Path) -> tuple[int, int] | None:
        try:
            with Image.open(path, formats=allowed_formats()) as img:
                return img.size
        except Exception:  # unreadable files are reported when the images are decoded
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [s for s in pool.map(size, picked) if s is not None]


def probe_pixels(split: Split, side: int, sample: int = 512, seed: int = 0):
    """A seeded sample of the images decoded small and grey: (uint8 array (N, side, side), their labels);
    unreadable files are left out (they are reported when the images are decoded)."""
    import numpy as np

    n = len(split)
    picked = random.Random(seed).sample(range(n), sample) if n > sample else list(range(n))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        got = list(pool.map(_decode_or_none, [(split.paths[i], side, "bilinear") for i in picked]))
    keep = [k for k, (x, _) in enumerate(got) if x is not None]
    if not keep:
        return np.zeros((0, side, side), np.uint8), []
    rgb = np.stack([got[k][0].numpy() for k in keep]).astype(np.float32)  # (N, 3, side, side)
    grey = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # (N, side, side)
    return grey.round().astype(np.uint8), [split.labels[picked[k]] for k in keep]


def probe_many(paths: list[Path]) -> list[str | None]:
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(probe_image, paths, chunksize=64))


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


# ----------------------------------------------------------------------------------------------- transforms
def normalize(x, mean, std):
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) normalised."""
    import torch

    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def normalize_(x, mean, std):
    """In place: float (B, 3, H, W) in [0, 255] -> normalised."""
    import torch

    scale = torch.tensor([1 / (255.0 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=x.device).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


def crop_grid(theta, size: int, device, rotated: bool | None = None):
    """F.affine_grid(theta, (B, 3, size, size)) for a CPU theta (B, 2, 3); built separably (x from the column,
    y from the row, several times cheaper) when the window is not rotated (`rotated` None: look at theta)."""
    import torch
    import torch.nn.functional as F

    B = theta.shape[0]
    th = theta.to(device, non_blocking=True)
    if rotated is None:
        rotated = bool(theta[:, 0, 1].any() or theta[:, 1, 0].any())
    if rotated:
        return F.affine_grid(th, [B, 3, size, size], align_corners=False)
    base = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1  # (size,) pixel centres
    gx = th[:, 0, 0].view(B, 1, 1) * base.view(1, 1, size) + th[:, 0, 2].view(B, 1, 1)  # (B, 1, size)
    gy = th[:, 1, 1].view(B, 1, 1) * base.view(1, size, 1) + th[:, 1, 2].view(B, 1, 1)  # (B, size, 1)
    return torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (B, size, size, 2)


def center_crop(x, size: int):
    """(B, C, S, S) -> (B, C, size, size)."""
    s = x.shape[-1]
    top = (s - size) // 2
    return x[..., top:top + size, top:top + size]


class TrainAugment:
    """Batched augmentation on the compute device: random-resized crop + flip in one affine resample,
    optional RandAugment (timm, per image), normalisation, and random erasing (timm)."""

    def __init__(self, cfg, generator):
        self.cfg, self.g = cfg, generator
        self.randaug = None
        if cfg.randaugment:
            from timm.data.auto_augment import rand_augment_transform

            try:
                self.randaug = rand_augment_transform(cfg.randaugment, {"translate_const": 10})
            except Exception as e:
                raise VitcliError(f"'data.randaugment' {cfg.randaugment!r} is not a valid timm RandAugment "
                                  f"spec (e.g. rand-m9-mstd0.5): {e}") from None
        self.erase = None
        if cfg.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=cfg.reprob, mode="pixel", device="cpu")

    def __call__(self, x):
        """uint8 (B, 3, S, S) -> float (B, 3, img_size, img_size), normalised."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        if self.randaug is not None:
            x = self._randaugment(x)
        B, dev = x.shape[0], x.device
        g = self.g
        area = torch.empty(B).uniform_(cfg.scale_min, 1.0, generator=g)
        logr = torch.empty(B).uniform_(-math.log(cfg.ratio_max), math.log(cfg.ratio_max), generator=g)
        ratio = logr.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the side
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(B, generator=g) * (1 - w) + w / 2) * 2 - 1  # crop centre in [-1, 1]
        cy = (torch.rand(B, generator=g) * (1 - h) + h / 2) * 2 - 1
        flip = torch.where(torch.rand(B, generator=g) < cfg.hflip, -1.0, 1.0)
        if cfg.translate > 0:  # shift the window, past the border too (filled with the edge pixels)
            cx = cx + torch.empty(B).uniform_(-2 * cfg.translate, 2 * cfg.translate, generator=g)
            cy = cy + torch.empty(B).uniform_(-2 * cfg.translate, 2 * cfg.translate, generator=g)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        if cfg.rotate > 0:  # rotated window: theta[:, :, :2] = R(angle) @ diag(w * flip, h)
            angle = torch.empty(B).uniform_(-cfg.rotate, cfg.rotate, generator=g) * (math.pi / 180)
            cos, sin = angle.cos(), angle.sin()
            theta[:, 0, 0], theta[:, 0, 1] = w * flip * cos, -h * sin
            theta[:, 1, 0], theta[:, 1, 1] = w * flip * sin, h * cos
        size = cfg.img_size
        grid = crop_grid(theta, size, dev, rotated=cfg.rotate > 0)  # (B, size, size, 2)
        pad = "border" if cfg.translate > 0 or cfg.rotate > 0 else "reflection"
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=pad, align_corners=False)
        if cfg.color_jitter > 0:
            out = self._jitter(out)
        out = normalize_(out, cfg.mean, cfg.std)  # bilinear weights sum to 1: same as normalising first, cheaper
        if self.erase is not None:
            self.erase.device = out.device
            out = self.erase(out)
        return out  # (B, 3, img_size, img_size)

    def _jitter(self, x):
        """Brightness, contrast and saturation of each image times a random factor in [1 - j, 1 + j]."""
        import torch

        j, g, B = self.cfg.color_jitter, self.g, x.shape[0]
        b, c, s = (torch.empty(B, 1, 1, 1).uniform_(1 - j, 1 + j, generator=g).to(x.device) for _ in range(3))
        grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = grey + (x - grey) * s  # (B, 3, H, W): saturation about each pixel's grey
        mean = grey.mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
        return ((x - mean) * c + mean * b).clamp_(0, 255)  # contrast about the image's mean, then brightness

    def _randaugment(self, x):
        import numpy as np
        import torch
        from PIL import Image

        out = []
        for img in x.cpu():
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            out.append(torch.from_numpy(np.asarray(self.randaug(pil)).copy()).permute(2, 0, 1))
        return torch.stack(out).to(x.device)


def eval_transform(x, pre: dict[str, Any]):
    """uint8 (B, 3, resize_size, resize_size) -> normalised float (B, 3, img_size, img_size)."""
    return normalize(center_crop(x, pre["img_size"]), pre["mean"], pre["std"])
