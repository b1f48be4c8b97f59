"""Shared fixtures: generated image datasets in tmp_path, and every output folder inside tmp_path.

Every dataset `make_dataset` builds (or a test hands to `track_dataset`) is hashed before and after each
command `run_cli` / `run_vitcli` runs on it: a command that changes a dataset fails the test.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def shape_image(kind: str, size: int, rng: random.Random) -> Image.Image:
    """A noisy background with one coloured shape; the class is the colour."""
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[kind])
    if rng.random() < 0.5:
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=jitter)
    else:
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=jitter)
    return img


def make_dataset(root: Path, classes=("red", "green", "blue"), per_class: int = 30, size: int = 32,
                 seed: int = 0, splits: tuple[str, ...] = (), ext: str = ".png") -> Path:
    """Class folders under root (or under root/<split>/ for each split) filled with shape images."""
    rng = random.Random(seed)
    for split in splits or ("",):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape_image(c, size, rng).save(folder / f"{c}_{i:03d}{ext}")
    return track_dataset(root)


_DATASETS: set[Path] = set()  # every dataset built in this session; run_cli checks the ones a command names


def track_dataset(root: Path) -> Path:
    """Check this folder like a generated dataset: unchanged by every command that names it."""
    _DATASETS.add(Path(os.path.abspath(root)))
    return root


def tree_hash(root: Path) -> str:
    """One digest of everything under `root` without following links or opening non-regular files: names,
    types, modes, mtimes, link targets and file contents (files the reader may not open: size only)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)}|{stat.S_IFMT(st.st_mode)}|{st.st_mode:o}|{st.st_mtime_ns}|".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                try:
                    with open(p, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
                except OSError:
                    h.update(f"unreadable {st.st_size}".encode())
    return h.hexdigest()


def _datasets_named(args, cwd=None) -> list[Path]:
    """The tracked datasets a command names (an argument inside one) or runs inside (the working folder)."""
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    named = [Path(os.path.abspath(cwd / (str(a).split("*")[0] or "."))) for a in args]
    return [root for root in _DATASETS if root.is_dir() and (cwd == root or root in cwd.parents or any(
        p == root or root in p.parents for p in named))]


class DatasetsUntouched:
    """Context: the datasets a command touches hash the same before and after it."""

    def __init__(self, args, cwd=None):
        self.before = {root: tree_hash(root) for root in _datasets_named(args, cwd)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        changed = [str(r) for r, digest in self.before.items() if r.is_dir() and tree_hash(r) != digest]
        assert not changed, f"the command changed the dataset(s) {changed}"


def hang_dump(env: dict[str, str], root: Path, seconds: int = 150) -> dict[str, str]:
    """`env` for a torchrun command whose worker processes print every thread's stack and exit after `seconds`:
    a run that hangs fails the test with where it waited, not with a bare subprocess timeout."""
    site = root / "hang-dump"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import os\nif 'RANK' in os.environ and 'LOCAL_RANK' in os.environ:\n"
        f"    import faulthandler\n    faulthandler.dump_traceback_later({seconds}, exit=True)\n")
    return env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))}


@pytest.fixture
def shapes(tmp_path) -> Path:
    """A 3-class folder of class subfolders (30 images each, 32 px)."""
    return make_dataset(tmp_path / "shapes")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models: one thread is as fast, and on a few shared cores OpenMP threads spin-wait on each other
    (~10x slower). Child processes inherit OMP_NUM_THREADS."""
    import os

    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(autouse=True, scope="session")
def _speed_cache_in_tmp(tmp_path_factory):
    """The per-machine speed cache (speed.py) of this test session, not the user's."""
    old = os.environ.get("VITCLI_CACHE_DIR")
    os.environ["VITCLI_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitcli-cache"))
    yield
    if old is None:
        os.environ.pop("VITCLI_CACHE_DIR", None)
    else:
        os.environ["VITCLI_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path, monkeypatch):
    """Run every test from tmp_path so default output folders (runs/) land there; an empty, offline Hugging Face
    cache there too, so `model.pretrained: auto` never touches the network or the user's cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def deit_checkpoint(tmp_path) -> Path:
    """A vitcli checkpoint of a tiny timm DeiT with its distillation token (2 prefix tokens)."""
    import torch

    from vitcli.checkpoint import make_checkpoint, save_checkpoint
    from vitcli.data import preprocess_info
    from vitcli.models import model_from_spec

    spec = {"backend": "timm", "name": "deit_tiny_distilled_patch16_224", "img_size": 32,
            "kwargs": dict(num_classes=3, embed_dim=32, depth=2, num_heads=2, patch_size=8)}
    torch.manual_seed(0)
    model = model_from_spec(spec)
    ckpt = make_checkpoint(model_spec=spec, classes=["red", "green", "blue"], epoch=1,
                           preprocess=preprocess_info(32, 1.0, "bicubic", [0.5] * 3, [0.25] * 3),
                           state_dict=model.state_dict())
    path = tmp_path / "deit" / "best.pt"
    save_checkpoint(path, ckpt)
    return path


# A tiny from-scratch ViT that trains in seconds on the generated 32 px images.
TINY = ["--model", "vit-tiny/8", "--img-size", "32", "--device", "cpu", "--batch-size", "16",
        "--set", "model.embed_dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
        "--set", "data.crop_pct=1.0", "--set", "train.precision=fp32", "--set", "optim.warmup_epochs=1",
        "--set", "data.scale_min=0.5", "--set", "train.report=false"]  # report.html: tested in test_tracking


def tiny_config(output, name: str, *, epochs: int, batch_size: int, extra_sets=()):
    """The TINY model as a Config (plus `extra_sets` overrides), for calling engine.train in-process."""
    from vitcli.config import load_config

    sets = [TINY[i + 1] for i, a in enumerate(TINY) if a == "--set"] + list(extra_sets)
    flags = {"model.name": "vit-tiny/8", "data.img_size": 32, "train.device": "cpu", "data.batch_size": batch_size,
             "train.epochs": epochs, "train.output": str(output), "train.name": name}
    return load_config(None, sets, flags)


def fitted_run_folder(root: Path, classes=("red", "green", "blue"), per_class: int = 20) -> Path:
    """A run folder whose best.pt (the TINY model's shape, 32 px) was fitted with full-batch AdamW (~2 s) on the
    training split that the default config makes of a generated dataset, and names that dataset, as
    `vitcli train` leaves it; the validation split stays unseen."""
    import torch

    from vitcli import data as D
    from vitcli.checkpoint import make_checkpoint, save_checkpoint
    from vitcli.config import Config, ModelConfig
    from vitcli.models import build_model

    data = make_dataset(root / "data", classes, per_class=per_class, seed=3)
    cfg = Config()
    ds = D.scan_dataset(data, cfg.data.val_fraction, cfg.train.seed)
    pre = D.preprocess_info(32, 0.8, "bicubic", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # resize 40, crop 32
    x = D.eval_transform(torch.stack([D.decode_square(p, pre["resize_size"]) for p in ds.train.paths]), pre)
    y = torch.tensor(ds.train.labels)
    torch.manual_seed(0)
    model, spec = build_model(ModelConfig(name="vit-tiny/8", embed_dim=32, depth=2, num_heads=2), len(classes), 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = make_checkpoint(model_spec=spec, classes=ds.classes, preprocess=pre, epoch=1, step=60,
                           metrics={"val_acc": 1.0}, state_dict=model.eval().state_dict())
    ckpt["data_dir"] = str(data)
    save_checkpoint(root / "runs" / "fit" / "best.pt", ckpt)
    return root / "runs" / "fit"


def run_cli(*args: str):
    """Invoke the Typer app in-process; returns the click Result."""
    from typer.testing import CliRunner

    from vitcli.cli import app

    with DatasetsUntouched(args):
        return CliRunner().invoke(app, [str(a) for a in args])


def run_vitcli(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -m vitcli ARGS` as a real process (text output captured), with the same dataset check."""
    with DatasetsUntouched(args, kwargs.get("cwd")):
        return subprocess.run([sys.executable, "-m", "vitcli", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, **kwargs)



_REAL_FDOPEN = os.fdopen  # tests patch os.fdopen (through vitcli.files.os); DiskFull keeps the real one


class DiskFull(io.RawIOBase):
    """A file object over fd whose writes fail with ENOSPC: a full disk, simulated at the OS boundary."""

    def __init__(self, fd):
        self.f = _REAL_FDOPEN(fd, "wb")

    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


def trained_run(root: Path, *args: str, per_class: int = 12) -> tuple[Path, Path]:
    """Train the TINY model through the CLI from inside `root` (so runs/ lands there) on generated shapes;
    returns (run folder, dataset). For module-scoped fixtures, which cannot use the chdir fixture."""
    data = make_dataset(root / "shapes", per_class=per_class)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = run_cli("train", data, *TINY, *args)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    return root / "runs" / "train", data


def sharded_dataset(root: Path, classes: tuple[str, ...], per_class: int) -> tuple[Path, Path]:
    """A generated class-folder dataset under root/d and the 4 KB shards `vitcli shard` writes from it (root/s)."""
    data = make_dataset(root / "d", classes=classes, per_class=per_class)
    res = run_cli("shard", data, root / "s", "--size", "4KB")
    assert res.exit_code == 0, res.output
    return data, root / "s"
