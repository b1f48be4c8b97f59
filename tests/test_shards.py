"""Tar shards: `vitcli shard` packs a dataset without touching it; streaming deals every image once per epoch."""

import json
import tarfile
from types import SimpleNamespace

import pytest

from conftest import make_dataset, run_cli
from vitcli.errors import VitcliError
from vitcli.shard_writer import parse_size
from vitcli.shards import expand_braces
from vitcli.sources import open_source


def open_shards(data, *, size: int, interpolation: str, num_workers: int, shuffle_buffer: int):
    """The train and val stores the source table opens for `data` (as training does)."""
    import torch

    from vitcli.config import DataConfig

    source = open_source(data)
    ds = source.scan(0.2, 0)
    d = DataConfig(interpolation=interpolation, num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    train, val = source.stores(ds, d, {"resize_size": size}, None, torch.device("cpu"), 2)
    return SimpleNamespace(train=train, val=val, classes=ds.classes, multilabel=ds.multilabel, counts=ds.counts()[0])


def test_shard_command_writes_tar_shards_and_an_index_without_touching_data(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=10)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    before = sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*"))
    res = run_cli("shard", data, tmp_path / "out", "--size", "4KB", "--set", "data.max_bad_fraction=0.5")
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and "skipped 1 unreadable" in res.output
    assert sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*")) == before
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == ["blue", "green", "red"] and not index["multilabel"]
    counts = {k: sum(s["count"] for s in v) for k, v in index["splits"].items()}
    assert counts == {"train": 24, "val": 6} and len(index["splits"]["train"]) > 2
    with tarfile.open(tmp_path / "out" / index["splits"]["train"][0]["file"]) as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.png", "000000000.cls"]  # WebDataset layout: <key>.<ext> grouped by key

    res = run_cli("shard", data, data / "inside")
    assert res.exit_code == 1 and "inside the dataset folder" in res.output and not (data / "inside").exists()
    res = run_cli("shard", data, tmp_path / "out")
    assert res.exit_code == 1 and "already exists" in res.output
    res = run_cli("shard", data, tmp_path / "o2", "--size", "lots")
    assert res.exit_code == 1 and "--size 'lots'" in res.output


def test_every_image_once_per_epoch_across_ranks_and_workers_with_equal_steps(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=30)
    res = run_cli("shard", data, tmp_path / "s", "--size", "6KB")
    assert res.exit_code == 0, res.output
    sd = open_shards(tmp_path / "s", size=32, interpolation="bicubic", num_workers=2, shuffle_buffer=16)
    n = len(sd.train)
    assert n == 72 and len(sd.train.shards) >= 4
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            got, steps = [], 0
            for x, y in sd.train.train_batches(5, epoch, 0, rank, 2):
                steps += 1
                assert x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
                got.append(y.shape[0])
            per_rank.append((list(sd.train.seen), steps, sum(got)))
        seen = [sum(r[0][i] for r in per_rank) for i in range(3)]
        expected = sd.train.expected()
        assert [seen[0], seen[1] % 2147483647, seen[2] % 2147483647] == expected  # count, sum, sum of squares
        assert per_rank[0][1] == per_rank[1][1] == sd.train.steps(5, epoch, 0, 2)  # lockstep for DDP
        assert per_rank[0][2] + per_rank[1][2] == n
        orders.append(per_rank[0][0])
        parts = sd.train._parts(epoch, 0, 2, True)  # [rank][worker] -> shards: each shard read by one worker
        files = [s["file"] for rank in parts for worker in rank for s in worker]
        assert sorted(files) == sorted(s["file"] for s in sd.train.shards)
    assert orders[0] != orders[1]  # another shard order and shuffle every epoch


def test_exactly_once_with_ids_recorded(tmp_path):
    """The checksum above, confirmed on the ids themselves (single process, 2 workers, 4 simulated ranks)."""
    import torch

    data = make_dataset(tmp_path / "d", per_class=20)
    assert run_cli("shard", data, tmp_path / "s", "--size", "3KB").exit_code == 0
    sd = open_shards(tmp_path / "s", size=32, interpolation="bicubic", num_workers=2, shuffle_buffer=8)
    ids = []
    for rank in range(4):
        parts = sd.train._parts(0, 0, 4, True)[rank]
        for _, _, i in sd.train._stream(parts, 4, 123):
            ids += i.tolist()
    assert sorted(ids) == list(range(len(sd.train))) and ids != sorted(ids)
    labels = torch.cat([y for _, y in sd.val.eval_batches(7)])
    assert len(labels) == len(sd.val)
    picked = open_shards(str(tmp_path / "s" / "train-{000001..000002}.tar"), size=32, interpolation="bicubic",
                         num_workers=0, shuffle_buffer=0)  # a brace pattern: those train shards, all val shards
    assert [s["file"] for s in picked.train.shards] == ["train-000001.tar", "train-000002.tar"]
    assert len(picked.val) == len(sd.val)


def test_brace_patterns_sizes_and_missing_index(tmp_path):
    assert expand_braces("s/train-{000..002}.tar") == ["s/train-000.tar", "s/train-001.tar", "s/train-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert parse_size("1GB") == 10**9 and parse_size("64KiB") == 65536
    with pytest.raises(VitcliError, match="no index.json"):
        open_shards(tmp_path / "x-{0..1}.tar", size=32, interpolation="bicubic", num_workers=0, shuffle_buffer=0)


def test_torchrun_two_processes_stream_every_image_once(tmp_path):
    """Two gloo processes train from shards: each reads its own shards, every image is seen once per epoch."""
    import os
    import subprocess
    import sys

    from conftest import TINY, hang_dump

    data = make_dataset(tmp_path / "shapes", per_class=100)
    assert run_cli("shard", data, tmp_path / "sh", "--size", "12KB").exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["COLUMNS"] = "200"
    env = hang_dump(env, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitcli",
           "train", str(tmp_path / "sh"), *TINY, "--epochs", "2", "--output", str(tmp_path / "runs"),
           "--set", "data.num_workers=1"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    n = sum(s["count"] for s in index["splits"]["train"])
    assert n == 240
    for epoch in (1, 2):
        assert f"epoch {epoch}: {n} of {n} images streamed from {len(index['splits']['train'])} shards, each " \
               "exactly once" in log, log
    assert "all 2 processes hold identical weights" in log
    assert (tmp_path / "runs" / "train" / "best.pt").is_file()


def test_multilabel_label_file_to_shards_streams_label_vectors(tmp_path):
    import csv

    root = make_dataset(tmp_path / "d", per_class=6)
    paths = sorted(root.rglob("*.png"))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "labels")] + [(p.relative_to(tmp_path).as_posix(),
                                                           p.parent.name + ("|dark" if i % 2 else ""))
                                                          for i, p in enumerate(paths)])
    assert run_cli("shard", tmp_path / "m.csv", tmp_path / "s", "--size", "1MB").exit_code == 0
    sd = open_shards(tmp_path / "s", size=32, interpolation="bicubic", num_workers=0, shuffle_buffer=4)
    assert sd.multilabel and sd.classes == ["blue", "dark", "green", "red"]
    ys = [y for _, y in sd.train.train_batches(4, 0, 0, 0, 1)]
    assert all(y.dtype.is_floating_point and y.shape[1] == 4 for y in ys)
    assert sum(float(y[:, 1].sum()) for y in ys) == sd.counts[1]  # the 'dark' positives, as counted at write time


def test_resume_mid_epoch_from_shards_matches_the_uninterrupted_run(tmp_path, capfd):
    import torch

    from conftest import tiny_config
    from vitcli.files import safe_torch_load
    from vitcli.train import train

    data = make_dataset(tmp_path / "d", per_class=12)
    assert run_cli("shard", data, tmp_path / "s", "--size", "4KB").exit_code == 0
    sets = ["data.num_workers=0", "data.shuffle_buffer=8"]
    ref = train(tiny_config(tmp_path / "runs", "ref", epochs=2, batch_size=4, extra_sets=sets), tmp_path / "s")
    cut = train(tiny_config(tmp_path / "runs", "cut", epochs=2, batch_size=4, extra_sets=sets), tmp_path / "s",
                stop_after_steps=3)
    capfd.readouterr()
    res = train(None, None, resume=cut.run_dir)
    assert res.epochs_run == 2
    a, b = (safe_torch_load(r.run_dir / "last.pt")["model"] for r in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = "".join(capfd.readouterr())
    assert "epoch 1: 30 of 30 images streamed from" in log and "each exactly once" in log  # skipped batches count


def test_end_of_run_report_for_label_files_and_a_warning_for_shards(tmp_path):
    import csv

    from conftest import TINY

    data = make_dataset(tmp_path / "d", per_class=8)
    with open(tmp_path / "l.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + [(p.relative_to(tmp_path).as_posix(), p.parent.name)
                                                       for p in sorted(data.rglob("*.png"))])
    assert run_cli("shard", tmp_path / "l.csv", tmp_path / "s", "--size", "8KB").exit_code == 0
    report = ["--epochs", "1", "--set", "train.report=true", "--set", "data.num_workers=0"]
    res = run_cli("train", tmp_path / "l.csv", *TINY, *report, "--name", "csv")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "csv" / "report.html").is_file()
    res = run_cli("train", tmp_path / "s", *TINY, *report, "--name", "shards")
    assert res.exit_code == 0, res.output
    assert "report.html not written" in res.output and "streamed tar shards" in res.output


def test_a_truncated_shard_stops_the_run_with_one_line(tmp_path):
    from conftest import TINY

    data = make_dataset(tmp_path / "d", per_class=10)
    assert run_cli("shard", data, tmp_path / "s", "--size", "1MB").exit_code == 0
    tar = tmp_path / "s" / "train-000000.tar"
    whole = tar.read_bytes()
    with tarfile.open(tar) as t:
        boundary = t.getmembers()[2].offset  # where the second image's header starts
    for cut, why in ((boundary + 700, "cannot be read"), (boundary, "holds 1 images, index.json lists")):
        tar.write_bytes(whole[:cut])  # inside a member; at a member boundary (looks like a normal end)
        res = run_cli("train", tmp_path / "s", *TINY, "--epochs", "1", "--set", "data.num_workers=1")
        assert res.exit_code == 1
        assert f"train-000000.tar' {why}" in res.output and "Traceback" not in res.output
