"""Fuzzing with a fixed seed and a time bound: random values into every config key and random bytes into every
kind of file vitcli reads (images, YAML config, checkpoints, exported models, the run folder's CSV / YAML).
Whatever comes in: no traceback, no hang, and either success or exit code 1 / 2 with one `error:` line."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil

import pytest

from conftest import TINY, make_dataset, run_cli, sharded_dataset
from test_outputs import tiny_checkpoint
from test_scan import no_hang
from vitcli.config import RANGES, Config, parse_range

SEED = 1234
KEYS = [f"{section}.{key}" for section, values in dataclasses.asdict(Config()).items() for key in values]


def hostile_texts(rng: random.Random) -> list[str]:
    """`--set KEY=` values: numbers of every size, YAML oddities, control characters, huge and nested values."""
    nums = [rng.choice([-1, 1]) * 10 ** rng.uniform(-320, 308), rng.randint(-2**70, 2**70), 0, -1, 1e308, 5e-324]
    words = [".inf", "-.inf", ".nan", "5e-4", "1e23", "0x1F", "0o17", "1_000", "~", "null", "yes", "off", "",
             "[]", "{}", "[1, [2, [3]]]", "&a [*a]", "{a: 1}", "'", "[1, 2", "\x1b]0;x\x07", "a\nb: c",
             "x" * 5000, "9" * 5000, "[" + "1," * 500 + "1]",
             "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(1, 40)))]
    return [repr(v) if isinstance(v, float) else str(v) for v in nums] + words


def assert_clean(res, allowed=(0, 1)) -> None:
    """Exit code allowed, no traceback; on failure exactly one short error line."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.exception, res.output[-2000:])
    assert res.exit_code in allowed, res.output[-2000:]
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    if res.exit_code == 1:
        assert len(errors) == 1 and len(errors[0]) < 600, res.output[-2000:]
    assert all(len(ln) < 600 for ln in errors)  # exit code 2: one line per input that failed


def test_random_values_into_every_config_key_never_crash():
    rng = random.Random(SEED)
    with no_hang(120):
        for key in KEYS:
            for text in rng.sample(hostile_texts(rng), 6):
                assert_clean(run_cli("config", "--set", f"{key}={text}"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fuzz") / "d", classes=("red", "green"), per_class=4)


def random_in_range(key: str, rng: random.Random, is_int: bool):
    lo, hi, lo_open, hi_open, _ = parse_range(RANGES[key])
    pick = rng.choice(["lo", "hi", "mid"])
    if pick == "lo" and not lo_open:
        value = lo
    elif pick == "hi" and not hi_open:
        value = hi
    else:
        span = hi - lo
        value = lo + span * (rng.random() ** 3 if span > 100 else rng.random())  # small values more often
        value = min(max(value, math.nextafter(lo, hi)), math.nextafter(hi, lo))
    return int(value) if is_int else value


# keys whose extremes are cheap to train with (the size keys would make a slow run, not a crash)
TRAIN_KEYS = ["data.val_fraction", "data.crop_pct", "data.mean", "data.std", "data.scale_min", "data.ratio_max",
              "data.hflip", "data.translate", "data.rotate", "data.mixup", "data.cutmix", "data.reprob",
              "data.max_bad_fraction", "model.mlp_ratio", "model.drop_rate", "model.drop_path_rate", "optim.lr",
              "optim.weight_decay", "optim.betas", "optim.warmup_epochs", "optim.warmup_lr_ratio",
              "optim.min_lr_ratio", "optim.clip_grad", "optim.layer_decay", "train.seed",
              "train.label_smoothing", "train.ema_decay", "train.patience", "train.save_every_steps"]


@pytest.mark.parametrize("trial", range(4))
def test_random_valid_configs_train_or_stop_with_one_line(tmp_path, data, trial):
    rng = random.Random(SEED + trial)
    sets = []
    for key in TRAIN_KEYS:
        n = {"data.mean": 3, "data.std": 3, "optim.betas": 2}.get(key)
        is_int = key in ("train.seed", "train.patience", "train.save_every_steps")
        if n:
            value = "[" + ", ".join(repr(random_in_range(key, rng, False)) for _ in range(n)) + "]"
        else:
            value = repr(random_in_range(key, rng, is_int))
        sets += ["--set", f"{key}={value}"]
    with no_hang(120):
        res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4", *sets)
    assert_clean(res)
    print(res.output.splitlines()[-1])  # shown with -s: how the trial ended


BAD_BYTES = [b"", b"\x00" * 100, b"\x89PNG\r\n\x1a\n" + b"\xff" * 50, b"\xff\xd8\xff" + b"\x00" * 80,
             b"PK\x03\x04" + b"\x00" * 60, b"GIF89a\xff\xff\xff\xff", b"BM" + b"\xff" * 60]


def random_blobs(rng: random.Random, n: int) -> list[bytes]:
    """Known-dangerous headers followed by junk, and plain random bytes of random length."""
    return [rng.choice(BAD_BYTES) + rng.randbytes(rng.randint(0, 3000)) if rng.random() < 0.6
            else rng.randbytes(rng.randint(0, 5000)) for _ in range(n)]


def test_random_bytes_as_images_are_skipped_one_line_each(tmp_path, data):
    rng = random.Random(SEED)
    messy = tmp_path / "messy"
    shutil.copytree(data, messy)
    exts = [".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif"]
    for i, blob in enumerate(random_blobs(rng, 12)):
        (messy / rng.choice(["red", "green"]) / f"junk_{i:02d}{rng.choice(exts)}").write_bytes(blob)
    model = tiny_checkpoint(tmp_path / "m.pt", ["green", "red"])
    with no_hang(180):
        for args, allowed in ((["train", messy, *TINY, "--epochs", "1", "--batch-size", "4", "--set",
                                "data.max_bad_fraction=0.9"], (0,)),
                              (["eval", messy, "--model", model, "--output", tmp_path / "ev"], (0,)),
                              (["predict", messy, "--model", model, "-f", "jsonl"], (2,)),
                              (["inspect", "data", messy], (0,))):
            res = run_cli(*args)
            assert_clean(res, allowed)
            if args[0] == "inspect":  # the report counts them all and lists the first 10
                assert "unreadable files: 12" in res.output, res.output
                continue
            for i in range(12):  # each junk file named on exactly one line (none of them is an image)
                assert sum(f"junk_{i:02d}." in ln for ln in res.output.splitlines()
                           if ln.startswith(("warning: skipped", "error: "))) == 1, (args[0], i, res.output)


def test_random_bytes_in_config_checkpoint_and_model_files(tmp_path, data):
    rng = random.Random(SEED)
    with no_hang(180):
        for i, blob in enumerate(random_blobs(rng, 6)):
            cfg = tmp_path / f"c{i}.yaml"
            cfg.write_bytes(blob)
            assert_clean(run_cli("config", "-c", cfg))
            for name in (f"m{i}.pt", f"m{i}.onnx", f"m{i}.torchscript.pt"):
                model = tmp_path / name
                model.write_bytes(blob)
                assert_clean(run_cli("predict", data / "red", "--model", model), (1,))
            assert_clean(run_cli("eval", data, "--model", tmp_path / f"m{i}.pt"), (1,))
            assert_clean(run_cli("export", "--model", tmp_path / f"m{i}.pt", "-o", tmp_path / "x.onnx"), (1,))
            assert_clean(run_cli("inspect", "model", "--model", tmp_path / f"m{i}.pt"), (1,))


def test_random_bytes_in_a_run_folder_then_resume(tmp_path, data):
    res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "train"
    rng = random.Random(SEED)
    pristine = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with no_hang(180):
        odd = {"metrics.csv": [b"epoch\n1\n", b"a,b\n1,2,3\n"], "config.yaml": [b"hello\n", b"train: 3\n"]}
        for name in ("metrics.csv", "split.csv", "config.yaml", "last.pt"):
            for blob in random_blobs(rng, 2) + odd.get(name, []):
                for p, content in pristine.items():
                    (run / p).write_bytes(content)
                (run / name).write_bytes(blob)
                assert_clean(run_cli("runs", tmp_path / "runs"))  # reads every run's config and metrics
                assert_clean(run_cli("runs", tmp_path / "runs", "--json"))
                if name == "config.yaml":
                    (run / "last.pt").unlink()  # the config is only read when there is no last.pt
                assert_clean(run_cli("train", "--resume", run, "--epochs", "2"))


# ----------------------------------------------------------------------------------------------- data sources
def fuzz_for(seconds: float):
    """Trial numbers until `seconds` have passed (a time bound for a seeded fuzz loop)."""
    import time

    end = time.monotonic() + seconds
    trial = 0
    while time.monotonic() < end:
        yield trial
        trial += 1


def random_cell(rng: random.Random, paths: list[str]) -> str:
    return rng.choice([
        rng.choice(paths), rng.choice(paths), "missing.png", "", " ", "http://x/a.png", "/dev/null", ".", "..",
        "a|b", "red|", "|", ";;", "red;blue", "train", "val", "test", "holdout", "0", "1", "1.0", "2", "-1",
        '"', "\n", "red\nblue", "\u2028", "\x85", "\x00", "\x1b[2J", "x" * 3000, "\ufeff",
        "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 12)))])


def random_label_file(rng: random.Random, folder, paths: list[str]):
    """A label file of random structure: known and unknown columns, random cells, then random byte edits."""
    import csv
    import io
    import json

    names = ["path", "label", "labels", "split", "file", "class", "red", "blue", "x", "Path", "LABEL", ""]
    header = [rng.choice(names) for _ in range(rng.randint(1, 5))]
    rows = [[random_cell(rng, paths) for _ in header] for _ in range(rng.randint(0, 12))]
    ext = rng.choice([".csv", ".tsv", ".jsonl"])
    if ext == ".jsonl":
        values = [None, True, 1, 2.5, [], {}, ["red", "blue"], [["x"]], {"a": 1}, "red", "blue"]
        text = "".join(json.dumps({h: rng.choice([c, c, rng.choice(values)])
                                   for h, c in zip(header, r, strict=True)}) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if ext == ".tsv" else ",")
        w.writerows([header, *rows] if rng.random() < 0.9 else rows)
        text = buf.getvalue()
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    for _ in range(rng.choice([0, 0, 1, 3])):  # byte edits: flips, inserts, cuts
        if data:
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[i] = rng.randrange(256)
            elif op < 0.7:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                del data[i:]
    path = folder / f"l{rng.randrange(10**6)}{ext}"
    path.write_bytes(bytes(data))
    return path


def test_random_label_files_scan_or_stop_with_one_error(tmp_path):
    from test_scan import no_hang
    from vitcli.data import scan_dataset, scan_eval_folder
    from vitcli.errors import VitcliError

    root = make_dataset(tmp_path / "d", classes=("red", "blue"), per_class=3)
    os.mkfifo(tmp_path / "fifo.png")
    paths = [p.relative_to(tmp_path).as_posix() for p in root.rglob("*.png")] + ["fifo.png", "d", "d/red"]
    rng = random.Random(SEED)
    outcomes = {"ok": 0, "refused": 0}
    with no_hang(120):
        for _ in fuzz_for(15):
            path = random_label_file(rng, tmp_path, paths)
            try:
                ds = scan_dataset(path, rng.choice([0.0, 0.25, 0.5]), 0)
                scan_eval_folder(path, ds.classes, ds.multilabel)
                outcomes["ok"] += 1
            except VitcliError as e:
                assert str(e), path
                outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes  # the fuzz reached both outcomes


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    return sharded_dataset(tmp_path_factory.mktemp("fuzzshards"), ("red", "blue"), 6)[1]


def random_json(rng: random.Random, depth: int = 0):
    leaves = [None, True, False, 0, -1, 1, 2**70, 0.5, float(2**31), "", "abc", "train-000000.tar", "../x.tar",
              "vitcli-shards-v1", "\x00", "a" * 500]
    if depth > 3 or rng.random() < 0.5:
        return rng.choice(leaves)
    if rng.random() < 0.5:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["file", "count", "first", "train", "val", "x"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def mutate_index(rng: random.Random, index: dict) -> None:
    """Replace one random node of the index (a key, a list item) with random JSON, or delete it."""
    node, key = index, rng.choice(list(index))
    for _ in range(rng.randint(0, 3)):
        child = node[key]
        if not isinstance(child, dict | list) or not child or rng.random() < 0.3:
            break
        node, key = child, rng.choice(list(child) if isinstance(child, dict) else range(len(child)))
    if rng.random() < 0.2 and isinstance(node, dict):
        del node[key]
    else:
        node[key] = random_json(rng)


def random_member_tar(rng: random.Random, path, first: int, count: int, png: bytes) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for _ in range(rng.randint(0, 2 * count)):
            key = rng.choice([f"{first + rng.randrange(max(1, count)):09d}", f"{rng.randrange(10**9):09d}", "img_3",
                              "/abs", "../up", "", "a.b.c"])
            ext = rng.choice(["png", "cls", "cls", "jpg", "exe", ""])
            payload = rng.choice([png, png[: rng.randrange(len(png))], bytes(rng.randrange(256) for _ in range(40)),
                                  b"0", b"1", b"99", b"-1", b"cat", b"", b"9" * 40, b"0,1", b"\xff\xfe"])
            ti = tarfile.TarInfo(f"{key}.{ext}" if ext else key or "x")
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload))


def test_random_index_json_and_shard_members_stream_or_stop_with_one_error(tmp_path, shard_folder):
    import copy
    import json

    import torch

    from test_scan import no_hang
    from vitcli.config import DataConfig
    from vitcli.errors import VitcliError
    from vitcli.sources import open_source

    good = json.loads((shard_folder / "index.json").read_text())
    png = next((shard_folder.parent / "d").rglob("*.png")).read_bytes()
    rng = random.Random(SEED)
    outcomes = {"ok": 0, "refused": 0}
    with no_hang(120):
        for trial in fuzz_for(20):
            out = tmp_path / f"s{trial}"
            shutil.copytree(shard_folder, out)
            index = copy.deepcopy(good)
            if rng.random() < 0.5:
                for _ in range(rng.randint(1, 3)):
                    mutate_index(rng, index)
            else:
                sh = good["splits"]["train"][0]
                random_member_tar(rng, out / sh["file"], sh["first"], sh["count"], png)
            text = json.dumps(index) if rng.random() < 0.9 else json.dumps(index)[: rng.randrange(50)]
            (out / "index.json").write_text(text)
            try:
                source = open_source(out)
                ds = source.scan(0.2, 0)
                train, val = source.stores(ds, DataConfig(num_workers=0), {"resize_size": 16}, None,
                                           torch.device("cpu"), 0)
                for store in (train, val):
                    for _ in store.train_batches(4, 0, 0, 0, 1):
                        pass
                outcomes["ok"] += 1
            except VitcliError as e:
                assert str(e) and "\n" not in str(e), str(e)
                outcomes["refused"] += 1
            shutil.rmtree(out)
    assert outcomes["ok"] and outcomes["refused"], outcomes
