"""One rule for scanning a dataset: regular files only (a FIFO named x.png never hangs a command), each real file
once (links inside DATA are aliases, reported), run folders are never data; and class names or file names
print with their control characters escaped."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli
from test_outputs import one_error_line, tiny_checkpoint
from vitcli.data import scan_dataset

HOSTILE = "evil\x1b]0;pwned\x07\x1b[31m"  # an OSC title change and a colour, from a folder or checkpoint


@contextmanager
def no_hang(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocked open() in this (main) thread."""

    def fire(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("scan") / "model.pt", ["blue", "red"])


def fifo_data(tmp_path: Path) -> Path:
    data = make_dataset(tmp_path / "d", classes=("blue", "red"), per_class=4)
    os.mkfifo(data / "red" / "x.png")
    return data


@pytest.mark.parametrize("command", ["eval", "predict", "predict-file", "inspect data", "inspect attention"])
def test_fifo_named_png_is_skipped_with_one_line_not_opened(tmp_path, model, command):
    data = fifo_data(tmp_path)
    args = {"eval": ["eval", data, "--model", model, "--device", "cpu", "--output", tmp_path / "ev"],
            "predict": ["predict", data / "red", "--model", model, "--device", "cpu"],
            "predict-file": ["predict", data / "red" / "x.png", data / "red" / "red_000.png", "--model", model],
            "inspect data": ["inspect", "data", data],
            "inspect attention": ["inspect", "attention", data / "red" / "x.png", data / "red" / "red_000.png",
                                  "--model", model, "--method", "raw", "--output", tmp_path / "att"]}[command]
    with no_hang(60):
        res = run_cli(*args)
    assert res.exit_code == (2 if command == "predict-file" else 0), res.output
    lines = [ln for ln in res.output.splitlines() if "x.png" in ln]
    assert len(lines) == 1 and "a FIFO" in lines[0], res.output
    assert "Traceback" not in res.output


def test_fifo_in_data_does_not_hang_train(tmp_path):
    from conftest import TINY, DatasetsUntouched
    from test_signals import Run

    data = fifo_data(tmp_path)
    with DatasetsUntouched([data]):
        child = Run(tmp_path, str(data), *TINY, "--epochs", "1", "--batch-size", "4", fork=True)  # a real process
        assert child.wait(timeout=90) == 0, child.output()  # wait() kills it and fails when it hangs
    assert "x.png: a FIFO, not an image file" in child.output() and "Traceback" not in child.output()


def test_symlinked_class_folders_are_aliases_counted_once(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("blue", "red"), per_class=4)
    os.symlink("red", data / "red_alias")  # ln -s a DATA/a_alias
    os.symlink("../blue", data / "red" / "l")  # ln -s ../b DATA/a/l
    os.symlink("blue_000.png", data / "blue" / "again.png")  # a file link to an image counted anyway
    outside = make_dataset(tmp_path / "elsewhere", classes=("blue",), per_class=2, seed=5)
    os.symlink(outside / "blue", data / "blue" / "more")  # a link to images outside DATA: followed
    ds = scan_dataset(data, 0.25, 0)
    assert ds.classes == ["blue", "red"]
    paths = ds.train.paths + ds.val.paths
    real = [os.path.realpath(p) for p in paths]
    assert len(set(real)) == len(real) == 10  # 4 + 4 + the 2 outside images, each once with one label
    labels = dict(zip(real, ds.train.labels + ds.val.labels, strict=True))
    assert all(labels[os.path.realpath(data / "blue" / f"blue_{i:03d}.png")] == 0 for i in range(4))
    res = run_cli("inspect", "data", data)
    assert res.exit_code == 0, res.output
    for name in ("red_alias", "red/l", "again.png"):
        assert sum(name in ln and "skipped" in ln for ln in res.output.splitlines()) == 1, (name, res.output)
    assert "exact duplicates within a split: 0" in res.output


def test_run_folders_are_never_scanned_as_data(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("blue", "red"), per_class=4)
    run = data / "runs" / "train"  # what `cd DATA && vitcli train .` used to leave behind
    run.mkdir(parents=True)
    for name in ("config.yaml", "metrics.csv", "curves.png", "split.csv"):
        (run / name).write_text("x")
    nested = data / "red" / "old-run"  # a run folder inside a class folder
    nested.mkdir()
    (nested / "config.yaml").write_text("x")
    (nested / "last.pt").write_text("x")
    (nested / "curves.png").write_bytes((data / "red" / "red_000.png").read_bytes())
    ds = scan_dataset(data, 0.25, 0)
    assert ds.classes == ["blue", "red"]
    assert not [p for p in ds.train.paths + ds.val.paths if "run" in str(p.relative_to(data))]
    res = run_cli("inspect", "data", data)
    assert "holds vitcli run folders" in res.output and "a vitcli run folder, not data" in res.output


def test_double_underscore_class_folder_is_reported_not_silently_dropped(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("blue", "red", "green"), per_class=3)
    os.rename(data / "green", data / "__background__")
    res = run_cli("inspect", "data", data)
    assert res.exit_code == 0, res.output
    assert "__background__: folder names starting with '__' or '.' are hidden, not classes" in res.output


def test_inspect_data_reports_dangling_links_and_unreadable_files(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("blue", "red"), per_class=3)
    os.symlink("gone.png", data / "red" / "dangling.png")
    os.symlink("/proc/self/mem", data / "red" / "eio.png")  # opens, then every read fails (EIO), even as root
    locked = data / "red" / "locked.png"
    locked.write_bytes((data / "red" / "red_000.png").read_bytes() + b"x")
    locked.chmod(0)  # unreadable unless root
    res = run_cli("inspect", "data", data)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert [ln for ln in res.output.splitlines() if "dangling.png" in ln] == [
        f"warning: skipped {data / 'red' / 'dangling.png'}: dangling symlink"]
    assert len([ln for ln in res.output.splitlines() if "eio.png:" in ln]) == 1
    if os.geteuid() != 0:
        assert len([ln for ln in res.output.splitlines() if "locked.png:" in ln]) == 1
    locked.chmod(0o644)


@pytest.mark.parametrize("args", [["train", ""], ["eval", ""], ["inspect", "data", ""], ["inspect", "distance", ""],
                                  ["inspect", "attention", ""], ["compare", "a", "b", ""]])
def test_empty_data_argument_is_an_error_not_the_current_folder(tmp_path, args):
    make_dataset(tmp_path, classes=("blue", "red"), per_class=3)  # the current folder is a valid dataset
    res = run_cli(*args)
    assert res.exit_code == 1, res.output
    assert "is empty (''); give a path" in one_error_line(res.output)


def test_empty_predict_argument_is_reported(tmp_path, model):
    make_dataset(tmp_path, classes=("blue", "red"), per_class=3)
    res = run_cli("predict", "", "--model", model)
    assert res.exit_code == 1, res.output
    assert "an empty argument names no file" in one_error_line(res.output)


def _no_raw_controls(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text, repr(text)


def test_hostile_class_names_from_a_checkpoint_print_escaped(tmp_path):
    classes = [HOSTILE, "two\nlines"]
    ckpt = tiny_checkpoint(tmp_path / "m.pt", classes)
    data = make_dataset(tmp_path / "d", classes=("red", "blue"), per_class=2)
    for old, new in zip(("red", "blue"), classes, strict=True):  # class folders named like the model's classes
        os.rename(data / old, data / new)
    for args in (["predict", data, "--model", ckpt, "--top-k", "2"],
                 ["eval", data, "--model", ckpt, "--output", tmp_path / "ev"]):
        res = run_cli(*args)
        assert res.exit_code == 0, res.output
        _no_raw_controls(res.output)
        assert "evil\\x1b]0;pwned\\x07" in res.output and "two\\nlines" in res.output
        assert "two\nlines" not in res.output


def test_csv_on_a_terminal_escapes_control_characters_and_stays_raw_in_a_pipe():
    import io

    from vitcli.inference import Prediction
    from vitcli.predict import write_results

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    rows = [Prediction("a.png", [(HOSTILE, 0.9)])]
    tty, pipe = Terminal(), io.StringIO()
    write_results(rows, "csv", 1, tty)
    write_results(rows, "csv", 1, pipe)
    _no_raw_controls(tty.getvalue())
    assert "evil\\x1b]0;pwned\\x07" in tty.getvalue()
    assert HOSTILE in pipe.getvalue()  # piped data keeps the real class name


def test_hostile_class_folder_names_print_escaped(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("blue", "red", "green"), per_class=2)
    os.rename(data / "red", data / HOSTILE)
    os.rename(data / "green", data / "new\nline")
    res = run_cli("inspect", "data", data)
    assert res.exit_code == 0, res.output
    _no_raw_controls(res.output)
    assert "new\\nline" in res.output and "evil\\x1b]0;pwned\\x07\\x1b[31m" in res.output
