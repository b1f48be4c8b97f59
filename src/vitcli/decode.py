"""Image decoding, one rule for every source: a file (or a shard member's bytes) -> a square uint8 RGB tensor.

Only allow-listed Pillow decoders open files; the decompression-bomb warning is an error; EXIF orientation is
applied; transparency is composited on white. Pixel modes map to 8 bits by their declared range (`to_rgb`):
8-bit modes as stored, 16-bit grey (I;16*) divided by 65535 / 255, 32-bit integer grey (I) by 65535 / 255 when
its values fit 16 bits and clipped otherwise, float grey (F) read as 0..1 when every value lies in 0..1 and as
0..255 otherwise. A path that is not a regular file (FIFO, device, folder) is refused before it is opened.
"""

from __future__ import annotations

import math
import os
import random
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, first_line

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PIL_FORMATS = ["JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"]  # the only decoders vitcli opens files with


class BadImage(VitcliError):
    """One file that cannot be used as an image; the message starts with its path."""

def file_kind(st_mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(st_mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path, what: str = "an image file", error: type[VitcliError] = BadImage) -> None:
    """Raise `error` (a line starting with the path) unless `path` is a regular file: opening a FIFO or a
    device would hang or never end. The one guard for every path that comes from a listing, a label file or
    a shard index, before anything opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: " + ("dangling symlink" if os.path.islink(path) else "file not found")) from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {file_kind(st.st_mode)}, not {what}")


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
        raise BadImage(f"{path}: unreadable image ({first_line(e)})") from None


def to_rgb(img):
    """Any PIL mode -> RGB. Grey modes by their range (`grey_range`), never by an image's own maximum."""
    import numpy as np
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.clip(arr / grey_range(img.mode, arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def grey_range(mode: str, arr) -> float:
    """The value that maps to white: I;16* -> 65535; I (32-bit int) -> 255 when every value fits 8 bits, else
    65535 (brighter values clip); F (float) -> 1.0 when every value lies in 0..1, else 255 (values clip to 0..255).
    NaN and infinities are black."""
    top = float(arr.max(initial=0))
    if mode == "F":
        return 1.0 if float(arr.min(initial=0)) >= 0 and top <= 1.0 else 255.0
    return 255.0 if mode == "I" and top <= 255 else 65535.0


def resample_filter(name: str) -> int:
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[name]


def decode_square(path: str | Path, size: int, interpolation: str = "bicubic", data: bytes | None = None,
                  draft: bool = False):
    """File (or its bytes) -> uint8 tensor (3, size, size): shorter side resized to `size`, center crop.
    A .jpg file is decoded at a reduced size first (load_rgb_draft); `draft` does the same for JPEG bytes."""
    import numpy as np
    import torch

    img = load_rgb_draft(path, size, data) if data is None or draft else load_rgb(path, data)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample_filter(interpolation), reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)  # (size, size, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size)


def load_rgb_draft(path: str | Path, size: int, data: bytes | None = None):
    """load_rgb, but let the JPEG decoder downscale by a power of two while staying >= size (much faster).
    Files: those named .jpg / .jpeg; `data` (uploaded bytes): whenever they hold a JPEG."""
    import io

    from PIL import Image

    path = Path(path)
    if data is None:
        check_regular(path)
    if data is not None or path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            with Image.open(path if data is None else io.BytesIO(data), formats=allowed_formats()) as probe:
                if probe.format == "JPEG" and not _has_rotation(probe):
                    probe.draft("RGB", (size, size))
                    probe.load()
                    return to_rgb(probe.copy())
        except Exception:
            pass  # let load_rgb produce the precise error
    return load_rgb(path, data)


def _has_rotation(img) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:
        return True


def resize_size_for(img_size: int, crop_pct: float) -> int:
    return int(math.floor(img_size / crop_pct))


def preprocess_info(img_size: int, crop_pct: float, interpolation: str, mean, std,
                    mirror: bool = False, shift: int = 0) -> dict[str, Any]:
    """What prediction must repeat exactly; stored in every checkpoint. `mirror`: the model trained on mirrored
    images too, so prediction averages the image and its mirror by default (`Predictor.set_tta`); `shift`: and
    those views shifted by this many pixels (`augment.tta_views`)."""
    return {"img_size": img_size, "resize_size": resize_size_for(img_size, crop_pct), "crop_pct": crop_pct,
            "interpolation": interpolation, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "mirror": bool(mirror), "shift": int(shift)}


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


def probe_pixels(split, side: int, sample: int = 512, seed: int = 0):
    """A seeded sample of a Split's images decoded small and grey: (uint8 array (N, side, side), their labels);
    unreadable files are left out (they are reported when the images are decoded)."""
    import random

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


def probe_sizes(paths: list[Path], sample: int = 256, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of a seeded sample of the images, from their headers only (no pixel decoding)."""
    from PIL import Image

    picked = random.Random(seed).sample(paths, sample) if len(paths) > sample else paths

    def size(path: Path) -> tuple[int, int] | None:
        try:
            check_regular(path)  # a FIFO listed in a label file would block this open forever
            with Image.open(path, formats=allowed_formats()) as img:
                return img.size
        except Exception:  # unreadable files are reported when the images are decoded
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [s for s in pool.map(size, picked) if s is not None]


def probe_many(paths: list[Path]) -> list[str | None]:
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(probe_image, paths, chunksize=64))

