"""Label files as DATA: a CSV / TSV / JSONL of paths and labels is the same dataset as the folder form."""

import csv
import json
import random

import pytest

from conftest import TINY, make_dataset, run_cli
from vitcli.data import scan_dataset, scan_eval_folder
from vitcli.errors import VitcliError


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def folder_rows(root, base):
    """(path relative to `base`, class) for every image of a class-folder dataset, shuffled."""
    rows = [(p.relative_to(base).as_posix(), p.parent.name) for p in sorted(root.rglob("*.png"))]
    random.Random(1).shuffle(rows)
    return rows


def test_csv_copy_of_a_folder_gives_the_same_dataset_and_split(tmp_path):
    root = make_dataset(tmp_path / "shapes", per_class=12)
    labels = write_csv(tmp_path / "labels.csv", ["filename", "class"], folder_rows(root, tmp_path))
    a, b = scan_dataset(root, 0.25, 3), scan_dataset(labels, 0.25, 3)
    assert b.classes == a.classes and not b.multilabel and b.split_made
    for s in ("train", "val"):
        sa, sb = getattr(a, s), getattr(b, s)
        assert [p.resolve() for p in sb.paths] == [p.resolve() for p in sa.paths]
        assert sb.labels == sa.labels


def test_columns_are_detected_in_tsv_jsonl_and_headerless_csv(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    rows = folder_rows(root, tmp_path)
    tsv = write_csv(tmp_path / "l.tsv", ["Image", "Category"], rows, delimiter="\t")
    bare = write_csv(tmp_path / "l.csv", None, rows)
    jl = tmp_path / "l.jsonl"
    jl.write_text("".join(json.dumps({"image_path": p, "label": c}) + "\n" for p, c in rows))
    for f in (tsv, bare, jl):
        ds = scan_dataset(f, 0.25, 0)
        assert ds.classes == ["blue", "green", "red"] and len(ds.train) + len(ds.val) == 12, f


def test_unknown_columns_are_one_clear_error_naming_the_columns_seen(tmp_path):
    bad = write_csv(tmp_path / "x.csv", ["picture", "kind"], [["a.png", "cat"], ["b.png", "dog"]])
    with pytest.raises(VitcliError, match=r"no image path column among the columns seen \(picture, kind\)"):
        scan_dataset(bad, 0.2, 0)
    bad2 = write_csv(tmp_path / "y.csv", ["path", "kind"], [["a.png", "cat"], ["b.png", "dog"]])
    res = run_cli("train", bad2, *TINY, "--epochs", "1")
    assert res.exit_code == 1
    assert "no label column among the columns seen (path, kind)" in res.output and "Traceback" not in res.output


def test_split_column_and_val_csv_fix_the_split(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=6)
    rows = folder_rows(root, tmp_path)
    with_split = [(p, c, "val" if i % 3 == 0 else "train") for i, (p, c) in enumerate(rows)]
    ds = scan_dataset(write_csv(tmp_path / "s.csv", ["path", "label", "split"], with_split), 0.2, 0)
    assert not ds.split_made
    assert sorted(p.name for p in ds.val.paths) == sorted(p.split("/")[-1] for p, _, s in with_split if s == "val")
    res = run_cli("inspect", "data", tmp_path / "s.csv")
    assert res.exit_code == 0, res.output
    assert "train" in res.output and "val" in res.output and "unreadable files: 0" in res.output
    train = write_csv(tmp_path / "train.csv", ["path", "label"], rows[:12])
    val = write_csv(tmp_path / "val.csv", ["path", "label"], rows[12:])
    ds = scan_dataset(train, 0.2, 0, val_csv=val)
    assert (len(ds.train), len(ds.val), ds.split_made) == (12, 6, False)
    with pytest.raises(VitcliError, match="'split' is 'holdout'; valid: train, val, test"):
        scan_dataset(write_csv(tmp_path / "h.csv", ["path", "label", "split"], [(p, c, "holdout")
                                                                               for p, c in rows]), 0.2, 0)


def test_multilabel_is_detected_from_pipes_or_one_column_per_class(tmp_path):
    rows = [("a.png", "cat|dog"), ("b.png", "dog"), ("c.png", ""), ("d.png", "cat")]
    ds = scan_dataset(write_csv(tmp_path / "m.csv", ["path", "tags"], rows), 0.0, 0)
    assert ds.multilabel and ds.classes == ["cat", "dog"]
    labels = dict(zip((p.name for p in ds.train.paths), ds.train.labels, strict=True))
    assert labels == {"a.png": (1, 1), "b.png": (0, 1), "c.png": (0, 0), "d.png": (1, 0)}
    onehot = write_csv(tmp_path / "o.csv", ["file", "cat", "dog", "fox"],
                       [("a.png", 1, 1, 0), ("b.png", 0, 0, 1), ("c.png", 0, 1, 0)])
    ds = scan_dataset(onehot, 0.0, 0)
    assert ds.multilabel and ds.classes == ["cat", "dog", "fox"] and len(ds.train) == 3
    single = write_csv(tmp_path / "s.csv", ["file", "cat", "dog"], [("a.png", 1, 0), ("b.png", 0, 1)])
    assert not scan_dataset(single, 0.0, 0).multilabel  # exactly one 1 per row: one label per image


def test_eval_split_of_a_label_file_prefers_test_rows(tmp_path):
    rows = [("a.png", "x", "train"), ("b.png", "y", "test"), ("c.png", "x", "val")]
    f = write_csv(tmp_path / "e.csv", ["path", "label", "split"], rows)
    split = scan_eval_folder(f, ["x", "y"])
    assert [p.name for p in split.paths] == ["b.png"] and split.labels == [1]
    with pytest.raises(VitcliError, match=r"b.png': label\(s\) \['y'\] are not among the classes"):
        scan_eval_folder(f, ["x", "q"])


def test_csv_trained_model_matches_the_folder_run_and_skips_missing_files(tmp_path):
    root = make_dataset(tmp_path / "shapes", per_class=16)
    rows = folder_rows(root, tmp_path)
    labels = write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    accs = {}
    for name, data in (("folder", root), ("csv", labels)):
        res = run_cli("train", data, *TINY, "--epochs", "3", "--output", tmp_path / "runs", "--name", name)
        assert res.exit_code == 0, res.output
        accs[name] = [r["val_acc"] for r in csv.DictReader(open(tmp_path / "runs" / name / "metrics.csv"))]
    assert accs["csv"] == accs["folder"]
    split = list(csv.DictReader(open(tmp_path / "runs" / "csv" / "split.csv")))
    assert {r["path"] for r in split} == {p for p, _ in rows} and {r["split"] for r in split} == {"train", "val"}
    res = run_cli("eval", labels, "--model", tmp_path / "runs" / "csv", "--output", tmp_path / "ev")
    assert res.exit_code == 0, res.output and "top-1 accuracy" in res.output

    gone = write_csv(tmp_path / "gone.csv", ["path", "label"], rows + [("shapes/red/missing.png", "red")])
    res = run_cli("train", gone, *TINY, "--epochs", "1", "--output", tmp_path / "runs", "--name", "gone")
    assert res.exit_code == 0, res.output
    assert "missing.png: file not found" in res.output


def test_val_csv_trains_on_a_fixed_validation_set(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=8)
    rows = folder_rows(root, tmp_path)
    train = write_csv(tmp_path / "train.csv", ["path", "label"], rows[:18])
    val = write_csv(tmp_path / "val.csv", ["path", "label"], rows[18:])
    res = run_cli("train", train, *TINY, "--epochs", "1", "--set", f"data.val_csv={val}", "--output", tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert "18 train / 6 val images" in res.output and not (tmp_path / "r" / "train" / "split.csv").exists()
    res = run_cli("train", root, *TINY, "--epochs", "1", "--set", f"data.val_csv={val}")
    assert res.exit_code == 1 and "'data.val_csv' needs DATA to be a .csv, .tsv or .jsonl label file" in res.output


def test_packed_path_list_round_trips_any_file_name():
    from pathlib import Path

    from vitcli.data import PathList

    paths = [Path("a/b.png"), Path("ümlaut/ß.jpg"), Path("/abs/x y.PNG"), Path("n") / "\udcff.png"]
    packed = PathList(paths)
    assert len(packed) == 4 and list(packed) == paths and packed[-1] == paths[-1] and packed[1] == paths[1]
    with pytest.raises(IndexError):
        packed[4]
