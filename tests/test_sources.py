"""The data-source table (sources.py): one dispatch decides what DATA is, and every source goes through the same
preparation path (scan, data-aware defaults, stores). Shard indexes and members are validated once."""

import io
import json
import os
import tarfile

import pytest

from conftest import TINY, make_dataset, run_cli, sharded_dataset
from test_scan import no_hang
from vitcli.errors import VitcliError
from vitcli.folders import FolderSource
from vitcli.manifest import LabelFileSource
from vitcli.shards import ShardSource
from vitcli.sources import open_source


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A class-folder dataset and the shards `vitcli shard` writes from it."""
    return sharded_dataset(tmp_path_factory.mktemp("src"), ("blue", "red"), 8)


def test_class_folders_dispatch_to_the_folder_source(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("blue", "red"), per_class=3)
    assert type(open_source(data)) is FolderSource


def test_label_files_dispatch_to_the_label_file_source(tmp_path):
    for name in ("l.csv", "l.tsv", "l.jsonl", "L.CSV"):
        assert type(open_source(tmp_path / name)) is LabelFileSource


def test_shard_folders_files_and_patterns_dispatch_to_the_shard_source(shards):
    _, s = shards
    for data in (s, s / "train-000000.tar", f"{s}/train-{{000000..000001}}.tar"):
        assert type(open_source(data)) is ShardSource, data


def test_unrelated_index_json_and_a_folder_named_tar_stay_class_folders(tmp_path):
    data = make_dataset(tmp_path / "photos.tar", classes=("blue", "red"), per_class=4)
    (data / "index.json").write_text('{"images": 8, "note": "made by another tool"}')
    assert type(open_source(data)) is FolderSource
    res = run_cli("train", data, *TINY, "--epochs", "1")
    assert res.exit_code == 0, res.output


def test_what_is_no_source_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VitcliError, match="does not exist"):
        open_source(tmp_path / "missing")
    with pytest.raises(VitcliError, match="is not a folder"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(VitcliError, match="'data.val_csv' needs DATA to be a .csv"):
        open_source(tmp_path, val_csv=tmp_path / "v.csv")


def test_shards_get_the_same_data_aware_defaults_as_their_folder(shards, tmp_path):
    data, s = shards
    args = ["--device", "cpu", "--epochs", "1", "--set", "model.embed_dim=32", "--set", "model.depth=1",
            "--set", "model.num_heads=2", "--set", "data.num_workers=0", "--set", "train.report=false"]
    chosen = {}
    for name, source in (("folder", data), ("shards", s)):
        res = run_cli("train", source, *args, "--name", name)
        assert res.exit_code == 0, res.output
        assert "defaults from the data" in res.output, res.output
        chosen[name] = [ln for ln in res.output.splitlines() if ln.startswith("  ") and "=" in ln.split(":")[0]]
    assert chosen["shards"] == chosen["folder"] and chosen["folder"], chosen


# ----------------------------------------------------------------------------------------------- shard index
def edited_index(s, tmp_path, edit) -> ShardSource:
    """A copy of the shard folder `s` whose index.json went through `edit` (a function of the dict)."""
    out = tmp_path / "e"
    out.mkdir()
    for p in s.iterdir():
        if p.suffix == ".tar":
            os.symlink(p, out / p.name)
    index = json.loads((s / "index.json").read_text())
    edit(index)
    (out / "index.json").write_text(json.dumps(index))
    return out


def _set(path, value):
    def edit(index):
        *keys, last = path
        node = index
        for k in keys:
            node = node[k]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


@pytest.mark.parametrize("path,value,message", [
    (("splits",), KeyError, "'splits' and 'class_counts' must be objects"),
    (("splits",), [], "'splits' and 'class_counts' must be objects"),
    (("class_counts",), KeyError, "'splits' and 'class_counts' must be objects"),
    (("classes",), "abc", "'classes' must be a list of two or more class names"),
    (("classes",), [], "'classes' must be a list"),
    (("classes",), ["blue"], "'classes' must be a list"),
    (("classes",), [0, 1], "'classes' must be a list of two or more class names \\(text\\)"),
    (("classes",), ["a", "a"], "names a class twice"),
    (("splits", "train", 0, "first"), KeyError, "splits.train\\[0\\].first: None is not a whole number"),
    (("splits", "train", 0, "count"), -3, "splits.train\\[0\\].count: -3 is not a whole number"),
    (("splits", "train", 0, "count"), "7", "splits.train\\[0\\].count: '7' is not a whole number"),
    (("splits", "train", 0, "count"), 2.5, "count: 2.5 is not a whole number"),
    (("splits", "train", 0, "file"), 5, "splits.train\\[0\\].file: 5 is not a shard file name"),
    (("splits", "train", 0, "file"), "/etc/passwd.tar", "is not a shard file name"),
    (("splits", "train", 0, "file"), "../x.tar", "is not a shard file name"),
    (("splits", "val"), [], "splits.val: needs a non-empty list of shards"),
    (("class_counts", "train"), [1], "class_counts.train: expected 2 whole numbers"),
    (("multilabel",), "no", "'multilabel' must be true or false"),
    (("format",), "x", "is not a vitcli shard index"),
])
def test_edited_index_is_refused_in_one_line_naming_the_key(shards, tmp_path, path, value, message):
    out = edited_index(shards[1], tmp_path, _set(path, value))
    with pytest.raises(VitcliError, match=message) as e:
        open_source(out).scan(0.2, 0)
    assert "\n" not in str(e.value) and "index.json" in str(e.value)


def test_a_shard_listed_twice_is_refused(shards, tmp_path):
    def twice(index):
        index["splits"]["train"].append(dict(index["splits"]["train"][0]))
    out = edited_index(shards[1], tmp_path, twice)
    with pytest.raises(VitcliError, match="is listed twice"):
        open_source(out).scan(0.2, 0)


def test_a_fifo_as_index_or_shard_is_refused_not_opened(shards, tmp_path):
    out = edited_index(shards[1], tmp_path, lambda index: None)
    name = json.loads((out / "index.json").read_text())["splits"]["train"][0]["file"]
    os.unlink(out / name)
    os.mkfifo(out / name)
    with no_hang(20), pytest.raises(VitcliError, match="a FIFO, not a shard file"):
        open_source(out).scan(0.2, 0)


# ----------------------------------------------------------------------------------------------- shard members
def foreign_shard(s, tmp_path, members: list[tuple[str, bytes]]):
    """A copy of the shards whose first train shard is replaced by a tar of `members`."""
    out = edited_index(s, tmp_path, lambda index: None)
    index = json.loads((out / "index.json").read_text())
    first = index["splits"]["train"][0]
    os.unlink(out / first["file"])
    with tarfile.open(out / first["file"], "w") as tar:
        for name, payload in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload))
    return out, first


def stream_all(data):
    import torch

    from vitcli.config import DataConfig

    source = open_source(data)
    ds = source.scan(0.2, 0)
    train, _ = source.stores(ds, DataConfig(num_workers=0), {"resize_size": 16}, None, torch.device("cpu"), 0)
    return sum(len(y) for _, y in train.train_batches(4, 0, 0, 0, 1))


@pytest.mark.parametrize("cls,message", [(b"99", "is not a class index in 0..1"), (b"-1", "not a class index"),
                                         (b"cat", "not a class index"), (b"", "not a class index"),
                                         (b"9" * 40, "not a class index")])
def test_bad_cls_members_stop_with_one_line_naming_shard_and_member(shards, tmp_path, cls, message):
    png = next(shards[0].rglob("*.png")).read_bytes()
    s = shards[1]
    first = json.loads((s / "index.json").read_text())["splits"]["train"][0]
    key = f"{first['first']:09d}"
    out, _ = foreign_shard(s, tmp_path, [(f"{key}.png", png), (f"{key}.cls", cls)])
    with pytest.raises(VitcliError, match=message) as e:
        stream_all(out)
    assert f"{key}.cls" in str(e.value) and "train-000000.tar" in str(e.value)


@pytest.mark.parametrize("name", ["img_000000003.png", "/abs/000000000.png", "000000000", "../000000000.png",
                                  "999999999.png", "000000000.exe"])
def test_foreign_member_names_stop_with_one_line(shards, tmp_path, name):
    out, first = foreign_shard(shards[1], tmp_path, [(name, b"x")])
    with pytest.raises(VitcliError, match="member") as e:
        stream_all(out)
    assert "train-000000.tar" in str(e.value) and "\n" not in str(e.value)


def _public(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") or n == "__len__"}


def test_every_row_of_the_table_implements_the_source_protocol():
    import inspect as pyinspect

    from vitcli.dataset import Source
    from vitcli.sources import SOURCES

    wanted = {"scan", "eval_split", "sample_sizes", "stores"}
    for _, cls in SOURCES:
        assert wanted <= _public(cls) and isinstance(cls.kind, str) and isinstance(cls.listed, bool), cls
        for name in wanted:
            assert list(pyinspect.signature(getattr(cls, name)).parameters)[1:] == \
                list(pyinspect.signature(getattr(Source, name)).parameters)[1:], (cls, name)


def test_image_and_shard_stores_share_the_store_protocol():
    import inspect as pyinspect

    from vitcli.dataset import Store
    from vitcli.shards import ShardStore
    from vitcli.store import ImageStore

    methods = {"__len__", "to", "steps", "train_batches", "eval_batches", "epoch_check"}
    for cls in (ImageStore, ShardStore):
        for name in methods:
            assert list(pyinspect.signature(getattr(cls, name)).parameters) == \
                list(pyinspect.signature(getattr(Store, name)).parameters), (cls, name)
