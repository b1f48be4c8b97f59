"""Label files under hostile input: each defect is one line naming the file, line and column, or a printed,
counted decision; no path from a label file is opened before the regular-file guard."""

import csv
import json
import os

import pytest

from conftest import TINY, make_dataset, run_cli
from test_scan import no_hang
from vitcli.data import probe_sizes, scan_dataset
from vitcli.errors import VitcliError


@pytest.fixture
def images(tmp_path):
    """Six images per class under tmp_path/d; rows (path relative to tmp_path, class)."""
    root = make_dataset(tmp_path / "d", classes=("blue", "red"), per_class=6)
    return [(p.relative_to(tmp_path).as_posix(), p.parent.name) for p in sorted(root.rglob("*.png"))]


def write(path, rows, header=("path", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def refused(path, message, **kw):
    with pytest.raises(VitcliError, match=message) as e:
        scan_dataset(path, 0.25, 0, **kw)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


def test_fifo_in_a_label_file_is_skipped_by_the_size_probe_and_training(tmp_path, images):
    os.mkfifo(tmp_path / "fifo.png")
    labels = write(tmp_path / "l.csv", [*images, ("fifo.png", "red")])
    with no_hang(20):
        assert len(probe_sizes([tmp_path / "fifo.png", tmp_path / images[0][0]])) == 1
    with no_hang(120):
        res = run_cli("train", labels, *TINY, "--epochs", "1", "--set", "data.max_bad_fraction=0.2")
    assert res.exit_code == 0, res.output
    assert "fifo.png: a FIFO, not an image file" in res.output and "Traceback" not in res.output


def test_exact_repeated_rows_are_dropped_and_counted(tmp_path, images, capsys):
    ds = scan_dataset(write(tmp_path / "l.csv", images + images[:5]), 0.25, 0)
    assert len(ds.train) + len(ds.val) == 12
    assert not set(ds.train.paths) & set(ds.val.paths)  # no validation image leaks into training
    assert "5 repeated row(s) dropped" in capsys.readouterr().err


def test_same_image_with_two_labels_or_two_splits_is_refused(tmp_path, images):
    p, c = images[0]
    refused(write(tmp_path / "a.csv", [*images, (p, "blue" if c == "red" else "red")]),
            "lines 2 and 14: .* is listed with labels")
    rows = [(p, c, "train" if i else "val") for i, (p, c) in enumerate(images)] + [(images[0][0], c, "train")]
    refused(write(tmp_path / "b.csv", rows, ("path", "label", "split")), "is in split val and train")


def test_val_csv_equal_to_or_overlapping_the_training_file_is_refused(tmp_path, images):
    labels = write(tmp_path / "l.csv", images[::2])
    refused(labels, "is the training label file itself", val_csv=labels)
    refused(labels, "image\\(s\\) are in", val_csv=write(tmp_path / "v.csv", images[::3]))


def test_empty_split_cell_beside_named_splits_is_refused(tmp_path, images):
    rows = [(p, c, "" if i == 3 else ("val" if i % 3 == 0 else "train")) for i, (p, c) in enumerate(images)]
    refused(write(tmp_path / "l.csv", rows, ("path", "label", "split")), "line 5: the 'split' cell is empty")


def test_one_hot_columns_errors_name_column_and_value(tmp_path, images):
    rows = [(p, int(c == "blue"), int(c == "red"), 0) for p, c in images]
    refused(write(tmp_path / "z.csv", rows, ("path", "blue", "red", "green")), "column 'green' is 0 on every row")
    rows[4] = (rows[4][0], 1, "yes", 0)
    refused(write(tmp_path / "v.csv", rows, ("path", "blue", "red", "green")), "line 6: column 'red' is 'yes', not 0")


def test_quoted_newline_stays_in_its_cell(tmp_path, images):
    rows = [(p, "red\nline2" if c == "red" else c) for p, c in images]
    ds = scan_dataset(write(tmp_path / "l.csv", rows), 0.25, 0)
    assert ds.classes == ["blue", "red\nline2"]


def test_line_separators_inside_jsonl_strings_are_text(tmp_path, images):
    jl = tmp_path / "l.jsonl"
    jl.write_text("".join(json.dumps({"path": p, "label": c + "\u2028x\u0085y"}, ensure_ascii=False) + "\n"
                          for p, c in images), encoding="utf-8")
    assert scan_dataset(jl, 0.25, 0).classes == ["blue\u2028x\u0085y", "red\u2028x\u0085y"]


@pytest.mark.parametrize("label", [{"a": 1}, [["x"]], 1.5, True, [{"a": 1}]])
def test_dict_list_and_float_labels_in_jsonl_are_refused(tmp_path, images, label):
    jl = tmp_path / "l.jsonl"
    jl.write_text("".join(json.dumps({"path": p, "label": label if i == 2 else c}) + "\n"
                          for i, (p, c) in enumerate(images)))
    refused(jl, "line 3: 'label' is .*; a label is text or a whole number")


def test_one_empty_label_does_not_switch_to_multilabel(tmp_path, images):
    rows = [(p, "" if i == 7 else c) for i, (p, c) in enumerate(images)]
    msg = refused(write(tmp_path / "l.csv", rows), "has no label \\(1 image\\(s\\) without one\\)")
    assert "several per image" not in msg
    rows[0] = (rows[0][0], "blue|red")  # several labels on some image: multi-label, the empty one a negative
    assert scan_dataset(write(tmp_path / "m.csv", rows), 0.25, 0).multilabel


def test_duplicate_header_and_repeated_header_row_are_detected(tmp_path, images):
    refused(write(tmp_path / "a.csv", [(p, c, c) for p, c in images], ("path", "label", "Label")),
            "column 'label' appears twice in the header")
    refused(write(tmp_path / "b.csv", [*images[:6], ("path", "label"), *images[6:]]), "line 8 repeats the header")


def test_extra_columns_are_ignored_and_said_so(tmp_path, images, capsys):
    rows = [(p, c, "note") for p, c in images]
    assert len(scan_dataset(write(tmp_path / "l.csv", rows, ("path", "label", "comment")), 0.25, 0).train)
    assert "column(s) comment ignored" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://x/y.jpg", "s3://bucket/k.png"])
def test_urls_get_a_clear_line(tmp_path, images, url):
    refused(write(tmp_path / "l.csv", [*images, (url, "red")]), "is a URL; URLs are not supported")


def test_fifo_as_the_label_file_itself_is_refused(tmp_path):
    os.mkfifo(tmp_path / "l.csv")
    with no_hang(20):
        refused(tmp_path / "l.csv", "a FIFO, not a label file")
